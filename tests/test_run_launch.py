"""``run --device`` and ``--comm``: real mpirun and torchrun jobs over torch.distributed (gloo).

The GPU transports (NCCL through cupy or torch.distributed) are exercised where a GPU is
present; without one their usage errors are: exit 2, a message naming what is missing,
never a traceback. How ``--comm auto`` picks its transport is tested from the launchers'
environment variables.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from portable_siglip import _launch
from portable_siglip._checks import SIGMOID_STRATEGIES, SOFTMAX_STRATEGIES
from portable_siglip._devices import Device
from portable_siglip._interop import UsageError

SCHEDULES = [("sigmoid", s) for s in SIGMOID_STRATEGIES] + [
    ("softmax", s) for s in SOFTMAX_STRATEGIES
]
IDS = [f"{loss}-{strategy}" for loss, strategy in SCHEDULES]
SMALL = ("--batch", "203", "--dim", "16", "--block-size", "17", "--dtype", "float64")


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe",
        OMP_NUM_THREADS="1",
    )
    for name in (*_launch.MPI_LAUNCH_VARIABLES, *_launch.TORCHRUN_VARIABLES):
        env.pop(name, None)  # this test process may itself run under a launcher
    return env


def beside_python(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


def launch(command: list[str], timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=environment()
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung: {' '.join(command)}")


def check_verified(result: subprocess.CompletedProcess[str], world: int, strategy: str) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"ranks           {world} (TorchDistComm), strategy {strategy}" in result.stdout
    assert "loss identical on every rank: yes" in result.stdout
    assert result.stdout.count("verify: ok") == 1  # rank 0 only


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize(("loss", "strategy"), SCHEDULES, ids=IDS)
def test_comm_torch_under_mpirun(world: int, loss: str, strategy: str) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("mpi4py")
    run = ["-m", "portable_siglip", "run", "--backend", "torch", "--comm", "torch"]
    command = [beside_python("mpirun"), "-n", str(world), sys.executable, *run]
    result = launch([*command, "--loss", loss, "--strategy", strategy, *SMALL, "--verify"])
    check_verified(result, world, strategy)


@pytest.mark.slow
@pytest.mark.parametrize(("loss", "strategy"), SCHEDULES, ids=IDS)
def test_comm_torch_under_torchrun(loss: str, strategy: str) -> None:
    pytest.importorskip("torch")
    torchrun = [beside_python("torchrun"), "--standalone", "--nproc-per-node", "3"]
    run = ["-m", "portable_siglip", "run", "--backend", "torch"]  # --comm auto: torch
    result = launch([*torchrun, *run, "--loss", loss, "--strategy", strategy, *SMALL, "--verify"])
    check_verified(result, 3, strategy)


def test_comm_torch_by_hand_is_one_rank() -> None:
    pytest.importorskip("torch")
    run = ["run", "--backend", "torch", "--comm", "torch", *SMALL, "--verify"]
    result = launch([sys.executable, "-m", "portable_siglip", *run])
    check_verified(result, 1, "bidir")


def gpu_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


NO_GPU = [
    (["run", "--device", "cuda"], "needs a CUDA GPU, and none was found"),
    (["run", "--backend", "torch", "--device", "cuda:0"], "needs a CUDA GPU, and none was found"),
    (["run", "--comm", "nccl"], "--comm nccl needs a CUDA GPU"),
    (["run", "--backend", "torch", "--comm", "nccl"], "CUDA GPU"),
]


@pytest.mark.skipif(gpu_count() > 0, reason="this machine has a GPU")
@pytest.mark.parametrize(("argv", "message"), NO_GPU, ids=[" ".join(a) for a, _ in NO_GPU])
def test_gpu_options_without_a_gpu_are_usage_errors(argv: list[str], message: str) -> None:
    result = launch([sys.executable, "-m", "portable_siglip", *argv, "--batch", "8"], 120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert "invalid choice" not in result.stderr


BAD = [
    (["--device", "gpu"], "`device`: expected cpu, cuda or cuda:N, got 'gpu'"),
    (["--device", "cpu", "--backend", "cupy"], "`backend`: 'cupy' is not installed"),
    (["--comm", "torch"], "--comm torch moves torch tensors, got --backend numpy"),
    (["--comm", "nccl", "--backend", "jax"], "--comm nccl"),
]


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_device_and_comm_usage_errors(argv: list[str], message: str) -> None:
    result = launch([sys.executable, "-m", "portable_siglip", "run", *argv, "--batch", "8"], 120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


MPIRUN = {"OMPI_COMM_WORLD_SIZE": "2"}
TORCHRUN = {"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "WORLD_SIZE": "2"}
AUTO = [
    ({}, "numpy", Device("cpu"), "none"),
    (MPIRUN, "numpy", Device("cpu"), "mpi"),
    (MPIRUN, "torch", Device("cpu"), "mpi"),
    (MPIRUN, "jax", Device("cuda", 0), "mpi"),  # NCCLComm moves cupy and torch only
    (TORCHRUN, "torch", Device("cpu"), "torch"),
]


@pytest.mark.parametrize(("environ", "backend", "device", "expected"), AUTO)
def test_auto_picks_the_transport_of_the_launcher(
    environ: dict[str, str], backend: str, device: Device, expected: str
) -> None:
    assert _launch.choose("auto", backend, device, environ) == expected


def test_auto_under_mpirun_with_cuda_arrays_is_nccl(monkeypatch: pytest.MonkeyPatch) -> None:
    # cupy's NCCL is what NCCLComm needs: pretend it sees one GPU.
    monkeypatch.setattr(_launch, "cuda_device_count", lambda backend: (1, None))
    for backend in ("torch", "cupy"):
        assert _launch.choose("auto", backend, Device("cuda", 0), MPIRUN) == "nccl"
    with pytest.raises(UsageError, match=r"--comm nccl needs the arrays on a GPU"):
        _launch.choose("nccl", "torch", Device("cpu"), MPIRUN)


def test_local_rank_from_each_launcher() -> None:
    assert _launch.local_rank({"OMPI_COMM_WORLD_LOCAL_RANK": "3"}) == 3
    assert _launch.local_rank({"MPI_LOCALRANKID": "2"}) == 2
    assert _launch.local_rank({"LOCAL_RANK": "1"}) == 1
    assert _launch.local_rank({}) == 0


@pytest.mark.skipif(gpu_count() == 0, reason="needs a CUDA GPU")
@pytest.mark.parametrize("comm", ["torch", "nccl"])
def test_gpu_run_on_one_rank(comm: str) -> None:
    if comm == "nccl":
        pytest.importorskip("cupy")
        pytest.importorskip("mpi4py")
    run = ["run", "--backend", "torch", "--device", "cuda", "--comm", comm, *SMALL, "--verify"]
    result = launch([sys.executable, "-m", "portable_siglip", *run])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "device=cuda:0" in result.stdout
    assert "verify: ok" in result.stdout
