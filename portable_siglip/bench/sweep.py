"""``python -m portable_siglip bench``: time and memory of the blockwise losses on the CPU.

Two plans share this code. The default, the **quick set** (:data:`QUICK_SIZES`,
:data:`QUICK_DIMS`, :data:`QUICK_BACKENDS`): both losses at n = 4096, d = 768 on numpy and
torch, ours against the dense baseline of each, side by side; a few minutes on 2 cores.
``--sweep`` (or ``--full``), the **full sweep** (:data:`DEFAULT_SIZES`, :data:`DEFAULT_DIMS`,
every backend): the batch size n from 1024 to 65536, d = 256 and 768, both losses, numpy,
torch and jax; 84 cases, over an hour on a 2-core machine (the numpy cases alone took 31
minutes, the torch ones 35, for docs/benchmarks.md) and several hours on a loaded one.
``--sizes``, ``--dims`` and ``--backends`` replace either plan's grid; :func:`plan` lists the
cases. For each (backend, d, n, loss) these run on the same random inputs, forward +
gradient:

``ours``
    :func:`portable_siglip.sigmoid_loss_and_grad` / :func:`softmax_loss_and_grad`. On jax it
    is what a jax user runs: ``jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)),
    static_argnames=("block_size",))`` of :mod:`portable_siglip.backends.jax`'s loss, with
    ``scale`` and ``bias`` as 0-d arrays, compiled once per case (``.lower(...).compile()``)
    before any timed run; the compile time is its own column (:class:`CompiledRun`).
``ours ids`` (with ``--positives-per-row K``, K >= 2)
    ``ours`` with several positives per row: ``img_ids = txt_ids = arange(n) // K`` (groups
    of K duplicated image-caption pairs, so every row and column has K positives), on the
    same inputs. It and ``ours`` are always timed in the same interleaved rounds, even when
    long, and the report gives its time and peak memory as ratios to ``ours``.
``reference loops`` (with ``--reference``)
    ``ours`` with ``PORTABLE_SIGLIP_FAST_PATHS=0``: the array-API tile loops instead of the
    in-place kernels of numpy and torch, to measure what the kernels gain. On jax it is the
    eager call of the core function (no ``jit``), which takes those loops too.
``roofline``
    The three GEMMs any forward + gradient must do, ``S = img @ txt.T``, ``S @ txt`` and
    ``S.T @ img``, on the same backend and dtype: the matmul roofline of this run
    (docs/benchmarks.md). Above :data:`ROOFLINE_PANEL_BYTES` of ``S`` the same products run
    on row panels of ``S``, so the roofline exists at every n.
``dense autograd`` (torch only)
    The loss written densely in torch and differentiated by autograd.
``dense numpy`` (numpy only)
    The loss and its gradients written densely in numpy by hand, in the inputs' dtype
    (:func:`portable_siglip.bench.baselines.dense_numpy_loss_and_grad`).
``open_clip`` (torch only, when open-clip-torch is installed)
    open_clip's own ``SigLipLoss`` / ``ClipLoss``, forward + ``backward()``.

Timing: one warm-up of every row of a case, then ``--repeats`` rounds in which each row runs
once, in turn, so that a slow spell of the machine hits every row of the case alike; the
median is reported. A case predicted (from the same row at the previous n, scaled as n^2) to
take longer than :data:`LONG_CASE_S` runs once, without warm-up, in its memory probe.
Rows predicted to need more memory than ``--memory-cap-gib`` (the dense n x n ones) are
skipped with the prediction stated.

The jitted jax rows report their compile time (``compile_s``: tracing, lowering and the XLA
compile of ``.lower(...).compile()``) beside the run time, which excludes it; other rows have
none.

A second table sets ours against the dense baseline of each case (``dense numpy``,
``dense autograd``): the baseline's time and peak memory as multiples of ours, from the same
interleaved rounds.

Every row reports GFLOP/s counted as three GEMMs of ``2 n^2 d`` flops whatever the row did, so
the rows compare, and the roofline fraction ``roofline time / row time``. Peak extra memory is
measured per case in a fresh process by :mod:`portable_siglip.bench.memprobe`. ``--json``
keeps every row; ``--plots DIR`` draws time and memory against n
(:mod:`portable_siglip.bench.plots`).

The other modes of ``bench`` (``--distributed``, ``--frameworks``, ``--profile``) are the
other modules of :mod:`portable_siglip.bench`; :mod:`portable_siglip.cli._bench` chooses.

NumPy and torch are imported inside functions only: ``import portable_siglip`` stays light.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from .. import _registry as registry
from .baselines import (
    DENSE,
    DENSE_NUMPY,
    OPEN_CLIP,
    OURS,
    dense_loss,
    dense_numpy_loss_and_grad,
    open_clip_forward,
    predict_peak_bytes,
)
from .common import (
    BIAS,
    PROBE_TIMEOUT_BASE_S,
    SCALE,
    Progress,
    check_args,
    fmt,
    installed,
    loss_and_grad,
    machine_info,
    make_inputs,
    mib,
    panel_rows,
    print_load_after,
    print_notes,
    refuse,
    render_table,
    run_config,
    run_json_line,
    time_interleaved,
    timed,
    torch_leaves,
    wait_ready,
    write_report,
)

__all__ = [
    "IMPLS",
    "OURS_IDS",
    "QUICK_BACKENDS",
    "QUICK_DIMS",
    "QUICK_SIZES",
    "Case",
    "CompiledRun",
    "compile_seconds",
    "group_ids",
    "main",
    "make_run",
    "plan",
    "roofline_panel",
]

#: Our loss with several positives per row (``--positives-per-row``).
OURS_IDS = "ours ids"

IMPLS = (OURS, OURS_IDS, "reference loops", "roofline", DENSE_NUMPY, DENSE, OPEN_CLIP)

#: The dense baselines that the second table sets against ours.
DENSE_BASELINES = (DENSE_NUMPY, DENSE)

#: Batch sizes n of the full sweep, ``bench --sweep`` (``--sizes`` replaces them).
DEFAULT_SIZES = (1024, 2048, 4096, 8192, 16384, 32768, 65536)

#: Feature dimensions d of the full sweep (``--dims`` replaces them).
DEFAULT_DIMS = (256, 768)

#: Batch sizes n of the quick set, the bare ``bench`` (``--sizes`` replaces them).
QUICK_SIZES = (4096,)

#: Feature dimensions d of the quick set (``--dims`` or ``--dim`` replaces them).
QUICK_DIMS = (768,)

#: Backends of the quick set (``--backends`` replaces them); one not installed is skipped.
QUICK_BACKENDS = ("numpy", "torch")

#: A case predicted to take longer than this (seconds) runs once, in its memory probe.
LONG_CASE_S = 10.0

#: Rate (FLOP/s) assumed for a row never timed at a smaller n: below any measured CPU rate.
PRIOR_FLOPS = 5e10

#: Largest ``S = img @ txt.T`` (bytes) the roofline forms whole; above, it goes by row panels.
ROOFLINE_PANEL_BYTES = 2 * 2**30

#: Peak of the dense n x n rows, in n x n matrices (measured: 5.0 at float32, n = 8192).
DENSE_N2_MATRICES = 5.5


# --------------------------------------------------------------------------- the rows


def group_ids(backend: str, n: int, positives: int) -> Any:
    """``arange(n) // positives`` as an integer array of ``backend``: the ids of ``ours ids``.

    Both sides get these ids, so pairs ``(i, j)`` with ``i // positives == j // positives``
    are positives: every row and column has ``positives`` of them (the last group fewer
    when ``positives`` does not divide ``n``).

    Examples
    --------
    >>> group_ids("numpy", 5, 2).tolist()
    [0, 0, 1, 1, 2]
    """
    import numpy as np

    ids = np.arange(n, dtype=np.int64) // positives
    if backend == "torch":
        import torch

        return torch.from_numpy(ids)
    if backend == "jax":
        import jax

        return jax.device_put(ids.astype(np.int32))  # int64 needs jax_enable_x64
    return ids


def _ours(
    loss: str,
    img: Any,
    txt: Any,
    block_size: int | None,
    *,
    fast_paths: bool = True,
    ids: Any = None,
) -> Callable[[], None]:
    from portable_siglip._inplace import ENV

    function = loss_and_grad(loss)
    # Only `ours ids` passes the keywords: `ours` is the plain call, exactly as without them.
    keywords = {} if ids is None else {"img_ids": ids, "txt_ids": ids}

    def run() -> None:
        saved = os.environ.get(ENV)
        if not fast_paths:
            os.environ[ENV] = "0"
        try:
            value, grads = function(img, txt, SCALE, BIAS, block_size=block_size, **keywords)
        finally:
            if saved is None:
                os.environ.pop(ENV, None)
            else:
                os.environ[ENV] = saved
        wait_ready(value, *grads)

    return run


class CompiledRun:
    """A run whose program was compiled when the run was made, and how long that took.

    :func:`make_run` returns one for the jitted jax rows: the compile happens there, outside
    every timed region, and calling the object runs the compiled program only.

    Parameters
    ----------
    run : callable
        No arguments; runs the compiled program once and waits for its outputs.
    compile_s : float
        Wall-clock seconds of tracing, lowering and compiling it.
    """

    def __init__(self, run: Callable[[], None], compile_s: float) -> None:
        self._run = run
        self.compile_s = compile_s

    def __call__(self) -> None:
        """Run the compiled program once and wait for its outputs."""
        self._run()


def compile_seconds(run: Callable[[], None]) -> float | None:
    """Return the compile time of a run from :func:`make_run`; None if not a :class:`CompiledRun`.

    Examples
    --------
    >>> compile_seconds(CompiledRun(lambda: None, 0.25)), compile_seconds(lambda: None)
    (0.25, None)
    """
    return run.compile_s if isinstance(run, CompiledRun) else None


def _ours_jit(loss: str, img: Any, txt: Any, block_size: int | None, ids: Any) -> CompiledRun:
    """``ours`` on jax as a jax user runs it: jitted loss and gradient, compiled here."""
    import importlib

    import jax
    import jax.numpy as jnp

    from .. import _losses

    psj = importlib.import_module("portable_siglip.backends.jax")
    # The bridge's function of the loss, named as the core's loss alone (the core's
    # evaluation for a loss without public functions, which jax differentiates as it is).
    # A new jitted function per run: nothing is reused from another case's compile.
    spec = registry.get(loss)
    alone = (
        getattr(psj, spec.functions[0]) if spec.functions else _losses.loss_functions(spec, psj)[0]
    )
    step = jax.jit(
        jax.value_and_grad(alone, argnums=(0, 1, 2, 3)),
        static_argnames=("block_size",),
    )
    scale = jnp.asarray(SCALE, dtype=img.dtype)
    bias = jnp.asarray(BIAS, dtype=img.dtype)
    keywords = {} if ids is None else {"img_ids": ids, "txt_ids": ids}
    started = time.perf_counter()
    compiled = step.lower(img, txt, scale, bias, block_size=block_size, **keywords).compile()
    compile_s = time.perf_counter() - started

    def run() -> None:
        value, grads = compiled(img, txt, scale, bias, **keywords)
        wait_ready(value, *grads)

    return CompiledRun(run, compile_s)


def roofline_panel(n: int, itemsize: int) -> int:
    """Rows per panel of the roofline's ``S = img @ txt.T``: n while S fits the panel limit.

    Examples
    --------
    >>> roofline_panel(8192, 4)
    8192
    >>> roofline_panel(65536, 4)
    8192
    """
    return panel_rows(n, itemsize, ROOFLINE_PANEL_BYTES)


def _roofline(img: Any, txt: Any) -> Callable[[], None]:
    # The same three products as the loss and gradient, with nothing around them. numpy,
    # torch and jax hand transposed operands to the GEMM without copying them.
    n = img.shape[0]
    panel = roofline_panel(n, img.dtype.itemsize)

    def run() -> None:
        for start in range(0, n, panel):
            rows = img[start : start + panel, :]
            logits = rows @ txt.T  # (p, d) @ (d, n) -> (p, n)
            wait_ready(logits @ txt, logits.T @ rows)  # (p, n) @ (n, d), (n, p) @ (p, d)

    return run


def _autograd(forward: Callable[..., Any], img: Any, txt: Any) -> Callable[[], None]:
    """``forward(img, txt, scale, bias).backward()`` on torch leaves of the inputs."""
    # The leaves share storage with the inputs, which stay free of autograd.
    leaves = torch_leaves(img, txt)

    def run() -> None:
        for leaf in leaves:
            leaf.grad = None
        forward(*leaves).backward()

    return run


def _open_clip(loss: str, img: Any, txt: Any) -> Callable[[], None]:
    return _autograd(open_clip_forward(loss), img, txt)


def _dense_autograd(loss: str, img: Any, txt: Any) -> Callable[[], None]:
    return _autograd(functools.partial(dense_loss, loss), img, txt)


def _dense_numpy(loss: str, img: Any, txt: Any) -> Callable[[], None]:
    def run() -> None:
        dense_numpy_loss_and_grad(loss, img, txt, SCALE, BIAS)

    return run


def make_run(
    backend: str,
    loss: str,
    impl: str,
    img: Any,
    txt: Any,
    block_size: int | None,
    positives_per_row: int = 2,
) -> Callable[[], None]:
    """Return a function that runs one case once (forward + gradient) and keeps nothing.

    Parameters
    ----------
    backend : {"numpy", "torch", "jax"}
        Array library of ``img`` and ``txt``.
    loss : str
        A registered loss's name (not used by ``roofline``).
    impl : {"ours", "ours ids", "reference loops", "roofline", "dense numpy", "dense autograd", \
"open_clip"}
        What to run; ``dense numpy`` needs numpy inputs, ``dense autograd`` and ``open_clip``
        torch ones (and open-clip-torch).
    img, txt : array, shape (n, d)
        The inputs, from :func:`portable_siglip.bench.common.make_inputs`.
    block_size : int or None
        Tile edge of ``ours`` (None: the library default).
    positives_per_row : int
        K of ``ours ids``: its ids are :func:`group_ids` ``(backend, n, K)``, made here.

    Returns
    -------
    callable
        No arguments, returns None. For ``ours`` and ``ours ids`` on jax, a
        :class:`CompiledRun`: the jitted loss and gradient, compiled here (its ``compile_s``
        says how long that took), so calling it runs the compiled program only.
    """
    if impl == "ours":
        if backend == "jax":
            return _ours_jit(loss, img, txt, block_size, None)
        return _ours(loss, img, txt, block_size)
    if impl == OURS_IDS:
        ids = group_ids(backend, img.shape[0], positives_per_row)
        if backend == "jax":
            return _ours_jit(loss, img, txt, block_size, ids)
        return _ours(loss, img, txt, block_size, ids=ids)
    if impl == "reference loops":
        return _ours(loss, img, txt, block_size, fast_paths=False)
    if impl == "roofline":
        return _roofline(img, txt)
    if impl == DENSE_NUMPY and backend == "numpy":
        return _dense_numpy(loss, img, txt)
    if impl == "dense autograd" and backend == "torch":
        return _dense_autograd(loss, img, txt)
    if impl == "open_clip" and backend == "torch":
        return _open_clip(loss, img, txt)
    msg = f"no benchmark case {impl!r} for backend {backend!r}"
    raise ValueError(msg)


def _impls(
    backend: str, dense: bool, open_clip: bool, reference: bool = False, ids: bool = False
) -> list[str]:
    impls = ["ours", *([OURS_IDS] if ids else []), *(["reference loops"] if reference else [])]
    impls.append("roofline")
    if dense and backend == "numpy":
        impls.append(DENSE_NUMPY)
    if dense and backend == "torch":
        impls.append("dense autograd")
        if open_clip:
            impls.append("open_clip")
    return impls


# --------------------------------------------------------------------------- memory probes


def _probe(
    args: argparse.Namespace, case: Case, impl: str, timeout: float
) -> tuple[dict[str, Any] | None, str | None]:
    """Run one case in ``python -m portable_siglip.bench.memprobe``; return (result, error)."""
    command = [
        sys.executable,
        "-m",
        "portable_siglip.bench.memprobe",
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
    if impl == OURS_IDS:
        command.append(f"--positives-per-row={_positives(args)}")
    return run_json_line(command, timeout, "memory probe")


def _positives(args: argparse.Namespace) -> int:
    """``--positives-per-row``: 1 (no ``ours ids`` row) for a namespace without it."""
    return int(getattr(args, "positives_per_row", 1) or 1)


# --------------------------------------------------------------------------- reporting


def _table(rows: list[dict[str, Any]]) -> str:
    """Lay out the rows; a ``compile s`` column after ``median s`` when some row was jitted.

    Rows that were not compiled (numpy, torch, eager jax) leave that column blank.
    """
    compiled = any(row.get("compile_s") is not None for row in rows)
    header = (
        "backend",
        "loss",
        "d",
        "n",
        "impl",
        "median s",
        *(["compile s"] if compiled else []),
        "GFLOP/s",
        "roofline frac",
        "peak MiB",
        "tracemalloc MiB",
    )
    lines = [header]
    for row in rows:
        if row["skipped"] is not None:
            cells = ["skipped: " + row["skipped"]] + [""] * (len(header) - 6)
        else:
            compile_s = row.get("compile_s")
            blank_or_s = "" if compile_s is None else fmt(compile_s, ".3f")
            cells = [
                fmt(row["median_s"], ".3f"),
                *([blank_or_s] if compiled else []),
                fmt(row["gflops"], ".1f"),
                fmt(row["roofline_fraction"], ".2f"),
                fmt(row["peak_extra_mib"], ".1f"),
                fmt(row["tracemalloc_peak_mib"], ".1f"),
            ]
        lines.append(
            (row["backend"], row["loss"], str(row["d"]), str(row["n"]), row["impl"], *cells)
        )
    return render_table(lines, left={0, 1, 4})


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    """Return ``numerator / denominator``; None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def _vs_plain(ids_row: dict[str, Any], plain: dict[str, Any]) -> dict[str, Any]:
    """Return ``row / ours`` of one case: time, peak extra memory, tracemalloc peak.

    ``ours ids / ours`` (``vs_plain``), or a dense baseline's against ours (``vs_ours``).
    """
    return {
        "time": _ratio(ids_row["median_s"], plain["median_s"]),
        "peak": _ratio(ids_row["peak_extra_mib"], plain["peak_extra_mib"]),
        "tracemalloc": _ratio(ids_row["tracemalloc_peak_mib"], plain["tracemalloc_peak_mib"]),
    }


