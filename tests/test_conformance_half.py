"""Half-precision runs follow FlashAttention's rule: at most twice a naive dense loss's error.

In a float16 or bfloat16 run, each golden check's error must be at most
``2 x (the error of a naive dense loss run in that dtype on the same inputs) + floor``
(``conformance/_naive.py``, docs/conformance.md). These tests show that the rule accepts
this library in both precisions and a plain dense loss in bfloat16, rejects a tiled loss
that accumulates across tiles in half precision (which the old fixed tolerance accepted)
and anything three times worse than the naive reference, and that the naive reference is
the loss it claims to be.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from typing import Any

import numpy as np
import pytest
import right_impls
import wrong_impls
from portable_siglip.conformance import check, load_cases
from portable_siglip.conformance._diagnose import _half_text_gradient
from portable_siglip.conformance._errors import case_errors, error_table
from portable_siglip.conformance._naive import (
    LOGIT_ORDERS,
    astype_rounding,
    host_rounding,
    naive_loss_and_grad,
    naive_values,
    round_half,
)
from portable_siglip.conformance._report import (
    RULE_FLOOR,
    TOLERANCE,
    rule_bound,
    tolerance_for,
)

QUANTITIES = ("loss", "img", "txt", "scale", "bias")
CASES = {case.name: case for case in load_cases()}


def _explain(report: Any) -> str:
    lines = [f"passed={report.passed} codes={sorted(report.codes)}", *report.diagnosis]
    lines += [
        f"  {r.check} [{r.case}] {r.quantity}: error={r.error:.3e} bound={r.tolerance:.3e} "
        f"naive={r.naive} {r.message}"
        for r in report.failed[:20]
    ]
    return "\n".join(lines)


def _library(loss: str, precision: str) -> Any:
    import portable_siglip as ps
    from portable_siglip import _losses, _registry

    function = _losses.loss_functions(_registry.get(loss), ps)[1]
    return functools.partial(function, precision=precision)


# ---------------------------------------------------------------------------------------
# What the rule accepts
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fast", "exact"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_the_library_passes_in_both_precisions(loss: str, dtype: str, precision: str) -> None:
    """torch CPU, half inputs: ``precision="fast"`` and ``"exact"`` pass, with no diagnosis."""
    pytest.importorskip("torch")
    report = check(_library(loss, precision), loss=loss, backend="torch", dtype=dtype)
    assert report.passed, _explain(report)
    assert not report.codes, _explain(report)
    golden = [r for r in report.results if r.check == "golden"]
    assert golden
    assert all(r.naive is not None for r in golden)
    # Every bound is the rule's, except where the naive reference is not finite.
    for r in golden:
        case = CASES[r.case]
        if math.isfinite(r.naive):
            assert r.tolerance == rule_bound(r.naive, dtype)
        else:
            assert r.tolerance == tolerance_for(dtype, case)


def test_a_dense_bfloat16_siglip_loss_passes() -> None:
    """open_clip's ``SigLipLoss`` formula computed in bfloat16 is the naive loss: it passes."""
    pytest.importorskip("torch")
    report = check(
        right_impls.torch_sigmoid_half_logits, loss="sigmoid", backend="torch", dtype="bfloat16"
    )
    assert report.passed, _explain(report)
    assert not report.codes


# ---------------------------------------------------------------------------------------
# What it rejects
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_loss_summed_tile_by_tile_in_half_precision_fails(dtype: str) -> None:
    """Float32 tiles whose sums go into a half total: rejected and named from a simulation.

    In bfloat16 its errors are within the old fixed tolerance (5e-2): the rule is what
    catches it. In float16 the total also overflows 65504 on two large cases.
    """
    pytest.importorskip("torch")
    report = check(
        wrong_impls.half_tile_accumulating_sigmoid, loss="sigmoid", backend="torch", dtype=dtype
    )
    explanation = _explain(report)
    assert not report.passed, explanation
    assert report.codes == {"half-precision"}, explanation
    (text,) = report.diagnosis
    assert f"128 x 128 tiles' float32 sums added into a {dtype} running total" in text
    assert {r.quantity for r in report.failed} == {"loss"}, explanation
    assert {r.case for r in report.failed} <= {name for name in CASES if "large" in name}
    if dtype == "bfloat16":
        assert all(r.error < tolerance_for(dtype, CASES[r.case]) for r in report.failed), (
            explanation
        )


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_text_gradient_summed_row_by_row_in_half_precision_fails(dtype: str) -> None:
    """A text gradient added image row by image row into a half accumulator: named.

    The loss passes and only ``dL/dtxt`` fails; the simulation of such a sum names it
    ``half-precision`` (it was ``unknown``), in float16 as in bfloat16.
    """
    pytest.importorskip("torch")
    report = check(
        wrong_impls.half_row_text_gradient_sigmoid, loss="sigmoid", backend="torch", dtype=dtype
    )
    explanation = _explain(report)
    assert not report.passed, explanation
    assert report.codes == {"half-precision"}, explanation
    (text,) = report.diagnosis
    assert f"image row by image row into a {dtype} accumulator" in text, explanation
    assert {r.quantity for r in report.failed} == {"txt"}, explanation
    assert all(r.error > 1.5 * r.tolerance for r in report.failed), explanation


