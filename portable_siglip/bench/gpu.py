"""``python -m portable_siglip bench --device cuda``: forward + gradient on a GPU.

For every (d, dtype, n, loss) these rows run on the same random, L2-normalised, correlated
features, drawn on the device (t = 10, b = -10):

``ours torch``
    :func:`portable_siglip.sigmoid_loss_and_grad` / :func:`softmax_loss_and_grad` on torch
    tensors on the device, ``block_size`` the library's default there (4096 on a GPU,
    :func:`portable_siglip._checks.default_block_size`) unless ``--block-size`` is given. For
    bfloat16 inputs with ``precision="fast"``: the GEMMs take bfloat16 operands and
    accumulate in float32 (tensor cores); the sums stay float32. float32 inputs compute in
    float32 whatever the option (no TF32).
``ours torch exact`` (bfloat16 only)
    The same call with ``precision="exact"``: float32 GEMM operands.
``ours cupy`` (when cupy is installed, on a GPU)
    The same call, default precision, on cupy arrays that share the torch tensors' memory
    through DLPack (:func:`from_torch`). cupy 14 with ml_dtypes imports torch's bfloat16 as
    an ``ml_dtypes.bfloat16`` array, and the library takes it on purpose.
``GEMM floor``
    The GEMMs of the loss and its gradient and nothing else, in the input dtype, with torch
    on the device: ``S = img @ txt.T``, ``S @ txt`` and ``S.T @ img``; the softmax loss
    forms ``S`` once more (its log-sum-exp pass must see whole rows before the gradient).
    Above :data:`FLOOR_PANEL_BYTES` of ``S``, on row panels of ``S``.
``compiled dense``
    :func:`portable_siglip.bench.baselines.dense_loss` under ``torch.compile(dynamic=True)``
    (one compilation per loss and dtype, reused across n), forward + ``backward()``. On the
    host (a dry run) ``backend="eager"``: dynamo alone, no code generation.
``dense autograd``
    :func:`portable_siglip.bench.baselines.dense_loss` with autograd.
``open_clip`` (when open-clip-torch is installed)
    open_clip's ``SigLipLoss`` / ``ClipLoss`` with autograd.
``siglip-kernel`` (bfloat16 sigmoid, when the package is installed, on a GPU)
    ``siglip_kernel.fused_siglip_loss(img, txt, log_temp, bias)`` then ``backward()``: a
    Triton SigLIP loss (PyPI ``siglip-kernel``). It autotunes on its first call at each
    shape, so its rows run in a step of their own after every other row, largest n first;
    their floor fraction uses the floor measured earlier in the same run.

The last three rows hold n x n matrices. A row of theirs predicted to need more than the
device's free memory is skipped with the prediction stated, and one that runs out of memory
all the same is reported as skipped, with the allocator's message. A row whose library is
missing is a skipped row with the reason; one that fails (a compile error, say) is recorded
with its error and the run goes on. The exit status is 1 only when one of our rows or the
floor fails.

Timing: every row runs once as a warm-up (its seconds are ``warmup_s``: compilation and
autotuning show there), once more to read its peak memory, then R rounds in which each row
runs once, in turn; the median is reported. R is ``--repeats``, or by default fewer at large
n (:data:`REPEATS_BY_SIZE`). A timed call is wall-clock time between two device
synchronisations. GFLOP/s counts the floor's flops (``6 n^2 d`` sigmoid, ``8 n^2 d``
softmax) for every row; floor frac = floor time / row time.

The time plan: :func:`plan` predicts every step from a GPU's rates (:data:`H100`), and the
run skips a case (with the reason) that would take it past ``--time-budget``, keeping room
for the largest siglip-kernel row. Every row is written to ``--json`` as soon as its case is
measured (the whole file, rewritten atomically), so a run cut short still reports.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from .. import _registry as registry
from .baselines import DENSE, OPEN_CLIP, dense_loss, open_clip_forward
from .common import (
    BIAS,
    GIB,
    GPU_DTYPES,
    MIB,
    SCALE,
    TEXT_NOISE,
    Progress,
    fmt,
    installed,
    loss_and_grad,
    machine_info,
    panel_rows,
    print_load_after,
    print_notes,
    proc_kib,
    refuse,
    render_table,
    torch_leaves,
    write_json_atomic,
)

__all__ = [
    "DEFAULT_DIM",
    "DEFAULT_DTYPES",
    "DEFAULT_SIZES",
    "DEFAULT_TIME_BUDGET_S",
    "GPU_DTYPES",
    "H100",
    "IMPLS",
    "GpuConfig",
    "Rates",
    "floor_panel",
    "from_torch",
    "gpu_info",
    "main",
    "make_inputs",
    "plan",
    "run_benchmark",
    "siglip_kernel_status",
    "table",
]

OURS_TORCH = "ours torch"
OURS_TORCH_EXACT = "ours torch exact"
OURS_CUPY = "ours cupy"
FLOOR = "GEMM floor"
COMPILED = "compiled dense"
SIGLIP_KERNEL = "siglip-kernel"

#: The rows of a case, in the order they run and are shown (siglip-kernel in a later step).
IMPLS = (OURS_TORCH, OURS_TORCH_EXACT, OURS_CUPY, FLOOR, COMPILED, DENSE, OPEN_CLIP, SIGLIP_KERNEL)

#: Our rows and the floor: a failure of one of them makes the exit status 1.
OWN_IMPLS = (OURS_TORCH, OURS_TORCH_EXACT, OURS_CUPY, FLOOR)

#: Rows that hold n x n matrices, and the least of them each is predicted to need, in n x n
#: matrices of the input dtype (the CPU sweep measured 5.0 for dense autograd at float32,
#: n = 8192; the compiled loss keeps the logits and their gradient).
N2_MATRICES = {COMPILED: 2.0, DENSE: 5.5, OPEN_CLIP: 5.5}
N2_IMPLS = tuple(N2_MATRICES)

#: Input dtypes that take ``precision="fast"`` (half-precision GEMM operands).
HALF_DTYPES = ("bfloat16",)

#: Batch sizes n of ``bench --device cuda`` (``--sizes``).
DEFAULT_SIZES = (8192, 16384, 32768, 65536)

#: Feature dimension d of ``bench --device cuda`` (``--dim``).
DEFAULT_DIM = 768

#: Dtypes of ``bench --device cuda`` (``--dtype``), in the order they run.
DEFAULT_DTYPES = ("bfloat16", "float32")

#: Timed rounds by n when ``--repeats`` is not given: ``(largest n, rounds)``, in order.
REPEATS_BY_SIZE = ((16384, 5), (32768, 3), (math.inf, 2))

#: Seconds a default ``bench --device cuda`` run may take (``--time-budget``).
DEFAULT_TIME_BUDGET_S = 170.0

ITEMSIZE = {"float32": 4, "float64": 8, "bfloat16": 2}

#: Largest ``S = img @ txt.T`` (bytes) the floor forms whole; above, it goes by row panels.
FLOOR_PANEL_BYTES = 2 * GIB

#: What the ``memory_source`` field of a row says its ``peak_bytes`` is.
MEMORY_RSS_FALLBACK = "VmHWM - VmRSS (cpu fallback, in process)"

SIGLIP_KERNEL_MODULE = "siglip_kernel"
SIGLIP_KERNEL_DISTRIBUTION = "siglip-kernel"

STEP_MAIN = "main"
STEP_KERNEL = "siglip-kernel"

#: The one loss siglip-kernel computes (its step runs only when this loss is benchmarked).
SIGLIP_KERNEL_LOSS = "sigmoid"


def floor_gemms(loss: str) -> int:
    """Return the GEMMs of n x n x d of the floor of ``loss``: its registered GEMMs per tile.

    Examples
    --------
    >>> floor_gemms("sigmoid"), floor_gemms("softmax")
    (3, 4)
    """
    return int(registry.get(loss).gemms_per_tile)


class Skip(Exception):  # noqa: N818 - a reason to leave a row out, not an error
    """A row cannot run here; the message says why (e.g. cupy is not installed)."""


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
        Names of registered losses (default: every registered loss).
    block_size : int or None
        Tile edge of our rows (None: the library's default on the device).
    repeats : int or None
        Timed rounds after the warm-up and the memory run (None: :data:`REPEATS_BY_SIZE`).
    seed : int
        Seed of the random inputs.
    dense : bool
        Whether to run the ``open_clip``, ``dense autograd`` and ``compiled dense`` rows.
    compiled : bool
        Whether to run the ``compiled dense`` row (with ``dense``).
    time_budget_s : float or None
        Skip the cases that would take the run past this many seconds (None: no limit).
    """

    sizes: tuple[int, ...] = DEFAULT_SIZES
    dims: tuple[int, ...] = (DEFAULT_DIM,)
    dtypes: tuple[str, ...] = DEFAULT_DTYPES
    losses: tuple[str, ...] = field(default_factory=registry.names)
    block_size: int | None = None
    repeats: int | None = None
    seed: int = 0
    dense: bool = True
    compiled: bool = True
    time_budget_s: float | None = None

    def problem(self) -> str | None:
        """Say what is wrong with this configuration, or None."""
        unknown = [d for d in self.dtypes if d not in GPU_DTYPES]
        if not self.dtypes or unknown:
            return f"`--dtype` must be among {', '.join(GPU_DTYPES)}; got {list(self.dtypes)}"
        known = registry.names()
        unknown = [loss for loss in self.losses if loss not in known]
        if not self.losses or unknown:
            return f"`--losses` must be among {', '.join(known)}; got {list(self.losses)}"
        for name in ("sizes", "dims"):
            values = getattr(self, name)
            if not values or any(int(v) <= 0 for v in values):
                return f"`--{name}` must be positive integers; got {list(values)}"
        if self.repeats is not None and int(self.repeats) <= 0:
            return f"`--repeats` must be a positive integer; got {self.repeats!r}"
        if self.block_size is not None and int(self.block_size) <= 0:
            return f"`--block-size` must be a positive integer; got {self.block_size!r}"
        budget = self.time_budget_s
        if budget is not None and not (math.isfinite(budget) and budget > 0):
            return f"`--time-budget` must be a positive number of seconds; got {budget!r}"
        return None

    def repeats_for(self, n: int) -> int:
        """Return the timed rounds at batch size ``n``.

        Examples
        --------
        >>> [GpuConfig().repeats_for(n) for n in (8192, 32768, 65536)]
        [5, 3, 2]
        >>> GpuConfig(repeats=4).repeats_for(65536)
        4
        """
        if self.repeats is not None:
            return int(self.repeats)
        return next(rounds for largest, rounds in REPEATS_BY_SIZE if n <= largest)