def _dense_table(rows: list[dict[str, Any]]) -> str | None:
    """Lay out each dense baseline against ours, one line per case; None without one."""
    ours = {(r["backend"], r["loss"], r["d"], r["n"]): r for r in rows if r["impl"] == OURS}
    header = (
        "backend",
        "loss",
        "d",
        "n",
        "baseline",
        "ours s",
        "baseline s",
        "time baseline/ours",
        "ours MiB",
        "baseline MiB",
        "peak baseline/ours",
    )
    lines = [header]
    for row in rows:
        if row["impl"] not in DENSE_BASELINES:
            continue
        base = ours.get((row["backend"], row["loss"], row["d"], row["n"]))
        ratios = row.get("vs_ours") or {}
        lines.append(
            (
                row["backend"],
                row["loss"],
                str(row["d"]),
                str(row["n"]),
                row["impl"],
                fmt(None if base is None else base["median_s"], ".3f"),
                "skipped" if row["skipped"] else fmt(row["median_s"], ".3f"),
                fmt(ratios.get("time"), ".2f"),
                fmt(None if base is None else base["peak_extra_mib"], ".1f"),
                fmt(row["peak_extra_mib"], ".1f"),
                fmt(ratios.get("peak"), ".1f"),
            )
        )
    if len(lines) == 1:
        return None
    return render_table(lines, left={0, 1, 4})


