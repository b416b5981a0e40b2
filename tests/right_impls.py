"""Correct, independent implementations that the conformance suite must accept.

Written from the formulas of docs/math.md (dense n x n logits), without importing
portable_siglip, so that a bug shared with the library cannot hide here:

- ``torch_sigmoid``, ``torch_softmax``: loss only, gradients by torch autograd;
- ``jax_sigmoid``, ``jax_softmax``: loss only, gradients by ``jax.grad``;
- ``numpy_sigmoid_and_grad``, ``numpy_softmax_and_grad``: ``(loss, grads)`` with
  hand-derived gradients;
- ``numpy_sigmoid``, ``numpy_softmax``: loss only (the suite can check the value alone).

Half-precision inputs are computed in float32 and the results cast back, as mixed-precision
training code does; ``torch_sigmoid_half_logits`` instead computes in the half dtype, as
open_clip's ``SigLipLoss`` does on half inputs (the naive loss FlashAttention's rule measures
a half-precision run against). Framework imports happen inside the functions, so that this module
imports without torch or jax and can be loaded by path by the conformance command line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np


class Grads(NamedTuple):
    """Gradients returned by the (loss, grads) implementations."""

    img: Any
    txt: Any
    scale: Any
    bias: Any


class Right(NamedTuple):
    """How one correct implementation is judged."""

    func: Callable[..., Any]
    loss: str
    backend: str
    dtype: str
    has_gradients: bool


# ---------------------------------------------------------------------------------------
# torch (autograd)
# ---------------------------------------------------------------------------------------


def _torch_logits(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    import torch

    work = torch.promote_types(img.dtype, torch.float32)
    return scale.to(work) * img.to(work) @ txt.to(work).T + bias.to(work)  # -> (n, n)


def torch_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Dense SigLIP loss in torch: ``(1/n) sum_ij softplus(-l_ij Z_ij)``."""
    import torch
    from torch.nn.functional import logsigmoid

    logits = _torch_logits(img, txt, scale, bias)
    n = logits.shape[0]
    labels = 2 * torch.eye(n, dtype=logits.dtype) - 1
    # softplus(-x) = -log sigmoid(x), stable for any |x|
    loss = -logsigmoid(labels * logits).sum() / n
    return loss.to(img.dtype)


