"""Several positives per row: ``img_ids``/``txt_ids`` in every path, against a dense oracle.

The oracle (:mod:`oracle`, long double) builds the whole m x k positive mask from the ids
and evaluates the formulas of docs/math.md ("Several positives per row") densely. The
batches are rectangular (m != k), hold duplicate ids on both sides, and the block sizes do
and do not divide m and k. Distributed runs shard images and texts independently and
unevenly, so a rank's image and text shards differ in size, and positives cross ranks.
"""

from __future__ import annotations

import math
from itertools import accumulate, pairwise
from typing import Any

import numpy as np
import pytest
from helpers import LOSS, LOSS_AND_GRAD, SCHEDULE_IDS, SCHEDULES, assert_close, dtype_of, to_numpy
from oracle import IDS_REFERENCES, REFERENCES

import portable_siglip as ps
from portable_siglip.comm import ThreadComm, ThreadGroup

SCALE, BIAS = 6.0, -2.5
M, K, D = 13, 21, 6
#: Image and text shards per world size: uneven, and different for images and texts.
IMG_SHARDS = {2: [9, 4], 3: [2, 6, 5], 4: [4, 1, 5, 3]}
TXT_SHARDS = {2: [5, 16], 3: [11, 3, 7], 4: [2, 9, 6, 4]}


def batch(seed: int = 0, m: int = M, k: int = K, d: int = D) -> tuple[np.ndarray, ...]:
    """Rectangular features with duplicate ids on both sides; every id on both sides.

    Images 3 and 4 share an id (a duplicate image); most images have one to three captions,
    and the captions are shuffled so positives are scattered over the tiles.
    """
    rng = np.random.default_rng(seed)
    img_ids = np.arange(m)
    img_ids[4] = img_ids[3]
    distinct = np.unique(img_ids)
    txt_ids = np.concatenate([distinct, rng.choice(distinct, k - distinct.size)])
    txt_ids = rng.permutation(txt_ids)
    img = rng.standard_normal((m, d)) / np.sqrt(d)
    txt = rng.standard_normal((k, d)) / np.sqrt(d)
    # Captions near their image, so positives score higher than negatives.
    for j, value in enumerate(txt_ids):
        txt[j] += img[np.flatnonzero(img_ids == value)[0]]
    return img, txt, img_ids, txt_ids


def on(xp: Any, *arrays: np.ndarray) -> list[Any]:
    """Features in float64 and ids in int64 on the backend of `xp`."""
    out = []
    for array in arrays:
        dtype = xp.int64 if array.dtype.kind == "i" else dtype_of(xp, "float64")
        out.append(xp.asarray(array, dtype=dtype))
    return out


def check(result: tuple[Any, Any], reference: Any, rtol: float, what: str) -> None:
    loss, grads = result
    assert_close(loss, reference.loss, rtol, f"{what} loss")
    for name in ("img", "txt", "scale", "bias"):
        assert_close(getattr(grads, name), getattr(reference, name), rtol, f"{what} d{name}")


@pytest.mark.parametrize("block", [4, 5, 64])
def test_ids_equal_the_dense_oracle(xp: Any, loss_name: str, block: int) -> None:
    img, txt, img_ids, txt_ids = batch()
    reference = IDS_REFERENCES[loss_name](img, txt, img_ids, txt_ids, SCALE, BIAS)
    args = on(xp, img, txt)
    ids = dict(zip(("img_ids", "txt_ids"), on(xp, img_ids, txt_ids), strict=True))
    result = LOSS_AND_GRAD[loss_name](*args, SCALE, BIAS, block_size=block, **ids)
    check(result, reference, 1e-12, f"{loss_name} b={block}")
    alone = LOSS[loss_name](*args, SCALE, BIAS, block_size=block, **ids)
    assert_close(alone, reference.loss, 1e-12, "loss alone")
    assert tuple(result[1].img.shape) == (M, D)
    assert tuple(result[1].txt.shape) == (K, D)


