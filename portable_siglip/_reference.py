"""Dense float64 NumPy evaluation of both losses (with or without ids), used by ``run --verify``.

Deliberately the textbook formulas on the whole n x n matrix, sharing no code with the
blockwise kernels, so that agreement between the two is evidence about both. NumPy is
imported by the caller's request only (the command line needs it anyway).
"""

from __future__ import annotations

from typing import Any

__all__ = ["dense_logit_gradient", "dense_loss_and_grad", "dense_loss_and_grad_with_ids"]


def dense_logit_gradient(
    loss: str, img: Any, txt: Any, scale: float, bias: float
) -> tuple[float, Any, Any]:
    """Loss, ``G = dL/dZ`` and ``S = img @ txt.T`` of `loss`, dense, in float64.

    Parameters
    ----------
    loss : {"sigmoid", "softmax"}
        Which loss.
    img, txt : numpy.ndarray, shape (n, d)
        Features (converted to float64).
    scale, bias : float
        ``t`` and ``b``.

    Returns
    -------
    tuple
        ``(loss, G, S)`` with ``G`` and ``S`` of shape (n, n).
    """
    import numpy as np

    img = np.asarray(img, dtype=np.float64)
    txt = np.asarray(txt, dtype=np.float64)
    n = img.shape[0]
    eye = np.eye(n)
    sims = img @ txt.T  # (n, d) @ (d, n) -> (n, n)
    if loss == "sigmoid":
        logits = scale * sims + bias
        signed = (1.0 - 2.0 * eye) * logits  # -l_ij Z_ij
        value = float(np.logaddexp(0.0, signed).sum() / n)
        dlogits = (np.exp(-np.logaddexp(0.0, -logits)) - eye) / n  # (sigmoid(Z) - I) / n
    else:
        logits = scale * sims
        rows = logits - logits.max(axis=1, keepdims=True)
        rows = rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))
        cols = logits - logits.max(axis=0, keepdims=True)
        cols = cols - np.log(np.exp(cols).sum(axis=0, keepdims=True))
        value = float(-(np.trace(rows) + np.trace(cols)) / (2 * n))
        dlogits = (np.exp(rows) + np.exp(cols) - 2.0 * eye) / (2 * n)
    return value, dlogits, sims


def dense_loss_and_grad(
    loss: str, img: Any, txt: Any, scale: float, bias: float
) -> tuple[float, Any, Any, float, float]:
    """Loss and the four gradients of `loss` ("sigmoid" or "softmax"), dense, in float64.

    Parameters
    ----------
    loss : {"sigmoid", "softmax"}
        Which loss.
    img, txt : numpy.ndarray, shape (n, d)
        Features (converted to float64).
    scale, bias : float
        ``t`` and ``b``.

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
    value, dlogits, sims = dense_logit_gradient(loss, img, txt, scale, bias)
    d_bias = float(dlogits.sum()) if loss == "sigmoid" else 0.0
    return (
        value,
        scale * dlogits @ txt,
        scale * dlogits.T @ img,
        float((dlogits * sims).sum()),
        d_bias,
    )


def dense_loss_and_grad_with_ids(
    loss: str, img: Any, txt: Any, scale: float, bias: float, img_ids: Any, txt_ids: Any
) -> tuple[float, Any, Any, float, float]:
    """Loss and gradients of `loss` with several positives per row, dense, in float64.

    Pair ``(i, j)`` is positive iff ``img_ids[i] == txt_ids[j]``. Sigmoid:
    ``L = (1/m) sum_ij softplus(-l_ij Z_ij)``, ``l = 2P - 1``, ``Z = t S + b``. Softmax:
    ``L = 1/2 [(1/m) sum_i (lse_j Z_ij - mean_{j in P_i} Z_ij) + (1/k) sum_j (lse_i Z_ij -
    mean_{i in Q_j} Z_ij)]``, ``Z = t S``. With ``img_ids = txt_ids = arange(n)`` these are
    :func:`portable_siglip._reference.dense_loss_and_grad`'s losses.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.eye(3)[:, :2]
    >>> plain = dense_loss_and_grad("softmax", x, x, 2.0, 0.0)
    >>> ids = np.arange(3)
    >>> with_ids = dense_loss_and_grad_with_ids("softmax", x, x, 2.0, 0.0, ids, ids)
    >>> bool(np.allclose(plain[0], with_ids[0]) and np.allclose(plain[1], with_ids[1]))
    True
    """
    import numpy as np

    img = np.asarray(img, dtype=np.float64)
    txt = np.asarray(txt, dtype=np.float64)
    m, k = img.shape[0], txt.shape[0]
    positive = (np.asarray(img_ids)[:, None] == np.asarray(txt_ids)[None, :]).astype(np.float64)
    sims = img @ txt.T  # (m, d) @ (d, k) -> (m, k)
    if loss == "sigmoid":
        logits = scale * sims + bias
        value = float(np.logaddexp(0.0, -(2.0 * positive - 1.0) * logits).sum() / m)
        dlogits = (np.exp(-np.logaddexp(0.0, -logits)) - positive) / m  # (sigmoid(Z) - P) / m
    else:
        logits = scale * sims
        rows = logits - logits.max(axis=1, keepdims=True)
        rows = rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))  # log softmax over j
        cols = logits - logits.max(axis=0, keepdims=True)
        cols = cols - np.log(np.exp(cols).sum(axis=0, keepdims=True))  # log softmax over i
        row_mean = positive / positive.sum(axis=1, keepdims=True)  # 1 / |P_i| on P_i
        col_mean = positive / positive.sum(axis=0, keepdims=True)  # 1 / |Q_j| on Q_j
        value = float(-((row_mean * rows).sum() / m + (col_mean * cols).sum() / k) / 2)
        dlogits = ((np.exp(rows) - row_mean) / m + (np.exp(cols) - col_mean) / k) / 2
    d_bias = float(dlogits.sum()) if loss == "sigmoid" else 0.0
    return (
        value,
        scale * dlogits @ txt,
        scale * dlogits.T @ img,
        float((dlogits * sims).sum()),
        d_bias,
    )
