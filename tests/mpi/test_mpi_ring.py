"""MPIComm under real MPI: every schedule of both losses against one process, on every rank.

Run as ``mpirun -n W python -m mpi4py -m pytest tests/mpi`` (``.ci/run`` does W = 1..4);
plain ``pytest`` runs them with W = 1. Shards are uneven and include a one-row shard.
"""

from __future__ import annotations

import re
from itertools import accumulate
from typing import Any

import numpy as np
import pytest
from helpers import assert_close, dtype_of, on_backend, pairs, skip_without_mpi, to_numpy

import portable_siglip as ps
from portable_siglip import _registry

skip_without_mpi()  # mpi4py without an MPI library raises RuntimeError, not ImportError
from mpi4py import MPI  # noqa: E402 - needs MPI
from portable_siglip.backends.mpi import MPIComm  # noqa: E402 - needs mpi4py

LOSS_AND_GRAD = {"sigmoid": ps.sigmoid_loss_and_grad, "softmax": ps.softmax_loss_and_grad}
SCHEDULES = [(loss.name, s) for loss in _registry.losses() for s in loss.schedules]
SCALE, BIAS = 9.0, -4.0


@pytest.fixture(scope="module")
def comm() -> MPIComm:
    return MPIComm(MPI.COMM_WORLD)


def shard_sizes(world: int) -> list[int]:
    """Uneven rows per rank: 1, 4, 3, 2, 1, 4, ... (rank 0 holds a single row)."""
    return [1 + (3 * rank) % 4 for rank in range(world)]


def my_rows(comm: MPIComm) -> slice:
    edges = [0, *accumulate(shard_sizes(comm.size))]
    return slice(edges[comm.rank], edges[comm.rank + 1])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("block_size", [2, None])
@pytest.mark.parametrize(("loss", "strategy"), SCHEDULES, ids=[f"{a}-{b}" for a, b in SCHEDULES])
def test_matches_one_process(
    xp: Any, comm: MPIComm, loss: str, strategy: str, block_size: int | None
) -> None:
    n = sum(shard_sizes(comm.size))
    img_np, txt_np = pairs(np.random.default_rng(n), n, 5)  # the same batch on every rank
    img, _ = on_backend(xp, img_np, "float64")
    txt, _ = on_backend(xp, txt_np, "float64")
    function = LOSS_AND_GRAD[loss]
    want_loss, want = function(img, txt, SCALE, BIAS, block_size=block_size)
    rows = my_rows(comm)
    got_loss, got = function(
        img[rows, :], txt[rows, :], SCALE, BIAS, comm=comm, strategy=strategy, block_size=block_size
    )
    assert_close(got_loss, to_numpy(want_loss), 1e-12, "loss")
    assert_close(got.img, to_numpy(want.img)[rows], 1e-12, "grads.img")
    assert_close(got.txt, to_numpy(want.txt)[rows], 1e-12, "grads.txt")
    assert_close(got.scale, to_numpy(want.scale), 1e-12, "grads.scale")
    assert_close(got.bias, to_numpy(want.bias), 1e-12, "grads.bias")
    assert got.img.dtype == dtype_of(xp, "float64")
    losses = comm.allgather_object(float(to_numpy(got_loss)))
    assert all(value == losses[0] for value in losses), f"ranks disagree: {losses}"


@pytest.mark.timeout(60)
def test_invalid_shard_raises_on_every_rank(xp: Any, comm: MPIComm) -> None:
    last = comm.size - 1
    n = 0 if comm.rank == last else 3
    values = xp.asarray(np.ones((n, 4)), dtype=dtype_of(xp, "float64"))
    # One rank: the same error "on every rank"; several: the other ranks name the culprit.
    who = r"\(on every rank\)$" if comm.size == 1 else rf"^rank {last}: "
    with pytest.raises(ValueError, match=r"`img` and `txt` must hold at least one pair") as info:
        ps.sigmoid_loss(values, values, SCALE, BIAS, comm=comm)
    assert re.search(who, str(info.value)), str(info.value)


@pytest.mark.timeout(60)
def test_dimension_mismatch_raises_on_every_rank(xp: Any, comm: MPIComm) -> None:
    if comm.size == 1:
        pytest.skip("a disagreement needs two ranks")
    d = 4 if comm.rank == 0 else 5
    values = xp.asarray(np.ones((2, d)), dtype=dtype_of(xp, "float64"))
    with pytest.raises(ValueError, match=r"feature dimension d must be the same on every rank"):
        ps.softmax_loss(values, values, SCALE, comm=comm)


