"""``python -m portable_siglip bench``: time and memory of the blockwise losses on the CPU.

The default run sweeps the batch size n (1024 to 65536), the feature dimension d (256, 768),
both losses and every installed backend (numpy, torch, jax). For each (backend, d, n, loss)
these run on the same random inputs, forward + gradient:

``ours``
    :func:`portable_siglip.sigmoid_loss_and_grad` / :func:`softmax_loss_and_grad`.
``reference loops`` (with ``--reference``)
    ``ours`` with ``PORTABLE_SIGLIP_FAST_PATHS=0``: the array-API tile loops instead of the
    in-place kernels of numpy and torch, to measure what the kernels gain.
``roofline``
    The three GEMMs any forward + gradient must do, ``S = img @ txt.T``, ``S @ txt`` and
    ``S.T @ img``, on the same backend and dtype: the matmul roofline of this run
    (docs/benchmarks.md). Above :data:`ROOFLINE_PANEL_BYTES` of ``S`` the same products run
    on row panels of ``S``, so the roofline exists at every n.
``dense autograd`` (torch only)
    The loss written densely in torch and differentiated by autograd.
``open_clip`` (torch only, when open-clip-torch is installed)
    open_clip's own ``SigLipLoss`` / ``ClipLoss``, forward + ``backward()``.

Timing: one warm-up of every row of a case, then ``--repeats`` rounds in which each row runs
once, in turn, so that a slow spell of the machine hits every row of the case alike; the
median is reported. A case predicted (from the same row at the previous n, scaled as n^2) to
take longer than :data:`LONG_CASE_S` runs once, without warm-up, in its memory probe.
Rows predicted to need more memory than ``--memory-cap-gib`` (the dense n x n ones) are
skipped with the prediction stated.

Every row reports GFLOP/s counted as three GEMMs of ``2 n^2 d`` flops whatever the row did, so
the rows compare, and the roofline fraction ``roofline time / row time``. Peak extra memory is
measured per case in a fresh process by :mod:`portable_siglip._memprobe`. ``--json`` keeps
every row; ``--plots DIR`` draws time and memory against n (:mod:`portable_siglip._plots`).

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
from typing import Any, NamedTuple

__all__ = ["add_arguments", "dense_loss", "main", "make_inputs", "make_run"]

BACKENDS = ("numpy", "torch", "jax")
LOSSES = ("sigmoid", "softmax")
IMPLS = ("ours", "reference loops", "roofline", "dense autograd", "open_clip")
DTYPES = ("float32", "float64")

#: Batch sizes n of the default benchmark (``--sizes``).
DEFAULT_SIZES = (1024, 2048, 4096, 8192, 16384, 32768, 65536)

#: Feature dimensions d of the default benchmark (``--dims``).
DEFAULT_DIMS = (256, 768)

#: d of ``--distributed`` and ``--frameworks`` when ``--dim`` is not given.
DEFAULT_DIM = 768

#: A case predicted to take longer than this (seconds) runs once, in its memory probe.
LONG_CASE_S = 10.0

#: Rate (FLOP/s) assumed for a row never timed at a smaller n: below any measured CPU rate.
PRIOR_FLOPS = 5e10

#: Largest ``S = img @ txt.T`` (bytes) the roofline forms whole; above, it goes by row panels.
ROOFLINE_PANEL_BYTES = 2 * 2**30

#: Peak of the dense n x n rows, in n x n matrices (measured: 5.0 at float32, n = 8192).
DENSE_N2_MATRICES = 5.5

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
        help="comma-separated array libraries (default: numpy,torch,jax); one that is not "
        "installed is skipped with a note",
    )
    parser.add_argument(
        "--sizes",
        type=_comma_list("--sizes", _positive_int, None),
        default=None,
        help="comma-separated batch sizes n (default: 1024,2048,...,65536; with --frameworks "
        "8192,16384,32768)",
    )
    parser.add_argument(
        "--dims",
        type=_comma_list("--dims", _positive_int, None),
        default=None,
        help="comma-separated feature dimensions d of the sweep (default: 256,768, or --dim)",
    )
    parser.add_argument(
        "--dim",
        type=_positive_int_arg,
        default=None,
        help=f"one feature dimension d (default for --distributed and --frameworks: {DEFAULT_DIM})",
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
        help="timed runs per case after one warm-up; the median is reported",
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
        help="skip the dense torch-autograd and open_clip baselines",
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
        "--profile",
        action="store_true",
        help="split the time of our call into tile GEMMs and the rest, against the roofline "
        "(numpy and torch; default n = 8192, d = 768; see portable_siglip._profile)",
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
        help="benchmark against the framework losses (see portable_siglip._fwbench)",
    )
    frameworks.add_argument(
        "--memory-cap-gib",
        type=_positive_float_arg,
        default=16.0,
        help="skip cases predicted to need more extra memory than this; with --frameworks, "
        "also run each case under an address-space limit of about this much",
    )
    frameworks.add_argument(
        "--chunk-size",
        type=_positive_int_arg,
        default=512,
        help="with --frameworks: rows per chunk of the chunked autograd loss and of open_clip's "
        "SigLipLoss(chunk_size=...) where it has one",
    )


# --------------------------------------------------------------------------- the cases


def make_inputs(backend: str, n: int, dim: int, dtype: str, seed: int) -> tuple[Any, Any]:
    """Random L2-normalised image and text features, text rows correlated with image rows.

    Drawn with ``numpy.random.default_rng(seed)`` directly in ``dtype`` (no float64
    temporaries), then handed to ``backend`` without a copy.

    Parameters
    ----------
    backend : {"numpy", "torch", "jax"}
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
    if backend == "jax":
        import jax

        if dtype == "float64":
            jax.config.update("jax_enable_x64", True)  # type: ignore[no-untyped-call]
        return jax.device_put(img), jax.device_put(txt)
    return img, txt


