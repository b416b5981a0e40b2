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

The ``"large"`` cases (n from 127 to 2049, :func:`large_specs`) are too big for mpmath: their
outputs come from :func:`reference`, an independent float64 evaluation with exact logits and
exact or compensated sums, which refuses to produce a value whose error bound exceeds
:data:`LARGE_RTOL` (1e-13). They are written without their inputs (a seed and a SHA-256
checksum instead) and with the gradients of the rows ``LargeSpec.rows`` only.

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

from ._cases import GOLDENS_PATH, Sizes, inputs_sha256, normalise, pairs, to_grid

__all__ = [
    "DIGITS",
    "CaseInputs",
    "case_inputs",
    "generate",
    "goldens",
    "large_specs",
    "main",
    "make_case",
    "make_large_case",
    "max_abs_logit",
    "reference",
    "to_grid",
    "write",
]

#: Working precision of mpmath, in significant decimal digits.
DIGITS = 50

Matrix = list[list[Any]]  # rows of mpmath.mpf


@dataclass(frozen=True)
class CaseInputs(Sizes):
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


def _mpmath() -> Any:
    try:
        return importlib.import_module("mpmath")
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "generating the goldens needs mpmath: python -m pip install 'mpmath>=1.3'"
        ) from exc


# --------------------------------------------------------------------------- inputs


def _normalise(x: NDArray[np.float64]) -> NDArray[np.float64]:
    out: NDArray[np.float64] = normalise(x)
    return out


def _unit_rows(rng: np.random.Generator, n: int, d: int) -> NDArray[np.float64]:
    return _normalise(rng.standard_normal((n, d)))


