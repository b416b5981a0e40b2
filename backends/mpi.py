"""MPI communicator over mpi4py, for ``comm=`` of every loss.

Launch with ``mpirun -n W python -m mpi4py your_script.py``: with ``-m mpi4py`` an
exception on any rank calls ``MPI_Abort`` and ends the job, instead of leaving the other
ranks waiting in an exchange that will never complete.

Arrays travel through host (NumPy) buffers: CPU arrays of NumPy, torch, jax or
array_api_strict are handed to MPI without a copy where DLPack allows it, device arrays
are copied to the host and back. With a CUDA-aware MPI build, ``cuda_aware=True`` hands
CuPy and torch CUDA arrays to MPI directly (after synchronising the current stream) in
the ring exchanges (``isendrecv``, all the traffic of the bidir/shift/ring schedules);
the collectives (``allreduce``, ``allgather``, ``bcast``: the reduce and gather
schedules and the final scalar sums) and JAX arrays always go through host memory.

Half precision travels as it is. float16 is a NumPy dtype; bfloat16 (torch's, or the
ml_dtypes one of NumPy, CuPy and JAX arrays) is not one MPI or plain NumPy knows, so its raw
16-bit patterns travel as ``uint16`` and the receiving side rebuilds the dtype from the
array it passed in (the one it sends, or the local one of a ``bcast``): the values arrive
bit for bit. ``allreduce`` sums half-precision arrays in float32 (MPI adds float32 values)
and rounds the sum to the input's dtype once, to nearest even, so W ranks' rounding errors
do not add up.

Examples
--------
>>> import numpy as np
>>> from mpi4py import MPI
>>> import portable_siglip as ps
>>> from portable_siglip.backends.mpi import MPIComm
>>> comm = MPIComm(MPI.COMM_WORLD)  # under mpirun -n W, each rank passes its own shard
>>> img = np.eye(3)
>>> loss = ps.sigmoid_loss(img, img, 10.0, -5.0, comm=comm)
>>> print(f"{float(loss):.6f}")  # run as one process: the loss of these 3 pairs
0.020146
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import array_api_compat
import numpy as np
from mpi4py import MPI

from portable_siglip._interop import bfloat16_to_float32, float32_to_bfloat16, to_host
from portable_siglip.comm import BaseComm, Request

__all__ = ["MPIComm"]

Array = Any


def _is_host(x: Array) -> bool:
    if isinstance(x, np.ndarray):
        return True
    device = getattr(x, "__dlpack_device__", None)
    if device is None:
        return False
    try:
        return int(device()[0]) == 1  # kDLCPU
    except Exception:
        return False


def _dtype_name(dtype: Any) -> str:
    """Return the dtype's bare name: ``"float16"`` for NumPy's and torch's float16 alike."""
    return str(dtype).rpartition(".")[2]


def _is_bfloat16(dtype: Any) -> bool:
    """Return whether `dtype` is bfloat16: torch's, or ml_dtypes' (NumPy, CuPy, JAX)."""
    return _dtype_name(dtype) == "bfloat16"


def _contiguous(host: Any) -> np.ndarray:
    """Return a C-contiguous NumPy array of ``host``'s shape (0-d stays 0-d)."""
    host = np.asarray(host)
    return host if host.flags.c_contiguous else np.ascontiguousarray(host).reshape(host.shape)


def _bfloat16_bits(x: Array) -> np.ndarray:
    """Return a bfloat16 array of any library as its bit patterns: host, uint16, C order."""
    if array_api_compat.is_torch_array(x):
        import torch

        # NumPy has no bfloat16 and torch refuses to export one: reinterpret it first.
        bits = x.detach().view(torch.int16).to("cpu").numpy()
        return _contiguous(bits).view(np.uint16)
    return _contiguous(to_host(x)).view(np.uint16)  # ml_dtypes' NumPy bfloat16


def _to_host(x: Array) -> np.ndarray:
    """Return a C-contiguous NumPy view of ``x`` where possible, else a host copy.

    bfloat16 arrays come back as their bit patterns (``uint16``); :func:`_like` rebuilds them.
    """
    if _is_bfloat16(x.dtype):
        return _bfloat16_bits(x)
    if _is_host(x) and not isinstance(x, np.ndarray):
        try:
            return _contiguous(np.from_dlpack(x))
        except (BufferError, RuntimeError, TypeError, ValueError):
            pass  # e.g. a torch tensor that requires grad, or a dtype NumPy lacks
    return _contiguous(to_host(x))


