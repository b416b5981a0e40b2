"""The conformance suite has teeth: it fails known-wrong implementations and names the mistake.

``wrong_impls.WRONG`` holds plausible real-world mistakes, each with the diagnosis code the
suite must give; ``right_impls.RIGHT`` holds correct independent implementations that it
must accept. Both are also run through ``python -m portable_siglip.conformance``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import right_impls
import wrong_impls
from portable_siglip.conformance import check, load_cases

TESTS = Path(__file__).resolve().parent
WRONG_FILE = TESTS / "wrong_impls.py"
RIGHT_FILE = TESTS / "right_impls.py"

# Words that a human-readable diagnosis of each code must contain (any one, case-insensitive).
MEANINGFUL: dict[str, tuple[str, ...]] = {
    "mean-over-pairs": ("pairs", "n^2", "n²", "mean"),
    "unnormalised-sum": ("sum", "normalis", "normaliz"),
    "bias-sign": ("bias",),
    "labels": ("label",),
    "zero-one-labels": ("eye(n)", "0/1"),
    "one-direction": ("direction", "image", "text"),
    "sum-of-directions": ("direction", "sum", "/2", "/ 2"),
    "non-finite-stress": ("finite", "overflow", "nan", "inf"),
    "tail-block": ("tail", "block", "remainder", "multiple"),
    "zero-scale-grad": ("scale",),
    "zero-bias-grad": ("bias",),
    "missing-bias": ("bias",),
    "scale-as-log": ("exp", "log"),
    "transposed-gradient": ("transpos", "swap"),
    "gradient-sign": ("sign",),
    "gradient-factor": ("factor",),
    "scale-as-temperature": ("temperature",),
    "clamped-logits": ("clamp",),
    "label-smoothing": ("smoothing",),
    "renormalised-inputs": ("normalis",),
    "per-row-loss": ("scalar",),
    "softplus-threshold": ("softplus",),
    "float32-compute": ("float32",),
    "half-precision": ("bfloat16", "half"),
    "half-precision-logits": ("bfloat16", "float16", "half"),
    "tf32-matmul": ("tf32",),
    "raises": ("raised",),
}


def _params(table: dict[str, Any]) -> list[Any]:
    """Test parameters of a WRONG/RIGHT table; JAX ones are slow (eager op-by-op compiles)."""
    return [
        pytest.param(name, marks=pytest.mark.slow) if entry.backend == "jax" else name
        for name, entry in sorted(table.items())
    ]


def _require(backend: str) -> None:
    """Skip unless the backend's library is installed."""
    if backend in ("torch", "jax", "array_api_strict"):
        pytest.importorskip(backend)


def _explain(report: Any) -> str:
    """The report's diagnosis and failed checks, for assertion messages."""
    lines = [f"passed={report.passed} codes={sorted(report.codes)}", *report.diagnosis]
    lines += [
        f"  {r.check} [{r.case}] {r.quantity}: error={r.error} tol={r.tolerance} {r.message}"
        for r in report.failed[:20]
    ]
    return "\n".join(lines)


def _judged(impl: wrong_impls.Wrong | right_impls.Right) -> tuple[Any, str]:
    """Check an entry of WRONG or RIGHT as it asks to be; return the report and explanation."""
    _require(impl.backend)
    report = check(impl.func, loss=impl.loss, backend=impl.backend, dtype=impl.dtype)
    return report, _explain(report)


@pytest.mark.parametrize("name", _params(wrong_impls.WRONG))
def test_wrong_implementation_fails_with_its_diagnosis(name: str) -> None:
    wrong = wrong_impls.WRONG[name]
    report, explanation = _judged(wrong)
    assert not report.passed, explanation
    assert report.failed, explanation
    assert wrong.code in report.codes, explanation
    text = "\n".join(report.diagnosis).lower()
    assert any(word in text for word in MEANINGFUL[wrong.code]), explanation
    assert "unknown" not in report.codes, explanation
    # A factor of 1 is a precision problem, never a normalisation one.
    assert not re.search(r"goldens times 1(\.0*)?\b", text), explanation


@pytest.mark.parametrize("name", _params(right_impls.RIGHT))
def test_right_implementation_passes(name: str) -> None:
    report, explanation = _judged(right_impls.RIGHT[name])
    assert report.passed, explanation
    assert not report.failed, explanation
    assert not report.codes, explanation
    assert report.gradients_checked, explanation


