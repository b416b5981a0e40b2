"""``python -m portable_siglip bench --frameworks``: our torch modules against framework losses.

Every case is forward + ``loss.backward()`` in torch on the CPU, with leaf tensors ``img``
and ``txt`` (``requires_grad``, L2-normalised random rows from
:func:`portable_siglip.bench.common.make_inputs`) and 0-d parameters ``logit_scale`` (the
multiplier t itself) and ``logit_bias`` (sigmoid only; CLIP has no bias). The rows:

``ours``
    :class:`portable_siglip.backends.torch.SigLipLoss` / ``ClipLoss``: forward evaluates
    loss and analytic gradients blockwise and keeps the O(n d) gradients; backward only
    scales them.
``open_clip``
    open_clip's ``SigLipLoss()`` / ``ClipLoss()`` (installed open-clip-torch), autograd over
    the dense n x n logits.
``open_clip chunked``
    ``SigLipLoss(chunk_size=--chunk-size)``, on releases that have it (open_clip PR #1145).
``chunked autograd``
    Where open_clip has no ``chunk_size`` (3.3.0, the newest on PyPI) or is missing: the
    same idea written here, the sigmoid loss summed over blocks of ``--chunk-size`` image
    rows with autograd. It bounds the logits the forward holds at once, but autograd keeps
    every block's intermediates for backward, so the backward peak still grows as n^2.
``dense autograd``
    :func:`portable_siglip.bench.baselines.dense_loss`, the loss written densely in torch
    (unless ``--no-dense``).

The losses other than ours are in :mod:`portable_siglip.bench.baselines`; only
``open_clip/loss.py`` is loaded, straight from the installed distribution (the package's
``__init__`` needs torchvision and more); it needs only torch.

Each case runs in a fresh process (``python -m portable_siglip.bench.frameworks``, the
worker) with its address space limited (``RLIMIT_AS``) to its size after the set-up plus the
memory cap plus :data:`RLIMIT_SLACK_BYTES`: a case that needs more fails with an
out-of-memory error, reported as such, instead of exhausting the machine. The worker warms
the case up on a tiny batch, creates the inputs, then runs the case once measuring the peak
extra memory as :mod:`portable_siglip.bench.memprobe` does (the resident-set high-water mark
``VmHWM``, reset through ``/proc/self/clear_refs`` just before, minus the RSS just before:
inputs excluded, saved tensors, gradients and temporaries included), separately for the
forward and for the backward; that run is also the warm-up of ``--repeats`` timed runs whose
median is reported. Sizes run in increasing order; before each case its peak is predicted
from the same case's peak at the largest smaller n (scaled as n^2, as n for ``ours``) or, at
the first size, from a lower-bound formula, and a case predicted above ``--memory-cap-gib``
is skipped (and not timed, which would need the same memory).

torch is imported inside functions only.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import itertools
import json
import math
import os
import resource
import statistics
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from typing import Any

from .. import _memory
from .. import _registry as registry
from .._checks import DEFAULT_BLOCK_SIZE
from .baselines import (
    DENSE,
    OPEN_CLIP,
    OURS,
    baseline,
    chunked_sigmoid_loss,
    dense_loss,
    open_clip_forward,
    open_clip_info,
    predict_peak_bytes,
)
from .common import (
    BIAS,
    GIB,
    PROBE_TIMEOUT_BASE_S,
    SCALE,
    WARMUP_N,
    add_case_arguments,
    check_args,
    compare_rows,
    fmt,
    log_progress,
    machine_info,
    make_inputs,
    mib,
    print_load_after,
    print_notes,
    proc_kib,
    refuse,
    render_table,
    run_config,
    run_json_line,
    torch_leaves,
    write_report,
)

__all__ = ["IMPLS", "impls_for", "main", "make_loss", "run_case", "worker_main"]

OPEN_CLIP_CHUNKED = "open_clip chunked"
CHUNKED = "chunked autograd"
IMPLS = (OURS, OPEN_CLIP, OPEN_CLIP_CHUNKED, CHUNKED, DENSE)

#: Our torch module of each loss (:mod:`portable_siglip.backends.torch`), the drop-in for
#: open_clip's module of the same name: the ``ours`` row.
OUR_MODULES = {"sigmoid": "SigLipLoss", "softmax": "ClipLoss"}

#: The losses that have the chunked rows: open_clip's ``SigLipLoss(chunk_size=...)`` and
#: :func:`~portable_siglip.bench.baselines.chunked_sigmoid_loss`.
CHUNKED_LOSSES = ("sigmoid",)

#: Batch sizes n of ``bench --frameworks`` when ``--sizes`` is not given.
DEFAULT_SIZES = (8192, 16384, 32768)

#: Address space a worker may use beyond its size after set-up plus the memory cap: room
#: for mappings that are reserved but never touched (malloc arenas, thread stacks).
RLIMIT_SLACK_BYTES = 512 * 2**20

#: Seconds a worker may take when no smaller n of the same case predicts its time.
FIRST_TIMEOUT_S = 3600.0

#: Relative difference of a loss value from ours beyond which the row is an error.
VALUE_RTOL = 1e-3


# --------------------------------------------------------------------------- the cases


def impls_for(loss: str, open_clip: dict[str, Any], dense: bool) -> list[str]:
    """List the rows of one loss: ours, open_clip's (when installed), chunked, dense.

    Parameters
    ----------
    loss : str
        A registered loss's name.
    open_clip : dict
        From :func:`open_clip_info`.
    dense : bool
        Whether to include the dense autograd loss.

    Returns
    -------
    list of str
        Members of :data:`IMPLS`, ``ours`` first.

    Examples
    --------
    >>> info = {"installed": True, "chunk_size": False}
    >>> impls_for("sigmoid", info, dense=True)
    ['ours', 'open_clip', 'chunked autograd', 'dense autograd']
    >>> impls_for("softmax", {"installed": False, "chunk_size": False}, dense=True)
    ['ours', 'dense autograd']
    """
    impls = [OURS]
    if open_clip["installed"]:
        impls.append(OPEN_CLIP)
    if loss in CHUNKED_LOSSES:
        impls.append(OPEN_CLIP_CHUNKED if open_clip["chunk_size"] else CHUNKED)
    if dense:
        impls.append(DENSE)
    return impls


def make_loss(
    loss: str, impl: str, *, block_size: int | None, chunk_size: int
) -> Callable[[Any, Any, Any, Any], Any]:
    """Return ``f(img, txt, scale, bias) -> loss`` (a 0-d torch tensor) of one row.

    Parameters
    ----------
    loss : str
        A registered loss's name.
    impl : str
        A member of :data:`IMPLS`.
    block_size : int or None
        Tile edge of ``ours`` (None: the library default).
    chunk_size : int
        Rows per chunk of ``chunked autograd`` and ``open_clip chunked``.

    Returns
    -------
    callable
        The loss, differentiable by torch autograd.

    Raises
    ------
    ValueError
        For an unknown ``impl``, a chunked row of a loss without one, or a row whose library
        does not have the loss.
    ImportError
        For an open_clip row when open-clip-torch cannot be loaded.
    """
    if impl == OURS:
        name = baseline(OUR_MODULES, loss, "portable_siglip.backends.torch")
        module = getattr(importlib.import_module("portable_siglip.backends.torch"), name)
        return module(block_size=block_size)  # type: ignore[no-any-return]
    if impl == OPEN_CLIP:
        return open_clip_forward(loss)
    if impl == OPEN_CLIP_CHUNKED and loss in CHUNKED_LOSSES:
        return open_clip_forward(loss, chunk_size)
    if impl == CHUNKED and loss in CHUNKED_LOSSES:

        def chunked(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
            return chunked_sigmoid_loss(img, txt, scale, bias, chunk_size)

        return chunked
    if impl == DENSE:

        def dense(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
            return dense_loss(loss, img, txt, scale, bias)

        return dense
    msg = f"no framework benchmark case {impl!r} for the {loss} loss"
    raise ValueError(msg)


def _vm_size_bytes() -> int | None:
    """Return this process's virtual memory size (``VmSize``), or None where unavailable."""
    return proc_kib("/proc/self/status", "VmSize")


