"""``python -m portable_siglip bench``: time and memory of the blockwise losses on the CPU.

For each backend (numpy, torch), loss (sigmoid, softmax) and batch size n, three things run
on the same random inputs and are timed the same way (one warm-up, then the median of
``--repeats`` runs of forward + gradient):

``ours``
    :func:`portable_siglip.sigmoid_loss_and_grad` / :func:`softmax_loss_and_grad`.
``roofline``
    The three GEMMs any forward + gradient must do, ``S = img @ txt.T``, ``S @ txt`` and
    ``S.T @ img``, on the same backend and dtype: the matmul roofline of this run
    (DESIGN.md section 7).
``dense autograd`` (torch only)
    The loss written densely in torch and differentiated by autograd, as open_clip's
    ``SigLipLoss`` / ``ClipLoss`` do.

Every row reports GFLOP/s counted as three GEMMs of ``2 n^2 d`` flops whatever the row did, so
the rows compare, and the roofline fraction ``roofline time / row time``. Peak extra memory is
measured per case in a fresh process by :mod:`portable_siglip._memprobe`.

``bench --distributed`` times the distributed strategies over MPI instead (one BLAS thread
per rank, W ranks against one): see :mod:`portable_siglip._distbench`.

``bench --frameworks`` compares the torch modules of :mod:`portable_siglip.backends.torch`
(``SigLipLoss``, ``ClipLoss``; forward + ``loss.backward()``) with open_clip's losses of
the same names when open-clip-torch is installed, a row-chunked autograd loss and the dense
autograd loss: time and peak extra memory of each case in a fresh process under an
address-space limit, cases predicted to exceed ``--memory-cap-gib`` skipped. See
:mod:`portable_siglip._fwbench`.

NumPy and torch are imported inside functions only: ``import portable_siglip`` stays light.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "dense_loss", "main", "make_inputs", "make_run"]

BACKENDS = ("numpy", "torch")
LOSSES = ("sigmoid", "softmax")
IMPLS = ("ours", "roofline", "dense autograd")
DTYPES = ("float32", "float64")

#: Batch sizes n of the default benchmark (``--sizes``).
DEFAULT_SIZES = (2048, 8192)

#: Logit scale t and bias b of the benchmark (SigLIP's initialisation, t' = log 10).
SCALE = 10.0
BIAS = -10.0

#: How strongly each text row is correlated with its image row (noise amplitude).
TEXT_NOISE = 0.5

#: Seconds a memory probe may take beyond ten times the timed median of its case.
PROBE_TIMEOUT_BASE_S = 120.0

MIB = 2**20


# --------------------------------------------------------------------------- command line


def _comma_list(name: str, convert: Callable[[str], Any], allowed: Sequence[Any] | None) -> Any:
    """Return an argparse ``type`` that reads a comma-separated list of distinct values."""

    def parse(text: str) -> list[Any]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            msg = f"`{name}` needs at least one value, got {text!r}"
            raise argparse.ArgumentTypeError(msg)
        values = []
        for item in items:
            try:
                value = convert(item)
            except ValueError:
                msg = f"`{name}` got {item!r}, which is not a valid value"
                raise argparse.ArgumentTypeError(msg) from None
            if allowed is not None and value not in allowed:
                msg = f"`{name}` must be among {', '.join(allowed)}; got {item!r}"
                raise argparse.ArgumentTypeError(msg)
            if value not in values:
                values.append(value)
        return values

    return parse


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        msg = f"must be a positive integer, got {text!r}"
        raise ValueError(msg)
    return value


def _positive_int_arg(text: str) -> int:
    try:
        return _positive_int(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive_float_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        msg = f"must be a positive number, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``python -m portable_siglip bench`` to ``parser``.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The ``bench`` subparser (or any parser).
    """
    parser.add_argument(
        "--backends",
        type=_comma_list("--backends", str, BACKENDS),
        default=list(BACKENDS),
        help="comma-separated array libraries (default: numpy,torch); one that is not "
        "installed is skipped with a note",
    )
    parser.add_argument(
        "--sizes",
        type=_comma_list("--sizes", _positive_int, None),
        default=None,
        help="comma-separated batch sizes n (default: 2048,8192; with --frameworks "
        "8192,16384,32768)",
    )
    parser.add_argument(
        "--dim", type=_positive_int_arg, default=768, help="feature dimension d (768)"
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="feature dtype")
    parser.add_argument(
        "--losses",
        type=_comma_list("--losses", str, LOSSES),
        default=list(LOSSES),
        help="comma-separated losses (default: sigmoid,softmax)",
    )
    parser.add_argument(
        "--block-size",
        type=_positive_int_arg,
        default=None,
        help="tile edge of the blockwise losses (default: the library's)",
    )
    parser.add_argument(
        "--repeats",
        type=_positive_int_arg,
        default=3,
        help="timed runs per case after one warm-up; the median is reported (3)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (0)")
    parser.add_argument("--json", metavar="FILE", default=None, help="write all results here")
    parser.add_argument(
        "--no-dense",
        action="store_true",
        help="skip the dense torch-autograd baseline",
    )
    parser.add_argument(
        "--no-memory",
        action="store_true",
        help="skip the peak-memory probes (one subprocess per case)",
    )
    group = parser.add_argument_group(
        "distributed",
        "`--distributed` times every strategy over MPI instead (numpy only; needs mpi4py and "
        "mpirun): W = 1 and W = --ranks processes, one BLAS thread each, on one global batch",
    )
    group.add_argument(
        "--distributed",
        action="store_true",
        help="benchmark the distributed strategies over MPI (see portable_siglip._distbench)",
    )
    group.add_argument(
        "--ranks",
        type=_comma_list("--ranks", _positive_int, None),
        default=[2],
        help="comma-separated numbers of MPI ranks W >= 2 compared with W = 1 (default: 2)",
    )
    group.add_argument(
        "--batch",
        type=_positive_int_arg,
        default=8192,
        help="global batch n of --distributed (8192); --sizes is for the default benchmark",
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
        help="benchmark against the framework losses (see portable_siglip._fwbench)",
    )
    frameworks.add_argument(
        "--memory-cap-gib",
        type=_positive_float_arg,
        default=16.0,
        help="with --frameworks: skip cases predicted to need more extra memory than this, "
        "and run each case under an address-space limit of about this much (16)",
    )
    frameworks.add_argument(
        "--chunk-size",
        type=_positive_int_arg,
        default=512,
        help="with --frameworks: rows per chunk of the chunked autograd loss and of open_clip's "
        "SigLipLoss(chunk_size=...) where it has one (512)",
    )


