"""Communicators: how the ranks of a distributed loss talk to each other.

A communicator joins W ranks that each hold a shard of the global batch. The losses need
only six operations from it (the :class:`Communicator` protocol): a paired exchange with
two peers (non-blocking, plus its blocking form), ``allreduce`` (sum), ``allgather``,
``bcast`` and ``allgather_object`` for the small handshake that precedes every call.

This module holds the transports that need no external library:

- :class:`SelfComm`, one process (W = 1), which exercises the distributed code path;
- :class:`ThreadGroup`, which runs W ranks as threads of one process; for tests and for
  trying strategies without MPI. A rank that raises makes every other rank's pending
  operation raise :class:`RankFailedError` instead of waiting forever.

:class:`portable_siglip.backends.mpi.MPIComm` (mpi4py) lives with the backends; a new
transport (NCCL, gloo, ...) implements the same protocol, usually by subclassing
:class:`BaseComm`, and is accepted by every loss through ``comm=``.

Public surface
--------------
Users pass :class:`SelfComm`, the :class:`ThreadComm` ranks of a :class:`ThreadGroup`, or a
communicator of the backends, and catch :class:`RankFailedError`. The extension points,
for a transport of your own (docs/distributed.md, "Adding a transport"), are
:class:`Communicator` (what ``comm=`` accepts), :class:`Request` (what ``isendrecv``
returns) and :class:`BaseComm` (the base class that supplies ``bytes_sent``, ``sendrecv``
and ``repr``). Every name with a leading underscore is internal.

Examples
--------
>>> import numpy as np
>>> import portable_siglip as ps
>>> from portable_siglip.comm import ThreadGroup
>>> rng = np.random.default_rng(0)
>>> img, txt = rng.standard_normal((7, 4)), rng.standard_normal((7, 4))
>>> shards = [slice(0, 3), slice(3, 7)]  # uneven shards are fine
>>> losses = ThreadGroup(2).run(
...     lambda comm: ps.sigmoid_loss(img[shards[comm.rank]], txt[shards[comm.rank]],
...                                  10.0, -10.0, comm=comm)
... )
>>> bool(np.isclose(losses[0], ps.sigmoid_loss(img, txt, 10.0, -10.0)))
True
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, runtime_checkable

import array_api_compat

from ._typing import Array

__all__ = [
    "BaseComm",
    "Communicator",
    "RankFailedError",
    "Request",
    "SelfComm",
    "ThreadComm",
    "ThreadGroup",
]

_T = TypeVar("_T")


class RankFailedError(RuntimeError):
    """Another rank of the group failed, so this rank's pending operation cannot finish.

    Raised by the pending exchange or collective of every other rank of a
    :class:`ThreadGroup` as soon as one rank raises, naming that rank and its error, so
    no rank waits for the timeout. :meth:`ThreadGroup.run` then re-raises the first
    error, not the resulting ``RankFailedError`` s.

    Examples
    --------
    >>> from portable_siglip.comm import RankFailedError, ThreadGroup
    >>> seen = []
    >>> def rank_main(comm):
    ...     if comm.rank == 1:
    ...         raise KeyError("rank 1 lost its data")
    ...     try:
    ...         comm.allgather_object("ready")  # waits for rank 1, which has failed
    ...     except RankFailedError as error:
    ...         seen.append(str(error))
    ...         raise
    >>> try:
    ...     ThreadGroup(2).run(rank_main)
    ... except KeyError as error:
    ...     print("run() raised", repr(error))
    run() raised KeyError('rank 1 lost its data')
    >>> waited, _, why = seen[0].partition(": ")  # what rank 0's RankFailedError says
    >>> print(waited)
    rank 0 gave up waiting for the other ranks' allgather_object
    >>> print(why)
    rank 1 failed with KeyError('rank 1 lost its data')
    """


@runtime_checkable
class Request(Protocol):
    """A posted non-blocking exchange; ``wait()`` completes it and returns what arrived.

    :meth:`Communicator.isendrecv` returns one; a transport's own request class needs
    only ``wait()``, called once (the losses wait for every request they post).

    Examples
    --------
    Rank r sends its number to rank r + 1 and receives from rank r - 1, round a ring of
    three; both exchanges are posted before either is waited for:

    >>> import numpy as np
    >>> from portable_siglip.comm import Request, ThreadGroup
    >>> def rank_main(comm):
    ...     right, left = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
    ...     request = comm.isendrecv(np.array([comm.rank]), right, left, (1,))
    ...     assert isinstance(request, Request)
    ...     return int(request.wait()[0])
    >>> ThreadGroup(3).run(rank_main)
    [2, 0, 1]
    """

    def wait(self) -> Array:
        """Block until both the send and the receive are complete; return the received array."""
        ...


@runtime_checkable
class Communicator(Protocol):
    """What a loss needs from a transport. Ranks are numbered ``0 .. size - 1``.

    Every method is collective or paired: all ranks call the same methods in the same
    order (the losses guarantee it). Arrays go in and come out in the namespace, device
    and dtype of the array passed in.

    The type of every loss's ``comm=``. The protocol is structural and runtime checkable:
    any object with these members is accepted, whatever its class; subclassing
    :class:`BaseComm` is the short way to write one (its example is a complete transport).

    Examples
    --------
    >>> from portable_siglip.comm import Communicator, SelfComm, ThreadGroup
    >>> isinstance(SelfComm(), Communicator)
    True
    >>> ThreadGroup(2).run(lambda comm: isinstance(comm, Communicator))
    [True, True]
    >>> isinstance(object(), Communicator)
    False
    """

    @property
    def rank(self) -> int:
        """Index of this rank."""
        ...

    @property
    def size(self) -> int:
        """The number of ranks W."""
        ...

    bytes_sent: int
    """Payload bytes this rank has handed to the transport so far (for reports)."""

    def isendrecv(
        self, send: Array, dest: int, source: int, shape: tuple[int, ...], *, tag: int = 0
    ) -> Request:
        """Post sending ``send`` to ``dest`` and receiving an array of ``shape`` from ``source``.

        The received array has the dtype of ``send``; ``dest``/``source`` may be any rank,
        including this one. Several exchanges may be outstanding at once; ``tag`` keeps
        concurrent exchanges with the same peer apart.
        """
        ...

    def sendrecv(
        self, send: Array, dest: int, source: int, shape: tuple[int, ...], *, tag: int = 0
    ) -> Array:
        """Blocking form of :meth:`isendrecv`."""
        ...

    def allreduce(self, x: Array) -> Array:
        """Return the elementwise sum of ``x`` over all ranks (same shape everywhere)."""
        ...

    def allgather(self, x: Array) -> list[Array]:
        """Return every rank's ``x`` in rank order; the leading dimension may differ."""
        ...

    def bcast(self, x: Array, root: int = 0) -> Array:
        """Return the root's ``x``; other ranks pass an array of the same shape and dtype."""
        ...

    def allgather_object(self, obj: object) -> list[Any]:
        """Return every rank's picklable ``obj`` in rank order (small metadata only)."""
        ...


