"""Dense float64 NumPy evaluation of the losses (with or without ids), used by ``run --verify``.

Deliberately the textbook formulas on the whole m x k matrix, sharing no code with the
blockwise kernels, so that agreement between the two is evidence about both. Each loss's
formula (:func:`dense_sigmoid`, :func:`dense_softmax`) is part of its registered description
(:mod:`._registry`); the functions below pick it by the loss's name. NumPy is imported by
the caller's request only (the command line needs it anyway).
"""

from __future__ import annotations

from typing import Any

from . import _registry as registry

__all__ = [
    "dense_logit_gradient",
    "dense_loss_and_grad",
    "dense_sigmoid",
    "dense_softmax",
]


def dense_sigmoid(sims: Any, scale: float, bias: float, positive: Any) -> tuple[float, Any]:
    """Return the sigmoid loss and ``G = dL/dZ`` from ``sims = img @ txt.T`` and the 0/1 positives.

    ``L = (1/m) sum_ij softplus(-l_ij Z_ij)``, ``l = 2P - 1``, ``Z = t S + b``, and
    ``G = (sigmoid(Z) - P) / m``, with m the rows of ``sims``.
    """
    import numpy as np

    m = sims.shape[0]
    logits = scale * sims + bias
    value = float(np.logaddexp(0.0, -(2.0 * positive - 1.0) * logits).sum() / m)
    dlogits = (np.exp(-np.logaddexp(0.0, -logits)) - positive) / m  # (sigmoid(Z) - P) / m
    return value, dlogits


def dense_softmax(sims: Any, scale: float, bias: float, positive: Any) -> tuple[float, Any]:
    """Return the softmax loss and ``G = dL/dZ`` from ``sims = img @ txt.T`` and the 0/1 positives.

    ``L = 1/2 [(1/m) sum_i (lse_j Z_ij - mean_{j in P_i} Z_ij) + (1/k) sum_j (lse_i Z_ij -
    mean_{i in Q_j} Z_ij)]``, ``Z = t S`` (the bias cancels). With one positive per row and
    column (``P = I``) this is ``-(tr log_softmax_rows + tr log_softmax_cols) / (2n)``.
    """
    import numpy as np

    m, k = sims.shape
    logits = scale * sims
    rows = logits - logits.max(axis=1, keepdims=True)
    rows = rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))  # log softmax over j
    cols = logits - logits.max(axis=0, keepdims=True)
    cols = cols - np.log(np.exp(cols).sum(axis=0, keepdims=True))  # log softmax over i
    row_mean = positive / positive.sum(axis=1, keepdims=True)  # 1 / |P_i| on P_i
    col_mean = positive / positive.sum(axis=0, keepdims=True)  # 1 / |Q_j| on Q_j
    value = float(-((row_mean * rows).sum() / m + (col_mean * cols).sum() / k) / 2)
    dlogits = ((np.exp(rows) - row_mean) / m + (np.exp(cols) - col_mean) / k) / 2
    return value, dlogits


def dense_logit_gradient(
    loss: str,
    img: Any,
    txt: Any,
    scale: float,
    bias: float,
    img_ids: Any = None,
    txt_ids: Any = None,
) -> tuple[float, Any, Any]:
    """Loss, ``G = dL/dZ`` and ``S = img @ txt.T`` of `loss`, dense, in float64.

    Parameters
    ----------
    loss : str
        The name of a registered loss ("sigmoid", "softmax").
    img, txt : numpy.ndarray, shape (m, d) and (k, d)
        Features (converted to float64); m == k without ids.
    scale, bias : float
        ``t`` and ``b``.
    img_ids, txt_ids : numpy.ndarray, optional
        Ids of the rows: pair (i, j) is positive iff they are equal; without them the
        diagonal.

    Returns
    -------
    tuple
        ``(loss, G, S)`` with ``G`` and ``S`` of shape (m, k).

    Examples
    --------
    >>> import numpy as np
    >>> value, dlogits, sims = dense_logit_gradient("sigmoid", np.eye(2), np.eye(2), 1.0, 0.0)
    >>> dlogits.shape
    (2, 2)
    """
    import numpy as np

    img = np.asarray(img, dtype=np.float64)
    txt = np.asarray(txt, dtype=np.float64)
    if img_ids is None:
        positive = np.eye(img.shape[0], txt.shape[0])
    else:
        positive = (np.asarray(img_ids)[:, None] == np.asarray(txt_ids)[None, :]).astype(np.float64)
    sims = img @ txt.T  # (m, d) @ (d, k) -> (m, k)
    value, dlogits = registry.get(loss).dense(sims, scale, bias, positive)
    return value, dlogits, sims


def dense_loss_and_grad(
    loss: str,
    img: Any,
    txt: Any,
    scale: float,
    bias: float,
    img_ids: Any = None,
    txt_ids: Any = None,
) -> tuple[float, Any, Any, float, float]:
    """Loss and the four gradients of `loss` ("sigmoid" or "softmax"), dense, in float64.

    Parameters
    ----------
    loss : str
        The name of a registered loss.
    img, txt : numpy.ndarray, shape (m, d) and (k, d)
        Features (converted to float64).
    scale, bias : float
        ``t`` and ``b``.
    img_ids, txt_ids : numpy.ndarray, optional
        Ids of the rows (several positives per row); without them the diagonal.

    Returns
    -------
    tuple
        ``(loss, d_img, d_txt, d_scale, d_bias)``.

    Examples
    --------
    >>> import numpy as np
    >>> value, *_ = dense_loss_and_grad("softmax", np.eye(2), np.eye(2), 1.0, 0.0)
    >>> round(value, 6)
    0.313262
    """
    import numpy as np

    img = np.asarray(img, dtype=np.float64)
    txt = np.asarray(txt, dtype=np.float64)
    value, dlogits, sims = dense_logit_gradient(loss, img, txt, scale, bias, img_ids, txt_ids)
    d_bias = float(dlogits.sum()) if registry.get(loss).uses_bias else 0.0
    return (
        value,
        scale * dlogits @ txt,
        scale * dlogits.T @ img,
        float((dlogits * sims).sum()),
        d_bias,
    )