@pytest.mark.parametrize("name", sorted(right_impls.LOSS_ONLY))
def test_loss_only_numpy_implementation_passes_without_gradients(name: str) -> None:
    report, explanation = _judged(right_impls.LOSS_ONLY[name])
    assert report.passed, explanation
    assert not report.gradients_checked, explanation


def test_mean_convention_accepts_the_mean_over_pairs() -> None:
    """``convention="mean"`` judges against the mean over n^2 pairs: the default one fails it."""
    pytest.importorskip("torch")
    report = check(
        wrong_impls.mean_over_pairs_sigmoid, loss="sigmoid", backend="torch", convention="mean"
    )
    assert report.passed, _explain(report)
    report = check(right_impls.torch_sigmoid, loss="sigmoid", backend="torch", convention="mean")
    assert not report.passed, _explain(report)


def test_convention_advice_round_trips() -> None:
    """The advice names the convention the loss does compute, and following it passes."""
    pytest.importorskip("torch")
    pairs = (
        # (implementation, declared convention, the convention it computes)
        (right_impls.torch_sigmoid, "mean", "default"),
        (right_impls.torch_sigmoid, "sum", "default"),
        (wrong_impls.mean_over_pairs_sigmoid, "default", "mean"),
        (wrong_impls.mean_over_pairs_sigmoid, "sum", None),  # n^2 off: nothing fits
    )
    cases = [c for c in load_cases() if "large" not in c.tags]
    for func, declared, computed in pairs:
        report = check(func, loss="sigmoid", backend="torch", convention=declared, cases=cases)
        assert not report.passed, _explain(report)
        text = "\n".join(report.diagnosis)
        advised = set(re.findall(r"--convention (\w+)", text))
        assert declared not in advised, _explain(report)
        if computed is None:
            assert not advised, _explain(report)
            continue
        assert advised == {computed}, _explain(report)
        again = check(func, loss="sigmoid", backend="torch", convention=computed, cases=cases)
        assert again.passed, _explain(again)


