"""Judge a contrastive-loss implementation against the golden cases.

An implementation is a callable ``f(img, txt, scale, bias)`` on arrays of one backend that
returns the loss, or ``(loss, grads)`` with grads a NamedTuple, mapping or 4-tuple
``(img, txt, scale, bias)``. With torch and jax a loss alone is differentiated by
autodiff; with the other backends a loss alone is checked for its value only.

Every case yields one check per quantity (loss and each gradient) against the goldens;
two invariants follow (permuting the pairs permutes the gradients; the block size, when
the callable takes one, changes nothing). When checks fail, :func:`diagnose` looks for
the signature of known mistakes and names them with a stable code.

The implementation is foreign code, and nothing it does may fool the verdict: every call
gets fresh copies of the inputs (the cached cases are read-only), any exception it raises,
``SystemExit`` included, is a failed check, and with a ``timeout`` each call runs in a
daemon thread that is abandoned when it overruns (see :class:`Runner`).
"""

from __future__ import annotations

import contextvars
import inspect
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from portable_siglip._interop import UsageError, load_backend, to_numpy

from ._cases import Case, load_cases

__all__ = [
    "CONVENTIONS",
    "QUANTITIES",
    "TOLERANCE",
    "CheckResult",
    "Outcome",
    "Report",
    "Runner",
    "UsageError",
    "abandoned_calls",
    "check",
    "tolerance_for",
]

QUANTITIES = ("loss", "img", "txt", "scale", "bias")

#: Normwise relative tolerance per dtype of the inputs:
#: ``max|actual - golden| / max(max|golden|, floor) <= TOLERANCE[dtype] * logit_factor``.
#: float64 leaves ~10^6 ulps for summation order. float32 allows 1e-3: a float32 softmax
#: scale gradient is a sum of n^2 terms that cancel (sum(G) = 0), and G = P - I loses eps
#: to cancellation where P_ii is near 1, so correct float32 code reaches a few 1e-4. The
#: mistakes the suite looks for are O(1) relative errors, far above every tolerance.
#: float16 and bfloat16 cover gradients rounded to the half dtype (2^-11, 2^-8) by code
#: that accumulates in float32, with room for code that keeps half-precision logits.
TOLERANCE = {"float64": 1e-9, "float32": 1e-3, "float16": 1e-2, "bfloat16": 5e-2}

#: A quantity is compared absolutely below this fraction of its natural scale (see
#: :func:`natural_scale`): saturated cases have gradients of 1e-4 that any float32 code
#: only gets right to ~eps in absolute terms.
FLOOR = 1e-3

#: Logits are rounded to the dtype before anything else, costing ``eps * |Z|`` absolute:
#: the tolerance grows with the largest logit of the case beyond this size.
LOGIT_SCALE_FREE = 100.0

