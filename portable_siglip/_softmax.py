"""The CLIP softmax (InfoNCE) loss and its analytic gradient, in two passes over tiles.

With ``Z = t * img @ txt.T`` (a bias cancels in both softmaxes, so it is never added),

    L     = 1/(2n) * [ sum_i (lse_j Z_ij - Z_ii) + sum_j (lse_i Z_ij - Z_jj) ]
    dL/dZ = G = ( softmax_rows(Z) + softmax_cols(Z) - 2 I ) / (2n)

(Radford et al., 2021; the tiled evaluation follows Inf-CL, Wang et al., 2024, Sec. 3).
The first pass accumulates, for every row and every column, the log-sum-exp *relative to
the diagonal logit* (``lse_j Z_ij - Z_ii``), online: each tile contributes a max-subtracted
partial log-sum-exp, merged with ``logaddexp``. Keeping each partial relative to the diagonal
logit avoids summing n log-sum-exps in the thousands and then subtracting a trace of the
same size; accuracy stays bounded by the rounding of the logits themselves (about
``eps * |Z|``), as in any float format. The second pass recomputes each tile and forms
``G`` from the finished log-sum-exps, so no tile outlives its iteration.
"""

from __future__ import annotations

from typing import NamedTuple

import array_api_compat

from . import _inplace
from ._tiles import blocks, diagonal_mask
from ._typing import Array, Namespace

__all__ = ["SoftmaxLse", "diagonal_logits", "softmax_grad_sums", "softmax_lse"]


class SoftmaxLse(NamedTuple):
    """Row and column log-sum-exp of ``Z``, each minus the diagonal logit of its row/column."""

    rows: Array
    cols: Array


def diagonal_logits(xp: Namespace, scaled_img: Array, txt: Array) -> Array:
    """Return ``Z_ii = (t * img_i) . txt_i``: shape (n, d), (n, d) -> (n,)."""
    return xp.vecdot(scaled_img, txt)


def _merge(xp: Namespace, total: Array | None, part: Array) -> Array:
    # log(exp(total) + exp(part)) without leaving the log domain.
    return part if total is None else xp.logaddexp(total, part)


def softmax_lse(
    xp: Namespace,
    scaled_img: Array,
    txt: Array,
    img_diag: Array,
    txt_diag: Array,
    *,
    block_size: int,
) -> SoftmaxLse:
    """First pass: relative row and column log-sum-exp of ``scaled_img @ txt.T``.

    Parameters
    ----------
    xp : namespace
        Array-API namespace of the arrays.
    scaled_img : array, shape (m, d)
        Image rows multiplied by the scale ``t``.
    txt : array, shape (k, d)
        Text rows.
    img_diag : array, shape (m,)
        Reference logit of each row (its positive, ``Z_ii``), subtracted from the row lse.
    txt_diag : array, shape (k,)
        Reference logit of each column (``Z_jj``), subtracted from the column lse.
    block_size : int
        Tile edge.

    Returns
    -------
    SoftmaxLse
        ``rows[i] = lse_j Z_ij - img_diag[i]`` and ``cols[j] = lse_i Z_ij - txt_diag[j]``.
    """
    if _inplace.enabled(xp, scaled_img, txt):
        return SoftmaxLse(
            *_inplace.softmax_lse(xp, scaled_img, txt, img_diag, txt_diag, block_size=block_size)
        )
    m, k = scaled_img.shape[0], txt.shape[0]
    col_blocks = list(blocks(k, block_size))
    col_lse: list[Array | None] = [None] * len(col_blocks)
    row_lse: list[Array] = []
    for row_start, row_stop in blocks(m, block_size):
        img_rows = scaled_img[row_start:row_stop, :]
        row_ref = img_diag[row_start:row_stop]
        row_total: Array | None = None
        for col, (col_start, col_stop) in enumerate(col_blocks):
            logits = xp.matmul(img_rows, txt[col_start:col_stop, :].T)  # (b, d) @ (d, c) -> (b, c)
            # Max-subtracted partial lse of each row and column of the tile: exp never
            # sees a positive argument, so nothing overflows for |Z| in the thousands.
            row_max = xp.max(logits, axis=1)  # (b, c) -> (b,)
            row_sum = xp.sum(xp.exp(logits - row_max[:, None]), axis=1)  # (b, c) -> (b,)
            row_total = _merge(xp, row_total, (row_max - row_ref) + xp.log(row_sum))
            col_max = xp.max(logits, axis=0)  # (b, c) -> (c,)
            col_sum = xp.sum(xp.exp(logits - col_max[None, :]), axis=0)  # (b, c) -> (c,)
            col_ref = txt_diag[col_start:col_stop]
            col_lse[col] = _merge(xp, col_lse[col], (col_max - col_ref) + xp.log(col_sum))
        row_lse.append(row_total)
    return SoftmaxLse(xp.concat(row_lse, axis=0), xp.concat(col_lse, axis=0))