def _pairs(
    seed: int, n: int, d: int, noise: float = 0.5
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Draw unit image rows and correlated text rows (:func:`._cases.pairs`)."""
    img, txt = pairs(seed, n, d, noise)
    return img, txt


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


# --------------------------------------------------------------------------- large cases

#: Rows of the logit matrix per tile of the large-case reference.
TILE = 256

#: Multiples that a kernel tiles at; each large case's stored gradient rows include the
#: rows on either side of every such multiple below n.
TILE_SIZES = (16, 32, 64, 128, 1024)

#: Bound on the relative error of every value a large case stores (see docs/conformance.md,
#: "The large cases"): the generator refuses to write a case whose a-priori bound exceeds it.
LARGE_RTOL = 1e-13

#: Unit roundoff of float64.
_U = 2.0**-53


@dataclass(frozen=True)
class LargeSpec:
    """A large case: its inputs come from ``pairs(seed, n, d)`` and are not stored."""

    name: str
    seed: int
    n: int
    d: int
    scale: float
    bias: float
    noise: float = 0.5

    def inputs(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Image and text inputs, on the bfloat16 grid."""
        return _pairs(self.seed, self.n, self.d, self.noise)

    @property
    def rows(self) -> tuple[int, ...]:
        """Gradient rows stored.

        The first and last two, and either side of the first and of the last multiple
        below n of each tile size (the start of the second tile and of the tail tile).
        """
        marks = {0, 1, self.n - 2, self.n - 1}
        for size in TILE_SIZES:
            last = (self.n - 1) // size * size
            if last >= size:
                marks |= {size - 1, size, last - 1, last}
        return tuple(sorted(i for i in marks if 0 <= i < self.n))


def _large(seed: int, n: int, d: int, scale: float, bias: float, noise: float = 0.5) -> LargeSpec:
    t = float(to_grid([scale])[0])
    b = float(to_grid([bias])[0])
    return LargeSpec(f"large-n{n}-d{d}-t{t:g}-b{b:g}", seed, n, d, t, b, noise)


def large_specs() -> tuple[LargeSpec, ...]:
    """Return the large cases: n one below and one above multiples of 16, 32, 64, 128 and 1024.

    127 and 129 sit either side of 128 (and of multiples of 16, 32 and 64), 1023 and 1025
    either side of 1024, 2049 above 2048. ``d`` runs from 1 to 1152. Scale and bias: the
    SigLIP init (10, -10), CLIP's 1/0.07 on the bfloat16 grid (14.3125) with and without a
    bias, and a trained SigLIP's (118, -13). At t = 118 the pairs are drawn noisier
    (cosine ~0.24 instead of ~0.9), as in a hard batch: otherwise every softmax
    probability off the diagonal is below exp(-50) and the case tests nothing.
    """
    return (
        _large(400, 127, 1152, 10.0, -10.0),
        _large(401, 129, 1, 1 / 0.07, 0.0),
        _large(402, 1023, 768, 10.0, -10.0),
        _large(403, 1025, 64, 1 / 0.07, -10.0),
        _large(404, 2049, 256, 118.0, -13.0, noise=4.0),
    )


def _exact_similarities(img: NDArray[np.float64], txt: NDArray[np.float64]) -> NDArray[np.float64]:
    """``img @ txt.T`` exactly, in row tiles.

    Every input is a multiple of 2**-21 (8 significant bits, magnitude at least 2**-14),
    so every product is a multiple of 2**-42; with rows of norm at most 2, every partial
    sum of a dot product, in any order, is below 4 = 2**2 in magnitude, so it needs at
    most 44 bits and float64 holds it exactly: the BLAS summation order does not matter.
    """
    for x in (img, txt):
        if not np.array_equal(x * 2.0**21, np.round(x * 2.0**21)):
            raise ValueError("inputs are not multiples of 2**-21")
        if np.max(np.sqrt(np.einsum("ij,ij->i", x, x)), initial=0.0) > 2:
            raise ValueError("input rows must have a norm of at most 2")
    n = img.shape[0]
    S = np.empty((n, txt.shape[0]))
    for start in range(0, n, TILE):
        S[start : start + TILE] = img[start : start + TILE] @ txt.T
    return S


def _fsum(x: NDArray[np.float64]) -> float:
    """Correctly rounded sum of every entry (exact partials, one rounding)."""
    return math.fsum(np.ravel(x).tolist())


def _split(x: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Veltkamp split: ``x = hi + lo`` exactly, each with at most 26 significant bits."""
    c = (2.0**27 + 1.0) * x
    hi = c - (c - x)
    return hi, x - hi


def _rows_times(
    W: NDArray[np.float64], X: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """``W @ X`` with compensated (Neumaier) sums of exact products, and ``|W| @ |X|``.

    ``X`` has 8 significant bits, the halves of each ``W`` entry 26: every product
    ``hi * x`` and ``lo * x`` is exact, so the only rounding is that of the sum, which
    Neumaier's summation keeps below 2u|sum| + O(n u^2) sum|terms|.
    """
    hi, lo = _split(W)
    total = np.zeros((W.shape[0], X.shape[1]))
    carry = np.zeros_like(total)
    for j in range(W.shape[1]):
        for part in (hi, lo):
            term = part[:, j : j + 1] * X[j]
            new = total + term
            big = np.abs(total) >= np.abs(term)
            carry += np.where(big, (total - new) + term, (term - new) + total)
            total = new
    return total + carry, np.abs(W) @ np.abs(X)


def _large_gradients(
    G: NDArray[np.float64],
    error: NDArray[np.float64],
    S: NDArray[np.float64],
    img: NDArray[np.float64],
    txt: NDArray[np.float64],
    t: float,
    rows: Sequence[int],
    floors: dict[str, float],
) -> dict[str, Any]:
    """Return the stored rows of ``t G txt`` and ``t G^T img``, ``sum G * S`` and ``sum G``.

    ``G`` holds ``n dL/dZ`` and `error` a bound on the absolute error of each of its
    entries; every result is divided by n at the end. Raises when the error bound of a
    value, relative to the value or to the suite's absolute floor (`floors`), exceeds
    :data:`LARGE_RTOL`.
    """
    n = G.shape[0]
    index = list(rows)
    d_img, size_img = _rows_times(G[index], txt)
    d_txt, size_txt = _rows_times(np.ascontiguousarray(G[:, index].T), img)
    products = G * S
    out = {
        "img": (t * d_img / n).tolist(),
        "txt": (t * d_txt / n).tolist(),
        "scale": _fsum(products) / n,
        "bias": _fsum(G) / n,
    }
    # Error bounds: the entries' own errors, then u for G * S, 2u for the compensated
    # sums and 2u for the final t * and / n.
    bounds = {
        "img": t * float(np.max(error[index] @ np.abs(txt) + 4 * _U * size_img)) / n,
        "txt": t * float(np.max(error[:, index].T @ np.abs(img) + 4 * _U * size_txt)) / n,
        "scale": (_fsum(error * np.abs(S)) + 3 * _U * _fsum(np.abs(products))) / n,
        "bias": (_fsum(error) + 2 * _U * _fsum(np.abs(G))) / n,
    }
    sizes = {
        "img": float(np.max(np.abs(out["img"]))),
        "txt": float(np.max(np.abs(out["txt"]))),
        "scale": abs(out["scale"]),
        "bias": abs(out["bias"]),
    }
    for name, bound in bounds.items():
        if bound > LARGE_RTOL * max(sizes[name], floors[name]):
            raise ArithmeticError(
                f"the error bound {bound:.2e} of dL/d{name} exceeds {LARGE_RTOL:.0e} "
                f"of its size {max(sizes[name], floors[name]):.2e}"
            )
    out["bounds"] = {name: bound / max(sizes[name], floors[name]) for name, bound in bounds.items()}
    return out


def _large_sigmoid(
    Z: NDArray[np.float64],
) -> tuple[float, NDArray[np.float64], NDArray[np.float64]]:
    """Sigmoid loss, ``n G`` and a bound on the absolute error of each ``n G`` entry."""
    n = Z.shape[0]
    diagonal = np.eye(n, dtype=bool)
    with np.errstate(over="ignore"):
        # softplus(-l Z): softplus(-Z_ii) on the diagonal, softplus(Z_ij) off it; positive
        # terms, each within a few ulps, summed with a single rounding per row.
        terms = np.logaddexp(0.0, np.where(diagonal, -Z, Z))
        loss = math.fsum(_fsum(row) for row in terms) / n
        # sigmoid(Z_ij) off the diagonal, sigmoid(Z_ii) - 1 = -sigmoid(-Z_ii) on it:
        # exp (1 ulp), 1 + (u), 1 / (u): 4u relative.
        G = np.where(diagonal, -1.0 / (1.0 + np.exp(Z)), 1.0 / (1.0 + np.exp(-Z)))
    return loss, G, 4 * _U * np.abs(G)


def _large_cross_entropy(
    Z: NDArray[np.float64],
) -> tuple[float, NDArray[np.float64], NDArray[np.float64]]:
    """Row-wise ``mean_i (lse_j Z_ij - Z_ii)``, ``softmax_rows(Z) - I`` and its error bound.

    Off the diagonal ``exp(D - e)``, ``D = Z_ij - Z_ii`` and ``e = log1p(sum exp(D))``,
    is off by at most ``(|D| + |D - e| + 8) u`` relative (two roundings of the argument, e
    to a few ulps, exp to one); the diagonal, minus the sum of its row, by the sum of
    those errors plus 2u.
    """
    n = Z.shape[0]
    excess = np.empty(n)
    P = np.empty_like(Z)
    error = np.empty_like(Z)
    for start in range(0, n, TILE):
        block = Z[start : start + TILE]
        index = np.arange(start, min(start + TILE, n))
        # Z_ij - Z_ii: rounded at most once (u |D|), which the error bound accounts for.
        D = block - block[np.arange(len(index)), index][:, None]
        E = np.exp(D)
        E[np.arange(len(index)), index] = 0.0
        for r, i in enumerate(index):
            excess[i] = math.log1p(_fsum(E[r]))
            row = np.exp(D[r] - excess[i])
            row[i] = 0.0
            row[i] = -_fsum(row)  # softmax_ii - 1, without cancellation
            P[i] = row
            bound = (np.abs(D[r]) + np.abs(D[r] - excess[i]) + 8) * _U * np.abs(row)
            bound[i] = 0.0
            bound[i] = _fsum(bound) + 2 * _U * abs(row[i])
            error[i] = bound
    return _fsum(excess) / n, P, error


def large_goldens(spec: LargeSpec) -> dict[str, Any]:
    """Both losses and the stored gradients of a large case (:func:`reference`)."""
    img, txt = spec.inputs()
    return reference(img, txt, spec.scale, spec.bias, spec.rows)


def reference(
    img: NDArray[np.float64],
    txt: NDArray[np.float64],
    scale: float,
    bias: float,
    rows: Sequence[int],
) -> dict[str, Any]:
    """Both losses and the gradient rows `rows` in float64, to within :data:`LARGE_RTOL`.

    The reference is written from the formulas (docs/math.md), independently of the
    library's kernels. ``S = img @ txt.T`` and ``Z = t S + b`` are exact
    (:func:`_exact_similarities`; t S and t S + b are multiples of 2**-46 below 2**7). Each
    entry of ``G = dL/dZ`` is evaluated to a few ulps with the same care as the mpmath
    path (``-sigmoid(-Z_ii)``, ``log1p`` of the off-diagonal sum, ``softmax_ii - 1`` as
    minus the off-diagonal sum); every sum over n or n^2 terms is exact-then-rounded
    (``math.fsum``) or compensated with exact products (:func:`_rows_times`).

    Returns
    -------
    dict
        ``{"sigmoid": golden, "softmax": golden}`` as :func:`goldens` returns them, with
        ``img`` and ``txt`` holding the rows `rows` only.
    """
    t, b = float(scale), float(bias)
    S = _exact_similarities(img, txt)
    Z = t * S + b
    if not np.array_equal(Z * 2.0**46, np.round(Z * 2.0**46)) or np.max(np.abs(Z)) >= 2**7:
        raise ArithmeticError("Z = t S + b is not exact in float64 for this scale and bias")
    floors = {
        "img": 1e-3 * t * float(np.max(np.abs(txt))),
        "txt": 1e-3 * t * float(np.max(np.abs(img))),
        "scale": 1e-3 * float(np.max(np.abs(S))),
        "bias": 1e-3,
    }
    result: dict[str, Any] = {}
    loss, G, error = _large_sigmoid(Z)
    result["sigmoid"] = {
        "loss": loss,
        **_large_gradients(G, error, S, img, txt, t, rows, floors),
        "extra": {},
    }
    image_to_text, R, error_rows = _large_cross_entropy(Z)
    text_to_image, C, error_cols = _large_cross_entropy(np.ascontiguousarray(Z.T))
    G = (R + C.T) / 2
    error = (error_rows + error_cols.T) / 2 + _U * np.abs(G)
    floors["bias"] = 1.0  # the softmax bias gradient is zero: only rounding is left
    grads = _large_gradients(G, error, S, img, txt, t, rows, floors)
    if abs(grads["bias"]) > 1e-13:
        raise ArithmeticError(f"softmax bias gradient {grads['bias']} is not zero")
    result["softmax"] = {
        "loss": (image_to_text + text_to_image) / 2,
        **grads,
        "bias": 0.0,
        "extra": {"image_to_text": image_to_text, "text_to_image": text_to_image},
    }
    for golden in result.values():
        golden.pop("bounds")
        for key in ("loss", "scale", "bias"):
            golden[key] = _float(golden[key])
        golden["img"] = [[_float(v) for v in row] for row in golden["img"]]
        golden["txt"] = [[_float(v) for v in row] for row in golden["txt"]]
        golden["extra"] = {key: _float(v) for key, v in golden["extra"].items()}
    return result


def make_large_case(spec: LargeSpec) -> dict[str, Any]:
    """Compute the JSON-ready record of a large case: no inputs, a seed and their checksum.

    Keys ``name``, ``seed``, ``n``, ``d``, ``noise``, ``inputs_sha256``, ``scale``, ``bias``,
    ``tags`` (``["large"]``), ``max_abs_logit``, ``rows`` and ``goldens``.
    """
    img, txt = spec.inputs()
    S = _exact_similarities(img, txt)
    return {
        "name": spec.name,
        "seed": spec.seed,
        "n": spec.n,
        "d": spec.d,
        "noise": spec.noise,
        "inputs_sha256": inputs_sha256(img, txt),
        "scale": spec.scale,
        "bias": spec.bias,
        "tags": ["large"],
        "max_abs_logit": _float(np.max(np.abs(spec.scale * S + spec.bias))),  # exact
        "rows": list(spec.rows),
        "goldens": large_goldens(spec),
    }


def generate(
    cases: Sequence[CaseInputs] | None = None, large: Sequence[LargeSpec] | None = None
) -> dict[str, Any]:
    """Compute the whole data document: provenance and every case.

    Parameters
    ----------
    cases : sequence of CaseInputs, optional
        Defaults to :func:`case_inputs`.
    large : sequence of LargeSpec, optional
        Defaults to :func:`large_specs`; they follow the other cases.

    Returns
    -------
    dict
        ``{"generator", "digits", "mpmath_version", "cases"}``.
    """
    mp = _mpmath()
    cases = case_inputs() if cases is None else tuple(cases)
    large = large_specs() if large is None else tuple(large)
    names = [case.name for case in cases] + [spec.name for spec in large]
    if len(set(names)) != len(names):
        raise ValueError("case names must be unique")
    return {
        "generator": "python -m portable_siglip.conformance._generate",
        "digits": DIGITS,
        "mpmath_version": mp.__version__,
        "cases": [make_case(case) for case in cases] + [make_large_case(s) for s in large],
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
        n, d = (case["n"], case["d"]) if "seed" in case else (len(case["img"]), len(case["img"][0]))
        print(
            f"{case['name']:<32} n={n:<4} d={d:<4} t={case['scale']:<7g} b={case['bias']:<7g} "
            f"max|Z|={case['max_abs_logit']:.6g}"
        )
    print(f"wrote {len(document['cases'])} cases to {args.out} ({size} bytes) in {elapsed:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