def _limit_address_space(extra_bytes: int) -> int | None:
    """Cap the address space at its current size plus ``extra_bytes``; return the limit."""
    size = _vm_size_bytes()
    if size is None:
        return None
    limit = size + extra_bytes
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return limit


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        phrase in text
        for phrase in ("can't allocate memory", "cannot allocate memory", "out of memory")
    )


def run_case(
    *,
    loss: str,
    impl: str,
    n: int,
    dim: int,
    dtype: str,
    seed: int,
    block_size: int | None,
    chunk_size: int,
    repeats: int,
    cap_bytes: int | None,
) -> dict[str, Any]:
    """Measure one case in this process: peak extra memory of one run, then the timed runs.

    Meant for a fresh process (the worker, ``python -m portable_siglip.bench.frameworks``): with
    ``cap_bytes`` it limits this process's address space for the rest of its life.

    Parameters
    ----------
    loss : str
        A registered loss's name.
    impl : str
        A member of :data:`IMPLS`.
    n, dim : int
        Batch size and feature dimension.
    dtype : {"float32", "float64"}
        Feature dtype.
    seed : int
        Seed of the random inputs.
    block_size : int or None
        Tile edge of ``ours``.
    chunk_size : int
        Rows per chunk of the chunked rows.
    repeats : int
        Timed runs after the measured one.
    cap_bytes : int or None
        Extra address space allowed after the set-up (plus :data:`RLIMIT_SLACK_BYTES`);
        None: no limit.

    Returns
    -------
    dict
        ``status`` ("ok" or "out of memory"), ``error`` (the message of an out-of-memory
        error), ``peak_extra_bytes``, ``forward_peak_extra_bytes``,
        ``backward_peak_extra_bytes``, ``method``, ``times_s``, ``forward_times_s``,
        ``loss_value``, ``rlimit_as_bytes`` and ``torch_num_threads``.
    """
    import torch

    fn = make_loss(loss, impl, block_size=block_size, chunk_size=chunk_size)
    uses_bias = registry.get(loss).uses_bias  # the bias cancels in CLIP's loss

    def forward(leaves: tuple[Any, Any, Any, Any]) -> Any:
        img, txt, scale, bias = leaves
        for leaf in leaves:
            leaf.grad = None
        return fn(img, txt, scale, bias if uses_bias else None)

    warm = torch_leaves(*make_inputs("torch", min(n, WARMUP_N), dim, dtype, seed + 1))
    forward(warm).backward()
    del warm
    leaves = torch_leaves(*make_inputs("torch", n, dim, dtype, seed))
    gc.collect()
    result: dict[str, Any] = {
        "status": "ok",
        "error": None,
        "peak_extra_bytes": None,
        "forward_peak_extra_bytes": None,
        "backward_peak_extra_bytes": None,
        "method": None,
        "times_s": [],
        "forward_times_s": [],
        "loss_value": None,
        "rlimit_as_bytes": None,
        "torch_num_threads": torch.get_num_threads(),
    }
    if cap_bytes is not None:
        result["rlimit_as_bytes"] = _limit_address_space(cap_bytes + RLIMIT_SLACK_BYTES)
    try:
        rss_before = _memory.rss_bytes()
        reset = _memory.reset_high_water()
        value = forward(leaves)
        forward_high = _memory.high_water_bytes()
        reset = _memory.reset_high_water() and reset
        value.backward()
        backward_high = _memory.high_water_bytes()
        result["loss_value"] = float(value.detach())
        del value
        if rss_before is not None and forward_high is not None and backward_high is not None:
            fwd = max(0, forward_high - rss_before)
            bwd = max(0, backward_high - rss_before)
            result.update(
                forward_peak_extra_bytes=fwd,
                backward_peak_extra_bytes=bwd,
                peak_extra_bytes=max(fwd, bwd),
                method="VmHWM after clear_refs reset"
                if reset
                else "VmHWM (no reset; includes set-up transients)",
            )
        else:
            result.update(
                peak_extra_bytes=max(0, _memory.ru_maxrss_bytes() - (rss_before or 0)),
                method="ru_maxrss growth (an upper bound)",
            )
        for _ in range(repeats):
            gc.collect()  # not inside the timed region
            start = time.perf_counter()
            value = forward(leaves)
            middle = time.perf_counter()
            value.backward()
            result["times_s"].append(time.perf_counter() - start)
            result["forward_times_s"].append(middle - start)
            del value
    except (MemoryError, RuntimeError) as error:
        if not _is_out_of_memory(error):
            raise
        result["status"] = "out of memory"
        result["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
    return result


# --------------------------------------------------------------------------- orchestrator


def _worker_command(args: argparse.Namespace, loss: str, impl: str, n: int) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "portable_siglip.bench.frameworks",
        f"--loss={loss}",
        f"--impl={impl}",
        f"--n={n}",
        f"--dim={args.dim}",
        f"--dtype={args.dtype}",
        f"--seed={args.seed}",
        f"--chunk-size={args.chunk_size}",
        f"--repeats={args.repeats}",
        f"--cap-bytes={int(args.memory_cap_gib * GIB)}",
    ]
    if args.block_size is not None:
        command.append(f"--block-size={args.block_size}")
    return command