def torch_sigmoid_half_logits(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """open_clip's ``SigLipLoss`` on half inputs: logits, terms and sum in the input dtype.

    ``-logsigmoid(labels * (t * img @ txt.T + b)).sum() / n`` with every tensor in the
    input dtype: the naive dense loss of a half-precision run, which FlashAttention's rule
    accepts in bfloat16 (its error is the naive reference's, within the factor 2). In
    float16 its sum overflows 65504 on the two large cases where n times the loss is larger,
    and the suite fails it there.
    """
    import torch
    from torch.nn.functional import logsigmoid

    logits = scale * img @ txt.T + bias  # (n, d) @ (d, n) -> (n, n), input dtype
    n = logits.shape[0]
    labels = 2 * torch.eye(n, dtype=logits.dtype) - 1
    return -logsigmoid(labels * logits).sum() / n


def torch_softmax(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Dense symmetric CLIP loss in torch: mean of the row and column cross-entropies."""
    import torch

    logits = _torch_logits(img, txt, scale, bias)
    positives = torch.diagonal(logits)
    image_to_text = torch.mean(torch.logsumexp(logits, dim=1) - positives)
    text_to_image = torch.mean(torch.logsumexp(logits, dim=0) - positives)
    return ((image_to_text + text_to_image) / 2).to(img.dtype)


# ---------------------------------------------------------------------------------------
# jax (jax.grad)
# ---------------------------------------------------------------------------------------


def _jax_logits(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    import jax.numpy as jnp

    work = jnp.promote_types(img.dtype, jnp.float32)
    img, txt = img.astype(work), txt.astype(work)
    return scale.astype(work) * img @ txt.T + bias.astype(work)  # (n, d) @ (d, n) -> (n, n)


def jax_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Dense SigLIP loss in JAX."""
    import jax
    import jax.numpy as jnp

    logits = _jax_logits(img, txt, scale, bias)
    n = logits.shape[0]
    labels = 2 * jnp.eye(n, dtype=logits.dtype) - 1
    loss = -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / n
    return loss.astype(img.dtype)


def jax_softmax(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Dense symmetric CLIP loss in JAX."""
    import jax.numpy as jnp
    from jax.scipy.special import logsumexp

    logits = _jax_logits(img, txt, scale, bias)
    positives = jnp.diagonal(logits)
    image_to_text = jnp.mean(logsumexp(logits, axis=1) - positives)
    text_to_image = jnp.mean(logsumexp(logits, axis=0) - positives)
    return ((image_to_text + text_to_image) / 2).astype(img.dtype)


# ---------------------------------------------------------------------------------------
# NumPy (hand-derived gradients)
# ---------------------------------------------------------------------------------------


def _numpy_inputs(
    img: Any, txt: Any, scale: Any, bias: Any
) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """Float64 copies of the features, the scale, and the similarities ``img @ txt.T``."""
    img64, txt64 = np.asarray(img, np.float64), np.asarray(txt, np.float64)
    return img64, txt64, float(scale), img64 @ txt64.T  # (n, d) @ (d, n) -> (n, n)


def _chain_rule(
    dlogits: np.ndarray, img64: np.ndarray, txt64: np.ndarray, t: float, sims: np.ndarray, like: Any
) -> Grads:
    """Gradients of the inputs from dL/dZ, for Z = t * img @ txt.T + b."""
    dtype = np.asarray(like).dtype
    return Grads(
        img=np.asarray(t * dlogits @ txt64, dtype),  # (n, n) @ (n, d) -> (n, d)
        txt=np.asarray(t * dlogits.T @ img64, dtype),  # (n, n) @ (n, d) -> (n, d)
        scale=np.asarray((dlogits * sims).sum(), dtype),
        bias=np.asarray(dlogits.sum(), dtype),
    )


def numpy_sigmoid_and_grad(img: Any, txt: Any, scale: Any, bias: Any) -> tuple[Any, Grads]:
    """Dense SigLIP loss and its gradients: G = (sigmoid(Z) - I) / n."""
    img64, txt64, t, sims = _numpy_inputs(img, txt, scale, bias)
    logits = t * sims + float(bias)
    n = logits.shape[0]
    labels = 2 * np.eye(n) - 1
    loss = np.logaddexp(0.0, -labels * logits).sum() / n
    sigmoid = 0.5 * (1 + np.tanh(0.5 * logits))  # no exp, so no overflow
    dlogits = (sigmoid - np.eye(n)) / n
    dtype = np.asarray(img).dtype
    return np.asarray(loss, dtype), _chain_rule(dlogits, img64, txt64, t, sims, img)


def _log_softmax(logits: np.ndarray, axis: int) -> np.ndarray:
    shifted = logits - logits.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def numpy_softmax_and_grad(img: Any, txt: Any, scale: Any, bias: Any) -> tuple[Any, Grads]:
    """Dense CLIP loss and its gradients: G = (softmax_rows + softmax_cols - 2I) / (2n)."""
    img64, txt64, t, sims = _numpy_inputs(img, txt, scale, bias)
    logits = t * sims + float(bias)
    n = logits.shape[0]
    log_rows = _log_softmax(logits, axis=1)
    log_cols = _log_softmax(logits, axis=0)
    loss = -0.5 * (np.mean(np.diagonal(log_rows)) + np.mean(np.diagonal(log_cols)))
    dlogits = (np.exp(log_rows) + np.exp(log_cols) - 2 * np.eye(n)) / (2 * n)
    dtype = np.asarray(img).dtype
    return np.asarray(loss, dtype), _chain_rule(dlogits, img64, txt64, t, sims, img)


def numpy_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Dense SigLIP loss alone (no gradients)."""
    return numpy_sigmoid_and_grad(img, txt, scale, bias)[0]


def numpy_softmax(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Dense CLIP loss alone (no gradients)."""
    return numpy_softmax_and_grad(img, txt, scale, bias)[0]


RIGHT: dict[str, Right] = {
    "torch_sigmoid-float64": Right(torch_sigmoid, "sigmoid", "torch", "float64", True),
    "torch_softmax-float64": Right(torch_softmax, "softmax", "torch", "float64", True),
    "torch_sigmoid-float32": Right(torch_sigmoid, "sigmoid", "torch", "float32", True),
    "torch_sigmoid-bfloat16": Right(torch_sigmoid, "sigmoid", "torch", "bfloat16", True),
    "torch_softmax-bfloat16": Right(torch_softmax, "softmax", "torch", "bfloat16", True),
    "torch_sigmoid_half_logits-bfloat16": Right(
        torch_sigmoid_half_logits, "sigmoid", "torch", "bfloat16", True
    ),
    "jax_sigmoid-float64": Right(jax_sigmoid, "sigmoid", "jax", "float64", True),
    "jax_softmax-float64": Right(jax_softmax, "softmax", "jax", "float64", True),
    "jax_softmax-float32": Right(jax_softmax, "softmax", "jax", "float32", True),
    "numpy_sigmoid_and_grad-float64": Right(
        numpy_sigmoid_and_grad, "sigmoid", "numpy", "float64", True
    ),
    "numpy_softmax_and_grad-float64": Right(
        numpy_softmax_and_grad, "softmax", "numpy", "float64", True
    ),
    "numpy_sigmoid_and_grad-float32": Right(
        numpy_sigmoid_and_grad, "sigmoid", "numpy", "float32", True
    ),
}

LOSS_ONLY: dict[str, Right] = {
    "numpy_sigmoid": Right(numpy_sigmoid, "sigmoid", "numpy", "float64", False),
    "numpy_softmax": Right(numpy_softmax, "softmax", "numpy", "float64", False),
}
