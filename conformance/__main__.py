"""``python -m portable_siglip.conformance``: judge an implementation of a contrastive loss.

Exit status: 0 when every check passed, 1 when at least one failed, 2 on a usage error
(unknown option, implementation not found, backend not installed).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from portable_siglip._interop import BACKENDS, DTYPES, UsageError

from ._checks import CONVENTIONS, Report, check

__all__ = ["load_implementation", "main"]


def load_implementation(spec: str) -> Callable[..., Any]:
    """Resolve ``MODULE:ATTR`` (MODULE importable, or a path to a ``.py`` file).

    ``ATTR`` may be dotted (``Class.method``) and may name a class to instantiate without
    arguments, such as an ``nn.Module`` whose ``forward`` is the loss.

    Raises
    ------
    UsageError
        If the module or attribute cannot be found.
    """
    module_name, sep, attribute = spec.rpartition(":")
    if not sep or not module_name or not attribute:
        msg = f"`--impl` must be MODULE:ATTR or path/to/file.py:ATTR, got {spec!r}"
        raise UsageError(msg)
    if module_name.endswith(".py") or "/" in module_name:
        path = Path(module_name)
        if not path.is_file():
            msg = f"`--impl`: no such file {str(path)!r}"
            raise UsageError(msg)
        unique = f"_conformance_impl_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(unique, path)
        if loader_spec is None or loader_spec.loader is None:
            msg = f"`--impl`: cannot load {str(path)!r} as a Python module"
            raise UsageError(msg)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[unique] = module
        sys.path.insert(0, str(path.resolve().parent))  # let it import its siblings
        try:
            loader_spec.loader.exec_module(module)
        except Exception as error:
            msg = f"`--impl`: loading {str(path)!r} raised {type(error).__name__}: {error}"
            raise UsageError(msg) from error
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            msg = f"`--impl`: cannot import module {module_name!r}: {error}"
            raise UsageError(msg) from None
        except Exception as error:
            msg = f"`--impl`: importing {module_name!r} raised {type(error).__name__}: {error}"
            raise UsageError(msg) from error
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            msg = f"`--impl`: {module_name!r} has no attribute {attribute!r}"
            raise UsageError(msg)
        target = getattr(target, part)
    if isinstance(target, type):
        target = target()
    if not callable(target):
        msg = f"`--impl`: {spec!r} is not callable"
        raise UsageError(msg)
    return target  # type: ignore[no-any-return]


def _default_implementation(loss: str) -> Callable[..., Any]:
    import portable_siglip as ps

    return ps.sigmoid_loss_and_grad if loss == "sigmoid" else ps.softmax_loss_and_grad


def _format_error(value: float) -> str:
    return "non-finite" if not math.isfinite(value) else f"{value:.2e}"


def print_report(report: Report, *, limit: int = 40) -> None:
    """Print the verdict, the failed checks (worst first) and the diagnosis."""
    checks = len(report.results)
    failed = sorted(report.failed, key=lambda r: -r.error / r.tolerance if r.tolerance else 0)
    print(
        f"conformance: {report.implementation}  loss={report.loss} backend={report.backend} "
        f"dtype={report.dtype} convention={report.convention}"
    )
    for note in report.notes:
        print(f"  note: {note}")
    if not failed:
        print(f"PASSED: {checks} checks; worst error {report.worst:.2g} x its tolerance")
        return
    print(f"FAILED: {len(failed)} of {checks} checks")
    rows = [("check", "case", "quantity", "error", "tolerance", "what")]
    for result in failed[:limit]:
        rows.append(
            (
                result.check,
                result.case,
                "loss" if result.quantity == "loss" else f"grads.{result.quantity}",
                _format_error(result.error),
                f"{result.tolerance:.1e}",
                result.message[:80],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:5], widths, strict=True)]
        print("  " + "  ".join(cells) + "  " + row[5])
    if len(failed) > limit:
        print(f"  ... and {len(failed) - limit} more (see --report)")
    print("diagnosis:")
    for line in report.diagnosis:
        print(f"  {line}")


def _agreement(losses: Sequence[str]) -> int:
    """Run portable_siglip on every installed backend and dtype; print the error matrix."""
    status = 0
    for loss in losses:
        print(f"agreement: portable_siglip {loss} loss, worst error / tolerance over all cases")
        header = f"  {'backend':18s}" + "".join(f"{dtype:>12s}" for dtype in DTYPES)
        print(header)
        for backend in BACKENDS:
            cells = []
            for dtype in DTYPES:
                try:
                    report = check(
                        _default_implementation(loss), loss=loss, backend=backend, dtype=dtype
                    )
                except UsageError:
                    cells.append("-")
                    continue
                mark = "ok" if report.passed else "FAIL"
                cells.append(f"{report.worst:.2g} {mark}")
                status = status or (0 if report.passed else 1)
            print(f"  {backend:18s}" + "".join(f"{cell:>12s}" for cell in cells))
    print("  (- : backend not installed or without that dtype; ok: every check passed)")
    return status


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of ``python -m portable_siglip.conformance``."""
    parser = argparse.ArgumentParser(
        prog="python -m portable_siglip.conformance",
        description="Check an implementation of the SigLIP or CLIP loss against high-precision "
        "golden cases.",
    )
    parser.add_argument("--loss", choices=("sigmoid", "softmax"))
    parser.add_argument(
        "--impl",
        help="MODULE:ATTR or path/to/file.py:ATTR, a callable f(img, txt, scale, bias) "
        "returning the loss or (loss, grads); default: portable_siglip itself",
    )
    parser.add_argument("--backend", choices=BACKENDS, default="numpy")
    parser.add_argument("--dtype", choices=DTYPES, default="float64")
    parser.add_argument(
        "--convention",
        choices=tuple(CONVENTIONS),
        default="default",
        help="declared normalisation: default (sum over pairs / n), mean (over n^2), sum",
    )
    parser.add_argument("--report", type=Path, help="write the full report as JSON")
    parser.add_argument(
        "--agreement",
        action="store_true",
        help="run portable_siglip on every installed backend and dtype and print the matrix",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the conformance command line and return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.agreement:
            return _agreement([args.loss] if args.loss else ["sigmoid", "softmax"])
        if args.loss is None:
            parser.error("--loss is required (unless --agreement)")
        function = (
            load_implementation(args.impl) if args.impl else _default_implementation(args.loss)
        )
        report = check(
            function,
            loss=args.loss,
            backend=args.backend,
            dtype=args.dtype,
            convention=args.convention,
        )
    except UsageError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print_report(report)
    if args.report is not None:
        args.report.write_text(json.dumps(report.to_dict(), indent=2))
        print(f"report written to {args.report}")
    return 0 if report.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