# --------------------------------------------------------------------------- the time plan


class Rates(NamedTuple):
    """What :func:`plan` assumes of a GPU: predictions for the time budget, not measurements.

    Attributes
    ----------
    name : str
        The GPU.
    half_flops, float32_flops : float
        FLOP/s of large GEMMs: bfloat16 on tensor cores; float32 without TF32.
    bandwidth : float
        Bytes/s of the elementwise passes over the n x n values.
    memory_bytes : float
        Device memory a row may use.
    startup_s : float
        CUDA context, library handles and the first kernels.
    compile_s : float
        The run's first ``torch.compile`` of the dense loss, forward and backward.
    recompile_s : float
        Each later one (another loss or dtype; n is dynamic).
    autotune_s : float
        siglip-kernel's Triton autotuning, per n.
    """

    name: str
    half_flops: float
    float32_flops: float
    bandwidth: float
    memory_bytes: float
    startup_s: float
    compile_s: float
    recompile_s: float
    autotune_s: float


#: An H100 SXM 80 GB: about 790 TFLOP/s peak in bfloat16 (600 assumed for cuBLAS at these
#: shapes), 67 in float32 (50 assumed), 3.35 TB/s (2.5 assumed for elementwise kernels).
#: Compilation and autotuning are guesses; the run corrects its pace from what it measures.
H100 = Rates("H100 SXM 80GB", 6.0e14, 5.0e13, 2.5e12, 78 * GIB, 15.0, 20.0, 10.0, 25.0)

#: Bytes moved per n x n element by one call of each row, beyond its GEMMs (the elementwise
#: passes of float32 tiles, or of the dense autograd graph); siglip-kernel fuses them.
ELEMENTWISE_BYTES = {
    OURS_TORCH: 24.0,
    OURS_TORCH_EXACT: 24.0,
    OURS_CUPY: 24.0,
    FLOOR: 0.0,
    COMPILED: 16.0,
    DENSE: 40.0,
    OPEN_CLIP: 40.0,
    SIGLIP_KERNEL: 0.0,
}

