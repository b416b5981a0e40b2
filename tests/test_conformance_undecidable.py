"""The third verdict: a half-precision check the dtype cannot decide is ``undecidable``.

In a float16 or bfloat16 run a golden check is judged against twice a naive dense loss's
error in that dtype (FlashAttention's rule). Where that naive error is already as large as
the quantity (the softmax loss's bias gradient, zero in exact arithmetic, comes out of a
naive bfloat16 loss as rounding noise 1.5 times the floor), or where the golden feature
gradient underflows the dtype, no verdict on the result means anything: the check says
``undecidable`` and why, the report counts it, and a run with nothing failed still passes
(exit 0). A result beyond even the rule's bound still fails.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from helpers import run_python
from portable_siglip.conformance import CheckResult, Report, check, load_cases
from portable_siglip.conformance._distributed import _compare as distributed_compare
from portable_siglip.conformance._report import (
    UNDECIDABLE_NAIVE,
    compare,
    rule_bound,
    undecidable_reason,
)

import portable_siglip as ps

CASES = {case.name: case for case in load_cases()}


def _softmax_report(backend: str, dtype: str) -> Report:
    pytest.importorskip(backend)
    return check(ps.softmax_loss_and_grad, loss="softmax", backend=backend, dtype=dtype)


def _undecidable(report: Report) -> dict[tuple[str, str], CheckResult]:
    return {(r.case, r.quantity): r for r in report.undecidable}


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_a_check_whose_naive_error_reaches_the_quantity_is_undecidable(backend: str) -> None:
    """softmax, bfloat16: the bias gradient of two-pairs-hand (naive error 1.47) and more."""
    report = _softmax_report(backend, "bfloat16")
    assert report.passed
    assert not report.failed
    undecidable = _undecidable(report)
    assert ("two-pairs-hand", "bias") in undecidable
    for result in undecidable.values():
        assert result.status == "undecidable"
        assert not result.passed
        assert result.naive is not None
        assert result.naive >= UNDECIDABLE_NAIVE  # bfloat16 underflows nothing here
        assert result.error <= result.tolerance == rule_bound(result.naive, "bfloat16")
        assert "cannot tell a right value from a wrong one" in result.message
    # Every other golden check with a finite naive error below 1 was decided.
    decided = [r for r in report.results if r.naive is not None and not r.undecidable]
    assert all(r.naive < UNDECIDABLE_NAIVE for r in decided if math.isfinite(r.naive))
    assert all(r.status == "passed" for r in decided)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_a_feature_gradient_that_underflows_is_undecidable(backend: str) -> None:
    """softmax, float16: large-n129-d1's feature gradients (largest 8.7e-14) underflow."""
    report = _softmax_report(backend, "float16")
    assert report.passed
    undecidable = _undecidable(report)
    for quantity in ("img", "txt"):
        result = undecidable[("large-n129-d1-t14.3125-b0", quantity)]
        assert "underflows float16" in result.message
        assert result.naive is not None
        assert result.naive < UNDECIDABLE_NAIVE  # undecidable for the underflow alone
    largest = float(np.max(np.abs(CASES["large-n129-d1-t14.3125-b0"].goldens["softmax"].img)))
    assert 0 < largest < 2.0**-14  # float16's smallest normal number


def test_a_result_beyond_the_bound_fails_even_where_undecidable() -> None:
    """A softmax bias gradient of 1 (it is 0): fails where the check is otherwise undecidable."""
    pytest.importorskip("torch")

    def bias_gradient_one(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
        loss, grads = ps.softmax_loss_and_grad(img, txt, scale, bias)
        return loss, grads._replace(bias=grads.bias + 1)

    report = check(bias_gradient_one, loss="softmax", backend="torch", dtype="bfloat16")
    assert not report.passed
    failed = {(r.case, r.quantity) for r in report.failed}
    assert ("two-pairs-hand", "bias") in failed  # undecidable for the library
    assert not any(r.quantity == "bias" for r in report.undecidable)


def test_the_report_counts_and_lists_the_undecidable_checks() -> None:
    report = _softmax_report("torch", "bfloat16")
    count = len(report.undecidable)
    assert count > 0
    assert f"{len(report.results)} checks, {count} undecidable" in str(report)
    table = report.table()
    assert f"undecidable in bfloat16 ({count} checks):" in table
    assert "golden two-pairs-hand grads.bias (naive error 1.5)" in table
    document = report.to_dict()
    assert (document["passed"], document["failed"], document["undecidable"]) == (True, 0, count)
    statuses = [r["status"] for r in document["results"]]
    assert statuses.count("undecidable") == count
    assert statuses.count("passed") == len(report.results) - count


def test_a_run_with_every_check_undecidable_does_not_pass() -> None:
    result = CheckResult("golden", "n1-d1", "bias", 0.0, 1.0, False, "why", 2.0, True)
    report = Report("softmax", "torch", "bfloat16", "default", "f", results=[result])
    assert not report.failed
    assert not report.passed
    assert str(report).startswith("FAILED: every check was undecidable in bfloat16")


def test_undecidable_needs_a_half_precision_rule_check() -> None:
    assert undecidable_reason(None, 0.0, "bias", "bfloat16") == ""  # float32/64, invariants
    assert undecidable_reason(math.inf, 0.0, "bias", "bfloat16") == ""  # fixed tolerance
    assert undecidable_reason(0.99, 0.0, "bias", "bfloat16") == ""
    assert undecidable_reason(0.01, [0.0], "img", "float16") == ""  # exactly zero: exact
    assert undecidable_reason(0.01, [1e-9], "scale", "float16") == ""  # features only
    assert "underflows bfloat16" in undecidable_reason(0.01, [1e-39], "img", "bfloat16")


def test_the_distributed_judge_marks_the_worst_rank_undecidable() -> None:
    """The --world-size judge compares each rank's value through the same rule."""
    case = CASES["two-pairs-hand"]
    want = case.goldens["softmax"].bias
    naive = {"bias": 1.5}
    results = distributed_compare(
        "two-pairs-hand",
        case,
        {"bias": [want, want + 1e-3]},
        {"bias": want},
        0.05,
        naive,
        "bfloat16",
    )
    assert [r.status for r in results] == ["undecidable"]
    beyond = compare(
        "distributed", "x", case, "bias", [want, want + 1.0], want, 3.0, 1.5, "bfloat16"
    )
    assert beyond.status == "failed"
    assert beyond.message.startswith("rank 1: off by")


def test_the_command_line_exits_0_and_counts_them(tmp_path: Any) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "report.json"
    result = run_python(
        "-m", "portable_siglip.conformance", "--loss", "softmax", "--backend", "torch",
        "--dtype", "bfloat16", "--impl", "portable_siglip:softmax_loss_and_grad",
        "--report", str(out), timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "undecidable in bfloat16" in result.stdout
    document = json.loads(out.read_text())
    assert document["undecidable"] > 0
    assert document["failed"] == 0
