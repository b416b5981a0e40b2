"""Values and gradients of both losses against the long-double oracle, on every backend."""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as np
import pytest
from helpers import (
    DTYPES,
    GRAD_RTOL,
    LOSS,
    LOSS_AND_GRAD,
    LOSS_RTOL,
    assert_close,
    dtype_of,
    on_backend,
    pairs,
    relative_error,
    seeded_pairs,
    to_numpy,
    unit_rows,
)
from oracle import IDS_REFERENCES, REFERENCES, Reference

import portable_siglip as ps


def check_against_oracle(
    loss_name: str,
    loss: Any,
    grads: ps.Gradients,
    img: np.ndarray,
    txt: np.ndarray,
    scale: float,
    bias: float,
    dtype: str,
) -> None:
    ref = REFERENCES[loss_name](img, txt, scale, bias)
    check_against(ref, loss_name, loss, grads, dtype)


def check_against(
    ref: Reference, loss_name: str, loss: Any, grads: ps.Gradients, dtype: str
) -> None:
    """The loss and all four gradients against the oracle's, at the tolerances of `dtype`."""
    assert_close(loss, ref.loss, LOSS_RTOL[dtype], "loss")
    assert_close(grads.img, ref.img, GRAD_RTOL[dtype], "grads.img")
    assert_close(grads.txt, ref.txt, GRAD_RTOL[dtype], "grads.txt")
    # Scalar gradients are sums over n^2 terms, accumulated in the compute dtype.
    scalar_rtol = LOSS_RTOL[dtype] * 10
    assert_close(grads.scale, ref.scale, scalar_rtol, "grads.scale")
    if loss_name == "sigmoid":
        assert_close(grads.bias, ref.bias, scalar_rtol, "grads.bias")
    else:
        assert float(to_numpy(grads.bias)) == 0.0


# (n, d, block_size): n = 1 and d = 1, n not divisible by the block, n != d, one tile,
# tiles of one element, and a block larger than n.
SHAPES = [(1, 1, None), (1, 5, 1), (2, 1, 1), (7, 3, 3), (16, 8, 5), (33, 17, 8), (40, 64, 64)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "d", "block_size"), SHAPES)
def test_matches_oracle(
    xp: Any, loss_name: str, dtype: str, n: int, d: int, block_size: int | None
) -> None:
    # The arithmetic at float32 operands: "exact" (float32 and float64 ignore `precision`).
    img, txt, img_np, txt_np = seeded_pairs(xp, n, d, dtype)
    scale, bias = 10.0, -10.0
    options = {"block_size": block_size, "precision": "exact"}
    loss, grads = LOSS_AND_GRAD[loss_name](img, txt, scale, bias, **options)
    check_against_oracle(loss_name, loss, grads, img_np, txt_np, scale, bias, dtype)
    loss_only = LOSS[loss_name](img, txt, scale, bias, **options)
    assert_close(loss_only, to_numpy(loss), LOSS_RTOL[dtype], "loss without gradient")