def test_the_simulated_half_text_gradient_is_a_float16_running_sum() -> None:
    """``_half_text_gradient`` against numpy's own float16 additions, G from the formula."""
    case = CASES["random-n32-d6"]
    img = np.asarray(case.img).astype(np.float16).astype(np.float64)
    txt = np.asarray(case.txt).astype(np.float16).astype(np.float64)
    n = case.n
    logits = case.scale * img @ txt.T + case.bias  # (n, d) @ (d, n) -> (n, n), float64
    g = (1.0 / (1.0 + np.exp(-logits)) - np.eye(n)) / n  # dL/dZ of SigLIP, default convention
    for chunk in (1, 4):
        want = np.zeros(txt.shape, dtype=np.float16)
        for start in range(0, n, chunk):
            part = case.scale * g[start : start + chunk].T @ img[start : start + chunk]
            want = want + part.astype(np.float32).astype(np.float16)  # float16 additions
        got = _half_text_gradient(case, "float16", chunk)
        np.testing.assert_array_equal(got, want.astype(np.float32))
    # Summed in float32 instead, the same gradient is off by float16 roundings only.
    exact = case.scale * g.T @ img
    assert np.abs(got - exact).max() < 1e-2 * np.abs(exact).max()


def test_a_dense_bfloat16_clip_loss_is_named_half_precision_logits() -> None:
    """open_clip's ``ClipLoss`` in bfloat16 rounds inside its log-softmax: named, not unknown."""
    pytest.importorskip("torch")
    report = check(
        wrong_impls.half_logits_softmax, loss="softmax", backend="torch", dtype="bfloat16"
    )
    explanation = _explain(report)
    assert report.codes == {"half-precision-logits"}, explanation
    assert "identity-4" in {r.case for r in report.failed}, explanation


