"""Devices for the command line: parsing ``--device``, finding GPUs, placing arrays.

Used by ``run``, ``doctor`` and ``bench --device``, never by the loss functions, which
compute wherever their inputs are. Every library is imported on call. A device that is not
there (``--device cuda`` without a GPU, cupy without cupy) is a :class:`UsageError` whose
message says what was looked for and not found, so the command line exits 2 with it.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .._interop import UsageError

__all__ = [
    "Device",
    "cuda_device_count",
    "gpu_backends",
    "no_gpu_reasons",
    "parse_device",
    "place",
    "resolve_device",
    "wait_until_computed",
]

#: Backends whose arrays can live on a CUDA device, and the one that can live nowhere else.
CUDA_BACKENDS = ("torch", "jax", "cupy")
HOST_ONLY = ("numpy", "array_api_strict")


@dataclass(frozen=True)
class Device:
    """Where the arrays of a run live.

    Attributes
    ----------
    kind : {"cpu", "cuda"}
        Host or a CUDA GPU.
    index : int or None
        The GPU's index (None for the host).
    """

    kind: str
    index: int | None = None

    @property
    def is_cuda(self) -> bool:
        """Whether this is a GPU."""
        return self.kind == "cuda"

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"


def parse_device(text: str) -> Device:
    """Parse ``cpu``, ``cuda`` or ``cuda:N`` (the syntax only; whether it exists comes later).

    Raises
    ------
    ValueError
        For anything else.

    Examples
    --------
    >>> parse_device("cuda:1")
    Device(kind='cuda', index=1)
    >>> str(parse_device("cpu"))
    'cpu'
    """
    value = text.strip().lower()
    if value == "cpu":
        return Device("cpu")
    if value == "cuda":
        return Device("cuda")
    if value.startswith("cuda:") and value[5:].isdigit():
        return Device("cuda", int(value[5:]))
    msg = f"expected cpu, cuda or cuda:N, got {text!r}"
    raise ValueError(msg)


def cuda_device_count(backend: str) -> tuple[int, str | None]:
    """Count the CUDA devices `backend` can use; say why there are none.

    Parameters
    ----------
    backend : str
        ``torch``, ``jax`` or ``cupy`` (the others have no GPU arrays: 0).

    Returns
    -------
    count : int
        Number of CUDA devices visible to the library.
    reason : str or None
        Why the count is 0 (the library is missing, has no CUDA build, sees no device).
    """
    if backend not in CUDA_BACKENDS:
        return 0, f"{backend} arrays live in host memory only"
    try:
        module = importlib.import_module(backend)
    except ImportError:
        return 0, f"{backend} is not installed"
    try:
        if backend == "torch":
            if not module.cuda.is_available():
                build = module.version.cuda
                why = "a CPU-only build" if build is None else f"CUDA {build} build, no device"
                return 0, f"torch {module.__version__} finds no CUDA device ({why})"
            return int(module.cuda.device_count()), None
        if backend == "cupy":
            count = int(module.cuda.runtime.getDeviceCount())
            return count, None if count else "cupy finds no CUDA device"
        platforms = sorted({device.platform for device in module.devices()})
        if "gpu" not in platforms and "cuda" not in platforms:
            listed = ", ".join(platforms)
            return 0, f"jax {module.__version__} finds no GPU (its platforms: {listed})"
        return len(module.devices("gpu")), None
    except Exception as error:  # no driver, no CUDA runtime, a CPU-only jaxlib, ...
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return 0, f"{backend} finds no CUDA device ({first[:160]})"


def gpu_backends() -> dict[str, int]:
    """List the installed libraries that see a CUDA device, with their device counts."""
    found = {}
    for backend in CUDA_BACKENDS:
        count, _ = cuda_device_count(backend)
        if count:
            found[backend] = count
    return found


def no_gpu_reasons() -> str:
    """Say, library by library, why no CUDA device is seen (for error messages)."""
    return "; ".join(str(cuda_device_count(name)[1]) for name in CUDA_BACKENDS)


def resolve_device(
    backend: str, device: Device | None, *, local_rank: int = 0, implied_by: str | None = None
) -> Device:
    """Check that `device` exists for `backend`; pick the GPU of this rank for a bare ``cuda``.

    Parameters
    ----------
    backend : str
        The array library of the run.
    device : Device or None
        What ``--device`` asked for; None: the library's default (the host for numpy,
        array_api_strict, torch and a CPU jax; GPU 0 for cupy; jax's first device).
    local_rank : int
        This process's rank on its node: ``cuda`` without an index means GPU
        ``local_rank % count``, so the ranks of one node spread over its GPUs.
    implied_by : str, optional
        The option that asked for `device` when ``--device`` did not (``"--comm nccl"``,
        which moves GPU memory only): the error names it, not ``--device``.

    Returns
    -------
    Device
        With the GPU index filled in.

    Raises
    ------
    UsageError
        When the device does not exist here; the message names what was looked for.
    """
    what = "--device" if device is not None else f"--backend {backend} (on its default device)"
    if device is None:
        if backend == "cupy":
            device = Device("cuda")
        elif backend == "jax":
            count, _ = cuda_device_count("jax")
            device = Device("cuda") if count else Device("cpu")
        else:
            return Device("cpu")
    if not device.is_cuda:
        if backend == "cupy":
            msg = "`device`: cupy arrays live on a CUDA device; --device cpu needs another backend"
            raise UsageError(msg)
        return device
    if backend in HOST_ONLY:
        usable = gpu_backends()
        if not usable:
            msg = (
                f"`device`: --device {device} needs a CUDA GPU, and none was found "
                f"({no_gpu_reasons()}); besides, {backend} arrays live in host memory"
            )
        else:
            names = ", ".join(f"{name} ({count} GPU)" for name, count in usable.items())
            msg = (
                f"`device`: {backend} arrays live in host memory; for --device {device} use "
                f"--backend {next(iter(usable))} (GPUs seen by {names})"
            )
        raise UsageError(msg)
    count, reason = cuda_device_count(backend)
    if count == 0:
        shown = f"{what} {device}" if what == "--device" else what
        name = "device"
        if implied_by is not None:  # e.g. "--comm nccl": the user gave --comm
            shown, name = implied_by, implied_by.split()[0].lstrip("-")
        msg = f"`{name}`: {shown} needs a CUDA GPU, and none was found: {reason}"
        raise UsageError(msg)
    index = local_rank % count if device.index is None else device.index
    if not 0 <= index < count:
        msg = f"`device`: {device} does not exist; {backend} sees {count} CUDA device(s)"
        raise UsageError(msg)
    return Device("cuda", index)


def place(backend: str, xp: Any, values: Any, dtype: Any, device: Device) -> Any:
    """Copy a NumPy array into an array of `backend` on `device`, in `dtype`.

    Examples
    --------
    >>> import numpy as np
    >>> place("numpy", np, np.ones(2), np.float32, Device("cpu")).dtype
    dtype('float32')
    """
    if backend == "torch":
        import torch

        target = torch.device(str(device))
        return torch.as_tensor(values).to(device=target, dtype=dtype)
    if backend == "cupy":
        import cupy

        with cupy.cuda.Device(device.index or 0):
            return cupy.asarray(values, dtype=dtype)
    if backend == "jax":
        import jax

        platform = "gpu" if device.is_cuda else "cpu"
        return jax.device_put(
            xp.asarray(values, dtype=dtype), jax.devices(platform)[device.index or 0]
        )
    return xp.asarray(values, dtype=dtype)


def wait_until_computed(values: Sequence[Any]) -> None:
    """Wait until lazy or asynchronous backends have finished computing `values`.

    jax arrays are waited for one by one; cupy's current stream and each CUDA device that
    holds one of the torch tensors are synchronised.

    Examples
    --------
    >>> import numpy as np
    >>> wait_until_computed([np.ones(2)])  # numpy computes eagerly: returns at once
    """
    import array_api_compat

    for value in values:
        ready = getattr(value, "block_until_ready", None)
        if ready is not None:
            ready()
    if any(array_api_compat.is_cupy_array(v) for v in values):
        import cupy

        cupy.cuda.get_current_stream().synchronize()
    torch_devices = {v.device for v in values if array_api_compat.is_torch_array(v) and v.is_cuda}
    if torch_devices:
        import torch

        for torch_device in torch_devices:
            torch.cuda.synchronize(torch_device)