class BaseComm:
    """Convenience base for transports: a byte counter and ``sendrecv`` from ``isendrecv``.

    Subclasses set ``rank`` and ``size`` and implement ``isendrecv``, ``allreduce``,
    ``allgather``, ``bcast`` and ``allgather_object`` (the semantics are those of
    :class:`Communicator`; docs/distributed.md, "Adding a transport", has them in full).
    They call ``self._count(array)`` for every payload they hand to the transport, which
    adds its bytes to ``bytes_sent``. The built-in transports (:class:`SelfComm`,
    :class:`ThreadComm`, ``MPIComm``, ``NCCLComm``, ``TorchDistComm``, ``AxisComm``) are
    all subclasses.

    Attributes
    ----------
    rank, size : int
        This rank, in ``0 .. size - 1``, and the number of ranks W.
    bytes_sent : int
        Payload bytes this rank has handed to the transport so far (for reports).

    Examples
    --------
    A complete transport for one process, whose every message comes back to rank 0:

    >>> import numpy as np
    >>> import portable_siglip as ps
    >>> from portable_siglip.comm import BaseComm
    >>> class Ready:
    ...     def __init__(self, value):
    ...         self.value = value
    ...     def wait(self):
    ...         return self.value
    >>> class Loopback(BaseComm):
    ...     rank, size = 0, 1
    ...     def isendrecv(self, send, dest, source, shape, *, tag=0):
    ...         self._count(send)
    ...         return Ready(send.copy())
    ...     def allreduce(self, x):
    ...         self._count(x)
    ...         return x.copy()
    ...     def allgather(self, x):
    ...         self._count(x)
    ...         return [x.copy()]
    ...     def bcast(self, x, root=0):
    ...         self._count(x)
    ...         return x.copy()
    ...     def allgather_object(self, obj):
    ...         return [obj]
    >>> comm = Loopback()
    >>> comm
    Loopback(rank=0, size=1)
    >>> comm.sendrecv(np.arange(3.0), 0, 0, (3,))  # BaseComm's: isendrecv(...).wait()
    array([0., 1., 2.])
    >>> comm.bytes_sent  # three float64 values
    24
    >>> img = np.eye(3)
    >>> print(f"{float(ps.sigmoid_loss(img, img, 10.0, -5.0, comm=comm)):.6f}")
    0.020146
    """

    rank: int
    size: int

    def __init__(self) -> None:
        self.bytes_sent = 0

    def _count(self, x: Array) -> None:
        self.bytes_sent += _nbytes(x)

    def isendrecv(
        self, send: Array, dest: int, source: int, shape: tuple[int, ...], *, tag: int = 0
    ) -> Request:
        """Post a paired exchange; see :meth:`Communicator.isendrecv`."""
        raise NotImplementedError

    def sendrecv(
        self, send: Array, dest: int, source: int, shape: tuple[int, ...], *, tag: int = 0
    ) -> Array:
        """Blocking paired exchange; see :meth:`Communicator.sendrecv`."""
        return self.isendrecv(send, dest, source, shape, tag=tag).wait()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


