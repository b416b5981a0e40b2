"""The shipped golden vectors: their format, their generator and an independent check.

The goldens (``conformance/goldens.json.gz``) are made by
``python -m portable_siglip.conformance._generate``: with mpmath at 50 digits, and for the
``"large"`` cases with a float64 reference with exact and compensated sums. These tests
check that the file loads, that its inputs are exact in every float dtype, that the script
reproduces it, that the long-double oracle of ``tests/oracle.py`` agrees with it, and that
mpmath agrees with the large cases' reference.
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
from portable_siglip.conformance._report import FLOOR, natural_scale

CASES = load_cases()
NAMES = [case.name for case in CASES]
LOSSES = ("sigmoid", "softmax")
TAGS = {"tiny", "random", "stress", "range", "large"}
LARGE = [case for case in CASES if "large" in case.tags]

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

#: Large cases regenerated bit for bit by the reproduction test (the cheap ones: n = 127
#: and 129, a fraction of a second each; the whole file takes about 15 s).
LARGE_REGENERATED = ("large-n127-d1152-t10-b-10", "large-n129-d1-t14.3125-b0")

#: The large cases' float64 reference against mpmath: normwise relative error allowed
#: (docs/conformance.md states 1e-13; measured below 5e-16).
LARGE_RTOL = 1e-13


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
        if "large" in case.tags:
            assert golden.rows is not None
            assert list(golden.rows) == sorted(set(golden.rows))
            assert 0 in golden.rows
            assert case.n - 1 in golden.rows
            assert golden.img.shape == golden.txt.shape == (len(golden.rows), case.d)
        else:
            assert golden.rows is None
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


def test_coverage_of_the_large_cases() -> None:
    """One n below and one above a multiple of every tile size; d from 1 to 1152."""
    sizes = [case.n for case in LARGE]
    for tile in (16, 32, 64, 128, 1024):
        assert any(n % tile == tile - 1 for n in sizes), f"no n one below a multiple of {tile}"
        assert any(n % tile == 1 and n > tile for n in sizes), f"no n one above {tile}"
    assert max(sizes) > 2048
    dims = {case.d for case in LARGE}
    assert min(dims) == 1
    assert max(dims) == 1152
    settings = {(case.scale, case.bias) for case in LARGE}
    assert {(10.0, -10.0), (118.0, -13.0)} <= settings
    assert any(case.scale == 14.3125 for case in LARGE)  # CLIP's 1 / 0.07 in bfloat16
    for case in LARGE:
        for loss in LOSSES:
            rows = case.goldens[loss].rows
            assert rows is not None
            for tile in (16, 32, 64, 128, 1024):
                if case.n > tile:  # the second tile starts at row `tile`
                    assert {tile - 1, tile} <= set(rows), (case.name, tile)


# --------------------------------------------------------------------------- generator


def test_inputs_match_the_generator() -> None:
    """Every shipped input is what the generator's seeds produce (no mpmath needed)."""
    from portable_siglip.conformance._generate import case_inputs

    generated = case_inputs()
    small = [case for case in CASES if "large" not in case.tags]
    assert [spec.name for spec in generated] == [case.name for case in small]
    for spec, case in zip(generated, small, strict=True):
        np.testing.assert_array_equal(spec.img, case.img, err_msg=case.name)
        np.testing.assert_array_equal(spec.txt, case.txt, err_msg=case.name)
        assert (spec.scale, spec.bias) == (case.scale, case.bias)
        assert frozenset(spec.tags) == case.tags


