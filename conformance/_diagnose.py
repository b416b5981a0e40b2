"""Name the mistake behind failed checks, where the evidence is clear.

Each hypothesis predicts what a specific mistake would return on every case (computed
densely in float64 from the case's inputs, or read off the goldens) and is reported only
when the implementation matches that prediction wherever it failed, and the prediction
differs from the golden there. The codes are stable; docs/conformance.md lists them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from portable_siglip import _registry as registry
from portable_siglip._reference import dense_logit_gradient

from ._cases import Case
from ._naive import LOGIT_ORDERS, naive_values, round_half
from ._report import (
    CONVENTIONS,
    QUANTITIES,
    Outcome,
    Report,
    case_error,
    relative_error,
    tolerance_for,
)

__all__ = ["diagnose"]

#: Loss findings that also scale the gradient by the same factor.
NORMALISATION = {"mean-over-pairs", "unnormalised-sum", "sum-of-directions"}

#: Block sizes a dropped or mishandled tail block is looked for with.
BLOCKS = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

#: Limits at which clamped logits are looked for (``Z.clamp(-c, c)`` or ``max=c``).
CLAMPS = (5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 80.0, 88.0, 100.0)


def _clip(values: Any, low: float, high: float) -> Any:
    import numpy as np

    return np.clip(values, low, high)


Finding = tuple[str, str]


def _dense_loss(loss: str, case: Case, *, scale: float, bias: float, signs: str = "") -> float:
    """Evaluate the loss of `case` with altered scale, bias or labels, densely in float64."""
    import numpy as np

    n = case.n
    with np.errstate(over="ignore", invalid="ignore"):
        logits = scale * _sims(case) + bias  # (n, n)
        if signs == "all-negative":  # every pair, the positives too, labelled -1
            return float(np.logaddexp(0.0, logits).sum() / n)
        if signs == "flipped":  # +1 off the diagonal, -1 on it
            eye = np.eye(n)
            return float(np.logaddexp(0.0, (2.0 * eye - 1.0) * logits).sum() / n)
        if signs == "zero-one":  # labels eye(n): -log sigmoid(0) = log 2 off the diagonal
            return float(np.logaddexp(0.0, -np.eye(n) * logits).sum() / n)
        return _logit_loss(loss, logits)


#: ``img @ txt.T`` per case during one diagnosis (the large cases make it costly).
_SIMS: dict[tuple[int, bool], tuple[Case, Any]] = {}


def _sims(case: Case, *, normalise: bool = False) -> Any:
    """``img @ txt.T`` of `case` in float64 (rows L2-normalised first if asked), cached."""
    import numpy as np

    key = (id(case), normalise)
    if key not in _SIMS or _SIMS[key][0] is not case:
        img, txt = case.img, case.txt
        if normalise:  # as torch's F.normalize: norms below 1e-12 count as 1e-12
            img = img / np.maximum(np.linalg.norm(img, axis=1, keepdims=True), 1e-12)
            txt = txt / np.maximum(np.linalg.norm(txt, axis=1, keepdims=True), 1e-12)
        _SIMS[key] = (case, img @ txt.T)  # (n, d) @ (d, n) -> (n, n)
    return _SIMS[key][1]


def _stored(case: Case, loss: str, quantity: str, value: Any) -> Any:
    """Return the part of a predicted (n, d) gradient that the golden holds (large cases)."""
    stored = getattr(case.goldens[loss], "stored", None)
    return value if stored is None else stored(quantity, value, case.n)


def _exp(x: float) -> float:
    """exp(x), infinite where float64 overflows (the hypothesis then gives no evidence)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _sigmoid_logit_loss(logits: Any, smoothing: float = 0.0) -> float:
    """SigLIP's loss of `logits` (default convention), densely in float64; no smoothing."""
    import numpy as np

    n = logits.shape[0]
    return float(np.logaddexp(0.0, (1.0 - 2.0 * np.eye(n)) * logits).sum() / n)


def _softmax_logit_loss(logits: Any, smoothing: float = 0.0) -> float:
    """CLIP's loss of `logits` (default convention), densely in float64.

    `smoothing` is a label smoothing: each direction's cross-entropy becomes
    ``(1 - eps) CE + eps * mean_j(-log p_j)``, as torch's ``label_smoothing`` computes it.
    """
    import numpy as np

    total = 0.0
    for z in (logits, logits.T):  # rows: image to text; columns: text to image
        top = z.max(axis=1, keepdims=True)
        log_probs = z - (top + np.log(np.exp(z - top).sum(axis=1, keepdims=True)))
        cross_entropy = -np.mean(np.diagonal(log_probs))
        uniform = -np.mean(log_probs)  # mean over rows and classes of -log p
        total += (1.0 - smoothing) * cross_entropy + smoothing * uniform
    return total / 2.0


#: The suite's own dense float64 formula of each loss it diagnoses, from the logits. A loss
#: without one gets none of the diagnoses that recompute the loss (scale misread, clamps).
_LOGIT_LOSSES: dict[str, Callable[..., float]] = {
    "sigmoid": _sigmoid_logit_loss,
    "softmax": _softmax_logit_loss,
}


def _logit_loss(loss: str, logits: Any, smoothing: float = 0.0) -> float:
    """Return the loss (default convention) of `logits`, densely in float64."""
    return _LOGIT_LOSSES[loss](logits, smoothing)


def _logits(case: Case, *, normalise: bool = False) -> Any:
    """``t * img @ txt.T + b`` of `case` in float64, from L2-normalised rows if asked."""
    return case.scale * _sims(case, normalise=normalise) + case.bias  # (n, n)


#: What each convention computes, and its power of n relative to the default.
_CONVENTION_TEXT = {
    "default": "the sum over pairs divided by n",
    "mean": "the mean over the n^2 pairs",
    "sum": "the sum over pairs, not divided by n",
}
_CONVENTION_POWER = {"default": 0, "mean": -1, "sum": 1}


def _normalisation_text(convention: str, power: int) -> str:
    """Explain a loss n^power times the goldens of the declared `convention`.

    The advice follows from the measured normalisation (the declared one's power of n plus
    `power`): it names the convention the implementation does compute, if any, so that
    following it makes the run pass; it never points back to the declared one.
    """
    size = "small" if power < 0 else "large"
    text = f"the loss is n times too {size} for convention {convention} "
    text += f"({_CONVENTION_TEXT[convention]})"
    if convention == "default" and power < 0:
        text += (
            ": it averages over the n^2 pairs instead of summing them and dividing by n "
            "(cf. big_vision #115)"
        )
    elif convention == "default":
        text += ": the sum over pairs is not divided by n"
    measured = _CONVENTION_POWER[convention] + power
    match = [name for name, p in _CONVENTION_POWER.items() if p == measured]
    if match:
        text += (
            f"; it is {_CONVENTION_TEXT[match[0]]}: if that is what you mean, pass "
            f"--convention {match[0]}"
        )
    return text


#: ``(code, explanation, the loss the mistake predicts for a case and convention factor)``.
Hypothesis = tuple[str, str, Callable[[Case, float], float]]


def _loss_hypotheses(loss: str, convention: str = "default") -> list[Hypothesis]:
    """``(code, explanation, predicted loss)`` for mistakes visible in the loss value."""

    def golden(case: Case, f: float) -> float:
        return case.goldens[loss].loss * f

    hypotheses: list[Hypothesis] = [
        (
            "mean-over-pairs",
            _normalisation_text(convention, -1),
            lambda case, f: golden(case, f) / case.n,
        ),
        (
            "unnormalised-sum",
            _normalisation_text(convention, +1),
            lambda case, f: golden(case, f) * case.n,
        ),
    ]
    if loss in _LOGIT_LOSSES:  # the mistakes that recompute the loss need its formula
        hypotheses += _input_hypotheses(loss)
        for limit in CLAMPS:
            hypotheses += _clamp_hypotheses(loss, limit, golden)
    mistakes = _LOSS_MISTAKES.get(loss)
    return hypotheses + ([] if mistakes is None else mistakes(golden))


