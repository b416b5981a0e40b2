"""A thread-backed fake of the parts of ``cupy.cuda.nccl`` that NCCLComm uses, on NumPy.

Ranks are threads of one process. "Device pointers" are ``arr.ctypes.data`` of NumPy
arrays, registered by :class:`FakeRuntime.pointer` in a :class:`Memory` and resolved by
the fake NCCL operations, which read and write the arrays' bytes. What matters of NCCL's
semantics is kept:

- operations between ``groupStart()`` and ``groupEnd()`` are posted and complete at the
  outermost ``groupEnd()`` (sends first, then receives, as a fused group does);
- point-to-point messages of a pair of ranks match in posting order, with no tags; the
  count and dtype of a receive must equal those of its send (else ``FakeNcclError``);
- a send or receive outside a group is its own group, and still matches a peer that
  posts in a group; a send to oneself needs the matching receive in the same group
  (``ncclInvalidUsage`` otherwise);
- collectives need every rank, with the same kind, count, dtype and root;
- every wait ends with ``TimeoutError`` instead of hanging, and a failing rank wakes the
  others with ``RankFailedError``.

The NCCL work is executed synchronously (as if each stream were drained at once), which
is what a GPU's stream order makes of it.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from portable_siglip.comm import RankFailedError

NCCL_INT8, NCCL_UINT8, NCCL_INT32, NCCL_UINT32, NCCL_INT64, NCCL_UINT64 = 0, 1, 2, 3, 4, 5
NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64, NCCL_BFLOAT16 = 6, 7, 8, 9
NCCL_SUM = 0
_NUMPY = {
    NCCL_INT8: np.int8,
    NCCL_UINT8: np.uint8,
    NCCL_INT32: np.int32,
    NCCL_UINT32: np.uint32,
    NCCL_INT64: np.int64,
    NCCL_UINT64: np.uint64,
    NCCL_FLOAT16: np.float16,
    NCCL_FLOAT32: np.float32,
    NCCL_FLOAT64: np.float64,
}
try:  # bfloat16 NumPy arrays (ml_dtypes comes with jax); the bfloat16 tests skip without
    import ml_dtypes

    _NUMPY[NCCL_BFLOAT16] = ml_dtypes.bfloat16
except ImportError:  # pragma: no cover
    pass


class FakeNcclError(RuntimeError):
    """What the real binding raises as ``NcclError`` (invalid usage, mismatches)."""


class Memory:
    """Pointer -> NumPy array registry: the fake's device memory."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._arrays: dict[int, np.ndarray] = {}

    def register(self, arr: np.ndarray) -> int:
        if not arr.flags.c_contiguous:
            msg = "fake device memory: a non-contiguous array has no flat pointer"
            raise ValueError(msg)
        pointer = int(arr.ctypes.data)
        with self._lock:
            self._arrays[pointer] = arr
        return pointer

    def view(self, pointer: int, count: int, dtype: int) -> np.ndarray:
        """``count`` elements of NCCL ``dtype`` at ``pointer``, as a writable view."""
        itemsize = np.dtype(_NUMPY[dtype]).itemsize
        if count == 0:
            return np.empty(0, dtype=_NUMPY[dtype])
        with self._lock:
            arr = self._arrays.get(pointer)
        if arr is None:
            msg = f"illegal memory access: pointer {pointer:#x} was never handed out"
            raise FakeNcclError(msg)
        raw = arr.reshape(-1).view(np.uint8)
        if raw.size < count * itemsize:
            msg = f"illegal memory access: {count * itemsize} bytes at a {raw.size}-byte array"
            raise FakeNcclError(msg)
        return raw[: count * itemsize].view(_NUMPY[dtype])