def _run_worker(
    args: argparse.Namespace, loss: str, impl: str, n: int, timeout: float
) -> tuple[dict[str, Any] | None, str | None, float]:
    """Run one case in a worker process; return (result, error, wall seconds)."""
    start = time.perf_counter()
    result, error = run_json_line(_worker_command(args, loss, impl, n), timeout, "worker")
    return result, error, time.perf_counter() - start


def _check(args: argparse.Namespace) -> str | None:
    problem = check_args(args)
    if problem is not None:
        return problem
    if args.no_memory:
        return "`--no-memory` does not apply to `--frameworks`, which always measures memory"
    cap = float(args.memory_cap_gib)
    if not (math.isfinite(cap) and cap > 0):
        return f"`--memory-cap-gib` must be a positive number; got {args.memory_cap_gib!r}"
    if int(args.chunk_size) <= 0:
        return f"`--chunk-size` must be a positive integer; got {args.chunk_size!r}"
    return None


def _new_row(args: argparse.Namespace, loss: str, impl: str, n: int) -> dict[str, Any]:
    """Return the empty result row of one case; the JSON holds these rows as they are."""
    return {
        "loss": loss,
        "impl": impl,
        "n": n,
        "d": args.dim,
        "dtype": args.dtype,
        "block_size": args.block_size if impl == OURS else None,
        "chunk_size": args.chunk_size if impl in (CHUNKED, OPEN_CLIP_CHUNKED) else None,
        "status": None,
        "times_s": [],
        "median_s": None,
        "forward_median_s": None,
        "time_ratio": None,
        "peak_extra_mib": None,
        "forward_peak_mib": None,
        "backward_peak_mib": None,
        "memory_ratio": None,
        "predicted_peak_gib": None,
        "loss_value": None,
        "worker_wall_s": None,
        "load_average_before": None,
        "worker": None,
        "notes": [],
        "error": None,
    }


