"""Generate ``goldens.json.gz``: the inputs and high-precision outputs of the golden cases.

Run ``python -m portable_siglip.conformance._generate [--out PATH]``; without ``--out`` it
rewrites ``goldens.json.gz`` beside :mod:`portable_siglip.conformance._cases` (in an
editable install, the repository's ``conformance/`` folder). The output is a pure function
of this file: the same bytes on every run and every machine.

How the numbers are made:

1. The inputs are drawn with :func:`numpy.random.default_rng` from fixed seeds and rounded
   to the bfloat16 grid (8 significant bits, round to nearest even), with magnitudes below
   ``2**-14`` flushed to zero. Every input is then exact, and normal, in float64, float32,
   float16 and bfloat16. ``scale`` and ``bias`` are chosen exact likewise.
2. Every output is computed with mpmath at :data:`DIGITS` significant digits from the exact
   input values, following docs/math.md, never by the code under test. Each entry of
   ``G = dL/dZ`` is evaluated to full relative precision (``sigmoid(Z_ii) - 1`` as
   ``-sigmoid(-Z_ii)``, ``softmax_ii - 1`` as minus the sum of the off-diagonal
   probabilities), so no digits are lost to cancellation even when ``|Z|`` is in the
   thousands.
3. The outputs are rounded to the nearest float64 and written as JSON numbers (Python's
   shortest round-trip repr, so reading them back gives the same float64).

This module needs NumPy and mpmath (``pip install mpmath``); it imports nothing of the
library's loss code.
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ._cases import GOLDENS_PATH

__all__ = [
    "DIGITS",
    "CaseInputs",
    "case_inputs",
    "generate",
    "goldens",
    "main",
    "make_case",
    "max_abs_logit",
    "to_grid",
    "write",
]

#: Working precision of mpmath, in significant decimal digits.
DIGITS = 50

#: Smallest magnitude kept by :func:`to_grid` (float16's smallest normal number).
TINY = 2.0**-14

#: Significant bits kept by :func:`to_grid` (bfloat16's precision).
BITS = 8

Matrix = list[list[Any]]  # rows of mpmath.mpf


@dataclass(frozen=True)
class CaseInputs:
    """The inputs of one golden case, before its outputs are computed.

    Attributes
    ----------
    name : str
        Unique, descriptive identifier.
    img, txt : numpy.ndarray, shape (n, d), float64
        Inputs, on the bfloat16 grid.
    scale, bias : float
        ``t`` and ``b``, exact in bfloat16.
    tags : tuple of str
        Tags of the case (see :class:`portable_siglip.conformance._cases.Case`).
    """

    name: str
    img: NDArray[np.float64]
    txt: NDArray[np.float64]
    scale: float
    bias: float
    tags: tuple[str, ...]

    @property
    def n(self) -> int:
        """Number of pairs."""
        return int(self.img.shape[0])

    @property
    def d(self) -> int:
        """Feature dimension."""
        return int(self.img.shape[1])


def _mpmath() -> Any:
    try:
        return importlib.import_module("mpmath")
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "generating the goldens needs mpmath: python -m pip install 'mpmath>=1.3'"
        ) from exc


# --------------------------------------------------------------------------- inputs


def to_grid(x: Any) -> NDArray[np.float64]:
    """Round to the bfloat16 grid, flushing magnitudes below ``2**-14`` to zero.

    Parameters
    ----------
    x : array_like
        Finite values.

    Returns
    -------
    numpy.ndarray, float64
        ``x`` rounded to :data:`BITS` significant bits (to nearest, ties to even), with
        every ``|value| < 2**-14`` replaced by zero: exact and normal in float16 and
        bfloat16 (for magnitudes below 65504).

    Examples
    --------
    >>> to_grid([1 / 3, 1e-5, -2.0]).tolist()
    [0.333984375, 0.0, -2.0]
    """
    values = np.asarray(x, dtype=np.float64)
    mantissa, exponent = np.frexp(values)
    rounded = np.ldexp(np.round(mantissa * 2**BITS) / 2**BITS, exponent)
    rounded[np.abs(rounded) < TINY] = 0.0
    out: NDArray[np.float64] = rounded + 0.0  # no negative zeros
    return out


def _normalise(x: NDArray[np.float64]) -> NDArray[np.float64]:
    # math.fsum and math.sqrt are correctly rounded: the same bits on every machine.
    norms = np.array([math.sqrt(math.fsum(float(v) ** 2 for v in row)) for row in x])
    out: NDArray[np.float64] = x / norms[:, None]
    return out


def _unit_rows(rng: np.random.Generator, n: int, d: int) -> NDArray[np.float64]:
    return _normalise(rng.standard_normal((n, d)))


def _pairs(
    seed: int, n: int, d: int, noise: float = 0.5
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Draw unit image rows and correlated text rows ``normalise(img + noise * N(0, 1/d))``."""
    rng = np.random.default_rng(seed)
    img = _unit_rows(rng, n, d)
    txt = _normalise(img + noise * rng.standard_normal((n, d)) / math.sqrt(d))
    return to_grid(img), to_grid(txt)