def _like(host: np.ndarray, like: Array) -> Array:
    """``host`` as an array of ``like``'s namespace and device.

    bfloat16 bit patterns (``uint16``, from :func:`_to_host`) become ``like``'s bfloat16.
    """
    if _is_bfloat16(like.dtype) and host.dtype == np.uint16:
        if array_api_compat.is_torch_array(like):
            import torch

            return torch.from_numpy(host.view(np.int16)).view(torch.bfloat16).to(like.device)
        host = host.view(like.dtype)  # NumPy, CuPy and JAX: ml_dtypes' NumPy bfloat16
    if isinstance(like, np.ndarray):
        return host
    xp = array_api_compat.array_namespace(like)
    return xp.asarray(host, device=array_api_compat.device(like))


def _synchronise(x: Array) -> None:
    if array_api_compat.is_cupy_array(x):
        import cupy

        cupy.cuda.get_current_stream().synchronize()
    elif array_api_compat.is_torch_array(x) and x.is_cuda:
        import torch

        torch.cuda.current_stream(x.device).synchronize()


def _bits_view(x: Array) -> Array:
    """Return a device array as MPI can take it: bfloat16 viewed as int16, without a copy."""
    if not _is_bfloat16(x.dtype):
        return x
    if array_api_compat.is_torch_array(x):
        import torch

        return x.view(torch.int16)
    return x.view(np.int16)  # CuPy: ml_dtypes' NumPy bfloat16


def _widened(host: np.ndarray, like: Array) -> np.ndarray:
    """``host`` (from :func:`_to_host` of ``like``) in float32 if it is half precision."""
    if _is_bfloat16(like.dtype):
        return np.asarray(bfloat16_to_float32(host))
    if host.dtype == np.float16:
        return host.astype(np.float32)
    return host


def _narrowed(total: np.ndarray, like: Array) -> np.ndarray:
    """Undo :func:`_widened`: round a float32 sum once to ``like``'s half dtype (host form)."""
    if _is_bfloat16(like.dtype):
        return np.asarray(float32_to_bfloat16(total))
    if _dtype_name(like.dtype) == "float16":
        return total.astype(np.float16)
    return total


def _as_bytes(buffer: np.ndarray) -> list[Any]:
    return [buffer.reshape(-1).view(np.uint8), MPI.BYTE]


class _MPIRequest:
    """Keeps the buffers of a posted exchange alive until ``wait()``."""

    def __init__(self, requests: list[Any], recvbuf: Any, like: Array, direct: bool) -> None:
        self._requests = requests
        self._recvbuf = recvbuf
        self._like = like
        self._direct = direct
        self._sendbuf: Any = None

    def wait(self) -> Array:
        MPI.Request.Waitall(self._requests)
        self._sendbuf = None
        if self._direct:
            return self._recvbuf
        return _like(self._recvbuf, self._like)


