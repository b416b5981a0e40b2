"""``python -m portable_siglip bench --compare-precision``: ``"fast"`` against ``"exact"``.

On half-precision inputs the four losses take ``precision="fast"`` (the default: GEMM
operands in the input dtype, accumulation and every sum in float32) or ``"exact"`` (float32
GEMM operands). This benchmark runs both on the same inputs, side by side in one run, for
each backend (torch; numpy, whose bfloat16 is ml_dtypes'), dtype (``--dtype``: bfloat16 by
default, float16), d, n and loss:

``fast``, ``exact``
    :func:`portable_siglip.sigmoid_loss_and_grad` / :func:`softmax_loss_and_grad` with that
    option, default ``block_size``. Timed as the sweep times its rows: one warm-up of both,
    then ``--repeats`` rounds in which each runs once, in turn; the median is reported.

Beside the times it reports ``exact / fast`` (above 1: fast is the faster) and, for each
option, the error of the warm-up call against the dense float64 loss and gradients of the
same (rounded) inputs (:func:`portable_siglip._reference.dense_loss_and_grad`): the loss's
relative error, and the largest error of the two feature gradients relative to their largest
entry.

On a GPU, ``bench --device cuda`` reports both options too (its ``ours torch`` and ``ours
torch exact`` rows).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from .common import (
    BIAS,
    SCALE,
    fmt,
    installed,
    log_progress,
    loss_and_grad,
    machine_info,
    make_inputs,
    print_notes,
    render_table,
    time_interleaved,
    write_report,
)

__all__ = ["BACKENDS", "DEFAULT_SIZES", "HALF_DTYPES", "PRECISIONS", "half_inputs", "main"]

#: The options compared, in the order they run.
PRECISIONS = ("fast", "exact")

#: Input dtypes of the comparison (``--dtype``).
HALF_DTYPES = ("bfloat16", "float16")

#: Backends with a half-precision path on the CPU.
BACKENDS = ("numpy", "torch")

#: Batch sizes n when ``--sizes`` is not given (d = 768: about a second a call on 2 cores).
DEFAULT_SIZES = (4096,)


def half_inputs(backend: str, img: Any, txt: Any, dtype: str) -> tuple[Any, Any]:
    """Round float32 numpy features to ``dtype`` in ``backend``'s arrays.

    bfloat16 numpy arrays are ``ml_dtypes.bfloat16``. Rounding is to nearest even in both
    libraries, so numpy and torch get the same values.

    Raises
    ------
    LookupError
        For numpy bfloat16 without ml_dtypes installed.

    Examples
    --------
    >>> import numpy as np
    >>> img, _ = half_inputs("numpy", np.float32([[1 / 3]]), np.float32([[1.0]]), "float16")
    >>> str(img.dtype), float(img[0, 0])
    ('float16', 0.333251953125)
    """
    if backend == "torch":
        import torch

        target = getattr(torch, dtype)
        return torch.from_numpy(img).to(target), torch.from_numpy(txt).to(target)
    import numpy as np

    if dtype == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            msg = "numpy has no bfloat16 without ml_dtypes (pip install ml-dtypes)"
            raise LookupError(msg) from None
        numpy_dtype: Any = ml_dtypes.bfloat16
    else:
        numpy_dtype = np.float16
    return img.astype(numpy_dtype), txt.astype(numpy_dtype)


def _as_float64(array: Any) -> Any:
    from .._interop import to_numpy

    return to_numpy(array)  # float64 on the host, from any backend and half dtype


def _call(loss: str, img: Any, txt: Any, precision: str, block_size: int | None) -> Any:
    return functools.partial(
        loss_and_grad(loss), img, txt, SCALE, BIAS, block_size=block_size, precision=precision
    )


def _errors(result: Any, reference: tuple[Any, ...]) -> tuple[float, float]:
    """Relative error of the loss, and of the two feature gradients (max norm), in float64."""
    import numpy as np

    value, grads = result
    ref_value, ref_img, ref_txt = reference[:3]
    loss_error = abs(float(_as_float64(value)) - ref_value) / abs(ref_value)
    worst = 0.0
    for got, want in ((grads.img, ref_img), (grads.txt, ref_txt)):
        scale = float(np.max(np.abs(want)))
        worst = max(worst, float(np.max(np.abs(_as_float64(got) - want))) / scale)
    return loss_error, worst


def _new_row(backend: str, dtype: str, d: int, n: int, loss: str, precision: str) -> dict[str, Any]:
    return {
        "backend": backend,
        "dtype": dtype,
        "d": d,
        "n": n,
        "loss": loss,
        "precision": precision,
        "times_s": [],
        "median_s": None,
        "exact_over_fast": None,
        "loss_rel_error": None,
        "grad_rel_error": None,
        "skipped": None,
        "error": None,
    }


def _case(
    backend: str,
    dtype: str,
    d: int,
    n: int,
    loss: str,
    arrays: tuple[Any, Any],
    reference: tuple[Any, ...],
    args: argparse.Namespace,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Time ``fast`` and ``exact`` side by side on one case; measure their errors."""
    rows = [_new_row(backend, dtype, d, n, loss, p) for p in PRECISIONS]
    errors: list[str] = []
    runs: list[Callable[[], None]] = []
    for row in rows:
        call = _call(loss, *arrays, row["precision"], args.block_size)
        try:
            row["loss_rel_error"], row["grad_rel_error"] = _errors(call(), reference)
        except Exception as error:
            row["error"] = f"{type(error).__name__}: {str(error).strip()[:200]}"
            errors.append(
                f"{backend} {dtype} {loss} d={d} n={n} {row['precision']}: {row['error']}"
            )
            continue
        runs.append(functools.partial(_discard, call))
    if len(runs) == len(rows):
        times = time_interleaved(runs, args.repeats)
        for row, record in zip(rows, times, strict=True):
            row["times_s"] = record
            row["median_s"] = statistics.median(record)
        ratio = rows[1]["median_s"] / rows[0]["median_s"] if rows[0]["median_s"] > 0 else None
        for row in rows:
            row["exact_over_fast"] = ratio
    return rows, errors


