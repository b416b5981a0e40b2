"""NCCL communicator over CuPy's binding (``cupy.cuda.nccl``), for ``comm=`` of every loss.

:class:`NCCLComm` moves CuPy arrays and torch CUDA tensors between GPUs with NCCL, with no
host copy. A torch tensor comes in through DLPack (zero copy) and the result goes back
as a torch tensor on the same device; bfloat16 tensors travel as their raw 16-bit
patterns. Start the job with ``mpirun -n W python -m mpi4py script.py`` and build the
communicator with :meth:`NCCLComm.from_mpi`: rank 0 creates the NCCL unique id, MPI
broadcasts it, every rank selects its GPU (local rank modulo the device count) and joins
the NCCL communicator; the small pickled handshake of every loss call
(``allgather_object``) then goes over MPI.

Semantics
---------
- Every operation is enqueued on the communicator's stream (``stream=``, else CuPy's
  current stream at the call). Inputs produced on CuPy's current stream or on torch's
  current stream are awaited first.
- Results are ready when returned: ``allreduce``, ``allgather``, ``bcast`` and
  :meth:`Request.wait` synchronise the stream before they return, so the arrays can be
  used on any stream.
- ``isendrecv`` posts the ``recv`` from ``source`` and the ``send`` to ``dest`` in one
  ``groupStart()``/``groupEnd()``; sending to oneself (W = 1) is matched by the receive of
  the same group. NCCL has no tags: ``tag`` is accepted and ignored. That is safe because
  NCCL matches the point-to-point operations of a pair of ranks in posting order, and
  every rank posts the exchanges of a schedule in the same order (the losses guarantee
  it), so the k-th message from a peer is the k-th one this rank waits for.
- Supported dtypes: int8, uint8, int32, int64, float16, float32, float64 and bfloat16
  (plus uint32/uint64 where the binding has them). Others (bool, complex, int16, ...)
  raise ``TypeError`` naming the dtype. ``allreduce`` of bfloat16 needs
  ``NCCL_BFLOAT16`` in the CuPy build; the byte-exact operations (exchange, allgather,
  bcast) send bfloat16 as raw bytes when it is missing.
- Arrays must be C-contiguous (``ValueError`` otherwise) and on the GPU: host arrays
  (NumPy, CPU tensors) raise ``TypeError``; use
  :class:`~portable_siglip.backends.mpi.MPIComm` for those.

Verification
------------
On CPU, the tests drive this module against a thread-backed fake of ``cupy.cuda.nccl``
operating on NumPy arrays (``tests/fake_nccl.py``): the primitives, every schedule of
both losses at W = 1..4 against one process, the ``from_mpi`` bootstrap with both forms
of the unique id (CuPy >= 14 ``bytes``, CuPy <= 13 tuple of ints), the dtype table and
the error paths. What needs a GPU, and is tested only where one is present
(``tests/test_nccl_comm.py``, the ``test_gpu_*`` tests, one rank): the real CuPy runtime
(pointers, streams, synchronisation, DLPack round trips of torch CUDA tensors), real
NCCL matching, and several ranks on several GPUs (not yet run anywhere).

Examples
--------
Not run as a doctest (it needs GPUs); under ``mpirun -n W python -m mpi4py script.py``,
each rank passing its own shard::

    import cupy as cp
    import portable_siglip as ps
    from portable_siglip.backends.nccl import NCCLComm

    comm = NCCLComm.from_mpi()  # one GPU per rank: local rank modulo the GPU count
    img = cp.asarray(my_image_features)
    txt = cp.asarray(my_text_features)
    loss = ps.sigmoid_loss(img, txt, 10.0, -10.0, comm=comm)  # the global loss
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

import array_api_compat
import numpy as np

from portable_siglip.comm import BaseComm, Request

__all__ = ["CupyRuntime", "NCCLComm", "Runtime"]

Array = Any

#: Array dtype name -> name of the NCCL dtype constant. Absent constants are looked up
#: with getattr at use, so a CuPy build without one degrades (see :func:`_nccl_dtype`).
_DTYPES = {
    "int8": "NCCL_INT8",
    "uint8": "NCCL_UINT8",
    "int32": "NCCL_INT32",
    "uint32": "NCCL_UINT32",
    "int64": "NCCL_INT64",
    "uint64": "NCCL_UINT64",
    "float16": "NCCL_FLOAT16",
    "float32": "NCCL_FLOAT32",
    "float64": "NCCL_FLOAT64",
    "bfloat16": "NCCL_BFLOAT16",
}
_ITEMSIZE = {"bfloat16": 2, "uint32": 4, "uint64": 8}


class Runtime(Protocol):
    """Where :class:`NCCLComm` finds CuPy: the NCCL binding, memory, streams, devices.

    :class:`CupyRuntime` is the real one; the tests pass a fake that works on NumPy.
    """

    @property
    def nccl(self) -> Any:
        """The ``cupy.cuda.nccl`` module (or a stand-in)."""
        ...

    def device_count(self) -> int:
        """Return the number of visible GPUs."""
        ...

    def use_device(self, device: int) -> None:
        """Make ``device`` current for this thread."""
        ...

    def as_device_array(self, x: Array, stream: Any) -> tuple[Array, str, Callable[[Array], Array]]:
        """Return ``x`` as a device array ready on ``stream``, its dtype name, and the way back.

        The way back turns a device array of the same physical dtype into the caller's
        kind of array (a torch tensor for a torch tensor, ...). Raises ``TypeError`` for
        host arrays.
        """
        ...

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Array:
        """Return a new device array."""
        ...

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Array:
        """Return a new zero-filled device array."""
        ...

    def from_host(self, host: np.ndarray) -> Array:
        """Copy a NumPy array to the device."""
        ...

    def to_host(self, x: Array) -> np.ndarray:
        """Copy a device array to a NumPy array (synchronously)."""
        ...

    def pointer(self, x: Array) -> int:
        """Return the device address of ``x``'s first element."""
        ...

    def stream_pointer(self, stream: Any) -> int:
        """Return the ``cudaStream_t`` of ``stream`` (None: the current stream)."""
        ...

    def synchronize(self, stream: Any) -> None:
        """Block until the work queued on ``stream`` (None: the current stream) is done."""
        ...

    def on(self, stream: Any) -> AbstractContextManager[Any]:
        """Return a context in which allocations and copies are queued on ``stream``."""
        ...