# The plan of the default run (n = 8192 ... 65536, d = 768, bfloat16 then float32, both
# losses, every library installed) on the H100 rates above, from plan(GpuConfig()), seconds:
#
#   start-up (CUDA context, cuBLAS, cupy)                                          15
#   bfloat16, 8 cases, 7 rows each; calls = 2 + 5 | 5 | 3 | 2 rounds by n          46
#     one call at n = 65536: floor 0.033, ours fast 0.074, exact and cupy 0.44,
#     compiled 0.06, dense and open_clip 0.10; the first compilation (20) and the
#     softmax's (10) fall in the n = 8192 cases
#   float32, 8 cases, 6 rows each (one `ours torch`): ~0.4-0.46 s a call at         45
#     n = 65536, where dense and open_clip are skipped (5.5 x 16 GiB > 78 GiB);
#     two more compilations (10 each)
#   siglip-kernel, bfloat16 sigmoid, n = 65536 first: 25 s of autotuning each      4 x 25
#   total                                                                         207
#
# So the main step ends near 106 s; the n = 65536 siglip-kernel row (25 s) is kept out of
# the budget of the main step, and with --time-budget 170 the n = 32768 row fits after it
# while 16384 and 8192 are skipped with the reason. Predictions are corrected as the run
# goes by the ratio of measured to predicted seconds (_Pace). The whole run, with the
# interpreter's start and imports, stays near 3 minutes whatever the guesses miss, because
# nothing starts that the budget cannot hold. test_bench_gpu.py checks this arithmetic.


def _computes_in_half(impl: str, dtype: str) -> bool:
    if dtype not in HALF_DTYPES:
        return False
    return impl not in (OURS_TORCH_EXACT, OURS_CUPY)  # cupy: float32 GEMMs on rounded operands


def predict_row_seconds(impl: str, case: Case, rates: Rates = H100) -> float:
    """Predict one call of a row: its GEMMs at the dtype's rate plus its elementwise passes.

    Examples
    --------
    >>> case = Case(768, "bfloat16", 65536, "sigmoid")
    >>> round(predict_row_seconds("GEMM floor", case) * 1e3)  # 3 GEMMs of 6.6 TFLOP
    33
    >>> round(predict_row_seconds("ours torch exact", case) * 1e3)
    437
    """
    n2 = float(case.n) * case.n
    gemms = floor_gemms(case.loss) if impl in OWN_IMPLS else 3
    if impl == SIGLIP_KERNEL:
        gemms = 6  # published: twice the floor (48.8 ms at n = 65536 on a GH200)
    rate = rates.half_flops if _computes_in_half(impl, case.dtype) else rates.float32_flops
    return gemms * 2.0 * n2 * case.d / rate + n2 * ELEMENTWISE_BYTES[impl] / rates.bandwidth


def _predicted_n2_bytes(impl: str, case: Case) -> float:
    return N2_MATRICES[impl] * float(case.n) * case.n * ITEMSIZE[case.dtype]


def plan(
    config: GpuConfig, rates: Rates = H100, impls: Sequence[str] = IMPLS
) -> list[tuple[str, float]]:
    """Predict the seconds of every step of a run of ``config`` on a GPU with ``rates``.

    Parameters
    ----------
    config : GpuConfig
        The run.
    rates : Rates
        The GPU (default :data:`H100`).
    impls : sequence of str
        The rows that will run (default: all, as with every library installed).

    Returns
    -------
    list of (str, float)
        ``("start-up", s)``, then one entry per case in the order they run, then one per
        siglip-kernel row (largest n first); n x n rows predicted above
        ``rates.memory_bytes`` count as skipped, and each first compilation of a (loss,
        dtype) and each autotuning is added to its step.
    """
    steps = [("start-up", rates.startup_s)]
    compiled: set[tuple[str, str]] = set()
    for case in _cases(config):
        seconds = 0.0
        for impl in _case_impls(case, impls, config):
            if impl in N2_IMPLS and _predicted_n2_bytes(impl, case) > rates.memory_bytes:
                continue
            calls = 2 + config.repeats_for(case.n)
            seconds += calls * predict_row_seconds(impl, case, rates)
            if impl == COMPILED and (case.loss, case.dtype) not in compiled:
                seconds += rates.recompile_s if compiled else rates.compile_s
                compiled.add((case.loss, case.dtype))
        steps.append((_label(case), seconds))
    if SIGLIP_KERNEL in impls:
        for case in _kernel_cases(config):
            calls = 2 + config.repeats_for(case.n)
            seconds = calls * predict_row_seconds(SIGLIP_KERNEL, case, rates) + rates.autotune_s
            steps.append((f"{SIGLIP_KERNEL} {_label(case)}", seconds))
    return steps


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
        return proc_kib("/proc/meminfo", "MemAvailable")

    def measure(self, impl: str, run: Callable[[], Any]) -> tuple[int | None, str | None]:
        """Run once; return its peak extra bytes and where that reading comes from."""
        if not self.is_cuda:
            return _rss_peak(run)
        from .._memory import device_peak_bytes, reset_device_peak

        self.sync()
        start = reset_device_peak("cupy" if impl == OURS_CUPY else "torch", self.index)
        result = run()
        del result
        return device_peak_bytes(start)


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


def from_torch(xp: Any, tensor: Any) -> Any:
    """Share a torch tensor's memory with the array library ``xp`` (cupy, or numpy) via DLPack.

    A bfloat16 tensor becomes an ``ml_dtypes.bfloat16`` array on purpose. cupy 14 with
    ml_dtypes installed imports it so directly; a library whose DLPack import refuses
    bfloat16 (numpy, cupy without ml_dtypes) gets the same bits as int16 and views them as
    ``ml_dtypes.bfloat16``. Either way no copy is made.

    Parameters
    ----------
    xp : module
        ``cupy`` or ``numpy`` (it needs ``from_dlpack``).
    tensor : torch.Tensor
        On a device ``xp`` can read.

    Returns
    -------
    array of ``xp``
        Same shape, same memory; dtype ``ml_dtypes.bfloat16`` for a bfloat16 tensor.

    Raises
    ------
    Skip
        For a bfloat16 tensor when ml_dtypes is not installed, or ``xp`` cannot view the bits
        as ``ml_dtypes.bfloat16``.

    Examples
    --------
    >>> import numpy as np, torch
    >>> array = from_torch(np, torch.tensor([1.5, -2.0], dtype=torch.bfloat16))
    >>> str(array.dtype), array.astype(np.float32).tolist()
    ('bfloat16', [1.5, -2.0])
    """
    import torch

    if tensor.dtype != torch.bfloat16:
        return xp.from_dlpack(tensor)
    try:
        import ml_dtypes
    except ImportError:
        msg = f"{xp.__name__} has no bfloat16 here: ml_dtypes is not installed"
        raise Skip(msg) from None
    with contextlib.suppress(Exception):
        array = xp.from_dlpack(tensor)  # cupy 14 + ml_dtypes
        if array.dtype == ml_dtypes.bfloat16:
            return array
    try:
        return xp.from_dlpack(tensor.view(torch.int16)).view(ml_dtypes.bfloat16)
    except Exception as error:
        msg = f"{xp.__name__} cannot view bfloat16 bits as ml_dtypes.bfloat16 ({_message(error)})"
        raise Skip(msg) from None