# --------------------------------------------------------------------------- the cases


def make_inputs(backend: str, n: int, dim: int, dtype: str, seed: int) -> tuple[Any, Any]:
    """Random L2-normalised image and text features, text rows correlated with image rows.

    Drawn with ``numpy.random.default_rng(seed)`` directly in ``dtype`` (no float64
    temporaries), then handed to ``backend`` without a copy.

    Parameters
    ----------
    backend : {"numpy", "torch"}
        Array library of the returned arrays.
    n, dim : int
        Shape ``(n, dim)`` of each.
    dtype : {"float32", "float64"}
        Their dtype.
    seed : int
        Seed of the generator.

    Returns
    -------
    img, txt : array
        Arrays of ``backend``, rows of unit norm.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n, dim), dtype=np.dtype(dtype))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = rng.standard_normal((n, dim), dtype=np.dtype(dtype))
    txt *= TEXT_NOISE
    txt += img
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    if backend == "torch":
        import torch

        return torch.from_numpy(img), torch.from_numpy(txt)
    return img, txt


def _ours(loss: str, img: Any, txt: Any, block_size: int | None) -> Callable[[], None]:
    import portable_siglip as ps

    loss_and_grad = ps.sigmoid_loss_and_grad if loss == "sigmoid" else ps.softmax_loss_and_grad

    def run() -> None:
        loss_and_grad(img, txt, SCALE, BIAS, block_size=block_size)

    return run


def _roofline(img: Any, txt: Any) -> Callable[[], None]:
    # The same three products as the loss and gradient, with nothing around them. Both
    # numpy and torch hand transposed operands to the GEMM without copying them.
    def run() -> None:
        logits = img @ txt.T  # (n, d) @ (d, n) -> (n, n)
        logits @ txt  # (n, n) @ (n, d) -> (n, d)
        logits.T @ img  # (n, n) @ (n, d) -> (n, d)

    return run


def dense_loss(loss: str, img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Write the loss densely in torch, for autograd: the n x n logits in one piece.

    Parameters
    ----------
    loss : {"sigmoid", "softmax"}
        Which loss.
    img, txt : torch.Tensor, shape (n, d)
        Image and text features.
    scale : torch.Tensor, 0-d
        The logit multiplier t.
    bias : torch.Tensor, 0-d, or None
        The logit bias b (None: 0; no effect on softmax).

    Returns
    -------
    torch.Tensor, 0-d
        The loss, differentiable by autograd.
    """
    import torch
    from torch.nn import functional

    n = img.shape[0]
    logits = scale * img @ txt.T  # (n, d) @ (d, n) -> (n, n)
    if bias is not None:
        logits = logits + bias
    if loss == "sigmoid":
        # Built on every call, as open_clip's SigLipLoss does.
        labels = 2 * torch.eye(n, dtype=logits.dtype) - 1
        return -functional.logsigmoid(labels * logits).sum() / n
    target = torch.arange(n)
    return (
        functional.cross_entropy(logits, target) + functional.cross_entropy(logits.T, target)
    ) / 2