def ids_batch(
    rng: np.random.Generator, m: int, k: int, d: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """m image and k text rows in about min(m, k) / 2 id groups, each on both sides.

    Every row has a positive; rows share ids on both sides (duplicate images, several
    captions per image), so rows of either side have several positives. Each caption is
    drawn near an image of its group, so positives score higher than negatives.
    """
    groups = max(1, (min(m, k) + 1) // 2)

    def ids(rows: int) -> np.ndarray:
        return rng.permutation(
            np.concatenate([np.arange(groups), rng.integers(0, groups, rows - groups)])
        )

    img_ids, txt_ids = ids(m), ids(k)
    img = unit_rows(rng, m, d)
    anchors = np.stack([img[np.flatnonzero(img_ids == group)[0]] for group in txt_ids])
    txt = anchors + rng.standard_normal((k, d)) / np.sqrt(d)
    return img, txt / np.linalg.norm(txt, axis=1, keepdims=True), img_ids, txt_ids


# (m, k, d, block_size): one image row with all the captions, one caption for all the
# images, more captions than images and fewer, tiles that divide neither m nor k.
# (m, k, d, block): one row or one text; m < k and m > k with blocks dividing neither.
ID_SHAPES = [(1, 4, 3, 1), (4, 1, 3, None), (5, 12, 3, 4), (29, 17, 16, 5)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "k", "d", "block_size"), ID_SHAPES)
def test_ids_match_oracle(
    xp: Any, loss_name: str, dtype: str, m: int, k: int, d: int, block_size: int | None
) -> None:
    # m != k everywhere: a normaliser of k where docs/multi-positive.md says m (or the
    # softmax's row and column means swapped) is off by k / m, far beyond any tolerance.
    rng = np.random.default_rng(m * 100 + k)
    img_np, txt_np, img_ids, txt_ids = ids_batch(rng, m, k, d)
    img, img_np = on_backend(xp, img_np, dtype)
    txt, txt_np = on_backend(xp, txt_np, dtype)
    ids = {
        "img_ids": xp.asarray(img_ids, dtype=xp.int64),
        "txt_ids": xp.asarray(txt_ids, dtype=xp.int64),
    }
    scale, bias = 10.0, -10.0
    options = {"block_size": block_size, "precision": "exact", **ids}
    loss, grads = LOSS_AND_GRAD[loss_name](img, txt, scale, bias, **options)
    assert tuple(grads.img.shape) == (m, d)
    assert tuple(grads.txt.shape) == (k, d)
    ref = IDS_REFERENCES[loss_name](img_np, txt_np, img_ids, txt_ids, scale, bias)
    check_against(ref, loss_name, loss, grads, dtype)
    loss_only = LOSS[loss_name](img, txt, scale, bias, **options)
    assert_close(loss_only, to_numpy(loss), LOSS_RTOL[dtype], "loss without gradient")


@pytest.mark.parametrize(
    ("scale", "bias"), [(1.0, 0.0), (118.0, -12.7), (0.01, 20.0), (300.0, 5.0)]
)
def test_scale_and_bias_range(xp: Any, loss_name: str, scale: float, bias: float) -> None:
    rng = np.random.default_rng(1)
    img_np, txt_np = pairs(rng, 11, 6)
    img, txt = xp.asarray(img_np), xp.asarray(txt_np)
    loss, grads = LOSS_AND_GRAD[loss_name](img, txt, scale, bias, block_size=4)
    check_against_oracle(loss_name, loss, grads, img_np, txt_np, scale, bias, "float64")


@pytest.mark.parametrize("n", [13, 16])
def test_blockwise_equals_single_tile(xp: Any, loss_name: str, n: int) -> None:
    rng = np.random.default_rng(n)
    img_np, txt_np = pairs(rng, n, 6)
    img, txt = xp.asarray(img_np), xp.asarray(txt_np)
    dense_loss, dense = LOSS_AND_GRAD[loss_name](img, txt, 7.0, -3.0, block_size=n)
    for block_size in (1, 3, n - 1, n, n + 5):
        loss, grads = LOSS_AND_GRAD[loss_name](img, txt, 7.0, -3.0, block_size=block_size)
        assert_close(loss, to_numpy(dense_loss), 1e-13, f"loss, block {block_size}")
        for field in ps.Gradients._fields:
            expected = to_numpy(getattr(dense, field))
            assert_close(
                getattr(grads, field), expected, 1e-13, f"grads.{field}, block {block_size}"
            )


def test_default_block_size_matches_explicit(xp: Any, loss_name: str) -> None:
    rng = np.random.default_rng(5)
    img_np, txt_np = pairs(rng, 9, 4)
    img, txt = xp.asarray(img_np), xp.asarray(txt_np)
    loss_default = LOSS[loss_name](img, txt, 10.0, -10.0)
    loss_blocked = LOSS[loss_name](img, txt, 10.0, -10.0, block_size=2)
    assert_close(loss_default, to_numpy(loss_blocked), 1e-13, "loss")


def test_special_inputs(xp: Any, loss_name: str) -> None:
    # Identity features, identical rows and all-zero rows: hand-checkable structure.
    n = 5
    cases = {
        "identity": (np.eye(n), np.eye(n)),
        "identical rows": (np.ones((n, 3)) / np.sqrt(3), np.ones((n, 3)) / np.sqrt(3)),
        "zero rows": (np.zeros((n, 4)), np.zeros((n, 4))),
    }
    for name, (img_np, txt_np) in cases.items():
        img, txt = xp.asarray(img_np), xp.asarray(txt_np)
        loss, grads = LOSS_AND_GRAD[loss_name](img, txt, 10.0, -10.0, block_size=2)
        ref = REFERENCES[loss_name](img_np, txt_np, 10.0, -10.0)
        assert relative_error(loss, ref.loss) <= 1e-12, name
        # Absolute, not relative: by symmetry some of these gradients are ~1e-20, and
        # G = P - I loses eps to cancellation wherever P_ii is close to 1.
        for field in ("img", "txt"):
            err = np.max(np.abs(to_numpy(getattr(grads, field)) - getattr(ref, field)))
            assert err <= 1e-13, f"{name}: grads.{field} off by {err:.2e}"
    # Zero features make every logit b: the sigmoid loss is (softplus(-b) + (n-1) softplus(b)),
    # the softmax loss is log(n) in each direction.
    img = xp.asarray(np.zeros((n, 4)))
    if loss_name == "sigmoid":
        expected = np.logaddexp(0, 10.0) + (n - 1) * np.logaddexp(0, -10.0)
    else:
        expected = np.log(n)
    assert_close(LOSS[loss_name](img, img, 10.0, -10.0), expected, 1e-13, "zero features")


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_huge_logits_stay_finite_and_exact(xp: Any, loss_name: str, dtype: str) -> None:
    # |Z| up to 3000: exp(Z) overflows float64 above 709 and float32 above 88.7.
    rng = np.random.default_rng(3)
    n = 9
    img_np = unit_rows(rng, n, 4)
    txt_np = np.concatenate([img_np[:4], -img_np[4:]])  # perfect and inverted pairs
    img, img_np = on_backend(xp, img_np, dtype)
    txt, txt_np = on_backend(xp, txt_np, dtype)
    scale, bias = 3000.0, -20.0
    loss, grads = LOSS_AND_GRAD[loss_name](img, txt, scale, bias, block_size=4)
    for value in (loss, *grads):
        assert np.all(np.isfinite(to_numpy(value)))
    ref = REFERENCES[loss_name](img_np, txt_np, scale, bias)
    # Rounding the logits costs eps * |Z| of absolute accuracy in any float format.
    rtol = max(LOSS_RTOL[dtype], 1e-12) * 3000
    assert_close(loss, ref.loss, rtol, "loss")
    assert_close(grads.img, ref.img, max(GRAD_RTOL[dtype], rtol), "grads.img")
    assert_close(grads.txt, ref.txt, max(GRAD_RTOL[dtype], rtol), "grads.txt")


def test_tiny_loss_has_relative_accuracy(xp: Any, loss_name: str) -> None:
    # Perfectly separated pairs: the loss is tiny and must not drown in the rounding
    # of logits of size 100 (a trace subtracted after the fact would give 0 or noise).
    img_np = np.eye(6)
    img = xp.asarray(img_np)
    loss = LOSS[loss_name](img, img, 100.0, -50.0, block_size=4)
    ref = REFERENCES[loss_name](img_np, img_np, 100.0, -50.0)
    assert float(ref.loss) < 1e-20
    assert_close(loss, ref.loss, 1e-10, "tiny loss")


def test_outputs_keep_namespace_device_and_dtype(xp: Any, loss_name: str) -> None:
    rng = np.random.default_rng(2)
    img_np, txt_np = pairs(rng, 6, 3)
    for dtype in ("float64", "float32"):
        img = xp.asarray(img_np, dtype=dtype_of(xp, dtype))
        txt = xp.asarray(txt_np, dtype=dtype_of(xp, dtype))
        loss, grads = LOSS_AND_GRAD[loss_name](img, txt, 2.0, -1.0)
        namespace = array_api_compat.array_namespace(img)
        for value in (loss, *grads):
            assert array_api_compat.array_namespace(value) is namespace
            assert array_api_compat.device(value) == array_api_compat.device(img)
            assert value.dtype == img.dtype
        assert grads.img.shape == img.shape
        assert grads.txt.shape == txt.shape
        assert loss.shape == grads.scale.shape == grads.bias.shape == ()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_dtypes(xp: Any, loss_name: str, dtype: str) -> None:
    half = dtype_of(xp, dtype)
    rng = np.random.default_rng(4)
    img_np, txt_np = pairs(rng, 6, 3)
    img, txt = xp.asarray(img_np, dtype=half), xp.asarray(txt_np, dtype=half)
    scale = xp.asarray(10.0, dtype=xp.float32)
    bias = xp.asarray(-10.0, dtype=half)
    loss, grads = LOSS_AND_GRAD[loss_name](img, txt, scale, bias)
    # Documented: the loss accumulates (and returns) in float32; each gradient has the
    # dtype of its input.
    assert loss.dtype == xp.float32
    assert grads.img.dtype == grads.txt.dtype == half
    assert grads.scale.dtype == xp.float32
    assert grads.bias.dtype == half


def test_scale_and_bias_as_arrays(xp: Any, loss_name: str) -> None:
    rng = np.random.default_rng(6)
    img_np, txt_np = pairs(rng, 7, 3)
    img, txt = xp.asarray(img_np), xp.asarray(txt_np)
    loss_f, grads_f = LOSS_AND_GRAD[loss_name](img, txt, 4.0, -2.0, block_size=3)
    scale = xp.asarray(4.0, dtype=xp.float32)
    bias = xp.asarray(-2.0, dtype=xp.float64)
    loss_a, grads_a = LOSS_AND_GRAD[loss_name](img, txt, scale, bias, block_size=3)
    # float32 scale: the arithmetic stays float64 (the features' dtype), only the
    # gradient of the scale is rounded to float32 on the way out.
    assert grads_a.scale.dtype == xp.float32
    assert grads_a.bias.dtype == xp.float64
    assert_close(loss_a, to_numpy(loss_f), 1e-14, "loss")
    assert_close(grads_a.img, to_numpy(grads_f.img), 1e-14, "grads.img")
    assert_close(grads_a.scale, to_numpy(grads_f.scale), 1e-7, "grads.scale")
    assert_close(grads_a.bias, to_numpy(grads_f.bias), 1e-14, "grads.bias")


def test_integer_scale_and_none_bias(xp: Any, loss_name: str) -> None:
    rng = np.random.default_rng(7)
    img_np, txt_np = pairs(rng, 5, 3)
    img, txt = xp.asarray(img_np), xp.asarray(txt_np)
    loss_int = LOSS[loss_name](img, txt, 3, None)
    loss_float = LOSS[loss_name](img, txt, 3.0, 0.0)
    assert_close(loss_int, to_numpy(loss_float), 0.0, "loss")


def test_softmax_ignores_bias(xp: Any) -> None:
    rng = np.random.default_rng(8)
    img_np, txt_np = pairs(rng, 8, 3)
    img, txt = xp.asarray(img_np), xp.asarray(txt_np)
    loss0, grads0 = ps.softmax_loss_and_grad(img, txt, 5.0)
    loss1, grads1 = ps.softmax_loss_and_grad(img, txt, 5.0, 250.0)
    assert_close(loss1, to_numpy(loss0), 0.0, "loss")
    assert_close(grads1.img, to_numpy(grads0.img), 0.0, "grads.img")
    assert float(to_numpy(grads1.bias)) == 0.0


def test_inputs_are_not_modified(xp: Any, loss_name: str) -> None:
    # The read-only numpy backend raises on any in-place write; this checks the rest.
    rng = np.random.default_rng(9)
    img_np, txt_np = pairs(rng, 7, 3)
    img, txt = xp.asarray(img_np), xp.asarray(txt_np)
    scale = xp.asarray(3.0, dtype=xp.float64)
    bias = xp.asarray(-1.0, dtype=xp.float64)
    LOSS_AND_GRAD[loss_name](img, txt, scale, bias, block_size=3)
    np.testing.assert_array_equal(to_numpy(img), img_np)
    np.testing.assert_array_equal(to_numpy(txt), txt_np)
    assert float(to_numpy(scale)) == 3.0
    assert float(to_numpy(bias)) == -1.0


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("loss_name", ["sigmoid", "softmax"])
def test_non_finite_features_give_nan_as_documented(xp: Any, loss_name: str, bad: float) -> None:
    # Not an error (the features' values are never inspected), and not silently finite: the
    # documented pattern (docs/conventions.md) of which gradients turn NaN.
    rng = np.random.default_rng(5)
    img_np = unit_rows(rng, 7, 3)
    img_np[2, 1] = bad
    img, _ = on_backend(xp, img_np, "float64")
    txt, _ = on_backend(xp, unit_rows(rng, 7, 3), "float64")
    loss, grads = LOSS_AND_GRAD[loss_name](img, txt, 3.0, -1.0, block_size=3)
    assert not np.isfinite(to_numpy(loss))  # NaN, or inf for an inf feature
    rows = ~np.isfinite(to_numpy(grads.img)).all(axis=1)
    if loss_name == "sigmoid":
        # Only the bad row of grads.img; every row of grads.txt; both scalars.
        assert rows.tolist() == [i == 2 for i in range(7)]
        assert not np.isfinite(to_numpy(grads.scale))
        assert not np.isfinite(to_numpy(grads.bias))
    else:
        assert rows.all()
    assert (~np.isfinite(to_numpy(grads.txt)).all(axis=1)).all()