def _nbytes(x: Array) -> int:
    count = 1
    for extent in x.shape:
        count *= int(extent)
    itemsize = getattr(x.dtype, "itemsize", None)  # numpy, cupy, jax
    if itemsize is None:  # torch and array_api_strict dtypes: ask the namespace
        xp = array_api_compat.array_namespace(x)
        info = xp.finfo if xp.isdtype(x.dtype, "real floating") else xp.iinfo
        itemsize = info(x.dtype).bits // 8
    return count * int(itemsize)


def _copy(x: Array) -> Array:
    # A private copy, so a sender that later mutates its buffer cannot change what arrived.
    # A message is data, as over MPI: a torch tensor arrives without its autograd history
    # (and torch.asarray of a tensor that requires grad warns).
    if array_api_compat.is_torch_array(x):
        return x.detach().clone()
    return array_api_compat.array_namespace(x).asarray(x, copy=True)


def _check_shape(received: Array, shape: tuple[int, ...], source: int, tag: int) -> Array:
    if tuple(received.shape) != tuple(shape):
        msg = (
            f"exchange with rank {source} (tag {tag}) expected shape {tuple(shape)}, "
            f"received {tuple(received.shape)}; the ranks disagree on the schedule"
        )
        raise ValueError(msg)
    return received


class _Done:
    """A request whose result is already known."""

    def __init__(self, value: Array) -> None:
        self._value = value

    def wait(self) -> Array:
        return self._value


class SelfComm(BaseComm):
    """The one-process communicator (W = 1): exchanges with rank 0 loop back.

    Passing ``comm=SelfComm()`` runs the distributed code path on one process; the result
    equals ``comm=None``.

    Examples
    --------
    >>> import numpy as np
    >>> comm = SelfComm()
    >>> comm.rank, comm.size
    (0, 1)
    >>> comm.allreduce(np.ones(2))
    array([1., 1.])
    """

    rank = 0
    size = 1

    def _peer(self, name: str, value: int) -> None:
        if value != 0:
            msg = f"`{name}` must be 0 on a one-process communicator, got {value!r}"
            raise ValueError(msg)

    def isendrecv(
        self, send: Array, dest: int, source: int, shape: tuple[int, ...], *, tag: int = 0
    ) -> Request:
        """Loop ``send`` back to this rank."""
        self._peer("dest", dest)
        self._peer("source", source)
        self._count(send)
        return _Done(_check_shape(_copy(send), shape, source, tag))

    def allreduce(self, x: Array) -> Array:
        """Return a copy of ``x``."""
        self._count(x)
        return _copy(x)

    def allgather(self, x: Array) -> list[Array]:
        """Return ``[copy of x]``."""
        self._count(x)
        return [_copy(x)]

    def bcast(self, x: Array, root: int = 0) -> Array:
        """Return a copy of ``x``."""
        self._peer("root", root)
        self._count(x)
        return _copy(x)

    def allgather_object(self, obj: object) -> list[Any]:
        """Return ``[obj]``."""
        return [obj]