def _dense_autograd(loss: str, img: Any, txt: Any) -> Callable[[], None]:
    import torch

    # detach() shares storage: the inputs of the other cases stay free of autograd.
    img_leaf = img.detach().requires_grad_(True)
    txt_leaf = txt.detach().requires_grad_(True)
    scale = torch.tensor(SCALE, dtype=img.dtype, requires_grad=True)
    bias = torch.tensor(BIAS, dtype=img.dtype, requires_grad=True)
    leaves = (img_leaf, txt_leaf, scale, bias)

    def run() -> None:
        for leaf in leaves:
            leaf.grad = None
        dense_loss(loss, img_leaf, txt_leaf, scale, bias).backward()

    return run


def make_run(
    backend: str, loss: str, impl: str, img: Any, txt: Any, block_size: int | None
) -> Callable[[], None]:
    """Return a function that runs one case once (forward + gradient) and keeps nothing.

    Parameters
    ----------
    backend : {"numpy", "torch"}
        Array library of ``img`` and ``txt``.
    loss : {"sigmoid", "softmax"}
        Which loss (not used by ``roofline``).
    impl : {"ours", "roofline", "dense autograd"}
        What to run; ``dense autograd`` needs torch.
    img, txt : array, shape (n, d)
        The inputs, from :func:`make_inputs`.
    block_size : int or None
        Tile edge of ``ours`` (None: the library default).

    Returns
    -------
    callable
        No arguments, returns None.
    """
    if impl == "ours":
        return _ours(loss, img, txt, block_size)
    if impl == "roofline":
        return _roofline(img, txt)
    if impl == "dense autograd" and backend == "torch":
        return _dense_autograd(loss, img, txt)
    msg = f"no benchmark case {impl!r} for backend {backend!r}"
    raise ValueError(msg)


def _impls(backend: str, dense: bool) -> list[str]:
    impls = ["ours", "roofline"]
    if dense and backend == "torch":
        impls.append("dense autograd")
    return impls


def _time(run: Callable[[], None], repeats: int) -> list[float]:
    """One untimed warm-up, then ``repeats`` wall-clock timings of ``run``."""
    run()
    times = []
    for _ in range(repeats):
        gc.collect()  # not inside the timed region
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


# --------------------------------------------------------------------------- memory probes