def _scaled_naive_error(k: float, loss: str, dtype: str) -> Any:
    """An implementation whose error is exactly `k` times the naive reference's, everywhere.

    It computes the loss and gradients densely in float64 (right_impls, independent of the
    suite) and the naive reference in both logit orders, and returns, element by element,
    ``exact + k * d`` with ``d`` the larger of the two orders' deviations. The normwise error
    on any set of rows is then ``k`` times the larger order's: ``k`` times the naive error.
    """
    import torch

    exact = {
        "sigmoid": right_impls.numpy_sigmoid_and_grad,
        "softmax": right_impls.numpy_softmax_and_grad,
    }[loss]

    def function(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
        x, y, t, b = (v.detach().double().numpy() for v in (img, txt, scale, bias))
        value, grads = exact(x, y, t, b)
        want = [np.asarray(value, np.float64), *(np.asarray(g, np.float64) for g in grads)]
        r = host_rounding(dtype)
        deviations = []
        for order in LOGIT_ORDERS:
            with np.errstate(over="ignore", under="ignore"):  # exp(y) = inf: sigmoid 0
                naive = naive_loss_and_grad(
                    np,
                    r(x),
                    r(y),
                    r(np.float32(t)),
                    r(np.float32(b)),
                    loss=loss,
                    rounding=r,
                    logits=order,
                )
            got = [naive[0], *naive[1]]
            pairs = zip(got, want, strict=True)
            deviations.append([np.asarray(g, np.float64) - w for g, w in pairs])
        out = []
        for w, d1, d2 in zip(want, *deviations, strict=True):
            d = np.where(np.abs(d1) >= np.abs(d2), d1, d2)
            out.append(torch.from_numpy(np.asarray(w + k * d, dtype=np.float64)))
        return out[0], tuple(out[1:])

    return function


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_the_rule_is_not_vacuous(loss: str) -> None:
    """Three times the naive error fails wherever that error is above the floor; 1.5x passes."""
    pytest.importorskip("torch")
    dtype, floor = "bfloat16", RULE_FLOOR["bfloat16"]
    report = check(_scaled_naive_error(3.0, loss, dtype), loss=loss, backend="torch", dtype=dtype)
    golden = [r for r in report.results if r.check == "golden"]
    explanation = _explain(report)
    assert not report.passed, explanation
    for r in golden:
        assert r.error == pytest.approx(3.0 * r.naive, rel=1e-6, abs=1e-12), (r, explanation)
        # 3e <= 2e + floor exactly when e <= floor.
        if r.naive > 1.01 * floor:
            assert not r.passed, (r, explanation)
        if r.naive < 0.99 * floor:
            assert r.passed, (r, explanation)
    failing = {r.quantity for r in golden if not r.passed}
    assert {"loss", "img", "txt"} <= failing, explanation
    report = check(_scaled_naive_error(1.5, loss, dtype), loss=loss, backend="torch", dtype=dtype)
    assert report.passed, _explain(report)


# ---------------------------------------------------------------------------------------
# The naive reference
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("order", LOGIT_ORDERS)
@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_the_naive_formulas_are_the_loss_and_its_gradients(
    loss: str, order: str, fused: bool
) -> None:
    """Without rounding, in float64, the naive reference gives the mpmath goldens."""
    for case in load_cases():
        if "large" in case.tags or case.max_abs_logit > 700:
            continue  # large: rows only; exp beyond float64's range on the stress cases
        value, grads = naive_loss_and_grad(
            np,
            np.asarray(case.img),
            np.asarray(case.txt),
            np.float64(case.scale),
            np.float64(case.bias),
            loss=loss,
            rounding=lambda v: v,
            logits=order,
            fused=fused,
        )
        golden = case.goldens[loss]
        for name, got in zip(QUANTITIES, (value, *grads), strict=True):
            want = np.asarray(getattr(golden, name))
            scale = max(float(np.max(np.abs(want), initial=0.0)), 1e-3)
            error = float(np.max(np.abs(np.asarray(got) - want), initial=0.0)) / scale
            assert error < 1e-9, (case.name, name, error)


def test_the_naive_reference_runs_on_torch_arrays() -> None:
    """Written against the array API: torch float32 tensors rounded with astype give the
    host's numbers (to a bfloat16 rounding, where float32 transcendentals differ by an ulp).
    """
    torch = pytest.importorskip("torch")
    from array_api_compat import array_namespace

    case = CASES["random-n33-d17"]
    xp = array_namespace(torch.empty(0))
    rounding = astype_rounding(xp, torch.bfloat16, torch.float32)
    for loss in ("sigmoid", "softmax"):
        for order in LOGIT_ORDERS:
            args = [torch.tensor(np.asarray(v), dtype=torch.float32) for v in (case.img, case.txt)]
            args += [torch.tensor(v, dtype=torch.float32) for v in (case.scale, case.bias)]
            value, grads = naive_loss_and_grad(
                xp, *args, loss=loss, rounding=rounding, logits=order
            )
            host = naive_values(case, loss, "bfloat16", order)
            for name, got in zip(QUANTITIES, (value, *grads), strict=True):
                got64 = got.double().numpy()
                want = host[name]
                scale = max(float(np.max(np.abs(want))), 1e-30)
                assert float(np.max(np.abs(got64 - want))) / scale <= 2.0**-7, (loss, name)
                if np.ndim(want):  # most elements are the same half value exactly
                    assert np.mean(got64 == want) > 0.9, (loss, order, name)


def test_round_half_rounds_to_nearest_even_with_or_without_ml_dtypes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """bfloat16 rounding on the bits agrees with ml_dtypes, ties to even, keeps inf and nan."""
    one = np.float32(1.0)
    ulp = np.float32(2.0**-7)  # bfloat16's spacing at 1
    values = np.array(
        [
            one + ulp / 2,
            one + 3 * ulp / 2,
            one + ulp / 2 + 2.0**-20,
            np.inf,
            -np.inf,
            np.nan,
            3.4e38,
            -0.0,
        ],
        dtype=np.float32,
    )
    want = np.array([1.0, 1 + 2 * 2.0**-7, 1 + 2.0**-7, np.inf, -np.inf, np.nan, np.inf, -0.0])
    for hide in (False, True):
        if hide:
            monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # import fails: bit path
        got = round_half(values, "bfloat16")
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want.astype(np.float32))
        assert np.signbit(got[-1])
    rng = np.random.default_rng(0)
    values = (rng.standard_normal(10_000) * np.exp(rng.uniform(-60, 60, 10_000))).astype(np.float32)
    monkeypatch.undo()
    with_ml = round_half(values, "bfloat16")
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    np.testing.assert_array_equal(round_half(values, "bfloat16"), with_ml)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(
            round_half(values, "float16"), values.astype(np.float16).astype(np.float32)
        )
    with pytest.raises(ValueError, match="dtype"):
        round_half(values, "float32")


