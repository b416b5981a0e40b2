"""Third-party dense contrastive losses, copied formula for formula, for half-precision runs.

Neither transformers nor torchmultimodal is a dependency: each function below copies the
loss as its source writes it (the file is named in each docstring) and runs it on the
suite's inputs in the run's dtype, its gradients by autodiff (torch's for the torch
sources, ``jax.value_and_grad`` for big_vision). The suite hands the temperature
``t = exp(logit_scale)`` already exponentiated, so where a source exponentiates a log
temperature the adapter takes ``t`` as that exponential. The softmax sources have no bias
(it cancels in a softmax): their bias gradient is zero.

Each takes ``(img, txt, scale, bias)`` and returns ``(loss, grads)`` with
``grads = (dimg, dtxt, dscale, dbias)``; tests/test_conformance_half_adapters.py judges them
in bfloat16.
"""

from __future__ import annotations

from typing import Any


def _torch_value_and_grad(loss: Any, inputs: tuple[Any, ...]) -> tuple[Any, tuple[Any, ...]]:
    """``loss`` and its gradients with respect to `inputs` by torch autodiff.

    Parameters
    ----------
    loss : torch.Tensor
        0-d loss built from `inputs`.
    inputs : tuple of torch.Tensor
        Leaves that require grad; one that `loss` does not use gets a zero gradient.

    Returns
    -------
    tuple
        ``(loss.detach(), grads)`` with one gradient per input, in its dtype.
    """
    import torch

    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return loss.detach(), tuple(
        torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads, strict=True)
    )


def _leaves(*values: Any) -> tuple[Any, ...]:
    """Detached copies of `values` that require grad (the suite's leaves may be reused)."""
    return tuple(v.detach().requires_grad_(True) for v in values)


def hf_clip_loss(img: Any, txt: Any, scale: Any, bias: Any) -> tuple[Any, tuple[Any, ...]]:
    """Hugging Face CLIP's loss (transformers, src/transformers/models/clip/modeling_clip.py).

    ``CLIPModel.forward``: ``logits_per_text = torch.matmul(text_embeds, image_embeds.t())
    * logit_scale.exp()``; ``clip_loss(logits_per_text)`` averages
    ``contrastive_loss(similarity)`` and ``contrastive_loss(similarity.t())``, each
    ``cross_entropy(logits, torch.arange(len(logits)))``. Torch, every tensor in the input
    dtype.

    Parameters
    ----------
    img, txt : torch.Tensor
        (n, d) image and text embeddings.
    scale, bias : torch.Tensor
        0-d temperature ``logit_scale.exp()`` and bias (unused by this loss).

    Returns
    -------
    tuple
        ``(loss, (dimg, dtxt, dscale, dbias))``.
    """
    import torch
    from torch import nn

    image_embeds, text_embeds, logit_scale_exp, b = _leaves(img, txt, scale, bias)

    def contrastive_loss(logits: Any) -> Any:
        return nn.functional.cross_entropy(logits, torch.arange(len(logits), device=logits.device))

    def clip_loss(similarity: Any) -> Any:
        caption_loss = contrastive_loss(similarity)
        image_loss = contrastive_loss(similarity.t())
        return (caption_loss + image_loss) / 2.0

    logits_per_text = torch.matmul(text_embeds, image_embeds.t()) * logit_scale_exp  # (n, n)
    loss = clip_loss(logits_per_text)
    return _torch_value_and_grad(loss, (image_embeds, text_embeds, logit_scale_exp, b))


def torchmultimodal_contrastive_loss(
    img: Any, txt: Any, scale: Any, bias: Any
) -> tuple[Any, tuple[Any, ...]]:
    """torchmultimodal's ``contrastive_loss_with_temperature`` (facebookresearch/multimodal,
    torchmultimodal/modules/losses/contrastive_loss_with_temperature.py), one process.

    ``temperature = torch.exp(logit_scale)``; ``logits_per_query = torch.matmul(query,
    retrieval.transpose(0, 1)) * temperature`` and ``logits_per_retrieval =
    torch.matmul(retrieval, query.transpose(0, 1)) * temperature`` (two matmuls, not a
    transpose); ``(F.cross_entropy(logits_per_query, labels) +
    F.cross_entropy(logits_per_retrieval, labels)) / 2`` with ``labels = arange(n)``.
    Queries are the images. Torch, every tensor in the input dtype.

    Parameters
    ----------
    img, txt : torch.Tensor
        (n, d) query (image) and retrieval (text) embeddings.
    scale, bias : torch.Tensor
        0-d temperature ``exp(logit_scale)`` and bias (unused by this loss).

    Returns
    -------
    tuple
        ``(loss, (dimg, dtxt, dscale, dbias))``.
    """
    import torch
    import torch.nn.functional as F  # noqa: N812 (the source's spelling)

    query_embeddings, retrieval_embeddings, temperature, b = _leaves(img, txt, scale, bias)
    labels = torch.arange(query_embeddings.size(0), device=query_embeddings.device)
    logits_per_query = (
        torch.matmul(query_embeddings, retrieval_embeddings.transpose(0, 1)) * temperature
    )  # (n, d) @ (d, n) -> (n, n)
    logits_per_retrieval = (
        torch.matmul(retrieval_embeddings, query_embeddings.transpose(0, 1)) * temperature
    )  # (n, d) @ (d, n) -> (n, n)
    loss_q = F.cross_entropy(logits_per_query, labels)
    loss_r = F.cross_entropy(logits_per_retrieval, labels)
    loss = (loss_q + loss_r) / 2
    return _torch_value_and_grad(loss, (query_embeddings, retrieval_embeddings, temperature, b))


def big_vision_sigmoid_loss(
    img: Any, txt: Any, scale: Any, bias: Any
) -> tuple[Any, tuple[Any, ...]]:
    """big_vision's SigLIP loss (google-research/big_vision,
    big_vision/trainers/proj/image_text/siglip.py, ``loss_fn``), one device.

    ``logits = jnp.dot(zimg, ztxt.T)``; ``logits = logits * t + b``;
    ``eye = jnp.eye(n)``; ``m1_diag1 = -jnp.ones_like(logits) + 2 * eye``;
    ``loglik = jax.nn.log_sigmoid(m1_diag1 * logits)``; ``nll = -jnp.sum(loglik, axis=-1)``;
    ``l = jnp.mean(nll)``. ``jnp.eye`` is float32 there (jax without x64), so ``m1_diag1``
    and everything after it promote the half logits to float32. Its ``t`` is
    ``exp(t_param)``: the suite's `scale`. Jax, gradients by ``jax.value_and_grad``.

    Parameters
    ----------
    img, txt : jax.Array
        (n, d) image and text embeddings.
    scale, bias : jax.Array
        0-d temperature and bias.

    Returns
    -------
    tuple
        ``(loss, (dimg, dtxt, dscale, dbias))``.
    """
    import jax
    import jax.numpy as jnp

    def loss_fn(zimg: Any, ztxt: Any, t: Any, b: Any) -> Any:
        logits = jnp.dot(zimg, ztxt.T)  # (n, d) @ (d, n) -> (n, n), input dtype
        logits = logits * t + b
        eye = jnp.eye(zimg.shape[0], dtype=jnp.float32)  # jnp.eye's default without x64
        m1_diag1 = -jnp.ones_like(logits) + 2 * eye  # float32
        loglik = jax.nn.log_sigmoid(m1_diag1 * logits)
        nll = -jnp.sum(loglik, axis=-1)
        return jnp.mean(nll)

    value, grads = jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3))(img, txt, scale, bias)
    return value, tuple(grads)