def test_ids_float32(xp: Any, loss_name: str) -> None:
    img, txt, img_ids, txt_ids = batch(seed=1)
    reference = IDS_REFERENCES[loss_name](img, txt, img_ids, txt_ids, SCALE, BIAS)
    f32 = dtype_of(xp, "float32")
    args = [xp.asarray(a, dtype=f32) for a in (img, txt)]
    ids = {"img_ids": xp.asarray(img_ids), "txt_ids": xp.asarray(txt_ids)}
    result = LOSS_AND_GRAD[loss_name](*args, SCALE, BIAS, block_size=8, **ids)
    # The oracle sees the float32-rounded inputs.
    rounded = IDS_REFERENCES[loss_name](
        to_numpy(args[0]), to_numpy(args[1]), img_ids, txt_ids, SCALE, BIAS
    )
    check(result, rounded, 1e-5, "float32")
    assert_close(result[0], reference.loss, 1e-5, "float32 vs float64 inputs")


def test_unique_ids_give_the_diagonal_loss(xp: Any, loss_name: str) -> None:
    """Ids that pair row i with a permuted text reproduce the plain loss of the reordered batch."""
    rng = np.random.default_rng(2)
    img, txt = rng.standard_normal((9, 4)), rng.standard_normal((9, 4))
    order = rng.permutation(9)
    plain = REFERENCES[loss_name](img, txt[order], SCALE, BIAS)
    ids = {"img_ids": np.arange(9), "txt_ids": np.argsort(order)}  # txt row j is image order^-1
    args = on(xp, img, txt)
    labels = dict(zip(ids, on(xp, *ids.values()), strict=True))
    loss, grads = LOSS_AND_GRAD[loss_name](*args, SCALE, BIAS, block_size=4, **labels)
    assert_close(loss, plain.loss, 1e-12, "loss")
    assert_close(grads.img, plain.img, 1e-12, "dimg")
    assert_close(grads.txt, plain.txt[np.argsort(order)], 1e-12, "dtxt")
    assert_close(grads.scale, plain.scale, 1e-12, "dscale")


def test_ids_matter(loss_name: str) -> None:
    """The same features with the diagonal labels give another loss: the ids are used."""
    img, txt, img_ids, txt_ids = batch()
    with_ids = LOSS[loss_name](img, txt, SCALE, BIAS, img_ids=img_ids, txt_ids=txt_ids)
    diagonal = IDS_REFERENCES[loss_name](img[:M], txt[:M], np.arange(M), np.arange(M), SCALE, BIAS)
    assert abs(float(with_ids) - float(diagonal.loss)) > 1e-3


def shards(sizes: list[int]) -> list[slice]:
    edges = [0, *accumulate(sizes)]
    return [slice(a, b) for a, b in pairwise(edges)]


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize(("loss", "strategy"), SCHEDULES, ids=SCHEDULE_IDS)
def test_distributed_ids_uneven_shards(xp: Any, loss: str, strategy: str, world: int) -> None:
    img, txt, img_ids, txt_ids = batch(seed=3)
    reference = IDS_REFERENCES[loss](img, txt, img_ids, txt_ids, SCALE, BIAS)
    x_img, x_txt, x_img_ids, x_txt_ids = on(xp, img, txt, img_ids, txt_ids)
    img_rows, txt_rows = shards(IMG_SHARDS[world]), shards(TXT_SHARDS[world])

    def on_ranks(function: Any, **options: Any) -> list[Any]:
        """``function`` on every rank, each with its own image and text rows and ids."""

        def rank_call(comm: ThreadComm) -> Any:
            images, texts = img_rows[comm.rank], txt_rows[comm.rank]
            return function(
                x_img[images, :],
                x_txt[texts, :],
                SCALE,
                BIAS,
                comm=comm,
                strategy=strategy,
                img_ids=x_img_ids[images],
                txt_ids=x_txt_ids[texts],
                **options,
            )

        return ThreadGroup(world, timeout=60).run(rank_call)

    results = on_ranks(LOSS_AND_GRAD[loss], block_size=3)
    for rank, (value, grads) in enumerate(results):
        assert float(value) == float(results[0][0]), "the same loss on every rank"
        assert_close(value, reference.loss, 1e-12, f"rank {rank} loss")
        assert_close(grads.img, reference.img[img_rows[rank]], 1e-12, f"rank {rank} dimg")
        assert_close(grads.txt, reference.txt[txt_rows[rank]], 1e-12, f"rank {rank} dtxt")
        assert_close(grads.scale, reference.scale, 1e-12, f"rank {rank} dscale")
        assert_close(grads.bias, reference.bias, 1e-12, f"rank {rank} dbias")

    for value in on_ranks(LOSS[loss]):
        assert_close(value, reference.loss, 1e-12, "loss alone")


