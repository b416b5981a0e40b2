"""Integer ids of different dtypes: across ranks, between ``img_ids`` and ``txt_ids``, on jax.

Pair (i, j) is positive iff ``img_ids[i] == txt_ids[j]`` as integers, whatever the dtypes
that hold them. Expected values come from the long-double oracle (:mod:`oracle`), which
compares the ids as NumPy integers; the features are float64.
"""

from __future__ import annotations

from itertools import accumulate, pairwise
from typing import Any

import numpy as np
import pytest
from helpers import LOSS, LOSS_AND_GRAD, SCHEDULE_IDS, SCHEDULES, assert_close, dtype_of, to_numpy
from oracle import IDS_REFERENCES

from portable_siglip.comm import ThreadComm, ThreadGroup

SCALE, BIAS = 7.0, -3.0
#: Image and text rows per rank, uneven and different for images and texts.
IMG_SHARDS = {1: [5], 2: [3, 2], 3: [2, 3, 1], 4: [2, 1, 3, 2]}
TXT_SHARDS = {1: [7], 2: [2, 5], 3: [4, 1, 3], 4: [1, 4, 2, 3]}


def id_batch(world: int, d: int = 4) -> tuple[np.ndarray, ...]:
    """Features and ids of a global batch of m images and k texts (every id on both sides).

    The ids are large (beyond 2**20), with a duplicate image and several captions per image,
    so that a comparison of wrong bits or of wrongly sized buffers shows.
    """
    m, k = sum(IMG_SHARDS[world]), sum(TXT_SHARDS[world])
    rng = np.random.default_rng(40 + world)
    img_ids = 1_000_003 + 7919 * np.arange(m)
    img_ids[-1] = img_ids[0]
    distinct = np.unique(img_ids)
    txt_ids = rng.permutation(np.concatenate([distinct, rng.choice(distinct, k - distinct.size)]))
    img = rng.standard_normal((m, d)) / np.sqrt(d)
    txt = rng.standard_normal((k, d)) / np.sqrt(d)
    return img, txt, img_ids, txt_ids


def shards(sizes: list[int]) -> list[slice]:
    return [slice(a, b) for a, b in pairwise([0, *accumulate(sizes)])]


def rank_dtypes(xp: Any, rank: int) -> tuple[Any, Any]:
    """The dtypes of a rank's (img_ids, txt_ids): int64 and int32 on even ranks, swapped on odd."""
    wide, narrow = dtype_of(xp, "int64"), dtype_of(xp, "int32")
    return (wide, narrow) if rank % 2 == 0 else (narrow, wide)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize(("loss", "strategy"), SCHEDULES, ids=SCHEDULE_IDS)
def test_ids_of_other_widths_on_other_ranks(xp: Any, loss: str, strategy: str, world: int) -> None:
    """Rank 0 holds int64 image ids and int32 text ids, rank 1 the other way round, ..."""
    img, txt, img_ids, txt_ids = id_batch(world)
    reference = IDS_REFERENCES[loss](img, txt, img_ids, txt_ids, SCALE, BIAS)
    img_rows, txt_rows = shards(IMG_SHARDS[world]), shards(TXT_SHARDS[world])
    f64 = dtype_of(xp, "float64")

    def rank_call(comm: ThreadComm) -> Any:
        r = comm.rank
        img_dtype, txt_dtype = rank_dtypes(xp, r)
        return LOSS_AND_GRAD[loss](
            xp.asarray(img[img_rows[r]], dtype=f64),
            xp.asarray(txt[txt_rows[r]], dtype=f64),
            SCALE,
            BIAS,
            comm=comm,
            strategy=strategy,
            block_size=2,
            img_ids=xp.asarray(img_ids[img_rows[r]], dtype=img_dtype),
            txt_ids=xp.asarray(txt_ids[txt_rows[r]], dtype=txt_dtype),
        )

    results = ThreadGroup(world, timeout=30).run(rank_call)
    for r, (value, grads) in enumerate(results):
        assert_close(value, reference.loss, 1e-12, f"rank {r} loss")
        assert_close(grads.img, reference.img[img_rows[r]], 1e-12, f"rank {r} dimg")
        assert_close(grads.txt, reference.txt[txt_rows[r]], 1e-12, f"rank {r} dtxt")
        assert_close(grads.scale, reference.scale, 1e-12, f"rank {r} dscale")
        assert_close(grads.bias, reference.bias, 1e-12, f"rank {r} dbias")