def _ids_table(rows: list[dict[str, Any]]) -> str | None:
    """Lay out ``ours ids`` against ``ours``, one line per case; None without such rows."""
    plain = {(r["backend"], r["loss"], r["d"], r["n"]): r for r in rows if r["impl"] == OURS}
    header = (
        "backend",
        "loss",
        "d",
        "n",
        "K",
        "ours s",
        "ids s",
        "time ids/plain",
        "ours MiB",
        "ids MiB",
        "peak ids/plain",
        "tracemalloc ids/plain",
    )
    lines = [header]
    for row in rows:
        if row["impl"] != OURS_IDS:
            continue
        base = plain.get((row["backend"], row["loss"], row["d"], row["n"]))
        ratios = row.get("vs_plain") or {}
        lines.append(
            (
                row["backend"],
                row["loss"],
                str(row["d"]),
                str(row["n"]),
                str(row["positives_per_row"]),
                fmt(None if base is None else base["median_s"], ".3f"),
                fmt(row["median_s"], ".3f"),
                fmt(ratios.get("time"), ".3f"),
                fmt(None if base is None else base["peak_extra_mib"], ".1f"),
                fmt(row["peak_extra_mib"], ".1f"),
                fmt(ratios.get("peak"), ".3f"),
                fmt(ratios.get("tracemalloc"), ".3f"),
            )
        )
    if len(lines) == 1:
        return None
    return render_table(lines, left={0, 1})


