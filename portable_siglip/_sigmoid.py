"""The SigLIP sigmoid loss and its analytic gradient, one pass over square tiles.

With ``Z = t * img @ txt.T + b`` and labels ``l_ij = +1`` on the positive pairs (the
diagonal, or equal ids), ``-1`` elsewhere (Zhai et al., ICCV 2023, Sec. 3), write
``u = -l * Z`` (``u = Z`` on the negatives, ``u = -Z`` on the positives). Then

    L    = (1/n) * sum_ij softplus(u_ij)
    dL/dZ = G = (1/n) * (-l) * sigmoid(u) = (sigmoid(Z) - P) / n

with ``P`` the 0/1 mask of the positives and ``n`` the number of image rows.

and the chain rule through ``Z`` gives the four gradients (see docs/math.md). Every tile
yields its share of the loss and of all four gradients at once, so the loss and the
gradient need a single pass, and no tile outlives its iteration.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import array_api_compat

from . import _inplace, _jaxloops
from ._precision import Gemm
from ._tilemath import sigmoid_tile
from ._tiles import Positives, blocks, positive_mask
from ._typing import Array, Namespace

__all__ = ["SigmoidSums", "sigmoid_sums"]


class SigmoidSums(NamedTuple):
    """Unnormalised sums over the tiles of one (row shard, column shard) pair.

    ``loss`` is ``sum softplus(u)``; ``img_acc`` is ``sigmoid_part @ txt`` (so that
    ``dL/dimg = t/n * img_acc`` and ``dL/dt = sum(img * img_acc) / n``); ``txt_acc`` is
    ``sigmoid_part.T @ (t * img)`` (so that ``dL/dtxt = txt_acc / n``); ``bias`` is
    ``sum(sigmoid_part)``. The gradient fields are ``None`` when only the loss was asked.
    """

    loss: Array
    img_acc: Array | None
    txt_acc: Array | None
    bias: Array | None


def sigmoid_sums(
    xp: Namespace,
    scaled_img: Array,
    txt: Array,
    bias: float | Array,
    *,
    positives: Positives,
    block_size: int,
    grad: bool,
    gemm: Gemm | None = None,
) -> SigmoidSums:
    """Sum the sigmoid loss (and its gradient pieces) over all tiles of ``scaled_img @ txt.T``.

    Parameters
    ----------
    xp : namespace
        Array-API namespace of the arrays.
    scaled_img : array, shape (m, d)
        Image rows already multiplied by the scale ``t``.
    txt : array, shape (k, d)
        Text rows.
    bias : float or 0-d array
        The logit bias ``b``.
    positives : bool or (row_ids, col_ids)
        Which pairs are positives: True the diagonal, row ``i`` with text ``i`` (requires
        ``m == k``); False none (a block of another rank's texts, without ids); or two id
        arrays of shapes (m,) and (k,), pair (i, j) positive iff their ids are equal.
    block_size : int
        Tile edge.
    grad : bool
        Whether to accumulate the gradient pieces as well as the loss.
    gemm : Gemm, optional
        The GEMMs' operand policy (:mod:`._precision`); None: exact operands.

    Returns
    -------
    SigmoidSums
        The unnormalised sums; the caller divides by n.
    """
    gemm = gemm or Gemm(xp, scaled_img.dtype)
    options: dict[str, Any] = {
        "positives": positives,
        "block_size": block_size,
        "grad": grad,
        "gemm": gemm,
    }
    if _inplace.enabled(xp, scaled_img, txt, bias):
        return SigmoidSums(*_inplace.sigmoid_sums(xp, scaled_img, txt, bias, **options))
    if _jaxloops.enabled(xp, scaled_img, txt, bias, positives):
        return SigmoidSums(*_jaxloops.sigmoid_sums(scaled_img, txt, bias, **options))
    m, k = scaled_img.shape[0], txt.shape[0]
    dtype = scaled_img.dtype
    device = array_api_compat.device(scaled_img)
    zero = xp.zeros((), dtype=dtype, device=device)
    loss = zero
    bias_sum = zero
    img_acc_blocks: list[Array] = []
    txt_acc_blocks: list[Array | None] = [None] * len(range(0, k, block_size))
    img_ops, txt_ops = gemm.operand(scaled_img), gemm.operand(txt)
    for row_start, row_stop in blocks(m, block_size):
        img_rows = img_ops[row_start:row_stop, :]
        img_acc: Array | None = None
        for col, (col_start, col_stop) in enumerate(blocks(k, block_size)):
            txt_cols = txt_ops[col_start:col_stop, :]
            logits = gemm.matmul(img_rows, txt_cols.T) + bias  # (b, d) @ (d, c) -> (b, c)
            mask = positive_mask(
                xp, positives, (row_start, row_stop), (col_start, col_stop), device
            )
            tile_loss, part = sigmoid_tile(xp, logits, mask, grad=grad)
            loss = loss + tile_loss
            if part is None:
                continue
            bias_sum = bias_sum + xp.sum(part)
            factor = gemm.factor(part)
            step = gemm.matmul(factor, txt_cols)  # (b, c) @ (c, d) -> (b, d)
            img_acc = step if img_acc is None else img_acc + step
            back = gemm.matmul(factor.T, img_rows)  # (c, b) @ (b, d) -> (c, d)
            previous = txt_acc_blocks[col]
            txt_acc_blocks[col] = back if previous is None else previous + back
        if grad:
            img_acc_blocks.append(img_acc)
    if not grad:
        return SigmoidSums(loss, None, None, None)
    return SigmoidSums(
        loss,
        xp.concat(img_acc_blocks, axis=0),
        xp.concat(txt_acc_blocks, axis=0),
        bias_sum,
    )