# ---------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------


def test_the_report_shows_the_naive_error_and_the_bound() -> None:
    """JSON: every half-precision golden check carries its naive error; the table shows it."""
    pytest.importorskip("torch")
    report = check(_library("sigmoid", "fast"), loss="sigmoid", backend="torch", dtype="float16")
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    golden = [r for r in data["results"] if r["check"] == "golden"]
    assert all("naive" in r and "tolerance" in r for r in golden)
    # float16: the naive sum of the n = 2049 sigmoid terms overflows 65504, so that check
    # falls back to the fixed tolerance, said in a note and as a null naive error.
    fallback = [r for r in golden if r["naive"] is None]
    assert {(r["case"], r["quantity"]) for r in fallback} >= {
        ("large-n2049-d256-t118-b-13", "loss")
    }
    assert all(r["tolerance"] == tolerance_for("float16", CASES[r["case"]]) for r in fallback)
    assert any("not finite" in note for note in report.notes), report.notes
    table = report.table()
    assert "half precision: error <= 2 x naive float16 loss's error + floor" in table
    for quantity in ("loss", "grads.img", "grads.txt", "grads.scale", "grads.bias"):
        assert f"\n  {quantity} " in table, table

    failing = check(
        wrong_impls.half_tile_accumulating_sigmoid,
        loss="sigmoid",
        backend="torch",
        dtype="bfloat16",
        cases=[CASES["random-n13-d32"], CASES["large-n1023-d768-t10-b-10"]],
    )
    table = failing.table()
    header = next(line for line in table.splitlines() if line.strip().startswith("check"))
    assert header.split()[3:6] == ["error", "bound", "naive"], header
    assert "= 2 x the naive reference's" in table


def test_float32_runs_keep_the_fixed_tolerance() -> None:
    """No naive reference outside float16 and bfloat16: the tolerances are unchanged."""
    report = check(right_impls.numpy_sigmoid_and_grad, loss="sigmoid", dtype="float32")
    assert report.passed
    assert all(r.naive is None for r in report.results)
    assert all(
        r.tolerance == tolerance_for("float32", CASES[r.case.split(" ")[0]]) for r in report.results
    )
    assert "naive" not in report.table()
    assert TOLERANCE["float32"] == 1e-3


def test_case_errors_compares_implementations_with_the_naive_reference() -> None:
    """The table for docs/conventions.md: each option's error beside the naive one's."""
    pytest.importorskip("torch")
    functions = {p: _library("softmax", p) for p in ("fast", "exact")}
    errors = case_errors(functions, loss="softmax", backend="torch", dtype="bfloat16")
    assert set(errors) == {"fast", "exact", "naive", "bound"}
    for label in ("fast", "exact"):
        for quantity in QUANTITIES:
            assert errors[label][quantity] <= errors["bound"][quantity], (label, quantity)
    assert errors["bound"]["loss"] == rule_bound(errors["naive"]["loss"], "bfloat16")
    # float32 arithmetic inside: the exact loss is far better than any half computation.
    assert errors["exact"]["loss"] < 1e-5 < errors["naive"]["loss"]
    text = error_table(errors, title="softmax")
    assert text.splitlines()[0] == "| softmax | loss | dL/dimg | dL/dtxt | dL/dt | dL/db |"
    assert len(text.splitlines()) == 6
    with pytest.raises(ValueError, match="`case`"):
        case_errors(functions, loss="softmax", case="no-such-case")
    # float16: the naive sigmoid sum overflows at n = 2049; the bound is then the tolerance.
    functions = {"fast": _library("sigmoid", "fast")}
    errors = case_errors(functions, loss="sigmoid", backend="torch", dtype="float16")
    assert math.isinf(errors["naive"]["loss"])
    assert errors["bound"]["loss"] == tolerance_for("float16", CASES["large-n2049-d256-t118-b-13"])
    assert errors["fast"]["loss"] <= errors["bound"]["loss"]
