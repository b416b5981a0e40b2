"""The golden cases: inputs and high-precision expected outputs of both losses.

The inputs of every case lie on the bfloat16 grid (8 significant bits, magnitudes well
inside float16's normal range), so they are exactly representable in float64, float32,
float16 and bfloat16: every dtype sees the same inputs, and the goldens hold for all of
them. ``scale`` and ``bias`` are representable likewise.

The expected outputs were computed with mpmath at 50 significant digits by
``python -m portable_siglip.conformance._generate`` (never by the code under test) and
ship as ``goldens.json.gz`` beside this module.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

__all__ = ["GOLDENS_PATH", "Case", "Golden", "load_cases"]

GOLDENS_PATH = Path(__file__).with_name("goldens.json.gz")


@dataclass(frozen=True)
class Golden:
    """Expected loss and gradients of one loss on one case, rounded to float64.

    ``extra`` holds quantities used only to diagnose failures: for the softmax loss
    ``"image_to_text"`` and ``"text_to_image"``, the two directional cross-entropies
    (each a mean over rows) whose mean is ``loss``.
    """

    loss: float
    img: Any  # numpy.ndarray, shape (n, d), float64
    txt: Any  # numpy.ndarray, shape (n, d), float64
    scale: float
    bias: float
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
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
        exp overflows float32 or float16), ``"range"`` (extreme scale or bias).
    max_abs_logit : float
        ``max |t * img @ txt.T + b|``, for tolerances.
    goldens : dict
        ``{"sigmoid": Golden, "softmax": Golden}``.
    """

    name: str
    img: Any
    txt: Any
    scale: float
    bias: float
    tags: frozenset[str]
    max_abs_logit: float
    goldens: dict[str, Golden]

    @property
    def n(self) -> int:
        """Number of pairs."""
        return int(self.img.shape[0])

    @property
    def d(self) -> int:
        """Feature dimension."""
        return int(self.img.shape[1])


def _frozen(values: Any, np: Any) -> Any:
    """Return a read-only float64 array: the cases are cached and shared."""
    array = np.array(values, dtype=np.float64)
    array.setflags(write=False)
    return array


def _golden(raw: dict[str, Any], np: Any) -> Golden:
    return Golden(
        loss=float(raw["loss"]),
        img=_frozen(raw["img"], np),
        txt=_frozen(raw["txt"], np),
        scale=float(raw["scale"]),
        bias=float(raw["bias"]),
        extra={key: float(value) for key, value in raw.get("extra", {}).items()},
    )


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
        cases.append(
            Case(
                name=raw["name"],
                img=_frozen(raw["img"], np),
                txt=_frozen(raw["txt"], np),
                scale=float(raw["scale"]),
                bias=float(raw["bias"]),
                tags=frozenset(raw["tags"]),
                max_abs_logit=float(raw["max_abs_logit"]),
                goldens={
                    loss: _golden(raw["goldens"][loss], np) for loss in ("sigmoid", "softmax")
                },
            )
        )
    return tuple(cases)
