"""``python -m portable_siglip bench --cached``: a training step of a batch beyond memory.

One training step of a small two-tower MLP CLIP made here (each tower: ``Linear(64, 1024)``,
GELU, ``Linear(1024, 1024)``, GELU, ``Linear(1024, d)``, L2-normalised; a learnt log-scale and
bias), float32 on the CPU, at batch sizes n. The rows:

``cached_step``
    :func:`portable_siglip.backends.torch.cached_step` with ``chunk_size = --chunk-size``:
    the towers see one chunk at a time, twice; the loss is this library's.
``plain ours``
    One forward of the whole batch through both towers, this library's loss module
    (``SigLipLoss`` / ``ClipLoss``) and one ``backward()``: autograd keeps every layer's
    activations for all n rows until backward.
``plain open_clip``
    The same with open_clip's loss module (when open-clip-torch is installed), which also
    holds the n x n logits.

Each case runs in a fresh process (``python -m portable_siglip.bench.cached``, the worker)
under an address-space limit of its size after set-up plus ``--memory-cap-gib`` (the memory
budget) plus 512 MiB, as ``bench --frameworks`` does. The worker warms the step up on 64
rows, creates the inputs, and measures the peak extra memory of one full step (the
resident-set high-water mark ``VmHWM``, reset through ``/proc/self/clear_refs`` just before,
minus the RSS just before: the inputs and the model excluded; activations, features, their
gradients, parameter gradients and temporaries included); that step is also the warm-up of
``--repeats`` timed steps whose median is reported. Sizes run in increasing order; a plain
row predicted (from its peak at the largest smaller n, scaled as n, or n^2 with open_clip's
logits) to exceed the budget is skipped, as are the larger n after it.

torch is imported inside functions only.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import statistics
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from typing import Any

from .. import _memory
from .baselines import open_clip_forward, open_clip_info
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
    mib,
    print_load_after,
    print_notes,
    refuse,
    render_table,
    run_config,
    run_json_line,
    write_report,
)
from .frameworks import (
    FIRST_TIMEOUT_S,
    RLIMIT_SLACK_BYTES,
    _growth,
    _is_out_of_memory,
    _limit_address_space,
)

__all__ = ["DEFAULT_DIM", "DEFAULT_SIZES", "IMPLS", "main", "run_case", "worker_main"]

CACHED = "cached_step"
PLAIN = "plain ours"
PLAIN_OPEN_CLIP = "plain open_clip"
IMPLS = (CACHED, PLAIN, PLAIN_OPEN_CLIP)

#: Batch sizes n of ``bench --cached`` when ``--sizes`` is not given (quick: ~1 minute).
DEFAULT_SIZES = (4096, 8192)
#: Feature dimension d of ``bench --cached`` when ``--dim`` is not given.
DEFAULT_DIM = 128
#: Input width and hidden width of each tower.
IN_DIM, HIDDEN = 64, 1024
#: Relative difference of a row's loss from ``cached_step``'s beyond which it is an error.
VALUE_RTOL = 1e-4
#: Our loss module of each loss.
OUR_MODULES = {"sigmoid": "SigLipLoss", "softmax": "ClipLoss"}


# --------------------------------------------------------------------------- the worker


def _model(dim: int, seed: int) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(seed)

    def tower() -> Any:
        return nn.Sequential(
            nn.Linear(IN_DIM, HIDDEN),
            nn.GELU(),
            nn.Linear(HIDDEN, HIDDEN),
            nn.GELU(),
            nn.Linear(HIDDEN, dim),
        )

    model = nn.Module()
    model.image = tower()
    model.text = tower()
    model.logit_scale = nn.Parameter(torch.tensor(SCALE).log())
    model.logit_bias = nn.Parameter(torch.tensor(BIAS))
    return model


def make_step(
    impl: str, loss: str, model: Any, *, chunk_size: int, block_size: int | None
) -> Callable[[Any, Any], Any]:
    """Return ``step(images, texts) -> loss``: one training step's forward and backward.

    Parameters
    ----------
    impl : str
        A member of :data:`IMPLS`.
    loss : {"sigmoid", "softmax"}
        The loss.
    model : torch.nn.Module
        From the worker: ``image`` and ``text`` towers, ``logit_scale``, ``logit_bias``.
    chunk_size : int
        Rows per encoder call of ``cached_step``.
    block_size : int or None
        Tile edge of this library's loss.

    Returns
    -------
    callable
        Accumulates the step's gradients into the model's ``.grad``; returns the loss.
    """
    from torch.nn import functional

    bridge = importlib.import_module("portable_siglip.backends.torch")

    def encode_img(x: Any) -> Any:
        return functional.normalize(model.image(x), dim=-1)

    def encode_txt(x: Any) -> Any:
        return functional.normalize(model.text(x), dim=-1)

    bias = loss == "sigmoid"
    if impl == CACHED:

        def cached(images: Any, texts: Any) -> Any:
            return bridge.cached_step(
                encode_img,
                encode_txt,
                images,
                texts,
                loss=loss,
                logit_scale=model.logit_scale.exp(),
                logit_bias=model.logit_bias if bias else None,
                chunk_size=chunk_size,
                block_size=block_size,
            )

        return cached
    if impl == PLAIN:
        fn = getattr(bridge, OUR_MODULES[loss])(block_size=block_size)
    elif impl == PLAIN_OPEN_CLIP:
        fn = open_clip_forward(loss)
    else:
        msg = f"no `bench --cached` row {impl!r}"
        raise ValueError(msg)

    def plain(images: Any, texts: Any) -> Any:
        value = fn(
            encode_img(images),
            encode_txt(texts),
            model.logit_scale.exp(),
            model.logit_bias if bias else None,
        )
        value.backward()
        return value.detach()

    return plain


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
    """Measure one case in this process: peak extra memory of one step, then timed steps.

    Meant for a fresh process (the worker): with ``cap_bytes`` it limits this process's
    address space for the rest of its life.

    Returns
    -------
    dict
        ``status`` ("ok" or "out of memory"), ``error``, ``peak_extra_bytes``, ``method``,
        ``times_s``, ``loss_value``, ``rlimit_as_bytes`` and ``torch_num_threads``.
    """
    import torch

    del dtype  # float32: the towers' parameters
    model = _model(dim, seed)
    step = make_step(impl, loss, model, chunk_size=chunk_size, block_size=block_size)
    gen = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(n, IN_DIM, generator=gen)
    texts = torch.randn(n, IN_DIM, generator=gen)
    step(images[:WARMUP_N], texts[:WARMUP_N])
    model.zero_grad(set_to_none=True)
    gc.collect()
    result: dict[str, Any] = {
        "status": "ok",
        "error": None,
        "peak_extra_bytes": None,
        "method": None,
        "times_s": [],
        "loss_value": None,
        "rlimit_as_bytes": None,
        "torch_num_threads": torch.get_num_threads(),
    }
    if cap_bytes is not None:
        result["rlimit_as_bytes"] = _limit_address_space(cap_bytes + RLIMIT_SLACK_BYTES)
    try:
        rss_before = _memory.rss_bytes()
        reset = _memory.reset_high_water()
        result["loss_value"] = float(step(images, texts))
        high = _memory.high_water_bytes()
        if rss_before is not None and high is not None:
            result["peak_extra_bytes"] = max(0, high - rss_before)
            result["method"] = (
                "VmHWM after clear_refs reset"
                if reset
                else "VmHWM (no reset; includes set-up transients)"
            )
        for _ in range(repeats):
            model.zero_grad(set_to_none=True)
            gc.collect()  # not inside the timed region
            start = time.perf_counter()
            step(images, texts)
            result["times_s"].append(time.perf_counter() - start)
    except (MemoryError, RuntimeError) as error:
        if not _is_out_of_memory(error):
            raise
        result["status"] = "out of memory"
        result["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
    return result


def worker_main(argv: list[str] | None = None) -> int:
    """Measure one case in this process and print it as one JSON line.

    Returns
    -------
    int
        Exit status, 0 when the case ran or ran out of memory (the JSON says which).
    """
    parser = argparse.ArgumentParser(
        prog="python -m portable_siglip.bench.cached",
        description="One case of `bench --cached` (one JSON line on stdout).",
    )
    add_case_arguments(parser, IMPLS)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cap-bytes", type=int, default=None)
    result = run_case(**vars(parser.parse_args(argv)))  # the options are its keywords
    print(json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------- orchestrator


def predict_peak_bytes(impl: str, n: int, dim: int, previous: tuple[int, int] | None) -> float:
    """Predict the peak extra memory of one case, to skip it when above the budget.

    The larger of a lower bound (the plain rows: 5 float32 activations of width
    :data:`HIDDEN` per row and tower; open_clip's: also 3 float32 n x n matrices; ours:
    6 n x d float32 arrays) and the peak at the largest smaller n, scaled as n (as n^2 with
    open_clip's logits).

    Examples
    --------
    >>> predict_peak_bytes("plain ours", 8192, 128, (4096, 2**30)) / 2**30
    2.0
    """
    floor = 6.0 * n * dim * 4
    if impl != CACHED:
        floor += 2 * 5 * n * HIDDEN * 4
    if impl == PLAIN_OPEN_CLIP:
        floor += 3.0 * n * n * 4
    if previous is None:
        return floor
    n0, peak0 = previous
    power = 2 if impl == PLAIN_OPEN_CLIP else 1
    return max(floor, peak0 * (n / n0) ** power)


def _worker_command(args: argparse.Namespace, loss: str, impl: str, n: int) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "portable_siglip.bench.cached",
        f"--loss={loss}",
        f"--impl={impl}",
        f"--n={n}",
        f"--dim={args.dim}",
        f"--seed={args.seed}",
        f"--chunk-size={args.chunk_size}",
        f"--repeats={args.repeats}",
        f"--cap-bytes={int(args.memory_cap_gib * GIB)}",
    ]
    if args.block_size is not None:
        command.append(f"--block-size={args.block_size}")
    return command


def _new_row(args: argparse.Namespace, loss: str, impl: str, n: int) -> dict[str, Any]:
    return {
        "loss": loss,
        "impl": impl,
        "n": n,
        "d": args.dim,
        "chunk_size": args.chunk_size if impl == CACHED else None,
        "status": None,
        "times_s": [],
        "median_s": None,
        "peak_extra_mib": None,
        "backward_peak_mib": None,  # for frameworks._growth: the step is one figure
        "peak_per_nd": None,
        "time_ratio": None,
        "memory_ratio": None,
        "predicted_peak_gib": None,
        "loss_value": None,
        "worker_wall_s": None,
        "worker": None,
        "notes": [],
        "error": None,
    }


def _run_one(
    args: argparse.Namespace,
    row: dict[str, Any],
    previous: dict[str, tuple[int, int, float | None]],
    errors: list[str],
) -> None:
    """Predict, then run (or skip) the case of ``row``; fill the row in."""
    loss, impl, n = row["loss"], row["impl"], row["n"]
    before = previous.get(impl)
    predicted = predict_peak_bytes(impl, n, args.dim, None if before is None else before[:2])
    row["predicted_peak_gib"] = predicted / GIB
    cap = args.memory_cap_gib
    if predicted > cap * GIB:
        row["status"] = "skipped"
        row["notes"].append(f"skipped: predicted {predicted / GIB:.3g} GiB > budget {cap:g} GiB")
        previous[impl] = (n, int(predicted), None)
        return
    timeout = FIRST_TIMEOUT_S
    if before is not None and before[2] is not None:
        timeout = PROBE_TIMEOUT_BASE_S + 10.0 * before[2] * (n / before[0]) ** 2
    log_progress(f"  {loss} n={n} {impl} ...")
    start = time.perf_counter()
    result, error = run_json_line(_worker_command(args, loss, impl, n), timeout, "worker")
    row["worker_wall_s"] = wall = time.perf_counter() - start
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
        row["peak_per_nd"] = result["peak_extra_bytes"] / (n * args.dim * 4)
        previous[impl] = (n, int(result["peak_extra_bytes"]), wall)
    if result["status"] != "ok":
        previous[impl] = (n, int(cap * GIB), None)
        row["status"] = result["status"]
        row["error"] = result["error"]
        row["notes"].append(f"out of memory under the {cap:g} GiB budget")
        if impl == CACHED:  # the plain rows may run out; cached_step should not
            errors.append(f"{loss} n={n} {impl}: out of memory: {result['error']}")
        return
    row["status"] = "ok"
    row["times_s"] = result["times_s"]
    row["median_s"] = statistics.median(result["times_s"])


def _compare(rows: Sequence[dict[str, Any]], errors: list[str]) -> None:
    """Fill in each row's ratios to ``cached_step`` at the same (loss, n); check the losses."""
    compare_rows(rows, CACHED, VALUE_RTOL, "cached_step's", errors)


def _table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        (
            "loss",
            "impl",
            "n",
            "median s",
            "time x cached",
            "peak MiB",
            "mem x cached",
            "peak / (n·d·4 B)",
            "notes",
        )
    ]
    for row in rows:
        lines.append(
            (
                row["loss"],
                row["impl"],
                str(row["n"]),
                fmt(row["median_s"], ".2f"),
                fmt(row["time_ratio"], ".2f"),
                fmt(row["peak_extra_mib"], ".0f"),
                fmt(row["memory_ratio"], ".1f"),
                fmt(row["peak_per_nd"], ".1f"),
                "; ".join(row["notes"]),
            )
        )
    return render_table(lines, left={0, 1, 8})