# --- validation -----------------------------------------------------------------------


def test_one_of_the_ids_missing() -> None:
    img, txt, img_ids, _ = batch()
    with pytest.raises(TypeError, match=r"`txt_ids` must be given together with `img_ids`"):
        ps.sigmoid_loss(img, txt, SCALE, BIAS, img_ids=img_ids)


@pytest.mark.parametrize(
    ("change", "error", "pattern"),
    [
        ({"img_ids": np.arange(M, dtype=float)}, TypeError, r"`img_ids` must have an integer"),
        ({"txt_ids": np.arange(K + 1)}, ValueError, r"`txt_ids` must have shape \(21,\)"),
        ({"img_ids": list(range(M))}, TypeError, r"`img_ids` must be an integer array"),
        ({"img_ids": np.zeros((M, 1), dtype=int)}, ValueError, r"`img_ids` must have shape"),
    ],
)
def test_bad_ids(change: dict[str, Any], error: type[Exception], pattern: str) -> None:
    img, txt, img_ids, txt_ids = batch()
    ids = {"img_ids": img_ids, "txt_ids": txt_ids, **change}
    for function in (*LOSS.values(), *LOSS_AND_GRAD.values()):
        with pytest.raises(error, match=pattern):
            function(img, txt, SCALE, BIAS, **ids)


def test_ids_from_another_library() -> None:
    torch = pytest.importorskip("torch")
    img, txt, img_ids, txt_ids = batch()
    with pytest.raises(TypeError, match=r"`txt_ids` must come from the same array library"):
        ps.softmax_loss(img, txt, SCALE, img_ids=img_ids, txt_ids=torch.asarray(txt_ids))


def test_rectangular_without_ids_names_them() -> None:
    img, txt, _, _ = batch()
    with pytest.raises(ValueError, match=r"same shape.*pass `img_ids` and `txt_ids`"):
        ps.sigmoid_loss(img, txt, SCALE, BIAS)


@pytest.mark.parametrize(
    ("side", "pattern"),
    [
        ("img", r"`img_ids`: image row 5 \(id 99\) has no text row with the same id"),
        ("txt", r"`txt_ids`: text row {row} \(id 77\) has no image row with the same id"),
    ],
)
def test_row_without_a_positive_is_refused_by_softmax(side: str, pattern: str) -> None:
    """The softmax loss's target over a row's positives does not exist without one.

    (The sigmoid loss takes such a row: :func:`test_sigmoid_row_without_a_positive`.)
    """
    loss_name = "softmax"
    img, txt, img_ids, txt_ids = batch()
    if side == "img":
        img_ids[5] = 99
    else:  # a caption whose image has another one: only the caption loses its positive
        row = next(j for j in range(K) if np.sum(txt_ids == txt_ids[j]) > 1)
        txt_ids[row] = 77
        pattern = pattern.format(row=row)
    for function in (LOSS[loss_name], LOSS_AND_GRAD[loss_name]):
        with pytest.raises(ValueError, match=pattern):
            function(img, txt, SCALE, BIAS, img_ids=img_ids, txt_ids=txt_ids)


def test_distributed_ids_on_some_ranks_raise_everywhere() -> None:
    img, txt, img_ids, txt_ids = batch()

    def rank_call(comm: ThreadComm) -> str:
        ids = {"img_ids": img_ids, "txt_ids": txt_ids} if comm.rank == 0 else {}
        rows = slice(0, M) if comm.rank == 0 else slice(0, 4)
        try:
            ps.sigmoid_loss(
                img[rows], txt[rows] if ids == {} else txt, SCALE, BIAS, comm=comm, **ids
            )
        except ValueError as error:
            return str(error)
        return "no error"

    messages = ThreadGroup(2, timeout=30).run(rank_call)
    assert messages[0] == messages[1]
    assert "`img_ids` and `txt_ids` must be passed on every rank or on none" in messages[0]
    assert "rank 0: 'given', rank 1: 'None'" in messages[0]