def _discard(call: Callable[[], Any]) -> None:
    call()


def _reference(loss: str, img: Any, txt: Any) -> tuple[Any, ...]:
    from .._reference import dense_loss_and_grad

    return dense_loss_and_grad(loss, _as_float64(img), _as_float64(txt), SCALE, BIAS)


def table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per case: both options' times, their ratio and their errors."""
    header = (
        "backend",
        "dtype",
        "loss",
        "d",
        "n",
        "fast s",
        "exact s",
        "exact/fast",
        "loss err fast",
        "loss err exact",
        "grad err fast",
        "grad err exact",
    )
    lines = [header]
    cases: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for row in rows:
        key = (row["backend"], row["dtype"], row["loss"], str(row["d"]), str(row["n"]))
        cases.setdefault(key, {})[row["precision"]] = row
    for key, pair in cases.items():
        fast, exact = pair.get("fast", {}), pair.get("exact", {})
        why = next((r[k] for r in (fast, exact) for k in ("skipped", "error") if r.get(k)), None)
        if why is not None:
            lines.append((*key, why, *[""] * 6))
            continue
        lines.append(
            (
                *key,
                fmt(fast["median_s"], ".3f"),
                fmt(exact["median_s"], ".3f"),
                fmt(fast["exact_over_fast"], ".2f"),
                fmt(fast["loss_rel_error"], ".1e"),
                fmt(exact["loss_rel_error"], ".1e"),
                fmt(fast["grad_rel_error"], ".1e"),
                fmt(exact["grad_rel_error"], ".1e"),
            )
        )
    return render_table(lines, left={0, 1, 2})


def main(args: argparse.Namespace) -> int:
    """Run the comparison described by ``args`` (the ``bench`` options) and print its table.

    Parameters
    ----------
    args : argparse.Namespace
        ``bench`` options after their defaults are filled in: ``dtype`` a list among
        :data:`HALF_DTYPES`, ``backends`` among :data:`BACKENDS` (others are left out with
        a note), ``sizes`` and ``dims``.

    Returns
    -------
    int
        0 when every case ran or was skipped, 1 when one failed, 2 for invalid options.
    """
    dtypes = list(args.dtype)
    if not dtypes or any(d not in HALF_DTYPES for d in dtypes):
        msg = f"`--compare-precision` takes --dtype among {', '.join(HALF_DTYPES)}; got {dtypes}"
        print(f"bench: error: {msg}", file=sys.stderr)
        return 2
    notes = [
        f"note: `--compare-precision` runs on {' and '.join(BACKENDS)} only; {b} is left out"
        for b in args.backends
        if b not in BACKENDS
    ]
    backends = [b for b in BACKENDS if b in args.backends and installed(b)]
    machine = machine_info(backends)
    print(
        f"portable-siglip bench --compare-precision: precision='fast' against 'exact' on "
        f"{', '.join(dtypes)} inputs, t = {SCALE:g}, b = {BIAS:g}, median of {args.repeats} "
        f"interleaved rounds after 1 warm-up; {machine['cpu']}, {machine['cpu_count']} CPUs",
        flush=True,
    )
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    for dtype in dtypes:
        for d in args.dims:
            for n in args.sizes:
                base = make_inputs("numpy", n, d, "float32", args.seed)
                references: dict[str, tuple[Any, ...]] = {}
                for backend in backends:
                    try:
                        arrays = half_inputs(backend, *base, dtype)
                    except LookupError as reason:
                        for loss in args.losses:
                            for precision in PRECISIONS:
                                row = _new_row(backend, dtype, d, n, loss, precision)
                                row["skipped"] = str(reason)
                                rows.append(row)
                        continue
                    for loss in args.losses:
                        log_progress(f"  {backend} {dtype} {loss} d={d} n={n} ...")
                        if loss not in references:  # the rounded values agree across backends
                            references[loss] = _reference(loss, *arrays)
                        pair, failed = _case(
                            backend, dtype, d, n, loss, arrays, references[loss], args
                        )
                        rows += pair
                        errors += failed
    print()
    print(table(rows))
    print()
    notes.append(
        "exact/fast = median time of precision='exact' / that of 'fast': above 1, fast is "
        "the faster. Errors are against the dense float64 loss and gradients of the same "
        "rounded inputs: the loss's relative error, and the largest gradient error relative "
        "to the gradient's largest entry (the worse of img and txt)."
    )
    print_notes(notes, errors)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average after: {load}; total {time.perf_counter() - started:.0f} s")
    report = {
        "machine": {**machine, "load_average_after": list(os.getloadavg())},
        "config": {
            "dtypes": dtypes,
            "backends": backends,
            "sizes": list(args.sizes),
            "dims": list(args.dims),
            "losses": list(args.losses),
            "block_size": args.block_size,
            "repeats": args.repeats,
            "seed": args.seed,
            "scale": SCALE,
            "bias": BIAS,
        },
        "rows": rows,
        "notes": notes,
        "errors": errors,
    }
    write_report(getattr(args, "json", None), report)
    return 1 if errors else 0