class CupyRuntime:
    """The real :class:`Runtime`: CuPy, its NCCL binding and torch through DLPack."""

    def __init__(self) -> None:
        import cupy
        from cupy.cuda import nccl

        self._cupy = cupy
        self._nccl = nccl

    @property
    def nccl(self) -> Any:
        """The ``cupy.cuda.nccl`` module."""
        return self._nccl

    def device_count(self) -> int:
        """Return the number of visible GPUs."""
        return int(self._cupy.cuda.runtime.getDeviceCount())

    def use_device(self, device: int) -> None:
        """Make ``device`` current (``cupy.cuda.Device(device).use()``)."""
        self._cupy.cuda.Device(device).use()

    def _current_stream(self) -> Any:
        return self._cupy.cuda.get_current_stream()

    def as_device_array(self, x: Array, stream: Any) -> tuple[Array, str, Callable[[Array], Array]]:
        """CuPy arrays as they are; torch CUDA tensors through DLPack; host arrays raise."""
        cupy = self._cupy
        if isinstance(x, cupy.ndarray):
            if stream is not None and stream.ptr != self._current_stream().ptr:
                self._current_stream().synchronize()  # produced on the current stream
            return x, str(x.dtype), _identity
        if array_api_compat.is_torch_array(x) and x.is_cuda:
            import torch

            torch.cuda.current_stream(x.device).synchronize()  # produced on torch's stream
            tensor = x.detach()
            if tensor.dtype == torch.bfloat16:  # CuPy has no bfloat16: move the bits
                arr = cupy.from_dlpack(tensor.view(torch.int16))
                return arr, "bfloat16", _torch_bfloat16
            arr = cupy.from_dlpack(tensor)
            return arr, str(arr.dtype), _torch
        raise TypeError(_host_message(x))

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Array:
        """``cupy.empty``."""
        return self._cupy.empty(shape, dtype=dtype)

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Array:
        """``cupy.zeros``."""
        return self._cupy.zeros(shape, dtype=dtype)

    def from_host(self, host: np.ndarray) -> Array:
        """``cupy.asarray``."""
        return self._cupy.asarray(host)

    def to_host(self, x: Array) -> np.ndarray:
        """``cupy.asnumpy``."""
        return np.asarray(self._cupy.asnumpy(x))

    def pointer(self, x: Array) -> int:
        """``x.data.ptr``."""
        return int(x.data.ptr)

    def stream_pointer(self, stream: Any) -> int:
        """``stream.ptr`` (the current stream's if None)."""
        return int((self._current_stream() if stream is None else stream).ptr)

    def synchronize(self, stream: Any) -> None:
        """``stream.synchronize()`` (the current stream's if None)."""
        (self._current_stream() if stream is None else stream).synchronize()

    def on(self, stream: Any) -> AbstractContextManager[Any]:
        """``with stream:`` (nothing to do for the current stream)."""
        return contextlib.nullcontext() if stream is None else stream