class _Hub:
    """State shared by the ranks of one :class:`ThreadGroup` run."""

    def __init__(self, size: int, timeout: float) -> None:
        self.size = size
        self.timeout = timeout
        self.cond = threading.Condition()
        self.mail: dict[tuple[int, int, int], deque[Array]] = {}
        self.slots: dict[int, dict[int, tuple[str, Any]]] = {}
        self.readers: dict[int, int] = {}
        self.failure: tuple[int, BaseException] | None = None

    def fail(self, rank: int, error: BaseException) -> None:
        with self.cond:
            if self.failure is None:
                self.failure = (rank, error)
            self.cond.notify_all()

    def wait_for(self, ready: Callable[[], bool], rank: int, what: str) -> None:
        """Wait (holding ``cond``) until ``ready()``; raise if a rank failed or on timeout."""
        deadline = time.monotonic() + self.timeout
        while not ready():
            if self.failure is not None:
                failed, error = self.failure
                msg = f"rank {rank} gave up waiting for {what}: rank {failed} failed with {error!r}"
                raise RankFailedError(msg)
            left = deadline - time.monotonic()
            if left <= 0:
                msg = (
                    f"rank {rank} waited {self.timeout:g} s for {what}; a rank is missing "
                    "or the ranks called different operations"
                )
                raise TimeoutError(msg)
            self.cond.wait(min(left, 0.5))


class _ThreadRequest:
    def __init__(self, comm: ThreadComm, source: int, shape: tuple[int, ...], tag: int) -> None:
        self._comm = comm
        self._source = source
        self._shape = shape
        self._tag = tag

    def wait(self) -> Array:
        hub, rank = self._comm._hub, self._comm.rank
        key = (self._source, rank, self._tag)
        with hub.cond:
            hub.wait_for(
                lambda: bool(hub.mail.get(key)), rank, f"a message from rank {self._source}"
            )
            received = hub.mail[key].popleft()
        return _check_shape(received, self._shape, self._source, self._tag)


