"""What a conformance run produces: check results, the report, tolerances and errors.

Shared by the runner (:mod:`._checks`), which fills a :class:`Report`, and the diagnosis
(:mod:`._diagnose`), which reads one; neither imports the other's machinery through here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from types import MappingProxyType
from typing import Any

from ._cases import Case

__all__ = [
    "CONVENTIONS",
    "FLOOR",
    "HALF_DTYPES",
    "LOGIT_SCALE_FREE",
    "QUANTITIES",
    "RULE_FACTOR",
    "RULE_FLOOR",
    "TOLERANCE",
    "UNDECIDABLE_NAIVE",
    "CheckResult",
    "Outcome",
    "Report",
    "case_error",
    "check_bound",
    "compare",
    "natural_scale",
    "off_by",
    "relative_error",
    "rule_bound",
    "tolerance_for",
    "undecidable_reason",
    "verdict",
]

QUANTITIES = ("loss", "img", "txt", "scale", "bias")

#: Normwise relative tolerance per dtype of the inputs:
#: ``max|actual - golden| / max(max|golden|, floor) <= TOLERANCE[dtype] * logit_factor``.
#: float64 leaves ~10^6 ulps for summation order. float32 allows 1e-3: a float32 softmax
#: scale gradient is a sum of n^2 terms that cancel (sum(G) = 0), and G = P - I loses eps
#: to cancellation where P_ii is near 1, so correct float32 code reaches a few 1e-4. The
#: mistakes the suite looks for are O(1) relative errors, far above every tolerance.
#: float16 and bfloat16 cover gradients rounded to the half dtype (2^-11, 2^-8) by code
#: that accumulates in float32, with room for code that keeps half-precision logits; they
#: bound the invariants, the ids runs and the golden checks whose naive reference is not
#: finite. The other golden checks of a half run follow FlashAttention's rule (`rule_bound`).
#: Read-only: the suite's verdicts mean what docs/conformance.md says only with these.
TOLERANCE: Mapping[str, float] = MappingProxyType(
    {"float64": 1e-9, "float32": 1e-3, "float16": 1e-2, "bfloat16": 5e-2}
)

#: The dtypes whose golden checks follow FlashAttention's rule instead of `TOLERANCE`: each
#: check's error must be at most ``RULE_FACTOR`` times the error of a naive dense loss run in
#: the same dtype on the same inputs (:mod:`._naive`), plus ``RULE_FLOOR[dtype]``
#: (docs/conformance.md, "Half precision: FlashAttention's rule").
HALF_DTYPES = ("float16", "bfloat16")

#: How much worse than the naive reference a half-precision implementation may be.
RULE_FACTOR = 2.0

#: The rule's small absolute floor, in units of the normwise relative error: one ulp of the
#: dtype at 1 (2^-10 for float16, 2^-7 for bfloat16), what returning a correctly computed
#: value in the half dtype may cost where the naive reference happens to be exact.
RULE_FLOOR = {"float16": 2.0**-10, "bfloat16": 2.0**-7}

#: A half-precision golden check cannot be decided where the naive reference's normwise
#: relative error reaches this: a plain loss in that dtype is then off by as much as the
#: quantity itself, so the rule's bound (2 x that + floor) accepts a result of any sign and
#: about any size. Such a check within its bound is ``undecidable``, not passed; beyond it,
#: it still fails. The other undecidable check is a feature gradient whose golden value
#: underflows the dtype (:func:`undecidable_reason`).
UNDECIDABLE_NAIVE = 1.0

#: The smallest positive normal number of each half dtype: below it a value underflows.
_SMALLEST_NORMAL = {"float16": 2.0**-14, "bfloat16": 2.0**-126}

#: A quantity is compared absolutely below this fraction of its natural scale (see
#: :func:`natural_scale`): saturated cases have gradients of 1e-4 that any float32 code
#: only gets right to ~eps in absolute terms.
FLOOR = 1e-3

#: Logits are rounded to the dtype before anything else, costing ``eps * |Z|`` absolute:
#: the tolerance grows with the largest logit of the case beyond this size.
LOGIT_SCALE_FREE = 100.0

#: Declared normalisations and the factor that maps this library's loss onto them. Read-only
#: data, not an extension point: the diagnosis explains a loss off by a power of n in terms
#: of these three, and the command line offers them.
CONVENTIONS: Mapping[str, Callable[[int], float]] = MappingProxyType(
    {
        "default": lambda n: 1.0,  # sum over pairs / n (sigmoid); mean over rows (softmax)
        "mean": lambda n: 1.0 / n,  # mean over the n^2 pairs
        "sum": lambda n: float(n),  # sum over pairs, not normalised
    }
)


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
    naive : float or None
        In a float16 or bfloat16 run, the error of the naive reference on the same check
        (a dense loss computed in the run's dtype, :mod:`._naive`), from which `tolerance`
        is derived; ``inf`` where that reference is not finite (the dtype's fixed
        tolerance applies then). None in float32 and float64 runs.
    undecidable : bool
        Whether the run's dtype cannot decide the check (a half-precision check whose naive
        reference is off by as much as the quantity, or a feature gradient that underflows
        the dtype) and the result was within its bound: neither passed nor failed;
        `message` says why. A result beyond its bound fails, decidable or not.

    Examples
    --------
    >>> import portable_siglip as ps
    >>> from portable_siglip.conformance import check, load_cases
    >>> tiny = [case for case in load_cases() if "tiny" in case.tags]
    >>> result = check(ps.sigmoid_loss_and_grad, loss="sigmoid", cases=tiny).results[0]
    >>> result.check, result.case, result.quantity, result.passed
    ('golden', 'n1-d1', 'loss', True)
    >>> result.error <= result.tolerance, result.tolerance
    (True, 1e-09)
    """

    check: str
    case: str
    quantity: str
    error: float
    tolerance: float
    passed: bool
    message: str = ""
    naive: float | None = None
    undecidable: bool = False

    @property
    def failed(self) -> bool:
        """Whether the check failed: neither passed nor undecidable."""
        return not self.passed and not self.undecidable

    @property
    def status(self) -> str:
        """``"passed"``, ``"failed"`` or ``"undecidable"``."""
        if self.undecidable:
            return "undecidable"
        return "passed" if self.passed else "failed"


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


