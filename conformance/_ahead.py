"""Compile a jitted jax implementation for the coming cases' shapes before their calls.

Every golden case has its own shape, so a jax run of the suite compiles the implementation
once per case, and XLA compiles in one thread: compiling is most of the run. Once the first
jitted call has succeeded (so the implementation traces, and whether it returns a bare loss
or ``(loss, grads)`` is known), :class:`CompileAhead` lowers and compiles the same jitted
function for every remaining shape in daemon threads, while the cases run: the cores that
the suite's own thread leaves idle compile the next cases. The caller takes each case's
executable when it gets there, and compiles queued shapes itself while it waits.

The calls of the blocks check (with ``block_size``) are planned too, each with its own jitted
function; a call of many blocks is compiled only if its traced program is small (a loop over
tiles), as when it is made (``_checks._call_if_small``).

Nothing about what is computed changes: it is ``jitted.trace(...).lower().compile()`` of
the very function that ``jitted(*args)`` would compile, with the same x64 setting, and a
call whose tracing or compiling fails (or an executable that fails when called) is left to
the ordinary jitted call, which reports it as before.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from portable_siglip._interop import computing_in

__all__ = ["EAGER", "CompileAhead", "Key", "ahead_workers", "signature"]

#: ``((shape, dtype), ...)`` of a call's positional arrays.
Signature = tuple[tuple[tuple[int, ...], Any], ...]

#: A planned call: its sorted keyword arguments and its signature.
Key = tuple[tuple[tuple[str, Any], ...], Signature]

#: What :meth:`CompileAhead.compiled` returns for a program too large to compile: call eagerly.
EAGER = object()


def signature(args: Sequence[Any]) -> Signature:
    """Return the shapes and dtypes of the arrays `args`, the key of a compiled call."""
    return tuple((tuple(arg.shape), arg.dtype) for arg in args)


def ahead_workers() -> int:
    """Threads that compile ahead: the cores this process may use, less the caller's; at most 2.

    None on a single core, where compiling ahead would only compete with the caller.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(2, cores - 1))


class _Job:
    """One call to compile: claimed by the first thread that takes it, done once tried."""

    __slots__ = ("claimed", "compiled", "done", "jitted", "key", "max_equations")

    def __init__(self, key: Key, jitted: Any, max_equations: int | None) -> None:
        self.key = key
        self.jitted = jitted
        self.max_equations = max_equations
        self.claimed = False
        self.compiled: Any = None
        self.done = threading.Event()


class CompileAhead:
    """Compiles planned calls in `workers` daemon threads, in their order.

    Parameters
    ----------
    jobs : sequence of (Key, jitted, int or None)
        Each planned call: its key, the jitted function whose ``trace(...).lower().compile()``
        gives its executable, and the most equations its traced program may have to be
        compiled (None: no limit); a larger program is left to an eager call
        (:data:`EAGER`). A key planned twice is compiled once.
    dtype : str
        The run's dtype: each compile runs under ``computing_in("jax", dtype)``, the x64
        setting of the calls.
    workers : int
        Daemon threads to start.
    """

    def __init__(
        self, jobs: Sequence[tuple[Key, Any, int | None]], dtype: str, workers: int
    ) -> None:
        self._dtype = dtype
        self._lock = threading.Lock()
        self._cancelled = False
        self._jobs: dict[Key, _Job] = {}
        for key, jitted, max_equations in jobs:
            self._jobs.setdefault(key, _Job(key, jitted, max_equations))
        self._order = list(self._jobs.values())
        for index in range(workers):
            threading.Thread(
                target=self._work, name=f"conformance-compile-{index}", daemon=True
            ).start()

    def _claim_next(self) -> _Job | None:
        with self._lock:
            if self._cancelled:
                return None
            for job in self._order:
                if not job.claimed:
                    job.claimed = True
                    return job
        return None

    def _compile(self, job: _Job) -> None:
        try:
            import jax

            with computing_in("jax", self._dtype):
                shapes = [
                    jax.ShapeDtypeStruct(shape, dtype)  # type: ignore[no-untyped-call]
                    for shape, dtype in job.key[1]
                ]
                traced = job.jitted.trace(*shapes)
                limit = job.max_equations
                if limit is not None and len(traced.jaxpr.eqns) > limit:
                    job.compiled = EAGER
                else:
                    job.compiled = traced.lower().compile()
        except BaseException:  # the ordinary jitted call reports it
            job.compiled = None
        finally:
            job.done.set()

    def _work(self) -> None:
        while (job := self._claim_next()) is not None:
            self._compile(job)

    def compiled(self, key: Key) -> Any:
        """Return the executable for `key`, :data:`EAGER`, or None (not planned, or failed).

        Compiles it here if no thread has taken it yet; while another thread compiles it,
        compiles the next queued calls here instead of waiting idle.
        """
        job = self._jobs.get(key)
        if job is None:
            return None
        with self._lock:
            if self._cancelled and not job.claimed:
                return None
            mine = not job.claimed
            job.claimed = True
        if mine:
            self._compile(job)
        while not job.done.is_set():
            other = self._claim_next()
            if other is None:
                job.done.wait()
                break
            self._compile(other)
        return job.compiled

    def cancel(self, wait: float | None = 0.0) -> None:
        """Compile nothing more; wait up to `wait` seconds (None: no limit) for the rest.

        Waiting for the compiles under way leaves none running when the process ends.
        """
        with self._lock:
            self._cancelled = True
            running = [job for job in self._order if job.claimed and not job.done.is_set()]
        deadline = None if wait is None else time.monotonic() + wait
        for job in running:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            job.done.wait(left)