def _header(args: argparse.Namespace, machine: dict[str, Any], block: str, cases: int) -> str:
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
    sizes = ", ".join(str(n) for n in args.sizes)
    if _plan_name(args) == "quick":
        from .common import BACKENDS

        full = len(DEFAULT_SIZES) * len(DEFAULT_DIMS) * len(BACKENDS) * len(args.losses)
        which = f"the quick set (`bench --sweep`: the full sweep, {full} cases)"
    else:
        which = "the full sweep"
    return "\n".join(
        [
            f"plan: {which}; {cases} cases, n in {{{sizes}}}",
            "portable-siglip bench: forward + gradient on the CPU, "
            f"d in {{{dims}}}, {args.dtype}, t = {SCALE:g}, b = {BIAS:g}, "
            f"block_size = {block}, median of {args.repeats} interleaved rounds after 1 warm-up",
            f"machine: {machine['cpu']}; {machine['cpu_count']} CPUs "
            f"({machine['cpus_usable']} usable); python {machine['python']}",
            f"versions: {versions}",
            f"load average (1, 5, 15 min) before: {load}",
        ]
    )


def _print_tables(args: argparse.Namespace, rows: list[dict[str, Any]]) -> tuple[str, ...]:
    """Print the table of rows and the ratio tables there are; return the notes they need."""
    print()
    print(_table(rows))
    notes: tuple[str, ...] = NOTES
    if any(row["compile_s"] is not None for row in rows):
        notes = (JIT_NOTE, *notes)
    dense_table = _dense_table(rows)
    if dense_table is not None:
        print()
        print("ours against the dense baseline: same inputs, same rounds (baseline / ours)")
        print(dense_table)
        notes = (DENSE_NOTE, *notes)
    ids_table = _ids_table(rows)
    if ids_table is not None:
        print()
        print("several positives per row: ours ids against ours, same inputs, same rounds")
        print(ids_table)
        notes = (IDS_NOTE, *notes)
    if _plan_name(args) == "quick":
        notes = (QUICK_NOTE, *notes)
    return notes