def test_distributed_row_without_a_positive_raises_everywhere() -> None:
    """Softmax: a row without a positive anywhere in the global batch, refused on every rank."""
    loss_name = "softmax"
    img, txt, img_ids, txt_ids = batch()
    txt_ids = txt_ids.copy()
    # A caption on rank 1 whose image has another caption: only the caption is lonely.
    shared = [j for j in range(5, K) if np.sum(txt_ids == txt_ids[j]) > 1]
    lonely = shared[-1]
    txt_ids[lonely] = 1000
    img_rows, txt_rows = shards(IMG_SHARDS[2]), shards(TXT_SHARDS[2])

    def rank_call(comm: ThreadComm) -> str:
        r = comm.rank
        try:
            LOSS[loss_name](
                img[img_rows[r]],
                txt[txt_rows[r]],
                SCALE,
                BIAS,
                comm=comm,
                img_ids=img_ids[img_rows[r]],
                txt_ids=txt_ids[txt_rows[r]],
            )
        except ValueError as error:
            return str(error)
        return "no error"

    messages = ThreadGroup(2, timeout=30).run(rank_call)
    assert messages[0] == messages[1]
    expected = f"`txt_ids`: text row {lonely - 5} of rank 1 (id 1000) has no image row"
    assert expected in messages[0]


def lonely_batch() -> tuple[np.ndarray, ...]:
    """The batch with image 5 (id 99) and a caption (id 77) that have no positive anywhere."""
    img, txt, img_ids, txt_ids = batch(seed=3)
    img_ids, txt_ids = img_ids.copy(), txt_ids.copy()
    img_ids[5] = 99
    shared = [j for j in range(K) if np.sum(txt_ids == txt_ids[j]) > 1]
    txt_ids[shared[-1]] = 77
    # Image 5's former captions stay (their id is nowhere among the images now): lonely too.
    assert not np.isin(99, txt_ids)
    assert not np.isin(77, img_ids)
    return img, txt, img_ids, txt_ids


def test_sigmoid_row_without_a_positive_golden() -> None:
    """A hand-computed case: image 1 (id 1) has no text; the loss counts its pairs as negatives.

    img = txt = I (2 x 2), txt ids (0, 0): Z = t I + b, positives (0, 0) and (0, 1).
    L = [softplus(-(t + b)) + softplus(-b) + softplus(b) + softplus(t + b)] / 2.
    """
    t, b = 4.0, -1.0

    def softplus(x: float) -> float:
        return max(x, 0.0) + math.log1p(math.exp(-abs(x)))

    golden = (softplus(-(t + b)) + softplus(-b) + softplus(b) + softplus(t + b)) / 2
    for function in (ps.sigmoid_loss, lambda *a, **k: ps.sigmoid_loss_and_grad(*a, **k)[0]):
        value = function(
            np.eye(2), np.eye(2), t, b, img_ids=np.array([0, 1]), txt_ids=np.array([0, 0])
        )
        assert abs(float(value) - golden) <= 1e-15 * golden


def test_sigmoid_row_without_a_positive(xp: Any) -> None:
    """Images and captions whose ids have no match are all negatives, against the oracle."""
    img, txt, img_ids, txt_ids = lonely_batch()
    reference = IDS_REFERENCES["sigmoid"](img, txt, img_ids, txt_ids, SCALE, BIAS)
    args = on(xp, img, txt)
    labels = dict(zip(("img_ids", "txt_ids"), on(xp, img_ids, txt_ids), strict=True))
    loss, grads = ps.sigmoid_loss_and_grad(*args, SCALE, BIAS, block_size=4, **labels)
    check((loss, grads), reference, 1e-12, "sigmoid")
    alone = ps.sigmoid_loss(*args, SCALE, BIAS, block_size=4, **labels)
    assert_close(alone, reference.loss, 1e-12, "loss alone")