def _naive_cell(result: CheckResult) -> str:
    """Fill the naive column: the naive reference's error of a half-precision check."""
    if result.naive is None:
        return ""
    return f"{result.naive:.2e}" if math.isfinite(result.naive) else "non-finite"


def _columns(rows: Sequence[tuple[str, ...]], last: int) -> list[str]:
    """Lay out `rows` in columns, the cells after the first `last` ones unpadded."""
    widths = [max(len(row[i]) for row in rows) for i in range(last)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:last], widths, strict=True)]
        lines.append("  " + "  ".join([*cells, *row[last:]]).rstrip())
    return lines


def _group_failures(failed: list[CheckResult]) -> list[list[CheckResult]]:
    """Group failed checks that fail for one and the same reason, in order of first sight.

    A failure whose message carries no number (an exception, a timeout, a check not run,
    non-finite values) and repeats is one group, printed once; every "off by" failure, and
    every shape message, stays a row of its own.
    """
    groups: dict[str, list[CheckResult]] = {}
    order: list[list[CheckResult]] = []
    for result in failed:
        if math.isfinite(result.error) or not result.message or result.message.startswith("shape"):
            order.append([result])
            continue
        if result.message not in groups:
            groups[result.message] = []
            order.append(groups[result.message])
        groups[result.message].append(result)
    return order