def _plan_name(args: argparse.Namespace) -> str:
    """``"sweep"`` with ``--sweep`` (or ``--full``), else ``"quick"``."""
    return "sweep" if getattr(args, "sweep", False) else "quick"


QUICK_NOTE = (
    "This is the quick set (the bare `bench`): a few representative cases, a few minutes on "
    "2 cores. `bench --sweep` runs the full sweep (n = 1024 to 65536, d = 256 and 768, "
    "numpy, torch and jax, both losses: 84 cases), over an hour on a 2-core machine and "
    "several hours on a loaded one; --sizes, --dims and --backends choose any grid."
)

DENSE_NOTE = (
    "dense baselines: `dense numpy` is the loss and its gradients written densely in numpy by "
    "hand (the n x n logits whole, in the inputs' dtype), `dense autograd` the dense torch "
    "loss differentiated by autograd; baseline/ours are the ratios of its median time and "
    "peak MiB to those of `ours` in the same case, timed in the same interleaved rounds "
    "(or once each, when long)."
)

IDS_NOTE = (
    "several positives per row: `ours ids` is `ours` called with img_ids = txt_ids = "
    "arange(n) // K on the same inputs (groups of K duplicated pairs: K positives in every "
    "row and column); it and `ours` are timed in the same interleaved rounds whatever their "
    "predicted time, and probed the same way; ids/plain are the ratios of its median time, "
    "peak MiB and tracemalloc peak to those of `ours`."
)

