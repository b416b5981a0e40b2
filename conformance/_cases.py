"""The golden cases: inputs and high-precision expected outputs of both losses.

The inputs of every case lie on the bfloat16 grid (8 significant bits, magnitudes well
inside float16's normal range), so they are exactly representable in float64, float32,
float16 and bfloat16: every dtype sees the same inputs, and the goldens hold for all of
them. ``scale`` and ``bias`` are representable likewise.

The expected outputs were computed by ``python -m portable_siglip.conformance._generate``
(never by the code under test) and ship as ``goldens.json.gz`` beside this module: with
mpmath at 50 significant digits for the small cases, and with an independent float64
reference with exact and compensated sums for the ``"large"`` cases (n from 127 to 2049).
A large case ships without its inputs, which are regenerated here from its seed (and
checked against a SHA-256 checksum), and with the gradients of a subset of rows only
(:attr:`Golden.rows`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

__all__ = [
    "GOLDENS_PATH",
    "Case",
    "Golden",
    "Sizes",
    "inputs_sha256",
    "load_cases",
    "pairs",
    "to_grid",
]

GOLDENS_PATH = Path(__file__).with_name("goldens.json.gz")


@dataclass(frozen=True)
class Golden:
    """Expected loss and gradients of one loss on one case, rounded to float64.

    ``extra`` holds quantities used only to diagnose failures: for the softmax loss
    ``"image_to_text"`` and ``"text_to_image"``, the two directional cross-entropies
    (each a mean over rows) whose mean is ``loss``.

    ``rows`` is ``None`` when ``img`` and ``txt`` hold every row (shape (n, d)). The large
    cases store only some rows of the two input gradients (the first, those on either side
    of the multiples of 16, 32, 64, 128 and 1024, and the last ones): ``rows`` holds their
    indices, ``img`` and ``txt`` have shape (len(rows), d), and the runner compares those
    rows of the implementation's gradients (:meth:`stored`).

    Examples
    --------
    >>> import portable_siglip as ps
    >>> from portable_siglip.conformance import load_cases
    >>> case = next(c for c in load_cases() if c.name == "two-pairs-hand")
    >>> golden = case.goldens["sigmoid"]
    >>> round(golden.loss, 12), golden.img.shape, golden.rows
    (1.006408868078, (2, 2), None)
    >>> loss, grads = ps.sigmoid_loss_and_grad(case.img, case.txt, case.scale, case.bias)
    >>> bool(abs(loss - golden.loss) < 1e-12 and abs(grads.img - golden.img).max() < 1e-12)
    True
    >>> sorted(case.goldens["softmax"].extra)
    ['image_to_text', 'text_to_image']
    """

    loss: float
    img: Any  # numpy.ndarray, shape (n, d) or (len(rows), d), float64
    txt: Any  # numpy.ndarray, shape (n, d) or (len(rows), d), float64
    scale: float
    bias: float
    extra: dict[str, float] = field(default_factory=dict)
    rows: tuple[int, ...] | None = None

    def stored(self, quantity: str, value: Any, n: int) -> Any:
        """Return the part of an implementation's `value` of `quantity` that this golden holds.

        The rows :attr:`rows` of an (n, d) input gradient when only those are stored; any
        other value (the loss, the scale and bias gradients, or a gradient of the wrong
        shape, which the comparison then reports) is returned unchanged.
        """
        if self.rows is None or quantity not in ("img", "txt"):
            return value
        shape: tuple[int, ...] = tuple(getattr(value, "shape", ()))
        if len(shape) != 2 or shape[0] != n:
            return value
        return value[list(self.rows)]


class Sizes:
    """``n`` and ``d`` of a case's ``img`` (n, d), for the dataclasses that hold one."""

    img: Any

    @property
    def n(self) -> int:
        """Number of pairs (of image rows, with ids)."""
        return int(self.img.shape[0])

    @property
    def d(self) -> int:
        """Feature dimension."""
        return int(self.img.shape[1])


@dataclass(frozen=True)
class Case(Sizes):
    """One golden case.

    Attributes
    ----------
    name : str
        Unique, descriptive identifier (``"random-n13-d32"``).
    img, txt : numpy.ndarray, shape (n, d), float64
        Inputs (exact in every float dtype).
    scale, bias : float
        ``t`` and ``b`` (exact in every float dtype).
    tags : frozenset of str
        Any of ``"tiny"`` (hand-checkable), ``"random"``, ``"stress"`` (logits whose naive
        exp overflows float32 or float16), ``"range"`` (extreme scale or bias), ``"large"``
        (n from 127 to 2049, one above and one below multiples of the tile sizes 16 to
        1024; gradients of some rows only, see :attr:`Golden.rows`).
    max_abs_logit : float
        ``max |t * img @ txt.T + b|``, for tolerances.
    goldens : dict
        ``{loss name: Golden}``, one for each loss the data file holds (the sigmoid and the
        softmax loss).
    img_ids, txt_ids : numpy.ndarray or None
        The integer ids of the rows of ``img`` (m,) and ``txt`` (k,) for the cases with
        several positives per row (tag ``"ids"``, :mod:`._ids`); None for the others, whose
        positives are the diagonal.

    Examples
    --------
    >>> from portable_siglip.conformance import load_cases
    >>> case = next(c for c in load_cases() if c.name == "two-pairs-hand")
    >>> case.n, case.d, case.scale, case.bias, sorted(case.tags)
    (2, 2, 2.0, -1.0, ['tiny'])
    >>> case.img.tolist(), case.txt.tolist()
    ([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.5, 0.5]])

    The tags choose a subset to :func:`~portable_siglip.conformance.check` on:

    >>> random = [c for c in load_cases() if "random" in c.tags]
    >>> all(c.n > 1 for c in random)
    True
    """

    name: str
    img: Any
    txt: Any
    scale: float
    bias: float
    tags: frozenset[str]
    max_abs_logit: float
    goldens: dict[str, Golden]
    img_ids: Any = None
    txt_ids: Any = None

    @property
    def k(self) -> int:
        """Number of text rows (``n`` without ids)."""
        return int(self.txt.shape[0])


