"""Name the mistake behind failed checks, where the evidence is clear.

Each hypothesis predicts what a specific mistake would return on every case (computed
densely in float64 from the case's inputs, or read off the goldens) and is reported only
when the implementation matches that prediction wherever it failed, and the prediction
differs from the golden there. The codes are stable; docs/conformance.md lists them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from portable_siglip._reference import dense_logit_gradient

from ._cases import Case
from ._report import CONVENTIONS, Outcome, Report, relative_error, tolerance_for

__all__ = ["diagnose"]

#: Loss findings that also scale the gradient by the same factor.
NORMALISATION = {"mean-over-pairs", "unnormalised-sum", "sum-of-directions"}

#: Block sizes a dropped or mishandled tail block is looked for with.
BLOCKS = (2, 4, 8, 16, 32, 64)

Finding = tuple[str, str]


def _dense_loss(loss: str, case: Case, *, scale: float, bias: float, signs: str = "") -> float:
    """Evaluate the loss of `case` with altered scale, bias or labels, densely in float64."""
    import numpy as np

    n = case.n
    with np.errstate(over="ignore", invalid="ignore"):
        logits = scale * (case.img @ case.txt.T) + bias  # (n, d) @ (d, n) -> (n, n)
        if signs == "all-negative":  # every pair, the positives too, labelled -1
            return float(np.logaddexp(0.0, logits).sum() / n)
        if signs == "flipped":  # +1 off the diagonal, -1 on it
            eye = np.eye(n)
            return float(np.logaddexp(0.0, (2.0 * eye - 1.0) * logits).sum() / n)
        value, _, _ = dense_logit_gradient(loss, case.img, case.txt, scale, bias)
        return value


def _exp(x: float) -> float:
    """exp(x), infinite where float64 overflows (the hypothesis then gives no evidence)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _loss_hypotheses(loss: str) -> list[tuple[str, str, Callable[[Case, float], float]]]:
    """``(code, explanation, predicted loss)`` for mistakes visible in the loss value."""

    def golden(case: Case, f: float) -> float:
        return case.goldens[loss].loss * f

    hypotheses = [
        (
            "mean-over-pairs",
            "the loss is n times too small: it averages over the n^2 pairs instead of "
            "summing them and dividing by n (cf. big_vision #115); if that is your "
            "declared convention, pass --convention mean",
            lambda case, f: golden(case, f) / case.n,
        ),
        (
            "unnormalised-sum",
            "the loss is n times too large: the sum over pairs is not divided by n; if "
            "that is your declared convention, pass --convention sum",
            lambda case, f: golden(case, f) * case.n,
        ),
        (
            "scale-as-log",
            "the loss matches exp(scale) used as the multiplier: `scale` is t itself "
            "(already exp(t')), do not exponentiate it again",
            lambda case, f: f * _dense_loss(loss, case, scale=_exp(case.scale), bias=case.bias),
        ),
    ]
    if loss == "sigmoid":
        hypotheses += [
            (
                "bias-sign",
                "the loss matches Z = t S - b: the sign of the bias is flipped",
                lambda case, f: f * _dense_loss(loss, case, scale=case.scale, bias=-case.bias),
            ),
            (
                "labels",
                "the loss matches every pair labelled -1: the positives on the diagonal "
                "are treated as negatives (labels should be 2 I - 1)",
                lambda case, f: (
                    f
                    * _dense_loss(
                        loss, case, scale=case.scale, bias=case.bias, signs="all-negative"
                    )
                ),
            ),
            (
                "labels",
                "the loss matches labels +1 off the diagonal and -1 on it: the labels are "
                "negated (they should be 2 I - 1)",
                lambda case, f: (
                    f * _dense_loss(loss, case, scale=case.scale, bias=case.bias, signs="flipped")
                ),
            ),
        ]
    else:
        hypotheses += [
            (
                "one-direction",
                "the loss matches the image-to-text cross-entropy alone: the symmetric "
                "loss is the mean of both directions (rows and columns)",
                lambda case, f: f * case.goldens[loss].extra["image_to_text"],
            ),
            (
                "one-direction",
                "the loss matches the text-to-image cross-entropy alone: the symmetric "
                "loss is the mean of both directions (rows and columns)",
                lambda case, f: f * case.goldens[loss].extra["text_to_image"],
            ),
            (
                "sum-of-directions",
                "the loss is twice the golden: the two directional cross-entropies are "
                "summed instead of averaged",
                lambda case, f: 2 * golden(case, f),
            ),
        ]
    return hypotheses


def _failed_cases(report: Report, quantities: Sequence[str]) -> set[str]:
    return {
        r.case
        for r in report.results
        if r.check == "golden" and not r.passed and r.quantity in quantities
    }