def test_large_inputs_match_the_generator() -> None:
    """The large cases are the generator's, rebuilt from their seeds (checksum checked)."""
    from portable_siglip.conformance._generate import large_specs

    specs = large_specs()
    assert [spec.name for spec in specs] == [case.name for case in LARGE]
    raw = _raw_cases()
    for spec, case in zip(specs, LARGE, strict=True):
        assert "img" not in raw[case.name], "large cases ship without their inputs"
        img, txt = spec.inputs()
        np.testing.assert_array_equal(img, case.img, err_msg=case.name)
        np.testing.assert_array_equal(txt, case.txt, err_msg=case.name)
        assert (spec.scale, spec.bias, spec.rows) == (
            case.scale,
            case.bias,
            case.goldens["sigmoid"].rows,
        )


def test_a_changed_generator_is_detected() -> None:
    """Inputs that no longer match their checksum stop the loading with an explanation."""
    from portable_siglip.conformance import _cases

    raw = dict(_raw_cases()[LARGE[0].name])
    _cases._inputs(raw, np)  # as shipped: fine
    raw["seed"] += 1
    with pytest.raises(RuntimeError, match="random generator"):
        _cases._inputs(raw, np)


@pytest.mark.parametrize("name", LARGE_REGENERATED)
def test_generator_reproduces_the_large_cases(name: str) -> None:
    from portable_siglip.conformance._generate import large_specs, make_large_case

    spec = next(spec for spec in large_specs() if spec.name == name)
    assert json.loads(json.dumps(make_large_case(spec))) == _raw_cases()[name]


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
    if case.n * case.n * case.d > 1e8:
        pytest.skip("too slow in long double; mpmath checks this case (below)")
    golden = case.goldens[loss]
    ref = REFERENCES[loss](case.img, case.txt, case.scale, case.bias)
    for what in ("loss", "img", "txt", "scale", "bias"):
        want = getattr(ref, what)
        if what in ("img", "txt") and golden.rows is not None:
            want = want[list(golden.rows)]
        ok, err = _close(getattr(golden, what), want)
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


# --------------------------------------------------------------------------- large cases


def _normwise(actual: Any, expected: Any, floor: float = 1e-300) -> float:
    """Normwise relative error, absolute below `floor` (the suite's FLOOR * natural scale)."""
    a, e = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape
    return float(np.max(np.abs(a - e)) / max(np.max(np.abs(e)), floor))


def _exact_mp_logits(mp: Any, img: Any, txt: Any, t: float, b: float) -> list[list[Any]]:
    """``t img @ txt.T + b`` in mpmath, from an exact integer product (inputs * 2**21)."""
    a = (np.asarray(img) * 2.0**21).astype(np.int64)
    c = (np.asarray(txt) * 2.0**21).astype(np.int64)
    assert np.array_equal(a / 2.0**21, img)
    assert np.array_equal(c / 2.0**21, txt)
    S = a @ c.T  # |entries| <= 2**42 each, d <= 1152 terms: no int64 overflow
    scale = mp.mpf(2) ** -42
    return [[mp.mpf(t) * mp.mpf(int(s)) * scale + mp.mpf(b) for s in row] for row in S]


@pytest.mark.slow
def test_large_reference_agrees_with_mpmath_on_the_smallest_large_case() -> None:
    """Full mpmath at 50 digits (the small cases' path) on n = 129, d = 1."""
    pytest.importorskip("mpmath")
    from portable_siglip.conformance._generate import goldens

    case = next(case for case in LARGE if case.n == 129)
    exact = goldens(case.img, case.txt, case.scale, case.bias)
    for loss in LOSSES:
        golden, want = case.goldens[loss], exact[loss]
        rows = list(golden.rows or ())
        for what in ("img", "txt"):
            floor = FLOOR * natural_scale(case, what)
            err = _normwise(getattr(golden, what), np.asarray(want[what])[rows], floor)
            assert err < LARGE_RTOL, (loss, what, err)
        for what in ("loss", "scale", "bias"):
            floor = FLOOR * natural_scale(case, what)
            error = abs(getattr(golden, what) - want[what])
            assert error <= LARGE_RTOL * max(abs(want[what]), floor), (loss, what, error)
        for key, value in golden.extra.items():
            assert abs(value - want["extra"][key]) <= LARGE_RTOL * value