#: Smallest magnitude kept by :func:`to_grid` (float16's smallest normal number).
TINY = 2.0**-14

#: Significant bits kept by :func:`to_grid` (bfloat16's precision).
BITS = 8


def to_grid(x: Any) -> Any:
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
    import numpy as np

    values = np.asarray(x, dtype=np.float64)
    mantissa, exponent = np.frexp(values)
    rounded = np.ldexp(np.round(mantissa * 2**BITS) / 2**BITS, exponent)
    rounded[np.abs(rounded) < TINY] = 0.0
    return rounded + 0.0  # no negative zeros


def normalise(x: Any) -> Any:
    """Divide each row by its Euclidean norm, the same bits on every machine.

    ``math.fsum`` and ``math.sqrt`` are correctly rounded, and so is each square.
    """
    import numpy as np

    norms = np.array([math.sqrt(math.fsum((row * row).tolist())) for row in x])
    return x / norms[:, None]


def pairs(seed: int, n: int, d: int, noise: float = 0.5) -> tuple[Any, Any]:
    """Draw unit image rows and correlated text rows ``normalise(img + noise * N(0, 1/d))``.

    Both are rounded to the bfloat16 grid (:func:`to_grid`). The golden cases' inputs come
    from here, from fixed seeds; a large case is rebuilt from its seed when it is loaded.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    img = normalise(rng.standard_normal((n, d)))
    txt = normalise(img + noise * rng.standard_normal((n, d)) / math.sqrt(d))
    return to_grid(img), to_grid(txt)


def inputs_sha256(img: Any, txt: Any) -> str:
    """SHA-256 of the inputs as little-endian float64, ``img`` then ``txt``.

    A large case stores it to detect a change of NumPy's random generator.
    """
    import numpy as np

    digest = hashlib.sha256()
    for x in (img, txt):
        digest.update(np.ascontiguousarray(x, dtype="<f8").tobytes())
    return digest.hexdigest()


def _frozen(values: Any, np: Any) -> Any:
    """Return a read-only float64 array: the cases are cached and shared."""
    array = np.array(values, dtype=np.float64)
    array.setflags(write=False)
    return array


def _golden(raw: dict[str, Any], np: Any, rows: Any = None) -> Golden:
    return Golden(
        loss=float(raw["loss"]),
        img=_frozen(raw["img"], np),
        txt=_frozen(raw["txt"], np),
        scale=float(raw["scale"]),
        bias=float(raw["bias"]),
        extra={key: float(value) for key, value in raw.get("extra", {}).items()},
        rows=None if rows is None else tuple(int(i) for i in rows),
    )


def _inputs(raw: dict[str, Any], np: Any) -> tuple[Any, Any]:
    """Return the inputs of a case: stored, or rebuilt from the seed of a large case."""
    if "img" in raw:
        return _frozen(raw["img"], np), _frozen(raw["txt"], np)
    img, txt = pairs(int(raw["seed"]), int(raw["n"]), int(raw["d"]), float(raw["noise"]))
    if inputs_sha256(img, txt) != raw["inputs_sha256"]:
        msg = (
            f"golden case {raw['name']}: the inputs rebuilt from seed {raw['seed']} differ "
            "from those the goldens were computed for (has NumPy's random generator "
            "changed?); regenerate with python -m portable_siglip.conformance._generate"
        )
        raise RuntimeError(msg)
    return _frozen(img, np), _frozen(txt, np)


@cache
def load_cases() -> tuple[Case, ...]:
    """Load every golden case from the shipped data file.

    Returns
    -------
    tuple of Case
        In the order of the file. The result is cached and shared, so its arrays are
        read-only; :func:`check` hands each call of an implementation fresh copies.

    Examples
    --------
    >>> cases = load_cases()
    >>> cases[0].n >= 1 and set(cases[0].goldens) == {"sigmoid", "softmax"}
    True
    """
    import numpy as np

    with gzip.open(GOLDENS_PATH, "rt", encoding="utf-8") as handle:
        data = json.load(handle)
    cases = []
    for raw in data["cases"]:
        img, txt = _inputs(raw, np)
        cases.append(
            Case(
                name=raw["name"],
                img=img,
                txt=txt,
                scale=float(raw["scale"]),
                bias=float(raw["bias"]),
                tags=frozenset(raw["tags"]),
                max_abs_logit=float(raw["max_abs_logit"]),
                goldens={
                    loss: _golden(golden, np, raw.get("rows"))
                    for loss, golden in raw["goldens"].items()
                },
            )
        )
    return tuple(cases)
