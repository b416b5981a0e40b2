"""Errors of implementations and of the naive reference on one golden case, side by side.

For documentation and for choosing between options such as ``precision="fast"`` and
``"exact"``: :func:`case_errors` runs each implementation on one golden case (by default the
largest, n = 2049) in a backend and dtype, the way :func:`~._checks.check` does (fresh
inputs, autodiff of a bare torch or jax loss), and returns the normwise relative error of the
loss and of each gradient against the golden, next to the error of the naive dense reference
of a half-precision run (:mod:`._naive`) and the bound FlashAttention's rule derives from it.
:func:`error_table` formats the result as a Markdown table.

From a shell, for this library's two precisions (torch, bfloat16, every loss the suite
judges)::

    python -m portable_siglip.conformance._errors --backend torch --dtype bfloat16
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from portable_siglip import _registry as registry

from ._cases import Case, load_cases
from ._checks import Runner
from ._judged import golden_losses
from ._naive import naive_errors
from ._report import (
    FLOOR,
    HALF_DTYPES,
    QUANTITIES,
    check_bound,
    natural_scale,
    relative_error,
    tolerance_for,
)

__all__ = ["LARGEST", "case_errors", "error_table", "main"]

#: The golden case :func:`case_errors` uses by default: the largest (n = 2049, d = 256).
LARGEST = "large-n2049-d256-t118-b-13"


def _case(name: str) -> Case:
    for case in load_cases():
        if case.name == name:
            return case
    names = ", ".join(case.name for case in load_cases() if "large" in case.tags)
    msg = f"`case` must name a golden case (the large ones: {names}), got {name!r}"
    raise ValueError(msg)


def case_errors(
    functions: Mapping[str, Callable[..., Any]],
    *,
    loss: str,
    backend: str = "torch",
    dtype: str = "bfloat16",
    case: str = LARGEST,
) -> dict[str, dict[str, float]]:
    """Return each implementation's error on one golden case, and the naive reference's.

    Parameters
    ----------
    functions : mapping of str to callable
        Implementations by label, each ``f(img, txt, scale, bias)`` as :func:`check` takes.
    loss : str
        The loss they compute, one the golden cases hold (:func:`._cases.golden_losses`).
    backend, dtype : str
        Where and in which dtype to run them.
    case : str
        Name of the golden case (default: :data:`LARGEST`).

    Returns
    -------
    dict
        ``{label: {quantity: error}}`` for each implementation (``inf`` where it raised or
        returned non-finite values; a gradient it did not return is missing), and in a
        float16 or bfloat16 run also ``"naive"`` (the naive reference's error) and
        ``"bound"`` (``2 x naive + floor``; the dtype's fixed tolerance where the naive
        reference is not finite, as in :func:`check`).

    Examples
    --------
    >>> import functools
    >>> import portable_siglip as ps
    >>> errors = case_errors(
    ...     {"library": ps.sigmoid_loss_and_grad}, loss="sigmoid", backend="numpy",
    ...     dtype="float32", case="random-n13-d32",
    ... )
    >>> errors["library"]["loss"] < 1e-6
    True
    """
    chosen = _case(case)
    golden = chosen.goldens[loss]
    table: dict[str, dict[str, float]] = {}
    for label, function in functions.items():
        outcome = Runner(function, backend, dtype).run(
            chosen.img, chosen.txt, chosen.scale, chosen.bias
        )
        row: dict[str, float] = {}
        for quantity in QUANTITIES:
            if outcome.error is not None:
                row[quantity] = math.inf
                continue
            if quantity not in outcome.values:
                continue
            value = golden.stored(quantity, outcome.values[quantity], chosen.n)
            floor = FLOOR * natural_scale(chosen, quantity)
            row[quantity] = relative_error(value, getattr(golden, quantity), floor)
        table[label] = row
    if dtype in HALF_DTYPES:
        naive = naive_errors(chosen, loss, dtype)
        table["naive"] = dict(naive)
        tolerance = tolerance_for(dtype, chosen)
        table["bound"] = {q: check_bound(tolerance, naive, q, dtype)[0] for q in naive}
    return table


def error_table(errors: Mapping[str, Mapping[str, float]], title: str = "") -> str:
    """Format :func:`case_errors`' result as a Markdown table, one row per implementation."""
    labels = {"loss": "loss", "img": "dL/dimg", "txt": "dL/dtxt", "scale": "dL/dt"}
    labels["bias"] = "dL/db"
    header = [title or "implementation", *(labels[q] for q in QUANTITIES)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, row in errors.items():
        cells = [
            "-" if q not in row else (f"{row[q]:.2e}" if math.isfinite(row[q]) else "inf")
            for q in QUANTITIES
        ]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print this library's errors with ``precision="fast"`` and ``"exact"`` on one case."""
    import functools

    import portable_siglip as ps
    from portable_siglip import _losses

    parser = argparse.ArgumentParser(
        prog="python -m portable_siglip.conformance._errors",
        description="Errors of precision='fast' and 'exact' and of the naive reference "
        "on one golden case, every loss with golden cases.",
    )
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--dtype", default="bfloat16", choices=HALF_DTYPES)
    parser.add_argument("--case", default=LARGEST)
    args = parser.parse_args(argv)
    for loss in golden_losses():
        function = _losses.loss_functions(registry.get(loss), ps)[1]
        functions = {
            f'precision="{p}"': functools.partial(function, precision=p) for p in ("fast", "exact")
        }
        errors = case_errors(
            functions, loss=loss, backend=args.backend, dtype=args.dtype, case=args.case
        )
        print(f"{loss}, {args.backend} {args.dtype}, {args.case}:\n")
        print(error_table(errors, title=f"{loss} ({args.dtype})"))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