@dataclass
class Report:
    """Verdict on one implementation for one loss, backend and dtype.

    ``print(report)`` gives a few lines: the verdict, the counts, the worst failure and the
    diagnosis codes. :meth:`table` gives the full text the command line prints, with every
    failed check; :meth:`to_dict` everything, JSON-ready.

    Examples
    --------
    A loss that forgets to divide the sum over pairs by n (numpy has no autodiff, so a
    bare loss is checked for its value only):

    >>> import portable_siglip as ps
    >>> from portable_siglip.conformance import check, load_cases
    >>> small = [case for case in load_cases() if "large" not in case.tags]
    >>> def summed(img, txt, scale, bias):
    ...     return img.shape[0] * ps.sigmoid_loss(img, txt, scale, bias)
    >>> report = check(summed, loss="sigmoid", cases=small)
    >>> report.passed, report.codes, report.gradients_checked
    (False, {'unnormalised-sum'}, False)
    >>> worst = report.failed[0]
    >>> worst.case, worst.quantity, worst.message
    ('identity-4', 'loss', 'off by 3.00e+00 (tolerance 1.0e-09)')
    >>> report.to_dict()["diagnosis"][0]["code"]
    'unnormalised-sum'

    Declared as what it computes, it passes:

    >>> check(summed, loss="sigmoid", cases=small, convention="sum").passed
    True
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
    #: Exceptions the implementation raised: ``{"message", "traceback", "cases"}`` each,
    #: one per distinct message, the traceback of its first occurrence.
    exceptions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Whether no check failed: every one passed, or was undecidable in this dtype.

        At least one check must have passed: a run whose every check is undecidable (or
        that ran none) did not pass.
        """
        return not self.failed and any(result.passed for result in self.results)

    @property
    def failed(self) -> list[CheckResult]:
        """The checks that failed."""
        return [result for result in self.results if result.failed]

    @property
    def undecidable(self) -> list[CheckResult]:
        """The checks the run's dtype could not decide (see :class:`CheckResult`)."""
        return [result for result in self.results if result.undecidable]

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
        decided = [r for r in self.results if not r.undecidable]
        ratios = [r.error / r.tolerance for r in decided if r.tolerance > 0]
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
                f"PASSED: {self._counts()} ({where}); worst error {self.worst:.2g} x its tolerance"
            ]
            if self.undecidable:
                lines.append(
                    f"  {len(self.undecidable)} checks undecidable in {self.dtype}: "
                    "report.table() says which and why"
                )
            if not self.gradients_checked:
                lines.append("  gradients NOT checked: the loss value only")
            return lines
        if not self.failed:
            return [f"FAILED: every check was undecidable in {self.dtype} ({where})"]
        worst = self._worst_failures()[0]
        lines = [
            f"FAILED: {len(self.failed)} of {self._counts()} ({where})",
            f"  worst: {worst.check} {worst.case} {_quantity_label(worst)}: {worst.message[:120]}",
        ]
        if self.findings:
            lines.append(f"  diagnosis: {', '.join(code for code, _ in self.findings)}")
        lines.append("  report.table() lists every failed check, report.diagnosis explains")
        return lines

    def _counts(self) -> str:
        """Say how many checks ran, and how many of them were undecidable."""
        undecidable = len(self.undecidable)
        extra = f", {undecidable} undecidable" if undecidable else ""
        return f"{len(self.results)} checks{extra}"

    def _undecidable_lines(self) -> list[str]:
        """List the undecidable checks, one line per reason with the checks it covers."""
        if not self.undecidable:
            return []
        reasons: dict[str, list[str]] = {}
        for r in self.undecidable:  # grouped by reason, each check with its own figure
            reason, _, figure = r.message.rpartition(" (")
            label = f"{r.check} {r.case} {_quantity_label(r)} ({figure}"
            reasons.setdefault(reason or r.message, []).append(label)
        lines = [f"undecidable in {self.dtype} ({len(self.undecidable)} checks):"]
        for reason, checks in reasons.items():
            lines.append(f"  {reason}:")
            lines += [f"    {label}" for label in checks[:8]]
            if len(checks) > 8:
                lines.append(f"    ... and {len(checks) - 8} more (see --report)")
        return lines

    def __str__(self) -> str:
        """Summarise in a few lines: verdict, counts, worst failure, diagnosis codes."""
        return "\n".join(self._summary())

    def __repr__(self) -> str:
        """Summarise in one line: verdict, counts, worst failure, diagnosis codes."""
        return "<Report " + "; ".join(line.strip() for line in self._summary()) + ">"

    @property
    def half_rule(self) -> bool:
        """Whether the golden checks were judged by FlashAttention's rule (half precision)."""
        return any(result.naive is not None for result in self.results)

    def rule_table(self) -> list[str]:
        """Return, for a half-precision run, each quantity's check nearest its bound.

        One row per quantity: the golden check with the largest error / bound, its error,
        the naive reference's error and the bound (``2 x naive + floor``, or the fixed
        tolerance where the naive reference is not finite). Empty for other runs.
        """
        judged = [r for r in self.results if r.naive is not None and not r.undecidable]
        if not judged:
            return []
        rows = [("quantity", "case", "error", "naive", "bound", "error/bound")]
        for quantity in QUANTITIES:
            mine = [r for r in judged if r.quantity == quantity]
            if not mine:
                continue
            worst = max(mine, key=lambda r: r.error / r.tolerance if r.tolerance else math.inf)
            ratio = worst.error / worst.tolerance if worst.tolerance else math.inf
            rows.append(
                (
                    _quantity_label(worst),
                    worst.case,
                    _error_cell(worst),
                    _naive_cell(worst),
                    f"{worst.tolerance:.2e}",
                    f"{ratio:.2f}",
                )
            )
        lines = [
            f"half precision: error <= 2 x naive {self.dtype} loss's error + floor; per "
            "quantity, the check nearest its bound:"
        ]
        return lines + _columns(rows, len(rows[0]))

    def table(self, limit: int | None = None) -> str:
        """Return the full text report: header, notes, verdict, failed checks, diagnosis.

        In a half-precision run the failed checks show the naive reference's error beside
        their bound, and :meth:`rule_table` follows the verdict.

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
            lines.append(f"PASSED: {self._counts()}; worst error {self.worst:.2g} x its tolerance")
            lines += self.rule_table() + self._undecidable_lines()
            return "\n".join(lines)
        lines.append(f"FAILED: {len(failed)} of {self._counts()}")
        groups = _group_failures(failed)
        shown = groups if limit is None else groups[:limit]
        half = self.half_rule
        header = ("check", "case", "quantity", "error", "bound" if half else "tolerance")
        rows = [(*header, "naive", "what") if half else (*header, "what")]
        for group in shown:
            first = group[0]
            if len(group) == 1:
                cells = (
                    first.check,
                    first.case,
                    _quantity_label(first),
                    _error_cell(first),
                    f"{first.tolerance:.1e}",
                )
                naive = (_naive_cell(first),) if half else ()
                rows.append((*cells, *naive, first.message[:80]))
                continue
            cases = list(dict.fromkeys(r.case for r in group))
            quantities = list(dict.fromkeys(_quantity_label(r) for r in group))
            cells = (
                ",".join(dict.fromkeys(r.check for r in group)),
                f"{len(cases)} cases",
                "all" if len(quantities) == len(QUANTITIES) else ",".join(quantities),
                _error_cell(first),
                "",
            )
            message = f"{first.message[:160]} ({len(group)} checks, on: {', '.join(cases)})"
            rows.append((*cells, *(("",) if half else ()), message))
        lines += _columns(rows, len(rows[0]) - 1)
        hidden = sum(len(group) for group in groups[len(shown) :])
        if hidden:
            lines.append(f"  ... and {hidden} more (see --report)")
        lines += self.rule_table() + self._undecidable_lines()
        lines.append("diagnosis:")
        lines += [f"  {line}" for line in self.diagnosis]
        for exception in self.exceptions:
            if exception.get("traceback"):
                lines.append(
                    f"traceback of {exception['message'][:120]} (first raised on "
                    f"{exception['cases'][0]}):"
                )
                lines += [f"  {line}" for line in exception["traceback"].rstrip().splitlines()]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form of the report."""
        return {
            "passed": self.passed,
            "checks": len(self.results),
            "failed": len(self.failed),
            "undecidable": len(self.undecidable),
            "loss": self.loss,
            "backend": self.backend,
            "dtype": self.dtype,
            "convention": self.convention,
            "implementation": self.implementation,
            "gradients_checked": self.gradients_checked,
            "notes": list(self.notes),
            "diagnosis": [{"code": c, "message": m} for c, m in self.findings],
            "exceptions": [dict(exception) for exception in self.exceptions],
            "results": [
                {
                    **asdict(r),
                    "status": r.status,
                    "error": r.error if math.isfinite(r.error) else None,
                    "naive": r.naive if r.naive is None or math.isfinite(r.naive) else None,
                }
                for r in self.results
            ],
        }