JIT_NOTE = (
    "jax: `ours` (and `ours ids`) is jax.jit(jax.value_and_grad(portable_siglip.backends.jax."
    "<loss>_loss, argnums=(0, 1, 2, 3)), static_argnames=('block_size',)) with scale and bias "
    "as 0-d arrays, compiled once per case with .lower(...).compile() before its warm-up; "
    "compile s is that trace + lower + compile, median s the compiled run alone. Under jit "
    "the tiles run in one lax.fori_loop, so the compile time does not grow with n. Its "
    "memory probe compiles before the high-water mark is reset: peak MiB excludes the "
    "compilation. `reference loops` on jax is the eager call (array-API loops)."
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
    "peak MiB: each case runs once in a fresh process (python -m portable_siglip.bench.memprobe) "
    "after a tiny warm-up; it is the high-water resident set size during that run minus the "
    "RSS just before it (inputs excluded; outputs and temporaries included), read from VmHWM "
    "in /proc/self/status after resetting it through /proc/self/clear_refs. ru_maxrss, also "
    "in the JSON, is not shown: a child started by (v)fork + exec inherits its parent's "
    "high-water mark there. tracemalloc MiB (numpy only): the exact peak of the bytes numpy "
    "allocated during the run above those held before it (numpy reports its allocations "
    "to tracemalloc).",
)