def _probe(
    args: argparse.Namespace, backend: str, loss: str, impl: str, n: int, timeout: float
) -> tuple[dict[str, Any] | None, str | None]:
    """Run one case in ``python -m portable_siglip._memprobe``; return (result, error)."""
    command = [
        sys.executable,
        "-m",
        "portable_siglip._memprobe",
        f"--backend={backend}",
        f"--loss={loss}",
        f"--impl={impl}",
        f"--n={n}",
        f"--dim={args.dim}",
        f"--dtype={args.dtype}",
        f"--seed={args.seed}",
    ]
    if args.block_size is not None:
        command.append(f"--block-size={args.block_size}")
    env = dict(os.environ)
    # Importable from a source checkout too, not only from an installed package.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return None, f"memory probe timed out after {timeout:.0f} s"
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return None, f"memory probe failed with status {done.returncode}: {tail[0]}"
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return None, f"memory probe printed no JSON: {done.stdout[-200:]!r}"
    return dict(result), None


# --------------------------------------------------------------------------- reporting


def _versions(backends: Sequence[str]) -> dict[str, Any]:
    import numpy as np

    info: dict[str, Any] = {"numpy": np.__version__}
    try:
        config = np.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        info["numpy_blas"] = f"{blas['name']} {blas['version']}"
    except Exception:  # older numpy: no mode="dicts"
        info["numpy_blas"] = None
    if "torch" in backends:
        import torch

        info["torch"] = torch.__version__
        info["torch_num_threads"] = torch.get_num_threads()
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine(backends: Sequence[str]) -> dict[str, Any]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "python": platform.python_version(),
        **_versions(backends),
        "load_average_before": list(os.getloadavg()),
    }


def _mib(value: int | None) -> float | None:
    return None if value is None else value / MIB


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def _table(rows: list[dict[str, Any]]) -> str:
    header = (
        "backend",
        "loss",
        "n",
        "impl",
        "median s",
        "GFLOP/s",
        "roofline frac",
        "peak MiB",
        "tracemalloc MiB",
    )
    lines = [header]
    for row in rows:
        lines.append(
            (
                row["backend"],
                row["loss"],
                str(row["n"]),
                row["impl"],
                _fmt(row["median_s"], ".3f"),
                _fmt(row["gflops"], ".1f"),
                _fmt(row["roofline_fraction"], ".2f"),
                _fmt(row["peak_extra_mib"], ".1f"),
                _fmt(row["tracemalloc_peak_mib"], ".1f"),
            )
        )
    return render_table(lines, left={0, 1, 3})


def print_notes(notes: Sequence[str], errors: Sequence[str]) -> None:
    """Print a benchmark's notes, then its errors, wrapped at 100 columns."""
    for note in (*notes, *(f"error: {e}" for e in errors)):
        print(textwrap.fill(note, width=100, subsequent_indent="  "))


def print_load_after(machine: dict[str, Any]) -> None:
    """Print the load average after the run and its wall time, from ``machine``."""
    load = ", ".join(f"{x:.2f}" for x in machine["load_average_after"])
    print(f"load average after: {load}; total {machine['wall_s']:.0f} s")