@dataclass
class Outcome:
    """What an implementation returned on one case, as float64 NumPy values."""

    values: dict[str, Any]  # quantity -> numpy value; gradients missing if not available
    error: str | None = None
    traceback: str | None = None  # of the exception behind `error`, when one was raised


#: ``max |img @ txt.T|`` per case, by ``id`` (with the case, so that a reused id misses).
_MAX_SIMS: dict[int, tuple[Case, float]] = {}


def natural_scale(case: Case, quantity: str) -> float:
    """Size a quantity of `case` has when nothing cancels, for the absolute floor.

    The loss and the bias gradient are O(1); ``dL/dimg = t G txt`` with rows of ``G``
    summing to O(1) is O(t max|txt|), and likewise for txt; ``dL/dt = sum G * S`` is
    O(max|S|), S = img @ txt.T. Only the size asked for is computed, and ``max|S|`` (an
    (n, d) @ (d, n) product) once per case.
    """
    import numpy as np

    if quantity in ("loss", "bias"):
        size = 1.0
    elif quantity == "img":
        size = case.scale * float(np.max(np.abs(case.txt), initial=0.0))
    elif quantity == "txt":
        size = case.scale * float(np.max(np.abs(case.img), initial=0.0))
    elif quantity == "scale":
        cached = _MAX_SIMS.get(id(case))
        if cached is None or cached[0] is not case:
            if len(_MAX_SIMS) >= 256:  # cases made on the fly: keep none of them alive long
                _MAX_SIMS.clear()
            sims = case.img @ case.txt.T  # (n, d) @ (d, n) -> (n, n)
            cached = _MAX_SIMS[id(case)] = (case, float(np.max(np.abs(sims), initial=0.0)))
        size = cached[1]
    else:
        raise KeyError(quantity)
    return max(size, 1e-300)