# --------------------------------------------------------------------------- the sweep


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
        "block_size": args.block_size if impl in (OURS, OURS_IDS, "reference loops") else None,
        "positives_per_row": _positives(args) if impl == OURS_IDS else None,
        "times_s": [],
        "median_s": None,
        "compile_s": None,
        "gflops": None,
        "roofline_fraction": None,
        "peak_extra_mib": None,
        "tracemalloc_peak_mib": None,
        "memory": None,
        "timed_in": None,
        "skipped": None,
        "error": None,
        "vs_plain": None,
        "vs_ours": None,
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
        if impl not in (DENSE_NUMPY, DENSE, OPEN_CLIP):
            return None
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
    rows = {impl: _new_row(sweep.args, case, impl) for impl in impls}
    short, long = _split_by_length(sweep, case, impls, rows)
    _time_short(sweep, case, short, rows, inputs)
    for impl in long:
        # The roofline is not probed: run it here, once. The others run in their probe.
        if impl == "roofline" or sweep.args.no_memory:
            _time_once(sweep, case, rows[impl], inputs)
    _probe_memory(sweep, case, impls, long, rows)
    roofline_s = rows["roofline"]["median_s"] if "roofline" in rows else None
    for impl in impls:
        row = rows[impl]
        if roofline_s is not None and row["median_s"] is not None:
            row["roofline_fraction"] = roofline_s / row["median_s"]
        if impl == OURS_IDS and OURS in rows:
            row["vs_plain"] = _vs_plain(row, rows[OURS])
        if impl in DENSE_BASELINES and OURS in rows:
            row["vs_ours"] = _vs_plain(row, rows[OURS])
        sweep.remember(case, row)
        sweep.rows.append(row)


def _split_by_length(
    sweep: _Sweep, case: Case, impls: list[str], rows: dict[str, dict[str, Any]]
) -> tuple[list[str], list[str]]:
    """Return the rows timed together in rounds and those too long for that, in order.

    A row predicted over the memory cap is marked skipped and is neither.
    """
    short: list[str] = []
    long: list[str] = []
    for impl in impls:
        reason = None if sweep.args.no_dense else sweep.too_big(case, impl)
        if reason is not None:
            rows[impl]["skipped"] = reason
        elif OURS_IDS in impls and impl in (OURS, OURS_IDS):
            short.append(impl)  # their ratio is the point: always in the same rounds
        elif sweep.predicted_s(case, impl) > LONG_CASE_S:
            long.append(impl)
        else:
            short.append(impl)
    return short, long


def _time_short(
    sweep: _Sweep,
    case: Case,
    short: list[str],
    rows: dict[str, dict[str, Any]],
    inputs: tuple[Any, Any],
) -> None:
    """Time the `short` rows in interleaved rounds; a failure fails them all."""
    if not short:
        return
    args = sweep.args
    try:
        # Made (and, for jitted rows, compiled) before any of them runs or is timed.
        runs = [make_run(case.backend, case.loss, impl, *inputs, args.block_size) for impl in short]
        times = time_interleaved(runs, args.repeats)
    except Exception as error:  # e.g. MemoryError: report it, go on
        for impl in short:
            sweep.fail(case, rows[impl], f"{type(error).__name__}: {error}")
        return
    for impl, run, record in zip(short, runs, times, strict=True):
        sweep.record(case, rows[impl], record, "interleaved")
        rows[impl]["compile_s"] = compile_seconds(run)


def _time_once(sweep: _Sweep, case: Case, row: dict[str, Any], inputs: tuple[Any, Any]) -> None:
    """Time one long row once, here."""
    try:
        run = make_run(case.backend, case.loss, row["impl"], *inputs, sweep.args.block_size)
        elapsed = timed(run)
    except Exception as error:
        sweep.fail(case, row, f"{type(error).__name__}: {error}")
    else:
        sweep.record(case, row, [elapsed], "once")
        row["compile_s"] = compile_seconds(run)


def _probe_memory(
    sweep: _Sweep,
    case: Case,
    impls: list[str],
    long: list[str],
    rows: dict[str, dict[str, Any]],
) -> None:
    """Measure each row's peak memory in a fresh process; it times the `long` rows too."""
    args = sweep.args
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
        row["peak_extra_mib"] = mib(memory["peak_extra_bytes"])
        row["tracemalloc_peak_mib"] = mib(memory.get("tracemalloc_peak_bytes"))
        if impl in long:
            sweep.record(case, row, [float(memory["run_s"])], "memory probe")
            row["compile_s"] = memory.get("compile_s")  # compiled there, not here