def _check(args: argparse.Namespace) -> str | None:
    problem = check_args(args)
    if problem is not None:
        return problem
    if args.dtype != "float32":
        return f"`--cached` trains float32 towers: `--dtype` must be float32; got {args.dtype}"
    if args.no_memory:
        return "`--no-memory` does not apply to `--cached`, which always measures memory"
    if int(args.chunk_size) <= 0:
        return f"`--chunk-size` must be a positive integer; got {args.chunk_size!r}"
    return None


def _header(args: argparse.Namespace, machine: dict[str, Any], open_clip: dict[str, Any]) -> str:
    load = ", ".join(f"{x:.2f}" for x in machine["load_average_before"])
    oc = (
        f"open-clip-torch {open_clip['version']}"
        if open_clip["installed"]
        else "open-clip-torch not available (no plain open_clip rows)"
    )
    return "\n".join(
        [
            "portable-siglip bench --cached: one training step (forward + backward of both "
            f"towers) in torch on the CPU; towers {IN_DIM} -> {HIDDEN} -> {HIDDEN} -> "
            f"d = {args.dim} (GELU, float32), cached_step chunk = {args.chunk_size} rows, "
            f"median of {args.repeats} after 1 measured step, memory budget "
            f"{args.memory_cap_gib:g} GiB",
            f"machine: {machine['cpu']}; {machine['cpu_count']} CPUs "
            f"({machine['cpus_usable']} usable); python {machine['python']}",
            f"versions: torch {machine['torch']} (torch.get_num_threads() = "
            f"{machine['torch_num_threads']}), {oc}",
            f"load average (1, 5, 15 min) before: {load}",
        ]
    )


