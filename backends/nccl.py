"""NCCL communicator over CuPy's binding (``cupy.cuda.nccl``), for ``comm=`` of every loss.

**Experimental: not yet run on a GPU.** Everything here is tested on the CPU against a fake
of CuPy's NCCL binding (see "Verification" below); the GPU tests are written but have not
run on a GPU yet (docs/gpu.md lists what only a GPU can show).

:class:`NCCLComm` moves CuPy arrays and torch CUDA tensors between GPUs with NCCL, with no
host copy. A torch tensor comes in through DLPack (zero copy) and the result goes back
as a torch tensor on the same device; bfloat16 tensors travel as their raw 16-bit
patterns.

Every rank needs a GPU of its own (NCCL refuses two ranks on one device), and the ranks
must agree on an NCCL unique id before they join. Four constructors do both:

- :meth:`NCCLComm.single`: one process, no launcher, no MPI: the id is made locally.
- :meth:`NCCLComm.from_mpi`: under ``mpirun -n W python -m mpi4py script.py``, rank 0
  creates the id and MPI broadcasts it; the small pickled handshake of every loss call
  (``allgather_object``) then goes over MPI.
- :meth:`NCCLComm.from_torch`: under ``torchrun``, without MPI: the id travels through
  torch.distributed's key-value store (the default process group's store, or a
  ``TCPStore`` at ``MASTER_ADDR:MASTER_PORT``).
- :meth:`NCCLComm.from_store`: any store with ``set``, ``get`` and ``add``, e.g.
  ``torch.distributed.FileStore`` on a shared file system.

Each rank uses GPU ``local rank % device count`` unless told otherwise. Before any rank
joins NCCL, the ranks exchange where they are (host name, GPU) over the bootstrap channel
and all raise the same error when one of them could not choose its GPU, or when several
share one GPU (:class:`SharedDeviceError`, a ``ValueError``), instead of failing inside
``ncclCommInitRank``.

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
NCCL matching, and several ranks on several GPUs (not yet run anywhere). The store
bootstrap is tested with real ``torch.distributed`` ``TCPStore`` and ``FileStore`` objects
on the CPU, and :meth:`NCCLComm.single` with ``mpi4py`` made unimportable.

Public surface
--------------
:class:`NCCLComm` is the communicator; :class:`SharedDeviceError` is what its
constructors raise when ranks share a GPU. :class:`Runtime` is the seam between
:class:`NCCLComm` and CuPy (``runtime=``): :class:`CupyRuntime`, the default, is the real
one, and the tests implement it on NumPy arrays (``tests/fake_nccl.py``). Implement it to
drive :class:`NCCLComm` from another CUDA array library with an NCCL binding of the same
interface as ``cupy.cuda.nccl``. Every name with a leading underscore is internal.

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

Under ``torchrun --nproc-per-node 8 script.py``, the same with
``comm = NCCLComm.from_torch()``; in one process, ``comm = NCCLComm.single()``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import socket
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

import array_api_compat
import numpy as np

from portable_siglip.comm import BaseComm, Request

__all__ = ["CupyRuntime", "NCCLComm", "Runtime", "SharedDeviceError"]

#: How to install CuPy, which :class:`NCCLComm` runs on: its wheel for the CUDA major version
#: of the GPU's driver. Every message that asks for CuPy quotes it (this module's, and the
#: command line's for ``--backend cupy`` and ``--comm nccl``).
CUPY_INSTALL = "pip install cupy-cuda12x or cupy-cuda13x, for the CUDA major version of the driver"

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

#: Where the constructors look for this process's rank among the ranks of its node, first
#: match wins (torchrun, Open MPI, MPICH/Hydra, MVAPICH, Slurm).
LOCAL_RANK_VARIABLES = (
    "LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MPI_LOCALRANKID",
    "MV2_COMM_WORLD_LOCAL_RANK",
    "SLURM_LOCALID",
)

#: Prefix of the keys :meth:`NCCLComm.from_store` writes.
STORE_KEY = "portable_siglip/nccl"

#: Seconds :meth:`NCCLComm.from_torch` waits for the other ranks at its store.
STORE_TIMEOUT_S = 300.0

#: Set to 1 on every rank, NCCL 2.30 and later let several ranks share one GPU; the
#: constructors then let them through.
MULTI_RANK_GPU = "NCCL_MULTI_RANK_GPU_ENABLE"


class SharedDeviceError(ValueError):
    """Several ranks of one NCCL communicator chose the same GPU.

    NCCL needs one GPU per rank: ``ncclCommInitRank`` fails ("Duplicate GPU detected")
    when two ranks of a communicator share a device (before NCCL 2.30, or without
    ``NCCL_MULTI_RANK_GPU_ENABLE=1``). The constructors of :class:`NCCLComm` raise this on
    every rank before any of them joins NCCL, unless every rank sharing the GPU set that
    variable to 1.

    Attributes
    ----------
    device : int
        The shared GPU, as the lowest of the ranks that share it numbers it.
    ranks : list of int
        The ranks that share it.
    host : str
        The host they run on.

    Examples
    --------
    What every rank of a job whose ranks 0 and 1 both chose GPU 0 raises (from
    ``NCCLComm.from_mpi()`` and the other constructors, which need GPUs); a ``ValueError``,
    so code that already handles bad arguments catches it:

    >>> from portable_siglip.backends.nccl import SharedDeviceError
    >>> error = SharedDeviceError(0, [0, 1], "node-a")
    >>> isinstance(error, ValueError), error.device, error.ranks, error.host
    (True, 0, [0, 1], 'node-a')
    >>> print(str(error).partition(";")[0])
    2 ranks share GPU 0 (ranks 0, 1 on node-a)
    """

    def __init__(self, device: int, ranks: list[int], host: str) -> None:
        self.device, self.ranks, self.host = device, ranks, host
        listed = ", ".join(str(rank) for rank in ranks)
        super().__init__(
            f"{len(ranks)} ranks share GPU {device} (ranks {listed} on {host}); NCCL needs "
            "one GPU per rank: give each rank its own GPU, or try several ranks on one GPU "
            "with MPIComm, TorchDistComm on gloo or ThreadGroup (NCCL 2.30 and later allow "
            f"it with {MULTI_RANK_GPU}=1 on every rank)"
        )


class Runtime(Protocol):
    """Where :class:`NCCLComm` finds CuPy: the NCCL binding, memory, streams, devices.

    An extension point: :class:`CupyRuntime` is the real one (the default of every
    ``runtime=``); the tests pass a fake that works on NumPy arrays, with a thread-backed
    stand-in for the NCCL binding (``tests/fake_nccl.py``, a complete implementation to
    start from). Another CUDA array library could implement it too, given an NCCL binding
    with the interface of ``cupy.cuda.nccl`` (``NcclCommunicator``, ``get_unique_id``,
    ``groupStart``/``groupEnd`` and the ``NCCL_*`` dtype constants).

    Examples
    --------
    Skipped as a doctest: it needs a GPU, CuPy and libnccl. The runtime is passed to the
    constructors of :class:`NCCLComm`; ``runtime=None`` makes a :class:`CupyRuntime`:

    >>> from portable_siglip.backends.nccl import CupyRuntime, NCCLComm
    >>> runtime = CupyRuntime()  # doctest: +SKIP
    >>> comm = NCCLComm.single(runtime=runtime)  # doctest: +SKIP
    >>> comm.runtime is runtime  # doctest: +SKIP
    True
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

    def device_identity(self, device: int) -> str:
        """Name GPU ``device`` uniquely on this host (PCI bus id), whatever the process sees.

        Two processes with different ``CUDA_VISIBLE_DEVICES`` number one GPU differently;
        this tells whether two ranks' devices are the same GPU.
        """
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
    """The real :class:`Runtime`: CuPy, its NCCL binding and torch through DLPack.

    Raises
    ------
    ImportError
        When CuPy is missing, or its NCCL binding cannot load libnccl.

    Examples
    --------
    Skipped as a doctest: it needs a GPU, CuPy and libnccl.

    >>> from portable_siglip.backends.nccl import CupyRuntime
    >>> runtime = CupyRuntime()  # doctest: +SKIP
    >>> runtime.device_count() >= 1, runtime.nccl.get_version() > 0  # doctest: +SKIP
    (True, True)
    """

    def __init__(self) -> None:
        try:
            import cupy
        except ImportError as error:
            msg = f"NCCLComm runs on CuPy, and it cannot be imported ({error}): {CUPY_INSTALL}"
            raise ImportError(msg) from None
        from cupy.cuda import nccl

        # Without libnccl, cupy.cuda.nccl imports all the same and only sets available to
        # False: every later use would fail with an AttributeError.
        if not getattr(nccl, "available", True):
            msg = (
                "cupy's NCCL binding cannot load libnccl, the NCCL library "
                "(cupy.cuda.nccl.available is False): pip install nvidia-nccl-cu12 or "
                "nvidia-nccl-cu13 to match cupy's CUDA, or put libnccl.so.2 on "
                "LD_LIBRARY_PATH"
            )
            raise ImportError(msg)
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

    def device_identity(self, device: int) -> str:
        """Return the device's PCI bus id (its index where CuPy cannot tell)."""
        try:
            return str(self._cupy.cuda.Device(device).pci_bus_id)
        except Exception:  # an old CuPy, a driver that does not say
            return f"index {device}"

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

    **Experimental: not yet run on a GPU.** It is tested on the CPU against a fake of CuPy's
    NCCL binding (the module docstring says what that covers and docs/gpu.md what only a
    GPU can show); its GPU tests have not run on a GPU yet.

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
    nccl_comm, mpi_comm, stream
        As passed. ``rank``, ``size`` and ``bytes_sent`` (the payload handed to NCCL) are
        those of every :class:`~portable_siglip.comm.BaseComm`.

    Examples
    --------
    Skipped as a doctest: it needs a GPU, CuPy and libnccl. One process, one GPU; under
    ``mpirun`` or ``torchrun``, :meth:`from_mpi` or :meth:`from_torch` instead, each rank
    passing its own shard:

    >>> import cupy as cp  # doctest: +SKIP
    >>> import portable_siglip as ps
    >>> from portable_siglip.backends.nccl import NCCLComm
    >>> comm = NCCLComm.single()  # doctest: +SKIP
    >>> img = cp.eye(3)  # doctest: +SKIP
    >>> loss = ps.sigmoid_loss(img, img, 10.0, -5.0, comm=comm)  # doctest: +SKIP
    >>> print(f"{float(loss):.6f}")  # doctest: +SKIP
    0.020146
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
    def single(
        cls,
        device: int | None = None,
        *,
        stream: Any = None,
        runtime: Runtime | None = None,
    ) -> NCCLComm:
        """Create a one-rank NCCL communicator, with no launcher and no MPI.

        The unique id is made in this process: nothing is imported but CuPy.

        Parameters
        ----------
        device : int, optional
            The GPU; 0 if None.
        stream, runtime : optional
            The CuPy stream and the :class:`Runtime`, as for :class:`NCCLComm`.

        Returns
        -------
        NCCLComm
            Rank 0 of 1.

        Raises
        ------
        ValueError
            If `device` is not a GPU index here.

        Examples
        --------
        Not run as a doctest (it needs a GPU)::

            comm = NCCLComm.single()  # GPU 0
            loss = ps.sigmoid_loss(img, txt, 10.0, -10.0, comm=comm)
        """
        rt: Runtime = CupyRuntime() if runtime is None else runtime
        chosen = _agree_on_devices([_place(rt, 0 if device is None else device, 0)], 0)
        return cls._join(rt, chosen, 0, 1, lambda nccl: nccl.get_unique_id(), stream=stream)

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

        The ranks allgather where they are (host, GPU) and all raise the same error when
        one could not choose its GPU or several share one. Then rank 0 calls
        ``nccl.get_unique_id()``, MPI broadcasts the id (pickled, in whatever form this
        CuPy returns it: ``bytes`` in CuPy >= 14, a tuple of ints before) and every rank
        calls ``NcclCommunicator(size, id, rank)`` on its device.

        Parameters
        ----------
        comm : mpi4py.MPI.Comm, optional
            The ranks; ``MPI.COMM_WORLD`` if None. Kept for ``allgather_object``.
        device : int, optional
            This rank's GPU; the node-local rank modulo the number of GPUs if None.
        stream, runtime : optional
            The CuPy stream and the :class:`Runtime`, as for :class:`NCCLComm`.

        Returns
        -------
        NCCLComm
            Rank ``comm.rank`` of ``comm.size``, its ``mpi_comm`` that communicator.

        Raises
        ------
        SharedDeviceError
            On every rank, when several ranks would share a GPU.
        ValueError
            On every rank, when a rank's `device` is not a GPU index there.

        Examples
        --------
        Not run as a doctest (it needs MPI and GPUs); under
        ``mpirun -n 4 python -m mpi4py script.py`` on a node with 4 GPUs::

            comm = NCCLComm.from_mpi()  # rank r on GPU r
        """
        rt: Runtime = CupyRuntime() if runtime is None else runtime
        if comm is None:
            from mpi4py import MPI

            comm = MPI.COMM_WORLD
        rank, size = int(comm.rank), int(comm.size)
        # Split_type is collective: every rank that passes no device calls it.
        local = _local_rank(comm) if device is None else 0
        placement = _place(rt, device, local)
        chosen = _agree_on_devices(list(comm.allgather(placement)), rank)

        def share_id(nccl: Any) -> Any:  # rank 0's id, broadcast by MPI
            return comm.bcast(nccl.get_unique_id() if rank == 0 else None, root=0)

        return cls._join(rt, chosen, rank, size, share_id, stream=stream, mpi_comm=comm)

    @classmethod
    def from_store(
        cls,
        store: Any,
        rank: int,
        size: int,
        *,
        device: int | None = None,
        local_rank: int | None = None,
        key: str = STORE_KEY,
        stream: Any = None,
        runtime: Runtime | None = None,
    ) -> NCCLComm:
        """Create the NCCL communicator of `size` ranks that share a key-value store.

        No MPI: every rank publishes where it is (host, GPU) in the store and reads the
        others', and all raise the same error when one could not choose its GPU or
        several share one; then rank 0 writes the NCCL unique id and the others read it
        (``store.get`` waits for it, up to the store's timeout).

        Parameters
        ----------
        store : torch.distributed.Store or similar
            Anything with ``set(key, bytes)``, ``get(key) -> bytes`` (waiting until the key
            is set) and ``add(key, int) -> int``, shared by the ranks: a
            ``torch.distributed.TCPStore`` or ``FileStore``, or the default process
            group's store. Kept as the ``store`` attribute (a ``TCPStore`` server lives as
            long as its object).
        rank, size : int
            This rank and the number of ranks.
        device : int, optional
            This rank's GPU; ``local_rank % device_count`` if None.
        local_rank : int, optional
            This rank's index among the ranks of its node; if None, from the launcher's
            environment (``LOCAL_RANK``, ``OMPI_COMM_WORLD_LOCAL_RANK``, ...), else `rank`.
        key : str
            Prefix of the keys written. The ranks count their calls in the store, so
            several communicators can be made through one store, in the same order on
            every rank.
        stream, runtime : optional
            The CuPy stream and the :class:`Runtime`, as for :class:`NCCLComm`.

        Returns
        -------
        NCCLComm
            Rank `rank` of `size`, with `store` kept as its ``store`` attribute.

        Raises
        ------
        SharedDeviceError
            On every rank, when several ranks would share a GPU.
        ValueError
            For a bad `rank` or `size`; on every rank, when a rank's `device` is not a
            GPU index there.

        Examples
        --------
        Not run as a doctest (it needs GPUs); each of 2 processes, on a shared file
        system::

            from torch.distributed import FileStore

            store = FileStore("/shared/job-42.store", 2)
            comm = NCCLComm.from_store(store, rank, 2)
        """
        for name, value in (("rank", rank), ("size", size)):
            if isinstance(value, bool) or not isinstance(value, int):
                msg = f"`{name}` must be an int, got {type(value).__name__} {value!r}"
                raise TypeError(msg)
        if not 0 <= rank < size:
            msg = f"`rank` must be in 0..{size - 1} for `size` {size}, got {rank}"
            raise ValueError(msg)
        rt: Runtime = CupyRuntime() if runtime is None else runtime
        call = int(store.add(f"{key}/calls/{rank}", 1))  # the same count on every rank
        prefix = f"{key}/{call}"
        if local_rank is None:
            found = _local_rank_from(os.environ, None)
            local_rank = rank if found is None else found
        placement = _place(rt, device, local_rank)
        store.set(f"{prefix}/where/{rank}", json.dumps(placement))
        placements = [json.loads(_text(store.get(f"{prefix}/where/{r}"))) for r in range(size)]
        chosen = _agree_on_devices(placements, rank)

        def share_id(nccl: Any) -> Any:  # rank 0 writes its id, the others wait to read it
            if rank == 0:
                unique_id = nccl.get_unique_id()
                store.set(f"{prefix}/id", json.dumps(_encode_id(unique_id)))
                return unique_id
            return _decode_id(json.loads(_text(store.get(f"{prefix}/id"))))

        made = cls._join(rt, chosen, rank, size, share_id, stream=stream)
        made.store = store
        return made

    @classmethod
    def from_torch(
        cls,
        *,
        device: int | None = None,
        stream: Any = None,
        runtime: Runtime | None = None,
        environ: Mapping[str, str] | None = None,
        timeout: float = STORE_TIMEOUT_S,
    ) -> NCCLComm:
        """Create the NCCL communicator of a ``torchrun`` job, through torch.distributed's store.

        With an initialised default process group, its store, rank and size are used.
        Otherwise a ``TCPStore`` is opened at ``MASTER_ADDR:MASTER_PORT`` with ``RANK``
        and ``WORLD_SIZE`` from the environment: as a client of torchrun's own store when
        ``TORCHELASTIC_USE_AGENT_STORE=True`` (what torchrun sets), else hosted by rank 0.
        No process group is initialised and MPI is not used. See :meth:`from_store`.

        Parameters
        ----------
        device : int, optional
            This rank's GPU; ``LOCAL_RANK % device_count`` if None.
        stream, runtime : optional
            The CuPy stream and the :class:`Runtime`, as for :class:`NCCLComm`.
        environ : mapping, optional
            The environment to read; ``os.environ`` if None. When given, the default
            process group is not looked at.
        timeout : float
            Seconds the ranks wait for each other at the store.

        Returns
        -------
        NCCLComm
            This process's rank of the job, with the store kept as its ``store`` attribute.

        Raises
        ------
        ValueError
            When neither a process group nor the four variables are there (the message
            names the missing ones).

        Examples
        --------
        Not run as a doctest (it needs GPUs); under
        ``torchrun --nproc-per-node 8 script.py``::

            comm = NCCLComm.from_torch()  # rank r on GPU LOCAL_RANK
        """
        from datetime import timedelta

        import torch.distributed as dist

        env: Mapping[str, str] = os.environ if environ is None else environ
        key = f"{STORE_KEY}/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        local = _local_rank_from(env, None)
        if environ is None and dist.is_available() and dist.is_initialized():
            store = dist.distributed_c10d._get_default_store()
            rank, size = int(dist.get_rank()), int(dist.get_world_size())
        else:
            names = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")
            missing = [name for name in names if not env.get(name)]
            if missing:
                msg = (
                    f"NCCLComm.from_torch needs an initialised torch.distributed process "
                    f"group, or {', '.join(names)} in the environment (torchrun sets them); "
                    f"missing: {', '.join(missing)}"
                )
                raise ValueError(msg)
            try:
                rank, size = int(env["RANK"]), int(env["WORLD_SIZE"])
                port = int(env["MASTER_PORT"])
            except ValueError:
                msg = (
                    "NCCLComm.from_torch: RANK, WORLD_SIZE and MASTER_PORT must be integers, "
                    f"got {env['RANK']!r}, {env['WORLD_SIZE']!r}, {env['MASTER_PORT']!r}"
                )
                raise ValueError(msg) from None
            agent = env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
            store = dist.TCPStore(  # type: ignore[attr-defined]
                env["MASTER_ADDR"],
                port,
                size,
                is_master=rank == 0 and not agent,
                timeout=timedelta(seconds=timeout),
                wait_for_workers=False,
            )
        return cls.from_store(
            store,
            rank,
            size,
            device=device,
            local_rank=rank if local is None else local,
            key=key,
            stream=stream,
            runtime=runtime,
        )

    @classmethod
    def _join(
        cls,
        rt: Runtime,
        device: int,
        rank: int,
        size: int,
        share_id: Callable[[Any], Any],
        **options: Any,
    ) -> NCCLComm:
        """Make `device` current and join NCCL there as `rank` of `size` (the constructors' end).

        ``share_id(nccl)`` returns the NCCL unique id on every rank: rank 0 makes it with
        ``nccl.get_unique_id()``, and the constructor's bootstrap channel brings it to the
        others. ``options`` go to :class:`NCCLComm` (``stream``, ``mpi_comm``).
        """
        rt.use_device(device)
        nccl = rt.nccl
        made = cls(nccl.NcclCommunicator(size, share_id(nccl), rank), runtime=rt, **options)
        made.device = device
        return made

    device: int | None = None
    """The GPU chosen by a constructor (None when wrapping a communicator)."""

    store: Any = None
    """The store of :meth:`from_store` and :meth:`from_torch` (None otherwise)."""

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
    found = _local_rank_from(os.environ, None)
    return int(comm.rank) if found is None else found


def _local_rank_from(environ: Mapping[str, str], default: int | None) -> int | None:
    """Return the node-local rank a launcher exported, else `default`."""
    for name in LOCAL_RANK_VARIABLES:
        value = environ.get(name, "")
        if value.isdigit():
            return int(value)
    return default


def _place(rt: Runtime, device: int | None, local_rank: int) -> dict[str, Any]:
    """Choose this rank's GPU; return where it is, or why it could not choose (JSON-able).

    Never raises: the ranks exchange what this returns, and decide together.
    """
    try:
        count = int(rt.device_count())
        if device is None:
            device = local_rank % max(count, 1)
        if isinstance(device, bool) or not isinstance(device, int) or not 0 <= device < count:
            msg = f"`device` must be a GPU index in 0..{count - 1}, got {device!r}"
            raise ValueError(msg)
        identity = getattr(rt, "device_identity", None)
        gpu = identity(device) if identity is not None else f"index {device}"
    except Exception as error:  # no driver, a bad index, ...
        return {"error": str(error) or type(error).__name__, "kind": type(error).__name__}
    shared = os.environ.get(MULTI_RANK_GPU, "") == "1"
    return {"host": socket.gethostname(), "gpu": str(gpu), "device": device, "shared": shared}


def _agree_on_devices(placements: list[dict[str, Any]], rank: int) -> int:
    """Return this rank's GPU, or raise what every rank raises alike.

    A rank that could not choose its GPU fails every rank (its own error on it, a
    ``ValueError`` naming it on the others); ranks that share a GPU raise
    :class:`SharedDeviceError` on every rank, unless each of them has set
    ``NCCL_MULTI_RANK_GPU_ENABLE=1`` (NCCL 2.30 and later run several ranks on one GPU then).
    """
    failed = [(r, p) for r, p in enumerate(placements) if "error" in p]
    if failed:
        mine = placements[rank]
        if "error" in mine:
            raise (TypeError if mine["kind"] == "TypeError" else ValueError)(mine["error"])
        first, what = failed[0]
        msg = f"rank {first} could not choose its GPU: {what['error']}"
        raise ValueError(msg)
    sharing: dict[tuple[str, str], list[int]] = {}
    for r, placement in enumerate(placements):
        sharing.setdefault((placement["host"], placement["gpu"]), []).append(r)
    for (host, _), ranks in sharing.items():
        if len(ranks) > 1 and not all(placements[r].get("shared") for r in ranks):
            raise SharedDeviceError(int(placements[ranks[0]]["device"]), ranks, host)
    return int(placements[rank]["device"])


def _text(value: Any) -> str:
    """Return a store's value as text (torch's stores return bytes)."""
    return value.decode() if isinstance(value, bytes | bytearray) else str(value)


def _encode_id(unique_id: Any) -> dict[str, Any]:
    """Encode the NCCL unique id as JSON: ``bytes`` (CuPy >= 14) or ints (CuPy <= 13)."""
    if isinstance(unique_id, bytes | bytearray):
        return {"bytes": bytes(unique_id).hex()}
    return {"ints": [int(value) for value in unique_id]}


def _decode_id(encoded: dict[str, Any]) -> Any:
    """Undo :func:`_encode_id`, giving the id back in the form CuPy made it."""
    if "bytes" in encoded:
        return bytes.fromhex(encoded["bytes"])
    return tuple(int(value) for value in encoded["ints"])