def _matches(
    cases: Sequence[Case],
    outcomes: dict[str, Outcome],
    predict: Callable[[Case], Any],
    get: Callable[[Outcome], Any],
    tolerance: Callable[[Case], float],
    golden: Callable[[Case], Any],
) -> bool:
    """Whether the implementation equals the prediction wherever the prediction is distinct.

    A case counts as evidence only where the prediction differs from the golden (on a
    symmetric case a transposed gradient *is* the golden); every such case must match,
    within a window of a few tolerances (capped at 10%), and there must be at least one.
    """
    import numpy as np

    seen = False
    for case in cases:
        outcome = outcomes[case.name]
        if outcome.error is not None:
            return False
        value = get(outcome)
        if value is None:
            return False
        predicted = predict(case)
        if not np.all(np.isfinite(np.asarray(predicted, dtype=np.float64))):
            continue  # the hypothesis itself overflows here: no evidence either way
        window = min(3 * tolerance(case), 0.1)
        if relative_error(predicted, golden(case)) <= window:
            continue  # indistinguishable from the right answer on this case
        if relative_error(value, predicted) > window:
            return False
        seen = True
    return seen


def _diagnose_loss(
    report: Report, loss: str, cases: Sequence[Case], outcomes: dict[str, Outcome], factor: Any
) -> list[Finding]:
    failed = _failed_cases(report, ["loss"])
    relevant = [
        c
        for c in cases
        if c.name in failed
        and outcomes[c.name].error is None
        and math.isfinite(relative_error(outcomes[c.name].values["loss"], 0.0))
    ]
    if not relevant:
        return []
    findings: list[Finding] = []

    def tolerance(case: Case) -> float:
        return tolerance_for(report.dtype, case)

    for code, text, predict in _loss_hypotheses(loss):
        if code in {c for c, _ in findings}:
            continue
        if _matches(
            relevant,
            outcomes,
            lambda case, p=predict: p(case, factor(case)),  # type: ignore[misc]
            lambda outcome: outcome.values.get("loss"),
            tolerance,
            lambda case: case.goldens[loss].loss * factor(case),
        ):
            findings.append((code, text))
    return findings


#: Largest x with finite exp(x) per dtype; a naive exp of a larger logit overflows.
EXP_LIMIT = {"float64": 709.78, "float32": 88.72, "float16": 11.09, "bfloat16": 88.72}


def _diagnose_non_finite(
    cases: Sequence[Case], outcomes: dict[str, Outcome], dtype: str
) -> list[Finding]:
    import numpy as np

    def bad(case: Case) -> bool:
        outcome = outcomes[case.name]
        if outcome.error is not None:
            return "overflow" in outcome.error.lower()
        return any(not np.all(np.isfinite(v)) for v in outcome.values.values())

    broken = [c for c in cases if bad(c)]
    limit = EXP_LIMIT[dtype]
    if broken and all(c.max_abs_logit > limit for c in broken):
        names = ", ".join(c.name for c in broken)
        return [
            (
                "non-finite-stress",
                f"non-finite output only where logits exceed {limit} ({names}), where a naive "
                f"exp overflows {dtype}: use logaddexp(0, x) for softplus and subtract the "
                "max before exp in a log-sum-exp",
            )
        ]
    return []


def _diagnose_tail_block(report: Report, cases: Sequence[Case]) -> list[Finding]:
    failing = {r.case for r in report.results if r.check == "golden" and not r.passed}
    passing = [c for c in cases if c.name not in failing]
    broken = [c for c in cases if c.name in failing]
    if not broken or not passing:
        return []
    for block in BLOCKS:
        # A chunk clamped to the batch (min(block, n)) gets every n < block right.
        if (
            all(c.n % block != 0 for c in broken)
            and any(c.n > block for c in broken)
            and all(c.n % block == 0 or c.n < block for c in passing)
        ):
            sizes = ", ".join(str(n) for n in sorted({c.n for c in broken}))
            return [
                (
                    "tail-block",
                    f"fails only when n is not a multiple of {block} (n = {sizes}) and passes "
                    f"when it is: a last, shorter block of {block} is dropped or mishandled",
                )
            ]
    return []