def _case(
    name: str,
    img: Any,
    txt: Any,
    scale: float,
    bias: float,
    *tags: str,
) -> CaseInputs:
    return CaseInputs(
        name=name,
        img=to_grid(img),
        txt=to_grid(txt),
        scale=float(to_grid([scale])[0]),
        bias=float(to_grid([bias])[0]),
        tags=tags,
    )


def _random(seed: int, n: int, d: int, scale: float = 10.0, bias: float = -10.0) -> CaseInputs:
    img, txt = _pairs(seed, n, d)
    return _case(f"random-n{n}-d{d}", img, txt, scale, bias, "random")


def _range(seed: int, n: int, d: int, scale: float, bias: float) -> CaseInputs:
    img, txt = _pairs(seed, n, d)
    return _case(f"range-n{n}-d{d}-t{scale:g}-b{bias:g}", img, txt, scale, bias, "range")


def _stress_aligned() -> CaseInputs:
    # Half the pairs aligned, half anti-aligned: Z_ii ~ +280 and -320.
    rng = np.random.default_rng(301)
    img = to_grid(_unit_rows(rng, 6, 4))
    txt = np.concatenate([img[:3], -img[3:]])
    return _case("stress-aligned", img, txt, 300.0, -20.0, "stress")


def _stress_huge() -> CaseInputs:
    # Aligned pairs (txt = img) at t = 1000, so |Z| ~ 1000. Rows 0 and 1 are nearly
    # parallel (t * (1 - cos) of a few units): without them every softmax probability
    # off the diagonal would be below exp(-50) and the softmax gradients would vanish.
    rng = np.random.default_rng(302)
    img = _unit_rows(rng, 5, 3)
    img[1] = _normalise((img[0] + 0.06 * rng.standard_normal(3))[None, :])[0]
    img = to_grid(img)
    return _case("stress-huge", img, img, 1000.0, 0.0, "stress")


def _stress_f16() -> CaseInputs:
    img, txt = _pairs(303, 8, 4)
    return _case("stress-f16", img, txt, 30.0, -10.0, "stress")