@pytest.mark.timeout(60)
def test_primitives(xp: Any, comm: MPIComm) -> None:
    rank, size = comm.rank, comm.size
    f64 = dtype_of(xp, "float64")
    mine = xp.asarray(np.full((rank + 1, 2), float(rank)), dtype=f64)
    right, left = (rank + 1) % size, (rank - 1) % size
    before = comm.bytes_sent
    arrived = comm.isendrecv(mine, right, left, (left + 1, 2), tag=5).wait()
    assert comm.bytes_sent - before == (rank + 1) * 2 * 8
    assert type(arrived) is type(mine)
    np.testing.assert_array_equal(to_numpy(arrived), np.full((left + 1, 2), float(left)))
    total = comm.allreduce(xp.asarray([1.0, float(rank)], dtype=f64))
    np.testing.assert_array_equal(to_numpy(total), [size, size * (size - 1) / 2])
    parts = comm.allgather(mine)
    assert [tuple(part.shape) for part in parts] == [(r + 1, 2) for r in range(size)]
    for r, part in enumerate(parts):
        np.testing.assert_array_equal(to_numpy(part), np.full((r + 1, 2), float(r)))
    root = size - 1
    template = mine if rank == root else xp.zeros((root + 1, 2), dtype=f64)
    np.testing.assert_array_equal(
        to_numpy(comm.bcast(template, root=root)), np.full((root + 1, 2), float(root))
    )
    np.testing.assert_array_equal(to_numpy(mine), np.full((rank + 1, 2), float(rank)))


def test_constructor_checks() -> None:
    with pytest.raises(TypeError, match=r"`comm` must be an mpi4py.MPI.Comm, got object"):
        MPIComm(object())
    with pytest.raises(TypeError, match=r"`cuda_aware` must be a bool, got 'yes'"):
        MPIComm(MPI.COMM_WORLD, cuda_aware="yes")  # type: ignore[arg-type]


def text_shard_sizes(world: int) -> list[int]:
    """Uneven text rows per rank, unlike the image rows: 3, 1, 2, 3, 1, ..."""
    return [1 + (2 * rank + 2) % 3 for rank in range(world)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("loss", "strategy"), SCHEDULES, ids=[f"{a}-{b}" for a, b in SCHEDULES])
def test_ids_match_one_process(xp: Any, comm: MPIComm, loss: str, strategy: str) -> None:
    """Several positives per row under real MPI: text ids travel with their text blocks."""
    m, k = sum(shard_sizes(comm.size)), sum(text_shard_sizes(comm.size))
    rng = np.random.default_rng(m + k)
    img_np, txt_np = rng.standard_normal((m, 5)), rng.standard_normal((k, 5))
    # Ids 0 .. min(m, k) - 1 on both sides, with repeats, so every row has a positive.
    groups = min(m, k)
    img_ids_np = np.arange(m) % groups
    txt_ids_np = rng.permutation(np.arange(k) % groups)
    img, _ = on_backend(xp, img_np, "float64")
    txt, _ = on_backend(xp, txt_np, "float64")
    img_ids, txt_ids = xp.asarray(img_ids_np), xp.asarray(txt_ids_np)
    function = LOSS_AND_GRAD[loss]
    want_loss, want = function(
        img, txt, SCALE, BIAS, block_size=2, img_ids=img_ids, txt_ids=txt_ids
    )
    rows = my_rows(comm)
    edges = [0, *accumulate(text_shard_sizes(comm.size))]
    cols = slice(edges[comm.rank], edges[comm.rank + 1])
    got_loss, got = function(
        img[rows, :],
        txt[cols, :],
        SCALE,
        BIAS,
        comm=comm,
        strategy=strategy,
        block_size=2,
        img_ids=img_ids[rows],
        txt_ids=txt_ids[cols],
    )
    assert_close(got_loss, to_numpy(want_loss), 1e-12, "loss")
    assert_close(got.img, to_numpy(want.img)[rows], 1e-12, "grads.img")
    assert_close(got.txt, to_numpy(want.txt)[cols], 1e-12, "grads.txt")
    assert_close(got.scale, to_numpy(want.scale), 1e-12, "grads.scale")