def _impl_note(impl: str, args: argparse.Namespace, open_clip: dict[str, Any]) -> str | None:
    if impl == CHUNKED:
        why = (
            f"open_clip {open_clip['version']} has no chunk_size"
            if open_clip["installed"]
            else "no open_clip"
        )
        return f"{args.chunk_size}-row chunks; {why}"
    if impl == OPEN_CLIP_CHUNKED:
        return f"chunk_size={args.chunk_size}"
    return None


def _run_one(
    args: argparse.Namespace,
    row: dict[str, Any],
    previous: dict[str, tuple[int, int, float | None]],
    errors: list[str],
) -> None:
    """Predict, then run (or skip) the case of ``row``; fill the row in."""
    loss, impl, n = row["loss"], row["impl"], row["n"]
    itemsize = 4 if args.dtype == "float32" else 8
    block = args.block_size or DEFAULT_BLOCK_SIZE
    before = previous.get(impl)
    predicted = predict_peak_bytes(
        loss, impl, n, args.dim, itemsize, block, None if before is None else before[:2]
    )
    row["predicted_peak_gib"] = predicted / GIB
    cap = args.memory_cap_gib
    if predicted > cap * GIB:
        row["status"] = "skipped"
        row["notes"].append(f"skipped: predicted {predicted / GIB:.3g} GiB > cap {cap:g} GiB")
        # Larger n are predicted from this prediction: they are skipped too.
        previous[impl] = (n, int(predicted), None)
        return
    timeout = FIRST_TIMEOUT_S
    if before is not None and before[2] is not None:
        timeout = PROBE_TIMEOUT_BASE_S + 10.0 * before[2] * (n / before[0]) ** 2
    log_progress(f"  {loss} n={n} {impl} ...")
    row["load_average_before"] = list(os.getloadavg())
    result, error, wall = _run_worker(args, loss, impl, n, timeout)
    row["worker_wall_s"] = wall
    if result is None:
        row["status"] = "failed"
        row["error"] = error
        row["notes"].append(f"failed: {error}")
        errors.append(f"{loss} n={n} {impl}: {error}")
        return
    row["worker"] = result
    row["loss_value"] = result["loss_value"]
    if result["peak_extra_bytes"] is not None:
        row["peak_extra_mib"] = mib(result["peak_extra_bytes"])
        previous[impl] = (n, int(result["peak_extra_bytes"]), wall)
    for key in ("forward", "backward"):
        row[f"{key}_peak_mib"] = mib(result[f"{key}_peak_extra_bytes"])
    if result["status"] != "ok":
        # It needed more than the cap: larger n are predicted from that, and skipped.
        previous[impl] = (n, int(cap * GIB), None)
        row["status"] = result["status"]
        row["error"] = result["error"]
        note = f"out of memory under RLIMIT_AS (cap {cap:g} GiB)"
        row["notes"].append(note)
        errors.append(f"{loss} n={n} {impl}: {note}: {result['error']}")
        return
    row["status"] = "ok"
    row["times_s"] = result["times_s"]
    row["median_s"] = statistics.median(result["times_s"])
    row["forward_median_s"] = statistics.median(result["forward_times_s"])