def case_inputs() -> tuple[CaseInputs, ...]:
    """Build the inputs of every golden case, deterministically.

    Returns
    -------
    tuple of CaseInputs
        In the order of the data file: tiny, random, range, then stress cases.

    Examples
    --------
    >>> cases = case_inputs()
    >>> cases[0].name, cases[0].img.tolist(), cases[0].scale
    ('n1-d1', [[0.5]], 10.0)
    """
    pair = _pairs(101, 1, 5)
    same = np.tile([0.5, -0.5, 0.70703125], (5, 1))
    tiny = (
        _case("n1-d1", [[0.5]], [[0.75]], 10.0, -10.0, "tiny"),
        _case("n1-d5", pair[0], pair[1], 10.0, -10.0, "tiny"),
        _case("identity-4", np.eye(4), np.eye(4), 10.0, -10.0, "tiny"),
        _case("identical-rows-5x3", same, same, 10.0, -10.0, "tiny"),
        _case("zero-rows-4x3", np.zeros((4, 3)), np.zeros((4, 3)), 10.0, -10.0, "tiny"),
        _case(
            "two-pairs-hand",  # S = [[1, .5], [0, .5]], Z = [[1, 0], [-1, 0]]
            [[1.0, 0.0], [0.0, 1.0]],
            [[1.0, 0.0], [0.5, 0.5]],
            2.0,
            -1.0,
            "tiny",
        ),
    )
    # n multiples of 8, 16 and 32, and n that are not: a dropped tail block shows up.
    random = tuple(
        _random(200 + k, n, d)
        for k, (n, d) in enumerate(
            [(7, 3), (13, 32), (16, 8), (17, 5), (24, 11), (32, 6), (33, 17), (5, 64)]
        )
    )
    extremes = [(9, 4, 1.0, 0.0), (10, 5, 118.0, -12.75), (11, 6, 0.5, 20.0)]
    extremes += [(12, 8, 300.0, -20.0), (10, 7, 20.0, 5.0)]
    ranges = tuple(_range(250 + k, *spec) for k, spec in enumerate(extremes))
    stress = (_stress_aligned(), _stress_huge(), _stress_f16())
    return tiny + random + ranges + stress


# --------------------------------------------------------------------------- outputs


def _mp_matrix(mp: Any, x: NDArray[np.float64]) -> Matrix:
    return [[mp.mpf(float(v)) for v in row] for row in x]  # exact: float64 -> mpf


def _similarities(mp: Any, img: Matrix, txt: Matrix) -> Matrix:
    # fdot of DIGITS-digit numbers; exact for these short bfloat16 inputs.
    return [[mp.fdot(a, b) for b in txt] for a in img]


def _chain_rule(
    mp: Any, G: Matrix, img: Matrix, txt: Matrix, S: Matrix, t: Any
) -> tuple[Matrix, Matrix, Any, Any]:
    """``(t G txt, t G^T img, sum G * S, sum G)`` from ``G = dL/dZ``."""
    n, d = len(img), len(img[0])
    cols = [[G[i][j] for i in range(n)] for j in range(n)]
    d_img = [[t * mp.fdot(G[i], [txt[j][k] for j in range(n)]) for k in range(d)] for i in range(n)]
    d_txt = [
        [t * mp.fdot(cols[j], [img[i][k] for i in range(n)]) for k in range(d)] for j in range(n)
    ]
    d_scale = mp.fsum(mp.fdot(G[i], S[i]) for i in range(n))
    d_bias = mp.fsum(mp.fsum(row) for row in G)
    return d_img, d_txt, d_scale, d_bias


def _sigmoid(mp: Any, Z: Matrix) -> tuple[Any, Matrix]:
    """Sigmoid loss and ``G``, each entry to full relative precision."""
    n = len(Z)
    terms = []
    G = []
    for i in range(n):
        row = []
        for j in range(n):
            z = Z[i][j]
            if i == j:  # softplus(-z); sigmoid(z) - 1 = -sigmoid(-z)
                terms.append(mp.log1p(mp.exp(-z)))
                row.append(-1 / (1 + mp.exp(z)) / n)
            else:  # softplus(z); sigmoid(z)
                terms.append(mp.log1p(mp.exp(z)))
                row.append(1 / (1 + mp.exp(-z)) / n)
        G.append(row)
    return mp.fsum(terms) / n, G


