"""Analytic gradients against finite differences and against framework autodiff."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers import assert_close, pairs, to_numpy

import portable_siglip as ps

LOSS = {"sigmoid": ps.sigmoid_loss, "softmax": ps.softmax_loss}
LOSS_AND_GRAD = {"sigmoid": ps.sigmoid_loss_and_grad, "softmax": ps.softmax_loss_and_grad}


def compare_gradients(loss_name: str, grads: ps.Gradients, expected: list[np.ndarray]) -> None:
    for field, want in zip(ps.Gradients._fields, expected, strict=True):
        if loss_name == "softmax" and field == "bias":
            # Exactly zero analytically; autodiff leaves round-off of a sum of n^2 terms.
            assert float(to_numpy(grads.bias)) == 0.0
            assert abs(float(want)) < 1e-14
        else:
            assert_close(getattr(grads, field), want, 1e-12, f"grads.{field}")


def test_central_finite_differences(xp: Any, loss_name: str) -> None:
    # The loss-only path is differentiated numerically and compared with the analytic
    # gradient of the loss-and-gradient path: the two share no gradient code.
    rng = np.random.default_rng(11)
    n, d, block = 7, 3, 3
    img_np, txt_np = pairs(rng, n, d)
    scale, bias = 4.0, -2.0
    _, grads = LOSS_AND_GRAD[loss_name](
        xp.asarray(img_np), xp.asarray(txt_np), scale, bias, block_size=block
    )
    step = 1e-6

    def loss_at(img: np.ndarray, txt: np.ndarray, t: float, b: float) -> float:
        value = LOSS[loss_name](xp.asarray(img), xp.asarray(txt), t, b, block_size=block)
        return float(to_numpy(value))

    def central(f: Any) -> float:
        return (f(step) - f(-step)) / (2 * step)

    for i, k in [(0, 0), (3, 1), (6, 2)]:

        def bump_img(h: float, i: int = i, k: int = k) -> float:
            img = img_np.copy()
            img[i, k] += h
            return loss_at(img, txt_np, scale, bias)

        def bump_txt(h: float, i: int = i, k: int = k) -> float:
            txt = txt_np.copy()
            txt[i, k] += h
            return loss_at(img_np, txt, scale, bias)

        assert_close(to_numpy(grads.img)[i, k], central(bump_img), 1e-7, f"d img[{i},{k}]")
        assert_close(to_numpy(grads.txt)[i, k], central(bump_txt), 1e-7, f"d txt[{i},{k}]")
    d_scale = central(lambda h: loss_at(img_np, txt_np, scale + h, bias))
    d_bias = central(lambda h: loss_at(img_np, txt_np, scale, bias + h))
    assert_close(grads.scale, d_scale, 1e-7, "d scale")
    if loss_name == "sigmoid":
        assert_close(grads.bias, d_bias, 1e-7, "d bias")
    else:
        assert abs(d_bias) < 1e-9
        assert float(to_numpy(grads.bias)) == 0.0


def test_torch_autograd_of_dense_formula(loss_name: str) -> None:
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    rng = np.random.default_rng(12)
    n, d = 10, 5
    img_np, txt_np = pairs(rng, n, d)
    img = torch.tensor(img_np, requires_grad=True)
    txt = torch.tensor(txt_np, requires_grad=True)
    scale = torch.tensor(8.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-6.0, dtype=torch.float64, requires_grad=True)
    logits = scale * img @ txt.T + bias
    if loss_name == "sigmoid":
        labels = 2 * torch.eye(n, dtype=torch.float64) - 1
        dense = -functional.logsigmoid(labels * logits).sum() / n
    else:
        target = torch.arange(n)
        dense = (
            functional.cross_entropy(logits, target) + functional.cross_entropy(logits.T, target)
        ) / 2
    expected = torch.autograd.grad(dense, [img, txt, scale, bias], allow_unused=True)
    with torch.no_grad():
        loss, grads = LOSS_AND_GRAD[loss_name](
            img.detach(), txt.detach(), scale.detach(), bias.detach(), block_size=4
        )
    assert_close(loss, dense.item(), 1e-13, "loss")
    compare_gradients(loss_name, grads, [w.numpy() for w in expected])


def test_jax_grad_of_dense_formula(loss_name: str) -> None:
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    rng = np.random.default_rng(13)
    n, d = 9, 4
    img_np, txt_np = pairs(rng, n, d)

    def dense(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
        logits = scale * img @ txt.T + bias
        if loss_name == "sigmoid":
            labels = 2 * jnp.eye(n) - 1
            return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / n
        rows = jnp.trace(jax.nn.log_softmax(logits, axis=1))
        cols = jnp.trace(jax.nn.log_softmax(logits, axis=0))
        return -(rows + cols) / (2 * n)

    args = (jnp.asarray(img_np), jnp.asarray(txt_np), jnp.asarray(5.0), jnp.asarray(-4.0))
    value, expected = jax.value_and_grad(dense, argnums=(0, 1, 2, 3))(*args)
    loss, grads = LOSS_AND_GRAD[loss_name](*args, block_size=4)
    assert_close(loss, float(value), 1e-13, "loss")
    compare_gradients(loss_name, grads, [np.asarray(w) for w in expected])


def test_jax_jit(loss_name: str) -> None:
    # Validation inspects only shapes, dtypes and Python numbers, so it runs under jit.
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    rng = np.random.default_rng(14)
    img_np, txt_np = pairs(rng, 11, 4)
    img, txt = jnp.asarray(img_np), jnp.asarray(txt_np)
    eager_loss, eager = LOSS_AND_GRAD[loss_name](img, txt, 6.0, -3.0, block_size=4)
    jitted = jax.jit(LOSS_AND_GRAD[loss_name], static_argnames=("block_size",))
    loss, grads = jitted(img, txt, jnp.asarray(6.0), jnp.asarray(-3.0), block_size=4)
    assert_close(loss, float(eager_loss), 1e-14, "loss")
    for field in ps.Gradients._fields:
        assert_close(getattr(grads, field), to_numpy(getattr(eager, field)), 1e-13, field)


def test_jax_jit_with_closed_over_arrays(loss_name: str) -> None:
    # A tracer has no device (None) while a closed-over array is on cpu:0: not a mismatch.
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    img_np, txt_np = pairs(np.random.default_rng(15), 9, 4)
    img, txt = jnp.asarray(img_np), jnp.asarray(txt_np)
    scale = jnp.asarray(6.0)
    eager_loss, eager = LOSS_AND_GRAD[loss_name](img, txt, scale, -3.0, block_size=4)
    loss, grads = jax.jit(lambda i: LOSS_AND_GRAD[loss_name](i, txt, scale, -3.0, block_size=4))(
        img
    )
    assert_close(loss, float(eager_loss), 1e-14, "loss")
    assert_close(grads.img, to_numpy(eager.img), 1e-13, "img")