def _diagnose_gradients(
    report: Report, loss: str, cases: Sequence[Case], outcomes: dict[str, Outcome], factor: Any
) -> list[Finding]:
    import numpy as np

    if not report.gradients_checked:
        return []
    findings: list[Finding] = []

    def tolerance(case: Case) -> float:
        return tolerance_for(report.dtype, case)

    def golden(name: str) -> Callable[[Case], Any]:
        return lambda case: getattr(case.goldens[loss], name) * factor(case)

    for name, code in (("scale", "zero-scale-grad"), ("bias", "zero-bias-grad")):
        if loss == "softmax" and name == "bias":
            continue
        failed = [c for c in cases if c.name in _failed_cases(report, [name])]
        failed = [c for c in failed if outcomes[c.name].error is None]
        if failed and all(
            name in outcomes[c.name].values and float(outcomes[c.name].values[name]) == 0.0
            for c in failed
        ):
            findings.append(
                (
                    code,
                    f"the gradient of `{name}` is zero where it should not be: `{name}` is "
                    "detached from the graph or its gradient is never accumulated",
                )
            )
    failed = [c for c in cases if c.name in _failed_cases(report, ["img", "txt"])]
    failed = [c for c in failed if outcomes[c.name].error is None]
    if not failed:
        return findings

    def transposed(name: str) -> Callable[[Case], Any]:
        def predict(case: Case) -> Any:
            _, dlogits, _ = dense_logit_gradient(loss, case.img, case.txt, case.scale, case.bias)
            if name == "img":  # t G^T txt instead of t G txt
                return case.scale * dlogits.T @ case.txt * factor(case)
            return case.scale * dlogits @ case.img * factor(case)

        return predict

    def values(name: str) -> Callable[[Outcome], Any]:
        return lambda outcome: outcome.values.get(name)

    def both(predict_img: Any, predict_txt: Any) -> bool:
        return _matches(
            failed, outcomes, predict_img, values("img"), tolerance, golden("img")
        ) and _matches(failed, outcomes, predict_txt, values("txt"), tolerance, golden("txt"))

    if both(transposed("img"), transposed("txt")) or both(golden("txt"), golden("img")):
        findings.append(
            (
                "transposed-gradient",
                "grads.img and grads.txt match t G^T txt and t G img (or each other's "
                "goldens): the gradient uses G^T where it needs G, or swaps the two",
            )
        )
    elif both(lambda c: -golden("img")(c), lambda c: -golden("txt")(c)):
        findings.append(("gradient-sign", "the gradients have the wrong sign (ascent direction)"))
    else:
        ratios: list[float] = []
        for case in failed:
            got = np.concatenate([outcomes[case.name].values[q].ravel() for q in ("img", "txt")])
            want = np.concatenate([golden(q)(case).ravel() for q in ("img", "txt")])
            denominator = float(want @ want)
            if denominator == 0 or not np.all(np.isfinite(got)):
                ratios = []
                break
            ratio = float(got @ want) / denominator
            if relative_error(got, ratio * want) > 10 * tolerance(case):
                ratios = []
                break
            ratios.append(ratio)
        if ratios:
            sizes = [case.n for case in failed]
            candidates = (
                (f"times {ratios[0]:.6g}", ratios),
                ("divided by n", [r * n for r, n in zip(ratios, sizes, strict=True)]),
                ("times n", [r / n for r, n in zip(ratios, sizes, strict=True)]),
            )
            for label, factors in candidates:
                if max(factors) - min(factors) <= 1e-3 * max(abs(v) for v in factors):
                    findings.append(
                        (
                            "gradient-factor",
                            f"grads.img and grads.txt are the goldens {label} on every failed "
                            "case: the gradient is normalised differently from the loss",
                        )
                    )
                    break
    return findings


def diagnose(
    report: Report,
    loss: str,
    cases: Sequence[Case],
    outcomes: dict[str, Outcome],
    convention: str,
) -> list[Finding]:
    """Return ``(code, explanation)`` for every known mistake the failures show.

    Parameters
    ----------
    report : Report
        The checks already run.
    loss : {"sigmoid", "softmax"}
        The loss under test.
    cases : sequence of Case
        The cases that were run.
    outcomes : dict
        What the implementation returned on each case, by case name.
    convention : str
        The declared normalisation (the goldens were rescaled by it).

    Returns
    -------
    list of (str, str)
        Findings; empty when everything passed or no known pattern fits.
    """
    if report.passed:
        return []
    scale = CONVENTIONS[convention]

    def factor(case: Case) -> float:
        return scale(case.n)

    findings = _diagnose_non_finite(cases, outcomes, report.dtype)
    findings += _diagnose_loss(report, loss, cases, outcomes, factor)
    gradient_findings = _diagnose_gradients(report, loss, cases, outcomes, factor)
    if {code for code, _ in findings} & NORMALISATION:
        # The gradient follows the loss's own (wrong) normalisation: already explained.
        gradient_findings = [f for f in gradient_findings if f[0] != "gradient-factor"]
    findings += gradient_findings
    if "scale-as-log" in {code for code, _ in findings}:
        # exp(scale) overflows by itself on large scales: not a naive softplus or lse.
        findings = [f for f in findings if f[0] != "non-finite-stress"]
    if not findings or {code for code, _ in findings} <= {"zero-scale-grad", "zero-bias-grad"}:
        findings += _diagnose_tail_block(report, cases)
    if not findings:
        findings.append(
            (
                "unknown",
                "no known mistake fits these failures; the table lists every failed check",
            )
        )
    return findings