@pytest.mark.timeout(60)
def test_handshake_gives_every_rank_one_id_dtype(xp: Any) -> None:
    """The ids that travel with the text blocks have one dtype on every rank after the handshake.

    Over MPI a rank receives a block into a buffer of its own ids' dtype: int32 ids arriving
    in an int64 buffer were read as other values (a wrong loss), a NaN, a hang or
    ``MPI_ERR_TRUNCATE``. ThreadComm hands the arrays over as they are, so the losses above
    pass here either way; this checks the agreement itself.
    """
    from portable_siglip._distributed import setup

    world = 3
    img, txt, img_ids, txt_ids = id_batch(world)
    img_rows, txt_rows = shards(IMG_SHARDS[world]), shards(TXT_SHARDS[world])
    f64 = dtype_of(xp, "float64")

    def rank_call(comm: ThreadComm) -> tuple[str, str, list[int], list[int]]:
        r = comm.rank
        img_dtype, txt_dtype = rank_dtypes(xp, r)
        problem, _ = setup(
            xp.asarray(img[img_rows[r]], dtype=f64),
            xp.asarray(txt[txt_rows[r]], dtype=f64),
            SCALE,
            BIAS,
            block_size=None,
            comm=comm,
            strategy="bidir",
            loss="sigmoid",
            grad=True,
            img_ids=xp.asarray(img_ids[img_rows[r]], dtype=img_dtype),
            txt_ids=xp.asarray(txt_ids[txt_rows[r]], dtype=txt_dtype),
        )
        assert problem.img_ids is not None
        assert problem.txt_ids is not None
        return (
            str(problem.img_ids.dtype),
            str(problem.txt_ids.dtype),
            [int(v) for v in to_numpy(problem.img_ids)],
            [int(v) for v in to_numpy(problem.txt_ids)],
        )

    results = ThreadGroup(world, timeout=30).run(rank_call)
    dtypes = {dtype for img_dtype, txt_dtype, _, _ in results for dtype in (img_dtype, txt_dtype)}
    assert len(dtypes) == 1, f"the ranks' ids have several dtypes after the handshake: {results}"
    # The ids are still labels of the same pairs: equal exactly where the given ids are equal.
    new_img = np.concatenate([np.asarray(img, dtype=np.int64) for _, _, img, _ in results])
    new_txt = np.concatenate([np.asarray(txt, dtype=np.int64) for _, _, _, txt in results])
    np.testing.assert_array_equal(
        new_img[:, None] == new_txt[None, :], img_ids[:, None] == txt_ids[None, :]
    )


# --- jax with 64-bit types off (its default) ---------------------------------------------


@pytest.fixture
def jax_x32() -> Any:
    """jax with ``jax_enable_x64`` off, as jax starts; the setting is restored afterwards."""
    jax = pytest.importorskip("jax")
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    yield jax
    jax.config.update("jax_enable_x64", previous)


#: 64-bit ids that int32 cannot hold: 2**32 wraps to 0 in int32, the id of another row.
WIDE_IMG_IDS = np.array([2**32, 0, 1, 2], dtype=np.int64)
WIDE_TXT_IDS = np.array([0, 1, 2, 2**32, 1], dtype=np.int64)