class ThreadComm(BaseComm):
    """One rank of a :class:`ThreadGroup`; created by :meth:`ThreadGroup.run`.

    Not constructed directly: :meth:`ThreadGroup.run` hands one to each rank's function.
    Its operations are those of :class:`Communicator`; each waits at most the group's
    ``timeout`` for its peers, and raises :class:`RankFailedError` at once when another
    rank has failed. ``allreduce`` adds in rank order, so every rank gets the same bits.

    Examples
    --------
    >>> import numpy as np
    >>> from portable_siglip.comm import ThreadGroup
    >>> def rank_main(comm):
    ...     total = comm.allreduce(np.array([comm.rank + 1.0]))
    ...     return repr(comm), float(total[0])
    >>> ThreadGroup(2).run(rank_main)
    [('ThreadComm(rank=0, size=2)', 3.0), ('ThreadComm(rank=1, size=2)', 3.0)]
    """

    def __init__(self, hub: _Hub, rank: int) -> None:
        super().__init__()
        self._hub = hub
        self.rank = rank
        self.size = hub.size
        self._collectives = 0

    def _peer(self, name: str, value: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.size:
            msg = f"`{name}` must be a rank in 0..{self.size - 1}, got {value!r}"
            raise ValueError(msg)
        return value

    def isendrecv(
        self, send: Array, dest: int, source: int, shape: tuple[int, ...], *, tag: int = 0
    ) -> Request:
        """Post ``send`` to ``dest``'s mailbox; ``wait()`` takes the message from ``source``."""
        dest, source = self._peer("dest", dest), self._peer("source", source)
        hub = self._hub
        message = _copy(send)
        self._count(send)
        with hub.cond:
            hub.mail.setdefault((self.rank, dest, tag), deque()).append(message)
            hub.cond.notify_all()
        return _ThreadRequest(self, source, tuple(shape), tag)

    def _collective(self, kind: str, value: Any) -> list[Any]:
        """Deposit ``value`` for this rank's next collective; return everyone's, in rank order."""
        hub = self._hub
        index = self._collectives
        self._collectives += 1
        with hub.cond:
            slot = hub.slots.setdefault(index, {})
            slot[self.rank] = (kind, value)
            hub.cond.notify_all()
            hub.wait_for(lambda: len(slot) == hub.size, self.rank, f"the other ranks' {kind}")
            kinds = {entry[0] for entry in slot.values()}
            values = [slot[r][1] for r in range(hub.size)]
            hub.readers[index] = hub.readers.get(index, 0) + 1
            if hub.readers[index] == hub.size:
                del hub.slots[index], hub.readers[index]
        if len(kinds) > 1:
            msg = f"collective #{index}: the ranks called different operations {sorted(kinds)}"
            raise RuntimeError(msg)
        return values

    def allreduce(self, x: Array) -> Array:
        """Return the sum over ranks, added in rank order so every rank gets the same bits."""
        self._count(x)
        values = self._collective("allreduce", x)
        total = _copy(values[0])
        for value in values[1:]:
            total = total + value
        return total

    def allgather(self, x: Array) -> list[Array]:
        """Return copies of every rank's ``x``, in rank order."""
        self._count(x)
        return [_copy(value) for value in self._collective("allgather", x)]

    def bcast(self, x: Array, root: int = 0) -> Array:
        """Return a copy of the root's ``x``."""
        root = self._peer("root", root)
        if self.rank == root:
            self._count(x)
        values = self._collective(f"bcast from {root}", x)
        return _copy(values[root])

    def allgather_object(self, obj: object) -> list[Any]:
        """Return every rank's ``obj``, in rank order."""
        return self._collective("allgather_object", obj)


class ThreadGroup:
    """Run W ranks as threads of this process, each with its own :class:`ThreadComm`.

    For tests and for trying strategies without MPI. NumPy and torch release the GIL
    inside matrix products, so the ranks do run in parallel.

    Parameters
    ----------
    size : int
        The number of ranks W >= 1.
    timeout : float, optional
        Seconds any rank waits for a message or a collective before raising
        ``TimeoutError``; a rank that raises wakes the others at once with
        :class:`RankFailedError`.

    Examples
    --------
    >>> ThreadGroup(3).run(lambda comm: comm.rank * 10)
    [0, 10, 20]
    """

    def __init__(self, size: int, *, timeout: float = 120.0) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            msg = f"`size` must be a positive int, got {size!r}"
            raise ValueError(msg)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            kind = type(timeout).__name__
            msg = f"`timeout` must be a positive number of seconds, got {kind} {timeout!r}"
            raise TypeError(msg)
        if not timeout > 0:  # also refuses NaN
            msg = f"`timeout` must be positive, got {timeout!r}"
            raise ValueError(msg)
        self.size = size
        self.timeout = float(timeout)

    def run(self, fn: Callable[[ThreadComm], _T]) -> list[_T]:
        """Call ``fn(comm)`` on every rank at once; return the results in rank order.

        Raises
        ------
        BaseException
            The first error raised by any rank (other ranks' resulting
            :class:`RankFailedError` are not reported over it).
        """
        hub = _Hub(self.size, self.timeout)
        results: list[Any] = [None] * self.size
        errors: list[BaseException | None] = [None] * self.size

        def target(rank: int) -> None:
            try:
                results[rank] = fn(ThreadComm(hub, rank))
            except BaseException as error:
                errors[rank] = error
                hub.fail(rank, error)

        threads = [
            threading.Thread(target=target, args=(rank,), name=f"portable_siglip-rank-{rank}")
            for rank in range(self.size)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if hub.failure is not None:
            raise hub.failure[1]
        return results

    def __repr__(self) -> str:
        return f"ThreadGroup({self.size})"


def check_communicator(comm: object) -> Communicator:
    """Return ``comm`` if it offers the :class:`Communicator` operations, else raise TypeError."""
    if isinstance(comm, type):
        msg = (
            f"`comm` must be a communicator instance, got the class {comm.__name__}; "
            f"create one first, e.g. `comm={comm.__name__}(...)`"
        )
        raise TypeError(msg)
    missing = [
        name
        for name in (
            "rank",
            "size",
            "isendrecv",
            "allreduce",
            "allgather",
            "bcast",
            "allgather_object",
        )
        if not hasattr(comm, name)
    ]
    if missing:
        msg = (
            "`comm` must be None or a communicator (portable_siglip.comm.Communicator: "
            f"SelfComm, ThreadGroup ranks, MPIComm, ...); got {type(comm).__name__} "
            f"without {', '.join(missing)}"
        )
        raise TypeError(msg)
    size, rank = comm.size, comm.rank  # type: ignore[attr-defined]
    if getattr(comm, "spmd", False):  # one traced program: the rank is a traced value
        if not (isinstance(size, int) and size >= 1):
            msg = f"`comm` reports size {size!r}; need a positive int"
            raise ValueError(msg)
        return comm  # type: ignore[return-value]
    if not (isinstance(size, int) and isinstance(rank, int) and 0 <= rank < size):
        msg = f"`comm` reports rank {rank!r} of size {size!r}; need 0 <= rank < size"
        raise ValueError(msg)
    return comm  # type: ignore[return-value]
