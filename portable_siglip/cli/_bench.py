"""The ``bench`` command: its options, and the dispatch to the benchmark they ask for.

``python -m portable_siglip bench`` runs the quick set of :mod:`portable_siglip.bench.sweep`
(both losses at one moderate n on numpy and torch, ours against the dense baselines: a few
minutes), ``--sweep`` (or ``--full``) its full sweep over n, d and backends (over an hour
on 2 cores); ``--frameworks``, ``--cached``, ``--distributed``, ``--profile`` and
``--compare-precision``, which exclude each other, run :mod:`~portable_siglip.bench.frameworks`,
:mod:`~portable_siglip.bench.cached`, :mod:`~portable_siglip.bench.distributed`,
:mod:`~portable_siglip.bench.profile` and :mod:`~portable_siglip.bench.precision` instead.
``--device cuda`` (or ``cuda:N``) runs :mod:`~portable_siglip.bench.gpu`, after checking that
the GPU is there. Each is imported only when it runs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .. import _registry as registry
from .._interop import UsageError
from ..bench.common import (
    BACKENDS,
    DEFAULT_DIM,
    DTYPES,
    GPU_DTYPES,
    comma_list,
    nonnegative_float_arg,
    positive_float_arg,
    positive_int,
    positive_int_arg,
)
from ._devices import Device, parse_device, resolve_device

__all__ = ["add_arguments", "main"]

#: The modes that replace the quick set and the sweep, as their option names; they exclude
#: each other.
MODES = ("distributed", "frameworks", "cached", "profile", "compare_precision")

#: What ``--dtype`` accepts: the sweep's dtypes, bfloat16 (the GPU benchmark and
#: ``--compare-precision``) and float16 (``--compare-precision``).
ANY_DTYPES = (*GPU_DTYPES, "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``python -m portable_siglip bench`` to ``parser``.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The ``bench`` subparser (or any parser).
    """
    from ..bench.sweep import DEFAULT_DIMS, DEFAULT_SIZES, QUICK_BACKENDS, QUICK_DIMS, QUICK_SIZES

    def listed(values: Any) -> str:
        return ",".join(str(value) for value in values)

    parser.add_argument(
        "--sweep",
        "--full",
        action="store_true",
        help="run the full sweep instead of the quick set: n = "
        f"{listed(DEFAULT_SIZES)}, d = {listed(DEFAULT_DIMS)}, backends {listed(BACKENDS)}, "
        "both losses (84 cases: over an hour on a 2-core machine, several hours on a "
        f"loaded one). Without it, bench runs the quick set: n = {listed(QUICK_SIZES)}, d = "
        f"{listed(QUICK_DIMS)}, backends {listed(QUICK_BACKENDS)}, both losses, ours against "
        "the dense baselines (3 minutes on a loaded 2-core machine). --sizes, --dims and "
        "--backends replace either grid",
    )
    parser.add_argument(
        "--backends",
        type=comma_list("--backends", str, BACKENDS),
        default=None,
        help=f"comma-separated array libraries (default: {listed(QUICK_BACKENDS)}; with "
        f"--sweep and the other modes {listed(BACKENDS)}); one that is not installed is "
        "skipped with a note",
    )
    parser.add_argument(
        "--sizes",
        type=comma_list("--sizes", positive_int, None),
        default=None,
        help=f"comma-separated batch sizes n (default: {listed(QUICK_SIZES)}; with --sweep "
        "1024,2048,...,65536; with --frameworks 8192,16384,32768)",
    )
    parser.add_argument(
        "--dims",
        type=comma_list("--dims", positive_int, None),
        default=None,
        help=f"comma-separated feature dimensions d of the quick set and the sweep (default: "
        f"{listed(QUICK_DIMS)}; with --sweep {listed(DEFAULT_DIMS)}; or --dim)",
    )
    parser.add_argument(
        "--dim",
        type=positive_int_arg,
        default=None,
        help=f"one feature dimension d (default for --distributed and --frameworks: {DEFAULT_DIM})",
    )
    parser.add_argument(
        "--dtype",
        type=comma_list("--dtype", str, ANY_DTYPES),
        default=None,
        help="feature dtype: float32 (default) or float64; with --device cuda a "
        "comma-separated list among bfloat16, float32 and float64 (default: "
        "bfloat16,float32); with --compare-precision among bfloat16 and float16 (default: "
        "bfloat16). bfloat16 is for the GPU benchmark and --compare-precision only",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        metavar="{cpu,cuda,cuda:N}",
        help="where the benchmark runs (default: cpu, the CPU benchmarks). cuda or cuda:N "
        "runs the GPU benchmark instead (see portable_siglip.bench.gpu): ours on torch CUDA "
        "(precision fast and exact) and cupy against the same run's GEMM floor, a "
        "torch.compile'd dense loss, dense autograd, open_clip and siglip-kernel; default "
        "n = 8192,16384,32768,65536, d = 768, --dtype bfloat16,float32, --time-budget 170. "
        "Without a GPU it is a usage error",
    )
    parser.add_argument(
        "--time-budget",
        type=nonnegative_float_arg,
        default=None,
        metavar="SECONDS",
        help="with --device cuda: skip, with the reason, every case that would take the run "
        "past SECONDS (default 170; 0: no limit)",
    )
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="with --device cuda: leave out the torch.compile'd dense loss",
    )
    # The registered losses when the parser is built: a loss registered at runtime is one.
    losses = registry.names()
    parser.add_argument(
        "--losses",
        type=comma_list("--losses", str, losses),
        default=list(losses),
        help=f"comma-separated losses (default: {','.join(losses)})",
    )
    parser.add_argument(
        "--block-size",
        type=positive_int_arg,
        default=None,
        help="tile edge of the blockwise losses (default: the library's)",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int_arg,
        default=None,
        help="timed runs per case after one warm-up; the median is reported (default 3; "
        "with --device cuda 5 up to n = 16384, 3 at 32768, 2 above)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--json", metavar="FILE", default=None, help="write all results here")
    parser.add_argument(
        "--plots",
        metavar="DIR",
        default=None,
        help="draw bench-time.png and bench-memory.png (log-log, against n) into DIR; "
        "needs matplotlib",
    )
    parser.add_argument(
        "--no-dense",
        action="store_true",
        help="skip the dense baselines: dense numpy, dense torch autograd and open_clip",
    )
    parser.add_argument(
        "--no-memory",
        action="store_true",
        help="skip the peak-memory probes (one subprocess per case)",
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help="add a row of our loss on the array-API reference loops "
        "(PORTABLE_SIGLIP_FAST_PATHS=0), beside the in-place kernels of numpy and torch",
    )
    parser.add_argument(
        "--positives-per-row",
        type=positive_int_arg,
        default=1,
        metavar="K",
        help="with K >= 2, add to every case of the sweep a row `ours ids`: our loss with "
        "img_ids = txt_ids = arange(n) // K (groups of K duplicated pairs, K positives per "
        "row), timed in the same interleaved rounds as `ours` and probed the same way; a "
        "second table gives its time and peak memory as ratios to `ours`. 1: no such row",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="split the time of our call into tile GEMMs and the rest, against the roofline "
        "(numpy and torch; default n = 8192, d = 768; see portable_siglip.bench.profile)",
    )
    parser.add_argument(
        "--compare-precision",
        action="store_true",
        help="time precision='fast' against 'exact' on half-precision inputs, side by "
        "side, with each one's error against float64 (numpy and torch; default "
        "--dtype bfloat16, n = 4096, d = 768; see portable_siglip.bench.precision)",
    )
    group = parser.add_argument_group(
        "distributed",
        "`--distributed` times every strategy over MPI instead (numpy only; needs mpi4py and "
        "mpirun): W = 1 and W = --ranks processes, one BLAS thread each, on one global batch",
    )
    group.add_argument(
        "--distributed",
        action="store_true",
        help="benchmark the distributed strategies over MPI "
        "(see portable_siglip.bench.distributed)",
    )
    group.add_argument(
        "--ranks",
        type=comma_list("--ranks", positive_int, None),
        default=[2],
        help="comma-separated numbers of MPI ranks W >= 2 compared with W = 1 (default: 2)",
    )
    group.add_argument(
        "--batch",
        type=positive_int_arg,
        default=8192,
        help="global batch n of --distributed; --sizes is for the default benchmark",
    )
    frameworks = parser.add_argument_group(
        "frameworks",
        "`--frameworks` compares forward + loss.backward() of portable_siglip.backends.torch's "
        "SigLipLoss / ClipLoss with open_clip's (when open-clip-torch is installed), a "
        "row-chunked autograd loss and the dense autograd loss (torch only): time, and peak "
        "extra memory in a fresh process per case under an address-space limit",
    )
    frameworks.add_argument(
        "--frameworks",
        action="store_true",
        help="benchmark against the framework losses (see portable_siglip.bench.frameworks)",
    )
    frameworks.add_argument(
        "--memory-cap-gib",
        type=positive_float_arg,
        default=16.0,
        help="skip cases predicted to need more extra memory than this; with --frameworks, "
        "also run each case under an address-space limit of about this much",
    )
    frameworks.add_argument(
        "--chunk-size",
        type=positive_int_arg,
        default=512,
        help="with --frameworks: rows per chunk of the chunked autograd loss and of open_clip's "
        "SigLipLoss(chunk_size=...) where it has one; with --cached: rows per encoder call of "
        "cached_step",
    )
    cached = parser.add_argument_group(
        "cached",
        "`--cached` times one training step of a small two-tower MLP made here, with "
        "portable_siglip.backends.torch.cached_step (the towers see --chunk-size rows at a "
        "time) against one plain backward of the whole batch with our loss module and "
        "open_clip's (when installed), until these exceed --memory-cap-gib: time, and peak "
        "extra memory in a fresh process per case (torch only; default n = 4096,8192, d = 128)",
    )
    cached.add_argument(
        "--cached",
        action="store_true",
        help="benchmark cached_step against a plain training step "
        "(see portable_siglip.bench.cached)",
    )


