"""The shipped golden vectors: their format, their generator and an independent check.

The goldens (``conformance/goldens.json.gz``) are made by
``python -m portable_siglip.conformance._generate`` with mpmath at 50 digits. These tests
check that the file loads, that its inputs are exact in every float dtype, that the script
reproduces it, and that the long-double oracle of ``tests/oracle.py`` agrees with it.
"""

from __future__ import annotations

import gzip
import json
import math
from typing import Any

import numpy as np
import pytest
from oracle import REFERENCES
from portable_siglip.conformance._cases import GOLDENS_PATH, Case, load_cases

CASES = load_cases()
NAMES = [case.name for case in CASES]
LOSSES = ("sigmoid", "softmax")
TAGS = {"tiny", "random", "stress", "range"}

#: Normwise relative tolerance of the oracle against the goldens. Measured on x86-64
#: (80-bit long double, 64-bit mantissa) the largest error is below 1e-15 on every case,
#: the stress cases (|Z| up to ~1000) included: the oracle forms Z with a relative error of
#: ~1e-19, so exp(Z) is off by |Z| * 1e-19 ~ 1e-16 relative, and its worst cancellation
#: (softmax gradients of nearly one-hot rows) costs about three more digits.
ORACLE_RTOL = 1e-12
#: Absolute floor where the golden is zero or tiny (zero rows, identical rows, the
#: softmax bias gradient): the oracle leaves rounding residue of ~1e-19 there.
ORACLE_ATOL = 1e-14

#: Cases regenerated with mpmath by the reproduction test (small, but covering the
#: hand-made, random and |Z| ~ 1000 code paths of the generator).
REGENERATED = ("two-pairs-hand", "random-n7-d3", "stress-huge")


def _raw_cases() -> dict[str, dict[str, Any]]:
    with gzip.open(GOLDENS_PATH, "rt", encoding="utf-8") as handle:
        data = json.load(handle)
    return {raw["name"]: raw for raw in data["cases"]}


def _on_bfloat16_grid(values: Any) -> bool:
    """Every value is 0 or has 8 significant bits and a magnitude in [2**-14, 65504]."""
    x = np.asarray(values, dtype=np.float64).ravel()
    mantissa, _ = np.frexp(x)
    eight_bits = mantissa * 256 == np.round(mantissa * 256)
    normal = (np.abs(x) >= 2.0**-14) & (np.abs(x) <= 65504.0)
    return bool(np.all((x == 0) | (eight_bits & normal)))


def _close(actual: Any, expected: Any) -> tuple[bool, float]:
    a = np.asarray(actual, dtype=np.longdouble)
    e = np.asarray(expected, dtype=np.longdouble)
    assert a.shape == e.shape
    err = float(np.max(np.abs(a - e), initial=0.0))
    scale = float(np.max(np.abs(e), initial=0.0))
    return err <= max(ORACLE_RTOL * scale, ORACLE_ATOL), err / scale if scale > 0 else err


# --------------------------------------------------------------------------- the file


def test_names_are_unique_and_tags_known() -> None:
    assert len(CASES) >= 20
    assert len(set(NAMES)) == len(NAMES), "duplicate case names"
    for case in CASES:
        assert case.tags, case.name
        assert case.tags <= TAGS, f"{case.name}: unknown tags {case.tags - TAGS}"


@pytest.mark.parametrize("case", CASES, ids=NAMES)
def test_shapes_and_finiteness(case: Case) -> None:
    assert case.img.ndim == 2
    assert case.img.shape == case.txt.shape
    assert case.n >= 1
    assert case.d >= 1
    assert case.scale > 0
    for loss in LOSSES:
        golden = case.goldens[loss]
        assert golden.img.shape == golden.txt.shape == case.img.shape
        values = [golden.loss, golden.scale, golden.bias, *golden.extra.values()]
        assert np.all(np.isfinite(values)), f"{case.name} {loss}"
        assert np.all(np.isfinite(golden.img))
        assert np.all(np.isfinite(golden.txt))
        assert golden.loss >= 0