def _compare_with_ours(rows: Sequence[dict[str, Any]], errors: list[str]) -> None:
    """Fill in the ratios to ``ours`` of the rows of one (loss, n); check the loss values."""
    compare_rows(rows, OURS, VALUE_RTOL, "ours", errors)


def _table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        (
            "loss",
            "impl",
            "n",
            "median s",
            "time x ours",
            "peak MiB",
            "bwd peak MiB",
            "mem x ours",
            "notes",
        )
    ]
    for row in rows:
        lines.append(
            (
                row["loss"],
                row["impl"],
                str(row["n"]),
                fmt(row["median_s"], ".3f"),
                fmt(row["time_ratio"], ".2f"),
                fmt(row["peak_extra_mib"], ".1f"),
                fmt(row["backward_peak_mib"], ".1f"),
                fmt(row["memory_ratio"], ".2f"),
                "; ".join(row["notes"]),
            )
        )
    return render_table(lines, left={0, 1, 8})


def _growth(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Say how the peaks of each (loss, impl) grow from each measured n to the next.

    Examples
    --------
    >>> rows = [
    ...     {"loss": "sigmoid", "impl": "x", "n": n, "peak_extra_mib": p, "backward_peak_mib": b}
    ...     for n, p, b in ((1024, 10.0, 8.0), (2048, 40.0, 32.0), (4096, 80.0, None))
    ... ]
    >>> print(_growth(rows)[0])
    sigmoid x: n 1024 -> 2048: peak x4.00 (n^2.00), bwd x4.00; n 2048 -> 4096: peak x2.00 (n^1.00)
    """
    lines = []
    keys = dict.fromkeys((row["loss"], row["impl"]) for row in rows)
    for loss, impl in keys:
        measured = [
            row
            for row in rows
            if (row["loss"], row["impl"]) == (loss, impl) and row["peak_extra_mib"]
        ]
        steps = []
        for small, large in itertools.pairwise(measured):
            factor = large["peak_extra_mib"] / small["peak_extra_mib"]
            exponent = math.log(factor) / math.log(large["n"] / small["n"])
            step = f"n {small['n']} -> {large['n']}: peak x{factor:.2f} (n^{exponent:.2f})"
            if small["backward_peak_mib"] and large["backward_peak_mib"]:
                step += f", bwd x{large['backward_peak_mib'] / small['backward_peak_mib']:.2f}"
            steps.append(step)
        if steps:
            lines.append(f"{loss} {impl}: {'; '.join(steps)}")
    return lines


def _header(args: argparse.Namespace, machine: dict[str, Any], open_clip: dict[str, Any]) -> str:
    block = str(args.block_size) if args.block_size else f"default ({DEFAULT_BLOCK_SIZE})"
    load = ", ".join(f"{x:.2f}" for x in machine["load_average_before"])
    if open_clip["installed"]:
        chunked = "with" if open_clip["chunk_size"] else "no"
        oc = f"open-clip-torch {open_clip['version']} ({chunked} SigLipLoss chunk_size)"
    else:
        oc = "open-clip-torch not available"
    return "\n".join(
        [
            "portable-siglip bench --frameworks: forward + loss.backward() in torch on the CPU, "
            f"d = {args.dim}, {args.dtype}, t = {SCALE:g}, b = {BIAS:g} "
            f"(sigmoid), block_size = {block}, chunk = {args.chunk_size} rows, "
            f"median of {args.repeats} after 1 warm-up, memory cap {args.memory_cap_gib:g} GiB",
            f"machine: {machine['cpu']}; {machine['cpu_count']} CPUs "
            f"({machine['cpus_usable']} usable); python {machine['python']}",
            f"versions: numpy {machine['numpy']}, torch {machine['torch']} "
            f"(torch.get_num_threads() = {machine['torch_num_threads']}), {oc}",
            f"load average (1, 5, 15 min) before: {load}",
        ]
    )


NOTES = (
    "Each case: forward + loss.backward() with leaf img, txt (requires_grad) and 0-d "
    "logit_scale, logit_bias parameters, in a fresh process (python -m "
    "portable_siglip.bench.frameworks) limited by RLIMIT_AS to its size after set-up + the cap + "
    "512 MiB. peak MiB: high-water resident set (VmHWM, reset through /proc/self/clear_refs) "
    "during the first full-size run minus the RSS just before it: inputs excluded; saved "
    "tensors, gradients and temporaries included. bwd peak MiB: the same, during "
    "loss.backward() alone (still counted from before the forward, so it includes what the "
    "forward kept for backward). That run is the warm-up; median s is the median of the "
    "timed runs after it. x ours: the row's figure over ours at the same loss and n.",
    "Skipped cases are predicted from the same case's peak at the largest smaller n, "
    "scaled as n^2 (as n for ours), or at the first size from a lower-bound formula; they "
    "are not timed either (timing needs the same memory).",
)


def main(args: argparse.Namespace) -> int:
    """Run ``bench --frameworks``: print the table and optionally write JSON.

    Parameters
    ----------
    args : argparse.Namespace
        Options from a parser prepared by :func:`portable_siglip.cli._bench.add_arguments`.

    Returns
    -------
    int
        0 when every case ran or was skipped by prediction; 1 when some case failed (an
        error, a timeout, an out-of-memory error under the address-space limit, or a loss
        value that disagrees with ours); 2 for invalid options or a missing numpy or torch.
    """
    if getattr(args, "sizes", None) is None:
        args = argparse.Namespace(**{**vars(args), "sizes": list(DEFAULT_SIZES)})
    if refuse(_check(args), "--frameworks", ("numpy", "torch")):
        return 2
    open_clip = open_clip_info()
    notes = _open_clip_notes(args, open_clip)
    machine = machine_info(["torch"])
    machine["open_clip"] = open_clip
    print(_header(args, machine, open_clip), flush=True)
    for note in notes:
        print(textwrap.fill(f"note: {note}", width=100, subsequent_indent="  "), flush=True)

    errors: list[str] = []
    started = time.perf_counter()
    rows = _measure_all(args, open_clip, errors)
    machine["load_average_after"] = list(os.getloadavg())
    machine["wall_s"] = time.perf_counter() - started

    print()
    print(_table(rows))
    print()
    growth = _growth(rows)
    if growth:
        print("growth of the peak extra memory with n (n^k: the power of n it grew as):")
        for line in growth:
            print(f"  {line}")
    print_notes(NOTES, errors)
    print_load_after(machine)
    report = {
        "machine": machine,
        "config": {
            "losses": list(args.losses),
            "sizes": sorted(args.sizes),
            "dim": args.dim,
            **run_config(args),
            "chunk_size": args.chunk_size,
            "dense": not args.no_dense,
            "memory_cap_gib": args.memory_cap_gib,
            "rlimit_slack_bytes": RLIMIT_SLACK_BYTES,
        },
        "rows": rows,
        "growth": growth,
        "notes": [*notes, *NOTES],
        "errors": errors,
    }
    write_report(args.json, report)
    return 1 if errors else 0


def _open_clip_notes(args: argparse.Namespace, open_clip: dict[str, Any]) -> list[str]:
    """Say which open_clip rows are missing, and what stands in for its chunked loss."""
    notes = []
    if not open_clip["installed"]:
        notes.append(
            f"open-clip-torch is not available ({open_clip['problem']}): no open_clip rows; "
            "install it with `pip install --no-deps open-clip-torch` (its loss.py needs only "
            "torch)"
        )
    if any(loss in CHUNKED_LOSSES for loss in args.losses) and not open_clip["chunk_size"]:
        where = (
            f"open_clip {open_clip['version']}'s SigLipLoss has no chunk_size (it came with "
            "open_clip PR #1145)"
            if open_clip["installed"]
            else "open_clip is not available"
        )
        notes.append(
            f"{where}: the `chunked autograd` row stands in for it, the sigmoid loss summed "
            f"over blocks of {args.chunk_size} image rows with autograd, which bounds the "
            "logits the forward holds at once but keeps every block's intermediates for "
            "backward."
        )
    return notes


def _measure_all(
    args: argparse.Namespace, open_clip: dict[str, Any], errors: list[str]
) -> list[dict[str, Any]]:
    """Measure every row of every loss and n, smallest n first; failures go to `errors`."""
    rows: list[dict[str, Any]] = []
    for loss in args.losses:
        impls = impls_for(loss, open_clip, dense=not args.no_dense)
        previous: dict[str, tuple[int, int, float | None]] = {}
        for n in sorted(args.sizes):
            case_rows = []
            for impl in impls:
                row = _new_row(args, loss, impl, n)
                impl_note = _impl_note(impl, args, open_clip)
                if impl_note is not None:
                    row["notes"].append(impl_note)
                _run_one(args, row, previous, errors)
                case_rows.append(row)
            _compare_with_ours(case_rows, errors)
            rows.extend(case_rows)
    return rows


# --------------------------------------------------------------------------- worker


def worker_main(argv: list[str] | None = None) -> int:
    """Measure one case in this process and print it as one JSON line.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status, 0 when the case ran or ran out of memory (the JSON says which).
    """
    parser = argparse.ArgumentParser(
        prog="python -m portable_siglip.bench.frameworks",
        description="One case of `bench --frameworks` (one JSON line on stdout).",
    )
    add_case_arguments(parser, IMPLS)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cap-bytes", type=int, default=None)
    result = run_case(**vars(parser.parse_args(argv)))  # the options are its keywords
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(worker_main())