def _is_gpu(args: argparse.Namespace) -> bool:
    return str(getattr(args, "device", None) or "cpu").startswith("cuda")


def _resolve_dims(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in the per-mode defaults of the grid, ``--repeats`` and ``--time-budget``.

    The grid: ``--sizes``, ``--dims``, ``--dim`` and ``--dtype``.

    With ``--device cuda`` (``args.device`` already resolved) or ``--compare-precision``,
    ``--dtype`` becomes a list; otherwise one dtype of
    :data:`~portable_siglip.bench.common.DTYPES`.

    Raises
    ------
    UsageError
        For a list of dtypes, or a half-precision dtype, in a CPU benchmark that takes one.
    """
    from ..bench import sweep as plans

    values = vars(args)
    compare = bool(values.get("compare_precision"))
    sweep = not (
        values.get("distributed") or values.get("frameworks") or values.get("cached") or compare
    )
    dim = values.get("dim")
    full = bool(values.get("sweep"))
    updates: dict[str, Any] = {
        "dtype": _resolve_dtype(values.get("dtype"), _is_gpu(args), compare),
        "repeats": values.get("repeats") or (None if _is_gpu(args) else 3),
        "sweep": full,
    }
    quick_set = sweep and not full and not _is_gpu(args) and not values.get("profile")
    if not values.get("backends"):
        updates["backends"] = list(plans.QUICK_BACKENDS if quick_set else BACKENDS)
    if _is_gpu(args):
        from ..bench.gpu import DEFAULT_DIM as GPU_DIM
        from ..bench.gpu import DEFAULT_SIZES as GPU_SIZES
        from ..bench.gpu import DEFAULT_TIME_BUDGET_S

        updates["sizes"] = values.get("sizes") or list(GPU_SIZES)
        updates["dims"] = values.get("dims") or [dim or GPU_DIM]
        budget = values.get("time_budget")
        updates["time_budget"] = DEFAULT_TIME_BUDGET_S if budget is None else budget
    elif compare:
        from ..bench.precision import DEFAULT_SIZES as COMPARE_SIZES

        updates["sizes"] = values.get("sizes") or list(COMPARE_SIZES)
        updates["dims"] = values.get("dims") or [dim or DEFAULT_DIM]
    elif values.get("profile"):
        updates["sizes"] = values.get("sizes") or [8192]
        updates["dims"] = values.get("dims") or [dim or DEFAULT_DIM]
    elif sweep:
        sizes, dims = (
            (plans.DEFAULT_SIZES, plans.DEFAULT_DIMS)
            if full
            else (plans.QUICK_SIZES, plans.QUICK_DIMS)
        )
        if values.get("sizes") is None:
            updates["sizes"] = list(sizes)
        if values.get("dims") is None:
            updates["dims"] = [dim] if dim is not None else list(dims)
    elif values.get("cached"):
        from ..bench.cached import DEFAULT_DIM as CACHED_DIM

        updates["dim"] = dim or CACHED_DIM
    elif dim is None:
        updates["dim"] = DEFAULT_DIM
    return argparse.Namespace(**{**values, **updates})


def _resolve_dtype(value: Any, gpu: bool, compare: bool = False) -> Any:
    """Resolve ``--dtype``: a list for the GPU benchmark and ``--compare-precision``.

    The GPU benchmark's default is bfloat16, float32; ``--compare-precision``'s bfloat16;
    the other benchmarks take one dtype (default float32).
    """
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if gpu:
        from ..bench.gpu import DEFAULT_DTYPES

        return list(value) if value else list(DEFAULT_DTYPES)
    if compare:
        from ..bench.precision import HALF_DTYPES

        value = list(value) if value else ["bfloat16"]
        wrong = [d for d in value if d not in HALF_DTYPES]
        if wrong:
            msg = (
                "`--compare-precision` compares half-precision inputs: `--dtype` among "
                f"{', '.join(HALF_DTYPES)}, got {','.join(wrong)}"
            )
            raise UsageError(msg)
        return value
    if not value:
        return "float32"
    half = [d for d in value if d not in DTYPES]
    if half:
        msg = (
            f"`--dtype {half[0]}` is for the GPU benchmark (--device cuda) and "
            f"--compare-precision only; the CPU benchmarks take one of {', '.join(DTYPES)}"
        )
        raise UsageError(msg)
    if len(value) > 1:
        msg = (
            f"`--dtype` takes one dtype on the CPU ({' or '.join(DTYPES)}), got "
            f"{','.join(value)}; a list is for --device cuda"
        )
        raise UsageError(msg)
    return value[0]


def _resolve_device(args: argparse.Namespace, modes: list[str]) -> Device:
    """Parse ``--device`` and check that it exists, before any work.

    Raises
    ------
    UsageError
        For a string that is not ``cpu``, ``cuda`` or ``cuda:N``, a GPU that is not there,
        or ``--device cuda`` with a CPU-only mode.
    """
    text = str(getattr(args, "device", None) or "cpu")
    try:
        device = parse_device(text)
    except ValueError as error:
        raise UsageError(f"`--device`: {error}") from None
    if not device.is_cuda:
        return device
    excluded = [*modes, *(m for m in ("reference", "plots", "sweep") if getattr(args, m, None))]
    if int(getattr(args, "positives_per_row", 1) or 1) > 1:
        excluded.append("positives-per-row")
    if excluded:
        msg = (
            f"`--device {text}` runs the GPU benchmark, which has no "
            f"`--{excluded[0]}`; leave one of them out"
        )
        raise UsageError(msg)
    return resolve_device("torch", device)


def main(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args``: the sweep, or the mode it names.

    Parameters
    ----------
    args : argparse.Namespace
        Options from a parser prepared by :func:`add_arguments`.

    Returns
    -------
    int
        2 when modes that exclude each other are both given, or ``--device`` names no usable
        device (no GPU, ``cuda:N`` out of range, a string that is no device); otherwise what
        the benchmark's ``main`` returns: :func:`portable_siglip.bench.gpu.main` with
        ``--device cuda``, :func:`portable_siglip.bench.distributed.main` with
        ``args.distributed``, :func:`portable_siglip.bench.frameworks.main` with
        ``args.frameworks``, :func:`portable_siglip.bench.cached.main` with ``args.cached``,
        :func:`portable_siglip.bench.profile.main` with
        ``args.profile``, :func:`portable_siglip.bench.precision.main` with
        ``args.compare_precision``, else :func:`portable_siglip.bench.sweep.main` on the quick
        set, or the full sweep with ``args.sweep`` (0 when every case ran, 1 when some case
        failed, 2 for invalid options).
    """
    modes = [m.replace("_", "-") for m in MODES if getattr(args, m, False)]
    if len(modes) > 1:
        print(
            f"bench: error: `--{modes[0]}` and `--{modes[1]}` exclude each other", file=sys.stderr
        )
        return 2
    if modes and getattr(args, "sweep", False):
        print(
            f"bench: error: `--sweep` is the full sweep of the default benchmark, which "
            f"`--{modes[0]}` replaces; leave one of them out",
            file=sys.stderr,
        )
        return 2
    if modes and int(getattr(args, "positives_per_row", 1) or 1) > 1:
        print(
            f"bench: error: `--positives-per-row` adds a row to the sweep, which `--{modes[0]}` "
            "replaces; leave one of them out",
            file=sys.stderr,
        )
        return 2
    try:
        device = _resolve_device(args, modes)
        args = _resolve_dims(argparse.Namespace(**{**vars(args), "device": str(device)}))
    except UsageError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 2
    if device.is_cuda:
        from ..bench import gpu

        return gpu.main(args)
    if getattr(args, "distributed", False):
        from ..bench import distributed

        return distributed.main(args)
    if getattr(args, "frameworks", False):
        from ..bench import frameworks

        return frameworks.main(args)
    if getattr(args, "cached", False):
        from ..bench import cached

        return cached.main(args)
    if getattr(args, "profile", False):
        from ..bench import profile

        return profile.main(args)
    if getattr(args, "compare_precision", False):
        from ..bench import precision

        return precision.main(args)
    from ..bench import sweep

    return sweep.main(args)