def _input_hypotheses(loss: str) -> list[Hypothesis]:
    """Mistakes in how the inputs enter the logits: scale misread, features renormalised."""
    return [
        (
            "scale-as-log",
            "the loss matches exp(scale) used as the multiplier: `scale` is t itself "
            "(already exp(t')), do not exponentiate it again",
            lambda case, f: f * _dense_loss(loss, case, scale=_exp(case.scale), bias=case.bias),
        ),
        (
            "scale-as-temperature",
            "the loss matches Z = S / t + b: `scale` is a multiplier, not a temperature; "
            "compute Z = scale * img @ txt.T + bias (CLIP's t = exp(logit_scale) ~ 100 "
            "multiplies the similarities)",
            lambda case, f: (
                f * _dense_loss(loss, case, scale=1.0 / case.scale, bias=case.bias)
                if case.scale != 0
                else math.inf
            ),
        ),
        (
            "renormalised-inputs",
            "the loss matches img and txt L2-normalised inside the loss: normalise the "
            "features in the model if you want that, the loss must use img and txt as given",
            lambda case, f: f * _logit_loss(loss, _logits(case, normalise=True)),
        ),
    ]


def _clamp_hypotheses(
    loss: str, limit: float, golden: Callable[[Case, float], float]
) -> list[Hypothesis]:
    """Logits clamped to [-limit, limit], or above at limit (the golden where none is)."""
    advice = (
        "clamping Z changes the loss and zeroes the gradient of every clamped pair; use a "
        "stable softplus / log-sum-exp instead (logaddexp, max-subtraction)"
    )

    def clamped(low: float) -> Callable[[Case, float], float]:
        def predict(case: Case, f: float) -> float:
            if case.max_abs_logit <= limit:
                return golden(case, f)
            return f * _logit_loss(loss, _clip(_logits(case), low, limit))

        return predict

    return [
        (
            "clamped-logits",
            f"the loss matches the logits clamped to [-{limit:g}, {limit:g}]: {advice}",
            clamped(-limit),
        ),
        (
            "clamped-logits",
            f"the loss matches the logits clamped above at {limit:g} (Z.clamp(max=...)): " + advice,
            clamped(-math.inf),
        ),
    ]


def _sigmoid_hypotheses(_golden: Callable[[Case, float], float]) -> list[Hypothesis]:
    """Sigmoid mistakes: the bias's sign or absence, the labels (without the golden)."""
    return [
        (
            "bias-sign",
            "the loss matches Z = t S - b: the sign of the bias is flipped",
            lambda case, f: f * _dense_loss("sigmoid", case, scale=case.scale, bias=-case.bias),
        ),
        (
            "labels",
            "the loss matches every pair labelled -1: the positives on the diagonal "
            "are treated as negatives (labels should be 2 I - 1)",
            lambda case, f: (
                f
                * _dense_loss(
                    "sigmoid", case, scale=case.scale, bias=case.bias, signs="all-negative"
                )
            ),
        ),
        (
            "labels",
            "the loss matches labels +1 off the diagonal and -1 on it: the labels are "
            "negated (they should be 2 I - 1)",
            lambda case, f: (
                f * _dense_loss("sigmoid", case, scale=case.scale, bias=case.bias, signs="flipped")
            ),
        ),
        (
            "missing-bias",
            "the loss matches the bias missing from the logits (Z = t * img @ txt.T, as if "
            "b = 0): `bias` is taken but never added, so the loss is off wherever b != 0 and "
            "dL/db is zero because b is not in the graph at all (not merely detached); "
            "compute Z = t * img @ txt.T + b",
            lambda case, f: f * _dense_loss("sigmoid", case, scale=case.scale, bias=0.0),
        ),
        (
            "zero-one-labels",
            "the loss matches labels eye(n) (0/1, as in a binary cross-entropy) instead of "
            "2 * eye(n) - 1: every negative pair contributes -log sigmoid(0) = log 2, a "
            "constant with no gradient, so the negatives are never pushed apart; SigLIP's "
            "-log_sigmoid(labels * logits) needs labels +1 on the diagonal and -1 elsewhere",
            lambda case, f: (
                f * _dense_loss("sigmoid", case, scale=case.scale, bias=case.bias, signs="zero-one")
            ),
        ),
    ]


def _softmax_hypotheses(golden: Callable[[Case, float], float]) -> list[Hypothesis]:
    """Softmax mistakes: one direction only, or both summed."""

    def direction(name: str) -> Callable[[Case, float], float]:
        return lambda case, f: f * case.goldens["softmax"].extra[name]

    return [
        (
            "one-direction",
            "the loss matches the image-to-text cross-entropy alone: the symmetric "
            "loss is the mean of both directions (rows and columns)",
            direction("image_to_text"),
        ),
        (
            "one-direction",
            "the loss matches the text-to-image cross-entropy alone: the symmetric "
            "loss is the mean of both directions (rows and columns)",
            direction("text_to_image"),
        ),
        (
            "sum-of-directions",
            "the loss is twice the golden: the two directional cross-entropies are "
            "summed instead of averaged",
            lambda case, f: 2 * golden(case, f),
        ),
    ]


#: The mistakes particular to each loss, given the golden loss of a case and convention.
_LOSS_MISTAKES: dict[str, Callable[[Callable[[Case, float], float]], list[Hypothesis]]] = {
    "sigmoid": _sigmoid_hypotheses,
    "softmax": _softmax_hypotheses,
}