@pytest.mark.parametrize("case", CASES, ids=NAMES)
def test_inputs_are_exact_in_every_dtype(case: Case) -> None:
    for what, values in [
        ("img", case.img),
        ("txt", case.txt),
        ("scale", case.scale),
        ("bias", case.bias),
    ]:
        assert _on_bfloat16_grid(values), f"{case.name}: {what} is off the bfloat16 grid"
        x = np.asarray(values, dtype=np.float64)
        np.testing.assert_array_equal(x.astype(np.float16).astype(np.float64), x)
        np.testing.assert_array_equal(x.astype(np.float32).astype(np.float64), x)
    try:
        from ml_dtypes import bfloat16
    except ImportError:
        return
    for values in (case.img, case.txt, case.scale, case.bias):
        x = np.asarray(values, dtype=np.float64)
        np.testing.assert_array_equal(x.astype(bfloat16).astype(np.float64), x)


@pytest.mark.parametrize("case", CASES, ids=NAMES)
def test_max_abs_logit(case: Case) -> None:
    logits = case.scale * (case.img @ case.txt.T) + case.bias
    assert math.isclose(case.max_abs_logit, float(np.max(np.abs(logits))), rel_tol=1e-12)


def test_coverage_of_the_edge_cases() -> None:
    """The cases the conformance contract names (docs/conformance.md) are all present."""
    assert any(case.n == 1 for case in CASES)
    assert any(case.d == 1 for case in CASES)
    assert any(not case.img.any() and not case.txt.any() for case in CASES), "zero rows"
    assert any(case.n > 1 and (case.img == case.img[0]).all() for case in CASES), "same rows"
    random = [case.n for case in CASES if "random" in case.tags]
    assert any(n % 32 == 0 for n in random)
    assert any(n % 16 == 0 for n in random)
    assert any(n % 8 and n % 2 for n in random), "n not divisible by any block"
    stress = [case.max_abs_logit for case in CASES if "stress" in case.tags]
    assert max(stress) > 88.8, "naive exp must overflow float32 in some stress case"
    assert min(stress) > 11.1, "naive exp must overflow float16 in every stress case"
    ranges = [(case.scale, case.bias) for case in CASES if "range" in case.tags]
    assert (118.0, -12.75) in ranges


# --------------------------------------------------------------------------- generator


def test_inputs_match_the_generator() -> None:
    """Every shipped input is what the generator's seeds produce (no mpmath needed)."""
    from portable_siglip.conformance._generate import case_inputs

    generated = case_inputs()
    assert [spec.name for spec in generated] == NAMES
    for spec, case in zip(generated, CASES, strict=True):
        np.testing.assert_array_equal(spec.img, case.img, err_msg=case.name)
        np.testing.assert_array_equal(spec.txt, case.txt, err_msg=case.name)
        assert (spec.scale, spec.bias) == (case.scale, case.bias)
        assert frozenset(spec.tags) == case.tags


@pytest.mark.parametrize("name", REGENERATED)
def test_generator_reproduces_the_shipped_numbers(name: str) -> None:
    pytest.importorskip("mpmath")
    from portable_siglip.conformance._generate import case_inputs, make_case

    spec = next(spec for spec in case_inputs() if spec.name == name)
    # Through JSON, as the file was written: every float must come back bit for bit.
    regenerated = json.loads(json.dumps(make_case(spec)))
    assert regenerated == _raw_cases()[name]


# --------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("case", CASES, ids=NAMES)
def test_goldens_agree_with_the_long_double_oracle(case: Case, loss: str) -> None:
    if np.finfo(np.longdouble).eps > 1e-18:
        pytest.skip("long double is plain double here: the oracle is not precise enough")
    golden = case.goldens[loss]
    ref = REFERENCES[loss](case.img, case.txt, case.scale, case.bias)
    for what in ("loss", "img", "txt", "scale", "bias"):
        ok, err = _close(getattr(golden, what), getattr(ref, what))
        assert ok, f"{case.name} {loss} {what}: relative error {err:.3e} > {ORACLE_RTOL:.0e}"


@pytest.mark.parametrize("case", CASES, ids=NAMES)
def test_softmax_extras_average_to_the_loss(case: Case) -> None:
    golden = case.goldens["softmax"]
    assert set(golden.extra) == {"image_to_text", "text_to_image"}
    assert golden.extra["image_to_text"] >= 0
    assert golden.extra["text_to_image"] >= 0
    mean = (golden.extra["image_to_text"] + golden.extra["text_to_image"]) / 2
    # Each of the three is rounded to float64 on its own: a few ulps apart at most.
    assert math.isclose(mean, golden.loss, rel_tol=4e-16, abs_tol=1e-300)
    assert golden.bias == 0.0, "softmax is shift invariant: its bias gradient is exactly 0"
    assert case.goldens["sigmoid"].extra == {}