def _identity(x: Array) -> Array:
    return x


def _torch(x: Array) -> Array:
    import torch.utils.dlpack

    return torch.utils.dlpack.from_dlpack(x)


def _torch_bfloat16(x: Array) -> Array:
    import torch
    import torch.utils.dlpack

    return torch.utils.dlpack.from_dlpack(x).view(torch.bfloat16)


def _host_message(x: Array) -> str:
    kind = f"{type(x).__module__}.{type(x).__name__}"
    return (
        f"NCCLComm needs device arrays (CuPy arrays or torch CUDA tensors); got a {kind} "
        "in host memory. Move it to the GPU, or use "
        "portable_siglip.backends.mpi.MPIComm for host arrays"
    )


def _nccl_dtype(nccl: Any, name: str, *, reduce: bool) -> tuple[Any, int]:
    """Return the NCCL dtype constant for dtype ``name`` and the number of its bytes per element.

    For byte-exact transfers (``reduce=False``) a dtype whose constant the binding lacks
    travels as ``NCCL_UINT8``: the returned factor multiplies the element count.
    """
    constant_name = _DTYPES.get(name)
    if constant_name is None:
        msg = (
            f"NCCLComm cannot send arrays of dtype {name}; supported: "
            f"{', '.join(_DTYPES)}. Cast first (bool to uint8, complex to two float columns)"
        )
        raise TypeError(msg)
    constant = getattr(nccl, constant_name, None)
    if constant is not None:
        return constant, 1
    if reduce:
        msg = (
            f"NCCLComm.allreduce of {name} needs {constant_name}, which this CuPy/NCCL "
            f"build lacks; cast to float32 before reducing, or upgrade CuPy"
        )
        raise TypeError(msg)
    return nccl.NCCL_UINT8, _ITEMSIZE[name]


def _size(shape: tuple[int, ...]) -> int:
    count = 1
    for extent in shape:
        count *= int(extent)
    return count


def _check_contiguous(x: Array) -> None:
    flags = getattr(x, "flags", None)
    if flags is not None and not flags.c_contiguous:
        msg = (
            f"NCCLComm needs C-contiguous arrays; got shape {tuple(x.shape)} with strides "
            f"{tuple(x.strides)} (copy it with ascontiguousarray first)"
        )
        raise ValueError(msg)


class _NCCLRequest:
    """An exchange posted on a stream; ``wait()`` synchronises it."""

    def __init__(
        self,
        runtime: Runtime,
        stream: Any,
        recv: Array,
        send: Array,
        back: Callable[[Array], Array],
    ) -> None:
        self._runtime = runtime
        self._stream = stream
        self._recv = recv
        self._send: Array = send  # alive until the stream has read it
        self._back = back
        self._result: Array = None

    def wait(self) -> Array:
        if self._send is not None:
            self._runtime.synchronize(self._stream)
            self._send = None
            self._result = self._back(self._recv)
        return self._result