@pytest.mark.parametrize("strategy", [s for loss, s in SCHEDULES if loss == "sigmoid"])
def test_distributed_sigmoid_row_without_a_positive(strategy: str) -> None:
    """The same batch on 3 ranks: no rank refuses it, every rank gets the oracle's values."""
    img, txt, img_ids, txt_ids = lonely_batch()
    reference = IDS_REFERENCES["sigmoid"](img, txt, img_ids, txt_ids, SCALE, BIAS)
    img_rows, txt_rows = shards(IMG_SHARDS[3]), shards(TXT_SHARDS[3])

    def rank_call(comm: ThreadComm) -> Any:
        r = comm.rank
        return ps.sigmoid_loss_and_grad(
            img[img_rows[r]],
            txt[txt_rows[r]],
            SCALE,
            BIAS,
            comm=comm,
            strategy=strategy,
            block_size=4,
            img_ids=img_ids[img_rows[r]],
            txt_ids=txt_ids[txt_rows[r]],
        )

    for r, (value, grads) in enumerate(ThreadGroup(3, timeout=30).run(rank_call)):
        assert_close(value, reference.loss, 1e-12, f"rank {r} loss")
        assert_close(grads.img, reference.img[img_rows[r]], 1e-12, f"rank {r} dimg")
        assert_close(grads.txt, reference.txt[txt_rows[r]], 1e-12, f"rank {r} dtxt")
        assert_close(grads.bias, reference.bias, 1e-12, f"rank {r} dbias")


def test_ids_of_one_rank_match_another_ranks_rows() -> None:
    """A rank whose images have no caption locally: their positives live on the other rank."""
    img, txt, img_ids, txt_ids = batch(seed=4)
    order = np.argsort(txt_ids, kind="stable")  # captions sorted by id: rank 0 gets low ids
    txt, txt_ids = txt[order], txt_ids[order]
    reference = IDS_REFERENCES["softmax"](img, txt, img_ids, txt_ids, SCALE, BIAS)
    img_rows = [slice(M - 3, M), slice(0, M - 3)]  # rank 0 holds the last images
    txt_rows = shards(TXT_SHARDS[2])

    def rank_call(comm: ThreadComm) -> Any:
        r = comm.rank
        return ps.softmax_loss(
            img[img_rows[r]],
            txt[txt_rows[r]],
            SCALE,
            comm=comm,
            img_ids=img_ids[img_rows[r]],
            txt_ids=txt_ids[txt_rows[r]],
        )

    for value in ThreadGroup(2, timeout=30).run(rank_call):
        assert_close(value, reference.loss, 1e-12, "loss")


# --- the framework bridges --------------------------------------------------------------


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_torch_modules_with_ids(loss: str) -> None:
    torch = pytest.importorskip("torch")
    from portable_siglip.backends.torch import ClipLoss, SigLipLoss

    img, txt, img_ids, txt_ids = batch(seed=5)
    reference = IDS_REFERENCES[loss](img, txt, img_ids, txt_ids, SCALE, BIAS)
    x_img = torch.tensor(img, requires_grad=True)
    x_txt = torch.tensor(txt, requires_grad=True)
    scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(BIAS, dtype=torch.float64, requires_grad=True)
    module = (SigLipLoss if loss == "sigmoid" else ClipLoss)(block_size=4)
    value = module(
        x_img, x_txt, scale, bias, img_ids=torch.tensor(img_ids), txt_ids=torch.tensor(txt_ids)
    )
    value.backward()
    assert_close(value, reference.loss, 1e-12, "loss")
    assert_close(x_img.grad, reference.img, 1e-12, "dimg")
    assert_close(x_txt.grad, reference.txt, 1e-12, "dtxt")
    assert_close(scale.grad, reference.scale, 1e-12, "dscale")
    assert_close(bias.grad, reference.bias, 1e-12, "dbias")