def _failed_cases(report: Report, quantities: Sequence[str]) -> set[str]:
    return {
        r.case
        for r in report.results
        if r.check == "golden" and r.failed and r.quantity in quantities
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
    report: Report,
    loss: str,
    cases: Sequence[Case],
    outcomes: dict[str, Outcome],
    factor: Any,
    convention: str = "default",
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

    for code, text, predict in _loss_hypotheses(loss, convention):
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
    if loss == "softmax" and not findings:
        findings += _diagnose_label_smoothing(relevant, outcomes, factor, tolerance)
    return findings


def _diagnose_label_smoothing(
    cases: Sequence[Case],
    outcomes: dict[str, Outcome],
    factor: Any,
    tolerance: Callable[[Case], float],
) -> list[Finding]:
    """Label smoothing: the loss is ``(1 - eps) CE + eps U``, with one eps on every case.

    eps is solved for on each failed case from the loss alone (U is the mean of -log p over
    every row and class); a smoothing must give one eps in (0, 1) everywhere, and the loss
    it predicts must then match.
    """
    import numpy as np

    estimates = []
    for case in cases:
        logits = _logits(case)
        plain = _logit_loss("softmax", logits) * factor(case)
        uniform = _logit_loss("softmax", logits, smoothing=1.0) * factor(case)
        got = float(np.asarray(outcomes[case.name].values["loss"], dtype=np.float64).sum())
        if abs(uniform - plain) <= 10 * tolerance(case) * max(abs(plain), 1.0):
            continue  # smoothing would change nothing visible here
        estimates.append((got - plain) / (uniform - plain))
    if not estimates:
        return []
    eps = float(np.median(estimates))
    if not 0.0 < eps < 1.0 or max(abs(e - eps) for e in estimates) > 1e-3 * eps:
        return []
    if not _matches(
        cases,
        outcomes,
        lambda case: _logit_loss("softmax", _logits(case), smoothing=eps) * factor(case),
        lambda outcome: outcome.values.get("loss"),
        tolerance,
        lambda case: case.goldens["softmax"].loss * factor(case),
    ):
        return []
    return [
        (
            "label-smoothing",
            f"the loss matches cross-entropy with label smoothing {eps:.3g}: the contract "
            "has one-hot targets; drop label_smoothing (or smooth outside the loss, and "
            "check the loss without it)",
        )
    ]


#: Largest x with finite exp(x) per dtype; a naive exp of a larger logit overflows.
EXP_LIMIT = {"float64": 709.78, "float32": 88.72, "float16": 11.09, "bfloat16": 88.72}


def _diagnose_non_finite(
    cases: Sequence[Case], outcomes: dict[str, Outcome], dtype: str
) -> tuple[list[Finding], set[str]]:
    """Name non-finite output exactly where a naive ``exp`` overflows.

    Returns the finding, and the cases it explains (every case whose logits exceed the
    limit). In a float64 run, float32's limit is tried after float64's: a float64 run that breaks
    where logits exceed 88.7 computes in float32 somewhere, and overflows there.
    """
    import numpy as np

    def bad(case: Case) -> bool:
        outcome = outcomes[case.name]
        if outcome.error is not None:
            return "overflow" in outcome.error.lower()
        return any(not np.all(np.isfinite(v)) for v in outcome.values.values())

    broken = [c for c in cases if bad(c)]
    if not broken:
        return [], set()
    candidates = [dtype] + (["float32"] if dtype == "float64" else [])
    for overflowing in candidates:
        limit = EXP_LIMIT[overflowing]
        if all(c.max_abs_logit > limit for c in broken):
            names = ", ".join(c.name for c in broken)
            text = (
                f"non-finite output only where logits exceed {limit} ({names}), where a naive "
                f"exp overflows {overflowing}"
            )
            if overflowing != dtype:
                text += f" (this {dtype} run computes in {overflowing} somewhere)"
            text += (
                ": use logaddexp(0, x) for softplus and subtract the max before exp in a "
                "log-sum-exp"
            )
            explained = {c.name for c in cases if c.max_abs_logit > limit}
            return [("non-finite-stress", text)], explained
    return [], set()


def _diagnose_tail_block(report: Report, cases: Sequence[Case]) -> list[Finding]:
    """Find a dropped or mishandled last block: failures exactly on the cases with a tail.

    For some block size, every case with n > block and n not a multiple of it fails (at
    least two such sizes: one failing n is a coincidence, not evidence), every failure is
    such a case or one smaller than a block (a chunk of ``block`` rows that is not clamped
    to the batch gets those wrong too), and some n > block that is a multiple passes.
    """
    failing = {r.case for r in report.results if r.check == "golden" and r.failed}
    passing = [c for c in cases if c.name not in failing]
    broken = [c for c in cases if c.name in failing]
    if not broken or not passing:
        return []
    for block in BLOCKS:
        tails = {c.n for c in broken if c.n > block}
        if (
            all(c.n % block != 0 for c in broken)
            and len(tails) >= 2
            and all(c.n % block == 0 or c.n < block for c in passing)
            and any(c.n > block and c.n % block == 0 for c in passing)
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
    """Find the mistakes the gradients show: a zero scale or bias gradient, or wrong features'."""
    if not report.gradients_checked:
        return []
    findings = _diagnose_zero_gradients(report, loss, cases, outcomes)
    failed = [c for c in cases if c.name in _failed_cases(report, ["img", "txt"])]
    failed = [c for c in failed if outcomes[c.name].error is None]
    if failed:
        findings += _diagnose_feature_gradients(report, loss, failed, outcomes, factor)
    return findings


def _diagnose_zero_gradients(
    report: Report, loss: str, cases: Sequence[Case], outcomes: dict[str, Outcome]
) -> list[Finding]:
    """Find a scale (or bias) gradient that is zero on every case where it fails.

    The bias only where it changes the loss: where it cancels (softmax) its gradient is 0.
    """
    findings: list[Finding] = []
    names = ("scale", "bias") if registry.get(loss).uses_bias else ("scale",)
    for name in names:
        failed = [c for c in cases if c.name in _failed_cases(report, [name])]
        failed = [c for c in failed if outcomes[c.name].error is None]
        if failed and all(
            name in outcomes[c.name].values and float(outcomes[c.name].values[name]) == 0.0
            for c in failed
        ):
            findings.append(
                (
                    f"zero-{name}-grad",
                    f"the gradient of `{name}` is zero where it should not be: `{name}` is "
                    "detached from the graph or its gradient is never accumulated",
                )
            )
    return findings


def _diagnose_feature_gradients(
    report: Report, loss: str, failed: Sequence[Case], outcomes: dict[str, Outcome], factor: Any
) -> list[Finding]:
    """Tell transposed, negated or rescaled features' gradients on the `failed` cases."""

    def tolerance(case: Case) -> float:
        return tolerance_for(report.dtype, case)

    def golden(name: str) -> Callable[[Case], Any]:
        return lambda case: getattr(case.goldens[loss], name) * factor(case)

    def transposed(name: str) -> Callable[[Case], Any]:
        def predict(case: Case) -> Any:
            _, dlogits, _ = dense_logit_gradient(loss, case.img, case.txt, case.scale, case.bias)
            if name == "img":  # t G^T txt instead of t G txt
                value = case.scale * dlogits.T @ case.txt * factor(case)
            else:
                value = case.scale * dlogits @ case.img * factor(case)
            return _stored(case, loss, name, value)

        return predict

    def both(predict_img: Any, predict_txt: Any) -> bool:
        return all(
            _matches(failed, outcomes, predict, _value(name), tolerance, golden(name))
            for name, predict in (("img", predict_img), ("txt", predict_txt))
        )

    if both(transposed("img"), transposed("txt")) or both(golden("txt"), golden("img")):
        return [
            (
                "transposed-gradient",
                "grads.img and grads.txt match t G^T txt and t G img (or each other's "
                "goldens): the gradient uses G^T where it needs G, or swaps the two",
            )
        ]
    if both(lambda c: -golden("img")(c), lambda c: -golden("txt")(c)):
        return [("gradient-sign", "the gradients have the wrong sign (ascent direction)")]
    ratios = _gradient_ratios(failed, outcomes, golden, tolerance)
    label = _gradient_factor(ratios, [case.n for case in failed]) if ratios else None
    if label is None:
        return []
    return [
        (
            "gradient-factor",
            f"grads.img and grads.txt are the goldens {label} on every failed "
            "case: the gradient is normalised differently from the loss",
        )
    ]


def _value(name: str) -> Callable[[Outcome], Any]:
    """Return the getter of quantity `name` of an outcome (None where it is missing)."""
    return lambda outcome: outcome.values.get(name)


def _gradient_ratios(
    failed: Sequence[Case],
    outcomes: dict[str, Outcome],
    golden: Callable[[str], Callable[[Case], Any]],
    tolerance: Callable[[Case], float],
) -> list[float]:
    """Return, per failed case, the factor between the features' gradients and the goldens.

    Empty unless on every case the gradients are that factor times the goldens.
    """
    import numpy as np

    ratios: list[float] = []
    for case in failed:
        got = np.concatenate([outcomes[case.name].values[q].ravel() for q in ("img", "txt")])
        want = np.concatenate([golden(q)(case).ravel() for q in ("img", "txt")])
        denominator = float(want @ want)
        if denominator == 0 or not np.all(np.isfinite(got)):
            return []
        ratio = float(got @ want) / denominator
        if relative_error(got, ratio * want) > 10 * tolerance(case):
            return []
        ratios.append(ratio)
    return ratios


def _gradient_factor(ratios: Sequence[float], sizes: Sequence[int]) -> str | None:
    """Name what the per-case `ratios` of cases of `sizes` pairs have in common, if anything.

    ``"times 2"``, ``"divided by n"`` or ``"times n"``; None for a factor of 1 (no
    normalisation mistake: see :func:`_diagnose_precision`) or ratios that agree on none.
    """
    if all(abs(r - 1.0) <= 0.05 for r in ratios):
        return None
    candidates: list[tuple[str, list[float]]] = [
        (f"times {ratios[0]:.6g}", list(ratios)),
        ("divided by n", [r * n for r, n in zip(ratios, sizes, strict=True)]),
        ("times n", [r / n for r, n in zip(ratios, sizes, strict=True)]),
    ]
    if len(set(sizes)) < 2:
        candidates = candidates[:1]  # one n cannot tell "times n" from a constant
    for label, factors in candidates:
        if max(factors) - min(factors) <= 1e-3 * max(abs(v) for v in factors):
            return label
    return None


#: Messages of the runner's own backward pass on a loss that is not a scalar.
NOT_SCALAR = ("only for scalar outputs", "only supported for scalar", "scalar output")


def _diagnose_per_row(
    loss: str, cases: Sequence[Case], outcomes: dict[str, Outcome], factor: Any
) -> list[Finding]:
    """Find a vector of per-row (or per-pair) losses returned where a scalar is due."""
    import numpy as np

    shapes = set()
    means = sums = True
    for case in cases:
        outcome = outcomes[case.name]
        if outcome.error is not None:
            if any(text in outcome.error for text in NOT_SCALAR):
                shapes.add("non-scalar")
                means = sums = False
                continue
            return []
        value = outcome.values.get("loss")
        if value is None or np.ndim(value) == 0:
            return []
        shapes.add(str(np.shape(value)).replace(str(case.n), "n"))
        vector = np.asarray(value, dtype=np.float64)
        want = case.goldens[loss].loss * factor(case)
        means &= relative_error(vector.mean(), want) < 1e-3
        sums &= relative_error(vector.sum(), want) < 1e-3
    if not shapes:
        return []
    hint = ""
    if means:
        hint = " (their mean is the loss)"
    elif sums:
        hint = " (their sum is the loss)"
    measured = sorted(shapes - {"non-scalar"})
    shown = f"shape {', '.join(measured)}" if measured else "autodiff of it failed"
    if "non-scalar" in shapes and measured:
        shown += ", and autodiff of it failed"
    return [
        (
            "per-row-loss",
            f"the loss is not a scalar ({shown}): one value per row or pair{hint}, as "
            "with reduction='none' or a missing .sum()/.mean(); return the scalar loss",
        )
    ]


def _own_frames(text: str) -> str:
    """Drop the frames of the suite's runner from a traceback: the implementation's remain."""
    runner = str(Path(__file__).with_name("_checks.py"))
    lines, skipping = [], False
    for line in text.splitlines():
        if line.startswith("  File "):
            skipping = f'"{runner}"' in line
        elif not line.startswith("    "):
            skipping = False
        if not skipping:
            lines.append(line)
    return "\n".join(lines) + ("\n" if lines else "")


#: Errors that are the runner's, not an exception raised by the implementation.
NOT_RAISED = ("timeout", "not run", "the call ended")


def _diagnose_raised(
    report: Report, cases: Sequence[Case], outcomes: dict[str, Outcome]
) -> list[Finding]:
    """One finding per distinct exception, with the cases it was raised on.

    Fills ``report.exceptions`` (message, traceback once, cases) for the table and JSON.
    """
    groups: dict[str, list[Case]] = {}
    for case in cases:
        error = outcomes[case.name].error
        if error is None or error.startswith(NOT_RAISED):
            continue
        if any(text in error for text in NOT_SCALAR):
            continue  # the runner's backward of a per-row loss: see _diagnose_per_row
        groups.setdefault(error, []).append(case)
    findings: list[Finding] = []
    for message, raised in sorted(groups.items(), key=lambda item: -len(item[1])):
        first = outcomes[raised[0].name]
        report.exceptions.append(
            {
                "message": message,
                "traceback": _own_frames(first.traceback or ""),
                "cases": [case.name for case in raised],
            }
        )
        if len(raised) == len(cases):
            where = f"every case ({len(cases)})"
        else:
            names = ", ".join(case.name for case in raised[:6])
            more = f" and {len(raised) - 6} more" if len(raised) > 6 else ""
            where = f"{len(raised)} of {len(cases)} cases ({names}{more})"
        findings.append(
            (
                "raises",
                f"the implementation raised {message[:300]} on {where}; the traceback is "
                "printed once below the diagnosis (and in --report)",
            )
        )
    return findings


#: Pairs whose softplus argument exceeds this are linear in torch's ``F.softplus``.
SOFTPLUS_THRESHOLD = 20.0

#: Where a sigmoid loss applies a softplus that is linear above the threshold, and what
#: the finding says of it: to each pair's argument ``-l_ij Z_ij`` (``"argument"``), or to
#: the logits themselves, the positives then recovered as ``softplus(z) - z``
#: (``"logits"``, open_clip's chunked ``SigLipLoss``).
_SOFTPLUS_PLACES = {
    "argument": (
        "the results match a softplus that is linear above 20 (softplus(x) = x for "
        "x > 20), which is what torch's F.softplus does with its default threshold=20: "
        "it costs up to exp(-20) ~ 2e-9 per pair, invisible in float32 but beyond "
        "float64's 1e-9 tolerance; use -F.logsigmoid(-x) or logaddexp(0, x)"
    ),
    "logits": (
        "the results match F.softplus(Z).sum() minus the positives' logits, with torch's "
        "F.softplus linear above its default threshold=20 applied to Z itself, as open_clip's "
        "chunked SigLipLoss (chunk_size > 0, _chunked_loss) computes: a positive with "
        "z > 20 costs softplus(z) - z = 0 instead of log1p(exp(-z)) ~ e^-z and gets a "
        "gradient of exactly 0 instead of -sigmoid(-z), a negative with z > 20 costs z; up "
        "to exp(-20) ~ 2e-9 per pair, invisible in float32 but beyond float64's 1e-9 "
        "tolerance; use softplus(-l * z) = -F.logsigmoid(l * z) per pair, or "
        "F.softplus(z, threshold=40) in float64"
    ),
}


def _softplus_threshold_prediction(case: Case, place: str) -> tuple[float, Any]:
    """Return the sigmoid loss and dL/dZ of `case` with a thresholded softplus at `place`.

    Densely in float64, default convention; `place` is a key of :data:`_SOFTPLUS_PLACES`.
    """
    import numpy as np

    n, eye = case.n, np.eye(case.n)
    logits = case.scale * _sims(case) + case.bias  # (n, n)
    signs = 1.0 - 2.0 * eye  # -l_ij
    x = signs * logits if place == "argument" else logits
    linear = x > SOFTPLUS_THRESHOLD
    with np.errstate(over="ignore"):
        value = float(np.where(linear, x, np.logaddexp(0.0, x)).sum())
        slope = np.where(linear, 1.0, np.exp(-np.logaddexp(0.0, -x)))  # sigmoid(x)
    if place == "argument":
        return value / n, signs * slope / n
    # softplus(z) - z on the diagonal: the positives' logits are subtracted.
    return (value - float(np.trace(logits))) / n, (slope - eye) / n


def _diagnose_softplus_threshold(
    report: Report, cases: Sequence[Case], outcomes: dict[str, Outcome], factor: Any
) -> list[Finding]:
    """Sigmoid loss with softplus(x) = x above x = 20 (torch's ``F.softplus`` default).

    Applied to each pair's ``-l_ij Z_ij``, or to Z itself with the positives' logits
    subtracted (open_clip's chunked ``SigLipLoss``): the two differ on the positives with
    z > 20. The loss and gradients are predicted exactly, densely in float64; every quantity
    of every failed case must match one prediction to a tenth of the tolerance.
    """
    failed = _failed_cases(report, QUANTITIES)
    failed_cases = [c for c in cases if c.name in failed]
    if not failed_cases or any(outcomes[c.name].error is not None for c in failed_cases):
        return []
    for place, text in _SOFTPLUS_PLACES.items():
        if all(
            _matches_softplus_threshold(report, case, outcomes[case.name], factor, place)
            for case in failed_cases
        ):
            return [("softplus-threshold", text)]
    return []


def _matches_softplus_threshold(
    report: Report, case: Case, outcome: Outcome, factor: Any, place: str
) -> bool:
    """Whether every quantity of `outcome` is the thresholded softplus's at `place`."""
    value, dlogits = _softplus_threshold_prediction(case, place)
    f = factor(case)
    predicted = {
        "loss": value * f,
        "img": _stored(case, "sigmoid", "img", case.scale * dlogits @ case.txt * f),
        "txt": _stored(case, "sigmoid", "txt", case.scale * dlogits.T @ case.img * f),
        "scale": float((dlogits * _sims(case)).sum()) * f,
        "bias": float(dlogits.sum()) * f,
    }
    tolerance = tolerance_for(report.dtype, case)
    return all(
        case_error(outcome.values[name], want, case, name) <= 0.1 * tolerance
        for name, want in predicted.items()
        if name in outcome.values
    )


#: Half dtypes whose running sums are simulated, and the largest finite value of each.
HALF_MAX = {"float16": 65504.0, "bfloat16": 3.3895313892515355e38}

#: ``(the order of a running sum, whether the rows' (columns') sums are added in the half
#: dtype too)``: the accumulation orders of per-pair terms a half-precision accumulator is
#: predicted with.
HALF_ORDERS = (("row", True), ("column", True), ("row", False), ("column", False))

#: Tile sizes of a tiled loss whose running total of tile sums is in the half dtype (square
#: tiles, visited row by row or column by column; float32 inside each tile).
HALF_TILES = (16, 32, 64, 128, 256, 512, 1024)

#: ``(case name, dtype, order)`` -> the per-row (or per-column) sums of one diagnosis, in float32.
_HALF_SUMS: dict[tuple[str, str, str], Any] = {}

#: ``(case name, dtype)`` -> ``{(tile order, tile size): loss}`` of one diagnosis.
_HALF_TILE_LOSSES: dict[tuple[str, str], dict[tuple[str, int], float]] = {}


def _sigmoid_terms(case: Case) -> Any:
    """Return the n^2 per-pair terms ``softplus(-l_ij Z_ij)`` of `case`, in float64."""
    import numpy as np

    return np.logaddexp(0.0, (1.0 - 2.0 * np.eye(case.n)) * _logits(case))  # (n, n)


def _half_partial_sums(case: Case, dtype: str, order: str) -> Any:
    """Return the running sums in `dtype` of the sigmoid terms of each row (or column).

    Each per-pair term ``softplus(-l_ij Z_ij)`` is computed in float64 and rounded to the
    half dtype; each row's terms are then added one column at a time into a half-precision
    accumulator (``order="row"``), or each column's one row at a time (``"column"``).
    """
    import numpy as np

    key = (case.name, dtype, order)
    if key not in _HALF_SUMS:
        n = case.n
        terms = round_half(_sigmoid_terms(case), dtype)
        # One row of `addends` per step of the running sums: column j (row j) of the terms.
        addends = terms if order == "column" else np.ascontiguousarray(terms.T)
        sums = np.zeros(n, dtype=np.float32)
        for addend in addends:
            sums = round_half(sums + addend, dtype)
        _HALF_SUMS[key] = sums
    return _HALF_SUMS[key]


def _half_sigmoid_loss(case: Case, dtype: str, order: str, half_total: bool) -> float:
    """Return the sigmoid loss of `case` as a half-precision accumulator computes it."""
    import numpy as np

    sums = _half_partial_sums(case, dtype, order)
    if not half_total:
        return float(round_half(np.float32(sums.astype(np.float64).sum()), dtype)) / case.n
    total = np.float32(0.0)
    for value in sums:
        total = round_half(total + value, dtype)
    return float(total) / case.n


def _half_tile_losses(case: Case, dtype: str) -> dict[tuple[str, int], float]:
    """Return the sigmoid loss of `case` summed tile by tile into a half-precision total.

    For every tile size of :data:`HALF_TILES` below n and both tile orders (``"tile rows"``:
    the tiles of the first block of image rows first; ``"tile columns"``), each tile's terms
    are summed in float32, the sum rounded to `dtype` and added into a running total of
    `dtype`; the loss is the total over n, rounded. All the running sums advance together,
    one tile a step.
    """
    import numpy as np

    key = (case.name, dtype)
    if key in _HALF_TILE_LOSSES:
        return _HALF_TILE_LOSSES[key]
    n = case.n
    terms = _sigmoid_terms(case)
    labels: list[tuple[str, int]] = []
    sequences = []
    for block in HALF_TILES:
        if block >= n:
            continue  # one tile: its sum is rounded once, which is not a half accumulation
        blocks = -(-n // block)
        padded = np.zeros((blocks * block, blocks * block))
        padded[:n, :n] = terms
        sums = padded.reshape(blocks, block, blocks, block).sum(axis=(1, 3))  # (tiles, tiles)
        sums = round_half(sums.astype(np.float32), dtype)
        for order, grid in (("tile rows", sums), ("tile columns", sums.T)):
            labels.append((order, block))
            sequences.append(grid.ravel())
    losses: dict[tuple[str, int], float] = {}
    if sequences:
        addends = np.zeros((max(len(seq) for seq in sequences), len(sequences)), np.float32)
        for column, seq in enumerate(sequences):
            addends[: len(seq), column] = seq  # a finished sum adds zeros: it stays put
        totals = np.zeros(len(sequences), dtype=np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            for step in addends:
                totals = round_half(totals + step, dtype)
            result = round_half(totals / np.float32(n), dtype)
        losses = {label: float(value) for label, value in zip(labels, result, strict=True)}
    _HALF_TILE_LOSSES[key] = losses
    return losses


def _half_hypotheses(dtype: str) -> list[tuple[str, Callable[[Case], float]]]:
    """Return ``(description, predicted loss of a case)`` of every half accumulator looked for."""
    hypotheses: list[tuple[str, Callable[[Case], float]]] = []
    for order, half_total in HALF_ORDERS:
        total = dtype if half_total else "float32"
        hypotheses.append(
            (
                f"its n^2 per-pair terms added in {dtype} (a running sum per {order}, then "
                f"over the {order}s in {total})",
                lambda case, o=order, h=half_total: _half_sigmoid_loss(case, dtype, o, h),  # type: ignore[misc]
            )
        )
    for block in HALF_TILES:
        for order in ("tile rows", "tile columns"):
            hypotheses.append(
                (
                    f"its {block} x {block} tiles' float32 sums added into a {dtype} running "
                    f"total (tile after tile, by {order})",
                    lambda case, o=order, b=block: _half_tile_losses(case, dtype).get(  # type: ignore[misc]
                        (o, b), math.nan
                    ),
                )
            )
    return hypotheses


def _diagnose_half_accumulation(
    report: Report,
    loss: str,
    cases: Sequence[Case],
    outcomes: dict[str, Outcome],
    factor: Any,
    bound: Callable[[Case], float],
) -> list[Finding]:
    """Name a sigmoid loss whose per-pair terms or tile sums are added in the run's half dtype.

    In a float16 or bfloat16 run, the loss is predicted by simulating such an accumulator
    from the case's inputs: the n^2 terms added one by one (a running sum per row, or per
    column; the rows' sums then added in the half dtype, or in float32), or a tiled loss's
    float32 tile sums added into a half total (:data:`HALF_TILES`, two tile orders). A
    hypothesis is named when the loss is the only quantity that fails, every failed case's
    loss matches its prediction within the check's bound (`bound`), every case whose
    prediction is more than twice that bound off the golden matches it too (so the cases
    that pass are those where the half sum is still accurate: the small ones), and there is
    at least one such case. A half sum stops growing once its terms fall below half an ulp
    of it, so its error grows with n; in float16 it overflows (65504) where n times the loss
    is larger, which is then no naive ``exp``.
    """
    if loss != "sigmoid" or report.dtype not in HALF_MAX:
        return []
    failed = _only_the_loss_fails(report)
    if not failed:
        return []
    # The failed cases first, smallest first: a mismatch there ends the search cheaply.
    ordered = sorted(cases, key=lambda c: (c.name not in failed, c.n))
    for description, predict in _half_hypotheses(report.dtype):
        evidence = _half_evidence(ordered, failed, outcomes, predict, loss, factor, bound)
        if evidence:
            return [_half_accumulation_finding(report, cases, description)]
    return []


def _only_the_loss_fails(report: Report) -> set[str]:
    """Return the cases whose golden checks fail, if only the loss does; else none."""
    golden = [r for r in report.results if r.check == "golden"]
    if any(r.quantity != "loss" for r in golden if r.failed):
        return set()
    return {r.case for r in golden if r.failed}


def _half_evidence(
    ordered: Sequence[Case],
    failed: set[str],
    outcomes: dict[str, Outcome],
    predict: Callable[[Case], float],
    loss: str,
    factor: Any,
    bound: Callable[[Case], float],
) -> int:
    """Count the cases a half accumulator's `predict` explains where it differs from the golden.

    Zero as soon as one case contradicts it: a failed case it does not match, or a case
    where it is distinct from the golden and the loss is not (see
    :func:`_diagnose_half_accumulation`).
    """
    import numpy as np

    evidence = 0  # cases whose prediction is distinct from the golden, and matched
    for case in ordered:
        outcome = outcomes[case.name]
        got = outcome.values.get("loss") if outcome.error is None else None
        if got is None or np.ndim(got) != 0:
            return 0
        with np.errstate(over="ignore", invalid="ignore"):
            predicted = predict(case)
            if math.isnan(predicted):  # not simulated here (one tile): no evidence
                if case.name in failed:
                    return 0
                continue
            predicted *= factor(case)
        if not math.isfinite(predicted):  # the half sum overflows: so must the loss
            if np.isfinite(got) or np.sign(got) != np.sign(predicted):
                return 0
            evidence += 1
            continue
        window = bound(case)
        want = case.goldens[loss].loss * factor(case)
        distinct = case_error(predicted, want, case, "loss") > 2 * window
        explain = case.name in failed or distinct
        if explain and case_error(got, predicted, case, "loss") > window:
            return 0
        evidence += distinct
    return evidence


def _diagnose_half_overflow(
    report: Report, loss: str, cases: Sequence[Case], outcomes: dict[str, Outcome], factor: Any
) -> list[Finding]:
    """Name a sigmoid loss whose sum of n^2 terms is held in float16 and overflows.

    A dense ``terms.sum() / n`` in float16 accumulates in float32 but rounds the sum to
    float16: it is infinite exactly where n times the loss exceeds 65504, with finite
    gradients, and right elsewhere. Named when the loss is the only quantity that fails and
    fails exactly on those cases, there as infinite.
    """
    import numpy as np

    if loss != "sigmoid" or report.dtype != "float16":
        return []
    failed = _only_the_loss_fails(report)
    if not failed:
        return []
    limit = HALF_MAX["float16"]
    overflowing = {c.name for c in cases if abs(c.goldens[loss].loss * factor(c)) * c.n > limit}
    if failed != overflowing:
        return []
    for name in failed:
        got = outcomes[name].values.get("loss")
        if got is None or np.all(np.isfinite(got)):
            return []
    names = ", ".join(sorted(failed, key=lambda name: [c.name for c in cases].index(name)))
    return [
        (
            "half-precision",
            f"the loss is infinite exactly where n times it, the sum of the n^2 per-pair "
            f"terms, exceeds float16's largest value {limit:.6g} ({names}), and right "
            "elsewhere, with finite gradients: the sum is held in float16 (a dense "
            "terms.sum() / n on float16 terms, or a float16 accumulator); divide by n "
            "before the sum is rounded (sum in float32, or mean(...) * n)",
        )
    ]


def _half_accumulation_finding(report: Report, cases: Sequence[Case], description: str) -> Finding:
    """Return the ``half-precision`` finding of a half-precision accumulator."""
    dtype = report.dtype
    sizes = {c.name: c.n for c in cases}
    errors = sorted(
        (sizes[r.case], r.error)
        for r in report.results
        if r.check == "golden" and r.failed and r.quantity == "loss"
    )
    shown = ", ".join(
        f"{e:.1e} at n={n}" if math.isfinite(e) else f"inf at n={n}" for n, e in errors[:6]
    )
    more = f" and {len(errors) - 6} more" if len(errors) > 6 else ""
    text = (
        f"the loss matches {description}, simulated from the inputs: the loss is off by "
        f"{shown}{more} and right on every case with n < {errors[0][0]}"
    )
    if any(not math.isfinite(e) for _, e in errors):
        text += (
            f"; where it is not finite, the sum overflows {dtype} (max "
            f"{HALF_MAX[dtype]:.6g}) while the gradients stay finite, which a naive exp "
            "would not give"
        )
    text += (
        f". A {dtype} running sum stops growing once its terms fall below half an ulp of "
        "it, so the error grows with n: accumulate the loss in float32 (a float32 "
        "accumulator, or .float() the terms before the sum) and cast the result"
    )
    return ("half-precision", text)


#: Chunk sizes (image rows) of a text gradient accumulated chunk after chunk in the half
#: dtype: row by row, small chunks, and the tile sizes of :data:`HALF_TILES`.
HALF_GRADIENT_CHUNKS = (1, 2, 4, 8, *HALF_TILES)


def _half_text_gradient(case: Case, dtype: str, chunk: int) -> Any:
    """Return the sigmoid text gradient of `case` summed chunk by chunk in `dtype`.

    The inputs are rounded to `dtype`; ``G = dL/dZ`` is computed densely in float64. Each
    chunk of `chunk` image rows contributes ``t * G[c]^T img[c]``, rounded to `dtype` and
    added into a text accumulator of `dtype`; only the text rows the golden stores are
    simulated. Float32 values.
    """
    import numpy as np

    img = round_half(np.asarray(case.img, np.float32), dtype).astype(np.float64)
    txt = round_half(np.asarray(case.txt, np.float32), dtype).astype(np.float64)
    _, dlogits, _ = dense_logit_gradient("sigmoid", img, txt, case.scale, case.bias)
    rows = getattr(case.goldens["sigmoid"], "rows", None)
    if rows is not None:
        dlogits = dlogits[:, list(rows)]  # (n, stored text rows)
    total = np.zeros((dlogits.shape[1], img.shape[1]), dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, case.n, chunk):
            part = case.scale * dlogits[start : start + chunk].T @ img[start : start + chunk]
            total = round_half(total + round_half(part.astype(np.float32), dtype), dtype)
    return total


def _diagnose_half_gradient_accumulation(
    report: Report,
    loss: str,
    cases: Sequence[Case],
    outcomes: dict[str, Outcome],
    factor: Any,
    bound: Callable[[Case, str], float],
) -> list[Finding]:
    """Name a sigmoid loss whose text gradient is summed chunk by chunk in the half dtype.

    The loss passes and the text gradient is the only quantity that fails. For each chunk
    size of :data:`HALF_GRADIENT_CHUNKS` below n, the text gradient is simulated
    (:func:`_half_text_gradient`) and named with the match rule of
    :func:`_diagnose_half_accumulation`: every failed case matches the simulation within
    its bound, so does every case where the simulation is more than twice the bound off the
    golden, and there is at least one such case.
    """
    if loss != "sigmoid" or report.dtype not in HALF_MAX:
        return []
    golden = [r for r in report.results if r.check == "golden"]
    failed = {r.case for r in golden if r.failed}
    if not failed or any(r.quantity != "txt" for r in golden if r.failed):
        return []
    ordered = sorted(cases, key=lambda c: (c.name not in failed, c.n))
    for chunk in HALF_GRADIENT_CHUNKS:
        evidence = _half_gradient_evidence(
            report.dtype, chunk, ordered, failed, outcomes, factor, bound
        )
        if evidence:
            return [_half_gradient_finding(report, cases, chunk)]
    return []


def _half_gradient_evidence(
    dtype: str,
    chunk: int,
    ordered: Sequence[Case],
    failed: set[str],
    outcomes: dict[str, Outcome],
    factor: Any,
    bound: Callable[[Case, str], float],
) -> int:
    """Count the cases a text gradient summed in chunks of `chunk` explains, where distinct.

    Zero as soon as one case contradicts it (see :func:`_diagnose_half_gradient_accumulation`).
    """
    import numpy as np

    evidence = 0
    for case in ordered:
        if case.n <= chunk:  # one chunk: its sum is rounded once, no half accumulation
            if case.name in failed:
                return 0
            continue
        golden = case.goldens["sigmoid"]
        got = outcomes[case.name].values.get("txt")
        if got is None or np.shape(got) != np.shape(golden.txt):
            return 0
        predicted = _half_text_gradient(case, dtype, chunk) * factor(case)
        window = bound(case, "txt")
        distinct = case_error(predicted, golden.txt * factor(case), case, "txt") > 2 * window
        explain = case.name in failed or distinct
        if explain and case_error(got, predicted, case, "txt") > window:
            return 0
        evidence += distinct
    return evidence


def _half_gradient_finding(report: Report, cases: Sequence[Case], chunk: int) -> Finding:
    """Return the ``half-precision`` finding of a text gradient summed in the half dtype."""
    dtype = report.dtype
    sizes = {c.name: c.n for c in cases}
    errors = sorted(
        (sizes[r.case], r.error, r.tolerance)
        for r in report.results
        if r.check == "golden" and r.failed
    )
    shown = ", ".join(f"{e:.1e} (bound {b:.1e}) at n={n}" for n, e, b in errors[:6])
    rows = "image row by image row" if chunk == 1 else f"in chunks of {chunk} image rows"
    return (
        "half-precision",
        f"the text gradient matches its sum {rows} into a {dtype} accumulator (each "
        f"chunk's t * G[c]^T img[c] rounded to {dtype} and added), simulated from the "
        f"inputs: it is off by {shown}, and the loss passes. A {dtype} running sum loses "
        "the small addends, so the error grows with the number of chunks: accumulate the "
        "gradient in float32 and cast it once at the end",
    )


def _check_bounds(report: Report) -> Callable[[Case, str], float]:
    """Return the bound of each golden check of `report`, by case and quantity.

    In a float16 or bfloat16 run that is the check's own bound (FlashAttention's rule,
    :mod:`._naive`), in the others, and for a check the report lacks, the dtype's tolerance.
    """
    bounds = {(r.case, r.quantity): r.tolerance for r in report.results if r.check == "golden"}

    def bound(case: Case, quantity: str) -> float:
        return bounds.get((case.name, quantity), tolerance_for(report.dtype, case))

    return bound


#: How many times its bound a loss named ``half-precision-logits`` may miss by on a case
#: where the simulated operation-by-operation loss is right.
HALF_LOGITS_MISS = 4.0


def _diagnose_half_logits(
    report: Report,
    loss: str,
    cases: Sequence[Case],
    outcomes: dict[str, Outcome],
    factor: Any,
    bound: Callable[[Case, str], float],
) -> list[Finding]:
    """Name a dense loss computed in the half dtype operation by operation.

    The naive reference that bounds a half-precision run keeps float32 inside each framework
    kernel (:mod:`._naive`, ``fused``). A dense loss whose kernels round inside too (the sum
    of exponentials of a log-softmax rounded to bfloat16 before its log, as torch's CPU
    kernels and jax's ``log_softmax`` do) loses the small losses of saturated cases: its loss
    is predicted by the same reference with every operation rounded (``fused=False``), in
    either logit order. Named when the loss matches that prediction, within the loss
    check's bound, on every case where the prediction is more than twice that bound off the
    golden (at least one), and every other case whose loss failed misses its bound by less
    than :data:`HALF_LOGITS_MISS` times (a summation order that differs from the
    simulation's).
    """
    import numpy as np

    golden = [r for r in report.results if r.check == "golden"]
    failed = {r.case for r in golden if r.failed and r.quantity == "loss"}
    failed_any = {r.case for r in golden if r.failed}
    if not failed_any:
        return []
    if {r.quantity for r in golden if r.failed} <= {"scale", "bias"}:
        scalar = _diagnose_half_scalar_sums(report, loss, cases, outcomes, factor, bound)
        if scalar:
            return scalar
    for order in LOGIT_ORDERS:
        evidence: list[tuple[int, float]] = []
        for case in cases:
            outcome = outcomes[case.name]
            got = outcome.values.get("loss") if outcome.error is None else None
            if got is None or np.ndim(got) != 0:
                break
            predicted = float(naive_values(case, loss, report.dtype, order, fused=False)["loss"])
            want = case.goldens[loss].loss * factor(case)
            predicted *= factor(case)
            window = bound(case, "loss")
            if not math.isfinite(predicted):
                continue  # the prediction overflows: no evidence either way
            distinct = case_error(predicted, want, case, "loss") > 2 * window
            if distinct and case_error(got, predicted, case, "loss") > window:
                break
            # Where the prediction is right, a failure must be a rounding-sized miss.
            error = case_error(got, want, case, "loss")
            if case.name in failed and not distinct and error > HALF_LOGITS_MISS * window:
                break
            if distinct:
                evidence.append((case.n, error))
        else:
            if evidence:
                return [_half_logits_finding(report, loss, failed_any, evidence, order)]
    return []


#: XLA's tree reduction: a reduce over a side longer than this runs in windows of it.
XLA_WINDOW = 32


def _xla_half_sum(values: Any, dtype: str) -> float:
    """Sum an (m, k) matrix in `dtype` as XLA's CPU reduce of a half array does.

    XLA rewrites a reduce whose side exceeds :data:`XLA_WINDOW` into a reduce-window of
    32 x 32 windows (each side zero-padded to a multiple of 32, half the padding before),
    repeated while a side exceeds 32, then a plain reduce; every one of them adds in
    row-major order, each addition rounded to `dtype` (read from the compiled HLO of
    ``jax.lax.reduce`` of a bfloat16 (n, n) array, jax 0.4+ on CPU).
    """
    import numpy as np

    m = np.asarray(values, np.float32)
    w = XLA_WINDOW
    while max(m.shape) > w:
        r, c = m.shape
        rows, cols = -(-r // w), -(-c // w)
        padded = np.zeros((rows * w, cols * w), np.float32)
        top, left = (rows * w - r) // 2, (cols * w - c) // 2
        padded[top : top + r, left : left + c] = m
        windows = padded.reshape(rows, w, cols, w).transpose(0, 2, 1, 3).reshape(rows, cols, -1)
        total = np.zeros((rows, cols), np.float32)
        for k in range(w * w):
            total = round_half(total + windows[:, :, k], dtype).astype(np.float32)
        m = total
    acc = np.float32(0)
    for value in m.ravel():
        acc = np.float32(round_half(np.float32(acc + value), dtype))
    return float(acc)


def _half_scalar_gradients(case: Case, loss: str, dtype: str) -> dict[str, float]:
    """dL/dscale and dL/dbias of `case` summed in `dtype` over half logits' gradient.

    A loss whose logits are half has a half ``G = dL/dZ`` in autodiff; ``dL/db = sum G``
    and ``dL/dt = sum G * S`` (``S = img @ txt.T`` in `dtype`, the products rounded) are
    then reduced in `dtype` (:func:`_xla_half_sum`). ``G`` and ``S`` from the rounded
    inputs, densely in float64, each rounded once to `dtype`.
    """
    import numpy as np

    img = round_half(np.asarray(case.img, np.float32), dtype).astype(np.float64)
    txt = round_half(np.asarray(case.txt, np.float32), dtype).astype(np.float64)
    t = float(round_half(np.float32(case.scale), dtype))
    b = float(round_half(np.float32(case.bias), dtype))
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        _, dlogits, sims = dense_logit_gradient(loss, img, txt, t, b)
        g = round_half(np.asarray(dlogits, np.float32), dtype).astype(np.float32)
        s = round_half(np.asarray(sims, np.float32), dtype).astype(np.float32)
        gs = round_half(g * s, dtype).astype(np.float32)
        return {"bias": _xla_half_sum(g, dtype), "scale": _xla_half_sum(gs, dtype)}


def _diagnose_half_scalar_sums(
    report: Report,
    loss: str,
    cases: Sequence[Case],
    outcomes: dict[str, Outcome],
    factor: Any,
    bound: Callable[[Case, str], float],
) -> list[Finding]:
    """Name half logits whose scale and bias gradients autodiff sums in the half dtype.

    Only dL/dscale and dL/dbias fail (big_vision's formula under ``jax.grad`` with every
    input bfloat16 or float16). Named where every failed check of the two is explained: it
    matches the simulation (:func:`_half_scalar_gradients`) within its bound where that is
    more than twice the bound off the golden (the evidence: at least one such check), or
    misses its bound by less than :data:`HALF_LOGITS_MISS` times. Checks that passed need
    not match: the simulation rounds G once from float64 and sums in XLA's CPU order, which
    a framework that rounds inside G's elementwise kernels (float16, with three more bits,
    shows it) or reduces in another order does not reproduce exactly.
    """
    import numpy as np

    failed = {(r.case, r.quantity) for r in report.results if r.check == "golden" and r.failed}
    evidence = 0
    for case in cases:
        outcome = outcomes[case.name]
        if outcome.error is not None:
            return []
        golden = case.goldens[loss]
        predicted = None
        for quantity in ("scale", "bias"):
            got = outcome.values.get(quantity)
            if got is None or np.ndim(got) != 0:
                return []
            if (case.name, quantity) not in failed:
                continue
            if predicted is None:
                predicted = _half_scalar_gradients(case, loss, report.dtype)
            want = getattr(golden, quantity) * factor(case)
            guess = predicted[quantity] * factor(case)
            window = bound(case, quantity)
            distinct = case_error(guess, want, case, quantity) > 2 * window
            if distinct and case_error(got, guess, case, quantity) <= window:
                evidence += 1
            elif case_error(got, want, case, quantity) > HALF_LOGITS_MISS * window:
                return []  # neither the simulation nor a rounding-sized miss
    if not evidence:
        return []
    return [_half_scalar_sums_finding(report, evidence)]


def _half_scalar_sums_finding(report: Report, evidence: int) -> Finding:
    """Return the ``half-precision-logits`` finding of scale and bias gradients summed in half."""
    dtype = report.dtype
    worst = max(
        (r for r in report.results if r.check == "golden" and r.failed),
        key=lambda r: r.error / r.tolerance if r.tolerance > 0 else math.inf,
    )
    return (
        "half-precision-logits",
        f"only dL/dscale and dL/dbias fail, and they match sums of the logits' gradient "
        f"over all n^2 pairs in {dtype} (G = dL/dlogits and G * (img @ txt.T) in {dtype}, "
        f"reduced in 32 x 32 windows, each addition rounded to {dtype}, as XLA's backward "
        f"of logits * t + b reduces them), simulated from the inputs, on the {evidence} "
        f"failed checks where that differs from the golden; worst {worst.case} "
        f"grads.{worst.quantity} at {worst.error:.1e} against a bound of "
        f"{worst.tolerance:.1e}. The logits are {dtype} because t and b are: keep them "
        "float32 (big_vision and mixed-precision training do; --scalar-dtype float32) or "
        "form the logits in float32",
    )


#: What rounds inside each loss's dense formula, for the ``half-precision-logits`` finding.
_ROUNDED_INSIDE = {"sigmoid": "logsigmoid", "softmax": "log_softmax's sum of exponentials"}


def _half_logits_finding(
    report: Report,
    loss: str,
    failed: set[str],
    evidence: list[tuple[int, float]],
    order: str,
) -> Finding:
    """Return the ``half-precision-logits`` finding."""
    dtype = report.dtype
    worst = max(
        (r for r in report.results if r.check == "golden" and r.failed),
        key=lambda r: r.error / r.tolerance if r.tolerance > 0 else math.inf,
    )
    label = "loss" if worst.quantity == "loss" else f"grads.{worst.quantity}"
    logits = "t * img @ txt.T + b" if order == "features" else "(img @ txt.T) * t + b"
    inner = _ROUNDED_INSIDE.get(loss, "loss")
    text = (
        f"the loss matches a dense loss computed in {dtype} operation by operation "
        f"(logits {logits} in {dtype}, and inside the {inner} every step rounded to {dtype}), "
        f"simulated from the inputs, on the {len(evidence)} cases where that differs from the "
        f"golden (off by up to {max(e for _, e in evidence):.1e}); {len(failed)} cases fail, "
        f"worst {worst.case} {label} at {worst.error:.1e} against a bound of "
        f"{worst.tolerance:.1e} (2 x the error of a naive {dtype} loss that keeps float32 "
        "inside each kernel, + floor). Small losses and gradients of saturated cases are "
        "lost to the rounding: compute the loss from float32 logits (logits.float()) and "
        "cast it, or use precision='fast', whose GEMMs take half operands and whose "
        "elementwise work and sums stay float32"
    )
    return ("half-precision-logits", text)


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]


def _diagnose_precision(
    report: Report, cases: Sequence[Case], exclude: set[str] | frozenset[str] = frozenset()
) -> list[Finding]:
    """Errors that are rounding, not a formula: name the precision they point at.

    The checks of the cases in `exclude` (explained by another finding) are left out.

    The typical error of the run (the 75th percentile over every golden check, passed ones
    included, so that a mistake confined to a few cases does not look like rounding)
    estimates the unit roundoff the implementation works in: ~1e-7 is float32 (in a
    float64 run), ~2^-11 = 5e-4 is a 10-bit mantissa (TF32 matmul inputs, or float16)
    in a float32 run, and ~2^-9 = 2e-3 or more is bfloat16 logits or accumulation, whose
    error grows with n as sums of n^2 terms are rounded.
    """
    golden = [r for r in report.results if r.check == "golden" and r.case not in exclude]
    failed = [r for r in golden if r.failed]
    if not failed or any(not math.isfinite(r.error) for r in golden):
        return []
    typical = _percentile([r.error for r in golden], 0.75)
    median = _percentile([r.error for r in golden], 0.5)
    worst = max(r.error for r in failed)
    by_case: dict[str, float] = {}
    for r in failed:
        by_case[r.case] = max(by_case.get(r.case, 0.0), r.error)
    sizes = {c.name: c.n for c in cases}
    ordered = sorted(by_case, key=lambda name: (sizes.get(name, 0), by_case[name]))
    small, large = ordered[0], ordered[-1]
    pattern = f"typical relative error {typical:.1e} (worst {worst:.1e})"
    if sizes.get(large, 0) > sizes.get(small, 0):
        pattern += (
            f"; failing cases from {by_case[small]:.1e} at n={sizes[small]} to "
            f"{by_case[large]:.1e} at n={sizes[large]}"
        )
    if report.dtype == "float64" and 1e-11 <= typical < 3e-5 and worst < 1e-2:
        return [
            (
                "float32-compute",
                f"{pattern}: float32 rounding (eps 1.2e-7) in a float64 run; the float64 "
                "inputs are computed in float32 somewhere (a .float() cast, a float32 "
                "buffer or default dtype, jax without jax_enable_x64): keep float64 "
                "throughout",
            )
        ]
    if report.dtype == "float32" and 3e-5 <= typical < 1e-3 and worst < 0.1:
        return [
            (
                "tf32-matmul",
                f"{pattern}: the rounding of a 10-bit mantissa (2^-11 = 4.9e-4) in a "
                "float32 run, as TF32 matmuls give (torch.backends.cuda.matmul.allow_tf32, "
                "set_float32_matmul_precision('high'), jax's default matmul precision on "
                "GPU/TPU) or float16 intermediates; use full float32 matmul precision "
                "('highest')",
            )
        ]
    plausible = worst < 0.5 if report.dtype == "float64" else median < 0.05
    if report.dtype in ("float32", "float64") and typical >= 1e-3 and plausible:
        return [
            (
                "half-precision",
                f"{pattern}: half-precision rounding (bfloat16 2^-9 = 2e-3, float16 2^-11) "
                f"in a {report.dtype} run: the logits, the softplus / log-sum-exp or their "
                "sums are computed in bfloat16 or float16 (autocast, a .half() cast); "
                "compute the logits and accumulate the loss in float32 or better",
            )
        ]
    return []


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
    loss : str
        The loss under test; the mistakes particular to a loss are looked for only for the
        losses this module knows (the sigmoid and the softmax loss).
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
    try:
        return _diagnose(report, loss, cases, outcomes, convention)
    finally:
        _SIMS.clear()
        _HALF_SUMS.clear()
        _HALF_TILE_LOSSES.clear()


def _unexplained(gradient_findings: list[Finding], loss_codes: set[str]) -> list[Finding]:
    """Drop the gradient findings that the loss's own findings (`loss_codes`) explain.

    A gradient that follows the loss's (wrong) normalisation is no ``gradient-factor``;
    a zero bias gradient of a loss that never adds the bias (``missing-bias``) is that
    mistake, not a detached bias.
    """
    explained = set()
    if loss_codes & NORMALISATION:
        explained.add("gradient-factor")
    if "missing-bias" in loss_codes:
        explained.add("zero-bias-grad")
    return [f for f in gradient_findings if f[0] not in explained]


def _diagnose(
    report: Report,
    loss: str,
    cases: Sequence[Case],
    outcomes: dict[str, Outcome],
    convention: str,
) -> list[Finding]:
    scale = CONVENTIONS[convention]

    def factor(case: Case) -> float:
        return scale(case.n)

    bound = _check_bounds(report)
    if report.dtype in HALF_MAX:
        # A simulated half-precision sum is the strongest evidence there is: tried first, so
        # that a looser hypothesis (clamped logits, whose window is a few tolerances) does
        # not take its place.
        half = _diagnose_half_accumulation(
            report, loss, cases, outcomes, factor, lambda case: bound(case, "loss")
        ) or _diagnose_half_overflow(report, loss, cases, outcomes, factor)
        half = half or _diagnose_half_gradient_accumulation(
            report, loss, cases, outcomes, factor, bound
        )
        if half:
            return half
    findings = _diagnose_raised(report, cases, outcomes)
    findings += _diagnose_per_row(loss, cases, outcomes, factor)
    overflow, overflowed = _diagnose_non_finite(cases, outcomes, report.dtype)
    findings += overflow
    findings += _diagnose_loss(report, loss, cases, outcomes, factor, convention)
    gradient_findings = _diagnose_gradients(report, loss, cases, outcomes, factor)
    findings += _unexplained(gradient_findings, {code for code, _ in findings})
    if "scale-as-log" in {code for code, _ in findings}:
        # exp(scale) overflows by itself on large scales: not a naive softplus or lse.
        findings = [f for f in findings if f[0] != "non-finite-stress"]
    if not findings or {code for code, _ in findings} <= {"zero-scale-grad", "zero-bias-grad"}:
        findings += _diagnose_tail_block(report, cases)
    if not findings and loss == "sigmoid":
        findings += _diagnose_softplus_threshold(report, cases, outcomes, factor)
    if not findings and report.dtype in HALF_MAX:
        findings += _diagnose_half_logits(report, loss, cases, outcomes, factor, bound)
    if not findings:
        findings += _diagnose_precision(report, cases)
    elif {code for code, _ in findings} == {"non-finite-stress"}:
        # The cases with large logits are explained; the others may show the precision
        # (a float64 run that overflows at float32's limit computes in float32).
        findings += _diagnose_precision(report, cases, exclude=overflowed)
    if not findings:
        findings.append(
            (
                "unknown",
                "no known mistake fits these failures; the table lists every failed check",
            )
        )
    return findings