class MPIComm(BaseComm):
    """A :class:`portable_siglip.comm.Communicator` over an mpi4py communicator.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm, optional
        The ranks to use; ``MPI.COMM_WORLD`` by default.
    cuda_aware : bool, optional
        Declare that the MPI library is CUDA-aware, so device arrays (CuPy, torch CUDA) of
        the ring exchanges go to MPI without a host copy. Wrong on a build without CUDA
        support, MPI will crash. Not yet verified on a GPU.

    Attributes
    ----------
    comm : mpi4py.MPI.Comm
        The ranks used. ``rank``, ``size`` and ``bytes_sent`` (the payload handed to MPI)
        are those of every :class:`~portable_siglip.comm.BaseComm`.
    cuda_aware : bool
        As passed.

    Examples
    --------
    Run here as one process (rank 0 of 1); under ``mpirun -n W python -m mpi4py``, each
    rank makes the same calls and gets rank r of W:

    >>> import numpy as np
    >>> from mpi4py import MPI
    >>> from portable_siglip.backends.mpi import MPIComm
    >>> comm = MPIComm(MPI.COMM_WORLD)
    >>> comm
    MPIComm(rank=0, size=1)
    >>> comm.allreduce(np.arange(3.0))  # the sum over the ranks
    array([0., 1., 2.])
    >>> comm.allgather_object({"rank": comm.rank})
    [{'rank': 0}]
    """

    def __init__(self, comm: Any = None, *, cuda_aware: bool = False) -> None:
        super().__init__()
        if comm is None:
            comm = MPI.COMM_WORLD
        if not isinstance(comm, MPI.Comm):
            msg = f"`comm` must be an mpi4py.MPI.Comm, got {type(comm).__name__}"
            raise TypeError(msg)
        if not isinstance(cuda_aware, bool):
            msg = f"`cuda_aware` must be a bool, got {cuda_aware!r}"  # type: ignore[unreachable]
            raise TypeError(msg)
        self.comm = comm
        self.rank = int(comm.Get_rank())
        self.size = int(comm.Get_size())
        self.cuda_aware = cuda_aware

    def _direct(self, x: Array) -> bool:
        """Whether ``x`` goes to MPI as it is (a device array on CUDA-aware MPI)."""
        return self.cuda_aware and not _is_host(x) and not array_api_compat.is_jax_array(x)

    def isendrecv(
        self, send: Array, dest: int, source: int, shape: tuple[int, ...], *, tag: int = 0
    ) -> Request:
        """Post ``Irecv`` from ``source``, then ``Isend`` to ``dest``; ``wait()`` gives the data."""
        self._count(send)
        if self._direct(send):
            _synchronise(send)
            xp = array_api_compat.array_namespace(send)
            device = array_api_compat.device(send)
            recvbuf = xp.empty(tuple(shape), dtype=send.dtype, device=device)
            requests = [  # bfloat16 as int16 views: the bits travel, recvbuf receives them
                self.comm.Irecv(_bits_view(recvbuf), source=source, tag=tag),
                self.comm.Isend(_bits_view(send), dest=dest, tag=tag),
            ]
            request = _MPIRequest(requests, recvbuf, send, direct=True)
            request._sendbuf = send
            return request
        sendbuf = _to_host(send)
        recvbuf = np.empty(tuple(shape), dtype=sendbuf.dtype)
        requests = [
            self.comm.Irecv(_as_bytes(recvbuf), source=source, tag=tag),
            self.comm.Isend(_as_bytes(sendbuf), dest=dest, tag=tag),
        ]
        request = _MPIRequest(requests, recvbuf, send, direct=False)
        request._sendbuf = sendbuf
        return request

    def allreduce(self, x: Array) -> Array:
        """Return the elementwise sum over ranks (``MPI_Allreduce``).

        float16 and bfloat16 arrays are summed in float32 and the sum is rounded to their
        dtype once (MPI has no half-precision sum, and a sum in half precision would round
        at every rank).
        """
        self._count(x)
        host = _widened(_to_host(x), x)
        out = np.empty_like(host)
        self.comm.Allreduce(host, out, op=MPI.SUM)
        return _like(_narrowed(out, x), x)

    def allgather(self, x: Array) -> list[Array]:
        """Return every rank's ``x`` in rank order (``MPI_Allgatherv``; leading dims may differ)."""
        self._count(x)
        host = _to_host(x)
        shapes: Sequence[tuple[int, ...]] = self.comm.allgather(tuple(host.shape))
        if any(shape[1:] != host.shape[1:] for shape in shapes):
            msg = f"allgather: the ranks' arrays differ beyond the first axis: {list(shapes)}"
            raise ValueError(msg)
        counts = [int(np.prod(shape)) * host.itemsize for shape in shapes]
        displacements = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
        out = np.empty(sum(counts), dtype=np.uint8)
        self.comm.Allgatherv(_as_bytes(host), [out, counts, displacements, MPI.BYTE])
        parts = []
        for shape, start, count in zip(shapes, displacements, counts, strict=True):
            part = out[start : start + count].view(host.dtype).reshape(shape)
            parts.append(_like(part, x))
        return parts

    def bcast(self, x: Array, root: int = 0) -> Array:
        """Return the root's ``x`` (``MPI_Bcast``); other ranks pass one of its shape and dtype."""
        if self.rank == root:
            self._count(x)
            buffer = _to_host(x).copy()  # the result must not alias the caller's array
        else:
            buffer = np.empty_like(_to_host(x))
        self.comm.Bcast(_as_bytes(buffer), root=root)
        return _like(buffer, x)

    def allgather_object(self, obj: object) -> list[Any]:
        """Return every rank's picklable ``obj`` in rank order."""
        return list(self.comm.allgather(obj))

    def abort(self, code: int = 1) -> None:
        """End every rank of the job at once (``MPI_Abort``)."""
        self.comm.Abort(code)