def _cross_entropy(mp: Any, Z: Matrix) -> tuple[Any, Matrix]:
    """Row-wise ``mean_i (lse_j Z_ij - Z_ii)`` and ``softmax_rows(Z) - I``."""
    n = len(Z)
    terms = []
    P = []
    for i in range(n):
        # lse_j Z_ij - Z_ii = log1p(sum_{j != i} exp(Z_ij - Z_ii)): accurate when small.
        others = mp.fsum(mp.exp(Z[i][j] - Z[i][i]) for j in range(n) if j != i)
        excess = mp.log1p(others)
        terms.append(excess)
        lse = Z[i][i] + excess
        row = [mp.exp(Z[i][j] - lse) if j != i else mp.mpf(0) for j in range(n)]
        row[i] = -mp.fsum(row)  # softmax_ii - 1, without cancellation
        P.append(row)
    return mp.fsum(terms) / n, P


def _softmax(mp: Any, Z: Matrix) -> tuple[Any, Matrix, dict[str, Any]]:
    """Symmetric softmax loss, ``G`` and the two directional cross-entropies."""
    n = len(Z)
    image_to_text, R = _cross_entropy(mp, Z)
    text_to_image, Ct = _cross_entropy(mp, [list(col) for col in zip(*Z, strict=True)])
    G = [[(R[i][j] + Ct[j][i]) / (2 * n) for j in range(n)] for i in range(n)]
    loss = (image_to_text + text_to_image) / 2
    return loss, G, {"image_to_text": image_to_text, "text_to_image": text_to_image}


def _float(x: Any) -> float:
    """Nearest float64 (mpmath rounds to nearest), with no negative zero."""
    value = float(x) + 0.0
    if not math.isfinite(value):
        raise OverflowError(f"golden value {x} does not fit in float64")
    return value


def _floats(m: Matrix) -> list[list[float]]:
    return [[_float(v) for v in row] for row in m]


def max_abs_logit(img: Any, txt: Any, scale: float, bias: float) -> float:
    """``max |t * img @ txt.T + b|`` of exact inputs, rounded to the nearest float64.

    Parameters
    ----------
    img, txt : array_like, shape (n, d)
        Inputs.
    scale, bias : float
        ``t`` and ``b``.

    Returns
    -------
    float
        The largest logit magnitude.

    Examples
    --------
    >>> max_abs_logit([[0.5]], [[0.75]], 10.0, -10.0)
    6.25
    """
    mp = _mpmath()
    with mp.workdps(DIGITS):
        S = _similarities(mp, _mp_matrix(mp, np.asarray(img)), _mp_matrix(mp, np.asarray(txt)))
        t, b = mp.mpf(float(scale)), mp.mpf(float(bias))
        return _float(max(abs(t * s + b) for row in S for s in row))


def goldens(img: Any, txt: Any, scale: float, bias: float) -> dict[str, dict[str, Any]]:
    """Both losses and their gradients at :data:`DIGITS` digits, rounded to float64.

    Parameters
    ----------
    img, txt : array_like, shape (n, d)
        Inputs, taken as exact float64 values.
    scale, bias : float
        ``t`` and ``b``.

    Returns
    -------
    dict
        ``{"sigmoid": golden, "softmax": golden}``, each golden a JSON-ready mapping with
        keys ``loss``, ``img``, ``txt`` (nested lists), ``scale``, ``bias`` and ``extra``
        (``{}`` for the sigmoid loss; ``image_to_text`` and ``text_to_image`` for the
        softmax loss). The softmax ``bias`` gradient is exactly ``0.0``.

    Examples
    --------
    >>> g = goldens([[1.0]], [[1.0]], 1.0, 0.0)
    >>> round(g["sigmoid"]["loss"], 12), g["softmax"]["loss"]
    (0.313261687518, 0.0)
    """
    mp = _mpmath()
    with mp.workdps(DIGITS):
        x = _mp_matrix(mp, np.asarray(img, dtype=np.float64))
        y = _mp_matrix(mp, np.asarray(txt, dtype=np.float64))
        t, b = mp.mpf(float(scale)), mp.mpf(float(bias))
        S = _similarities(mp, x, y)
        Z = [[t * s + b for s in row] for row in S]

        result: dict[str, dict[str, Any]] = {}
        loss, G = _sigmoid(mp, Z)
        d_img, d_txt, d_scale, d_bias = _chain_rule(mp, G, x, y, S, t)
        result["sigmoid"] = {
            "loss": _float(loss),
            "img": _floats(d_img),
            "txt": _floats(d_txt),
            "scale": _float(d_scale),
            "bias": _float(d_bias),
            "extra": {},
        }

        loss, G, extra = _softmax(mp, Z)
        d_img, d_txt, d_scale, d_bias = _chain_rule(mp, G, x, y, S, t)
        # sum(G) = 0 exactly (shift invariance); the computed sum shows only rounding.
        if abs(d_bias) > mp.mpf(10) ** (10 - DIGITS) * max(1, abs(d_scale)):
            raise ArithmeticError(f"softmax bias gradient {d_bias} is not zero")
        result["softmax"] = {
            "loss": _float(loss),
            "img": _floats(d_img),
            "txt": _floats(d_txt),
            "scale": _float(d_scale),
            "bias": 0.0,
            "extra": {key: _float(value) for key, value in extra.items()},
        }
        return result


