"""Independent dense oracle for both losses, in NumPy long double.

Written from the formulas of docs/math.md, without looking at the library's code paths:
the whole n x n matrix is formed, sigmoid is taken through tanh, and log-softmax through a
row max. Long double (80-bit on x86) leaves the float64 code under test a margin.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

EXACT = np.longdouble
#: Features (n, d) and ids (n,), as NumPy arrays of any float or integer dtype.
Array = np.ndarray


class Reference(NamedTuple):
    loss: float
    img: np.ndarray
    txt: np.ndarray
    scale: float
    bias: float


def _logits(
    img: np.ndarray, txt: np.ndarray, scale: float, bias: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The features in long double, their similarities S and the logits Z = t S + b."""
    img = np.asarray(img, dtype=EXACT)
    txt = np.asarray(txt, dtype=EXACT)
    sims = img @ txt.T
    return img, txt, sims, EXACT(scale) * sims + EXACT(bias)


def _chain_rule(
    loss: float,
    dlogits: np.ndarray,
    img: np.ndarray,
    txt: np.ndarray,
    sims: np.ndarray,
    scale: float,
    *,
    bias_gradient: bool,
) -> Reference:
    """The loss and its gradients from G = dL/dZ (docs/math.md): dX = t G Y, dY = t G^T X,
    dt = sum(G * S), db = sum(G), or an exact 0 where the loss does not depend on b."""
    t = EXACT(scale)
    return Reference(
        loss=loss,
        img=t * dlogits @ txt,
        txt=t * dlogits.T @ img,
        scale=(dlogits * sims).sum(),
        bias=dlogits.sum() if bias_gradient else EXACT(0),
    )


def sigmoid_reference(img: np.ndarray, txt: np.ndarray, scale: float, bias: float) -> Reference:
    """Dense SigLIP loss with labels +1 on the diagonal and -1 off it, divided by n."""
    img, txt, sims, logits = _logits(img, txt, scale, bias)
    n = img.shape[0]
    labels = 2 * np.eye(n, dtype=EXACT) - 1
    # -log sigmoid(x) = softplus(-x) = logaddexp(0, -x)
    loss = np.logaddexp(EXACT(0), -labels * logits).sum() / n
    sigmoid = (1 + np.tanh(logits / 2)) / 2
    dlogits = (sigmoid - np.eye(n, dtype=EXACT)) / n
    return _chain_rule(loss, dlogits, img, txt, sims, scale, bias_gradient=True)


def _log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def softmax_reference(img: np.ndarray, txt: np.ndarray, scale: float, bias: float) -> Reference:
    """Dense symmetric CLIP loss: mean of the row and column cross-entropies."""
    img, txt, sims, logits = _logits(img, txt, scale, bias)
    n = img.shape[0]
    rows, cols = _log_softmax(logits, 1), _log_softmax(logits, 0)
    loss = -(np.trace(rows) + np.trace(cols)) / (2 * n)
    dlogits = (np.exp(rows) + np.exp(cols) - 2 * np.eye(n, dtype=EXACT)) / (2 * n)
    return _chain_rule(loss, dlogits, img, txt, sims, scale, bias_gradient=False)


REFERENCES = {"sigmoid": sigmoid_reference, "softmax": softmax_reference}


def _positives(img_ids: np.ndarray, txt_ids: np.ndarray) -> np.ndarray:
    """The 0/1 (m, k) mask of pairs with equal ids."""
    return (np.asarray(img_ids)[:, None] == np.asarray(txt_ids)[None, :]).astype(EXACT)


def sigmoid_ids_reference(
    img: Array, txt: Array, img_ids: Array, txt_ids: Array, scale: float, bias: float
) -> Reference:
    """Dense SigLIP loss with labels +1 where the ids are equal, divided by the image rows M."""
    img, txt, sims, logits = _logits(img, txt, scale, bias)
    m = img.shape[0]
    positive = _positives(img_ids, txt_ids)
    labels = 2 * positive - 1
    loss = np.logaddexp(EXACT(0), -labels * logits).sum() / m
    dlogits = ((1 + np.tanh(logits / 2)) / 2 - positive) / m
    return _chain_rule(loss, dlogits, img, txt, sims, scale, bias_gradient=True)


def softmax_ids_reference(
    img: Array, txt: Array, img_ids: Array, txt_ids: Array, scale: float, bias: float
) -> Reference:
    """Dense CLIP loss against a uniform target over each row's (column's) positives.

    L = 1/2 [ mean_i CE(softmax_row_i, P_i / c_i) + mean_j CE(softmax_col_j, P_j / r_j) ];
    the gradient of a cross-entropy against target q is softmax - q.
    """
    img, txt, sims, logits = _logits(img, txt, scale, bias)
    m, k = img.shape[0], txt.shape[0]
    positive = _positives(img_ids, txt_ids)
    row_target = positive / positive.sum(axis=1, keepdims=True)
    col_target = positive / positive.sum(axis=0, keepdims=True)
    rows, cols = _log_softmax(logits, 1), _log_softmax(logits, 0)
    loss = -((row_target * rows).sum() / m + (col_target * cols).sum() / k) / 2
    dlogits = ((np.exp(rows) - row_target) / m + (np.exp(cols) - col_target) / k) / 2
    return _chain_rule(loss, dlogits, img, txt, sims, scale, bias_gradient=False)


IDS_REFERENCES = {"sigmoid": sigmoid_ids_reference, "softmax": softmax_ids_reference}