def tolerance_for(dtype: str, case: Case) -> float:
    """Tolerance of every check on `case` for inputs of `dtype`."""
    return TOLERANCE[dtype] * max(1.0, case.max_abs_logit / LOGIT_SCALE_FREE)


def rule_bound(naive_error: float, dtype: str) -> float:
    """Return the bound of a half-precision check whose naive reference is off by `naive_error`.

    ``RULE_FACTOR * naive_error + RULE_FLOOR[dtype]``; ``inf`` for a non-finite naive error
    (the check then falls back to the dtype's fixed tolerance, :func:`tolerance_for`).

    Examples
    --------
    >>> rule_bound(0.01, "bfloat16") == 0.02 + 2**-7
    True
    """
    if not math.isfinite(naive_error):
        return math.inf
    return RULE_FACTOR * naive_error + RULE_FLOOR[dtype]


def check_bound(
    tolerance: float, naive: Mapping[str, float] | None, quantity: str, dtype: str
) -> tuple[float, float | None]:
    """Return the bound of one check and the naive reference's error behind it (or None).

    Without `naive` (float32, float64, the invariants) the bound is `tolerance`. In a
    half-precision golden check it is FlashAttention's :func:`rule_bound`, or `tolerance`
    where the naive reference is not finite.
    """
    if naive is None:
        return tolerance, None
    bound = rule_bound(naive[quantity], dtype)
    return (bound if math.isfinite(bound) else tolerance), naive[quantity]


def off_by(error: float, bound: float, naive: float | None) -> str:
    """Return the message of a finite error above its bound."""
    if naive is None:
        return f"off by {error:.2e} (tolerance {bound:.1e})"
    if not math.isfinite(naive):
        return f"off by {error:.2e} (tolerance {bound:.1e}: the naive reference is not finite)"
    return f"off by {error:.2e} (bound {bound:.2e} = 2 x the naive reference's {naive:.2e} + floor)"


