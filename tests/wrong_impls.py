"""Deliberately wrong, but plausible, contrastive-loss implementations.

Each function imitates one mistake that real code has made (normalisation confusion, a
flipped sign, one softmax direction, exp overflow, a dropped tail chunk, a detached
parameter, a temperature for a scale, clamping, smoothing, a per-row loss, too little
precision, an exception; docs/conformance.md lists the diagnosis codes) and is wrong in that one way
only, so that the conformance suite can be asked to name it. ``WRONG`` maps each name to
the loss, backend and dtype it is judged with and the diagnosis code that the suite must
give.

Every function has the signature ``f(img, txt, scale, bias)`` of the conformance contract
(docs/conformance.md). Framework imports happen inside the functions, so that this module
imports without torch or jax (the tests skip what they cannot run), and so that
``python -m portable_siglip.conformance --impl tests/wrong_impls.py:NAME`` can load it by
path.
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


class Wrong(NamedTuple):
    """How one wrong implementation is judged, and what the suite must call it."""

    func: Callable[..., Any]
    loss: str
    backend: str
    dtype: str
    code: str


# ---------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------


def mean_over_pairs_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Sigmoid loss averaged over all n^2 pairs instead of summed and divided by n.

    The mistake of big_vision issue #115: ``-log_sigmoid(labels * logits).mean()`` reads like
    the usual "mean loss" but is n times smaller than the paper's (and open_clip's)
    ``sum / n``, and so is its gradient. Torch, gradients by autodiff.
    """
    import torch
    from torch.nn.functional import logsigmoid

    logits = scale * img @ txt.T + bias  # (n, d) @ (d, n) -> (n, n)
    n = logits.shape[0]
    labels = 2 * torch.eye(n, dtype=logits.dtype) - 1
    return -logsigmoid(labels * logits).mean()


def unnormalised_sum_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Sigmoid loss summed over all pairs without the final division by n.

    open_clip's ``SigLipLoss`` ends with ``loss / image_features.shape[0]``; ports that drop
    that line (or move it to a data-parallel mean that a single process never runs) return
    a loss n times too large. JAX, gradients by ``jax.grad``.
    """
    import jax
    import jax.numpy as jnp

    logits = scale * img @ txt.T + bias  # (n, d) @ (d, n) -> (n, n)
    n = logits.shape[0]
    labels = 2 * jnp.eye(n, dtype=logits.dtype) - 1
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits))


# ---------------------------------------------------------------------------------------
# Signs and labels
# ---------------------------------------------------------------------------------------


def bias_sign_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Sigmoid loss with the bias subtracted: ``Z = t * img @ txt.T - b``.

    Treating ``logit_bias`` as a decision threshold ("a pair is positive when the similarity
    exceeds b") instead of an additive logit offset. SigLIP's b is added and starts negative
    (-10); this version pushes the logits the wrong way. Torch, autodiff.
    """
    import torch
    from torch.nn.functional import logsigmoid

    logits = scale * img @ txt.T - bias  # (n, d) @ (d, n) -> (n, n)
    n = logits.shape[0]
    labels = 2 * torch.eye(n, dtype=logits.dtype) - 1
    return -logsigmoid(labels * logits).sum() / n


def labels_all_negative_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Sigmoid loss that treats every pair, the matched ones included, as a negative.

    open_clip's ``SigLipLoss.get_ground_truth(..., negative_only=True)`` returns
    ``-torch.ones(n, n)`` for the blocks exchanged with neighbouring ranks; calling it with
    ``negative_only=True`` for the local block as well (or building ``-ones`` and forgetting
    ``+ 2 * eye``) leaves no positive pair. Torch, autodiff.
    """
    import torch
    from torch.nn.functional import logsigmoid

    logits = scale * img @ txt.T + bias  # (n, d) @ (d, n) -> (n, n)
    n = logits.shape[0]
    labels = -torch.ones(n, n, dtype=logits.dtype)
    return -logsigmoid(labels * logits).sum() / n


def labels_flipped_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Sigmoid loss with the label sign flipped: ``-log_sigmoid(-labels * logits)``.

    Mixing up the identity ``softplus(-x) = -log_sigmoid(x)``: the minus sign is applied
    twice, so matched pairs are pushed apart and unmatched ones together. Torch, autodiff.
    """
    import torch
    from torch.nn.functional import logsigmoid

    logits = scale * img @ txt.T + bias  # (n, d) @ (d, n) -> (n, n)
    n = logits.shape[0]
    labels = 2 * torch.eye(n, dtype=logits.dtype) - 1
    return -logsigmoid(-labels * logits).sum() / n


def labels_zero_one_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Sigmoid loss with 0/1 labels: ``labels = eye(n)`` instead of ``2 * eye(n) - 1``.

    The labels of a binary cross-entropy ({0, 1}) carried over to SigLIP's
    ``-log_sigmoid(labels * logits)``, which wants {-1, +1}: every negative pair becomes
    ``-log_sigmoid(0) = log 2``, a constant with no gradient, so the negatives are never
    pushed apart. Torch, autodiff.
    """
    import torch
    from torch.nn.functional import logsigmoid

    logits = scale * img @ txt.T + bias  # (n, d) @ (d, n) -> (n, n)
    n = logits.shape[0]
    labels = torch.eye(n, dtype=logits.dtype)
    return -logsigmoid(labels * logits).sum() / n


# ---------------------------------------------------------------------------------------
# Softmax directions
# ---------------------------------------------------------------------------------------


def one_direction_softmax(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Softmax loss with the image-to-text cross-entropy only.

    Inf-CL's ``cal_inf_loss`` computes one direction per call and leaves the caller to add
    the text-to-image one; code that calls it once (or a hand-written InfoNCE that only
    takes ``cross_entropy(logits, arange(n))``) misses half of CLIP's symmetric loss.
    Torch, autodiff.
    """
    import torch
    from torch.nn.functional import cross_entropy

    logits = scale * img @ txt.T + bias  # (n, d) @ (d, n) -> (n, n)
    targets = torch.arange(logits.shape[0])
    return cross_entropy(logits, targets)


