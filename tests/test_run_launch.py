"""``run --device`` and ``--comm``: real mpirun and torchrun jobs over torch.distributed (gloo).

The GPU transports (NCCL through cupy or torch.distributed) are exercised where a GPU is
present; without one their usage errors are: exit 2, a message naming what is missing,
never a traceback. How ``--comm auto`` picks its transport is tested from the launchers'
environment variables.
"""

from __future__ import annotations

import doctest
import importlib.util
import socket
import subprocess
import sys
import threading
from typing import Any

import numpy as np
import pytest
from helpers import beside_python, launcher_environment, skip_without_mpi

from portable_siglip import _registry
from portable_siglip._interop import UsageError
from portable_siglip.cli import _doctor, _launch
from portable_siglip.cli._devices import Device

SCHEDULES = [(loss.name, s) for loss in _registry.losses() for s in loss.schedules]
IDS = [f"{loss}-{strategy}" for loss, strategy in SCHEDULES]
SMALL = ("--batch", "203", "--dim", "16", "--block-size", "17", "--dtype", "float64")


def launch(command: list[str], timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=launcher_environment()
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
    skip_without_mpi()
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
    (["run", "--backend", "torch", "--comm", "nccl"], "--comm nccl needs a CUDA GPU"),
]


@pytest.mark.skipif(gpu_count() > 0, reason="this machine has a GPU")
@pytest.mark.parametrize(("argv", "message"), NO_GPU, ids=[" ".join(a) for a, _ in NO_GPU])
def test_gpu_options_without_a_gpu_are_usage_errors(argv: list[str], message: str) -> None:
    result = launch([sys.executable, "-m", "portable_siglip", *argv, "--batch", "8"], 120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert "invalid choice" not in result.stderr
    if "--device" not in argv:
        assert "--device" not in result.stderr.split("error:", 1)[1].split(";")[0]


@pytest.mark.skipif(gpu_count() > 0, reason="this machine has a GPU")
@pytest.mark.parametrize("cupy", [False, True], ids=["without-cupy", "with-cupy"])
def test_comm_nccl_without_a_gpu_names_comm_not_device(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, cupy: bool
) -> None:
    """``run --backend torch --comm nccl``: the user gave --comm, not --device; say --comm."""
    pytest.importorskip("torch")
    from portable_siglip.cli import _commands

    installed = _launch.installed
    monkeypatch.setattr(_launch, "installed", lambda name: cupy or installed(name))
    assert _commands.main(["run", "--backend", "torch", "--comm", "nccl", "--batch", "8"]) == 2
    err = capsys.readouterr().err
    assert "run: error: `comm`: --comm nccl needs a CUDA GPU" in err, err
    assert "--device" not in err
    if cupy:  # past the check for cupy: torch's own GPU count is what is missing
        assert "none was found: torch" in err


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


def test_auto_under_mpirun_with_more_ranks_than_gpus_is_mpi(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """NCCL refuses two ranks on one GPU: auto takes MPI (host staging) on such a node."""
    monkeypatch.setattr(_launch, "cuda_device_count", lambda backend: (1, None))
    for local, expected in (("1", "nccl"), ("2", "mpi")):
        environ = {**MPIRUN, "OMPI_COMM_WORLD_LOCAL_SIZE": local}
        assert _launch.choose("auto", "torch", Device("cuda", 0), environ) == expected


def test_local_rank_from_each_launcher() -> None:
    assert _launch.local_rank({"OMPI_COMM_WORLD_LOCAL_RANK": "3"}) == 3
    assert _launch.local_rank({"MPI_LOCALRANKID": "2"}) == 2
    assert _launch.local_rank({"LOCAL_RANK": "1"}) == 1
    assert _launch.local_rank({}) == 0


@pytest.mark.skipif(gpu_count() == 0, reason="needs a CUDA GPU")
@pytest.mark.parametrize("comm", ["torch", "nccl"])
def test_gpu_run_on_one_rank(comm: str) -> None:
    if comm == "nccl":
        pytest.importorskip("cupy")  # one rank: NCCLComm.single(), no MPI
    run = ["run", "--backend", "torch", "--device", "cuda", "--comm", comm, *SMALL, "--verify"]
    result = launch([sys.executable, "-m", "portable_siglip", *run])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "device=cuda:0" in result.stdout
    assert "verify: ok" in result.stdout


# --- --comm nccl without MPI, ranks that share a GPU, MPI without its library ---


def no_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*_launch.MPI_LAUNCH_VARIABLES, *_launch.TORCHRUN_VARIABLES):
        monkeypatch.delenv(name, raising=False)


def fake_cupy_runtime(monkeypatch: pytest.MonkeyPatch, devices: int) -> Any:
    """NCCLComm's constructors get the fake NCCL runtime of tests/fake_nccl.py."""
    from fake_nccl import FakeNccl, FakeRuntime
    from portable_siglip.backends import nccl

    nccl_module = FakeNccl()
    runtime = FakeRuntime(nccl_module, devices=devices)
    monkeypatch.setattr(nccl, "CupyRuntime", lambda: runtime)
    return runtime


def test_comm_nccl_by_hand_is_one_rank_without_mpi(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # any import of mpi4py raises
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", None)
    no_launcher(monkeypatch)
    runtime = fake_cupy_runtime(monkeypatch, devices=2)
    comm = _launch.connect("nccl", "cupy", Device("cuda", 1))
    assert (type(comm).__name__, comm.rank, comm.size, comm.device) == ("NCCLComm", 0, 1, 1)
    assert comm.mpi_comm is None
    assert runtime.nccl.unique_ids_made == 1
    _, data = _doctor.exercise(comm, np.asarray)
    assert data["schedules"] == 6


def test_comm_nccl_under_torchrun_uses_its_store(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch.distributed")
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    no_launcher(monkeypatch)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environ = {"TORCHELASTIC_RUN_ID": "t", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    for name, value in {**environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    fake_cupy_runtime(monkeypatch, devices=1)
    comm = _launch.connect("nccl", "torch", Device("cuda", 0))
    assert (comm.rank, comm.size, comm.device) == (0, 1, 0)
    assert comm.store is not None
    assert comm.mpi_comm is None


@pytest.mark.parametrize(("devices", "sharing"), [(1, [0, 1]), (2, None)])
def test_comm_nccl_ranks_sharing_a_gpu_is_a_usage_error_on_every_rank(
    devices: int, sharing: list[int] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``mpirun -n 2 ... --device cuda --comm nccl`` on one GPU: both ranks say why, no NCCL."""
    from fake_nccl import run_ranks
    from test_nccl_comm import FakeMPI

    no_launcher(monkeypatch)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    runtime = fake_cupy_runtime(monkeypatch, devices=devices)
    shared: dict[str, Any] = {"cond": threading.Condition()}
    worlds = {f"fake-rank-{r}": FakeMPI(shared, r, 2) for r in range(2)}
    monkeypatch.setattr(_launch, "_mpi_world", lambda what: worlds[threading.current_thread().name])

    def rank(index: int) -> Any:
        # What the command line resolves on rank `index` of a node with `devices` GPUs.
        device = Device("cuda", index % devices)
        try:
            return _launch.connect("nccl", "torch", device)
        except UsageError as error:
            return error

    results = run_ranks(2, rank, runtime.nccl)
    if sharing is None:
        assert [comm.device for comm in results] == [0, 1]
        return
    for error in results:
        assert isinstance(error, UsageError), error
        assert str(error) == (
            "`comm`: 2 ranks share GPU 0; NCCL needs one GPU per rank; use --comm mpi or "
            "--comm torch to try several ranks on one GPU"
        )
    assert runtime.nccl.unique_ids_made == 0


def test_comm_nccl_without_libnccl_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from portable_siglip.backends import nccl

    def missing() -> Any:
        raise ImportError("cupy's NCCL binding cannot load libnccl, the NCCL library")

    no_launcher(monkeypatch)
    monkeypatch.setattr(nccl, "CupyRuntime", missing)
    with pytest.raises(UsageError, match=r"`comm`: --comm nccl: cupy's NCCL binding cannot"):
        _launch.connect("nccl", "cupy", Device("cuda", 0))


def test_comm_mpi_without_an_mpi_library_is_a_usage_error() -> None:
    """mpi4py installed without libmpi (the GPU host): exit 2 and why, not a traceback."""
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed")
    env = launcher_environment()
    env["MPI4PY_LIBMPI"] = "/nonexistent/libmpi.so"  # what mpi4py finds without libmpi
    env.pop("LD_LIBRARY_PATH", None)
    command = [sys.executable, "-m", "portable_siglip", "run", "--comm", "mpi", "--batch", "8"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--comm mpi needs an MPI library, and mpi4py cannot load one" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("environ", "gpus", "expected"),
    [
        ({}, 1, ("nccl", False)),
        ({"LOCAL_WORLD_SIZE": "2"}, 2, ("nccl", False)),
        ({"LOCAL_WORLD_SIZE": "2"}, 1, ("gloo", True)),
        ({"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, 2, ("gloo", True)),
        ({"MPI_LOCALNRANKS": "3"}, 1, ("gloo", True)),
    ],
)
def test_comm_torch_stages_through_the_host_when_ranks_outnumber_gpus(
    environ: dict[str, str], gpus: int, expected: tuple[str, bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert _launch.torch_backend(Device("cuda", 0), environ) == expected
    assert _launch.torch_backend(Device("cpu"), environ) == ("gloo", False)


def test_launch_docstring_examples_run() -> None:
    result = doctest.testmod(_launch, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0


# --- on a GPU: several ranks on one GPU ---


def one_gpu() -> None:
    if gpu_count() != 1:
        pytest.skip("needs exactly one CUDA GPU (several ranks sharing it)")


def test_gpu_comm_nccl_with_two_ranks_on_one_gpu_says_why() -> None:
    one_gpu()
    pytest.importorskip("cupy")
    torchrun = [beside_python("torchrun"), "--standalone", "--nproc-per-node", "2"]
    run = ["-m", "portable_siglip", "run", "--backend", "torch", "--device", "cuda"]
    result = launch([*torchrun, *run, "--comm", "nccl", *SMALL], timeout=240)
    assert result.returncode != 0, result.stdout + result.stderr
    message = "2 ranks share GPU 0; NCCL needs one GPU per rank; use --comm mpi or --comm torch"
    assert result.stderr.count(message) == 2, result.stderr  # every rank says it
    assert "Duplicate GPU" not in result.stderr + result.stdout


def test_gpu_comm_torch_with_two_ranks_on_one_gpu_stages_through_the_host() -> None:
    one_gpu()
    torchrun = [beside_python("torchrun"), "--standalone", "--nproc-per-node", "2"]
    run = ["-m", "portable_siglip", "run", "--backend", "torch", "--device", "cuda"]
    result = launch([*torchrun, *run, "--comm", "torch", *SMALL, "--verify"], timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ranks           2 (TorchDistComm), strategy bidir" in result.stdout
    assert result.stdout.count("verify: ok") == 1


def test_usage_error_before_connecting_is_said_by_rank_0_only(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a launcher, before the ranks connect: rank 0 says it; another rank waits for the
    launcher to end the job, and says it itself only if still running after the wait."""
    from portable_siglip.cli import _commands

    monkeypatch.setattr(_commands, "QUIET_RANK_WAIT_S", 0.0)
    argv = ["run", "--device", "gpu", "--batch", "8"]  # refused before any transport
    for rank in ("0", "1"):
        monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
        monkeypatch.setenv("OMPI_COMM_WORLD_RANK", rank)
        assert _commands.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1, err
        shown = "run: error: `device`" if rank == "0" else "run: rank 1: error: `device`"
        assert shown in err