def case_error(actual: Any, expected: Any, case: Case, quantity: str) -> float:
    """Return :func:`relative_error` of `quantity` of `case`, absolute below its floor.

    The floor is :data:`FLOOR` times the quantity's :func:`natural_scale`.
    """
    return relative_error(actual, expected, FLOOR * natural_scale(case, quantity))


def verdict(
    check: str,
    label: str,
    quantity: str,
    error: float,
    bound: float,
    naive: float | None = None,
    where: str = "",
) -> CheckResult:
    """Return the result of a check whose `error` had to be at most `bound`.

    The message says what went wrong (non-finite values, or :func:`off_by`), prefixed by
    `where` (``"rank 1: "``); `naive` is the naive reference's error behind `bound`.
    """
    message = ""
    if not math.isfinite(error):
        message = f"{where}non-finite values"
    elif error > bound:
        message = where + off_by(error, bound, naive)
    return CheckResult(check, label, quantity, error, bound, error <= bound, message, naive)


def compare(
    check: str,
    label: str,
    case: Case,
    quantity: str,
    got: Any,
    want: Any,
    bound: float,
    naive: float | None = None,
    dtype: str = "",
) -> CheckResult:
    """Return the result of `got` against `want`, the `quantity` of `case`, within `bound`.

    `got` is one value, or a list of one value per rank of which the worst counts (its
    message names the rank). A value of another shape than `want` fails with both shapes.
    In a half-precision golden check (`naive` given, `dtype` float16 or bfloat16), a result
    within its bound that the dtype cannot decide is undecidable (:func:`undecidable_reason`).
    """
    import numpy as np

    if isinstance(got, list):
        errors = [case_error(value, want, case, quantity) for value in got]
        rank = max(range(len(errors)), key=lambda r: errors[r])
        result = verdict(check, label, quantity, errors[rank], bound, naive, f"rank {rank}: ")
    elif np.shape(got) != np.shape(want):
        message = f"shape {np.shape(got)}, expected {np.shape(want)}"
        return CheckResult(check, label, quantity, math.inf, bound, False, message, naive)
    else:
        error = case_error(got, want, case, quantity)
        result = verdict(check, label, quantity, error, bound, naive)
    reason = undecidable_reason(naive, want, quantity, dtype) if result.passed else ""
    if reason:
        return replace(result, passed=False, undecidable=True, message=reason)
    return result


def undecidable_reason(naive: float | None, want: Any, quantity: str, dtype: str) -> str:
    """Say why `dtype` cannot decide a golden check of `quantity` (empty if it can).

    Only a half-precision check judged by FlashAttention's rule (a finite `naive`) can be
    undecidable: where the naive reference's error reaches :data:`UNDECIDABLE_NAIVE` (the
    dtype computes the quantity no better than its own size), or where `want`, a feature
    gradient, is not zero but below the dtype's smallest normal number (it underflows).

    Examples
    --------
    >>> undecidable_reason(1.5, 0.0, "bias", "bfloat16")[-17:]
    '(naive error 1.5)'
    >>> undecidable_reason(0.01, [1e-9, 0.0], "img", "float16")[-15:]
    '(largest 1e-09)'
    >>> undecidable_reason(0.01, [0.5, 0.0], "img", "float16")
    ''
    """
    import numpy as np

    if naive is None or dtype not in HALF_DTYPES or not math.isfinite(naive):
        return ""
    if naive >= UNDECIDABLE_NAIVE:
        return (
            f"a naive {dtype} loss is off by as much as the quantity itself: {dtype} cannot "
            f"tell a right value from a wrong one here (naive error {naive:.2g})"
        )
    if quantity in ("img", "txt"):
        largest = float(np.max(np.abs(np.asarray(want, dtype=np.float64)), initial=0.0))
        tiny = _SMALLEST_NORMAL[dtype]
        if 0.0 < largest < tiny:
            return (
                f"the gradient underflows {dtype}: its golden entries are below the smallest "
                f"normal number {tiny:.2g} (largest {largest:.2g})"
            )
    return ""


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