#: Declared normalisations and the factor that maps this library's loss onto them.
CONVENTIONS: dict[str, Callable[[int], float]] = {
    "default": lambda n: 1.0,  # sum over pairs / n (sigmoid); mean over rows (softmax)
    "mean": lambda n: 1.0 / n,  # mean over the n^2 pairs
    "sum": lambda n: float(n),  # sum over pairs, not normalised
}


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one check.

    Attributes
    ----------
    check : str
        ``"golden"``, ``"permutation"`` or ``"blocks"``.
    case : str
        Name of the golden case.
    quantity : str
        ``"loss"``, ``"img"``, ``"txt"``, ``"scale"`` or ``"bias"`` (a gradient but the loss).
    error : float
        Normwise relative error (``inf`` for non-finite output or an exception).
    tolerance : float
        The bound it had to meet.
    passed : bool
        Whether it met it.
    message : str
        What went wrong, when something did.
    """

    check: str
    case: str
    quantity: str
    error: float
    tolerance: float
    passed: bool
    message: str = ""


def _quantity_label(result: CheckResult) -> str:
    return "loss" if result.quantity == "loss" else f"grads.{result.quantity}"


def _error_cell(result: CheckResult) -> str:
    """Fill the error column of the table: the number, or why there is none."""
    if math.isfinite(result.error):
        return f"{result.error:.2e}"
    if result.message.startswith(("timeout", "not run")):
        return result.message.split(":")[0]
    if result.message.startswith("shape"):
        return "shape"
    return "non-finite" if result.message == "non-finite values" else "raised"


@dataclass
class Report:
    """Verdict on one implementation for one loss, backend and dtype.

    ``print(report)`` gives a few lines: the verdict, the counts, the worst failure and the
    diagnosis codes. :meth:`table` gives the full text the command line prints, with every
    failed check; :meth:`to_dict` everything, JSON-ready.
    """

    loss: str
    backend: str
    dtype: str
    convention: str
    implementation: str
    results: list[CheckResult] = field(default_factory=list)
    gradients_checked: bool = False
    notes: list[str] = field(default_factory=list)
    findings: list[tuple[str, str]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Whether every check passed."""
        return bool(self.results) and all(result.passed for result in self.results)

    @property
    def failed(self) -> list[CheckResult]:
        """The checks that failed."""
        return [result for result in self.results if not result.passed]

    @property
    def codes(self) -> set[str]:
        """Codes of the diagnosed mistakes (see docs/conformance.md)."""
        return {code for code, _ in self.findings}

    @property
    def diagnosis(self) -> list[str]:
        """Human-readable diagnosis, one line per finding."""
        return [f"[{code}] {text}" for code, text in self.findings]

    @property
    def worst(self) -> float:
        """Largest error relative to its tolerance (below 1 when everything passed)."""
        ratios = [r.error / r.tolerance for r in self.results if r.tolerance > 0]
        return max(ratios, default=math.inf)

    def _worst_failures(self) -> list[CheckResult]:
        """Return the failed checks, worst (error / tolerance) first; ties keep their order."""
        return sorted(self.failed, key=lambda r: -r.error / r.tolerance if r.tolerance else 0)

    def _summary(self) -> list[str]:
        where = (
            f"{self.loss} loss, {self.backend} {self.dtype}, convention {self.convention}, "
            f"implementation {self.implementation}"
        )
        if not self.results:
            return [f"FAILED: no checks ran ({where})"]
        if self.passed:
            lines = [
                f"PASSED: {len(self.results)} checks ({where}); worst error "
                f"{self.worst:.2g} x its tolerance"
            ]
            if not self.gradients_checked:
                lines.append("  gradients NOT checked: the loss value only")
            return lines
        worst = self._worst_failures()[0]
        lines = [
            f"FAILED: {len(self.failed)} of {len(self.results)} checks ({where})",
            f"  worst: {worst.check} {worst.case} {_quantity_label(worst)}: {worst.message[:120]}",
        ]
        if self.findings:
            lines.append(f"  diagnosis: {', '.join(code for code, _ in self.findings)}")
        lines.append("  report.table() lists every failed check, report.diagnosis explains")
        return lines

    def __str__(self) -> str:
        """Summarise in a few lines: verdict, counts, worst failure, diagnosis codes."""
        return "\n".join(self._summary())

    def __repr__(self) -> str:
        """Summarise in one line: verdict, counts, worst failure, diagnosis codes."""
        return "<Report " + "; ".join(line.strip() for line in self._summary()) + ">"

    def table(self, limit: int | None = None) -> str:
        """Return the full text report: header, notes, verdict, failed checks, diagnosis.

        Parameters
        ----------
        limit : int, optional
            Most failed checks to list, worst first (all by default).
        """
        failed = self._worst_failures()
        lines = [
            f"conformance: {self.implementation}  loss={self.loss} backend={self.backend} "
            f"dtype={self.dtype} convention={self.convention}"
        ]
        lines += [f"  note: {note}" for note in self.notes]
        if self.passed:
            lines.append(
                f"PASSED: {len(self.results)} checks; worst error {self.worst:.2g} x its tolerance"
            )
            return "\n".join(lines)
        lines.append(f"FAILED: {len(failed)} of {len(self.results)} checks")
        shown = failed if limit is None else failed[:limit]
        rows = [("check", "case", "quantity", "error", "tolerance", "what")]
        for result in shown:
            rows.append(
                (
                    result.check,
                    result.case,
                    _quantity_label(result),
                    _error_cell(result),
                    f"{result.tolerance:.1e}",
                    result.message[:80],
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        for row in rows:
            cells = [cell.ljust(width) for cell, width in zip(row[:5], widths, strict=True)]
            lines.append("  " + "  ".join(cells) + "  " + row[5])
        if len(failed) > len(shown):
            lines.append(f"  ... and {len(failed) - len(shown)} more (see --report)")
        lines.append("diagnosis:")
        lines += [f"  {line}" for line in self.diagnosis]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form of the report."""
        return {
            "passed": self.passed,
            "loss": self.loss,
            "backend": self.backend,
            "dtype": self.dtype,
            "convention": self.convention,
            "implementation": self.implementation,
            "gradients_checked": self.gradients_checked,
            "notes": list(self.notes),
            "diagnosis": [{"code": c, "message": m} for c, m in self.findings],
            "results": [
                {**asdict(r), "error": r.error if math.isfinite(r.error) else None}
                for r in self.results
            ],
        }


# --------------------------------------------------------------------------- running f


@dataclass
class Outcome:
    """What an implementation returned on one case, as float64 NumPy values."""

    values: dict[str, Any]  # quantity -> numpy value; gradients missing if not available
    error: str | None = None


def _as_grads(grads: Any) -> dict[str, Any]:
    names = ("img", "txt", "scale", "bias")
    if isinstance(grads, Mapping):
        return {name: grads[name] for name in names}
    if all(hasattr(grads, name) for name in names):
        return {name: getattr(grads, name) for name in names}
    if isinstance(grads, Sequence) and len(grads) == 4:
        return dict(zip(names, grads, strict=True))
    msg = (
        "the implementation returned (loss, grads) but grads is neither a NamedTuple, a "
        f"mapping nor a 4-tuple with img, txt, scale, bias: got {type(grads).__name__}"
    )
    raise TypeError(msg)


def _split(result: Any) -> tuple[Any, dict[str, Any] | None]:
    """Tell a bare loss from ``(loss, grads)``."""
    if isinstance(result, tuple | list) and len(result) == 2:
        return result[0], _as_grads(result[1])
    return result, None


#: Calls abandoned after a timeout (daemon threads that may still be running).
_ABANDONED: list[threading.Thread] = []


def abandoned_calls() -> list[threading.Thread]:
    """Threads of timed-out calls that are still running (they cannot be killed).

    A process that must not wait for them, such as the command line, ends with
    ``os._exit`` when this is not empty.
    """
    return [thread for thread in _ABANDONED if thread.is_alive()]


def describe_exception(error: BaseException) -> str:
    """``"Type: message"`` for an exception escaping the implementation."""
    if isinstance(error, SystemExit):
        return f"SystemExit: {error.code!r} (the implementation called sys.exit)"
    return f"{type(error).__name__}: {error}"


class Runner:
    """Calls an implementation on golden cases in one backend and dtype.

    Every call gets fresh arrays, copied from the (read-only, shared) case, so an
    implementation that writes into its inputs harms only itself. Whatever it raises,
    ``SystemExit`` included, becomes a failed outcome; only ``KeyboardInterrupt`` (Ctrl-C)
    propagates, and only from a call made on the caller's thread.

    With a `timeout` (seconds), each call runs in a daemon thread (in a copy of the
    caller's context variables) and the caller waits that long for it. A thread cannot be
    killed: a call that overruns is abandoned, still running, and every later call of the
    runner fails at once without calling the implementation. Without a timeout the calls run
    on the caller's thread and nothing bounds them.
    """

    def __init__(
        self,
        function: Callable[..., Any],
        backend: str,
        dtype: str,
        timeout: float | None = None,
    ) -> None:
        self.function = function
        self.backend = backend
        self.dtype = dtype
        self.timeout = timeout
        self.timed_out = False
        self.xp, self.dtype_object = load_backend(backend, dtype)
        self.autodiff = backend in ("torch", "jax")
        self.gradients_seen = False
        self.autodiff_used = False
        self.jax_returns_grads: bool | None = None

    def _arrays(self, case_img: Any, case_txt: Any, scale: float, bias: float) -> list[Any]:
        import numpy as np

        xp, dtype = self.xp, self.dtype_object
        # Fresh copies: xp.asarray returns the cached array itself when the dtype matches.
        img, txt = np.array(case_img, copy=True), np.array(case_txt, copy=True)
        if self.backend == "torch":
            import torch

            return [
                torch.tensor(value, dtype=dtype, requires_grad=True)
                for value in (img, txt, scale, bias)
            ]
        return [xp.asarray(value, dtype=dtype) for value in (img, txt, scale, bias)]

    def run(self, img: Any, txt: Any, scale: float, bias: float, **kwargs: Any) -> Outcome:
        """Evaluate the implementation once; what it raises becomes a failed outcome."""
        if self.timed_out:
            return Outcome({}, "not run: an earlier call timed out")
        if self.timeout is None:
            try:
                return self._run(img, txt, scale, bias, **kwargs)
            except KeyboardInterrupt:
                raise
            except BaseException as error:  # SystemExit is a failed check too
                return describe_failure(error)
        box: list[Outcome] = []

        def call() -> None:
            try:
                box.append(self._run(img, txt, scale, bias, **kwargs))
            except BaseException as error:  # no Ctrl-C reaches this thread
                box.append(describe_failure(error))

        context = contextvars.copy_context()
        thread = threading.Thread(
            target=context.run, args=(call,), name="conformance-call", daemon=True
        )
        thread.start()
        thread.join(self.timeout)
        if thread.is_alive():
            _ABANDONED[:] = [*abandoned_calls(), thread]
            self.timed_out = True
            return Outcome({}, f"timeout: no result within {self.timeout:g} s")
        return box[0] if box else Outcome({}, "the call ended without a result")

    def _run(self, img: Any, txt: Any, scale: float, bias: float, **kwargs: Any) -> Outcome:
        args = self._arrays(img, txt, scale, bias)
        if self.backend == "jax":
            return self._run_jax(args, kwargs)
        loss, grads = _split(self.function(*args, **kwargs))
        values: dict[str, Any] = {"loss": to_numpy(loss)}
        if grads is None and self.backend == "torch" and getattr(loss, "requires_grad", False):
            loss.backward()
            self.autodiff_used = True
            grads = {
                name: (arg.grad if arg.grad is not None else None)
                for name, arg in zip(("img", "txt", "scale", "bias"), args, strict=True)
            }
        elif grads is None and self.backend == "torch":
            # The loss does not depend on any input that requires grad: all gradients zero.
            self.autodiff_used = True
            grads = dict.fromkeys(("img", "txt", "scale", "bias"))
        if grads is not None:
            self.gradients_seen = True
            for name, value in grads.items():
                shape = args[("img", "txt", "scale", "bias").index(name)].shape
                values[name] = _zeros(shape) if value is None else to_numpy(value)
        return Outcome(values)

    def _run_jax(self, args: list[Any], kwargs: dict[str, Any]) -> Outcome:
        import jax

        def function(*inputs: Any) -> Any:
            return self.function(*inputs, **kwargs)

        grads: dict[str, Any] | None = None
        if self.jax_returns_grads is not False:
            # First call, or an implementation known to return (loss, grads).
            loss, grads = _split(function(*args))
            self.jax_returns_grads = grads is not None
        if not self.jax_returns_grads:
            # A bare loss: one value_and_grad call gives both (no separate forward call).
            # Not jitted: jit would unroll a blockwise loop into one graph per shape and
            # compile far longer than eager dispatch takes to run it.
            self.autodiff_used = True
            both = jax.value_and_grad(function, argnums=(0, 1, 2, 3))
            loss, auto = both(*args)
            grads = dict(zip(("img", "txt", "scale", "bias"), auto, strict=True))
        self.gradients_seen = True
        values: dict[str, Any] = {"loss": to_numpy(loss)}
        for name, value in (grads or {}).items():
            values[name] = to_numpy(value)
        return Outcome(values)


def describe_failure(error: BaseException) -> Outcome:
    """Return the failed outcome of a call that raised `error`."""
    return Outcome({}, describe_exception(error))


def _zeros(shape: Any) -> Any:
    import numpy as np

    return np.zeros(tuple(shape))


# --------------------------------------------------------------------------- comparing


def natural_scale(case: Case, quantity: str) -> float:
    """Size a quantity of `case` has when nothing cancels, for the absolute floor.

    The loss and the bias gradient are O(1); ``dL/dimg = t G txt`` with rows of ``G``
    summing to O(1) is O(t max|txt|), and likewise for txt; ``dL/dt = sum G * S`` is
    O(max|S|), S = img @ txt.T.
    """
    import numpy as np

    img_max = float(np.max(np.abs(case.img), initial=0.0))
    txt_max = float(np.max(np.abs(case.txt), initial=0.0))
    sizes = {
        "loss": 1.0,
        "bias": 1.0,
        "img": case.scale * txt_max,
        "txt": case.scale * img_max,
        "scale": float(np.max(np.abs(case.img @ case.txt.T), initial=0.0)),
    }
    return max(sizes[quantity], 1e-300)


def tolerance_for(dtype: str, case: Case) -> float:
    """Tolerance of every check on `case` for inputs of `dtype`."""
    return TOLERANCE[dtype] * max(1.0, case.max_abs_logit / LOGIT_SCALE_FREE)


def relative_error(actual: Any, expected: Any, floor: float = FLOOR) -> float:
    """Normwise relative error, absolute below `floor`; ``inf`` if not finite."""
    import numpy as np

    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        return math.inf
    if not np.all(np.isfinite(actual)):
        return math.inf
    scale = max(float(np.max(np.abs(expected), initial=0.0)), floor)
    return float(np.max(np.abs(actual - expected), initial=0.0)) / scale


def _compare(
    check: str, case: Case, outcome: Outcome, expected: dict[str, Any], tolerance: float
) -> list[CheckResult]:
    import numpy as np

    results = []
    for quantity, want in expected.items():
        if outcome.error is not None:
            results.append(
                CheckResult(check, case.name, quantity, math.inf, tolerance, False, outcome.error)
            )
            continue
        if quantity not in outcome.values:
            continue
        got = outcome.values[quantity]
        got_shape = np.shape(got)
        if got_shape != np.shape(want):
            message = f"shape {got_shape}, expected {np.shape(want)}"
            results.append(
                CheckResult(check, case.name, quantity, math.inf, tolerance, False, message)
            )
            continue
        error = relative_error(got, want, FLOOR * natural_scale(case, quantity))
        message = ""
        if not math.isfinite(error):
            message = "non-finite values"
        elif error > tolerance:
            message = f"off by {error:.2e} (tolerance {tolerance:.1e})"
        results.append(
            CheckResult(check, case.name, quantity, error, tolerance, error <= tolerance, message)
        )
    return results


# --------------------------------------------------------------------------- the suite


def _describe(function: Callable[..., Any]) -> str:
    module = getattr(function, "__module__", None) or "?"
    name = getattr(function, "__qualname__", None) or type(function).__name__
    return f"{module}:{name}"


def _takes_block_size(function: Callable[..., Any]) -> bool:
    try:
        return "block_size" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def _invariants(
    runner: Runner,
    cases: Sequence[Case],
    outcomes: dict[str, Outcome],
    dtype: str,
) -> list[CheckResult]:
    import numpy as np

    results: list[CheckResult] = []
    random_cases = [c for c in cases if "random" in c.tags and outcomes[c.name].error is None]
    if not random_cases:
        return results
    case = max(random_cases, key=lambda c: c.n)
    base = outcomes[case.name]
    tolerance = tolerance_for(dtype, case)
    # Permuting the pairs (the same rows of img and txt) permutes the gradients.
    order = np.random.default_rng(0).permutation(case.n)
    permuted = runner.run(case.img[order], case.txt[order], case.scale, case.bias)
    expected = {"loss": base.values["loss"]}
    for name in ("img", "txt"):
        if name in base.values:
            expected[name] = base.values[name][order]
    for name in ("scale", "bias"):
        if name in base.values:
            expected[name] = base.values[name]
    results += _compare("permutation", case, permuted, expected, tolerance)
    # The block size changes nothing, where the implementation takes one.
    if _takes_block_size(runner.function):
        for block_size in (1, 3, case.n - 1, case.n + 5):
            blocked = runner.run(
                case.img, case.txt, case.scale, case.bias, block_size=max(1, block_size)
            )
            expected = {name: value for name, value in base.values.items()}
            for result in _compare("blocks", case, blocked, expected, tolerance):
                results.append(
                    CheckResult(
                        result.check,
                        f"{result.case} (block_size={max(1, block_size)})",
                        result.quantity,
                        result.error,
                        result.tolerance,
                        result.passed,
                        result.message,
                    )
                )
    return results


def check(
    function: Callable[..., Any],
    *,
    loss: str,
    backend: str = "numpy",
    dtype: str = "float64",
    convention: str = "default",
    cases: Iterable[Case] | None = None,
    timeout: float | None = None,
) -> Report:
    """Check an implementation of a contrastive loss against the golden cases.

    Parameters
    ----------
    function : callable
        ``f(img, txt, scale, bias)`` taking arrays of `backend` (scale and bias as 0-d
        arrays; with torch, leaves that require grad) and returning the loss or
        ``(loss, grads)``.
    loss : {"sigmoid", "softmax"}
        Which loss it claims to compute.
    backend : {"numpy", "torch", "jax", "cupy", "array_api_strict"}
        Array library to call it with.
    dtype : {"float64", "float32", "float16", "bfloat16"}
        Dtype of the inputs.
    convention : {"default", "mean", "sum"}
        Normalisation the implementation declares: this library's (sum over pairs / n),
        the mean over n^2 pairs, or the plain sum. Under "mean" and "sum" the goldens are
        rescaled accordingly.
    cases : iterable of Case, optional
        Subset of the golden cases (all by default).
    timeout : float, optional
        Seconds each call of `function` may take (each case, and each call of the
        invariants). By default nothing bounds them. With a timeout each call runs in a
        daemon thread; one that overruns fails as ``"timeout"``, is abandoned (a thread
        cannot be killed, so it may go on running in this process) and no later call is
        made: the remaining checks fail as ``"not run"``.

    Returns
    -------
    Report
        ``report.passed``, the per-check ``report.results``, ``report.codes`` and
        ``report.diagnosis`` naming known mistakes.

    Raises
    ------
    ValueError
        On an unknown `loss` or `convention`, or a `timeout` that is not positive.
    portable_siglip._interop.UsageError
        If the backend is not installed or lacks the dtype.

    Examples
    --------
    >>> import portable_siglip as ps
    >>> from portable_siglip.conformance import check
    >>> check(ps.sigmoid_loss_and_grad, loss="sigmoid").passed
    True
    """
    if loss not in ("sigmoid", "softmax"):
        msg = f"`loss` must be 'sigmoid' or 'softmax', got {loss!r}"
        raise ValueError(msg)
    if convention not in CONVENTIONS:
        msg = f"`convention` must be one of {tuple(CONVENTIONS)}, got {convention!r}"
        raise ValueError(msg)
    if dtype not in TOLERANCE:
        msg = f"`dtype` must be one of {tuple(TOLERANCE)}, got {dtype!r}"
        raise ValueError(msg)
    if timeout is not None and not timeout > 0:
        msg = f"`timeout` must be a positive number of seconds or None, got {timeout!r}"
        raise ValueError(msg)
    selected = tuple(load_cases() if cases is None else cases)
    runner = Runner(function, backend, dtype, timeout)
    report = Report(loss, backend, dtype, convention, _describe(function))
    outcomes: dict[str, Outcome] = {}
    for case in selected:
        outcome = runner.run(case.img, case.txt, case.scale, case.bias)
        outcomes[case.name] = outcome
        factor = CONVENTIONS[convention](case.n)
        golden = case.goldens[loss]
        expected = {q: getattr(golden, q) * factor for q in QUANTITIES}
        report.results += _compare("golden", case, outcome, expected, tolerance_for(dtype, case))
    report.results += _invariants(runner, selected, outcomes, dtype)
    report.gradients_checked = runner.gradients_seen
    if runner.timed_out:
        late = next(r for r in report.results if r.message.startswith("timeout"))
        report.notes.append(
            f"timeout: the call for the {late.check} check of {late.case} gave no result "
            f"within {timeout} s; it was abandoned (it may still be running) and no later "
            "call was made"
        )
    if runner.autodiff_used:
        report.notes.append(f"gradients taken by {backend} autodiff of the returned loss")
    if not runner.gradients_seen and any(o.error is None for o in outcomes.values()):
        report.notes.append(
            f"gradients NOT checked: the implementation returned a loss only and {backend} "
            "has no autodiff; return (loss, grads) to have them checked"
        )
    from ._diagnose import diagnose

    report.findings = diagnose(report, loss, selected, outcomes, convention)
    return report