def small_features(m: int = 4, k: int = 5, d: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    return rng.standard_normal((m, d)).astype(np.float32), rng.standard_normal((k, d)).astype(
        np.float32
    )


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
@pytest.mark.parametrize("side", ["img_ids", "txt_ids"])
def test_jax_x32_refuses_ids_it_would_truncate(jax_x32: Any, loss: str, side: str) -> None:
    from portable_siglip.backends import jax as psj

    img, txt = small_features()
    ids = {"img_ids": np.array([5, 0, 1, 2]), "txt_ids": np.array([0, 1, 2, 5, 1])}
    ids[side] = WIDE_IMG_IDS if side == "img_ids" else WIDE_TXT_IDS
    function = getattr(psj, f"{loss}_loss")
    pattern = rf"`{side}` holds 4294967296, which int32 cannot hold.*jax_enable_x64"
    with pytest.raises(ValueError, match=pattern):
        function(img, txt, SCALE, BIAS, **ids)
    with pytest.raises(ValueError, match=pattern):
        jax_x32.grad(function)(img, txt, SCALE, BIAS, **ids)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_jax_x32_takes_64_bit_ids_that_fit(jax_x32: Any, loss: str) -> None:
    """int64 and uint64 NumPy ids whose values int32 (uint32) holds give the oracle's loss."""
    from portable_siglip.backends import jax as psj

    img, txt = small_features()
    img_ids, txt_ids = np.array([7, 2**31 - 1, 1, 2]), np.array([2**31 - 1, 1, 2, 7, 1])
    reference = IDS_REFERENCES[loss](img, txt, img_ids, txt_ids, SCALE, BIAS)
    function = getattr(psj, f"{loss}_loss")
    value = function(img, txt, SCALE, BIAS, img_ids=img_ids, txt_ids=txt_ids)
    assert_close(value, reference.loss, 1e-5, "loss")
    unsigned = function(
        img,
        txt,
        SCALE,
        BIAS,
        img_ids=img_ids.astype(np.uint64),
        txt_ids=txt_ids.astype(np.uint64),
    )
    assert_close(unsigned, reference.loss, 1e-5, "loss of uint64 ids")


def test_jax_x32_refusal_reaches_every_rank(jax_x32: Any) -> None:
    """With a host communicator, the rank whose ids do not fit raises, and so does every other."""
    from portable_siglip.backends import jax as psj

    img, txt = small_features()

    def rank_call(comm: ThreadComm) -> str:
        ids = WIDE_IMG_IDS if comm.rank == 0 else np.array([5, 0, 1, 2])
        try:
            psj.sigmoid_loss(
                img, txt, SCALE, BIAS, comm=comm, img_ids=ids, txt_ids=np.array([0, 1, 2, 5, 1])
            )
        except ValueError as error:
            return str(error)
        return "no error"

    messages = ThreadGroup(2, timeout=30).run(rank_call)
    assert messages[0] == messages[1], messages
    assert messages[0].startswith("rank 0: `img_ids` holds 4294967296"), messages[0]


# --- img_ids and txt_ids of different dtypes ----------------------------------------------

#: Neighbouring ids beyond 2**53, where a float64 comparison makes them collide.
NEAR = 2**53
MIXED_IMG_IDS = [NEAR, NEAR + 1, 5, 6]
MIXED_TXT_IDS = [NEAR + 1, NEAR, 5, 6, NEAR, 6]


def mixed_batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    img = rng.standard_normal((len(MIXED_IMG_IDS), 3)) / np.sqrt(3)
    txt = rng.standard_normal((len(MIXED_TXT_IDS), 3)) / np.sqrt(3)
    return img, txt


@pytest.mark.parametrize(
    ("img_dtype", "txt_dtype"),
    [("uint64", "int64"), ("int64", "uint64"), ("int64", "int32"), ("uint8", "int16")],
)
def test_ids_of_two_dtypes_compare_as_integers(
    xp: Any, loss_name: str, img_dtype: str, txt_dtype: str
) -> None:
    """Ids of two dtypes are compared exactly, as integers, on every backend."""
    img, txt = mixed_batch()
    wide = img_dtype.endswith("64") and txt_dtype.endswith("64")
    img_ids = np.array(MIXED_IMG_IDS if wide else [1, 2, 5, 6])
    txt_ids = np.array(MIXED_TXT_IDS if wide else [2, 1, 5, 6, 1, 6])
    reference = IDS_REFERENCES[loss_name](img, txt, img_ids, txt_ids, SCALE, BIAS)
    f64 = dtype_of(xp, "float64")
    value, grads = LOSS_AND_GRAD[loss_name](
        xp.asarray(img, dtype=f64),
        xp.asarray(txt, dtype=f64),
        SCALE,
        BIAS,
        block_size=2,
        img_ids=xp.asarray(img_ids, dtype=dtype_of(xp, img_dtype)),
        txt_ids=xp.asarray(txt_ids, dtype=dtype_of(xp, txt_dtype)),
    )
    assert_close(value, reference.loss, 1e-12, "loss")
    assert_close(grads.img, reference.img, 1e-12, "dimg")
    assert_close(grads.txt, reference.txt, 1e-12, "dtxt")


def test_ids_that_no_common_dtype_holds_are_refused(xp: Any, loss_name: str) -> None:
    """int64 -1 and uint64 2**64 - 1 share their bits: no dtype of the two holds both."""
    img, txt = mixed_batch()
    f64 = dtype_of(xp, "float64")
    pattern = (
        r"`img_ids` \((\w+\.)?int64\) and `txt_ids` \((\w+\.)?uint64\) have no common dtype "
        r"that holds all their values.*-1.*18446744073709551615"
    )
    with pytest.raises(ValueError, match=pattern):
        LOSS[loss_name](
            xp.asarray(img, dtype=f64),
            xp.asarray(txt, dtype=f64),
            SCALE,
            BIAS,
            img_ids=xp.asarray(np.array([-1, 0, 1, 2]), dtype=dtype_of(xp, "int64")),
            txt_ids=xp.asarray(
                np.array([2**64 - 1, 0, 1, 2, 0, 1], dtype=np.uint64), dtype=dtype_of(xp, "uint64")
            ),
        )


def test_ids_of_two_dtypes_under_jit_need_one_dtype() -> None:
    """Traced ids have no values to check: uint64 against int64 is a TypeError naming both."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from portable_siglip.backends import jax as psj

    img, txt = mixed_batch()
    jitted = jax.jit(
        lambda i, t: psj.sigmoid_loss(
            jnp.asarray(img), jnp.asarray(txt), SCALE, BIAS, img_ids=i, txt_ids=t
        )
    )
    with pytest.raises(TypeError, match=r"`img_ids` \(uint64\) and `txt_ids` \(int64\)"):
        jitted(
            jnp.asarray(MIXED_IMG_IDS, dtype=jnp.uint64),
            jnp.asarray(MIXED_TXT_IDS, dtype=jnp.int64),
        )
    # int32 against int64: the wider holds every value of the narrower, traced or not.
    img_ids, txt_ids = np.array([1, 2, 5, 6]), np.array([2, 1, 5, 6, 1, 6])
    reference = IDS_REFERENCES["sigmoid"](img, txt, img_ids, txt_ids, SCALE, BIAS)
    value = jitted(jnp.asarray(img_ids, dtype=jnp.int32), jnp.asarray(txt_ids, dtype=jnp.int64))
    assert_close(value, reference.loss, 1e-12, "loss")