class World:
    """The shared state of one fake NCCL communicator of ``size`` ranks."""

    def __init__(self, size: int, nccl: FakeNccl, timeout: float) -> None:
        self.size = size
        self.nccl = nccl
        self.memory = nccl.memory
        self.timeout = timeout
        self.cond = threading.Condition()
        self.joined: set[int] = set()
        self.mail: dict[tuple[int, int], deque[tuple[int, int, np.ndarray]]] = {}
        self.slots: dict[int, dict[int, tuple[Any, ...]]] = {}
        self.readers: dict[int, int] = {}

    def wait_for(self, ready: Callable[[], bool], rank: int, what: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not ready():
            failure = self.nccl.failure
            if failure is not None:
                msg = f"rank {rank} gave up waiting for {what}: rank {failure[0]} failed"
                raise RankFailedError(msg)
            left = deadline - time.monotonic()
            if left <= 0:
                msg = f"fake NCCL: rank {rank} waited {self.timeout:g} s for {what}"
                raise TimeoutError(msg)
            self.cond.wait(min(left, 0.2))


class FakeNccl:
    """Stands in for the ``cupy.cuda.nccl`` module.

    Parameters
    ----------
    id_form : {"bytes", "tuple"}
        What ``get_unique_id()`` returns and ``NcclCommunicator`` accepts: ``bytes`` as in
        CuPy >= 14, a tuple of 128 ints as in CuPy <= 13.
    bfloat16 : bool
        Whether the binding has ``NCCL_BFLOAT16``.
    timeout : float
        Seconds any wait lasts before ``TimeoutError``.
    """

    NCCL_INT8, NCCL_UINT8, NCCL_INT32, NCCL_INT64 = NCCL_INT8, NCCL_UINT8, NCCL_INT32, NCCL_INT64
    NCCL_UINT32, NCCL_UINT64 = NCCL_UINT32, NCCL_UINT64
    NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64 = NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64
    NCCL_SUM = NCCL_SUM
    NcclError = FakeNcclError

    def __init__(self, *, id_form: str = "bytes", bfloat16: bool = True, timeout: float = 10.0):
        self.id_form = id_form
        if bfloat16:
            self.NCCL_BFLOAT16 = NCCL_BFLOAT16
        self.timeout = timeout
        self.memory = Memory()
        self._worlds: dict[Any, World] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._local = threading.local()
        self.unique_ids_made = 0
        self.failure: tuple[int, BaseException] | None = None

    def fail(self, rank: int, error: BaseException) -> None:
        """Record a failed rank and wake every waiter (of every communicator)."""
        with self._lock:
            if self.failure is None:
                self.failure = (rank, error)
            worlds = list(self._worlds.values())
        for world in worlds:
            with world.cond:
                world.cond.notify_all()

    # --- module functions ---

    def get_unique_id(self) -> Any:
        self.unique_ids_made += 1
        raw = next(self._ids).to_bytes(8, "little") + bytes(120)
        if self.id_form == "bytes":
            return raw
        return tuple(int(b) - 256 if b > 127 else int(b) for b in raw)  # signed chars

    def _key(self, comm_id: Any) -> Any:
        want = bytes if self.id_form == "bytes" else tuple
        if not isinstance(comm_id, want):
            msg = f"commId must be {want.__name__} in this CuPy, got {type(comm_id).__name__}"
            raise TypeError(msg)
        if len(comm_id) != 128:
            msg = f"commId length {len(comm_id)} != 128."
            raise ValueError(msg)
        return comm_id

    def world(self, comm_id: Any, size: int) -> World:
        with self._lock:
            key = self._key(comm_id)
            world = self._worlds.get(key)
            if world is None:
                world = self._worlds[key] = World(size, self, self.timeout)
        if world.size != size:
            msg = f"ncclInvalidArgument: ndev {size} != {world.size} of the other ranks"
            raise FakeNcclError(msg)
        return world

    def _group(self) -> list[tuple[str, Any, Callable[[], Any]]] | None:
        return getattr(self._local, "pending", None)

    def groupStart(self) -> None:  # noqa: N802 - the binding's name
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            self._local.pending = []
        self._local.depth = depth + 1

    def groupEnd(self) -> None:  # noqa: N802 - the binding's name
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            msg = "ncclInvalidUsage: groupEnd without groupStart"
            raise FakeNcclError(msg)
        self._local.depth = depth - 1
        if depth == 1:
            pending, self._local.pending = self._local.pending, None
            _run_group(pending)

    def NcclCommunicator(self, ndev: int, comm_id: Any, rank: int) -> FakeCommunicator:  # noqa: N802
        return FakeCommunicator(self, ndev, comm_id, rank)


def _run_group(pending: list[tuple[str, Any, Callable[[], Any]]]) -> None:
    """Complete a group: every send is deposited, then every receive is matched."""
    sends = [entry for entry in pending if entry[0] == "send"]
    recvs = [entry for entry in pending if entry[0] == "recv"]
    for _, _, action in sends:
        action()
    for _, _, action in recvs:
        action()
    for _, check, _ in sends:
        check()


class FakeCommunicator:
    """Stands in for ``cupy.cuda.nccl.NcclCommunicator``; joining waits for every rank."""

    def __init__(self, nccl: FakeNccl, ndev: int, comm_id: Any, rank: int) -> None:
        if not 0 <= rank < ndev:
            msg = f"ncclInvalidArgument: rank {rank} of {ndev}"
            raise FakeNcclError(msg)
        self._nccl = nccl
        self._world = nccl.world(comm_id, ndev)
        self._rank = rank
        self._collectives = 0
        self.comm_id = comm_id
        world = self._world
        with world.cond:
            if rank in world.joined:
                msg = f"ncclInvalidUsage: rank {rank} joined twice"
                raise FakeNcclError(msg)
            world.joined.add(rank)
            world.cond.notify_all()
            world.wait_for(lambda: len(world.joined) == ndev, rank, "every rank to join")

    def rank_id(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._world.size

    def _peer(self, peer: int) -> int:
        if not 0 <= peer < self._world.size:
            msg = f"ncclInvalidArgument: peer {peer} of {self._world.size}"
            raise FakeNcclError(msg)
        return peer

    # --- point to point ---

    def send(self, ptr: int, count: int, dtype: int, peer: int, stream: int) -> None:
        peer = self._peer(peer)
        world, rank = self._world, self._rank
        key = (rank, peer)
        payload = world.memory.view(ptr, count, dtype).copy()

        def deposit() -> None:
            with world.cond:
                world.mail.setdefault(key, deque()).append((count, dtype, payload))
                world.cond.notify_all()

        def check() -> None:
            if peer == rank and world.mail.get(key):
                msg = "ncclInvalidUsage: a send to self without the matching recv in its group"
                raise FakeNcclError(msg)

        group = self._nccl._group()
        if group is not None:
            group.append(("send", check, deposit))
            return
        if peer == rank:
            msg = "ncclInvalidUsage: a send to self outside a group would never complete"
            raise FakeNcclError(msg)
        deposit()

    def recv(self, ptr: int, count: int, dtype: int, peer: int, stream: int) -> None:
        peer = self._peer(peer)
        world, rank = self._world, self._rank
        key = (peer, rank)
        target = world.memory.view(ptr, count, dtype)

        def take() -> None:
            with world.cond:
                if peer == rank and not world.mail.get(key):
                    msg = "ncclInvalidUsage: a recv from self without a send in its group"
                    raise FakeNcclError(msg)
                world.wait_for(lambda: bool(world.mail.get(key)), rank, f"a send from {peer}")
                sent_count, sent_dtype, payload = world.mail[key].popleft()
            if (sent_count, sent_dtype) != (count, dtype):
                msg = (
                    f"ncclInvalidUsage: rank {rank} receives {count} x dtype {dtype} from "
                    f"rank {peer}, which sent {sent_count} x dtype {sent_dtype}"
                )
                raise FakeNcclError(msg)
            target[...] = payload

        group = self._nccl._group()
        if group is not None:
            group.append(("recv", None, take))
        else:
            take()

    # --- collectives ---

    def _collective(self, entry: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        if self._nccl._group() is not None:
            msg = "fake NCCL: collectives inside a group are not modelled"
            raise NotImplementedError(msg)
        world, rank = self._world, self._rank
        index = self._collectives
        self._collectives += 1
        with world.cond:
            slot = world.slots.setdefault(index, {})
            slot[rank] = entry
            world.cond.notify_all()
            world.wait_for(lambda: len(slot) == world.size, rank, f"collective #{index}")
            entries = [slot[r] for r in range(world.size)]
            world.readers[index] = world.readers.get(index, 0) + 1
            if world.readers[index] == world.size:
                del world.slots[index], world.readers[index]
        signatures = {item[:-1] for item in entries}
        if len(signatures) > 1:
            msg = f"fake NCCL: collective #{index} mismatch between ranks: {sorted(signatures)}"
            raise FakeNcclError(msg)
        return entries

    def allReduce(  # noqa: N802
        self, sendptr: int, recvptr: int, count: int, dtype: int, op: int, stream: int
    ) -> None:
        memory = self._world.memory
        mine = memory.view(sendptr, count, dtype).copy()
        entries = self._collective(("allReduce", count, dtype, op, mine))
        total = entries[0][-1].copy()
        for entry in entries[1:]:
            total = total + entry[-1]
        memory.view(recvptr, count, dtype)[...] = total

    def allGather(self, sendptr: int, recvptr: int, count: int, dtype: int, stream: int) -> None:  # noqa: N802
        memory = self._world.memory
        mine = memory.view(sendptr, count, dtype).copy()
        entries = self._collective(("allGather", count, dtype, mine))
        out = memory.view(recvptr, count * self._world.size, dtype)
        for r, entry in enumerate(entries):
            out[r * count : (r + 1) * count] = entry[-1]

    def broadcast(
        self, sendptr: int, recvptr: int, count: int, dtype: int, root: int, stream: int
    ) -> None:
        root = self._peer(root)
        memory = self._world.memory
        mine = memory.view(sendptr, count, dtype).copy() if self._rank == root else None
        entries = self._collective(("broadcast", count, dtype, root, mine))
        memory.view(recvptr, count, dtype)[...] = entries[root][-1]

    def bcast(self, ptr: int, count: int, dtype: int, root: int, stream: int) -> None:
        self.broadcast(ptr, ptr, count, dtype, root, stream)


class FakeRuntime:
    """A :class:`portable_siglip.backends.nccl.Runtime` over NumPy and :class:`FakeNccl`."""

    def __init__(self, nccl: FakeNccl, *, devices: int = 4) -> None:
        self.nccl = nccl
        self.devices = devices
        self.used_devices: dict[str, int] = {}
        self.synchronized = 0
        self._lock = threading.Lock()

    def device_count(self) -> int:
        return self.devices

    def use_device(self, device: int) -> None:
        with self._lock:
            self.used_devices[threading.current_thread().name] = device

    def device_identity(self, device: int) -> str:
        return f"0000:{device + 1:02x}:00.0"  # a PCI bus id per device, as CuPy gives it

    def as_device_array(self, x: Any, stream: Any) -> tuple[Any, str, Callable[[Any], Any]]:
        if not isinstance(x, np.ndarray):
            msg = f"fake runtime: NumPy arrays stand for device arrays, got {type(x).__name__}"
            raise TypeError(msg)
        return x, x.dtype.name, lambda out: out

    def empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        # Garbage (NaN for floats), so a byte NCCL failed to write shows.
        out = np.empty(shape, dtype=dtype)
        out.reshape(-1).view(np.uint8)[...] = 0xFF
        return out

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return np.zeros(shape, dtype=dtype)

    def from_host(self, host: np.ndarray) -> np.ndarray:
        return np.array(host, copy=True)

    def to_host(self, x: np.ndarray) -> np.ndarray:
        return np.array(x, copy=True)

    def pointer(self, x: np.ndarray) -> int:
        return self.nccl.memory.register(x)

    def stream_pointer(self, stream: Any) -> int:
        return 0 if stream is None else id(stream)

    def synchronize(self, stream: Any) -> None:
        with self._lock:
            self.synchronized += 1

    def on(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()


def run_ranks(size: int, fn: Callable[[int], Any], nccl: FakeNccl) -> list[Any]:
    """Call ``fn(rank)`` on ``size`` threads; return the results in rank order.

    A failing rank fails ``nccl`` so the others stop waiting; the first error (not a
    resulting ``RankFailedError``) is raised.
    """
    results: list[Any] = [None] * size
    errors: list[BaseException | None] = [None] * size
    first: list[BaseException] = []
    lock = threading.Lock()

    def target(rank: int) -> None:
        try:
            results[rank] = fn(rank)
        except BaseException as error:
            errors[rank] = error
            with lock:
                if not first and not isinstance(error, RankFailedError):
                    first.append(error)
            nccl.fail(rank, error)

    threads = [
        threading.Thread(target=target, args=(r,), name=f"fake-rank-{r}") for r in range(size)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if first:
        raise first[0]
    for error in errors:
        if error is not None:
            raise error
    return results