def render_table(lines: Sequence[Sequence[str]], left: set[int]) -> str:
    """Lay out a header line and rows as aligned text columns under a rule.

    Columns in ``left`` (text) align left; the others (numbers) align right.

    Examples
    --------
    >>> print(render_table([("name", "s"), ("a", "1.5"), ("bb", "10.25")], left={0}))
    name      s
    ----  -----
    a       1.5
    bb    10.25
    """
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]

    def render(line: Sequence[str]) -> str:
        cells = [
            cell.ljust(width) if i in left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([render(lines[0]), rule, *(render(line) for line in lines[1:])])


def _header(args: argparse.Namespace, machine: dict[str, Any], block: str) -> str:
    threads = machine.get("torch_num_threads")
    versions = f"numpy {machine['numpy']}"
    if machine.get("numpy_blas"):
        versions += f" ({machine['numpy_blas']})"
    if "torch" in machine:
        versions += f", torch {machine['torch']} (torch.get_num_threads() = {threads})"
    load = ", ".join(f"{x:.2f}" for x in machine["load_average_before"])
    return "\n".join(
        [
            "portable-siglip bench: forward + gradient on the CPU, "
            f"d = {args.dim}, {args.dtype}, t = {SCALE:g}, b = {BIAS:g}, "
            f"block_size = {block}, median of {args.repeats} after 1 warm-up",
            f"machine: {machine['cpu']}; {machine['cpu_count']} CPUs "
            f"({machine['cpus_usable']} usable); python {machine['python']}",
            f"versions: {versions}",
            f"load average (1, 5, 15 min) before: {load}",
        ]
    )


NOTES = (
    "GFLOP/s counts 6 n^2 d flops (three GEMMs of 2 n^2 d) for every row, whatever it did "
    "(the blockwise softmax does a fourth GEMM, its first pass, uncounted), so the rows "
    "compare; roofline frac = roofline time / row time, the roofline being S = img @ txt.T, "
    "S @ txt and S.T @ img on the same backend and dtype, timed the same way in the same run.",
    "peak MiB: each case runs once in a fresh process (python -m portable_siglip._memprobe) "
    "after a tiny warm-up; it is the high-water resident set size during that run minus the "
    "RSS just before it (inputs excluded; outputs and temporaries included), read from VmHWM "
    "in /proc/self/status after resetting it through /proc/self/clear_refs. ru_maxrss, also "
    "in the JSON, is not shown: a child started by (v)fork + exec inherits its parent's "
    "high-water mark there. tracemalloc MiB (numpy only): the exact peak of the bytes numpy "
    "allocated during the run above those held before it (numpy reports its allocations "
    "to tracemalloc). The roofline probe is shared by both losses.",
)


# --------------------------------------------------------------------------- main


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _check_args(args: argparse.Namespace) -> str | None:
    """Validate a namespace that may not have come through :func:`add_arguments`."""
    for name, allowed in (("backends", BACKENDS), ("losses", LOSSES)):
        unknown = [value for value in getattr(args, name) if value not in allowed]
        if unknown:
            return f"`--{name}` must be among {', '.join(allowed)}; got {', '.join(unknown)}"
    if args.dtype not in DTYPES:
        return f"`--dtype` must be one of {', '.join(DTYPES)}; got {args.dtype!r}"
    for name in ("dim", "repeats"):
        if int(getattr(args, name)) <= 0:
            return f"`--{name}` must be a positive integer; got {getattr(args, name)!r}"
    if any(int(n) <= 0 for n in args.sizes):
        return f"`--sizes` must be positive integers; got {args.sizes!r}"
    if args.block_size is not None and int(args.block_size) <= 0:
        return f"`--block-size` must be a positive integer; got {args.block_size!r}"
    return None


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _new_row(
    args: argparse.Namespace, backend: str, loss: str, n: int, impl: str
) -> dict[str, Any]:
    """Return the empty result row of one case; the JSON holds these rows as they are."""
    return {
        "backend": backend,
        "loss": loss,
        "n": n,
        "d": args.dim,
        "dtype": args.dtype,
        "impl": impl,
        "block_size": args.block_size if impl == "ours" else None,
        "times_s": [],
        "median_s": None,
        "gflops": None,
        "roofline_fraction": None,
        "peak_extra_mib": None,
        "tracemalloc_peak_mib": None,
        "memory": None,
        "error": None,
    }


def _bench_backend(
    args: argparse.Namespace, backend: str, rows: list[dict[str, Any]], errors: list[str]
) -> None:
    """Time (and probe) every case of one backend, appending a row per case."""
    # The roofline does not depend on the loss: probe its memory once per n.
    memory_cache: dict[tuple[int, str, str], tuple[dict[str, Any] | None, str | None]] = {}
    for n in args.sizes:
        img, txt = make_inputs(backend, n, args.dim, args.dtype, args.seed)
        flops = 6.0 * n * n * args.dim
        for loss in args.losses:
            case_rows: list[dict[str, Any]] = []
            for impl in _impls(backend, not args.no_dense):
                _progress(f"  {backend} {loss} n={n} {impl} ...")
                row = _new_row(args, backend, loss, n, impl)
                case_rows.append(row)
                try:
                    times = _time(
                        make_run(backend, loss, impl, img, txt, args.block_size), args.repeats
                    )
                except Exception as error:  # e.g. MemoryError: report it, go on
                    row["error"] = f"{type(error).__name__}: {error}"
                    errors.append(f"{backend} {loss} n={n} {impl}: {row['error']}")
                    continue
                median = statistics.median(times)
                row.update(times_s=times, median_s=median, gflops=flops / median / 1e9)
                if args.no_memory:
                    continue
                key = (n, impl, "" if impl == "roofline" else loss)
                if key not in memory_cache:
                    timeout = PROBE_TIMEOUT_BASE_S + 10.0 * median
                    memory_cache[key] = _probe(args, backend, loss, impl, n, timeout)
                memory, error_text = memory_cache[key]
                if memory is None:
                    row["error"] = error_text
                    errors.append(f"{backend} {loss} n={n} {impl}: {error_text}")
                    continue
                row["memory"] = memory
                row["peak_extra_mib"] = _mib(memory["peak_extra_bytes"])
                row["tracemalloc_peak_mib"] = _mib(memory.get("tracemalloc_peak_bytes"))
            roofline_s = next(
                (row["median_s"] for row in case_rows if row["impl"] == "roofline"), None
            )
            for row in case_rows:
                if roofline_s is not None and row["median_s"] is not None:
                    row["roofline_fraction"] = roofline_s / row["median_s"]
            rows.extend(case_rows)
        del img, txt
        gc.collect()


def main(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args``, print the table and optionally write JSON.

    Parameters
    ----------
    args : argparse.Namespace
        Options from a parser prepared by :func:`add_arguments`.

    Returns
    -------
    int
        0 when every case ran, 1 when some case failed (the table and JSON say which),
        2 for invalid options. With ``args.distributed``, what
        :func:`portable_siglip._distbench.main` returns; with ``args.frameworks``, what
        :func:`portable_siglip._fwbench.main` returns.
    """
    if getattr(args, "distributed", False) and getattr(args, "frameworks", False):
        print(
            "bench: error: `--distributed` and `--frameworks` exclude each other", file=sys.stderr
        )
        return 2
    if getattr(args, "distributed", False):
        from . import _distbench

        return _distbench.main(args)
    if getattr(args, "frameworks", False):
        from . import _fwbench

        return _fwbench.main(args)
    if getattr(args, "sizes", None) is None:
        args = argparse.Namespace(**{**vars(args), "sizes": list(DEFAULT_SIZES)})
    problem = _check_args(args)
    if problem is not None:
        print(f"bench: error: {problem}", file=sys.stderr)
        return 2
    if not _installed("numpy"):
        print("bench: error: the benchmark draws its inputs with numpy; install numpy")
        return 2
    notes: list[str] = []
    backends = []
    for backend in args.backends:
        if _installed(backend):
            backends.append(backend)
        else:
            note = f"note: backend {backend!r} is not installed; skipped"
            print(note)
            notes.append(note)
    machine = _machine(backends)
    from ._checks import DEFAULT_BLOCK_SIZE

    block = str(args.block_size) if args.block_size else f"default ({DEFAULT_BLOCK_SIZE})"
    print(_header(args, machine, block), flush=True)

    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    started = time.perf_counter()
    for backend in backends:
        _bench_backend(args, backend, rows, errors)
    machine["load_average_after"] = list(os.getloadavg())
    machine["wall_s"] = time.perf_counter() - started

    print()
    print(_table(rows))
    print()
    print_notes(NOTES, errors)
    print_load_after(machine)
    if args.json is not None:
        report = {
            "machine": machine,
            "config": {
                "backends": backends,
                "losses": list(args.losses),
                "sizes": list(args.sizes),
                "dim": args.dim,
                "dtype": args.dtype,
                "block_size": args.block_size,
                "default_block_size": DEFAULT_BLOCK_SIZE,
                "repeats": args.repeats,
                "seed": args.seed,
                "scale": SCALE,
                "bias": BIAS,
                "dense": not args.no_dense,
                "memory": not args.no_memory,
            },
            "rows": rows,
            "notes": [*notes, *NOTES],
            "errors": errors,
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"results written to {args.json}")
    return 1 if errors else 0