# --------------------------------------------------------------------------- the rows


def floor_panel(n: int, itemsize: int, limit: int | None = None) -> int:
    """Rows per panel of the floor's ``S = img @ txt.T``: n while S fits ``limit`` bytes.

    Examples
    --------
    >>> floor_panel(16384, 4)
    16384
    >>> floor_panel(262144, 4)
    2048
    """
    return panel_rows(n, itemsize, FLOOR_PANEL_BYTES if limit is None else limit)


def _ours(
    loss: str, img: Any, txt: Any, block_size: int | None, precision: str | None
) -> Callable[[], Any]:
    """Our loss and gradient on ``img`` and ``txt`` (any library); returns the loss value."""
    function = loss_and_grad(loss)
    options: dict[str, Any] = {"block_size": block_size}
    if precision is not None:
        options["precision"] = precision

    def run() -> Any:
        value, _ = function(img, txt, SCALE, BIAS, **options)
        return value

    return run


def _ours_cupy(
    loss: str, img: Any, txt: Any, block_size: int | None, precision: str | None, index: int
) -> tuple[Callable[[], Any], str]:
    """Our row on cupy arrays sharing the tensors' memory; also their dtype, in words."""
    import cupy

    with cupy.cuda.Device(index):
        img_cp, txt_cp = from_torch(cupy, img), from_torch(cupy, txt)
    run = _ours(loss, img_cp, txt_cp, block_size, precision)

    def on_device() -> Any:
        with cupy.cuda.Device(index):
            return run()

    return on_device, _input_dtype(img_cp)


def _floor(loss: str, img: Any, txt: Any) -> Callable[[], Any]:
    n = img.shape[0]
    panel = floor_panel(n, img.element_size())
    passes = floor_gemms(loss) - 2  # 1, or 2 for the softmax's log-sum-exp pass

    def run() -> None:
        for start in range(0, n, panel):
            rows = img[start : start + panel, :]
            for _ in range(passes):
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
    return _autograd(open_clip_forward(loss), torch_leaves(img, txt))


def _dense(loss: str, img: Any, txt: Any) -> Callable[[], Any]:
    return _autograd(
        lambda i, t, scale, bias: dense_loss(loss, i, t, scale, bias), torch_leaves(img, txt)
    )


