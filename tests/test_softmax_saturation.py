"""The softmax loss at large |Z|: gradients as accurate as a dense evaluation, loss never < 0.

Issue 13, items 4 and 5.

- The first pass used to keep each lse relative to the diagonal logit and rebuild
  ``lse = (lse - Z_ii) + Z_ii`` for the second pass. That addition rounds to ``ulp(|Z|)``,
  which ``exp`` turns into the same relative error in every softmax entry: at
  ``max|Z| = 5e5`` the float32 gradient was off by 4e-3 of ``t max|txt|`` (a dense float32
  evaluation: 1e-8), at ``5e8`` it was 1e13 times too large. The lse now travels as a
  ``(max, log-sum)`` pair and the gradient is compared here with a dense float32 evaluation,
  both against the long-double oracle.
- At saturation every loss term is about 0 and the rounding difference between ``Z_ii`` from
  ``vecdot`` and the same logit from the tile GEMM made the loss negative.

The features are 1-dimensional (the issue's repro), so every logit is one rounded product and a
dense float32 evaluation is accurate to a few ulps: any rounding of the lse itself shows.
"""

from __future__ import annotations

from itertools import accumulate
from typing import Any

import numpy as np
import pytest
from helpers import dtype_of, on_backend, relative_error, to_numpy, unit_rows
from oracle import softmax_reference

import portable_siglip as ps
from portable_siglip.comm import ThreadComm, ThreadGroup

#: Unit roundoff of the dtype the gradients come back in.
UNIT = {"float32": 2.0**-24, "float16": 2.0**-11}

#: Our normwise relative error may exceed the dense float32 evaluation's by at most this
#: factor, plus this many unit roundoffs of the output dtype (the dense error can be 0 when
#: every softmax entry is exactly 0 or 1). Before the fix the ratio was 1e5 or more.
FACTOR, ROUNDOFFS = 4.0, 4.0

#: The float32 arithmetic is judged here ("exact"); "fast" rounds ``t * img`` to float16,
#: which overflows at these sizes (tests/test_precision.py covers "fast").
#: (dtype, t, target max|Z|): the issue's float32 repro (t = 1, the size in the features) and
#: a float16 one at CLIP's t = 1/0.07. float16 features are at most 65504 and the gradients
#: (about t max|features|) must stay finite in float16 too, so the size is split between t
#: and the features.
CASES = [
    ("float32", 1.0, 5e5),
    ("float32", 1.0, 5e8),
    ("float16", 1 / 0.07, 5e5),
    ("float16", 1 / 0.07, 5e8),
]
CASE_IDS = [f"{dtype}-maxZ{target:.0e}" for dtype, _, target in CASES]


def features(n: int, t: float, target: float) -> tuple[np.ndarray, np.ndarray]:
    """The issue's data (numpy seed 3, (n, 1) normals) scaled so that max|Z| = target."""
    rng = np.random.default_rng(3)
    img = rng.standard_normal((n, 1))
    txt = rng.standard_normal((n, 1))
    factor = np.sqrt(target / (t * np.max(np.abs(img @ txt.T))))
    return img * factor, txt * factor


def dense_float32(img: np.ndarray, txt: np.ndarray, t: float, dtype: str) -> tuple[Any, Any]:
    """Gradients of a dense float32 evaluation (max-subtracted softmax), rounded to ``dtype``."""
    f32 = np.float32
    x, y = img.astype(f32), txt.astype(f32)
    scaled = x * f32(t)
    logits = scaled @ y.T
    rows = np.exp(logits - logits.max(axis=1, keepdims=True))
    rows /= rows.sum(axis=1, keepdims=True)
    cols = np.exp(logits - logits.max(axis=0, keepdims=True))
    cols /= cols.sum(axis=0, keepdims=True)
    n = logits.shape[0]
    g = (rows + cols - f32(2) * np.eye(n, dtype=f32)) / f32(2 * n)
    out = np.dtype(dtype)
    return (f32(t) * (g @ y)).astype(out), (g.T @ scaled).astype(out)


def check_against_dense(
    got_img: Any, got_txt: Any, img: np.ndarray, txt: np.ndarray, t: float, dtype: str
) -> None:
    truth = softmax_reference(img, txt, t, 0.0)
    assert np.all(np.isfinite(np.asarray(truth.img, dtype=np.float64)))
    assert np.all(np.isfinite(np.asarray(truth.txt, dtype=np.float64)))
    dense_img, dense_txt = dense_float32(img, txt, t, dtype)
    for name, got, dense, want in [
        ("img", got_img, dense_img, truth.img),
        ("txt", got_txt, dense_txt, truth.txt),
    ]:
        ours = relative_error(got, want)
        theirs = relative_error(dense, want)
        bound = FACTOR * theirs + ROUNDOFFS * UNIT[dtype]
        assert ours <= bound, (
            f"grads.{name}: relative error {ours:.3e}, dense float32 {theirs:.3e}, "
            f"bound {bound:.3e}"
        )