def softmax_grad_sums(
    xp: Namespace,
    scaled_img: Array,
    txt: Array,
    row_lse: Array,
    col_lse: Array,
    *,
    positives: bool,
    block_size: int,
) -> tuple[Array, Array]:
    """Second pass: accumulate ``P @ txt`` and ``P.T @ scaled_img`` with ``P = 2n * G``.

    Parameters
    ----------
    xp : namespace
        Array-API namespace of the arrays.
    scaled_img : array, shape (m, d)
        Image rows multiplied by the scale ``t``.
    txt : array, shape (k, d)
        Text rows.
    row_lse : array, shape (m,)
        Finished (absolute) log-sum-exp of every row of ``Z`` over all columns.
    col_lse : array, shape (k,)
        Finished (absolute) log-sum-exp of every column of ``Z`` over all rows.
    positives : bool
        Whether row ``i`` and text ``i`` are a positive pair (subtract ``2 I``).
    block_size : int
        Tile edge.

    Returns
    -------
    img_acc, txt_acc : array
        ``P @ txt`` of shape (m, d) and ``P.T @ scaled_img`` of shape (k, d).
    """
    if _inplace.enabled(xp, scaled_img, txt):
        return _inplace.softmax_grad_sums(
            xp, scaled_img, txt, row_lse, col_lse, positives=positives, block_size=block_size
        )
    m, k = scaled_img.shape[0], txt.shape[0]
    device = array_api_compat.device(scaled_img)
    col_blocks = list(blocks(k, block_size))
    txt_acc: list[Array | None] = [None] * len(col_blocks)
    img_acc_blocks: list[Array] = []
    for row_start, row_stop in blocks(m, block_size):
        img_rows = scaled_img[row_start:row_stop, :]
        row_ref = row_lse[row_start:row_stop, None]
        img_acc: Array | None = None
        for col, (col_start, col_stop) in enumerate(col_blocks):
            txt_cols = txt[col_start:col_stop, :]
            logits = xp.matmul(img_rows, txt_cols.T)  # (b, d) @ (d, c) -> (b, c)
            # softmax_rows + softmax_cols; both exponents are <= 0 up to rounding.
            part = xp.exp(logits - row_ref) + xp.exp(logits - col_lse[None, col_start:col_stop])
            if positives and row_start == col_start:
                mask = diagonal_mask(xp, row_stop - row_start, device)
                part = xp.where(mask, part - 2, part)
            step = xp.matmul(part, txt_cols)  # (b, c) @ (c, d) -> (b, d)
            img_acc = step if img_acc is None else img_acc + step
            back = xp.matmul(part.T, img_rows)  # (c, b) @ (b, d) -> (c, d)
            previous = txt_acc[col]
            txt_acc[col] = back if previous is None else previous + back
        img_acc_blocks.append(img_acc)
    return xp.concat(img_acc_blocks, axis=0), xp.concat(txt_acc, axis=0)