def compile_dense(loss: str, on_gpu: bool) -> Callable[..., Any]:
    """``torch.compile`` the dense loss ``(img, txt, scale, bias) -> loss`` of ``loss``.

    ``dynamic=True``: one compilation per dtype serves every n. On the host,
    ``backend="eager"`` (dynamo traces, nothing is generated), so a dry run stays quick.
    """
    import torch

    def dense(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
        return dense_loss(loss, img, txt, scale, bias)

    if on_gpu:
        return torch.compile(dense, dynamic=True)
    return torch.compile(dense, dynamic=True, backend="eager")


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


# --------------------------------------------------------------------------- cases and rows


class Case(NamedTuple):
    """One (d, dtype, n, loss) point; its rows are the impls."""

    d: int
    dtype: str
    n: int
    loss: str


def _label(case: Case) -> str:
    return f"{case.dtype} {case.loss} d={case.d} n={case.n}"


def _cases(config: GpuConfig) -> list[Case]:
    """List the cases of the main step in the order they run: dtype, d, n ascending, loss."""
    return [
        Case(d, dtype, n, loss)
        for dtype in config.dtypes
        for d in config.dims
        for n in sorted(config.sizes)
        for loss in config.losses
    ]


def _kernel_cases(config: GpuConfig) -> list[Case]:
    """List the cases of the siglip-kernel step: bfloat16 sigmoid, largest n first."""
    if "bfloat16" not in config.dtypes or SIGLIP_KERNEL_LOSS not in config.losses:
        return []
    return [
        Case(d, "bfloat16", n, SIGLIP_KERNEL_LOSS)
        for n in sorted(config.sizes, reverse=True)
        for d in config.dims
    ]


def _case_impls(case: Case, impls: Sequence[str], config: GpuConfig) -> list[str]:
    """List the main-step rows of ``case`` among ``impls`` (siglip-kernel has its own)."""
    rows = []
    for impl in impls:
        if impl == SIGLIP_KERNEL:
            continue
        if impl == OURS_TORCH_EXACT and case.dtype not in HALF_DTYPES:
            continue  # float32 and float64 ignore the option: one row
        if impl in N2_IMPLS and not config.dense:
            continue
        if impl == COMPILED and not config.compiled:
            continue
        rows.append(impl)
    return rows


def _precision(impl: str, dtype: str) -> str | None:
    if dtype not in HALF_DTYPES or impl not in (OURS_TORCH, OURS_TORCH_EXACT, OURS_CUPY):
        return None
    return "exact" if impl == OURS_TORCH_EXACT else "fast"


def _compute_dtype(impl: str, dtype: str) -> str:
    """Say what the row's GEMMs compute in."""
    precision = _precision(impl, dtype)
    if precision == "exact":
        return "float32"
    if precision == "fast" and impl == OURS_CUPY:
        return f"float32 GEMMs on {dtype}-rounded operands, float32 sums"
    if precision == "fast":
        return f"{dtype} GEMMs accumulating in float32, float32 sums"
    return dtype


def _new_row(device: str, case: Case, impl: str, block_size: int | None) -> dict[str, Any]:
    ours = impl in (OURS_TORCH, OURS_TORCH_EXACT, OURS_CUPY)
    return {
        "device": device,
        "loss": case.loss,
        "n": case.n,
        "d": case.d,
        "dtype": case.dtype,
        "impl": impl,
        "step": STEP_KERNEL if impl == SIGLIP_KERNEL else STEP_MAIN,
        "precision": _precision(impl, case.dtype),
        "block_size": block_size if ours else None,
        "input_dtype": None,
        "compute_dtype": _compute_dtype(impl, case.dtype),
        "warmup_s": None,
        "times_s": [],
        "median_s": None,
        "gflops": None,
        "floor_fraction": None,
        "peak_bytes": None,
        "peak_mib": None,
        "memory_source": None,
        "predicted_bytes": None,
        "predicted_s": None,
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


def _input_dtype(value: Any) -> str:
    dtype = str(getattr(value, "dtype", "?")).removeprefix("torch.")
    return f"{dtype} ({type(value).__module__.split('.')[0]})"


# --------------------------------------------------------------------------- one run


class _Bench:
    """The state of one run: the device, what is available, rows, errors, measured peaks."""

    def __init__(
        self,
        config: GpuConfig,
        device: _Device,
        memory_budget_bytes: int | None,
        unavailable: dict[str, str],
        siglip_kernel: Callable[..., Any] | None,
    ) -> None:
        self.config = config
        self.device = device
        self.budget = memory_budget_bytes
        self.unavailable = unavailable  # impl -> why it has no rows here
        self.siglip_kernel = siglip_kernel
        self.rows: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.baseline_failures: list[str] = []
        self.peaks: dict[tuple[int, str, str, str], tuple[int, int]] = {}
        self.floors: dict[Case, float] = {}
        self.compiled: dict[str, Callable[..., Any]] = {}
        self.compiled_for: set[tuple[str, str]] = set()
        self.on_row: Callable[[dict[str, Any]], None] = lambda row: None

    # ----------------------------------------------------------------- what runs

    def predict_bytes(self, case: Case, impl: str) -> float:
        """Predicted peak bytes of an n x n row: a floor of n^2 matrices, or a measured peak."""
        floor = _predicted_n2_bytes(impl, case)
        measured = self.peaks.get((case.d, case.dtype, case.loss, impl))
        if measured is None:
            return floor
        n0, peak0 = measured
        return max(floor, peak0 * (case.n / n0) ** 2)

    def predict_seconds(self, case: Case, impls: Sequence[str]) -> float:
        """Predicted seconds of the rows ``impls`` of ``case`` on :data:`H100`."""
        calls = 2 + self.config.repeats_for(case.n)
        seconds = sum(calls * predict_row_seconds(impl, case) for impl in impls)
        if COMPILED in impls and (case.loss, case.dtype) not in self.compiled_for:
            seconds += H100.recompile_s if self.compiled_for else H100.compile_s
        if SIGLIP_KERNEL in impls:
            seconds += H100.autotune_s
        return seconds

    def fail(self, case: Case, row: dict[str, Any], text: str) -> None:
        row["error"] = text
        where = f"{_label(case)} {row['impl']}: {text}"
        (self.errors if row["impl"] in OWN_IMPLS else self.baseline_failures).append(where)

    def make_run(self, case: Case, impl: str, img: Any, txt: Any, row: dict[str, Any]) -> Any:
        block, precision = self.config.block_size, _precision(impl, case.dtype)
        if impl in (OURS_TORCH, OURS_TORCH_EXACT):
            row["input_dtype"] = _input_dtype(img)
            return _ours(case.loss, img, txt, block, precision)
        if impl == OURS_CUPY:
            index = self.device.index or 0
            run, row["input_dtype"] = _ours_cupy(case.loss, img, txt, block, precision, index)
            return run
        if impl == FLOOR:
            return _floor(case.loss, img, txt)
        if impl == SIGLIP_KERNEL:
            assert self.siglip_kernel is not None
            return _siglip_kernel(self.siglip_kernel, img, txt)
        if impl == OPEN_CLIP:
            return _open_clip(case.loss, img, txt)
        if impl == DENSE:
            return _dense(case.loss, img, txt)
        if impl == COMPILED:
            if case.loss not in self.compiled:
                self.compiled[case.loss] = compile_dense(case.loss, self.device.is_cuda)
            self.compiled_for.add((case.loss, case.dtype))
            return _autograd(self.compiled[case.loss], torch_leaves(img, txt))
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

    # ----------------------------------------------------------------- one case

    def skip_case(self, case: Case, impls: Sequence[str], block: int | None, why: str) -> None:
        rows = {impl: _new_row(self.device.name, case, impl, block) for impl in impls}
        for row in rows.values():
            row["skipped"] = self.unavailable.get(row["impl"], why)
        self.record(case, rows)

    def run_case(
        self, case: Case, img: Any, txt: Any, block_size: int, impls: Sequence[str]
    ) -> None:
        """Warm up, measure and time the rows ``impls`` of one case; record them."""
        rows = {impl: _new_row(self.device.name, case, impl, block_size) for impl in impls}
        runs = self.set_up(case, img, txt, rows)
        warm = self.each(case, rows, runs, "warm-up", lambda impl, run: _first(run))
        for impl, (value, seconds) in warm.items():  # the loss value is kept
            rows[impl]["warmup_s"] = seconds
            if value is not None:
                rows[impl]["loss_value"] = float(value)
        for impl, (peak, source) in self.each(
            case, rows, runs, "memory run", self.device.measure
        ).items():  # one run for the peak memory
            rows[impl].update(
                peak_bytes=peak, peak_mib=None if peak is None else peak / MIB, memory_source=source
            )
        for _ in range(self.config.repeats_for(case.n)):
            timed = self.each(case, rows, runs, "timed runs", lambda impl, run: self.timed(run))
            for impl, elapsed in timed.items():
                rows[impl]["times_s"].append(elapsed)
        runs.clear()
        self.device.release()
        self.record(case, rows)

    def set_up(
        self, case: Case, img: Any, txt: Any, rows: dict[str, dict[str, Any]]
    ) -> dict[str, Callable[[], Any]]:
        """Make the run of every row that is available and predicted to fit in memory."""
        runs: dict[str, Callable[[], Any]] = {}
        budget = self.budget
        if budget is None and any(i in N2_IMPLS for i in rows):
            budget = self.device.free_bytes()
        for impl, row in rows.items():
            row["predicted_s"] = predict_row_seconds(impl, case)
            if impl in self.unavailable:
                row["skipped"] = self.unavailable[impl]
                continue
            if impl in N2_IMPLS:
                predicted = self.predict_bytes(case, impl)
                row["predicted_bytes"] = predicted
                if budget is not None and predicted > budget:
                    row["skipped"] = (
                        f"predicted {_gib(predicted)} > {_gib(budget)} free on {self.device.name}"
                    )
                    continue
            make = functools.partial(self.make_run, case, impl, img, txt, row)
            ok, run = self.attempt(case, row, "set-up", make)
            if ok:
                runs[impl] = run
        return runs

    def each(
        self,
        case: Case,
        rows: dict[str, dict[str, Any]],
        runs: dict[str, Callable[[], Any]],
        step: str,
        call: Callable[[str, Callable[[], Any]], Any],
    ) -> dict[str, Any]:
        """Return ``call(impl, run)`` of every run; a run whose `step` fails leaves `runs`."""
        results: dict[str, Any] = {}
        for impl, run in list(runs.items()):
            ok, result = self.attempt(case, rows[impl], step, functools.partial(call, impl, run))
            if ok:
                results[impl] = result
            else:
                del runs[impl]
        return results

    def record(self, case: Case, rows: dict[str, dict[str, Any]]) -> None:
        flops = floor_gemms(case.loss) * 2.0 * case.n * case.n * case.d
        for row in rows.values():
            if row["skipped"] is None and row["error"] is None and row["times_s"]:
                row["median_s"] = statistics.median(row["times_s"])
                row["gflops"] = flops / row["median_s"] / 1e9 if row["median_s"] > 0 else None
        if rows.get(FLOOR, {}).get("median_s") is not None:
            self.floors[case] = rows[FLOOR]["median_s"]
        floor = self.floors.get(case)
        for impl, row in rows.items():
            if floor is not None and row["median_s"]:
                row["floor_fraction"] = floor / row["median_s"]
            if impl in N2_IMPLS and row["peak_bytes"] is not None:
                self.peaks[(case.d, case.dtype, case.loss, impl)] = (case.n, row["peak_bytes"])
            self.rows.append(row)
            self.on_row(row)


def _first(run: Callable[[], Any]) -> tuple[Any, float]:
    """Call ``run`` once; return its result and its seconds (compilation included)."""
    start = time.perf_counter()
    result = run()
    return result, time.perf_counter() - start


def _unavailable(
    device: _Device, config: GpuConfig, kernel_status: str, has_kernel: bool
) -> tuple[dict[str, str], dict[str, str | None]]:
    """Why rows cannot run here (impl -> reason), and the versions of what can."""
    why: dict[str, str] = {}
    versions: dict[str, str | None] = {"cupy": None, "open_clip": None, "siglip_kernel": None}
    if not device.is_cuda:
        why[OURS_CUPY] = "cupy arrays need a CUDA device"
    elif not installed("cupy"):
        why[OURS_CUPY] = "cupy is not installed"
    else:
        try:
            import cupy

            versions["cupy"] = str(cupy.__version__)
        except Exception as error:
            why[OURS_CUPY] = f"cupy does not import ({_message(error)})"
    if config.dense:
        from .baselines import open_clip_info

        info = open_clip_info()
        if info.get("installed"):
            versions["open_clip"] = str(info["version"])
        else:
            why[OPEN_CLIP] = "open-clip-torch is not installed"
    if not has_kernel:
        why[SIGLIP_KERNEL] = f"siglip-kernel {kernel_status}"
    else:
        versions["siglip_kernel"] = kernel_status
        if not device.is_cuda:
            why[SIGLIP_KERNEL] = "siglip-kernel needs a CUDA device (Triton)"
    return why, versions


class _Pace:
    """The time budget: elapsed seconds, and whether a step predicted to take s still fits."""

    def __init__(self, budget_s: float | None) -> None:
        self.budget = budget_s
        self.started = time.perf_counter()
        self.predicted = 0.0
        self.measured = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def factor(self) -> float:
        """Measured over predicted seconds of the steps so far, within [0.5, 100]."""
        if self.predicted <= 0 or self.measured <= 0:
            return 1.0
        return min(100.0, max(0.5, self.measured / self.predicted))

    def refusal(self, predicted: float, reserve: float = 0.0) -> str | None:
        """Why a step predicted to take ``predicted`` s (on an H100) must not start, or None."""
        if self.budget is None:
            return None
        expected = predicted * self.factor()
        elapsed = self.elapsed()
        if elapsed + expected + reserve <= self.budget:
            return None
        kept = f", keeping {reserve:.0f} s for siglip-kernel" if reserve else ""
        return (
            f"time budget: ~{expected:.0f} s more after {elapsed:.0f} s would pass "
            f"--time-budget {self.budget:g} s{kept}"
        )

    def done(self, predicted: float, seconds: float) -> None:
        self.predicted += predicted
        self.measured += seconds


def run_benchmark(
    config: GpuConfig,
    device: str,
    *,
    memory_budget_bytes: int | None = None,
    progress_stream: Any = None,
    json_path: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
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
    json_path : path, optional
        Rewrite the report there (atomically) after every case, with ``"complete": false``
        until the run ends.
    log : callable, optional
        Called with the header lines, then one line per row as soon as it is measured.

    Returns
    -------
    dict
        ``machine``, ``config``, ``plan``, ``rows`` (one dict per row and case), ``notes``,
        ``errors`` (our rows and the floor), ``baseline_failures`` and ``complete``: what
        ``--json`` writes.
    """
    problem = config.problem()
    if problem is not None:
        raise ValueError(problem)
    pace = _Pace(config.time_budget_s)
    target = _Device(device)
    kernel, kernel_status = siglip_kernel_status()
    unavailable, versions = _unavailable(target, config, kernel_status, kernel is not None)
    bench = _Bench(config, target, memory_budget_bytes, unavailable, kernel)
    report = _new_report(config, bench, _machine(target, versions), memory_budget_bytes)

    def flush() -> None:
        if json_path is not None:
            write_json_atomic(json_path, report)

    if log is not None:
        for line in _header(report).splitlines():
            log(line)
        bench.on_row = lambda row: log(_row_line(row))
    cases = _cases(config)
    kernel_cases = _kernel_cases(config)
    reserve = 0.0
    if kernel_cases and SIGLIP_KERNEL not in unavailable:
        reserve = bench.predict_seconds(kernel_cases[0], [SIGLIP_KERNEL])
    progress = Progress(
        [c.n * c.n * c.d * floor_gemms(c.loss) for c in cases]
        + [c.n * c.n * c.d * 6 for c in kernel_cases],
        stream=progress_stream,
    )
    held = _Inputs(config.seed, target)
    for case in cases:
        progress.start(_label(case))
        impls = _case_impls(case, IMPLS, config)
        predicted = bench.predict_seconds(case, [i for i in impls if i not in unavailable])
        refusal = pace.refusal(predicted, reserve)
        _paced(bench, held, pace, case, impls, predicted, refusal, config.block_size)
        flush()
        progress.advance()
    for case in kernel_cases:
        progress.start(f"{SIGLIP_KERNEL} {_label(case)}")
        predicted = bench.predict_seconds(case, [SIGLIP_KERNEL])
        # Unavailable: skipped, for the reason bench.unavailable gives.
        refusal = "" if SIGLIP_KERNEL in unavailable else pace.refusal(predicted)
        _paced(bench, held, pace, case, [SIGLIP_KERNEL], predicted, refusal, None)
        flush()
        progress.advance()
    progress.close()
    held.drop()
    report["machine"]["load_average_after"] = list(os.getloadavg())
    report["machine"]["wall_s"] = pace.elapsed()
    report["complete"] = True
    flush()
    return report


def _new_report(
    config: GpuConfig, bench: _Bench, machine: dict[str, Any], memory_budget_bytes: int | None
) -> dict[str, Any]:
    """Return the report before any case: ``complete`` false, and the bench's (empty) rows."""
    from .._checks import default_block_size

    steps = plan(config)
    return {
        "complete": False,
        "machine": machine,
        "config": {
            "device": bench.device.name,
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
            "repeats_by_n": {str(n): config.repeats_for(n) for n in sorted(config.sizes)},
            "default_block_size": default_block_size(_probe_array(bench.device)),
            "scale": SCALE,
            "bias": BIAS,
            "memory_budget_bytes": memory_budget_bytes,
            "floor_panel_bytes": FLOOR_PANEL_BYTES,
            "n2_matrices": N2_MATRICES,
        },
        "plan": {
            "rates": H100._asdict(),
            "steps": [{"step": label, "predicted_s": s} for label, s in steps],
            "predicted_total_s": sum(s for _, s in steps),
        },
        "rows": bench.rows,
        "notes": [f"note: no `{impl}` rows: {why}" for impl, why in bench.unavailable.items()]
        + list(NOTES),
        "errors": bench.errors,
        "baseline_failures": bench.baseline_failures,
    }


def _paced(
    bench: _Bench,
    held: _Inputs,
    pace: _Pace,
    case: Case,
    impls: list[str],
    predicted: float,
    refusal: str | None,
    block: int | None,
) -> None:
    """Run the rows `impls` of `case`, against its `predicted` seconds; or skip them all.

    A `refusal` (None to run) is the reason of the skip.
    """
    if refusal is not None:
        bench.skip_case(case, impls, block, refusal)
        return
    started = time.perf_counter()
    _run_one(bench, held, case, impls)
    pace.done(predicted, time.perf_counter() - started)


class _Inputs:
    """The inputs of the current (d, dtype, n), drawn on the device when they change."""

    def __init__(self, seed: int, device: _Device) -> None:
        self.seed, self.device = seed, device
        self.key: tuple[int, str, int] | None = None
        self.arrays: tuple[Any, Any] | None = None
        self.failed = ""

    def drop(self) -> None:
        self.arrays, self.key = None, None
        self.device.release()

    def get(self, case: Case) -> tuple[Any, Any] | None:
        if self.key == (case.d, case.dtype, case.n):
            return self.arrays
        self.drop()  # free the previous inputs before drawing the next
        self.key = (case.d, case.dtype, case.n)
        try:
            self.arrays = make_inputs(case.n, case.d, case.dtype, self.seed, self.device.name)
        except self.device.oom_errors as error:
            self.arrays = None
            self.failed = f"out of memory drawing the inputs: {_message(error)}"
            self.device.release()
        return self.arrays


def _run_one(bench: _Bench, held: _Inputs, case: Case, impls: Sequence[str]) -> None:
    from .._checks import default_block_size

    inputs = held.get(case)
    if inputs is None:
        bench.skip_case(case, impls, bench.config.block_size, held.failed)
        return
    block_size = bench.config.block_size or default_block_size(inputs[0])
    bench.run_case(case, *inputs, block_size, impls)


def _probe_array(device: _Device) -> Any:
    return device.torch.empty(0, device=device.device)


# --------------------------------------------------------------------------- reporting

NOTES = (
    "GFLOP/s counts the floor's flops for every row, whatever it did, so the rows compare: "
    "6 n^2 d for the sigmoid loss (S = img @ txt.T, S @ txt, S.T @ img), 8 n^2 d for the "
    "softmax loss (S once more: its log-sum-exp pass needs whole rows before the gradient). "
    "floor frac = GEMM floor time / row time, the floor being those GEMMs with torch in the "
    "input dtype on the same device, timed the same way in the same run. A dense row that "
    "stores S does 3 GEMMs for the softmax loss too, so its floor frac can exceed 1 there.",
    "precision: our rows on bfloat16 inputs run precision='fast' (GEMM operands in bfloat16, "
    "accumulation and every sum in float32; on cupy the operands are rounded to bfloat16 and "
    "multiplied in float32, the same numbers at the float32 rate) and, as `ours torch exact`, "
    "precision='exact' (float32 operands). float32 inputs compute in float32 (no TF32) "
    "whatever the option. The floor, compiled dense, dense autograd, open_clip and "
    "siglip-kernel rows run in the input dtype. compute_dtype in the JSON says which.",
    "Timing: each row runs once as a warm-up (first call s: compilation and autotuning show "
    "there) and once to read its memory, then R rounds in which every row runs once, in "
    "turn; the median is shown. R = --repeats, or by default 5 up to n = 16384, 3 at 32768 "
    "and 2 above. A timed call is the wall-clock time between two device synchronisations "
    "(torch.cuda.synchronize), so it includes the Python and launch overhead of the call.",
    "peak MiB (portable_siglip._memory): torch rows: torch.cuda.max_memory_allocated() after "
    "reset_peak_memory_stats(), minus memory_allocated() just before the call (inputs "
    "excluded; outputs, gradients, temporaries and workspaces included). ours cupy: the "
    "growth of cupy's default memory pool's total_bytes() over one call started after "
    "free_all_blocks(), i.e. the most the pool held at once, rounded up to its allocation "
    "units. On the host (cpu, the tests) a fallback: VmHWM minus VmRSS before the call.",
    "Rows holding n x n matrices (compiled dense, dense autograd, open_clip) predicted to need "
    "more than the free device memory (at least 2, 5.5 and 5.5 n x n matrices of the input "
    "dtype, or the peak measured at a smaller n scaled by n^2) are skipped with the "
    "prediction; a row that runs out of memory anyway is reported as skipped with the "
    "allocator's message.",
    "siglip-kernel: fused_siglip_loss(img, txt, log(t), b) and backward(), with the "
    "package's own choice of backend, in a step after every other row (it autotunes), "
    "largest n first; its loss value may be normalised differently.",
)


def _row_cells(row: dict[str, Any]) -> tuple[str, ...]:
    if row["skipped"] is not None:
        return ("skipped: " + row["skipped"], "", "", "", "", "")
    if row["error"] is not None:
        return ("error (see below)", "", "", "", "", "")
    return (
        fmt(row["median_s"], ".4f"),
        fmt(row["gflops"], ".0f"),
        fmt(row["floor_fraction"], ".2f"),
        fmt(row["peak_mib"], ".1f"),
        fmt(row["warmup_s"], ".2f"),
        fmt(row["loss_value"], ".6g"),
    )


def _row_line(row: dict[str, Any]) -> str:
    """One row as a line, printed as soon as it is measured."""
    head = f"  {row['dtype']} {row['loss']} d={row['d']} n={row['n']} {row['impl']}"
    if row["precision"]:
        head += f" [{row['precision']}]"
    if row["skipped"] is not None:
        return f"{head}: skipped: {row['skipped']}"
    if row["error"] is not None:
        return f"{head}: error: {row['error']}"
    median, gflops, frac, peak, first, value = _row_cells(row)
    return (
        f"{head}: {median} s, {gflops} GFLOP/s, floor frac {frac}, peak {peak} MiB, "
        f"first call {first} s, loss {value}"
    )


def _order(row: dict[str, Any], dtypes: Sequence[str]) -> tuple[Any, ...]:
    dtype = dtypes.index(row["dtype"]) if row["dtype"] in dtypes else len(dtypes)
    loss = registry.names().index(row["loss"])
    return (dtype, row["d"], row["n"], loss, IMPLS.index(row["impl"]))


def table(rows: Sequence[dict[str, Any]], dtypes: Sequence[str] = DEFAULT_DTYPES) -> str:
    """Lay out the rows of a report as a text table, by case, skipped rows with their reason."""
    header = (
        "dtype",
        "loss",
        "d",
        "n",
        "impl",
        "precision",
        "median s",
        "GFLOP/s",
        "floor frac",
        "peak MiB",
        "first call s",
        "loss value",
    )
    lines = [header]
    for row in sorted(rows, key=lambda r: _order(r, dtypes)):
        cells = _row_cells(row)
        case = (row["dtype"], row["loss"], str(row["d"]), str(row["n"]), row["impl"])
        lines.append((*case, row["precision"] or "", *cells))
    return render_table(lines, left={0, 1, 4, 5})


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
    rounds = ", ".join(f"{r} at n = {n}" for n, r in config["repeats_by_n"].items())
    budget = config["time_budget_s"]
    limit = "none" if budget is None else f"{budget:g} s (cases that would pass it are skipped)"
    return "\n".join(
        [
            "portable-siglip bench --device: forward + gradient on "
            f"{config['device']}, d in {{{dims}}}, {', '.join(config['dtypes'])}, "
            f"t = {SCALE:g}, b = {BIAS:g}, block_size = {block}, median of interleaved "
            f"rounds ({rounds}) after 1 warm-up and 1 memory run",
            f"device: {where}",
            f"versions: {versions}; python {machine['python']}",
            f"float32 matmul: torch.backends.cuda.matmul.allow_tf32 = "
            f"{machine['cuda_matmul_allow_tf32']}, float32_matmul_precision = "
            f"{machine['float32_matmul_precision']!r}",
            f"time plan: ~{report['plan']['predicted_total_s']:.0f} s predicted on an "
            f"{H100.name}; time budget {limit}",
        ]
    )


def config_from_args(args: argparse.Namespace) -> GpuConfig:
    """Build the configuration from ``bench`` options (``--device cuda`` resolved by the cli)."""
    dtype = args.dtype if args.dtype is not None else list(DEFAULT_DTYPES)
    dtypes = [d.strip() for d in dtype.split(",")] if isinstance(dtype, str) else list(dtype)
    dims = args.dims or ([args.dim] if getattr(args, "dim", None) else [DEFAULT_DIM])
    budget = getattr(args, "time_budget", None)
    repeats = getattr(args, "repeats", None)
    return GpuConfig(
        sizes=tuple(args.sizes or DEFAULT_SIZES),
        dims=tuple(dims),
        dtypes=tuple(dtypes),
        losses=tuple(args.losses),
        block_size=args.block_size,
        repeats=None if repeats is None else int(repeats),
        seed=int(args.seed),
        dense=not getattr(args, "no_dense", False),
        compiled=not getattr(args, "no_compile", False),
        time_budget_s=None if not budget else float(budget),
    )


def main(args: argparse.Namespace, *, memory_budget_bytes: int | None = None) -> int:
    """Run the GPU benchmark on ``args.device``, print its rows and optionally write JSON.

    Parameters
    ----------
    args : argparse.Namespace
        Options from :func:`portable_siglip.cli._bench.add_arguments`, ``device`` already
        checked (``portable_siglip.cli._bench.main`` does it).
    memory_budget_bytes : int, optional
        Passed to :func:`run_benchmark` (tests).

    Returns
    -------
    int
        0 when every row of ours and the floor ran or was skipped, 1 when one of them failed
        (a failed baseline is reported, not counted), 2 for invalid options.
    """
    config = config_from_args(args)
    if refuse(config.problem()):
        return 2
    if not installed("numpy"):
        print("bench: error: the machine notes need numpy; install numpy", file=sys.stderr)
        return 2
    print(
        f"portable-siglip bench on {args.device}: {len(_cases(config))} cases, "
        f"{len(config.sizes)} sizes up to n = {max(config.sizes)}",
        flush=True,
    )
    json_path: str | os.PathLike[str] | None = getattr(args, "json", None)
    report = run_benchmark(
        config,
        str(args.device),
        memory_budget_bytes=memory_budget_bytes,
        json_path=None if json_path is None else Path(json_path),
        log=functools.partial(print, flush=True),
    )
    print()
    print(table(report["rows"], config.dtypes))
    print()
    print_notes(report["notes"], report["errors"])
    for failure in report["baseline_failures"]:
        print(f"baseline failed (not counted in the exit status): {failure}")
    print_load_after(report["machine"])
    if json_path is not None:
        print(f"results written to {json_path}")
    return 1 if report["errors"] else 0