def _wait(*arrays: Any) -> None:
    # jax dispatches asynchronously: a timing must wait for the results to exist.
    for array in arrays:
        ready = getattr(array, "block_until_ready", None)
        if ready is not None:
            ready()


def _ours(
    loss: str, img: Any, txt: Any, block_size: int | None, *, fast_paths: bool = True
) -> Callable[[], None]:
    import portable_siglip as ps
    from portable_siglip._inplace import ENV

    loss_and_grad = ps.sigmoid_loss_and_grad if loss == "sigmoid" else ps.softmax_loss_and_grad

    def run() -> None:
        saved = os.environ.get(ENV)
        if not fast_paths:
            os.environ[ENV] = "0"
        try:
            value, grads = loss_and_grad(img, txt, SCALE, BIAS, block_size=block_size)
        finally:
            if saved is None:
                os.environ.pop(ENV, None)
            else:
                os.environ[ENV] = saved
        _wait(value, *grads)

    return run


def roofline_panel(n: int, itemsize: int) -> int:
    """Rows per panel of the roofline's ``S = img @ txt.T``: n while S fits the panel limit.

    Examples
    --------
    >>> roofline_panel(8192, 4)
    8192
    >>> roofline_panel(65536, 4)
    8192
    """
    if n * n * itemsize <= ROOFLINE_PANEL_BYTES:
        return n
    return max(1024, ROOFLINE_PANEL_BYTES // (n * itemsize) // 1024 * 1024)


def _roofline(img: Any, txt: Any) -> Callable[[], None]:
    # The same three products as the loss and gradient, with nothing around them. numpy,
    # torch and jax hand transposed operands to the GEMM without copying them.
    n = img.shape[0]
    panel = roofline_panel(n, img.dtype.itemsize)

    def run() -> None:
        for start in range(0, n, panel):
            rows = img[start : start + panel, :]
            logits = rows @ txt.T  # (p, d) @ (d, n) -> (p, n)
            _wait(logits @ txt, logits.T @ rows)  # (p, n) @ (n, d), (n, p) @ (p, d)

    return run


def _open_clip(loss: str, img: Any, txt: Any) -> Callable[[], None]:
    import torch

    from ._fwbench import OPEN_CLIP, make_loss

    module: Any = make_loss(loss, OPEN_CLIP, block_size=None, chunk_size=1)
    img_leaf = img.detach().requires_grad_(True)
    txt_leaf = txt.detach().requires_grad_(True)
    scale = torch.tensor(SCALE, dtype=img.dtype, requires_grad=True)
    bias = torch.tensor(BIAS, dtype=img.dtype, requires_grad=True)
    leaves = (img_leaf, txt_leaf, scale, bias)

    def run() -> None:
        for leaf in leaves:
            leaf.grad = None
        if loss == "sigmoid":
            module(img_leaf, txt_leaf, scale, bias).backward()
        else:
            module(img_leaf, txt_leaf, scale).backward()

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
    backend : {"numpy", "torch", "jax"}
        Array library of ``img`` and ``txt``.
    loss : {"sigmoid", "softmax"}
        Which loss (not used by ``roofline``).
    impl : {"ours", "reference loops", "roofline", "dense autograd", "open_clip"}
        What to run; ``dense autograd`` and ``open_clip`` need torch (and open-clip-torch).
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
    if impl == "reference loops":
        return _ours(loss, img, txt, block_size, fast_paths=False)
    if impl == "roofline":
        return _roofline(img, txt)
    if impl == "dense autograd" and backend == "torch":
        return _dense_autograd(loss, img, txt)
    if impl == "open_clip" and backend == "torch":
        return _open_clip(loss, img, txt)
    msg = f"no benchmark case {impl!r} for backend {backend!r}"
    raise ValueError(msg)


def _impls(backend: str, dense: bool, open_clip: bool, reference: bool = False) -> list[str]:
    impls = ["ours", "reference loops", "roofline"] if reference else ["ours", "roofline"]
    if dense and backend == "torch":
        impls.append("dense autograd")
        if open_clip:
            impls.append("open_clip")
    return impls


def _timed(run: Callable[[], None]) -> float:
    gc.collect()  # not inside the timed region
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def time_interleaved(runs: Sequence[Callable[[], None]], repeats: int) -> list[list[float]]:
    """Warm every run up once, then time ``repeats`` rounds of all of them in turn.

    Parameters
    ----------
    runs : sequence of callables
        The rows of one case.
    repeats : int
        Rounds; each times every run once.

    Returns
    -------
    list of list of float
        Wall-clock seconds of each run, one list per run.

    Examples
    --------
    >>> times = time_interleaved([lambda: None, lambda: None], 3)
    >>> [len(t) for t in times]
    [3, 3]
    """
    for run in runs:
        run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, record in zip(runs, times, strict=True):
            record.append(_timed(run))
    return times


# --------------------------------------------------------------------------- memory probes


def _probe(
    args: argparse.Namespace, case: Case, impl: str, timeout: float
) -> tuple[dict[str, Any] | None, str | None]:
    """Run one case in ``python -m portable_siglip._memprobe``; return (result, error)."""
    command = [
        sys.executable,
        "-m",
        "portable_siglip._memprobe",
        f"--backend={case.backend}",
        f"--loss={case.loss}",
        f"--impl={impl}",
        f"--n={case.n}",
        f"--dim={case.d}",
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
    if "jax" in backends:
        import jax

        info["jax"] = jax.__version__
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
        "d",
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
        if row["skipped"] is not None:
            skipped = ("skipped: " + row["skipped"], "", "", "", "")
        else:
            skipped = (
                _fmt(row["median_s"], ".3f"),
                _fmt(row["gflops"], ".1f"),
                _fmt(row["roofline_fraction"], ".2f"),
                _fmt(row["peak_extra_mib"], ".1f"),
                _fmt(row["tracemalloc_peak_mib"], ".1f"),
            )
        lines.append(
            (row["backend"], row["loss"], str(row["d"]), str(row["n"]), row["impl"], *skipped)
        )
    return render_table(lines, left={0, 1, 4})


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
    versions = f"numpy {machine['numpy']}"
    if machine.get("numpy_blas"):
        versions += f" ({machine['numpy_blas']})"
    if "torch" in machine:
        threads = machine.get("torch_num_threads")
        versions += f", torch {machine['torch']} (torch.get_num_threads() = {threads})"
    if "jax" in machine:
        versions += f", jax {machine['jax']}"
    if "open_clip" in machine:
        versions += f", open-clip-torch {machine['open_clip']}"
    load = ", ".join(f"{x:.2f}" for x in machine["load_average_before"])
    dims = ", ".join(str(d) for d in args.dims)
    return "\n".join(
        [
            "portable-siglip bench: forward + gradient on the CPU, "
            f"d in {{{dims}}}, {args.dtype}, t = {SCALE:g}, b = {BIAS:g}, "
            f"block_size = {block}, median of {args.repeats} interleaved rounds after 1 warm-up",
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
    "softmax rows do four GEMMs (a log-sum-exp pass, then the gradient pass), so their "
    "roofline frac is at most about 0.75; it is the structure, not overhead (docs/benchmarks.md).",
    f"Cases predicted to take over {LONG_CASE_S:g} s run once, without warm-up, in their "
    "memory probe, which times them too. Dense and open_clip rows predicted to need over "
    "--memory-cap-gib are skipped; the roofline runs on row panels of S beyond "
    f"{ROOFLINE_PANEL_BYTES / 2**30:g} GiB and its memory is not probed.",
    "peak MiB: each case runs once in a fresh process (python -m portable_siglip._memprobe) "
    "after a tiny warm-up; it is the high-water resident set size during that run minus the "
    "RSS just before it (inputs excluded; outputs and temporaries included), read from VmHWM "
    "in /proc/self/status after resetting it through /proc/self/clear_refs. ru_maxrss, also "
    "in the JSON, is not shown: a child started by (v)fork + exec inherits its parent's "
    "high-water mark there. tracemalloc MiB (numpy only): the exact peak of the bytes numpy "
    "allocated during the run above those held before it (numpy reports its allocations "
    "to tracemalloc).",
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
    if int(args.repeats) <= 0:
        return f"`--repeats` must be a positive integer; got {args.repeats!r}"
    for name in ("sizes", "dims"):  # dims is only resolved for the sweep
        values = getattr(args, name, None)
        if values is not None and any(int(v) <= 0 for v in values):
            return f"`--{name}` must be positive integers; got {values!r}"
    dim = getattr(args, "dim", None)
    if dim is not None and int(dim) <= 0:
        return f"`--dim` must be a positive integer; got {dim!r}"
    if args.block_size is not None and int(args.block_size) <= 0:
        return f"`--block-size` must be a positive integer; got {args.block_size!r}"
    cap = getattr(args, "memory_cap_gib", 16.0)
    if not (isinstance(cap, (int, float)) and math.isfinite(cap) and cap > 0):
        return f"`--memory-cap-gib` must be a positive number; got {cap!r}"
    return None


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Progress:
    """A progress line on stderr: cases done, elapsed time and an estimate of what is left.

    The estimate weighs each case by its flop count ``n^2 d`` (times four thirds for the
    softmax), which is what its time is proportional to.

    Parameters
    ----------
    weights : sequence of float
        Work of each case, in the order they will run.
    stream : file-like, optional
        Where to write (default: ``sys.stderr``). On a terminal the line is redrawn in
        place; otherwise one line per case is written.
    """

    def __init__(self, weights: Sequence[float], stream: Any = None) -> None:
        self._weights = list(weights)
        self._total = sum(self._weights) or 1.0
        self._done = 0.0
        self._count = 0
        self._started = time.perf_counter()
        self._stream = sys.stderr if stream is None else stream
        self._tty = bool(getattr(self._stream, "isatty", lambda: False)())

    def start(self, label: str) -> None:
        """Show that the next case, ``label``, is running."""
        elapsed = time.perf_counter() - self._started
        fraction = self._done / self._total
        left = elapsed / fraction * (1.0 - fraction) if fraction > 0 else None
        width = 24
        bar = "#" * round(width * fraction) + "." * (width - round(width * fraction))
        eta = "?" if left is None else _clock(left)
        line = (
            f"[{bar}] {self._count}/{len(self._weights)} cases, {_clock(elapsed)} elapsed, "
            f"~{eta} left | {label}"
        )
        if self._tty:
            self._stream.write("\r\033[K" + line)
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def advance(self) -> None:
        """Mark the current case done."""
        self._done += self._weights[self._count]
        self._count += 1

    def close(self) -> None:
        """End the line on a terminal."""
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()


def _clock(seconds: float) -> str:
    """Format seconds as ``h:mm:ss``.

    Examples
    --------
    >>> _clock(3725.2)
    '1:02:05'
    """
    whole = round(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


class Case(NamedTuple):
    """One (backend, d, n, loss) point of the sweep; its rows are the impls."""

    backend: str
    d: int
    n: int
    loss: str


def _new_row(args: argparse.Namespace, case: Case, impl: str) -> dict[str, Any]:
    """Return the empty result row of one case; the JSON holds these rows as they are."""
    return {
        "backend": case.backend,
        "loss": case.loss,
        "n": case.n,
        "d": case.d,
        "dtype": args.dtype,
        "impl": impl,
        "block_size": args.block_size if impl in ("ours", "reference loops") else None,
        "times_s": [],
        "median_s": None,
        "gflops": None,
        "roofline_fraction": None,
        "peak_extra_mib": None,
        "tracemalloc_peak_mib": None,
        "memory": None,
        "timed_in": None,
        "skipped": None,
        "error": None,
    }


class _Sweep:
    """The state of one sweep: rows, errors and the last time of every (backend, d, loss, impl)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rows: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.last: dict[tuple[str, int, str, str], tuple[int, float, float | None]] = {}
        self.itemsize = 4 if args.dtype == "float32" else 8
        self.cap_bytes = float(getattr(args, "memory_cap_gib", 16.0)) * 2**30

    def predicted_s(self, case: Case, impl: str) -> float:
        previous = self.last.get((case.backend, case.d, case.loss, impl))
        if previous is None or previous[1] <= 0:
            return 6.0 * case.n * case.n * case.d / PRIOR_FLOPS
        return previous[1] * (case.n / previous[0]) ** 2

    def too_big(self, case: Case, impl: str) -> str | None:
        if impl not in ("dense autograd", "open_clip"):
            return None
        from ._fwbench import predict_peak_bytes

        previous = self.last.get((case.backend, case.d, case.loss, impl))
        measured = None
        if previous is not None and previous[2] is not None:
            measured = (previous[0], int(previous[2]))
        predicted = max(
            DENSE_N2_MATRICES * case.n * case.n * self.itemsize,
            predict_peak_bytes(case.loss, impl, case.n, case.d, self.itemsize, 1, measured),
        )
        if predicted > self.cap_bytes:
            cap = self.cap_bytes / 2**30
            return f"predicted {predicted / 2**30:.1f} GiB > {cap:g} GiB cap"
        return None

    def fail(self, case: Case, row: dict[str, Any], text: str) -> None:
        row["error"] = text
        self.errors.append(
            f"{case.backend} {case.loss} d={case.d} n={case.n} {row['impl']}: {text}"
        )

    def record(self, case: Case, row: dict[str, Any], times: list[float], where: str) -> None:
        median = statistics.median(times)
        flops = 6.0 * case.n * case.n * case.d
        row.update(times_s=times, median_s=median, gflops=flops / median / 1e9, timed_in=where)

    def remember(self, case: Case, row: dict[str, Any]) -> None:
        if row["median_s"] is not None:
            peak = None if row["memory"] is None else row["memory"]["peak_extra_bytes"]
            self.last[(case.backend, case.d, case.loss, row["impl"])] = (
                case.n,
                row["median_s"],
                peak,
            )


def _run_case(sweep: _Sweep, case: Case, impls: list[str], inputs: tuple[Any, Any]) -> None:
    """Time and probe every row of one case, appending them to ``sweep.rows``."""
    args = sweep.args
    rows = {impl: _new_row(args, case, impl) for impl in impls}
    short: list[str] = []
    long: list[str] = []
    for impl in impls:
        reason = None if args.no_dense else sweep.too_big(case, impl)
        if reason is not None:
            rows[impl]["skipped"] = reason
        elif sweep.predicted_s(case, impl) > LONG_CASE_S:
            long.append(impl)
        else:
            short.append(impl)
    img, txt = inputs
    if short:
        try:
            runs = [
                make_run(case.backend, case.loss, impl, img, txt, args.block_size) for impl in short
            ]
            times = time_interleaved(runs, args.repeats)
        except Exception as error:  # e.g. MemoryError: report it, go on
            for impl in short:
                sweep.fail(case, rows[impl], f"{type(error).__name__}: {error}")
        else:
            for impl, record in zip(short, times, strict=True):
                sweep.record(case, rows[impl], record, "interleaved")
    for impl in long:
        # The roofline is not probed: run it here, once. The others run in their probe.
        if impl == "roofline" or args.no_memory:
            try:
                elapsed = _timed(make_run(case.backend, case.loss, impl, img, txt, args.block_size))
            except Exception as error:
                sweep.fail(case, rows[impl], f"{type(error).__name__}: {error}")
            else:
                sweep.record(case, rows[impl], [elapsed], "once")
    for impl in impls:
        row = rows[impl]
        if args.no_memory or impl == "roofline" or row["skipped"] or row["error"]:
            continue
        timeout = PROBE_TIMEOUT_BASE_S + 10.0 * sweep.predicted_s(case, impl)
        memory, error_text = _probe(args, case, impl, timeout)
        if memory is None:
            sweep.fail(case, row, str(error_text))
            continue
        row["memory"] = memory
        row["peak_extra_mib"] = _mib(memory["peak_extra_bytes"])
        row["tracemalloc_peak_mib"] = _mib(memory.get("tracemalloc_peak_bytes"))
        if impl in long:
            sweep.record(case, row, [float(memory["run_s"])], "memory probe")
    roofline_s = rows["roofline"]["median_s"] if "roofline" in rows else None
    for impl in impls:
        row = rows[impl]
        if roofline_s is not None and row["median_s"] is not None:
            row["roofline_fraction"] = roofline_s / row["median_s"]
        sweep.remember(case, row)
        sweep.rows.append(row)


def _cases(args: argparse.Namespace, backends: Sequence[str]) -> list[Case]:
    return [
        Case(backend, d, n, loss)
        for backend in backends
        for d in args.dims
        for n in args.sizes
        for loss in args.losses
    ]


def _sweep(args: argparse.Namespace, backends: Sequence[str], open_clip: bool) -> _Sweep:
    sweep = _Sweep(args)
    cases = _cases(args, backends)
    progress = Progress([c.n * c.n * c.d * (4 if c.loss == "softmax" else 3) for c in cases])
    inputs: tuple[Any, Any] | None = None
    key: tuple[str, int, int] | None = None
    for case in cases:
        if key != (case.backend, case.d, case.n):
            inputs = None  # free the previous inputs before drawing the next
            gc.collect()
            inputs = make_inputs(case.backend, case.n, case.d, args.dtype, args.seed)
            key = (case.backend, case.d, case.n)
        assert inputs is not None
        progress.start(f"{case.backend} {case.loss} d={case.d} n={case.n}")
        reference = bool(getattr(args, "reference", False))
        impls = _impls(case.backend, not args.no_dense, open_clip, reference)
        _run_case(sweep, case, impls, inputs)
        progress.advance()
    progress.close()
    return sweep


def _resolve_dims(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in the per-mode defaults of ``--sizes``, ``--dims`` and ``--dim``."""
    values = vars(args)
    sweep = not (values.get("distributed") or values.get("frameworks"))
    dim = values.get("dim")
    updates: dict[str, Any] = {}
    if values.get("profile"):
        updates["sizes"] = values.get("sizes") or [8192]
        updates["dims"] = values.get("dims") or [dim or DEFAULT_DIM]
    elif sweep:
        if values.get("sizes") is None:
            updates["sizes"] = list(DEFAULT_SIZES)
        if values.get("dims") is None:
            updates["dims"] = [dim] if dim is not None else list(DEFAULT_DIMS)
    elif dim is None:
        updates["dim"] = DEFAULT_DIM
    return argparse.Namespace(**{**values, **updates})


def _open_clip_version(backends: Sequence[str], dense: bool) -> str | None:
    if "torch" not in backends or not dense:
        return None
    from ._fwbench import open_clip_info

    info = open_clip_info()
    return str(info["version"]) if info.get("installed") else None


def main(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args``, print the table and optionally write JSON.

    Parameters
    ----------
    args : argparse.Namespace
        Options from a parser prepared by :func:`add_arguments`.

    Returns
    -------
    int
        0 when every case ran (or was skipped for its predicted memory), 1 when some case
        failed (the table and JSON say which), 2 for invalid options. With
        ``args.distributed``, what :func:`portable_siglip._distbench.main` returns; with
        ``args.frameworks``, what :func:`portable_siglip._fwbench.main` returns.
    """
    modes = [m for m in ("distributed", "frameworks", "profile") if getattr(args, m, False)]
    if len(modes) > 1:
        print(
            f"bench: error: `--{modes[0]}` and `--{modes[1]}` exclude each other", file=sys.stderr
        )
        return 2
    args = _resolve_dims(args)
    if getattr(args, "distributed", False):
        from . import _distbench

        return _distbench.main(args)
    if getattr(args, "frameworks", False):
        from . import _fwbench

        return _fwbench.main(args)
    problem = _check_args(args)
    if problem is not None:
        print(f"bench: error: {problem}", file=sys.stderr)
        return 2
    if getattr(args, "profile", False):
        from . import _profile

        return _profile.main(args)
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
    open_clip = _open_clip_version(backends, not args.no_dense)
    if open_clip is not None:
        machine["open_clip"] = open_clip
    elif "torch" in backends and not args.no_dense:
        notes.append("note: open-clip-torch is not installed; its rows are left out")
        print(notes[-1])
    from ._checks import DEFAULT_BLOCK_SIZE

    block = str(args.block_size) if args.block_size else f"default ({DEFAULT_BLOCK_SIZE})"
    print(_header(args, machine, block), flush=True)

    started = time.perf_counter()
    sweep = _sweep(args, backends, open_clip is not None)
    rows, errors = sweep.rows, sweep.errors
    machine["load_average_after"] = list(os.getloadavg())
    machine["wall_s"] = time.perf_counter() - started

    print()
    print(_table(rows))
    print()
    print_notes(NOTES, errors)
    print_load_after(machine)
    report = {
        "machine": machine,
        "config": {
            "backends": backends,
            "losses": list(args.losses),
            "sizes": list(args.sizes),
            "dims": list(args.dims),
            "dtype": args.dtype,
            "block_size": args.block_size,
            "default_block_size": DEFAULT_BLOCK_SIZE,
            "repeats": args.repeats,
            "seed": args.seed,
            "scale": SCALE,
            "bias": BIAS,
            "dense": not args.no_dense,
            "reference": bool(getattr(args, "reference", False)),
            "memory": not args.no_memory,
            "memory_cap_gib": getattr(args, "memory_cap_gib", 16.0),
            "long_case_s": LONG_CASE_S,
        },
        "rows": rows,
        "notes": [*notes, *NOTES],
        "errors": errors,
    }
    if args.json is not None:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"results written to {args.json}")
    if getattr(args, "plots", None) is not None:
        try:
            from ._plots import write_plots

            for path in write_plots(report, args.plots):
                print(f"plot written to {path}")
        except (ModuleNotFoundError, ValueError) as error:
            errors.append(f"plots: {error}")
            print(f"error: plots: {error}", file=sys.stderr)
    return 1 if errors else 0