def sum_of_directions_softmax(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Softmax loss that adds the two directional cross-entropies instead of averaging them.

    open_clip's ``ClipLoss`` returns ``(CE(logits_per_image) + CE(logits_per_text)) / 2``;
    dropping the ``/ 2`` doubles the loss and every gradient. JAX, ``jax.grad``.
    """
    import jax
    import jax.numpy as jnp

    logits = scale * img @ txt.T + bias  # (n, d) @ (d, n) -> (n, n)
    image_to_text = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))
    text_to_image = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=0)))
    return image_to_text + text_to_image


# ---------------------------------------------------------------------------------------
# Overflow
# ---------------------------------------------------------------------------------------


def naive_softplus_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Sigmoid loss with softplus written as ``log(1 + exp(x))``.

    docs/math.md section 4 and anchors pitfall 8: ``exp`` overflows float32 for a logit above
    ~88.7, which trained SigLIP models (t ~ 118) reach; the loss becomes inf and the
    gradient NaN, while ordinary inputs give the right numbers. Torch, float32, autodiff.
    """
    import torch

    logits = scale * img @ txt.T + bias  # (n, d) @ (d, n) -> (n, n)
    n = logits.shape[0]
    labels = 2 * torch.eye(n, dtype=logits.dtype) - 1
    return torch.log(1 + torch.exp(-labels * logits)).sum() / n


def naive_logsumexp_softmax(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Softmax loss with ``log(exp(logits).sum())``: log-sum-exp without the max subtracted.

    The pure-torch ``RingProb`` of Inf-CL computes ``log(exp(qk).sum())``; in float32 the
    exponential overflows for a scaled logit above ~88.7 (scale 100 and cosine > 0.887).
    Torch, float32, autodiff.
    """
    import torch

    logits = scale * img @ txt.T + bias  # (n, d) @ (d, n) -> (n, n)
    positives = torch.diagonal(logits)
    exp = torch.exp(logits)
    image_to_text = torch.mean(torch.log(exp.sum(dim=1)) - positives)
    text_to_image = torch.mean(torch.log(exp.sum(dim=0)) - positives)
    return (image_to_text + text_to_image) / 2


def float32_naive_logsumexp_softmax(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Softmax loss with a naive log-sum-exp computed in float32 on float64 inputs.

    Inf-CL's pure-torch ring (``inf_cl/ring.py``, ``RingProb``) casts the features with
    ``.float()`` and takes ``log(exp(qk).sum())``: in a float64 run that is float32 rounding
    everywhere, and an overflow wherever a scaled logit exceeds 88.7, float32's exp limit,
    far below float64's 709.8. Two mistakes, both to be named. Torch, float64, autodiff.
    """
    import torch

    img32, txt32, scale32, bias32 = (x.float() for x in (img, txt, scale, bias))
    logits = scale32 * img32 @ txt32.T + bias32  # (n, d) @ (d, n) -> (n, n), float32
    positives = torch.diagonal(logits)
    exp = torch.exp(logits)
    image_to_text = torch.mean(torch.log(exp.sum(dim=1)) - positives)
    text_to_image = torch.mean(torch.log(exp.sum(dim=0)) - positives)
    return ((image_to_text + text_to_image) / 2).double()


# ---------------------------------------------------------------------------------------
# Blocking
# ---------------------------------------------------------------------------------------


def dropped_tail_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Row-chunked sigmoid loss whose loop ``range(n // chunk)`` forgets the remainder rows.

    Chunked losses (open_clip's first ``chunk_size`` version, big_vision's
    ``chunked_sigmoid``) loop over row blocks; ``for i in range(n // chunk)`` with
    ``chunk = 8`` silently drops the last ``n % 8`` rows whenever the batch is not a
    multiple of the chunk (and every row of a batch smaller than a chunk). Torch, autodiff.
    """
    return _chunked_sigmoid(img, txt, scale, bias, chunk=8)


def dropped_tail_clamped_chunk_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """The same dropped tail, with ``chunk = min(8, n)``: batches smaller than a chunk are right.

    What ``dropped_tail_sigmoid`` becomes once someone notices that a batch smaller than a
    chunk gives a zero loss: clamping the chunk to the batch fixes n < 8, yet
    ``range(n // chunk)`` still drops the ``n % 8`` remainder rows of every larger batch
    that is not a multiple of 8. Torch, autodiff.
    """
    return _chunked_sigmoid(img, txt, scale, bias, chunk=min(8, img.shape[0]))


def _chunked_sigmoid(img: Any, txt: Any, scale: Any, bias: Any, *, chunk: int) -> Any:
    """Sigmoid loss over row chunks of ``chunk`` rows, without the remainder chunk."""
    import torch
    from torch.nn.functional import logsigmoid

    n = img.shape[0]
    total = torch.zeros((), dtype=img.dtype)
    for i in range(n // chunk):  # the mistake: no last, shorter chunk of n % chunk rows
        rows = slice(i * chunk, (i + 1) * chunk)
        logits = scale * img[rows] @ txt.T + bias  # (chunk, d) @ (d, n) -> (chunk, n)
        labels = -torch.ones_like(logits)
        labels[:, rows] += 2 * torch.eye(chunk, dtype=logits.dtype)
        total = total - logsigmoid(labels * logits).sum()
    return total / n


# ---------------------------------------------------------------------------------------
# Scale and bias
# ---------------------------------------------------------------------------------------


def detached_scale_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Sigmoid loss with ``logit_scale.detach()``: the temperature never learns.

    Taking the scale through ``.detach()`` (or ``.item()``, e.g. after logging or clamping
    it) cuts it out of the graph: the loss is right but dL/dt is missing.
    Torch, autodiff.
    """
    import torch
    from torch.nn.functional import logsigmoid

    logits = scale.detach() * img @ txt.T + bias  # (n, d) @ (d, n) -> (n, n)
    n = logits.shape[0]
    labels = 2 * torch.eye(n, dtype=logits.dtype) - 1
    return -logsigmoid(labels * logits).sum() / n


def stop_gradient_bias_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Sigmoid loss with ``jax.lax.stop_gradient(bias)``: the bias never learns.

    The JAX form of a detached parameter (a bias read from a frozen collection, or wrapped
    in ``stop_gradient`` while debugging); compare open_clip #1076, where the bias is left
    without a gradient. JAX, ``jax.grad``.
    """
    import jax
    import jax.numpy as jnp

    logits = scale * img @ txt.T + jax.lax.stop_gradient(bias)  # (n, d) @ (d, n) -> (n, n)
    n = logits.shape[0]
    labels = 2 * jnp.eye(n, dtype=logits.dtype) - 1
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / n


def forgotten_bias_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Sigmoid loss whose logits forget the bias: ``Z = t * img @ txt.T``.

    CLIP's logits carried over to SigLIP without its learned ``logit_bias`` (the argument is
    taken and never used): the loss is that of b = 0, off wherever b is not, and dL/db is
    zero because b is not in the graph at all. Torch, autodiff.
    """
    import torch
    from torch.nn.functional import logsigmoid

    del bias  # the mistake: taken, never added to the logits
    logits = scale * img @ txt.T  # (n, d) @ (d, n) -> (n, n)
    n = logits.shape[0]
    labels = 2 * torch.eye(n, dtype=logits.dtype) - 1
    return -logsigmoid(labels * logits).sum() / n


def scale_as_log_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Sigmoid loss that exponentiates the scale it is given: ``exp(scale) * sims``.

    open_clip models keep ``logit_scale`` in log space and the losses take the multiplier
    ``exp(t')`` (anchors pitfall 2); a loss written for the model's parameter applies the
    exponential a second time. Torch, autodiff.
    """
    import torch
    from torch.nn.functional import logsigmoid

    logits = torch.exp(scale) * img @ txt.T + bias  # (n, d) @ (d, n) -> (n, n)
    n = logits.shape[0]
    labels = 2 * torch.eye(n, dtype=logits.dtype) - 1
    return -logsigmoid(labels * logits).sum() / n


# ---------------------------------------------------------------------------------------
# Hand-written gradients (NumPy, returning (loss, grads))
# ---------------------------------------------------------------------------------------


def _sigmoid_loss_and_dlogits(
    img: np.ndarray, txt: np.ndarray, scale: np.ndarray, bias: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Correct sigmoid loss, dL/dZ and the similarities, in float64."""
    img, txt = np.asarray(img, np.float64), np.asarray(txt, np.float64)
    sims = img @ txt.T  # (n, d) @ (d, n) -> (n, n)
    logits = float(scale) * sims + float(bias)
    n = logits.shape[0]
    labels = 2 * np.eye(n) - 1
    loss = np.logaddexp(0.0, -labels * logits).sum() / n
    sigmoid = 0.5 * (1 + np.tanh(0.5 * logits))  # overflow-free sigmoid
    return np.asarray(loss), (sigmoid - np.eye(n)) / n, sims


def _as_input(value: Any, like: np.ndarray) -> np.ndarray:
    return np.asarray(value, dtype=like.dtype)


def _grads(dlogits: np.ndarray, sims: np.ndarray, img: Any, txt: Any, t: float) -> Grads:
    """The chain rule from dL/dZ through ``Z = t img @ txt.T + b``, in the inputs' dtype."""
    img64, txt64 = np.asarray(img, np.float64), np.asarray(txt, np.float64)
    return Grads(
        img=_as_input(t * dlogits @ txt64, img),  # (n, n) @ (n, d) -> (n, d)
        txt=_as_input(t * dlogits.T @ img64, img),  # (n, n) @ (n, d) -> (n, d)
        scale=_as_input((dlogits * sims).sum(), img),
        bias=_as_input(dlogits.sum(), img),
    )


def transposed_gradient_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Sigmoid (loss, grads) whose feature gradients use G^T where G belongs, and vice versa.

    A hand-derived backward with the chain rule through ``img @ txt.T`` taken the wrong way
    round: ``d img = t * G.T @ txt`` and ``d txt = t * G @ img``. Shapes still match, and
    it is right whenever G is symmetric, so it survives a test with ``txt = img``. NumPy.
    """
    loss, dlogits, sims = _sigmoid_loss_and_dlogits(img, txt, scale, bias)
    t = float(scale)
    img64, txt64 = np.asarray(img, np.float64), np.asarray(txt, np.float64)
    grads = Grads(
        img=_as_input(t * dlogits.T @ txt64, img),  # (n, n) @ (n, d) -> (n, d)
        txt=_as_input(t * dlogits @ img64, img),  # (n, n) @ (n, d) -> (n, d)
        scale=_as_input((dlogits * sims).sum(), img),
        bias=_as_input(dlogits.sum(), img),
    )
    return _as_input(loss, img), grads


def gradient_sign_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Sigmoid (loss, grads) with dL/dZ = (I - sigmoid(Z)) / n: the gradient of the log-likelihood.

    Deriving the gradient of ``sum log sigmoid(l * Z)`` (the quantity being maximised) and
    forgetting the minus sign of the loss: every gradient points uphill. NumPy.
    """
    loss, dlogits, sims = _sigmoid_loss_and_dlogits(img, txt, scale, bias)
    return _as_input(loss, img), _grads(-dlogits, sims, img, txt, float(scale))


def gradient_factor_softmax(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Softmax (loss, grads) with dL/dZ = (P_rows + P_cols - 2I) / n: the 1/2 forgotten.

    The loss is the mean of the two directional cross-entropies, but the backward adds the
    two directions' gradients without the 1/2 of that mean: every gradient is twice too
    large while the loss is right. NumPy.
    """
    img64, txt64 = np.asarray(img, np.float64), np.asarray(txt, np.float64)
    sims = img64 @ txt64.T  # (n, d) @ (d, n) -> (n, n)
    t = float(scale)
    logits = t * sims + float(bias)
    n = logits.shape[0]
    row_max = logits.max(axis=1, keepdims=True)
    col_max = logits.max(axis=0, keepdims=True)
    row_lse = row_max + np.log(np.exp(logits - row_max).sum(axis=1, keepdims=True))  # (n, 1)
    col_lse = col_max + np.log(np.exp(logits - col_max).sum(axis=0, keepdims=True))  # (1, n)
    positives = np.diagonal(logits)
    loss = 0.5 * (np.mean(row_lse[:, 0] - positives) + np.mean(col_lse[0] - positives))
    probs_rows = np.exp(logits - row_lse)
    probs_cols = np.exp(logits - col_lse)
    dlogits = (probs_rows + probs_cols - 2 * np.eye(n)) / n  # should be / (2 n)
    return _as_input(loss, img), _grads(dlogits, sims, img, txt, t)


# ---------------------------------------------------------------------------------------
# Scale, clamping, smoothing and normalisation inside the loss
# ---------------------------------------------------------------------------------------


def scale_as_temperature_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Sigmoid loss that divides the similarities by the scale: ``Z = S / t + b``.

    InfoNCE code is often written with a temperature tau (``logits = sims / tau``, tau ~
    0.07); passing CLIP's multiplier t = exp(logit_scale) ~ 100 as that tau flattens every
    logit instead of sharpening it. Torch, autodiff.
    """
    import torch
    from torch.nn.functional import logsigmoid

    logits = img @ txt.T / scale + bias  # (n, d) @ (d, n) -> (n, n)
    n = logits.shape[0]
    labels = 2 * torch.eye(n, dtype=logits.dtype) - 1
    return -logsigmoid(labels * logits).sum() / n


def clamped_logits_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Sigmoid loss with ``logits.clamp(-50, 50)``, a guard against overflow.

    Clamping the logits is a common "fix" for an inf loss; it changes the loss of every
    pair beyond the clamp and zeroes its gradient (trained SigLIP logits reach ~100).
    Torch, autodiff.
    """
    import torch
    from torch.nn.functional import logsigmoid

    logits = (scale * img @ txt.T + bias).clamp(-50, 50)  # (n, d) @ (d, n) -> (n, n)
    n = logits.shape[0]
    labels = 2 * torch.eye(n, dtype=logits.dtype) - 1
    return -logsigmoid(labels * logits).sum() / n


def label_smoothing_softmax(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Softmax loss with ``cross_entropy(..., label_smoothing=0.1)`` in both directions.

    A training recipe's smoothing carried into the contrastive loss: a regulariser, not
    the CLIP loss, whose targets are one-hot. Torch, autodiff.
    """
    import torch
    from torch.nn.functional import cross_entropy

    logits = scale * img @ txt.T + bias  # (n, d) @ (d, n) -> (n, n)
    targets = torch.arange(logits.shape[0])
    image_to_text = cross_entropy(logits, targets, label_smoothing=0.1)
    text_to_image = cross_entropy(logits.T, targets, label_smoothing=0.1)
    return (image_to_text + text_to_image) / 2


def renormalised_inputs_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Sigmoid loss that L2-normalises img and txt itself (``F.normalize``) first.

    The model already normalises its embeddings (or deliberately does not); normalising
    again inside the loss changes the loss of every input that is not unit-norm and the
    gradient of every input. Torch, autodiff.
    """
    import torch
    from torch.nn.functional import logsigmoid, normalize

    img, txt = normalize(img, dim=-1), normalize(txt, dim=-1)
    logits = scale * img @ txt.T + bias  # (n, d) @ (d, n) -> (n, n)
    n = logits.shape[0]
    labels = 2 * torch.eye(n, dtype=logits.dtype) - 1
    return -logsigmoid(labels * logits).sum() / n


def per_row_loss_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Sigmoid loss returned per image row: the sum over the row, never reduced over rows.

    ``reduction="none"`` (or a ``.sum(dim=1)`` where ``.sum() / n`` belongs) hands back a
    vector of shape (n,). NumPy, loss only.
    """
    img64, txt64 = np.asarray(img, np.float64), np.asarray(txt, np.float64)
    logits = float(scale) * img64 @ txt64.T + float(bias)  # (n, d) @ (d, n) -> (n, n)
    labels = 2 * np.eye(logits.shape[0]) - 1
    return np.logaddexp(0.0, -labels * logits).sum(axis=1)  # (n,), not a scalar


def per_row_loss_torch_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """The same per-row vector in torch: autodiff of a non-scalar cannot even start.

    ``loss.backward()`` on a vector raises "grad can be implicitly created only for scalar
    outputs", which the suite must name as a per-row loss, not as a crash. Torch.
    """
    import torch
    from torch.nn.functional import logsigmoid

    logits = scale * img @ txt.T + bias  # (n, d) @ (d, n) -> (n, n)
    labels = 2 * torch.eye(logits.shape[0], dtype=logits.dtype) - 1
    return -logsigmoid(labels * logits).sum(dim=1)  # (n,), not a scalar


# ---------------------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------------------


def softplus_threshold_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Sigmoid loss with torch's ``F.softplus``, linear above its default ``threshold=20``.

    ``F.softplus(x)`` returns x itself where x > 20, an error of log1p(exp(-x)) < 2.1e-9
    per pair (and a sigmoid of exactly 1 in the backward): invisible in float32, beyond
    float64's 1e-9 tolerance on a case with b = 20. Torch, float64, autodiff.
    """
    import torch
    from torch.nn.functional import softplus

    logits = scale * img @ txt.T + bias  # (n, d) @ (d, n) -> (n, n)
    n = logits.shape[0]
    labels = 2 * torch.eye(n, dtype=logits.dtype) - 1
    return softplus(-labels * logits).sum() / n


def chunked_softplus_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """open_clip main's chunked ``SigLipLoss`` (``chunk_size > 0``), in torch, autodiff.

    open_clip's ``_chunked_loss`` (after 3.3.0, which has no ``chunk_size``) avoids a labels
    tensor: for each chunk of image rows it takes every pair as a negative,
    ``F.softplus(logits).sum()``, and turns the chunk's positives back into positives by
    subtracting their logits (``softplus(z) - z = softplus(-z)``). torch's ``F.softplus`` is
    linear above its default ``threshold=20``, and here it is applied to z itself: a
    positive with z > 20 costs ``z - z = 0`` instead of ``log1p(exp(-z)) ~ e^-20`` and gets
    a gradient of exactly 0 instead of ``-sigmoid(-z)``; a negative with z > 20 costs z.
    Wrong by up to e^-20 per pair: invisible in float32, beyond float64's tolerance on a
    case with b = 20. Chunks of 4 rows, so that the small cases are chunked too.
    """
    import torch
    from torch.nn.functional import softplus

    n, chunk = img.shape[0], 4
    total = torch.zeros((), dtype=img.dtype)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        logits = scale * img[start:stop] @ txt.T + bias  # (c, d) @ (d, n) -> (c, n)
        rows = torch.arange(stop - start)
        positives = logits[rows, start + rows]  # the chunk's diagonal pairs
        total = total + softplus(logits).sum() - positives.sum()
    return total / n


def float32_compute_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Sigmoid loss computed in float32 on float64 inputs, the loss cast back to float64.

    A ``.float()`` (or a float32 buffer, or JAX without ``jax_enable_x64``) inside a loss
    that is called with float64 tensors: errors of ~1e-7 relative. Torch, autodiff.
    """
    import torch
    from torch.nn.functional import logsigmoid

    img32, txt32, scale32, bias32 = (x.float() for x in (img, txt, scale, bias))
    logits = scale32 * img32 @ txt32.T + bias32  # (n, d) @ (d, n) -> (n, n)
    n = logits.shape[0]
    labels = 2 * torch.eye(n, dtype=logits.dtype) - 1
    return (-logsigmoid(labels * logits).sum() / n).double()


def half_precision_softmax(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Softmax loss whose logits and cross-entropies are bfloat16 in a float32 run.

    What ``torch.autocast(dtype=torch.bfloat16)`` does to a matmul followed by
    ``cross_entropy``: the logits keep 8 significant bits and the log-sum-exp runs on
    them. Torch, float32, autodiff.
    """
    import torch
    from torch.nn.functional import cross_entropy

    logits = (scale * img @ txt.T + bias).bfloat16()  # (n, d) @ (d, n) -> (n, n)
    targets = torch.arange(logits.shape[0])
    image_to_text = cross_entropy(logits, targets)
    text_to_image = cross_entropy(logits.T, targets)
    return ((image_to_text + text_to_image) / 2).float()


def half_precision_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Sigmoid loss whose logits, log-sigmoid and sum are bfloat16 in a float32 run.

    Autocast's bfloat16 matmul with the loss left in the matmul's dtype: every term and
    the sum of the n^2 terms are rounded to 8 significant bits. Torch, float32, autodiff.
    """
    import torch
    from torch.nn.functional import logsigmoid

    logits = (scale * img @ txt.T + bias).bfloat16()  # (n, d) @ (d, n) -> (n, n)
    n = logits.shape[0]
    labels = 2 * torch.eye(n, dtype=logits.dtype) - 1
    return (-logsigmoid(labels * logits).sum() / n).float()


def half_accumulating_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Dense torch sigmoid loss whose every addition of per-pair terms is in the input dtype.

    Each row's terms are added column by column into a vector of the input dtype, then the
    rows into a scalar of that dtype, as a kernel with a half-precision accumulator does.
    It passes every case with n <= 33; in bfloat16 a running sum stops growing once its
    terms fall below half an ulp of it (the n >= 1023 losses are 55-77% off), and in
    float16 it overflows where n times the loss exceeds 65504. Gradients are right
    (float32, then rounded to the dtype): only the loss is wrong. Torch, (loss, grads).
    """
    import torch

    with torch.no_grad():
        logits = scale * img @ txt.T + bias  # (n, d) @ (d, n) -> (n, n), input dtype
        n = logits.shape[0]
        eye = torch.eye(n, dtype=logits.dtype)
        terms = torch.nn.functional.softplus(-(2 * eye - 1) * logits)
        rows = torch.zeros(n, dtype=logits.dtype)
        for j in range(n):
            rows = rows + terms[:, j]
        total = torch.zeros((), dtype=logits.dtype)
        for i in range(n):
            total = total + rows[i]
        z = logits.float()
        G = (torch.sigmoid(z) - eye.float()) / n
        t = scale.float()
        grads = Grads(
            (t * G @ txt.float()).to(img.dtype),  # (n, n) @ (n, d) -> (n, d)
            (t * G.T @ img.float()).to(img.dtype),  # (n, n) @ (n, d) -> (n, d)
            (G * (img.float() @ txt.float().T)).sum().to(img.dtype),
            G.sum().to(img.dtype),
        )
    return total / n, grads


def _half_tile_sigmoid(
    img: Any, txt: Any, scale: Any, bias: Any, *, block: int, loss_half: bool, txt_half: bool
) -> Any:
    """A tiled sigmoid loss and gradient, float32 inside each tile, accumulated across tiles.

    The loop of a flash-style kernel: for each block of image rows, for each block of text
    rows, the tile's logits, terms and gradient factor in float32. The tile's loss (a float32
    sum) is added into the running total, and its text-gradient contribution into the text
    block's accumulator: in the input dtype where `loss_half` / `txt_half`, else in float32.
    The image gradient, ``dL/dt`` and ``dL/db`` always accumulate in float32. Torch.
    """
    import torch

    with torch.no_grad():
        half = img.dtype
        x, y = img.float(), txt.float()
        t, b = scale.float(), bias.float()
        n = x.shape[0]
        acc_loss = half if loss_half else torch.float32
        acc_txt = half if txt_half else torch.float32
        total = torch.zeros((), dtype=acc_loss)
        dimg = torch.zeros_like(x)
        dtxt = torch.zeros(y.shape, dtype=acc_txt)
        dscale = torch.zeros(())
        dbias = torch.zeros(())
        for i in range(0, n, block):
            for j in range(0, n, block):
                xi, yj = x[i : i + block], y[j : j + block]
                sims = xi @ yj.T  # (bi, d) @ (d, bj) -> (bi, bj)
                z = t * sims + b
                positive = torch.arange(i, i + xi.shape[0])[:, None] == torch.arange(
                    j, j + yj.shape[0]
                )
                signs = 2 * positive.float() - 1
                terms = torch.nn.functional.softplus(-signs * z)
                total = total + terms.sum().to(acc_loss)
                g = torch.sigmoid(z) - positive.float()  # dL/dZ * n, float32
                dimg[i : i + block] += t * g @ yj / n  # (bi, bj) @ (bj, d) -> (bi, d)
                part = t * g.T @ xi / n  # (bj, bi) @ (bi, d) -> (bj, d)
                dtxt[j : j + block] = dtxt[j : j + block] + part.to(acc_txt)
                dscale += (g * sims).sum() / n
                dbias += g.sum() / n
        grads = Grads(dimg.to(half), dtxt.to(half), dscale.to(half), dbias.to(half))
    return (total.float() / n).to(half), grads


def half_tile_accumulating_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Tiled sigmoid loss whose running total of tile losses is kept in the input dtype.

    Tiles of 128 x 128, float32 inside each tile (each tile's sum is right): only the
    addition of each tile's loss into the total rounds to the input dtype, as a kernel with a
    half-precision accumulator across tiles does. Within the old fixed tolerance (bfloat16:
    off by 2.1e-2 at n = 1023 and 4.4e-2 at n = 2049, against 5e-2), beyond twice the naive
    reference's error (bounds of 1e-2 and 9e-3); in float16 the total overflows 65504 at
    n = 129 and n = 2049. Gradients right. Torch, (loss, grads).
    """
    return _half_tile_sigmoid(img, txt, scale, bias, block=128, loss_half=True, txt_half=False)


def half_tile_text_gradient_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Tiled sigmoid loss whose text gradient is accumulated tile by tile in the input dtype.

    Tiles of 16, float32 inside each tile and for the loss: each image block's contribution
    to ``dL/dtxt`` is added into a text-block accumulator of the input dtype (129 additions
    at n = 2049). A limit of the rule, not in ``WRONG``: measured 2026-12-05 (torch 2.13
    CPU), its ``dL/dtxt`` at n = 2049 is off by 1.85e-2 against a bound of 1.70e-2 in
    bfloat16 (it fails, by a hair) and within its bound in float16 (0.98 x); a gradient
    accumulated over fewer tiles passes. Torch, (loss, grads).
    """
    return _half_tile_sigmoid(img, txt, scale, bias, block=16, loss_half=False, txt_half=True)


def half_row_text_gradient_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Sigmoid loss whose text gradient is summed image row by image row in the input dtype.

    Logits, loss, image, scale and bias gradients in float32, densely. The text gradient is
    accumulated over the image rows, as a loss chunked over the images (chunks of one row)
    does: each row's contribution ``t * G[i]^T img[i] / n`` is computed in float32, rounded
    to the input dtype and added into a text accumulator of that dtype (2049 additions at
    n = 2049). Measured 2026-12-06 (torch CPU): ``dL/dtxt`` is 3.9 and 1.6 times its bound
    at n = 129 and 2049 in bfloat16, 3.2 and 2.3 times in float16; the loss passes. Torch,
    (loss, grads).
    """
    import torch

    with torch.no_grad():
        half = img.dtype
        x, y = img.float(), txt.float()
        t, b = scale.float(), bias.float()
        n = x.shape[0]
        sims = x @ y.T  # (n, d) @ (d, n) -> (n, n)
        z = t * sims + b
        positive = torch.eye(n, dtype=torch.float32)
        loss = torch.nn.functional.softplus(-(2 * positive - 1) * z).sum() / n
        g = torch.sigmoid(z) - positive  # dL/dZ * n, float32
        dtxt = torch.zeros(y.shape, dtype=half)
        for i in range(n):
            part = t * g[i : i + 1].T @ x[i : i + 1] / n  # (n, 1) @ (1, d) -> (n, d)
            dtxt = dtxt + part.to(half)
        grads = Grads(
            (t * g @ y / n).to(half),
            dtxt,
            ((g * sims).sum() / n).to(half),
            (g.sum() / n).to(half),
        )
    return loss.to(half), grads


def half_sum_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """open_clip's ``SigLipLoss`` on half inputs: ``-logsigmoid(labels * logits).sum() / n``.

    Every tensor in the input dtype. Right in bfloat16 (within twice the naive reference's
    error); in float16 the sum of the n^2 terms is rounded to float16 before the division,
    and overflows 65504 on the large cases where n times the loss is larger (n = 129 and
    n = 2049), with finite gradients. Torch, autodiff.
    """
    import torch
    from torch.nn.functional import logsigmoid

    logits = scale * img @ txt.T + bias  # (n, d) @ (d, n) -> (n, n), input dtype
    n = logits.shape[0]
    labels = 2 * torch.eye(n, dtype=logits.dtype) - 1
    return -logsigmoid(labels * logits).sum() / n


def half_logits_softmax(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """open_clip's ``ClipLoss`` run on half inputs: logits and cross-entropies in that dtype.

    ``(CE(t * img @ txt.T + b) + CE(its transpose)) / 2`` with every tensor in the input
    dtype, as ``ClipLoss`` computes it under bfloat16 weights. torch's CPU ``log_softmax``
    rounds the sum of exponentials to bfloat16 before its log, so a saturated row's loss of
    1e-4 becomes 0 (identity-4 is off by 14% of the floor-scaled loss). More than twice the
    naive reference's error, which keeps float32 inside each kernel. Torch, autodiff.
    """
    import torch
    from torch.nn.functional import cross_entropy

    logits = scale * img @ txt.T + bias  # (n, d) @ (d, n) -> (n, n), input dtype
    targets = torch.arange(logits.shape[0])
    return (cross_entropy(logits, targets) + cross_entropy(logits.T, targets)) / 2


def _tf32(values: np.ndarray) -> np.ndarray:
    """Round float32 values to TF32: 10 explicit mantissa bits, to nearest."""
    bits = np.array(values, dtype=np.float32).view(np.uint32)
    bits = (bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)
    return bits.view(np.float32)


def tf32_matmul_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Sigmoid (loss, grads) in float32 whose matmuls round their inputs to TF32.

    Simulates an Ampere-or-later GPU with ``torch.backends.cuda.matmul.allow_tf32`` (or
    JAX's default matmul precision): each matmul rounds its operands to 10 mantissa bits.
    ``scale * img @ txt.T`` multiplies ``scale * img`` first, so the scaled features and,
    in the backward, G lose bits. NumPy, float32.
    """
    img32, txt32 = np.asarray(img, np.float32), np.asarray(txt, np.float32)
    t, b = np.float32(scale), np.float32(bias)
    logits = _tf32(t * img32) @ _tf32(txt32).T + b  # (n, d) @ (d, n) -> (n, n)
    n = logits.shape[0]
    eye = np.eye(n, dtype=np.float32)
    loss = np.logaddexp(np.float32(0), (1 - 2 * eye) * logits).sum() / n
    sigmoid = 0.5 * (1 + np.tanh(0.5 * logits))  # overflow-free sigmoid
    dlogits = ((sigmoid - eye) / n).astype(np.float32)
    sims = _tf32(img32) @ _tf32(txt32).T  # (n, d) @ (d, n) -> (n, n)
    grads = Grads(
        img=t * (_tf32(dlogits) @ _tf32(txt32)),  # (n, n) @ (n, d) -> (n, d)
        txt=t * (_tf32(dlogits).T @ _tf32(img32)),  # (n, n) @ (n, d) -> (n, d)
        scale=(dlogits * sims).sum(),
        bias=dlogits.sum(),
    )
    return np.float32(loss), grads


# ---------------------------------------------------------------------------------------
# Raising
# ---------------------------------------------------------------------------------------


def raises_on_every_case_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """An implementation that raises on every call: a signature mismatch with the contract.

    Written for ``f(img, txt, logit_scale, logit_bias=None)`` with a projection it expects
    to find on a module; called as the contract says, it fails before computing anything.
    The report must say so once, with the traceback, not once per check. NumPy.
    """
    del img, txt, scale, bias
    msg = "loss needs `projection` set before the first call"
    raise AttributeError(msg)


WRONG: dict[str, Wrong] = {
    "mean_over_pairs_sigmoid": Wrong(
        mean_over_pairs_sigmoid, "sigmoid", "torch", "float64", "mean-over-pairs"
    ),
    "unnormalised_sum_sigmoid": Wrong(
        unnormalised_sum_sigmoid, "sigmoid", "jax", "float64", "unnormalised-sum"
    ),
    "bias_sign_sigmoid": Wrong(bias_sign_sigmoid, "sigmoid", "torch", "float64", "bias-sign"),
    "labels_all_negative_sigmoid": Wrong(
        labels_all_negative_sigmoid, "sigmoid", "torch", "float64", "labels"
    ),
    "labels_flipped_sigmoid": Wrong(
        labels_flipped_sigmoid, "sigmoid", "torch", "float64", "labels"
    ),
    "labels_zero_one_sigmoid": Wrong(
        labels_zero_one_sigmoid, "sigmoid", "torch", "float64", "zero-one-labels"
    ),
    "one_direction_softmax": Wrong(
        one_direction_softmax, "softmax", "torch", "float64", "one-direction"
    ),
    "sum_of_directions_softmax": Wrong(
        sum_of_directions_softmax, "softmax", "jax", "float64", "sum-of-directions"
    ),
    "naive_softplus_sigmoid": Wrong(
        naive_softplus_sigmoid, "sigmoid", "torch", "float32", "non-finite-stress"
    ),
    "naive_logsumexp_softmax": Wrong(
        naive_logsumexp_softmax, "softmax", "torch", "float32", "non-finite-stress"
    ),
    "float32_naive_logsumexp_softmax": Wrong(
        float32_naive_logsumexp_softmax, "softmax", "torch", "float64", "non-finite-stress"
    ),
    "dropped_tail_clamped_chunk_sigmoid": Wrong(
        dropped_tail_clamped_chunk_sigmoid, "sigmoid", "torch", "float64", "tail-block"
    ),
    "dropped_tail_sigmoid": Wrong(
        dropped_tail_sigmoid, "sigmoid", "torch", "float64", "tail-block"
    ),
    "detached_scale_sigmoid": Wrong(
        detached_scale_sigmoid, "sigmoid", "torch", "float64", "zero-scale-grad"
    ),
    "stop_gradient_bias_sigmoid": Wrong(
        stop_gradient_bias_sigmoid, "sigmoid", "jax", "float64", "zero-bias-grad"
    ),
    "forgotten_bias_sigmoid": Wrong(
        forgotten_bias_sigmoid, "sigmoid", "torch", "float64", "missing-bias"
    ),
    "scale_as_log_sigmoid": Wrong(
        scale_as_log_sigmoid, "sigmoid", "torch", "float64", "scale-as-log"
    ),
    "transposed_gradient_sigmoid": Wrong(
        transposed_gradient_sigmoid, "sigmoid", "numpy", "float64", "transposed-gradient"
    ),
    "gradient_sign_sigmoid": Wrong(
        gradient_sign_sigmoid, "sigmoid", "numpy", "float64", "gradient-sign"
    ),
    "gradient_factor_softmax": Wrong(
        gradient_factor_softmax, "softmax", "numpy", "float64", "gradient-factor"
    ),
    "scale_as_temperature_sigmoid": Wrong(
        scale_as_temperature_sigmoid, "sigmoid", "torch", "float64", "scale-as-temperature"
    ),
    "clamped_logits_sigmoid": Wrong(
        clamped_logits_sigmoid, "sigmoid", "torch", "float64", "clamped-logits"
    ),
    "label_smoothing_softmax": Wrong(
        label_smoothing_softmax, "softmax", "torch", "float64", "label-smoothing"
    ),
    "renormalised_inputs_sigmoid": Wrong(
        renormalised_inputs_sigmoid, "sigmoid", "torch", "float64", "renormalised-inputs"
    ),
    "per_row_loss_sigmoid": Wrong(
        per_row_loss_sigmoid, "sigmoid", "numpy", "float64", "per-row-loss"
    ),
    "per_row_loss_torch_sigmoid": Wrong(
        per_row_loss_torch_sigmoid, "sigmoid", "torch", "float64", "per-row-loss"
    ),
    "softplus_threshold_sigmoid": Wrong(
        softplus_threshold_sigmoid, "sigmoid", "torch", "float64", "softplus-threshold"
    ),
    "chunked_softplus_sigmoid": Wrong(
        chunked_softplus_sigmoid, "sigmoid", "torch", "float64", "softplus-threshold"
    ),
    "float32_compute_sigmoid": Wrong(
        float32_compute_sigmoid, "sigmoid", "torch", "float64", "float32-compute"
    ),
    "half_precision_softmax": Wrong(
        half_precision_softmax, "softmax", "torch", "float32", "half-precision"
    ),
    "half_precision_sigmoid": Wrong(
        half_precision_sigmoid, "sigmoid", "torch", "float32", "half-precision"
    ),
    "half_accumulating_sigmoid-bfloat16": Wrong(
        half_accumulating_sigmoid, "sigmoid", "torch", "bfloat16", "half-precision"
    ),
    "half_accumulating_sigmoid-float16": Wrong(
        half_accumulating_sigmoid, "sigmoid", "torch", "float16", "half-precision"
    ),
    "half_tile_accumulating_sigmoid-bfloat16": Wrong(
        half_tile_accumulating_sigmoid, "sigmoid", "torch", "bfloat16", "half-precision"
    ),
    "half_tile_accumulating_sigmoid-float16": Wrong(
        half_tile_accumulating_sigmoid, "sigmoid", "torch", "float16", "half-precision"
    ),
    "half_row_text_gradient_sigmoid-bfloat16": Wrong(
        half_row_text_gradient_sigmoid, "sigmoid", "torch", "bfloat16", "half-precision"
    ),
    "half_row_text_gradient_sigmoid-float16": Wrong(
        half_row_text_gradient_sigmoid, "sigmoid", "torch", "float16", "half-precision"
    ),
    "half_sum_sigmoid-float16": Wrong(
        half_sum_sigmoid, "sigmoid", "torch", "float16", "half-precision"
    ),
    "half_logits_softmax-bfloat16": Wrong(
        half_logits_softmax, "softmax", "torch", "bfloat16", "half-precision-logits"
    ),
    "half_logits_softmax-float16": Wrong(
        half_logits_softmax, "softmax", "torch", "float16", "half-precision-logits"
    ),
    "tf32_matmul_sigmoid": Wrong(tf32_matmul_sigmoid, "sigmoid", "numpy", "float32", "tf32-matmul"),
    "raises_on_every_case_sigmoid": Wrong(
        raises_on_every_case_sigmoid, "sigmoid", "numpy", "float64", "raises"
    ),
}