@pytest.mark.parametrize("block_size", [1, 3])
@pytest.mark.parametrize(("dtype", "t", "target"), CASES, ids=CASE_IDS)
def test_gradients_at_large_logits_match_a_dense_evaluation(
    xp: Any, dtype: str, t: float, target: float, block_size: int
) -> None:
    img_np, txt_np = features(4, t, target)  # n = 4: block 3 does not divide it
    img, img_np = on_backend(xp, img_np, dtype)
    txt, txt_np = on_backend(xp, txt_np, dtype)
    assert abs(np.max(np.abs(t * img_np @ txt_np.T)) / target - 1) < 1e-2
    loss, grads = ps.softmax_loss_and_grad(img, txt, t, block_size=block_size, precision="exact")
    assert grads.img.dtype == dtype_of(xp, dtype)
    check_against_dense(grads.img, grads.txt, img_np, txt_np, t, dtype)
    truth = softmax_reference(img_np, txt_np, t, 0.0)
    assert relative_error(loss, truth.loss) <= 1e-6


#: Uneven shards of 8 rows over W = 3 ranks, a rank of a single row included.
SHARDS = [3, 1, 4]


@pytest.mark.parametrize("strategy", ["ring", "gather"])
@pytest.mark.parametrize(("dtype", "t", "target"), CASES, ids=CASE_IDS)
def test_distributed_gradients_at_large_logits(
    xp: Any, dtype: str, t: float, target: float, strategy: str
) -> None:
    img_np, txt_np = features(sum(SHARDS), t, target)
    img, img_np = on_backend(xp, img_np, dtype)
    txt, txt_np = on_backend(xp, txt_np, dtype)
    edges = [0, *accumulate(SHARDS)]

    def rank_call(comm: ThreadComm) -> Any:
        rows = slice(edges[comm.rank], edges[comm.rank + 1])
        return ps.softmax_loss_and_grad(
            img[rows, :],
            txt[rows, :],
            t,
            block_size=2,
            comm=comm,
            strategy=strategy,
            precision="exact",
        )

    results = ThreadGroup(len(SHARDS), timeout=60.0).run(rank_call)
    got_img = np.concatenate([to_numpy(grads.img) for _, grads in results], axis=0)
    got_txt = np.concatenate([to_numpy(grads.txt) for _, grads in results], axis=0)
    check_against_dense(got_img, got_txt, img_np, txt_np, t, dtype)
    truth = softmax_reference(img_np, txt_np, t, 0.0)
    for rank, (loss, _) in enumerate(results):
        assert relative_error(loss, truth.loss) <= 1e-6, f"rank {rank}"


#: The issue's saturation repros: 64 x 16 unit rows (img = txt), block 7.
SATURATED = [("float32", 100.0), ("float64", 1e3)]


def saturated_features() -> np.ndarray:
    return unit_rows(np.random.default_rng(1), 64, 16)


def check_saturated_loss(loss: Any, x: np.ndarray, t: float, dtype: str) -> None:
    value = float(to_numpy(loss))
    truth = float(softmax_reference(x, x, t, 0.0).loss)
    assert value >= 0.0, f"the loss is >= 0 by definition, got {value!r}"
    # What remains is the rounding of the logits themselves: a few ulps of max|Z| = t.
    assert abs(value - truth) <= 4 * float(np.finfo(dtype).eps) * t, (value, truth)


@pytest.mark.parametrize(("dtype", "t"), SATURATED, ids=[d for d, _ in SATURATED])
def test_saturated_loss_is_not_negative(xp: Any, dtype: str, t: float) -> None:
    x, x_np = on_backend(xp, saturated_features(), dtype)
    check_saturated_loss(ps.softmax_loss(x, x, t, block_size=7), x_np, t, dtype)
    loss, _ = ps.softmax_loss_and_grad(x, x, t, block_size=7)
    check_saturated_loss(loss, x_np, t, dtype)


@pytest.mark.parametrize("strategy", ["ring", "gather"])
@pytest.mark.parametrize(("dtype", "t"), SATURATED, ids=[d for d, _ in SATURATED])
def test_saturated_distributed_loss_is_not_negative(
    xp: Any, dtype: str, t: float, strategy: str
) -> None:
    x, x_np = on_backend(xp, saturated_features(), dtype)
    sizes = [20, 7, 37]
    edges = [0, *accumulate(sizes)]

    def rank_call(comm: ThreadComm) -> Any:
        rows = slice(edges[comm.rank], edges[comm.rank + 1])
        return ps.softmax_loss(
            x[rows, :], x[rows, :], t, block_size=7, comm=comm, strategy=strategy
        )

    for loss in ThreadGroup(len(sizes), timeout=60.0).run(rank_call):
        check_saturated_loss(loss, x_np, t, dtype)