def test_tail_block_needs_more_than_one_failing_size() -> None:
    """Failing on n = 33 alone while n = 32 passes is a coincidence, not a tail block."""

    def wrong_at_33(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
        loss, grads = right_impls.numpy_sigmoid_and_grad(img, txt, scale, bias)
        return (loss * 1.01, grads) if img.shape[0] == 33 else (loss, grads)

    cases = [c for c in load_cases() if "large" not in c.tags]
    assert {32, 33} <= {c.n for c in cases}
    report = check(wrong_at_33, loss="sigmoid", cases=cases)
    assert not report.passed
    assert "tail-block" not in report.codes, _explain(report)


def test_an_implementation_that_always_raises_is_reported_once() -> None:
    """One line for the exception, its traceback once, the cases named: no row per check."""
    wrong = wrong_impls.WRONG["raises_on_every_case_sigmoid"]
    report = check(wrong.func, loss=wrong.loss, backend=wrong.backend, dtype=wrong.dtype)
    message = "AttributeError: loss needs `projection` set before the first call"
    assert [code for code, _ in report.findings] == ["raises"], _explain(report)
    assert message in report.diagnosis[0]
    assert "every case" in report.diagnosis[0]
    table = report.table()
    rows = [line for line in table.splitlines() if line.startswith("  golden")]
    assert len(rows) == 1, table
    assert message in rows[0]
    assert all(case.name in rows[0] for case in load_cases()), table
    assert table.count("Traceback (most recent call last)") == 1, table
    assert "raises_on_every_case_sigmoid" in table  # the frame that raised
    assert len(table.splitlines()) < 40, table
    data = report.to_dict()
    (exception,) = data["exceptions"]
    assert exception["message"] == message
    assert "raises_on_every_case_sigmoid" in exception["traceback"]
    assert exception["cases"] == [case.name for case in load_cases()]
    json.dumps(data)


def test_an_exception_on_some_cases_names_them() -> None:
    """Raising on the stress cases only: those cases, not every case, and the traceback."""

    def fails_on_large_logits(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
        if float(scale) >= 300:
            msg = "scale out of range"
            raise ValueError(msg)
        return right_impls.numpy_sigmoid_and_grad(img, txt, scale, bias)

    report = check(fails_on_large_logits, loss="sigmoid")
    raised = [c.name for c in load_cases() if c.scale >= 300]
    assert "raises" in report.codes, _explain(report)
    text = "\n".join(report.diagnosis)
    assert f"{len(raised)} of {len(load_cases())} cases" in text, text
    assert all(name in text for name in raised), text
    assert report.exceptions[0]["cases"] == raised


def test_no_gradient_factor_of_one() -> None:
    """Precision errors (gradients right up to rounding) never read as a normalisation."""
    for name in ("softplus_threshold_sigmoid", "tf32_matmul_sigmoid"):
        wrong = wrong_impls.WRONG[name]
        report, explanation = _judged(wrong)
        assert "gradient-factor" not in report.codes, explanation
        assert wrong.code in report.codes, explanation


def test_a_missing_bias_is_not_called_detached() -> None:
    """A bias left out of the logits puts the loss off: named missing, not detached.

    A detached bias leaves the loss right and only dL/db zero: that one stays detached.
    """
    torch = pytest.importorskip("torch")
    from torch.nn.functional import logsigmoid

    report, explanation = _judged(wrong_impls.WRONG["forgotten_bias_sigmoid"])
    assert report.codes == {"missing-bias"}, explanation
    assert "detached from the graph" not in explanation, explanation
    # The loss itself is off, by thousands on the stress cases.
    worst = max(r.error for r in report.failed if r.quantity == "loss")
    assert worst > 1e3, explanation

    def detached_bias(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
        logits = scale * img @ txt.T + bias.detach()  # (n, d) @ (d, n) -> (n, n)
        labels = 2 * torch.eye(logits.shape[0], dtype=logits.dtype) - 1
        return -logsigmoid(labels * logits).sum() / logits.shape[0]

    report = check(detached_bias, loss="sigmoid", backend="torch")
    explanation = _explain(report)
    assert report.codes == {"zero-bias-grad"}, explanation
    assert {r.quantity for r in report.failed} == {"bias"}, explanation
    assert "detached from the graph" in explanation, explanation


def test_open_clip_chunked_softplus_is_named_with_its_threshold() -> None:
    """open_clip main's chunked SigLIP thresholds softplus(Z), not softplus(-l * Z).

    It fails the gradients of the one case with positives above z = 20 (b = 20): there
    the positives cost softplus(z) - z = 0 and get no gradient. Its finding names the
    chunked path; a softplus thresholded per pair keeps the other message.
    """
    report, explanation = _judged(wrong_impls.WRONG["chunked_softplus_sigmoid"])
    assert report.codes == {"softplus-threshold"}, explanation
    assert {r.case for r in report.failed} == {"range-n11-d6-t0.5-b20"}, explanation
    assert {r.quantity for r in report.failed} == {"img", "txt", "scale", "bias"}, explanation
    assert "chunk_size" in report.diagnosis[0], explanation
    report, explanation = _judged(wrong_impls.WRONG["softplus_threshold_sigmoid"])
    assert report.codes == {"softplus-threshold"}, explanation
    assert "chunk_size" not in report.diagnosis[0], explanation


def test_zero_one_labels_prediction_is_log_2_per_negative_pair() -> None:
    """With labels eye(n) each of the n^2 - n negatives adds -log sigmoid(0) = log 2."""
    import math

    from portable_siglip.conformance import _diagnose

    for case in load_cases():
        if case.n > 200:
            continue
        # The positives' terms, one at a time in float64, and log 2 per negative pair.
        positives = 0.0
        for i in range(case.n):
            z = case.scale * float(case.img[i] @ case.txt[i]) + case.bias
            positives += max(-z, 0.0) + math.log1p(math.exp(-abs(z)))
        want = (positives + (case.n**2 - case.n) * math.log(2.0)) / case.n
        got = _diagnose._dense_loss(
            "sigmoid", case, scale=case.scale, bias=case.bias, signs="zero-one"
        )
        assert got == pytest.approx(want, rel=1e-12), case.name


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_accumulation_is_named_in_a_half_run(dtype: str) -> None:
    """A loss summed in the run's half dtype is named from a simulation of that sum.

    Only the large cases fail (in float16 two of them overflow, with finite gradients):
    the diagnosis says half precision, not ``unknown`` and not a naive exp.
    """
    pytest.importorskip("torch")
    report = check(
        wrong_impls.half_accumulating_sigmoid, loss="sigmoid", backend="torch", dtype=dtype
    )
    explanation = _explain(report)
    assert report.codes == {"half-precision"}, explanation
    (text,) = report.diagnosis
    assert f"added in {dtype}" in text, explanation
    assert "running sum per row" in text, explanation
    assert ("overflows float16" in text) == (dtype == "float16"), explanation
    assert {r.quantity for r in report.failed} == {"loss"}, explanation
    assert {r.case for r in report.failed} <= {c.name for c in load_cases() if c.n > 100}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_diagnosis_needs_the_simulated_sum(dtype: str) -> None:
    """A loss wrong on the large cases in another way is not called a half-precision sum."""
    torch = pytest.importorskip("torch")

    def off_on_large_cases(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
        """Right on n <= 33, a loss 30% low on the large cases: no half sum gives that."""
        args = (x.detach().float().numpy() for x in (img, txt, scale, bias))
        loss, grads = right_impls.numpy_sigmoid_and_grad(*args)
        factor = 0.7 if img.shape[0] > 100 else 1.0
        return torch.tensor(float(loss) * factor, dtype=img.dtype), tuple(
            torch.tensor(g, dtype=img.dtype) for g in grads
        )

    report = check(off_on_large_cases, loss="sigmoid", backend="torch", dtype=dtype)
    assert not report.passed
    assert "half-precision" not in report.codes, _explain(report)


def test_a_float64_run_that_overflows_at_float32s_limit_names_both_mistakes() -> None:
    """float32 compute and a naive exp (as Inf-CL's RingProb): both named, not ``unknown``.

    The loss is non-finite where logits exceed 88.7, not 709.8: the overflow is float32's,
    and the cases below that limit show float32 rounding.
    """
    report, explanation = _judged(wrong_impls.WRONG["float32_naive_logsumexp_softmax"])
    assert report.codes == {"non-finite-stress", "float32-compute"}, explanation
    assert "exp overflows float32" in report.diagnosis[0], explanation


def test_correct_bfloat16_losses_pass_without_a_diagnosis() -> None:
    """The library's loss and an independent one pass a bfloat16 run: no code at all."""
    pytest.importorskip("torch")
    import portable_siglip as ps

    for func in (ps.sigmoid_loss_and_grad, right_impls.torch_sigmoid):
        report = check(func, loss="sigmoid", backend="torch", dtype="bfloat16")
        assert report.passed, _explain(report)
        assert not report.codes, _explain(report)
        assert not report.diagnosis, _explain(report)


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "portable_siglip.conformance", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_cli_fails_a_wrong_implementation_and_names_the_mistake(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    impl = f"{WRONG_FILE}:mean_over_pairs_sigmoid"
    report_file = tmp_path / "report.json"
    result = _cli(
        "--loss", "sigmoid", "--impl", impl, "--backend", "torch", "--report", str(report_file)
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "mean-over-pairs" in result.stdout, output
    # The table has a row for at least one of the checks that fail in-process.
    in_process = check(wrong_impls.mean_over_pairs_sigmoid, loss="sigmoid", backend="torch")
    lines = result.stdout.splitlines()
    assert any(
        failed.check in line and failed.case in line
        for failed in in_process.failed
        for line in lines
    ), output
    data = json.loads(report_file.read_text(encoding="utf-8"))
    assert data["passed"] is False


@pytest.mark.parametrize(
    ("attr", "loss", "backend"),
    [
        ("torch_sigmoid", "sigmoid", "torch"),
        ("numpy_softmax_and_grad", "softmax", "numpy"),
        ("numpy_sigmoid", "sigmoid", "numpy"),
    ],
)
def test_cli_passes_a_right_implementation(
    tmp_path: Path, attr: str, loss: str, backend: str
) -> None:
    _require(backend)
    report_file = tmp_path / "report.json"
    result = _cli(
        "--loss",
        loss,
        "--impl",
        f"{RIGHT_FILE}:{attr}",
        "--backend",
        backend,
        "--report",
        str(report_file),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(report_file.read_text(encoding="utf-8"))
    assert data["passed"] is True