def make_case(inputs: CaseInputs) -> dict[str, Any]:
    """Compute the JSON-ready record of one case, as :func:`_cases.load_cases` reads it.

    Parameters
    ----------
    inputs : CaseInputs
        The case's inputs.

    Returns
    -------
    dict
        Keys ``name``, ``img``, ``txt``, ``scale``, ``bias``, ``tags``, ``max_abs_logit``
        and ``goldens``.
    """
    return {
        "name": inputs.name,
        "img": inputs.img.tolist(),
        "txt": inputs.txt.tolist(),
        "scale": inputs.scale,
        "bias": inputs.bias,
        "tags": list(inputs.tags),
        "max_abs_logit": max_abs_logit(inputs.img, inputs.txt, inputs.scale, inputs.bias),
        "goldens": goldens(inputs.img, inputs.txt, inputs.scale, inputs.bias),
    }


def generate(cases: Sequence[CaseInputs] | None = None) -> dict[str, Any]:
    """Compute the whole data document: provenance and every case.

    Parameters
    ----------
    cases : sequence of CaseInputs, optional
        Defaults to :func:`case_inputs`.

    Returns
    -------
    dict
        ``{"generator", "digits", "mpmath_version", "cases"}``.
    """
    mp = _mpmath()
    cases = case_inputs() if cases is None else tuple(cases)
    names = [case.name for case in cases]
    if len(set(names)) != len(names):
        raise ValueError("case names must be unique")
    return {
        "generator": "python -m portable_siglip.conformance._generate",
        "digits": DIGITS,
        "mpmath_version": mp.__version__,
        "cases": [make_case(case) for case in cases],
    }


def write(document: dict[str, Any], path: Path) -> int:
    """Write `document` as compact, reproducible gzipped JSON.

    Parameters
    ----------
    document : dict
        As returned by :func:`generate`.
    path : pathlib.Path
        Destination.

    Returns
    -------
    int
        Size of the file written, in bytes.
    """
    text = json.dumps(document, separators=(",", ":"), allow_nan=False) + "\n"
    data = gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)
    path.write_bytes(data)
    return len(data)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: generate every case and write the data file.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status.
    """
    parser = argparse.ArgumentParser(
        prog="python -m portable_siglip.conformance._generate", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--out", type=Path, default=GOLDENS_PATH, help=f"output file (default: {GOLDENS_PATH})"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    document = generate()
    size = write(document, args.out)
    elapsed = time.perf_counter() - start
    for case in document["cases"]:
        n, d = len(case["img"]), len(case["img"][0])
        print(
            f"{case['name']:<28} n={n:<3} d={d:<3} t={case['scale']:<7g} b={case['bias']:<7g} "
            f"max|Z|={case['max_abs_logit']:.6g}"
        )
    print(f"wrote {len(document['cases'])} cases to {args.out} ({size} bytes) in {elapsed:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
