"""Multi-positive losses with one mistake each, for the ids diagnoses of the conformance suite.

Dense NumPy, loss only, called as ``f(img, txt, scale, bias, img_ids=..., txt_ids=...)``.
Each makes exactly the mistake its name says and is otherwise right (``right_*`` are the
correct formulas of docs/multi-positive.md, written the same way).
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Each mistake of this module, the loss it claims and the diagnosis code the conformance
#: suite must give it with ``ids=True`` (tests/test_conformance_ids.py, tests/power.py). The
#: squared logits match no known mistake: rejected, and their right name is ``unknown``;
#: ``sigmoid_without_ids`` takes no ids at all (torch, ``ids-not-accepted``).
EXPECTED: dict[str, tuple[str, str]] = {
    "sigmoid_ids_ignored": ("sigmoid", "ids-ignored"),
    "softmax_ids_ignored": ("softmax", "ids-ignored"),
    "softmax_log_inside": ("softmax", "log-inside"),
    "softmax_positives_summed": ("softmax", "positives-summed"),
    "softmax_first_positive": ("softmax", "first-positive"),
    "sigmoid_first_positive": ("sigmoid", "first-positive"),
    "sigmoid_normalised_by_k": ("sigmoid", "normalised-by-k"),
    "sigmoid_normalised_by_positives": ("sigmoid", "normalised-by-positives"),
    "softmax_normalised_by_positives": ("softmax", "normalised-by-positives"),
    "sigmoid_squared_logits": ("sigmoid", "unknown"),
    "sigmoid_without_ids": ("sigmoid", "ids-not-accepted"),
}


def _logits(img: Any, txt: Any, scale: Any, bias: Any) -> np.ndarray:
    return float(scale) * (np.asarray(img) @ np.asarray(txt).T) + float(bias)


def _positive(img_ids: Any, txt_ids: Any) -> np.ndarray:
    return np.asarray(img_ids)[:, None] == np.asarray(txt_ids)[None, :]


def _sigmoid(logits: np.ndarray, positive: np.ndarray) -> Any:
    labels = np.where(positive, 1.0, -1.0)
    return np.asarray(np.logaddexp(0.0, -labels * logits).sum() / logits.shape[0])


def _softmax(logits: np.ndarray, rows: np.ndarray, cols: np.ndarray, how: str = "mean") -> Any:
    def direction(z: np.ndarray, mask: np.ndarray) -> float:
        lse = np.logaddexp.reduce(z, axis=1)
        if how == "inside":
            return float(np.mean(lse - np.logaddexp.reduce(np.where(mask, z, -np.inf), axis=1)))
        if how == "sum":
            return float(np.mean(np.sum(np.where(mask, lse[:, None] - z, 0.0), axis=1)))
        mean = np.sum(np.where(mask, z, 0.0), axis=1) / np.sum(mask, axis=1)
        return float(np.mean(lse - mean))

    return np.asarray((direction(logits, rows) + direction(logits.T, cols.T)) / 2)


def _first(positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m, k = positive.shape
    rows = np.zeros_like(positive)
    rows[np.arange(m), np.argmax(positive, axis=1)] = True
    cols = np.zeros_like(positive)
    cols[np.argmax(positive, axis=0), np.arange(k)] = True
    return rows, cols


def right_sigmoid(img: Any, txt: Any, scale: Any, bias: Any, *, img_ids: Any, txt_ids: Any) -> Any:
    return _sigmoid(_logits(img, txt, scale, bias), _positive(img_ids, txt_ids))


def right_softmax(img: Any, txt: Any, scale: Any, bias: Any, *, img_ids: Any, txt_ids: Any) -> Any:
    positive = _positive(img_ids, txt_ids)
    return _softmax(_logits(img, txt, scale, bias), positive, positive)


def sigmoid_ids_ignored(img: Any, txt: Any, scale: Any, bias: Any, **_: Any) -> Any:
    logits = _logits(img, txt, scale, bias)
    return _sigmoid(logits, np.eye(*logits.shape, dtype=bool))


def softmax_ids_ignored(img: Any, txt: Any, scale: Any, bias: Any, **_: Any) -> Any:
    logits = _logits(img, txt, scale, bias)
    eye = np.eye(*logits.shape, dtype=bool)
    return _softmax(logits, eye, eye)


def softmax_log_inside(
    img: Any, txt: Any, scale: Any, bias: Any, *, img_ids: Any, txt_ids: Any
) -> Any:
    positive = _positive(img_ids, txt_ids)
    return _softmax(_logits(img, txt, scale, bias), positive, positive, how="inside")


def softmax_positives_summed(
    img: Any, txt: Any, scale: Any, bias: Any, *, img_ids: Any, txt_ids: Any
) -> Any:
    positive = _positive(img_ids, txt_ids)
    return _softmax(_logits(img, txt, scale, bias), positive, positive, how="sum")


def softmax_first_positive(
    img: Any, txt: Any, scale: Any, bias: Any, *, img_ids: Any, txt_ids: Any
) -> Any:
    rows, cols = _first(_positive(img_ids, txt_ids))
    return _softmax(_logits(img, txt, scale, bias), rows, cols)


def sigmoid_first_positive(
    img: Any, txt: Any, scale: Any, bias: Any, *, img_ids: Any, txt_ids: Any
) -> Any:
    rows, _ = _first(_positive(img_ids, txt_ids))
    return _sigmoid(_logits(img, txt, scale, bias), rows)


def sigmoid_normalised_by_k(
    img: Any, txt: Any, scale: Any, bias: Any, *, img_ids: Any, txt_ids: Any
) -> Any:
    # The sum over the m x k pairs divided by k, the number of texts, instead of m.
    logits = _logits(img, txt, scale, bias)
    return _sigmoid(logits, _positive(img_ids, txt_ids)) * logits.shape[0] / logits.shape[1]


def sigmoid_normalised_by_positives(
    img: Any, txt: Any, scale: Any, bias: Any, *, img_ids: Any, txt_ids: Any
) -> Any:
    # The sum over the m x k pairs divided by the number of positive pairs instead of m.
    logits = _logits(img, txt, scale, bias)
    positive = _positive(img_ids, txt_ids)
    return _sigmoid(logits, positive) * logits.shape[0] / np.count_nonzero(positive)


def softmax_normalised_by_positives(
    img: Any, txt: Any, scale: Any, bias: Any, *, img_ids: Any, txt_ids: Any
) -> Any:
    # Each direction's -log softmax summed over all its positive pairs and divided by their
    # number (`(mask * -log_prob).sum() / mask.sum()`), not averaged per row, then over rows.
    logits = _logits(img, txt, scale, bias)
    positive = _positive(img_ids, txt_ids)

    def direction(z: np.ndarray, mask: np.ndarray) -> float:
        log_prob = z - np.logaddexp.reduce(z, axis=1, keepdims=True)
        return float(-np.sum(np.where(mask, log_prob, 0.0)) / np.count_nonzero(mask))

    return np.asarray((direction(logits, positive) + direction(logits.T, positive.T)) / 2)


def sigmoid_squared_logits(
    img: Any, txt: Any, scale: Any, bias: Any, *, img_ids: Any, txt_ids: Any
) -> Any:
    # No known mistake: the logits squared (a made-up error, for the "none fits" diagnosis).
    logits = _logits(img, txt, scale, bias)
    return _sigmoid(np.sign(logits) * logits**2, _positive(img_ids, txt_ids))


def sigmoid_without_ids(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    # A one-positive-per-row loss: it takes no ids at all.
    logits = _logits(img, txt, scale, bias)
    return _sigmoid(logits, np.eye(*logits.shape, dtype=bool))