NOTES = (
    "Each case: one training step of the model in a fresh process (python -m "
    "portable_siglip.bench.cached) limited by RLIMIT_AS to its size after set-up + the budget "
    "+ 512 MiB. peak MiB: high-water resident set (VmHWM, reset through /proc/self/clear_refs) "
    "during the first full-size step minus the RSS just before it: inputs and model excluded; "
    "activations, features, gradients and temporaries included. median s: the median of the "
    "timed steps after it. x cached: the row's figure over cached_step's at the same loss and "
    "n. peak / (n·d·4 B): the peak in units of one n x d float32 feature matrix.",
    "Plain rows predicted above the budget (from their peak at the largest smaller n, scaled "
    "as n, or n^2 with open_clip's logits) are skipped, and not timed.",
)


def main(args: argparse.Namespace) -> int:
    """Run ``bench --cached``: print the table and optionally write JSON.

    Parameters
    ----------
    args : argparse.Namespace
        Options from a parser prepared by :func:`portable_siglip.cli._bench.add_arguments`.

    Returns
    -------
    int
        0 when every case ran or was skipped; 1 when a case failed (an error, a timeout,
        ``cached_step`` out of memory, or a loss that disagrees with ``cached_step``'s);
        2 for invalid options or a missing torch.
    """
    defaults = {"sizes": list(DEFAULT_SIZES), "dim": DEFAULT_DIM}
    updates = {key: value for key, value in defaults.items() if getattr(args, key, None) is None}
    args = argparse.Namespace(**{**vars(args), **updates})
    if refuse(_check(args), "--cached", ("numpy", "torch")):
        return 2
    open_clip = open_clip_info()
    machine = machine_info(["torch"])
    machine["open_clip"] = open_clip
    print(_header(args, machine, open_clip), flush=True)
    errors: list[str] = []
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    impls = [CACHED, PLAIN, *([PLAIN_OPEN_CLIP] if open_clip["installed"] else [])]
    for loss in args.losses:
        previous: dict[str, tuple[int, int, float | None]] = {}
        for n in sorted(args.sizes):
            case = [_new_row(args, loss, impl, n) for impl in impls]
            for row in case:
                _run_one(args, row, previous, errors)
            _compare(case, errors)
            rows.extend(case)
    machine["load_average_after"] = list(os.getloadavg())
    machine["wall_s"] = time.perf_counter() - started
    print()
    print(_table(rows))
    print()
    growth = _growth(rows)
    if growth:
        print("growth of the peak extra memory with n (n^k: the power of n it grew as):")
        for line in growth:
            print(textwrap.fill(line, width=100, initial_indent="  ", subsequent_indent="    "))
    print_notes(NOTES, errors)
    print_load_after(machine)
    report = {
        "machine": machine,
        "config": {
            "losses": list(args.losses),
            "sizes": sorted(args.sizes),
            "dim": args.dim,
            "towers": {"in": IN_DIM, "hidden": HIDDEN, "layers": 3},
            **run_config(args),
            "chunk_size": args.chunk_size,
            "memory_budget_gib": args.memory_cap_gib,
            "rlimit_slack_bytes": RLIMIT_SLACK_BYTES,
        },
        "rows": rows,
        "growth": growth,
        "notes": list(NOTES),
        "errors": errors,
    }
    write_report(args.json, report)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(worker_main())