@pytest.mark.parametrize(("loss", "strategy"), [("sigmoid", "bidir"), ("softmax", "ring")])
@pytest.mark.parametrize("ddp", [False, True])
def test_torch_modules_with_ids_on_ranks(loss: str, strategy: str, ddp: bool) -> None:
    """Exact mode: each rank's exact gradient; DDP mode: W times it, averaged back by DDP."""
    torch = pytest.importorskip("torch")
    from portable_siglip.backends.torch import ClipLoss, SigLipLoss

    world = 3
    img, txt, img_ids, txt_ids = batch(seed=6)
    reference = IDS_REFERENCES[loss](img, txt, img_ids, txt_ids, SCALE, BIAS)
    img_rows, txt_rows = shards(IMG_SHARDS[world]), shards(TXT_SHARDS[world])

    def rank_call(comm: ThreadComm) -> Any:
        r = comm.rank
        x_img = torch.tensor(img[img_rows[r]], requires_grad=True)
        x_txt = torch.tensor(txt[txt_rows[r]], requires_grad=True)
        scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
        cls = SigLipLoss if loss == "sigmoid" else ClipLoss
        module = cls(comm=comm, strategy=strategy, block_size=3, ddp=ddp)
        value = module(
            x_img,
            x_txt,
            scale,
            BIAS,
            img_ids=torch.tensor(img_ids[img_rows[r]]),
            txt_ids=torch.tensor(txt_ids[txt_rows[r]]),
        )
        value.backward()
        return value.detach(), x_img.grad, x_txt.grad, scale.grad

    factor = world if ddp else 1
    for r, (value, d_img, d_txt, d_scale) in enumerate(
        ThreadGroup(world, timeout=60).run(rank_call)
    ):
        assert_close(value, reference.loss, 1e-12, "loss")
        assert_close(d_img, factor * reference.img[img_rows[r]], 1e-12, f"rank {r} dimg")
        assert_close(d_txt, factor * reference.txt[txt_rows[r]], 1e-12, f"rank {r} dtxt")
        assert_close(d_scale, reference.scale, 1e-12, f"rank {r} dscale")


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_jax_jit_grad_with_ids(loss: str) -> None:
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from portable_siglip.backends import jax as psj

    img, txt, img_ids, txt_ids = batch(seed=7)
    reference = IDS_REFERENCES[loss](img, txt, img_ids, txt_ids, SCALE, BIAS)
    function = getattr(psj, f"{loss}_loss")

    def value(img: Any, txt: Any, scale: Any, bias: Any, img_ids: Any, txt_ids: Any) -> Any:
        return function(img, txt, scale, bias, block_size=5, img_ids=img_ids, txt_ids=txt_ids)

    args = (jnp.asarray(img), jnp.asarray(txt), jnp.asarray(SCALE), jnp.asarray(BIAS))
    ids = (jnp.asarray(img_ids), jnp.asarray(txt_ids))
    loss_value, grads = jax.jit(jax.value_and_grad(value, argnums=(0, 1, 2, 3)))(*args, *ids)
    assert_close(loss_value, reference.loss, 1e-12, "loss")
    for got, name in zip(grads, ("img", "txt", "scale", "bias"), strict=True):
        assert_close(got, getattr(reference, name), 1e-12, f"d{name}")
    eager = jax.grad(value)(*args, *ids)
    assert_close(eager, reference.img, 1e-12, "eager dimg")


def test_jax_sigmoid_row_without_a_positive_eager_and_jit() -> None:
    """jax, eager and under jit (where the ids have no values): the oracle's loss and gradients."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from portable_siglip.backends import jax as psj

    img, txt, img_ids, txt_ids = lonely_batch()
    reference = IDS_REFERENCES["sigmoid"](img, txt, img_ids, txt_ids, SCALE, BIAS)

    def value(img: Any, txt: Any, img_ids: Any, txt_ids: Any) -> Any:
        return psj.sigmoid_loss(
            img, txt, SCALE, BIAS, block_size=4, img_ids=img_ids, txt_ids=txt_ids
        )

    args = (jnp.asarray(img), jnp.asarray(txt), jnp.asarray(img_ids), jnp.asarray(txt_ids))
    for how, function in (("eager", value), ("jit", jax.jit(value))):
        assert_close(function(*args), reference.loss, 1e-12, f"{how} loss")
    d_img, d_txt = jax.jit(jax.grad(value, argnums=(0, 1)))(*args)
    assert_close(d_img, reference.img, 1e-12, "jit dimg")
    assert_close(d_txt, reference.txt, 1e-12, "jit dtxt")


def test_jax_jit_cannot_check_ids_and_gives_nan() -> None:
    """Under jit the ids are tracers: a row without a positive is not refused; its loss is NaN."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from portable_siglip.backends import jax as psj

    img, txt, img_ids, txt_ids = batch()
    img_ids = img_ids.copy()
    img_ids[0] = 500
    with pytest.raises(ValueError, match="`img_ids`: image row 0"):
        psj.softmax_loss(
            jnp.asarray(img), jnp.asarray(txt), SCALE, img_ids=img_ids, txt_ids=txt_ids
        )
    jitted = jax.jit(
        lambda i, t: psj.softmax_loss(
            jnp.asarray(img), jnp.asarray(txt), SCALE, img_ids=i, txt_ids=t
        )
    )
    assert bool(jnp.isnan(jitted(jnp.asarray(img_ids), jnp.asarray(txt_ids))))
