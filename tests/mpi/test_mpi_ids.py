"""Ids of different integer widths on different MPI ranks, against the long-double oracle.

Even ranks pass int64 image ids and int32 text ids, odd ranks the other way round: the text
blocks that travel (with their ids) differ in width from rank to rank. Run by ``.ci/run``
under ``mpirun -n W`` for W = 1..4; plain ``pytest`` runs it with W = 1.
"""

from __future__ import annotations

from itertools import accumulate, pairwise

import numpy as np
import pytest
from helpers import LOSS_AND_GRAD, SCHEDULE_IDS, SCHEDULES, assert_close, skip_without_mpi
from oracle import IDS_REFERENCES

skip_without_mpi()  # mpi4py without an MPI library raises RuntimeError, not ImportError
from mpi4py import MPI  # noqa: E402 - needs MPI
from portable_siglip.backends.mpi import MPIComm  # noqa: E402 - needs mpi4py

SCALE, BIAS = 7.0, -3.0


@pytest.fixture(scope="module")
def comm() -> MPIComm:
    return MPIComm(MPI.COMM_WORLD)


def shard_slices(sizes: list[int]) -> list[slice]:
    return [slice(a, b) for a, b in pairwise([0, *accumulate(sizes)])]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("loss", "strategy"), SCHEDULES, ids=SCHEDULE_IDS)
def test_ids_of_other_widths_on_other_ranks(comm: MPIComm, loss: str, strategy: str) -> None:
    world, rank = comm.size, comm.rank
    img_sizes = [1 + (2 * r) % 3 for r in range(world)]  # 1, 3, 2, 1, ...
    txt_sizes = [3 - r % 3 for r in range(world)]  # 3, 2, 1, 3, ...
    m, k = sum(img_sizes), sum(txt_sizes)
    rng = np.random.default_rng(60 + world)  # the same batch on every rank
    img_ids = 2_000_003 + 104_729 * np.arange(m)
    distinct = np.unique(img_ids)
    extra = rng.choice(distinct, max(k - distinct.size, 0))
    txt_ids = rng.permutation(np.concatenate([distinct, extra]))[:k]
    if k < m:  # fewer texts than images: the images without a text share the first id
        img_ids[k:] = txt_ids[0]
    img = rng.standard_normal((m, 5)) / np.sqrt(5)
    txt = rng.standard_normal((k, 5)) / np.sqrt(5)
    reference = IDS_REFERENCES[loss](img, txt, img_ids, txt_ids, SCALE, BIAS)
    mine_img, mine_txt = shard_slices(img_sizes)[rank], shard_slices(txt_sizes)[rank]
    img_dtype, txt_dtype = (np.int64, np.int32) if rank % 2 == 0 else (np.int32, np.int64)
    got_loss, got = LOSS_AND_GRAD[loss](
        img[mine_img],
        txt[mine_txt],
        SCALE,
        BIAS,
        comm=comm,
        strategy=strategy,
        block_size=2,
        img_ids=img_ids[mine_img].astype(img_dtype),
        txt_ids=txt_ids[mine_txt].astype(txt_dtype),
    )
    assert_close(got_loss, reference.loss, 1e-12, "loss")
    assert_close(got.img, reference.img[mine_img], 1e-12, "grads.img")
    assert_close(got.txt, reference.txt[mine_txt], 1e-12, "grads.txt")
    assert_close(got.scale, reference.scale, 1e-12, "grads.scale")
    assert_close(got.bias, reference.bias, 1e-12, "grads.bias")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("strategy", [s for loss, s in SCHEDULES if loss == "sigmoid"])
def test_sigmoid_rows_without_a_positive(comm: MPIComm, strategy: str) -> None:
    """The last image and the first text have ids found nowhere else: all their pairs are
    negatives, on every rank (the softmax loss would refuse them)."""
    world, rank = comm.size, comm.rank
    img_sizes = [2 + r % 2 for r in range(world)]
    txt_sizes = [3 - r % 2 for r in range(world)]
    m, k = sum(img_sizes), sum(txt_sizes)
    rng = np.random.default_rng(80 + world)
    img_ids = np.arange(m) % 3
    img_ids[-1] = 1000  # no text has it
    txt_ids = rng.integers(0, 3, size=k)
    txt_ids[0] = 2000  # no image has it
    img = rng.standard_normal((m, 4)) / 2
    txt = rng.standard_normal((k, 4)) / 2
    reference = IDS_REFERENCES["sigmoid"](img, txt, img_ids, txt_ids, SCALE, BIAS)
    mine_img, mine_txt = shard_slices(img_sizes)[rank], shard_slices(txt_sizes)[rank]
    got_loss, got = LOSS_AND_GRAD["sigmoid"](
        img[mine_img],
        txt[mine_txt],
        SCALE,
        BIAS,
        comm=comm,
        strategy=strategy,
        block_size=2,
        img_ids=img_ids[mine_img],
        txt_ids=txt_ids[mine_txt],
    )
    assert_close(got_loss, reference.loss, 1e-12, "loss")
    assert_close(got.img, reference.img[mine_img], 1e-12, "grads.img")
    assert_close(got.txt, reference.txt[mine_txt], 1e-12, "grads.txt")
    assert_close(got.bias, reference.bias, 1e-12, "grads.bias")
