"""The SigLIP sigmoid loss and its analytic gradient, one pass over square tiles.

With ``Z = t * img @ txt.T + b`` and labels ``l_ij = +1`` on the positive pairs (the
diagonal, or equal ids), ``-1`` elsewhere (Zhai et al., ICCV 2023, Sec. 3), write
``u = -l * Z`` (``u = Z`` on the negatives, ``u = -Z`` on the positives). Then

    L    = (1/n) * sum_ij softplus(u_ij)
    dL/dZ = G = (1/n) * (-l) * sigmoid(u) = (sigmoid(Z) - P) / n

with ``P`` the 0/1 mask of the positives and ``n`` the number of image rows. The chain
rule through ``Z`` gives the four gradients (see docs/math.md). Every tile yields its share
of the loss and of all four gradients at once, so the loss and the gradient need a single
pass, and no tile outlives its iteration. What a tile contributes is computed by
:func:`._tilemath.sigmoid_tile`; the loop below only walks the tiles, over fresh arrays or
over the reusable buffers of :mod:`._inplace`, and arrays jax is tracing take the
``fori_loop`` of :mod:`._jaxloops`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from . import _inplace, _jaxloops
from ._precision import Gemm
from ._tilemath import sigmoid_tile
from ._tiles import Positives, blocks
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
    tile: Callable[..., tuple[Array, Array | None]] = sigmoid_tile,
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
    tile : callable, optional
        The tile formula, :func:`._tilemath.sigmoid_tile` unless a loss of the sigmoid
        family (same labels, normaliser and gradient assembly) brings its own.

    Returns
    -------
    SigmoidSums
        The unnormalised sums; the caller divides by n.
    """
    gemm = gemm or Gemm(xp, scaled_img.dtype)
    if _jaxloops.enabled(xp, scaled_img, txt, bias, positives):
        return SigmoidSums(
            *_jaxloops.sigmoid_sums(
                scaled_img,
                txt,
                bias,
                positives=positives,
                block_size=block_size,
                grad=grad,
                gemm=gemm,
                tile=tile,
            )
        )
    space = _inplace.workspace(
        xp, scaled_img, txt, bias, positives=positives, block_size=block_size, gemm=gemm
    )
    ops = space.ops
    m, k, d = scaled_img.shape[0], txt.shape[0], scaled_img.shape[1]
    row_blocks, col_blocks = list(blocks(m, block_size)), list(blocks(k, block_size))
    loss = bias_sum = ops.zero(scaled_img)
    img_acc = space.accumulator(m, d, len(row_blocks))
    txt_acc = space.accumulator(k, d, len(col_blocks))
    img_ops, txt_ops = space.operand(scaled_img), space.operand(txt)
    for row, rows in enumerate(row_blocks):
        img_rows = img_ops[rows[0] : rows[1], :]
        for col, cols in enumerate(col_blocks):
            txt_cols = txt_ops[cols[0] : cols[1], :]
            logits = space.logits(img_rows, txt_cols)  # (b, d) @ (d, c) -> (b, c)
            logits = ops.add(logits, bias, out=logits)
            work = space.work(*logits.shape)
            tile_loss, part = tile(ops, logits, space.mask(rows, cols), grad=grad, work=work)
            loss = loss + tile_loss
            if part is None:
                continue
            bias_sum = bias_sum + xp.sum(part)
            factor = space.factor(part)
            img_acc.add(row, rows, factor, txt_cols)  # (b, c) @ (c, d) -> (b, d)
            txt_acc.add(col, cols, factor.T, img_rows)  # (c, b) @ (b, d) -> (c, d)
    if not grad:
        return SigmoidSums(loss, None, None, None)
    return SigmoidSums(loss, img_acc.result(), txt_acc.result(), bias_sum)
