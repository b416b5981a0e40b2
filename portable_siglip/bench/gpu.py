"""``python -m portable_siglip bench --device cuda``: forward + gradient on a GPU.

For every (d, dtype, n, loss) these rows run on the same random, L2-normalised, correlated
features, drawn on the device:

``ours torch``
    :func:`portable_siglip.sigmoid_loss_and_grad` / :func:`softmax_loss_and_grad` on torch
    tensors on the device, ``block_size`` the library's default there (4096 on a GPU,
    :func:`portable_siglip._checks.default_block_size`) unless ``--block-size`` is given.
``ours cupy`` (when cupy is installed, on a GPU)
    The same call on cupy arrays that share the torch tensors' memory (DLPack).
``roofline``
    The three GEMMs of any forward + gradient, ``S = img @ txt.T``, ``S @ txt`` and
    ``S.T @ img``, in the input dtype with torch on the device; above
    :data:`ROOFLINE_PANEL_BYTES` of ``S``, on row panels of ``S``.
``siglip-kernel`` (sigmoid; when the package is installed, on a GPU)
    ``siglip_kernel.fused_siglip_loss(img, txt, log_temp, bias)`` then ``backward()``: a
    Triton SigLIP loss (PyPI ``siglip-kernel``), with its own backend choice.
``open_clip`` (when open-clip-torch is installed)
    open_clip's ``SigLipLoss`` / ``ClipLoss`` with autograd
    (:func:`portable_siglip.bench.baselines.open_clip_loss`).
``dense autograd``
    :func:`portable_siglip.bench.baselines.dense_loss` with autograd.

The last two hold several n x n matrices. A row of theirs predicted to need more than the
device's free memory is skipped with the prediction stated, and one that runs out of memory
all the same is reported as skipped, with the allocator's message.

Timing: every row runs once as a warm-up, once more to read its peak memory, then
``--repeats`` rounds in which each row runs once, in turn; the median is reported. Each timed
call is wall-clock time between two device synchronisations (``torch.cuda.synchronize``).
GFLOP/s counts ``6 n^2 d`` flops for every row; roofline frac = roofline time / row time.

The whole machinery is :func:`run_benchmark`, which takes the device as a parameter: on
``cpu`` (the tests) it runs everything but the CUDA calls, and reads memory from the
resident-set high-water mark instead of the CUDA allocator.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib
import importlib.metadata
import importlib.util
import inspect
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

from .baselines import DENSE, OPEN_CLIP, dense_loss, open_clip_loss, predict_peak_bytes
from .common import (
    BIAS,
    GIB,
    GPU_DTYPES,
    LOSSES,
    MIB,
    SCALE,
    TEXT_NOISE,
    Progress,
    fmt,
    installed,
    machine_info,
    print_load_after,
    print_notes,
    render_table,
    torch_leaves,
    write_report,
)

__all__ = [
    "DEFAULT_DIM",
    "DEFAULT_DTYPES",
    "DEFAULT_SIZES",
    "GPU_DTYPES",
    "IMPLS",
    "GpuConfig",
    "gpu_info",
    "main",
    "make_inputs",
    "roofline_panel",
    "run_benchmark",
    "siglip_kernel_status",
    "table",
]

OURS_TORCH = "ours torch"
OURS_CUPY = "ours cupy"
ROOFLINE = "roofline"
SIGLIP_KERNEL = "siglip-kernel"

#: The rows of a case, in the order they run and are shown.
IMPLS = (OURS_TORCH, OURS_CUPY, ROOFLINE, SIGLIP_KERNEL, OPEN_CLIP, DENSE)

#: Rows that hold n x n matrices: predicted against the free memory, skipped above it.
N2_IMPLS = (OPEN_CLIP, DENSE)

#: Batch sizes n of ``bench --device cuda`` (``--sizes``). At 262144 the n x n rows are
#: skipped by their prediction (one float32 n x n matrix alone is 256 GiB).
DEFAULT_SIZES = (16384, 65536, 262144)

#: Feature dimension d of ``bench --device cuda`` (``--dim``): SigLIP So400m's.
DEFAULT_DIM = 1152

#: Dtypes of ``bench --device cuda`` (``--dtype``), and those it accepts.
DEFAULT_DTYPES = ("float32", "bfloat16")

ITEMSIZE = {"float32": 4, "float64": 8, "bfloat16": 2}

#: Largest ``S = img @ txt.T`` (bytes) the roofline forms whole; above, it goes by row panels.
ROOFLINE_PANEL_BYTES = 2 * GIB

#: Lower bound of the peak of the n x n rows, in n x n matrices of the input dtype (the CPU
#: sweep measured 5.0 at float32, n = 8192; docs/benchmarks.md).
DENSE_N2_MATRICES = 5.5

#: What the ``memory_source`` field of a row says its ``peak_bytes`` is.
MEMORY_TORCH_CUDA = "torch.cuda.max_memory_allocated"
MEMORY_CUPY_POOL = "cupy default memory pool total_bytes() growth"
MEMORY_RSS_FALLBACK = "VmHWM - VmRSS (cpu fallback, in process)"

SIGLIP_KERNEL_MODULE = "siglip_kernel"
SIGLIP_KERNEL_DISTRIBUTION = "siglip-kernel"


class Skip(Exception):  # noqa: N818 - a reason to leave a row out, not an error
    """A row cannot run here; the message says why (e.g. cupy has no bfloat16)."""


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class GpuConfig:
    """What ``bench --device cuda`` runs.

    Attributes
    ----------
    sizes : tuple of int
        Batch sizes n.
    dims : tuple of int
        Feature dimensions d.
    dtypes : tuple of str
        Among :data:`GPU_DTYPES`.
    losses : tuple of str
        ``sigmoid``, ``softmax``.
    block_size : int or None
        Tile edge of our rows (None: the library's default on the device).
    repeats : int
        Timed rounds after the warm-up and the memory run.
    seed : int
        Seed of the random inputs.
    dense : bool
        Whether to run the ``open_clip`` and ``dense autograd`` rows.
    """

    sizes: tuple[int, ...] = DEFAULT_SIZES
    dims: tuple[int, ...] = (DEFAULT_DIM,)
    dtypes: tuple[str, ...] = DEFAULT_DTYPES
    losses: tuple[str, ...] = LOSSES
    block_size: int | None = None
    repeats: int = 3
    seed: int = 0
    dense: bool = True

    def problem(self) -> str | None:
        """Say what is wrong with this configuration, or None."""
        unknown = [d for d in self.dtypes if d not in GPU_DTYPES]
        if not self.dtypes or unknown:
            return f"`--dtype` must be among {', '.join(GPU_DTYPES)}; got {list(self.dtypes)}"
        unknown = [loss for loss in self.losses if loss not in LOSSES]
        if not self.losses or unknown:
            return f"`--losses` must be among {', '.join(LOSSES)}; got {list(self.losses)}"
        for name in ("sizes", "dims"):
            values = getattr(self, name)
            if not values or any(int(v) <= 0 for v in values):
                return f"`--{name}` must be positive integers; got {list(values)}"
        if int(self.repeats) <= 0:
            return f"`--repeats` must be a positive integer; got {self.repeats!r}"
        if self.block_size is not None and int(self.block_size) <= 0:
            return f"`--block-size` must be a positive integer; got {self.block_size!r}"
        return None


# --------------------------------------------------------------------------- the device


class _Device:
    """Torch's view of the device: synchronisation, free memory, memory readings."""

    def __init__(self, name: str) -> None:
        import torch

        self.torch = torch
        device = torch.device(name)
        self.is_cuda = device.type == "cuda"
        index: int | None = getattr(device, "index", None)
        if self.is_cuda and index is None:
            index = int(torch.cuda.current_device())
            device = torch.device("cuda", index)
        self.device = device
        self.name = str(device)
        self.index = index if self.is_cuda else None
        errors: list[type[BaseException]] = [MemoryError, torch.cuda.OutOfMemoryError]
        if self.is_cuda and installed("cupy"):
            try:
                import cupy

                errors.append(cupy.cuda.memory.OutOfMemoryError)
            except Exception:  # a cupy that does not load is reported by its row
                pass
        self.oom_errors = tuple(errors)

    def sync(self) -> None:
        if self.is_cuda:
            self.torch.cuda.synchronize(self.device)

    def release(self) -> None:
        """Return cached memory to the device (after an out-of-memory error or a case)."""
        gc.collect()
        if self.is_cuda:
            self.torch.cuda.empty_cache()
            if "cupy" in sys.modules:
                with contextlib.suppress(Exception):  # a cupy that does not load: no pool
                    sys.modules["cupy"].get_default_memory_pool().free_all_blocks()

    def free_bytes(self) -> int | None:
        """Bytes a new allocation can get: free device memory plus torch's unused cache."""
        if self.is_cuda:
            cuda = self.torch.cuda
            free, _ = cuda.mem_get_info(self.device)
            cached = cuda.memory_reserved(self.device) - cuda.memory_allocated(self.device)
            return int(free) + max(0, int(cached))
        return _available_host_bytes()

    def measure(self, impl: str, run: Callable[[], Any]) -> tuple[int | None, str | None]:
        """Run once; return its peak extra bytes and where that reading comes from."""
        if impl == OURS_CUPY:
            import cupy

            pool = cupy.get_default_memory_pool()
            self.sync()
            pool.free_all_blocks()
            before = int(pool.total_bytes())
            result = run()
            del result
            self.sync()
            return int(pool.total_bytes()) - before, MEMORY_CUPY_POOL
        if self.is_cuda:
            cuda = self.torch.cuda
            self.sync()
            cuda.reset_peak_memory_stats(self.device)
            before = int(cuda.memory_allocated(self.device))
            result = run()
            del result
            self.sync()
            return int(cuda.max_memory_allocated(self.device)) - before, MEMORY_TORCH_CUDA
        return _rss_peak(run)


def _available_host_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rss_peak(run: Callable[[], Any]) -> tuple[int | None, str | None]:
    """Read the CPU fallback: the resident-set high-water mark during ``run`` minus RSS before."""
    from .._memory import high_water_bytes, reset_high_water, rss_bytes

    gc.collect()
    reset = reset_high_water()
    before = rss_bytes()
    result = run()
    del result
    high = high_water_bytes()
    if not reset or before is None or high is None:
        return None, None
    return max(0, high - before), MEMORY_RSS_FALLBACK


# --------------------------------------------------------------------------- inputs


def make_inputs(n: int, dim: int, dtype: str, seed: int, device: str) -> tuple[Any, Any]:
    """Random L2-normalised torch features on ``device``, text rows correlated with image rows.

    Drawn with a torch generator on the device in float32 (float64 for ``float64``), then
    cast to ``dtype``; the rows of a bfloat16 pair are unit vectors rounded to bfloat16.

    Examples
    --------
    >>> img, txt = make_inputs(5, 3, "bfloat16", 0, "cpu")
    >>> img.shape, str(txt.dtype)
    (torch.Size([5, 3]), 'torch.bfloat16')
    """
    import torch

    target = getattr(torch, dtype)
    work = torch.float64 if dtype == "float64" else torch.float32
    generator = torch.Generator(device=device).manual_seed(seed)
    img = torch.randn(n, dim, generator=generator, device=device, dtype=work)
    img /= torch.linalg.vector_norm(img, dim=1, keepdim=True)
    txt = torch.randn(n, dim, generator=generator, device=device, dtype=work)
    txt *= TEXT_NOISE
    txt += img
    txt /= torch.linalg.vector_norm(txt, dim=1, keepdim=True)
    if target is work:
        return img, txt
    return img.to(target), txt.to(target)


# --------------------------------------------------------------------------- the rows


def roofline_panel(n: int, itemsize: int, limit: int | None = None) -> int:
    """Rows per panel of the roofline's ``S = img @ txt.T``: n while S fits ``limit`` bytes.

    Examples
    --------
    >>> roofline_panel(16384, 4)
    16384
    >>> roofline_panel(262144, 4)
    2048
    """
    limit = ROOFLINE_PANEL_BYTES if limit is None else limit
    if n * n * itemsize <= limit:
        return n
    return max(1024, limit // (n * itemsize) // 1024 * 1024)


def _ours_torch(loss: str, img: Any, txt: Any, block_size: int | None) -> Callable[[], Any]:
    import portable_siglip as ps

    loss_and_grad = ps.sigmoid_loss_and_grad if loss == "sigmoid" else ps.softmax_loss_and_grad

    def run() -> Any:
        value, _ = loss_and_grad(img, txt, SCALE, BIAS, block_size=block_size)
        return value

    return run


def _ours_cupy(
    loss: str, img: Any, txt: Any, block_size: int | None, index: int
) -> Callable[[], Any]:
    import cupy

    import portable_siglip as ps

    loss_and_grad = ps.sigmoid_loss_and_grad if loss == "sigmoid" else ps.softmax_loss_and_grad
    try:
        with cupy.cuda.Device(index):
            img_cp, txt_cp = cupy.from_dlpack(img), cupy.from_dlpack(txt)
    except Exception as error:  # cupy has no bfloat16, for one
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        msg = f"cupy cannot take {str(img.dtype).removeprefix('torch.')} arrays ({first[:120]})"
        raise Skip(msg) from None

    def run() -> Any:
        with cupy.cuda.Device(index):
            value, _ = loss_and_grad(img_cp, txt_cp, SCALE, BIAS, block_size=block_size)
        return value

    return run


def _roofline(img: Any, txt: Any) -> Callable[[], Any]:
    n = img.shape[0]
    panel = roofline_panel(n, img.element_size())

    def run() -> None:
        for start in range(0, n, panel):
            rows = img[start : start + panel, :]
            logits = rows @ txt.T  # (p, d) @ (d, n) -> (p, n)
            logits @ txt  # (p, n) @ (n, d)
            logits.T @ rows  # (n, p) @ (p, d)

    return run


def _autograd(forward: Callable[..., Any], leaves: Sequence[Any]) -> Callable[[], Any]:
    """Forward + ``backward()`` on ``leaves``; their gradients are dropped before returning."""

    def run() -> Any:
        loss = forward(*leaves)
        loss.backward()
        for leaf in leaves:
            leaf.grad = None
        return loss.detach()

    return run


def _open_clip(loss: str, img: Any, txt: Any) -> Callable[[], Any]:
    module = open_clip_loss(loss)
    leaves = torch_leaves(img, txt)
    if loss == "sigmoid":
        return _autograd(module, leaves)
    return _autograd(lambda i, t, scale, _bias: module(i, t, scale), leaves)


def _dense(loss: str, img: Any, txt: Any) -> Callable[[], Any]:
    return _autograd(
        lambda i, t, scale, bias: dense_loss(loss, i, t, scale, bias), torch_leaves(img, txt)
    )


def _siglip_kernel(function: Callable[..., Any], img: Any, txt: Any) -> Callable[[], Any]:
    import torch

    # Its documented call: fused_siglip_loss(img, txt, log_temp, bias), log_temp = log(t),
    # both 0-d float32 tensors on the device that require grad.
    log_temp = torch.tensor(math.log(SCALE), device=img.device, requires_grad=True)
    bias = torch.tensor(BIAS, device=img.device, requires_grad=True)
    leaves = (img.detach().requires_grad_(True), txt.detach().requires_grad_(True))
    return _autograd(function, (*leaves, log_temp, bias))


def siglip_kernel_status() -> tuple[Callable[..., Any] | None, str]:
    """Find ``siglip_kernel.fused_siglip_loss`` without guessing at its API.

    Returns
    -------
    function, status : (callable, str) or (None, str)
        The function and the package's version; or None and why it is not usable: "not
        installed", "installed but failed to import: ...", or "installed but unsupported
        API: ..." when it has no ``fused_siglip_loss(img, txt, log_temp, bias)``.
    """
    try:
        spec = importlib.util.find_spec(SIGLIP_KERNEL_MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return None, "not installed"
    try:
        module = importlib.import_module(SIGLIP_KERNEL_MODULE)
    except Exception as error:  # e.g. no triton
        return None, f"installed but failed to import: {type(error).__name__}: {error}"[:200]
    function = getattr(module, "fused_siglip_loss", None)
    if not callable(function):
        return None, "installed but unsupported API: no siglip_kernel.fused_siglip_loss"
    try:
        inspect.signature(function).bind(None, None, None, None)
    except TypeError:
        return None, (
            "installed but unsupported API: fused_siglip_loss"
            f"{inspect.signature(function)} does not take (img, txt, log_temp, bias)"
        )
    except ValueError:  # no signature to inspect (a builtin): try the call
        pass
    try:
        version = importlib.metadata.version(SIGLIP_KERNEL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = str(getattr(module, "__version__", "unknown version"))
    return function, version


# --------------------------------------------------------------------------- machine notes


def _driver_version() -> str | None:
    try:
        with open("/proc/driver/nvidia/version") as text:
            for word in text.readline().split():
                if word[:1].isdigit() and "." in word:
                    return word
    except OSError:
        pass
    return None


def _cuda_driver_api() -> str | None:
    import ctypes

    try:
        library = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int()
        if library.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


def gpu_info(device: str) -> dict[str, Any] | None:
    """Describe the GPU ``device`` and its software: name, memory, CUDA and driver versions.

    Returns
    -------
    dict or None
        None for a host device.
    """
    import torch

    target = torch.device(device)
    if target.type != "cuda":
        return None
    properties = torch.cuda.get_device_properties(target)
    cudnn: Any = torch.backends.cudnn
    return {
        "device": device,
        "name": properties.name,
        "compute_capability": f"{properties.major}.{properties.minor}",
        "total_memory_bytes": int(properties.total_memory),
        "multiprocessors": int(properties.multi_processor_count),
        "torch_cuda": torch.version.cuda,
        "cudnn": cudnn.version(),
        "driver": _driver_version(),
        "cuda_driver_api": _cuda_driver_api(),
        "device_count": torch.cuda.device_count(),
    }


def _machine(device: _Device, extras: dict[str, str | None]) -> dict[str, Any]:
    import torch

    machine = machine_info(["torch"])
    machine["torch_cuda"] = torch.version.cuda
    machine["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    machine["cuda_matmul_allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    machine["gpu"] = gpu_info(device.name)
    machine.update({name: version for name, version in extras.items() if version is not None})
    return machine


# --------------------------------------------------------------------------- one case


class Case(NamedTuple):
    """One (d, dtype, n, loss) point; its rows are the impls."""

    d: int
    dtype: str
    n: int
    loss: str


def _new_row(device: str, case: Case, impl: str, block_size: int | None) -> dict[str, Any]:
    return {
        "device": device,
        "loss": case.loss,
        "n": case.n,
        "d": case.d,
        "dtype": case.dtype,
        "impl": impl,
        "block_size": block_size if impl in (OURS_TORCH, OURS_CUPY) else None,
        "compute_dtype": None,
        "times_s": [],
        "median_s": None,
        "gflops": None,
        "roofline_fraction": None,
        "peak_bytes": None,
        "peak_mib": None,
        "memory_source": None,
        "predicted_bytes": None,
        "loss_value": None,
        "skipped": None,
        "error": None,
    }


def _gib(value: float) -> str:
    """Format bytes: GiB from 0.1 GiB up, else MiB.

    Examples
    --------
    >>> _gib(44 * 2**30), _gib(3 * 2**20)
    ('44.0 GiB', '3 MiB')
    """
    if value >= 0.1 * GIB:
        return f"{value / GIB:.1f} GiB"
    return f"{value / MIB:.3g} MiB"


def _message(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


class _Bench:
    """The state of one run: the device, what is installed, rows, errors, measured peaks."""

    def __init__(
        self,
        config: GpuConfig,
        device: _Device,
        memory_budget_bytes: int | None,
        open_clip: bool,
        cupy: bool,
        siglip_kernel: Callable[..., Any] | None,
    ) -> None:
        self.config = config
        self.device = device
        self.budget = memory_budget_bytes
        self.open_clip = open_clip
        self.cupy = cupy
        self.siglip_kernel = siglip_kernel
        self.rows: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.peaks: dict[tuple[int, str, str, str], tuple[int, int]] = {}

    def impls(self, loss: str) -> list[str]:
        impls = [OURS_TORCH]
        if self.cupy:
            impls.append(OURS_CUPY)
        impls.append(ROOFLINE)
        if self.siglip_kernel is not None and loss == "sigmoid":
            impls.append(SIGLIP_KERNEL)
        if self.config.dense:
            if self.open_clip:
                impls.append(OPEN_CLIP)
            impls.append(DENSE)
        return impls

    def free_bytes(self) -> int | None:
        return self.budget if self.budget is not None else self.device.free_bytes()

    def predict(self, case: Case, impl: str) -> float:
        """Predicted peak bytes of an n x n row: a floor of n^2 matrices, or a measured peak."""
        itemsize = ITEMSIZE[case.dtype]
        measured = self.peaks.get((case.d, case.dtype, case.loss, impl))
        return max(
            DENSE_N2_MATRICES * case.n * case.n * itemsize,
            predict_peak_bytes(case.loss, impl, case.n, case.d, itemsize, 1, measured),
        )

    def fail(self, case: Case, row: dict[str, Any], text: str) -> None:
        row["error"] = text
        where = f"{case.dtype} {case.loss} d={case.d} n={case.n} {row['impl']}"
        self.errors.append(f"{where}: {text}")

    def make_run(self, case: Case, impl: str, img: Any, txt: Any) -> Callable[[], Any]:
        block = self.config.block_size
        if impl == OURS_TORCH:
            return _ours_torch(case.loss, img, txt, block)
        if impl == OURS_CUPY:
            return _ours_cupy(case.loss, img, txt, block, self.device.index or 0)
        if impl == ROOFLINE:
            return _roofline(img, txt)
        if impl == SIGLIP_KERNEL:
            assert self.siglip_kernel is not None
            return _siglip_kernel(self.siglip_kernel, img, txt)
        if impl == OPEN_CLIP:
            return _open_clip(case.loss, img, txt)
        if impl == DENSE:
            return _dense(case.loss, img, txt)
        msg = f"no GPU benchmark row {impl!r}"
        raise ValueError(msg)

    def attempt(
        self, case: Case, row: dict[str, Any], step: str, call: Callable[[], Any]
    ) -> tuple[bool, Any]:
        """Call; an out-of-memory error makes the row a skip, any other error a failure."""
        try:
            return True, call()
        except Skip as reason:
            row["skipped"] = str(reason)
        except self.device.oom_errors as error:
            row["skipped"] = f"out of memory in the {step}: {_message(error)}"
        except Exception as error:
            self.fail(case, row, f"{step}: {_message(error)}")
        self.device.release()
        return False, None

    def timed(self, run: Callable[[], Any]) -> float:
        gc.collect()  # not inside the timed region
        self.device.sync()
        start = time.perf_counter()
        result = run()
        self.device.sync()
        elapsed = time.perf_counter() - start
        del result
        return elapsed

    def run_case(self, case: Case, img: Any, txt: Any, block_size: int) -> None:
        """Warm up, measure and time every row of one case; append them to ``self.rows``."""
        impls = self.impls(case.loss)
        rows = {impl: _new_row(self.device.name, case, impl, block_size) for impl in impls}
        runs: dict[str, Callable[[], Any]] = {}
        budget = self.free_bytes() if any(i in N2_IMPLS for i in impls) else None
        for impl in impls:
            row = rows[impl]
            row["compute_dtype"] = (
                "float32"
                if impl in (OURS_TORCH, OURS_CUPY) and case.dtype == "bfloat16"
                else case.dtype
            )
            if impl in N2_IMPLS:
                predicted = self.predict(case, impl)
                row["predicted_bytes"] = predicted
                if budget is not None and predicted > budget:
                    row["skipped"] = (
                        f"predicted {_gib(predicted)} > {_gib(budget)} free on {self.device.name}"
                    )
                    continue
            ok, run = self.attempt(
                case, row, "set-up", functools.partial(self.make_run, case, impl, img, txt)
            )
            if ok:
                runs[impl] = run
        for impl, run in list(runs.items()):  # warm-up, keeping the loss value
            ok, value = self.attempt(case, rows[impl], "warm-up", run)
            if not ok:
                del runs[impl]
            elif value is not None:
                rows[impl]["loss_value"] = float(value)
        for impl, run in list(runs.items()):  # one run for the peak memory
            measure = functools.partial(self.device.measure, impl, run)
            ok, reading = self.attempt(case, rows[impl], "memory run", measure)
            if not ok:
                del runs[impl]
                continue
            peak, source = reading
            rows[impl].update(
                peak_bytes=peak, peak_mib=None if peak is None else peak / MIB, memory_source=source
            )
        for _ in range(self.config.repeats):
            for impl, run in list(runs.items()):
                timed = functools.partial(self.timed, run)
                ok, elapsed = self.attempt(case, rows[impl], "timed runs", timed)
                if ok:
                    rows[impl]["times_s"].append(elapsed)
                else:
                    del runs[impl]
        runs.clear()
        self.device.release()
        self.record(case, rows)

    def record(self, case: Case, rows: dict[str, dict[str, Any]]) -> None:
        flops = 6.0 * case.n * case.n * case.d
        for row in rows.values():
            if row["skipped"] is None and row["error"] is None and row["times_s"]:
                row["median_s"] = statistics.median(row["times_s"])
                row["gflops"] = flops / row["median_s"] / 1e9 if row["median_s"] > 0 else None
        roofline = rows.get(ROOFLINE, {}).get("median_s")
        for impl, row in rows.items():
            if roofline is not None and row["median_s"]:
                row["roofline_fraction"] = roofline / row["median_s"]
            if impl in N2_IMPLS and row["peak_bytes"] is not None:
                self.peaks[(case.d, case.dtype, case.loss, impl)] = (case.n, row["peak_bytes"])
            self.rows.append(row)


# --------------------------------------------------------------------------- the run


def _cases(config: GpuConfig) -> list[Case]:
    return [
        Case(d, dtype, n, loss)
        for d in config.dims
        for dtype in config.dtypes
        for n in config.sizes
        for loss in config.losses
    ]


def _open_clip_version(dense: bool) -> tuple[bool, str | None, str | None]:
    if not dense:
        return False, None, None
    from .baselines import open_clip_info

    info = open_clip_info()
    if info.get("installed"):
        return True, str(info["version"]), None
    return False, None, "note: open-clip-torch is not installed; its rows are left out"


def _cupy_status(device: _Device) -> tuple[bool, str | None, str | None]:
    if not device.is_cuda:
        return False, None, f"note: no `{OURS_CUPY}` rows: cupy arrays need a CUDA device"
    if not installed("cupy"):
        return False, None, f"note: cupy is not installed; no `{OURS_CUPY}` rows"
    try:
        import cupy
    except Exception as error:
        return False, None, f"note: cupy does not import ({_message(error)}); no cupy rows"
    return True, str(cupy.__version__), None


def run_benchmark(
    config: GpuConfig,
    device: str,
    *,
    memory_budget_bytes: int | None = None,
    progress_stream: Any = None,
) -> dict[str, Any]:
    """Run every case of ``config`` on ``device`` and return the report.

    Parameters
    ----------
    config : GpuConfig
        The grid and options.
    device : str
        A torch device: ``cuda``, ``cuda:N``, or ``cpu``, which runs the same machinery
        without the CUDA calls (no cupy and siglip-kernel rows; memory from the CPU fallback).
    memory_budget_bytes : int, optional
        The memory the n x n rows may use (default: the free memory of the device, read
        before each case: ``torch.cuda.mem_get_info`` plus torch's unused cache; on the host,
        ``MemAvailable``).
    progress_stream : file-like, optional
        Where the progress line goes (default: stderr).

    Returns
    -------
    dict
        ``machine``, ``config``, ``rows`` (one dict per row and case), ``notes`` and
        ``errors``: what ``--json`` writes.
    """
    problem = config.problem()
    if problem is not None:
        raise ValueError(problem)
    from .._checks import default_block_size

    target = _Device(device)
    notes: list[str] = []
    open_clip, open_clip_version, note = _open_clip_version(config.dense)
    notes += [note] if note else []
    cupy, cupy_version, note = _cupy_status(target)
    notes += [note] if note else []
    kernel, kernel_status = siglip_kernel_status()
    if kernel is not None and not target.is_cuda:
        kernel, kernel_status = None, "needs a CUDA device (Triton)"
    if kernel is None:
        notes.append(f"note: siglip-kernel {kernel_status}; no `{SIGLIP_KERNEL}` rows")
    machine = _machine(
        target,
        {
            "cupy": cupy_version,
            "open_clip": open_clip_version,
            "siglip_kernel": kernel_status if kernel is not None else None,
        },
    )
    bench = _Bench(config, target, memory_budget_bytes, open_clip, cupy, kernel)
    cases = _cases(config)
    progress = Progress(
        [c.n * c.n * c.d * (4 if c.loss == "softmax" else 3) for c in cases],
        stream=progress_stream,
    )
    started = time.perf_counter()
    inputs: tuple[Any, Any] | None = None
    key: tuple[int, str, int] | None = None
    block_size = config.block_size
    failed = ""
    for case in cases:
        progress.start(f"{case.dtype} {case.loss} d={case.d} n={case.n}")
        if key != (case.d, case.dtype, case.n):
            inputs = None  # free the previous inputs before drawing the next
            target.release()
            key = (case.d, case.dtype, case.n)
            try:
                inputs = make_inputs(case.n, case.d, case.dtype, config.seed, target.name)
            except target.oom_errors as error:
                inputs = None
                failed = f"out of memory drawing the inputs: {_message(error)}"
                target.release()
            if inputs is not None:
                block_size = config.block_size or default_block_size(inputs[0])
        if inputs is None or block_size is None:
            for impl in bench.impls(case.loss):
                row = _new_row(target.name, case, impl, block_size)
                row["skipped"] = failed
                bench.rows.append(row)
        else:
            bench.run_case(case, *inputs, block_size)
        progress.advance()
    progress.close()
    inputs = None
    target.release()
    machine["load_average_after"] = list(os.getloadavg())
    machine["wall_s"] = time.perf_counter() - started
    return {
        "machine": machine,
        "config": {
            "device": target.name,
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
            "default_block_size": default_block_size(_probe_array(target)),
            "scale": SCALE,
            "bias": BIAS,
            "memory_budget_bytes": memory_budget_bytes,
            "roofline_panel_bytes": ROOFLINE_PANEL_BYTES,
            "dense_n2_matrices": DENSE_N2_MATRICES,
        },
        "rows": bench.rows,
        "notes": [*notes, *NOTES],
        "errors": bench.errors,
    }


def _probe_array(device: _Device) -> Any:
    return device.torch.empty(0, device=device.device)


# --------------------------------------------------------------------------- reporting

NOTES = (
    "GFLOP/s counts 6 n^2 d flops (three GEMMs of 2 n^2 d) for every row, whatever it did, "
    "so the rows compare; roofline frac = roofline time / row time, the roofline being "
    "S = img @ txt.T, S @ txt and S.T @ img with torch in the input dtype on the same device, "
    "timed the same way in the same run. Softmax rows do a fourth GEMM (the log-sum-exp "
    "pass): their roofline frac is at most about 0.75.",
    "Our rows compute bfloat16 inputs in float32 (the library's rule: GEMMs and sums in "
    "float32, the inputs cast once per call); the roofline, open_clip, dense autograd and "
    "siglip-kernel rows run in bfloat16. compute_dtype in the JSON says which.",
    "Timing: each row runs once as a warm-up and once to read its memory, then --repeats "
    "rounds in which every row runs once, in turn; the median is shown. A timed call is the "
    "wall-clock time between two device synchronisations (torch.cuda.synchronize), so it "
    "includes the Python and launch overhead of the call.",
    "peak MiB: torch rows: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), "
    "minus memory_allocated() just before the call (inputs excluded; outputs, gradients, "
    "temporaries and workspaces included). ours cupy: the growth of cupy's default memory "
    "pool's total_bytes() over one call started after free_all_blocks() (the pool keeps its "
    "blocks during a call, so the growth is the peak of the blocks it held, rounded up to its "
    "block sizes). On the host (cpu, the tests) a fallback: VmHWM minus VmRSS before the call.",
    "open_clip and dense autograd rows predicted to need more than the free device memory "
    f"(at least {DENSE_N2_MATRICES:g} n x n matrices of the input dtype, or the peak measured "
    "at a smaller n scaled by n^2) are skipped with the prediction; a row that runs out of "
    "memory anyway is reported as skipped with the allocator's message.",
    "siglip-kernel: fused_siglip_loss(img, txt, log(t), b) and backward(), with the "
    "package's own choice of backend; its loss value may be normalised differently.",
)


def table(rows: Sequence[dict[str, Any]]) -> str:
    """Lay out the rows of a report as a text table, skipped rows with their reason."""
    header = (
        "dtype",
        "loss",
        "d",
        "n",
        "impl",
        "median s",
        "GFLOP/s",
        "roofline frac",
        "peak MiB",
        "loss value",
    )
    lines = [header]
    for row in rows:
        if row["skipped"] is not None:
            cells = ("skipped: " + row["skipped"], "", "", "", "")
        elif row["error"] is not None:
            cells = ("error (see below)", "", "", "", "")
        else:
            cells = (
                fmt(row["median_s"], ".4f"),
                fmt(row["gflops"], ".0f"),
                fmt(row["roofline_fraction"], ".2f"),
                fmt(row["peak_mib"], ".1f"),
                fmt(row["loss_value"], ".6g"),
            )
        lines.append((row["dtype"], row["loss"], str(row["d"]), str(row["n"]), row["impl"], *cells))
    return render_table(lines, left={0, 1, 4})


def _header(report: dict[str, Any]) -> str:
    machine, config = report["machine"], report["config"]
    gpu = machine.get("gpu")
    if gpu is None:
        where = f"{config['device']} (no GPU: a dry run of the machinery); {machine['cpu']}"
    else:
        where = (
            f"{config['device']} = {gpu['name']} ({_gib(gpu['total_memory_bytes'])}, compute "
            f"capability {gpu['compute_capability']}); driver {gpu['driver'] or '?'} "
            f"(CUDA driver API {gpu['cuda_driver_api'] or '?'})"
        )
    versions = f"torch {machine['torch']} (CUDA {machine['torch_cuda'] or 'none'})"
    for name, label in (
        ("cupy", "cupy"),
        ("open_clip", "open-clip-torch"),
        ("siglip_kernel", "siglip-kernel"),
    ):
        if name in machine:
            versions += f", {label} {machine[name]}"
    block = config["block_size"] or f"default ({config['default_block_size']} here)"
    dims = ", ".join(str(d) for d in config["dims"])
    return "\n".join(
        [
            "portable-siglip bench --device: forward + gradient on "
            f"{config['device']}, d in {{{dims}}}, {', '.join(config['dtypes'])}, "
            f"t = {SCALE:g}, b = {BIAS:g}, block_size = {block}, median of "
            f"{config['repeats']} interleaved rounds after 1 warm-up and 1 memory run",
            f"device: {where}",
            f"versions: {versions}; python {machine['python']}",
            f"float32 matmul: torch.backends.cuda.matmul.allow_tf32 = "
            f"{machine['cuda_matmul_allow_tf32']}, float32_matmul_precision = "
            f"{machine['float32_matmul_precision']!r}",
        ]
    )


def config_from_args(args: argparse.Namespace) -> GpuConfig:
    """Build the configuration from ``bench`` options (``--device cuda`` resolved by the cli)."""
    dtype = args.dtype if args.dtype is not None else list(DEFAULT_DTYPES)
    dtypes = [d.strip() for d in dtype.split(",")] if isinstance(dtype, str) else list(dtype)
    dims = args.dims or ([args.dim] if getattr(args, "dim", None) else [DEFAULT_DIM])
    return GpuConfig(
        sizes=tuple(args.sizes or DEFAULT_SIZES),
        dims=tuple(dims),
        dtypes=tuple(dtypes),
        losses=tuple(args.losses),
        block_size=args.block_size,
        repeats=int(args.repeats),
        seed=int(args.seed),
        dense=not getattr(args, "no_dense", False),
    )


def main(args: argparse.Namespace, *, memory_budget_bytes: int | None = None) -> int:
    """Run the GPU benchmark on ``args.device``, print its table and optionally write JSON.

    Parameters
    ----------
    args : argparse.Namespace
        Options from :func:`portable_siglip.bench.cli.add_arguments`, ``device`` already
        checked (``portable_siglip.bench.cli.main`` does it).
    memory_budget_bytes : int, optional
        Passed to :func:`run_benchmark` (tests).

    Returns
    -------
    int
        0 when every row ran or was skipped, 1 when some row failed, 2 for invalid options.
    """
    config = config_from_args(args)
    problem = config.problem()
    if problem is not None:
        print(f"bench: error: {problem}", file=sys.stderr)
        return 2
    if not installed("numpy"):
        print("bench: error: the machine notes need numpy; install numpy", file=sys.stderr)
        return 2
    print(
        f"portable-siglip bench on {args.device}: {len(_cases(config))} cases, "
        f"{len(config.sizes)} sizes up to n = {max(config.sizes)}",
        flush=True,
    )
    report = run_benchmark(config, str(args.device), memory_budget_bytes=memory_budget_bytes)
    print(_header(report))
    print()
    print(table(report["rows"]))
    print()
    print_notes(report["notes"], report["errors"])
    print_load_after(report["machine"])
    json_path: str | os.PathLike[str] | None = getattr(args, "json", None)
    write_report(None if json_path is None else Path(json_path), report)
    return 1 if report["errors"] else 0