class NCCLComm(BaseComm):
    """A :class:`portable_siglip.comm.Communicator` over an NCCL communicator (CuPy).

    Parameters
    ----------
    nccl_comm : cupy.cuda.nccl.NcclCommunicator
        The NCCL communicator to use; rank and size come from its ``rank_id()`` and
        ``size()``. Arrays must be on the device it was created on.
    stream : cupy.cuda.Stream, optional
        The stream the operations are enqueued on; CuPy's current stream at each call if
        None.
    mpi_comm : mpi4py.MPI.Comm, optional
        The same ranks over MPI, for ``allgather_object`` (the small pickled handshake of
        every loss call). Without it, objects are pickled and allgathered over NCCL.
    runtime : Runtime, optional
        How CuPy is reached; a :class:`CupyRuntime` if None. Tests pass a fake.

    Attributes
    ----------
    rank, size : int
        This rank and the number of ranks.
    bytes_sent : int
        Payload bytes this rank has handed to NCCL so far.
    nccl_comm, mpi_comm, stream
        As passed.
    """

    def __init__(
        self,
        nccl_comm: Any,
        *,
        stream: Any = None,
        mpi_comm: Any = None,
        runtime: Runtime | None = None,
    ) -> None:
        super().__init__()
        self.runtime: Runtime = CupyRuntime() if runtime is None else runtime
        self.nccl_comm = nccl_comm
        self.stream = stream
        self.mpi_comm = mpi_comm
        self.rank = int(nccl_comm.rank_id())
        self.size = int(nccl_comm.size())
        if mpi_comm is not None and (int(mpi_comm.rank), int(mpi_comm.size)) != (
            self.rank,
            self.size,
        ):
            msg = (
                f"`mpi_comm` is rank {mpi_comm.rank} of {mpi_comm.size}, the NCCL "
                f"communicator rank {self.rank} of {self.size}; they must be the same ranks"
            )
            raise ValueError(msg)

    @classmethod
    def from_mpi(
        cls,
        comm: Any = None,
        *,
        device: int | None = None,
        stream: Any = None,
        runtime: Runtime | None = None,
    ) -> NCCLComm:
        """Create the NCCL communicator of the ranks of an MPI communicator.

        Rank 0 calls ``nccl.get_unique_id()``, MPI broadcasts the id (pickled, in whatever
        form this CuPy returns it: ``bytes`` in CuPy >= 14, a tuple of ints before) and
        every rank calls ``NcclCommunicator(size, id, rank)`` on its device.

        Parameters
        ----------
        comm : mpi4py.MPI.Comm, optional
            The ranks; ``MPI.COMM_WORLD`` if None. Kept for ``allgather_object``.
        device : int, optional
            This rank's GPU; the node-local rank modulo the number of GPUs if None.
        stream : cupy.cuda.Stream, optional
            As for :class:`NCCLComm`.
        runtime : Runtime, optional
            As for :class:`NCCLComm`.

        Returns
        -------
        NCCLComm
        """
        rt: Runtime = CupyRuntime() if runtime is None else runtime
        if comm is None:
            from mpi4py import MPI

            comm = MPI.COMM_WORLD
        rank, size = int(comm.rank), int(comm.size)
        count = rt.device_count()
        if device is None:
            device = _local_rank(comm) % max(count, 1)
        if isinstance(device, bool) or not isinstance(device, int) or not 0 <= device < count:
            msg = f"`device` must be a GPU index in 0..{count - 1}, got {device!r}"
            raise ValueError(msg)
        rt.use_device(device)
        nccl = rt.nccl
        unique_id = nccl.get_unique_id() if rank == 0 else None
        unique_id = comm.bcast(unique_id, root=0)
        nccl_comm = nccl.NcclCommunicator(size, unique_id, rank)
        made = cls(nccl_comm, stream=stream, mpi_comm=comm, runtime=rt)
        made.device = device
        return made

    device: int | None = None
    """The GPU chosen by :meth:`from_mpi` (None when wrapping a communicator)."""

    # --- helpers ---

    def _peer(self, name: str, value: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.size:
            msg = f"`{name}` must be a rank in 0..{self.size - 1}, got {value!r}"
            raise ValueError(msg)
        return value

    def _input(self, x: Array) -> tuple[Array, str, Callable[[Array], Array]]:
        arr, name, back = self.runtime.as_device_array(x, self.stream)
        if name not in _DTYPES:
            _nccl_dtype(self.runtime.nccl, name, reduce=False)  # raises TypeError
        _check_contiguous(arr)
        return arr, name, back

    def _stream(self) -> int:
        return self.runtime.stream_pointer(self.stream)

    # --- the Communicator operations ---

    def isendrecv(
        self, send: Array, dest: int, source: int, shape: tuple[int, ...], *, tag: int = 0
    ) -> Request:
        """Post ``send`` to ``dest`` and a receive of ``shape`` from ``source`` in one group.

        ``tag`` is ignored: NCCL matches a pair's messages in posting order (see the module
        docstring). ``wait()`` synchronises the stream and returns the received array.
        """
        dest, source = self._peer("dest", dest), self._peer("source", source)
        arr, name, back = self._input(send)
        dtype, factor = _nccl_dtype(self.runtime.nccl, name, reduce=False)
        shape = tuple(int(extent) for extent in shape)
        rt, nccl, stream = self.runtime, self.runtime.nccl, self._stream()
        with rt.on(self.stream):
            recv = rt.empty(shape, arr.dtype)
        self._count(send)
        nccl.groupStart()
        try:
            self.nccl_comm.recv(rt.pointer(recv), _size(shape) * factor, dtype, source, stream)
            self.nccl_comm.send(rt.pointer(arr), _size(arr.shape) * factor, dtype, dest, stream)
        finally:
            nccl.groupEnd()
        return _NCCLRequest(rt, self.stream, recv, arr, back)

    def allreduce(self, x: Array) -> Array:
        """Return the elementwise sum over ranks (``ncclAllReduce``, ready on return)."""
        arr, name, back = self._input(x)
        dtype, _ = _nccl_dtype(self.runtime.nccl, name, reduce=True)
        rt = self.runtime
        self._count(x)
        with rt.on(self.stream):
            out = rt.empty(tuple(arr.shape), arr.dtype)
            self.nccl_comm.allReduce(
                rt.pointer(arr),
                rt.pointer(out),
                _size(arr.shape),
                dtype,
                rt.nccl.NCCL_SUM,
                self._stream(),
            )
        rt.synchronize(self.stream)
        return back(out)

    def allgather(self, x: Array) -> list[Array]:
        """Return every rank's ``x`` in rank order (leading dims may differ; ready on return).

        The shapes are allgathered first; each rank pads its array to the longest leading
        dimension and one ``ncclAllGather`` moves them all.
        """
        arr, name, back = self._input(x)
        dtype, factor = _nccl_dtype(self.runtime.nccl, name, reduce=False)
        shape = tuple(int(extent) for extent in arr.shape)
        shapes = [tuple(s) for s in self.allgather_object(shape)]
        if any(s[1:] != shape[1:] or len(s) != len(shape) for s in shapes):
            msg = f"allgather: the ranks' arrays differ beyond the first axis: {shapes}"
            raise ValueError(msg)
        self._count(x)
        rt = self.runtime
        with rt.on(self.stream):
            if shape:
                longest = max(s[0] for s in shapes)
                padded = rt.zeros((longest, *shape[1:]), arr.dtype)
                padded[: shape[0]] = arr
            else:
                padded = arr
            out = rt.empty((self.size, *padded.shape), arr.dtype)
            self.nccl_comm.allGather(
                rt.pointer(padded),
                rt.pointer(out),
                _size(padded.shape) * factor,
                dtype,
                self._stream(),
            )
        rt.synchronize(self.stream)
        return [back(out[r, : s[0]] if s else out[r]) for r, s in enumerate(shapes)]

    def bcast(self, x: Array, root: int = 0) -> Array:
        """Return the root's ``x`` (``ncclBroadcast``, ready on return)."""
        root = self._peer("root", root)
        arr, name, back = self._input(x)
        dtype, factor = _nccl_dtype(self.runtime.nccl, name, reduce=False)
        rt = self.runtime
        if self.rank == root:
            self._count(x)
        with rt.on(self.stream):
            # A copy on the root too: the result must not alias the caller's array.
            out = arr.copy() if self.rank == root else rt.empty(tuple(arr.shape), arr.dtype)
            pointer = rt.pointer(out)
            self.nccl_comm.broadcast(
                pointer, pointer, _size(arr.shape) * factor, dtype, root, self._stream()
            )
        rt.synchronize(self.stream)
        return back(out)

    def allgather_object(self, obj: object) -> list[Any]:
        """Return every rank's picklable ``obj`` in rank order.

        Over MPI when the communicator has one; else pickled to uint8, the lengths
        allgathered, padded to the longest and allgathered over NCCL (two small NCCL
        calls, each synchronised).
        """
        if self.mpi_comm is not None:
            return list(self.mpi_comm.allgather(obj))
        rt, nccl, stream = self.runtime, self.runtime.nccl, self._stream()
        payload = np.frombuffer(pickle.dumps(obj), dtype=np.uint8)
        with rt.on(self.stream):
            length = rt.from_host(np.array([payload.size], dtype=np.int64))
            lengths_dev = rt.empty((self.size,), np.int64)
            self.nccl_comm.allGather(
                rt.pointer(length), rt.pointer(lengths_dev), 1, nccl.NCCL_INT64, stream
            )
            rt.synchronize(self.stream)
            lengths = [int(n) for n in rt.to_host(lengths_dev)]
            longest = max(lengths)
            padded = np.zeros(longest, dtype=np.uint8)
            padded[: payload.size] = payload
            send = rt.from_host(padded)
            out = rt.empty((self.size * longest,), np.uint8)
            self.nccl_comm.allGather(
                rt.pointer(send), rt.pointer(out), longest, nccl.NCCL_UINT8, stream
            )
            rt.synchronize(self.stream)
            host = rt.to_host(out)
        return [
            pickle.loads(host[r * longest : r * longest + n].tobytes())
            for r, n in enumerate(lengths)
        ]


def _local_rank(comm: Any) -> int:
    """Return the index of this rank among the ranks of its node (for the default GPU)."""
    split = getattr(comm, "Split_type", None)
    if split is not None:
        from mpi4py import MPI

        node = split(MPI.COMM_TYPE_SHARED)
        try:
            return int(node.Get_rank())
        finally:
            node.Free()
    for name in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "LOCAL_RANK"):
        value = os.environ.get(name)
        if value is not None and value.isdigit():
            return int(value)
    return int(comm.rank)
