"""MPIComm moves float16 and bfloat16 arrays of every library, on every rank.

Run as ``mpirun -n W python -m mpi4py -m pytest tests/mpi`` (``.ci/run`` does W = 1..4);
plain ``pytest`` runs them with W = 1. NumPy and MPI have no bfloat16: torch's bfloat16
and ml_dtypes' (NumPy, JAX) travel as their bit patterns and must arrive bit for bit.
``allreduce`` must sum in float32 and round once: at W = 3 the values below give a
different answer for every order of rounded pairwise sums.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from helpers import skip_without_mpi

skip_without_mpi()  # mpi4py without an MPI library raises RuntimeError, not ImportError
from mpi4py import MPI  # noqa: E402 - needs MPI
from portable_siglip.backends.mpi import (  # noqa: E402 - needs mpi4py
    MPIComm,
    bfloat16_to_float32,
    float32_to_bfloat16,
)

#: Per-rank allreduce inputs (rank r holds TRIPLE[r % 3]), exact in bfloat16 and float16:
#: the float32 sum at W = 3 is 2 + 5/512, which rounds to 2 + 1/64 in bfloat16, while any
#: pairwise sum rounded to bfloat16 first gives 2 (ties to even, then 1/512 is lost).
TRIPLE = (1.0, 1.0 + 2.0**-7, 2.0**-9)


def _numpy(dtype: str) -> Any:
    if dtype == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        return lambda v: np.asarray(v, dtype=np.float32).astype(ml_dtypes.bfloat16)
    return lambda v: np.asarray(v, dtype=np.float16)


def _torch(dtype: str) -> Any:
    torch = pytest.importorskip("torch")
    return lambda v: torch.tensor(np.asarray(v, dtype=np.float32)).to(getattr(torch, dtype))


def _jax(dtype: str) -> Any:
    jnp = pytest.importorskip("jax.numpy")
    return lambda v: jnp.asarray(np.asarray(v, dtype=np.float32)).astype(getattr(jnp, dtype))


def _cupy(dtype: str) -> Any:
    cupy = pytest.importorskip("cupy")
    if cupy.cuda.runtime.getDeviceCount() == 0:
        pytest.skip("cupy sees no GPU")
    if dtype == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        return lambda v: cupy.asarray(np.asarray(v, dtype=np.float32).astype(ml_dtypes.bfloat16))
    return lambda v: cupy.asarray(np.asarray(v, dtype=np.float16))


def _torch_cuda(dtype: str) -> Any:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no GPU")
    make = _torch(dtype)
    return lambda v: make(v).to("cuda")


MAKERS: dict[str, Callable[[str], Any]] = {
    "numpy": _numpy,
    "torch": _torch,
    "jax": _jax,
    "cupy": _cupy,
    "torch-cuda": _torch_cuda,
}


@pytest.fixture(scope="module")
def comm() -> MPIComm:
    return MPIComm(MPI.COMM_WORLD)


def bits(x: Any) -> np.ndarray:
    """The bit patterns of a half-precision array of any library, as host uint16."""
    if type(x).__module__.startswith("torch"):
        import torch

        return x.detach().view(torch.int16).cpu().numpy().view(np.uint16)  # type: ignore[no-any-return]
    host = x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else np.asarray(x)
    return np.ascontiguousarray(host).view(np.uint16)


def assert_same(got: Any, want: Any) -> None:
    """Same library, device, dtype, shape and bits."""
    assert type(got) is type(want), (type(got), type(want))
    assert str(got.dtype) == str(want.dtype)
    assert tuple(got.shape) == tuple(want.shape)
    assert str(getattr(got, "device", "")) == str(getattr(want, "device", ""))
    np.testing.assert_array_equal(bits(got), bits(want))


def rank_values(rank: int, shape: tuple[int, ...]) -> np.ndarray:
    """Values that differ by rank and element, all exact in bfloat16 and float16."""
    return (rank + 1) * 0.5 + np.arange(np.prod(shape), dtype=np.float32).reshape(shape) / 8


DTYPES = ("bfloat16", "float16")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("library", list(MAKERS))
def test_ring_exchange(comm: MPIComm, library: str, dtype: str) -> None:
    make = MAKERS[library](dtype)
    right, left = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
    send = make(rank_values(comm.rank, (3, 5)))
    got = comm.sendrecv(send, right, left, (3, 5))
    assert_same(got, make(rank_values(left, (3, 5))))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("library", list(MAKERS))
def test_allgather_uneven(comm: MPIComm, library: str, dtype: str) -> None:
    make = MAKERS[library](dtype)
    parts = comm.allgather(make(rank_values(comm.rank, (comm.rank + 1, 2))))
    assert len(parts) == comm.size
    for rank, part in enumerate(parts):
        assert_same(part, make(rank_values(rank, (rank + 1, 2))))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("library", list(MAKERS))
def test_bcast_from_the_last_rank(comm: MPIComm, library: str, dtype: str) -> None:
    make = MAKERS[library](dtype)
    root = comm.size - 1
    mine = make(rank_values(comm.rank, (4,)))
    got = comm.bcast(mine, root=root)
    assert_same(got, make(rank_values(root, (4,))))
    assert_same(mine, make(rank_values(comm.rank, (4,))))  # the caller's array is untouched


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shape", [(), (2, 3)], ids=["0d", "2d"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("library", list(MAKERS))
def test_allreduce_sums_in_float32_and_rounds_once(
    comm: MPIComm, library: str, dtype: str, shape: tuple[int, ...]
) -> None:
    make = MAKERS[library](dtype)
    total = np.float64(sum(TRIPLE[rank % 3] for rank in range(comm.size)))  # exact
    got = comm.allreduce(make(np.full(shape, TRIPLE[comm.rank % 3], dtype=np.float32)))
    assert_same(got, make(np.full(shape, total, dtype=np.float32)))
    if comm.size == 3 and dtype == "bfloat16":
        assert float(np.asarray(bfloat16_to_float32(bits(got))).reshape(-1)[0]) == 2 + 2**-6


def test_bfloat16_rounding_matches_torch_and_ml_dtypes() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    special = [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0x00000001, 0x3F808000]
    special += [0x3F818000, 0x3F807FFF, 0x3F80FFFF, 0x7FC00000, 0xFFFFFFFF, 0x7F800001]
    patterns = np.concatenate([patterns, np.array(special, dtype=np.uint32)])
    values = patterns.view(np.float32)
    got = float32_to_bfloat16(values)
    want = torch.from_numpy(values.copy()).to(torch.bfloat16).view(torch.int16).numpy()
    nan = np.isnan(values)
    np.testing.assert_array_equal(got[~nan], want.view(np.uint16)[~nan])
    assert np.isnan(bfloat16_to_float32(got[nan])).all()
    signs = np.signbit(bfloat16_to_float32(got[nan]))
    np.testing.assert_array_equal(signs, np.signbit(values[nan]))
    if importlib.util.find_spec("ml_dtypes") is not None:
        import ml_dtypes

        rounded = values[~nan].astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(got[~nan], rounded.view(np.uint16))


def test_bfloat16_widening_is_exact() -> None:
    every = np.arange(2**16, dtype=np.uint16)
    wide = bfloat16_to_float32(every)
    finite = ~np.isnan(wide)
    np.testing.assert_array_equal(float32_to_bfloat16(wide)[finite], every[finite])
    assert float32_to_bfloat16(np.float32(1.5)).shape == ()