def plan(args: argparse.Namespace, backends: Sequence[str] | None = None) -> list[Case]:
    """Return the cases the run will go through, in order: every (backend, d, n, loss).

    Parameters
    ----------
    args : argparse.Namespace
        Options with the grid resolved (``portable_siglip.cli._bench`` does): ``sizes``,
        ``dims``, ``losses`` and ``backends``; the bare ``bench`` gives the quick set,
        ``--sweep`` the full sweep.
    backends : sequence of str, optional
        The backends to run (default: ``args.backends``; ``main`` passes the installed ones).

    Examples
    --------
    >>> args = argparse.Namespace(sizes=[4096], dims=[768], losses=["sigmoid", "softmax"],
    ...                           backends=["numpy"])
    >>> [(c.backend, c.n, c.loss) for c in plan(args)]
    [('numpy', 4096, 'sigmoid'), ('numpy', 4096, 'softmax')]
    """
    return [
        Case(backend, d, n, loss)
        for backend in (args.backends if backends is None else backends)
        for d in args.dims
        for n in args.sizes
        for loss in args.losses
    ]


def _sweep(args: argparse.Namespace, backends: Sequence[str], open_clip: bool) -> _Sweep:
    sweep = _Sweep(args)
    cases = plan(args, backends)
    ids = _positives(args) > 1
    weight = 2 if ids else 1  # ours ids costs about what ours does
    progress = Progress(
        [c.n * c.n * c.d * registry.get(c.loss).gemms_per_tile * weight for c in cases]
    )
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
        impls = _impls(case.backend, not args.no_dense, open_clip, reference, ids)
        _run_case(sweep, case, impls, inputs)
        progress.advance()
    progress.close()
    return sweep


def _open_clip_version(backends: Sequence[str], dense: bool) -> str | None:
    if "torch" not in backends or not dense:
        return None
    from .baselines import open_clip_info

    info = open_clip_info()
    return str(info["version"]) if info.get("installed") else None


def main(args: argparse.Namespace) -> int:
    """Run the sweep described by ``args``, print the table and optionally write JSON.

    Parameters
    ----------
    args : argparse.Namespace
        Options from a parser prepared by :func:`portable_siglip.cli._bench.add_arguments`,
        with ``sizes`` and ``dims`` filled in (``portable_siglip.cli._bench.main`` does).

    Returns
    -------
    int
        0 when every case ran (or was skipped for its predicted memory), 1 when some case
        failed (the table and JSON say which), 2 for invalid options.
    """
    if refuse(check_args(args)):
        return 2
    if not installed("numpy"):
        print("bench: error: the benchmark draws its inputs with numpy; install numpy")
        return 2
    notes: list[str] = []
    backends = []
    for backend in args.backends:
        if installed(backend):
            backends.append(backend)
        else:
            note = f"note: backend {backend!r} is not installed; skipped"
            print(note)
            notes.append(note)
    machine = machine_info(backends)
    open_clip = _open_clip_version(backends, not args.no_dense)
    if open_clip is not None:
        machine["open_clip"] = open_clip
    elif "torch" in backends and not args.no_dense:
        notes.append("note: open-clip-torch is not installed; its rows are left out")
        print(notes[-1])
    from .._checks import DEFAULT_BLOCK_SIZE

    block = str(args.block_size) if args.block_size else f"default ({DEFAULT_BLOCK_SIZE})"
    print(_header(args, machine, block, len(plan(args, backends))), flush=True)

    started = time.perf_counter()
    sweep = _sweep(args, backends, open_clip is not None)
    rows, errors = sweep.rows, sweep.errors
    machine["load_average_after"] = list(os.getloadavg())
    machine["wall_s"] = time.perf_counter() - started

    notes_shown = _print_tables(args, rows)
    print()
    print_notes(notes_shown, errors)
    print_load_after(machine)
    report = {
        "machine": machine,
        "config": {
            "plan": _plan_name(args),
            "backends": backends,
            "losses": list(args.losses),
            "sizes": list(args.sizes),
            "dims": list(args.dims),
            **run_config(args),
            "dense": not args.no_dense,
            "reference": bool(getattr(args, "reference", False)),
            "positives_per_row": _positives(args),
            "memory": not args.no_memory,
            "memory_cap_gib": getattr(args, "memory_cap_gib", 16.0),
            "long_case_s": LONG_CASE_S,
        },
        "rows": rows,
        "notes": [*notes, *notes_shown],
        "errors": errors,
    }
    write_report(args.json, report)
    if getattr(args, "plots", None) is not None:
        try:
            from .plots import write_plots

            for path in write_plots(report, args.plots):
                print(f"plot written to {path}")
        except (ModuleNotFoundError, ValueError) as error:
            errors.append(f"plots: {error}")
            print(f"error: plots: {error}", file=sys.stderr)
    return 1 if errors else 0
