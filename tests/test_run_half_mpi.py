"""``run --dtype bfloat16|float16 --comm mpi --verify`` under a real ``mpirun``.

It used to exit 2 with "Got unsupported ScalarType BFloat16": MPIComm staged torch's
bfloat16 through NumPy (which has none) in the --verify gather, and the TypeError was
reported as a usage error. Skips unless MPI is usable (mpi4py *and* an MPI library) and an
``mpirun`` is installed.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import beside_python, launcher_environment, skip_without_mpi

SMALL = ("--batch", "203", "--dim", "16", "--block-size", "17")
CASES = [
    (1, "torch", "sigmoid", "bfloat16"),
    (2, "torch", "sigmoid", "bfloat16"),
    (2, "torch", "softmax", "bfloat16"),
    (2, "torch", "sigmoid", "float16"),
    (3, "torch", "softmax", "float16"),
    (2, "numpy", "sigmoid", "bfloat16"),  # ml_dtypes' bfloat16
]


IDS = ["-".join(map(str, case)) for case in CASES]


@pytest.mark.parametrize(("world", "backend", "loss", "dtype"), CASES, ids=IDS)
def test_half_precision_run_over_mpi_verifies(
    world: int, backend: str, loss: str, dtype: str
) -> None:
    pytest.importorskip("torch" if backend == "torch" else "ml_dtypes")
    skip_without_mpi()
    run = ["-m", "portable_siglip", "run", "--backend", backend, "--comm", "mpi", "--verify"]
    command = [
        beside_python("mpirun"),
        "-n",
        str(world),
        sys.executable,
        *run,
        "--loss",
        loss,
        "--dtype",
        dtype,
    ]
    try:
        result = subprocess.run(
            [*command, *SMALL],
            capture_output=True,
            text=True,
            timeout=180,
            env=launcher_environment(),
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung: {' '.join(command)}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"dtype={dtype}" in result.stdout
    if world > 1:
        assert f"ranks           {world} (MPIComm)" in result.stdout
        assert "loss identical on every rank: yes" in result.stdout
    assert result.stdout.count("verify: ok") == 1  # rank 0 only