@pytest.mark.parametrize("n", [127, 2049])
def test_large_reference_agrees_with_mpmath_on_a_slice(n: int) -> None:
    """The float64 reference of the first 96 pairs of n = 2049, t = 118 vs mpmath.

    Loss, scale and bias gradients and two gradient rows of both losses, with the logits
    formed exactly from integers (the mpmath path's own S would take far longer).
    """
    mp = pytest.importorskip("mpmath")
    from portable_siglip.conformance import _generate

    case = next(case for case in LARGE if case.n == n)
    m, rows, d = 96, (0, 95), case.d
    img, txt = np.array(case.img[:m]), np.array(case.txt[:m])
    ours = _generate.reference(img, txt, case.scale, case.bias, rows)
    with mp.workdps(_generate.DIGITS):
        Z = _exact_mp_logits(mp, img, txt, case.scale, case.bias)
        S = [[(z - mp.mpf(case.bias)) / mp.mpf(case.scale) for z in row] for row in Z]
        t = mp.mpf(case.scale)
        sigmoid_loss, G_sigmoid = _generate._sigmoid(mp, Z)
        softmax_loss, G_softmax, extra = _generate._softmax(mp, Z)
        for loss, value, G in (
            ("sigmoid", sigmoid_loss, G_sigmoid),
            ("softmax", softmax_loss, G_softmax),
        ):
            got = ours[loss]
            assert abs(got["loss"] - float(value)) <= LARGE_RTOL * float(value), loss
            d_scale = mp.fsum(G[i][j] * S[i][j] for i in range(m) for j in range(m))
            assert abs(got["scale"] - float(d_scale)) <= LARGE_RTOL * abs(float(d_scale))
            if loss == "sigmoid":
                d_bias = mp.fsum(mp.fsum(row) for row in G)
                assert abs(got["bias"] - float(d_bias)) <= LARGE_RTOL * abs(float(d_bias))
            for r, i in enumerate(rows):
                d_img = [t * mp.fdot([G[i][j] for j in range(m)], txt[:, k]) for k in range(d)]
                d_txt = [t * mp.fdot([G[j][i] for j in range(m)], img[:, k]) for k in range(d)]
                assert _normwise(got["img"][r], [float(v) for v in d_img]) < LARGE_RTOL
                assert _normwise(got["txt"][r], [float(v) for v in d_txt]) < LARGE_RTOL
        for key in ("image_to_text", "text_to_image"):
            assert math.isclose(ours["softmax"]["extra"][key], float(extra[key]), rel_tol=1e-13)


def test_last_rows_of_the_largest_case_agree_with_mpmath() -> None:
    """Sigmoid gradient rows 1024 and 2048 of n = 2049 (the tail tile), in mpmath.

    A sigmoid gradient row needs one row (or column) of the logits only: 2049 entries.
    """
    mp = pytest.importorskip("mpmath")
    case = max(LARGE, key=lambda case: case.n)
    golden = case.goldens["sigmoid"]
    rows = list(golden.rows or ())
    n, columns = case.n, np.arange(0, case.d, 8)  # 32 of the 256 columns
    with mp.workdps(50):
        t = mp.mpf(case.scale)
        for i in (1024, n - 1):
            for what, x, y in (("img", case.img, case.txt), ("txt", case.txt, case.img)):
                (Z,) = _exact_mp_logits(mp, x[i : i + 1], y, case.scale, case.bias)
                G = [
                    -1 / (1 + mp.exp(z)) / n if j == i else 1 / (1 + mp.exp(-z)) / n
                    for j, z in enumerate(Z)
                ]
                want = [float(t * mp.fdot(G, y[:, k])) for k in columns]
                got = getattr(golden, what)[rows.index(i)][columns]
                assert _normwise(got, want) < LARGE_RTOL, (what, i)
