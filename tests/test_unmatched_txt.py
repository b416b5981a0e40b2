"""Hard negatives for the softmax loss: ``unmatched_txt="negatives"`` (docs/math.md, section 9).

A text row whose id no image row has joins every image row's log-sum-exp and has no column
term of its own; the column term is a mean over the K' columns that have a positive. The
expected values come from two computations written here, sharing no code with the library:

* :func:`mp_golden`, mpmath at 40 digits: the loss from its definition (log-sum-exps of the
  logits, means over the positives) and all four gradients by central differences of that
  loss, so the derivation of the gradient in docs/math.md is checked too;
* :func:`dense`, the formulas of docs/math.md, section 9 on the whole M x K matrix in
  NumPy long double, for the larger batches.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from itertools import accumulate, pairwise
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
from helpers import assert_close, dtype_of

import portable_siglip as ps
from portable_siglip import _losses
from portable_siglip.comm import ThreadComm, ThreadGroup

mpmath = pytest.importorskip("mpmath")

SCALE = 5.0
#: Image and text shards per world size: uneven (not dividing M or K), different for images
#: and texts; with 3 ranks rank 1's texts (rows 11, 12) are both unmatched.
IMG_SHARDS = {2: [7, 4], 3: [2, 6, 3]}
TXT_SHARDS = {2: [4, 15], 3: [11, 2, 6]}


class Golden(NamedTuple):
    loss: float
    img: np.ndarray
    txt: np.ndarray
    scale: float
    bias: float


def batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """11 images, 19 texts: duplicate ids on both sides, 4 texts whose id no image has.

    Every image has a caption; texts 11 and 12 (and two more, scattered) are hard
    negatives, placed near some image so that they matter to its softmax.
    """
    rng = np.random.default_rng(seed)
    m, d = 11, 6
    img_ids = np.arange(m)
    img_ids[4] = img_ids[3]  # a duplicate image
    txt_ids = np.array([0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 2, 100, 101, 0, 102, 6, 103, 3, 1])
    img = rng.standard_normal((m, d)) / np.sqrt(d)
    txt = rng.standard_normal((txt_ids.size, d)) / np.sqrt(d)
    for j, value in enumerate(txt_ids):
        near = np.flatnonzero(img_ids == value)
        txt[j] += img[near[0] if near.size else j % m]  # hard negatives near an image too
    assert not np.isin(txt_ids[[11, 12]], img_ids).any()
    return img, txt, img_ids, txt_ids


def dense(img: np.ndarray, txt: np.ndarray, img_ids: Any, txt_ids: Any, scale: float) -> Golden:
    """docs/math.md, section 9, densely in long double: the loss and its four gradients."""
    x, y, t = (np.asarray(a, dtype=np.longdouble) for a in (img, txt, scale))
    pos = (np.asarray(img_ids)[:, None] == np.asarray(txt_ids)[None, :]).astype(np.longdouble)
    sims = x @ y.T
    z = t * sims
    m = z.shape[0]
    c, r = pos.sum(axis=1), pos.sum(axis=0)
    matched = r > 0
    k_matched = matched.sum()
    row_max, col_max = z.max(axis=1, keepdims=True), z.max(axis=0, keepdims=True)
    row_lse = row_max + np.log(np.exp(z - row_max).sum(axis=1, keepdims=True))
    col_lse = col_max + np.log(np.exp(z - col_max).sum(axis=0, keepdims=True))
    rows = row_lse[:, 0] - (pos * z).sum(axis=1) / c
    cols = (col_lse[0] - (pos * z).sum(axis=0) / np.where(matched, r, 1))[matched]
    loss = (rows.sum() / m + cols.sum() / k_matched) / 2
    soft_rows, soft_cols = np.exp(z - row_lse), np.exp(z - col_lse)
    grad = (
        (soft_rows - pos / c[:, None]) / m
        + matched[None, :] * (soft_cols - pos / np.where(matched, r, 1)[None, :]) / k_matched
    ) / 2
    return Golden(
        float(loss),
        np.asarray(t * grad @ y, dtype=np.float64),
        np.asarray(t * grad.T @ x, dtype=np.float64),
        float((grad * sims).sum()),
        0.0,
    )


def mp_loss(img: Any, txt: Any, img_ids: Any, txt_ids: Any, scale: Any, bias: Any) -> Any:
    """The loss from its definition, in mpmath: rows over all texts, columns with a positive."""
    m, k = len(img_ids), len(txt_ids)
    z = [
        [
            scale * mpmath.fsum(a * b for a, b in zip(img[i], txt[j], strict=True)) + bias
            for j in range(k)
        ]
        for i in range(m)
    ]
    rows = []
    for i in range(m):
        positives = [z[i][j] for j in range(k) if img_ids[i] == txt_ids[j]]
        lse = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in z[i]))
        rows.append(lse - mpmath.fsum(positives) / len(positives))
    cols = []
    for j in range(k):
        positives = [z[i][j] for i in range(m) if img_ids[i] == txt_ids[j]]
        if positives:  # a text whose id no image has is only a negative
            lse = mpmath.log(mpmath.fsum(mpmath.exp(z[i][j]) for i in range(m)))
            cols.append(lse - mpmath.fsum(positives) / len(positives))
    return (mpmath.fsum(rows) / m + mpmath.fsum(cols) / len(cols)) / 2


def mp_golden(img: np.ndarray, txt: np.ndarray, img_ids: Any, txt_ids: Any, scale: float) -> Golden:
    """mpmath (40 digits): the loss, and each gradient entry by a central difference of it."""
    with mpmath.workdps(40):
        x = [[mpmath.mpf(float(v)) for v in row] for row in img]
        y = [[mpmath.mpf(float(v)) for v in row] for row in txt]
        t, b = mpmath.mpf(scale), mpmath.mpf(0)
        h = mpmath.mpf(10) ** -15

        def value(x: Any = x, y: Any = y, t: Any = t, b: Any = b) -> Any:
            return mp_loss(x, y, img_ids, txt_ids, t, b)

        def slope(matrix: list[list[Any]], i: int, a: int, make: Any) -> float:
            up = [row[:] for row in matrix]
            down = [row[:] for row in matrix]
            up[i][a] += h
            down[i][a] -= h
            return float((make(up) - make(down)) / (2 * h))

        d_img = [
            [slope(x, i, a, lambda new: value(x=new)) for a in range(len(x[0]))]
            for i in range(len(x))
        ]
        d_txt = [
            [slope(y, j, a, lambda new: value(y=new)) for a in range(len(y[0]))]
            for j in range(len(y))
        ]
        d_scale = float((value(t=t + h) - value(t=t - h)) / (2 * h))
        d_bias = float((value(b=b + h) - value(b=b - h)) / (2 * h))
        return Golden(float(value()), np.array(d_img), np.array(d_txt), d_scale, d_bias)


#: A tiny batch for mpmath: 3 images, 5 texts, two of them (ids 7 and 8) unmatched.
TINY_IDS = (np.array([0, 1, 1]), np.array([1, 7, 0, 8, 1]))


def tiny() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    return rng.standard_normal((3, 2)), rng.standard_normal((5, 2))


@pytest.fixture(scope="module")
def tiny_golden() -> Golden:
    return mp_golden(*tiny(), *TINY_IDS, 2.5)


def check(result: tuple[Any, Any], expected: Golden, rtol: float, what: str) -> None:
    loss, grads = result
    assert_close(loss, expected.loss, rtol, f"{what} loss")
    for name in ("img", "txt", "scale"):
        assert_close(getattr(grads, name), getattr(expected, name), rtol, f"{what} d{name}")
    assert float(grads.bias) == 0.0, f"{what} dbias"


def on(xp: Any, *arrays: np.ndarray) -> list[Any]:
    """Features in float64 and ids in int64 on the backend of `xp`."""
    f64 = dtype_of(xp, "float64")
    return [xp.asarray(a, dtype=xp.int64 if a.dtype.kind == "i" else f64) for a in arrays]


def shards(sizes: list[int]) -> list[slice]:
    edges = [0, *accumulate(sizes)]
    return [slice(a, b) for a, b in pairwise(edges)]


# --- the goldens ----------------------------------------------------------------------


def test_dense_formulas_equal_the_mpmath_definition(tiny_golden: Golden) -> None:
    """The gradient derived in docs/math.md (section 9) is the derivative of the loss."""
    expected = dense(*tiny(), *TINY_IDS, 2.5)
    for name in ("loss", "img", "txt", "scale", "bias"):
        got, want = getattr(expected, name), getattr(tiny_golden, name)
        assert_close(np.asarray(got), np.asarray(want), 1e-12, f"dense {name} vs mpmath")
    assert abs(tiny_golden.bias) < 1e-20  # the bias still cancels


@pytest.mark.parametrize("block", [2, 64])
def test_tiny_batch_equals_mpmath(xp: Any, block: int, tiny_golden: Golden) -> None:
    img, txt, img_ids, txt_ids = on(xp, *tiny(), *TINY_IDS)
    options = {"img_ids": img_ids, "txt_ids": txt_ids, "unmatched_txt": "negatives"}
    result = ps.softmax_loss_and_grad(img, txt, 2.5, block_size=block, **options)
    check(result, tiny_golden, 1e-12, f"b={block}")
    alone = ps.softmax_loss(img, txt, 2.5, block_size=block, **options)
    assert_close(alone, tiny_golden.loss, 1e-12, "loss alone")


@pytest.mark.parametrize("block", [4, 7])
def test_batch_equals_the_dense_formulas(xp: Any, block: int) -> None:
    img, txt, img_ids, txt_ids = batch()
    expected = dense(img, txt, img_ids, txt_ids, SCALE)
    args = on(xp, img, txt, img_ids, txt_ids)
    options = {"img_ids": args[2], "txt_ids": args[3], "unmatched_txt": "negatives"}
    result = ps.softmax_loss_and_grad(args[0], args[1], SCALE, -3.0, block_size=block, **options)
    check(result, expected, 1e-12, f"b={block}")
    alone = ps.softmax_loss(args[0], args[1], SCALE, block_size=block, **options)
    assert_close(alone, expected.loss, 1e-12, "loss alone")


def test_float32(xp: Any) -> None:
    img, txt, img_ids, txt_ids = batch(seed=1)
    f32 = dtype_of(xp, "float32")
    args = [xp.asarray(a, dtype=f32) for a in (img, txt)]
    ids = {"img_ids": xp.asarray(img_ids), "txt_ids": xp.asarray(txt_ids)}
    result = ps.softmax_loss_and_grad(*args, SCALE, block_size=4, unmatched_txt="negatives", **ids)
    rounded = [np.asarray(a, dtype=np.float32).astype(np.float64) for a in (img, txt)]
    check(result, dense(*rounded, img_ids, txt_ids, SCALE), 1e-5, "float32")


def test_hard_negatives_change_the_loss() -> None:
    """The unmatched texts count: dropping them gives another loss (and the golden differs)."""
    img, txt, img_ids, txt_ids = batch()
    keep = np.isin(txt_ids, img_ids)
    with_them = ps.softmax_loss(
        img, txt, SCALE, img_ids=img_ids, txt_ids=txt_ids, unmatched_txt="negatives"
    )
    without = ps.softmax_loss(img, txt[keep], SCALE, img_ids=img_ids, txt_ids=txt_ids[keep])
    assert float(with_them) - float(without) > 1e-2  # more negatives in every row
    # The column term of the texts that have a positive is the same in both batches: only
    # the rows' denominators grew. (docs/math.md, section 9)
    assert_close(without, dense(img, txt[keep], img_ids, txt_ids[keep], SCALE).loss, 1e-12, "kept")


def test_every_text_matched_gives_the_error_mode_loss(xp: Any) -> None:
    """With no unmatched text, "negatives" is the loss of docs/math.md, section 8."""
    img, txt, img_ids, txt_ids = batch()
    keep = np.isin(txt_ids, img_ids)
    args = on(xp, img, txt[keep], img_ids, txt_ids[keep])
    ids = {"img_ids": args[2], "txt_ids": args[3]}
    plain = ps.softmax_loss_and_grad(args[0], args[1], SCALE, block_size=4, **ids)
    negatives = ps.softmax_loss_and_grad(
        args[0], args[1], SCALE, block_size=4, unmatched_txt="negatives", **ids
    )
    expected = Golden(
        float(plain[0]), *(np.asarray(getattr(plain[1], n)) for n in ("img", "txt")), 0.0, 0.0
    )
    assert_close(negatives[0], expected.loss, 1e-13, "loss")
    assert_close(negatives[1].img, plain[1].img, 1e-13, "dimg")
    assert_close(negatives[1].txt, plain[1].txt, 1e-13, "dtxt")
    assert_close(negatives[1].scale, plain[1].scale, 1e-13, "dscale")


def test_without_ids_negatives_changes_nothing() -> None:
    rng = np.random.default_rng(4)
    img, txt = rng.standard_normal((7, 3)), rng.standard_normal((7, 3))
    plain = ps.softmax_loss_and_grad(img, txt, SCALE, block_size=3)
    negatives = ps.softmax_loss_and_grad(img, txt, SCALE, block_size=3, unmatched_txt="negatives")
    assert float(plain[0]) == float(negatives[0])
    assert np.array_equal(plain[1].img, negatives[1].img)
    assert np.array_equal(plain[1].txt, negatives[1].txt)


# --- validation -----------------------------------------------------------------------


def test_default_still_refuses_with_the_same_message() -> None:
    img, txt, img_ids, txt_ids = batch()
    expected = (
        "`txt_ids`: text row 11 (id 100) has no image row with the same id, so it has no "
        "positive pair; 4 of 19 text rows have none (every id must appear in both `img_ids` "
        "and `txt_ids` for this loss, whose target is a distribution over a row's positives)"
    )
    for function in (ps.softmax_loss, ps.softmax_loss_and_grad):
        for options in ({}, {"unmatched_txt": "error"}):
            with pytest.raises(ValueError, match="has no image row") as caught:
                function(img, txt, SCALE, img_ids=img_ids, txt_ids=txt_ids, **options)
            assert str(caught.value) == expected


def test_an_image_without_a_positive_stays_an_error() -> None:
    img, txt, img_ids, txt_ids = batch()
    img_ids = img_ids.copy()
    img_ids[6] = 555
    with pytest.raises(ValueError, match=r"`img_ids`: image row 6 \(id 555\) has no text row"):
        ps.softmax_loss(
            img, txt, SCALE, img_ids=img_ids, txt_ids=txt_ids, unmatched_txt="negatives"
        )


@pytest.mark.parametrize(
    ("value", "error", "pattern"),
    [
        (
            "ignore",
            ValueError,
            r"`unmatched_txt` must be one of \('error', 'negatives'\), got 'ignore'",
        ),
        ("Negatives", ValueError, r"`unmatched_txt` must be one of .*got 'Negatives'"),
        (None, TypeError, r"`unmatched_txt` must be a string, one of .*got NoneType None"),
        (True, TypeError, r"`unmatched_txt` must be a string, one of .*got bool True"),
    ],
)
def test_bad_values_are_refused(value: object, error: type[Exception], pattern: str) -> None:
    img, txt, img_ids, txt_ids = batch()
    for function in (ps.softmax_loss, ps.softmax_loss_and_grad):
        with pytest.raises(error, match=pattern):
            function(img, txt, SCALE, img_ids=img_ids, txt_ids=txt_ids, unmatched_txt=value)
        with pytest.raises(error, match=pattern):  # without ids too
            function(img, img, SCALE, unmatched_txt=value)


def test_the_sigmoid_loss_keeps_its_signature() -> None:
    """Its texts without a positive are negatives already; it takes no such argument."""
    for function in (ps.sigmoid_loss, ps.sigmoid_loss_and_grad):
        assert "unmatched_txt" not in inspect.signature(function).parameters
    img, txt, img_ids, txt_ids = batch()
    ids = {"img_ids": img_ids, "txt_ids": txt_ids}
    plain = ps.sigmoid_loss(img, txt, SCALE, -2.0, **ids)
    through = _losses.evaluate(
        _losses.SIGMOID, img, txt, SCALE, -2.0, grad=False, unmatched_txt="negatives", **ids
    )[0]
    assert float(plain) == float(through)


# --- distributed ----------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("strategy", ["ring", "gather"])
def test_distributed(xp: Any, strategy: str, world: int) -> None:
    img, txt, img_ids, txt_ids = batch(seed=3)
    expected = dense(img, txt, img_ids, txt_ids, SCALE)
    x_img, x_txt, x_img_ids, x_txt_ids = on(xp, img, txt, img_ids, txt_ids)
    img_rows, txt_rows = shards(IMG_SHARDS[world]), shards(TXT_SHARDS[world])

    def on_ranks(function: Any, **options: Any) -> list[Any]:
        def rank_call(comm: ThreadComm) -> Any:
            images, texts = img_rows[comm.rank], txt_rows[comm.rank]
            return function(
                x_img[images, :],
                x_txt[texts, :],
                SCALE,
                comm=comm,
                strategy=strategy,
                img_ids=x_img_ids[images],
                txt_ids=x_txt_ids[texts],
                unmatched_txt="negatives",
                **options,
            )

        return ThreadGroup(world, timeout=60).run(rank_call)

    results = on_ranks(ps.softmax_loss_and_grad, block_size=3)
    for rank, (value, grads) in enumerate(results):
        assert float(value) == float(results[0][0]), "the same loss on every rank"
        assert_close(value, expected.loss, 1e-12, f"rank {rank} loss")
        assert_close(grads.img, expected.img[img_rows[rank]], 1e-12, f"rank {rank} dimg")
        assert_close(grads.txt, expected.txt[txt_rows[rank]], 1e-12, f"rank {rank} dtxt")
        assert_close(grads.scale, expected.scale, 1e-12, f"rank {rank} dscale")
        assert float(grads.bias) == 0.0
    for value in on_ranks(ps.softmax_loss):
        assert_close(value, expected.loss, 1e-12, "loss alone")


def _rank_error(world: int, make: Any) -> list[str]:
    img, txt, img_ids, txt_ids = batch()
    img_rows, txt_rows = shards(IMG_SHARDS[world]), shards(TXT_SHARDS[world])

    def rank_call(comm: ThreadComm) -> str:
        r = comm.rank
        ids = make(r, img_ids[img_rows[r]].copy(), txt_ids[txt_rows[r]].copy())
        try:
            ps.softmax_loss_and_grad(img[img_rows[r]], txt[txt_rows[r]], SCALE, comm=comm, **ids)
        except (TypeError, ValueError) as error:
            return f"{type(error).__name__}: {error}"
        return "no error"

    return ThreadGroup(world, timeout=30).run(rank_call)  # type: ignore[no-any-return]


def test_distributed_ranks_must_agree() -> None:
    def make(rank: int, img_ids: Any, txt_ids: Any) -> dict[str, Any]:
        chosen = "negatives" if rank == 0 else "error"
        return {"img_ids": img_ids, "txt_ids": txt_ids, "unmatched_txt": chosen}

    messages = _rank_error(3, make)
    assert len(set(messages)) == 1, messages
    assert messages[0] == (
        "ValueError: `unmatched_txt` must be the same on every rank, got rank 0: 'negatives', "
        "rank 1: 'error', rank 2: 'error'"
    )


def test_distributed_bad_value_on_one_rank_raises_everywhere() -> None:
    def make(rank: int, img_ids: Any, txt_ids: Any) -> dict[str, Any]:
        chosen = "nope" if rank == 1 else "negatives"
        return {"img_ids": img_ids, "txt_ids": txt_ids, "unmatched_txt": chosen}

    messages = _rank_error(2, make)
    assert len(set(messages)) == 1, messages
    assert messages[0].startswith("ValueError: rank 1: `unmatched_txt` must be one of")


def test_distributed_default_and_lonely_image_refused_everywhere() -> None:
    def default(rank: int, img_ids: Any, txt_ids: Any) -> dict[str, Any]:
        return {"img_ids": img_ids, "txt_ids": txt_ids}

    messages = _rank_error(3, default)
    assert len(set(messages)) == 1, messages
    assert "`txt_ids`: text row 0 of rank 1 (id 100) has no image row" in messages[0]

    def lonely_image(rank: int, img_ids: Any, txt_ids: Any) -> dict[str, Any]:
        if rank == 2:
            img_ids[0] = 999
        return {"img_ids": img_ids, "txt_ids": txt_ids, "unmatched_txt": "negatives"}

    messages = _rank_error(3, lonely_image)
    assert len(set(messages)) == 1, messages
    assert "`img_ids`: image row 0 of rank 2 (id 999) has no text row" in messages[0]


# --- the framework bridges ------------------------------------------------------------


def test_torch_function_and_clip_loss() -> None:
    torch = pytest.importorskip("torch")
    from portable_siglip.backends.torch import ClipLoss, softmax_loss

    img, txt, img_ids, txt_ids = batch(seed=5)
    expected = dense(img, txt, img_ids, txt_ids, SCALE)
    ids = {"img_ids": torch.tensor(img_ids), "txt_ids": torch.tensor(txt_ids)}
    for how in ("function", "module"):
        x_img = torch.tensor(img, requires_grad=True)
        x_txt = torch.tensor(txt, requires_grad=True)
        scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
        if how == "function":
            value = softmax_loss(
                x_img, x_txt, scale, block_size=4, unmatched_txt="negatives", **ids
            )
        else:
            module = ClipLoss(block_size=4, unmatched_txt="negatives")
            assert "unmatched_txt='negatives'" in repr(module)
            value = module(x_img, x_txt, scale, **ids)
        value.backward()
        assert_close(value, expected.loss, 1e-12, f"{how} loss")
        assert_close(x_img.grad, expected.img, 1e-12, f"{how} dimg")
        assert_close(x_txt.grad, expected.txt, 1e-12, f"{how} dtxt")
        assert_close(scale.grad, expected.scale, 1e-12, f"{how} dscale")
        with torch.no_grad():  # the loss alone (no gradient pass)
            alone = softmax_loss(x_img, x_txt, scale, unmatched_txt="negatives", **ids)
        assert_close(alone, expected.loss, 1e-12, f"{how} loss alone")
    with pytest.raises(ValueError, match="`unmatched_txt` must be one of"):
        ClipLoss(unmatched_txt="drop")
    with pytest.raises(ValueError, match="`txt_ids`: text row 11"):
        ClipLoss()(torch.tensor(img), torch.tensor(txt), SCALE, **ids)
    with pytest.raises(TypeError, match="`unmatched_txt` must be a string"):
        softmax_loss(torch.tensor(img), torch.tensor(txt), SCALE, unmatched_txt=1, **ids)


def test_torch_clip_loss_on_ranks() -> None:
    torch = pytest.importorskip("torch")
    from portable_siglip.backends.torch import ClipLoss

    world = 3
    img, txt, img_ids, txt_ids = batch(seed=6)
    expected = dense(img, txt, img_ids, txt_ids, SCALE)
    img_rows, txt_rows = shards(IMG_SHARDS[world]), shards(TXT_SHARDS[world])

    def rank_call(comm: ThreadComm) -> Any:
        r = comm.rank
        x_img = torch.tensor(img[img_rows[r]], requires_grad=True)
        x_txt = torch.tensor(txt[txt_rows[r]], requires_grad=True)
        module = ClipLoss(comm=comm, block_size=3, ddp=False, unmatched_txt="negatives")
        value = module(
            x_img,
            x_txt,
            SCALE,
            img_ids=torch.tensor(img_ids[img_rows[r]]),
            txt_ids=torch.tensor(txt_ids[txt_rows[r]]),
        )
        value.backward()
        return value.detach(), x_img.grad, x_txt.grad

    for r, (value, d_img, d_txt) in enumerate(ThreadGroup(world, timeout=60).run(rank_call)):
        assert_close(value, expected.loss, 1e-12, f"rank {r} loss")
        assert_close(d_img, expected.img[img_rows[r]], 1e-12, f"rank {r} dimg")
        assert_close(d_txt, expected.txt[txt_rows[r]], 1e-12, f"rank {r} dtxt")


def test_jax_eager_and_jit() -> None:
    """jax, eagerly and under jit: there the ids are tracers and the columns are told apart
    by their positive counts, so the hard negatives still come out right."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from portable_siglip.backends import jax as psj

    img, txt, img_ids, txt_ids = batch(seed=7)
    expected = dense(img, txt, img_ids, txt_ids, SCALE)

    def value(img: Any, txt: Any, scale: Any, img_ids: Any, txt_ids: Any) -> Any:
        return psj.softmax_loss(
            img,
            txt,
            scale,
            block_size=5,
            img_ids=img_ids,
            txt_ids=txt_ids,
            unmatched_txt="negatives",
        )

    args = (jnp.asarray(img), jnp.asarray(txt), jnp.asarray(SCALE))
    ids = (jnp.asarray(img_ids), jnp.asarray(txt_ids))
    grad = jax.value_and_grad(value, argnums=(0, 1, 2))
    for how, function in (("eager", grad), ("jit", jax.jit(grad))):
        loss_value, (d_img, d_txt, d_scale) = function(*args, *ids)
        assert_close(loss_value, expected.loss, 1e-12, f"{how} loss")
        assert_close(d_img, expected.img, 1e-12, f"{how} dimg")
        assert_close(d_txt, expected.txt, 1e-12, f"{how} dtxt")
        assert_close(d_scale, expected.scale, 1e-12, f"{how} dscale")
    with pytest.raises(ValueError, match="`txt_ids`: text row 11"):
        psj.softmax_loss(*args, img_ids=ids[0], txt_ids=ids[1])
    with pytest.raises(ValueError, match="`unmatched_txt` must be one of"):
        psj.softmax_loss(*args, img_ids=ids[0], txt_ids=ids[1], unmatched_txt="x")


def test_jax_axis_comm_in_shard_map() -> None:
    """``AxisComm`` under ``jit(shard_map)`` on 4 CPU devices, both schedules, core and bridge.

    The ids are traced there (no handshake reads them): the hard negatives are found from
    their counts and K' is summed by the communicator's allreduce.
    """
    pytest.importorskip("jax")
    script = Path(__file__).with_name("jax_scripts") / "unmatched_shard_map.py"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["devices"] >= 4
    img, txt = np.array(report["img"]), np.array(report["txt"])
    expected = dense(img, txt, np.array(report["img_ids"]), np.array(report["txt_ids"]), 5.0)
    assert not np.isin(report["txt_ids"], report["img_ids"]).all()
    for strategy in ("ring", "gather"):
        for how in ("core", "bridge"):
            loss, d_img, d_txt, d_scale = (np.asarray(v) for v in report[strategy][how])
            what = f"{strategy} {how}"
            assert_close(loss, np.asarray(expected.loss), 1e-12, f"{what} loss")
            assert_close(d_img, expected.img, 1e-12, f"{what} dimg")
            assert_close(d_txt, expected.txt, 1e-12, f"{what} dtxt")
            assert_close(d_scale, np.asarray(expected.scale), 1e-12, f"{what} dscale")
