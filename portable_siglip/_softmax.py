"""The CLIP softmax (InfoNCE) loss and its analytic gradient, in two passes over tiles.

With ``Z = t * img @ txt.T`` (a bias cancels in both softmaxes, so it is never added),

    L     = 1/(2n) * [ sum_i (lse_j Z_ij - Z_ii) + sum_j (lse_i Z_ij - Z_jj) ]
    dL/dZ = G = ( softmax_rows(Z) + softmax_cols(Z) - 2 I ) / (2n)

(Radford et al., 2021; the tiled evaluation follows Inf-CL, Wang et al., 2024, Sec. 3).

The first pass accumulates, for every row and every column, its log-sum-exp as a pair
``(M, s)``: ``M`` the largest logit seen so far (an actual logit value, never rounded) and
``s = log sum exp(Z - M)``, which lies in ``[0, log n]``. Each tile contributes its own
max-subtracted pair; two pairs merge online as ``M = max(Ma, Mb)``,
``s = logaddexp((Ma - M) + sa, (Mb - M) + sb)`` (one of the two shifts is exactly 0).
The sum ``M + s`` is never formed: at large ``|Z|`` it rounds to ``ulp(|Z|)`` (0.03 at
``|Z| = 5e5`` in float32, 32 at ``5e8``), an error that ``exp`` turns into a relative error
of the same size in every softmax entry. The second pass recomputes each tile and uses
``exp((Z_ij - M_i) - s_i)``, where ``Z_ij - M_i`` is a difference of two logits of the same
GEMM, essentially exact as in a dense max-subtracted softmax; no tile outlives its iteration.

The loss term of row ``i`` is ``(M_i - Z_ii) + s_i``, formed row by row, so the loss is a sum
of O(1) quantities rather than n log-sum-exps minus a trace of the same size. The difference
``M_i - Z_ii`` is clamped at 0: it is >= 0 by definition, and a negative value is only the
rounding difference between ``Z_ii`` from ``vecdot`` and the same logit from the tile GEMM.

With ids (several positives per row, docs/multi-positive.md) the first pass also counts each
row's and column's positives, ``c``, and sums their logits, ``S``: the pairs become
``(M, s, c, S)`` (shape (m, 4), (k, 4)), the loss term of a row is ``(M - S / c) + s`` (the
mean positive logit replaces ``Z_ii``), and the second pass subtracts ``1/c_i`` (rows) and
``w/c_j`` (columns, ``w = m/k``) on the positives instead of 2 on the diagonal.

With ``unmatched_txt="negatives"`` (texts whose id no image has, docs/math.md, section 9)
such a column has ``c = 0``: it stays in every row's log-sum-exp, the column term averages
over the ``k'`` columns with ``c > 0`` only (:func:`matched_excess`), and before the second
pass :func:`weigh_columns` folds the column weight ``w_j`` (``m/k'``, 0 for a column without
a positive) into the column pairs, so that the second pass runs unchanged with weight 1.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import array_api_compat

from . import _inplace, _jaxloops
from ._precision import Gemm
from ._tilemath import (
    Pair,
    add_pairs,
    lse_tile,
    merge_lse,
    merge_pairs,
    positive_sums,
    softmax_grad_tile,
    stack_pairs,
)
from ._tiles import Positives, Workspace, blocks
from ._typing import Array, Namespace

__all__ = [
    "SoftmaxLse",
    "lse_excess",
    "matched_excess",
    "merge_lse",
    "merge_lse_pairs",
    "softmax_grad_sums",
    "softmax_lse",
    "weigh_columns",
]


class SoftmaxLse(NamedTuple):
    """Row and column log-sum-exp of ``Z`` as ``(M, s)`` pairs: arrays of shape (m, 2), (k, 2).

    Column 0 is ``M``, the largest logit of the row (column); column 1 is
    ``s = log sum exp(Z - M)``, in ``[0, log k]`` (``[0, log m]``). The log-sum-exp is
    ``M + s``; it is kept as a pair because that sum rounds to ``ulp(M)``. With ids, two
    more columns: 2 the number of positives ``c`` of the row (column), 3 the sum ``S`` of
    their logits; shapes (m, 4) and (k, 4).
    """

    rows: Array
    cols: Array


def merge_lse_pairs(xp: Namespace, a: Array, b: Array) -> Array:
    """:func:`merge_lse` of two (k, 2) pair arrays (column 0 ``M``, column 1 ``s``).

    (k, 4) arrays (with ids) merge their first two columns the same way and add the other
    two (the positive counts and positive-logit sums).
    """
    pair = xp.stack(merge_lse(xp, a[:, 0], a[:, 1], b[:, 0], b[:, 1]), axis=1)
    if a.shape[1] == 2:
        return pair
    return xp.concat((pair, a[:, 2:] + b[:, 2:]), axis=1)


def lse_excess(xp: Namespace, lse: Array, diag: Array | None = None) -> Array:
    """Return ``sum_i (lse_i - Z_ii)`` from (k, 2) pairs ``lse`` and the diagonal logits ``diag``.

    Each term is ``max(M_i - Z_ii, 0) + s_i``, formed before the sum. ``M_i >= Z_ii`` holds
    by definition (``M_i`` is a max over a set holding ``Z_ii``), but ``M_i`` comes from the
    tile GEMM and ``Z_ii`` from ``vecdot``, and the two roundings of the same logit can differ
    by an ulp; without the clamp a saturated loss (every ``s_i`` about 0) came out negative.
    The clamp only removes that rounding difference, and ``s_i >= 0`` keeps every term >= 0.

    With ``diag=None``, ``lse`` is (k, 4) with ids, and the mean positive logit ``S_i / c_i``
    takes the place of ``Z_ii`` (it too is at most ``M_i``).
    """
    zero = xp.zeros((), dtype=lse.dtype, device=array_api_compat.device(lse))
    target = lse[:, 3] / lse[:, 2] if diag is None else diag
    return xp.sum(xp.maximum(lse[:, 0] - target, zero) + lse[:, 1])


def matched_excess(xp: Namespace, lse: Array) -> tuple[Array, Array]:
    """Return ``lse_excess`` over the (k, 4) rows with a positive, and how many there are.

    The terms are those of :func:`lse_excess` (``max(M - S/c, 0) + s``) for the rows with
    ``c > 0``; a row without a positive (a text whose id no image has, under
    ``unmatched_txt="negatives"``) has no term, and its ``S/c = 0/0`` is never formed.
    Returns the sum and the count of such rows, both 0-d arrays of the dtype of ``lse``.

    Examples
    --------
    >>> import numpy as np
    >>> xp = array_api_compat.array_namespace(np.zeros(1))
    >>> cols = np.array([[3.0, 0.5, 2.0, 4.0], [1.0, 0.25, 0.0, 0.0]])  # (M, s, c, S)
    >>> [float(v) for v in matched_excess(xp, cols)]  # (3 - 4/2) + 0.5; one column matched
    [1.5, 1.0]
    """
    device = array_api_compat.device(lse)
    zero = xp.zeros((), dtype=lse.dtype, device=device)
    found = lse[:, 2] > zero
    count = xp.where(found, lse[:, 2], xp.ones((), dtype=lse.dtype, device=device))
    terms = xp.maximum(lse[:, 0] - lse[:, 3] / count, zero) + lse[:, 1]
    return xp.sum(xp.where(found, terms, zero)), xp.sum(xp.astype(found, lse.dtype))


def weigh_columns(xp: Namespace, cols: Array, weight: Array) -> Array:
    """Fold the column weight of ``unmatched_txt="negatives"`` into (k, 4) column pairs.

    The second pass subtracts ``w / c_j`` on a column's positives and adds ``w`` times its
    softmax ``exp((Z - M_j) - s_j)``. A column with a positive gets ``w = weight``
    (``m / k'``, a 0-d array), one without ``w = 0``. Returned: the pairs with
    ``s_j - log w`` in column 1 and ``c_j / w`` in column 2, so that the unchanged second
    pass with weight 1 computes ``w * softmax`` and ``w / c_j``; for ``w = 0`` these are
    ``+inf`` (its softmax is then ``exp(-inf) = 0`` and ``1 / inf = 0``: the column adds
    nothing). ``log w`` is an O(log m) shift of ``s``, which lies in ``[0, log m]``, so the
    exponent keeps its rounding (docs/math.md, section 9).

    Examples
    --------
    >>> import numpy as np
    >>> xp = array_api_compat.array_namespace(np.zeros(1))
    >>> cols = np.array([[3.0, 0.5, 2.0, 4.0], [1.0, 0.25, 0.0, 0.0]])
    >>> np.round(weigh_columns(xp, cols, np.asarray(2.0))[:, 1:3], 6).tolist()  # 0.5 - log 2
    [[-0.193147, 1.0], [inf, inf]]
    """
    device = array_api_compat.device(cols)
    zero = xp.zeros((), dtype=cols.dtype, device=device)
    inf = xp.full((), math.inf, dtype=cols.dtype, device=device)
    found = cols[:, 2] > zero
    weight = xp.astype(weight, cols.dtype)
    log_sums = xp.where(found, cols[:, 1] - xp.log(weight), inf)
    counts = xp.where(found, cols[:, 2] / weight, inf)
    return xp.stack((cols[:, 0], log_sums, counts, cols[:, 3]), axis=1)


def softmax_lse(
    xp: Namespace,
    scaled_img: Array,
    txt: Array,
    *,
    block_size: int,
    positives: tuple[Array, Array] | None = None,
    gemm: Gemm | None = None,
) -> SoftmaxLse:
    """First pass: row and column log-sum-exp of ``scaled_img @ txt.T``, as ``(M, s)`` pairs.

    Parameters
    ----------
    xp, scaled_img, txt, block_size
        As for :func:`._sigmoid.sigmoid_sums`: the namespace, the (m, d) image rows times
        ``t``, the (k, d) text rows, the tile edge.
    positives : (row_ids, col_ids), optional
        Ids of the rows and columns; with them the positives of every row and column are
        counted and their logits summed in the same pass.
    gemm : Gemm, optional
        The GEMMs' operand policy (:mod:`._precision`); None: exact operands.

    Returns
    -------
    SoftmaxLse
        ``rows`` of shape (m, 2) and ``cols`` of shape (k, 2): per row (column) the largest
        logit ``M`` and ``s = log sum exp(Z - M)`` over the k columns (m rows); with
        ``positives``, (m, 4) and (k, 4) with the count and logit sum of the positives.
    """
    gemm = gemm or Gemm(xp, scaled_img.dtype)
    if _jaxloops.enabled(xp, scaled_img, txt, positives):
        return SoftmaxLse(
            *_jaxloops.softmax_lse(
                scaled_img, txt, block_size=block_size, positives=positives, gemm=gemm
            )
        )
    space = _inplace.workspace(
        xp, scaled_img, txt, positives=positives or False, block_size=block_size, gemm=gemm
    )
    col_blocks = list(blocks(txt.shape[0], block_size))
    col_lse: list[Pair | None] = [None] * len(col_blocks)
    col_pos: list[Pair | None] = [None] * len(col_blocks)
    row_lse: list[Pair] = []
    row_pos: list[Pair] = []
    img_ops, txt_ops = space.operand(scaled_img), space.operand(txt)
    for rows in blocks(scaled_img.shape[0], block_size):
        img_rows = img_ops[rows[0] : rows[1], :]
        row_total: Pair | None = None
        row_found: Pair | None = None
        for col, cols in enumerate(col_blocks):
            logits = space.logits(img_rows, txt_ops[cols[0] : cols[1], :])  # (b, c)
            work = space.work(*logits.shape)
            if space.labelled:  # positive counts and logit sums, before the tile changes
                counts = _positive_counts(space, logits, space.mask(rows, cols), work)
                row_found = add_pairs(row_found, counts[:2])
                col_pos[col] = add_pairs(col_pos[col], counts[2:])
            row_max, row_log, col_max, col_log = lse_tile(space.ops, logits, work)
            row_total = merge_pairs(xp, row_total, (row_max, row_log))
            col_lse[col] = merge_pairs(xp, col_lse[col], (col_max, col_log))
        assert row_total is not None
        row_lse.append(row_total)
        if row_found is not None:
            row_pos.append(row_found)
    lse_cols = [pair for pair in col_lse if pair is not None]
    if positives is None:
        return SoftmaxLse(stack_pairs(xp, row_lse), stack_pairs(xp, lse_cols))
    pos_cols = [pair for pair in col_pos if pair is not None]
    return SoftmaxLse(stack_pairs(xp, row_lse, row_pos), stack_pairs(xp, lse_cols, pos_cols))


def _positive_counts(
    space: Workspace, logits: Array, mask: Any, work: Array | None
) -> tuple[Array, Array, Array, Array]:
    """:func:`positive_sums` of a tile, or zeros for a tile the workspace found none in."""
    if mask is not None:
        return positive_sums(space.ops, logits, mask, work)
    rows = space.ops.xp.zeros((logits.shape[0],), dtype=logits.dtype, device=space.device)
    cols = space.ops.xp.zeros((logits.shape[1],), dtype=logits.dtype, device=space.device)
    return rows, rows, cols, cols


def softmax_grad_sums(
    xp: Namespace,
    scaled_img: Array,
    txt: Array,
    row_lse: Array,
    col_lse: Array,
    *,
    positives: Positives,
    block_size: int,
    col_weight: float = 1.0,
    gemm: Gemm | None = None,
) -> tuple[Array, Array]:
    """Second pass: accumulate ``P @ txt`` and ``P.T @ scaled_img`` with ``P = 2n * G``.

    Parameters
    ----------
    xp, scaled_img, txt
        As for :func:`softmax_lse`.
    row_lse : array, shape (m, 2)
        Finished ``(M, s)`` log-sum-exp pair of every row of ``Z`` over all columns
        (``SoftmaxLse.rows``).
    col_lse : array, shape (k, 2)
        Finished ``(M, s)`` pair of every column of ``Z`` over all rows (``SoftmaxLse.cols``).
    positives : bool or (row_ids, col_ids)
        Whether row ``i`` and text ``i`` are a positive pair (subtract ``2 I``); with ids,
        ``row_lse``/``col_lse`` are (m, 4)/(k, 4) and the positives get
        ``1/c_i + col_weight/c_j`` subtracted (``c`` their counts).
    block_size : int
        Tile edge.
    col_weight : float
        Weight of the column softmax relative to the row softmax: ``m / k`` of the global
        batch with ids (each direction is a mean over its own rows), 1 without.
    gemm : Gemm, optional
        The GEMMs' operand policy (:mod:`._precision`); None: exact operands.

    Returns
    -------
    img_acc, txt_acc : array
        ``P @ txt`` of shape (m, d) and ``P.T @ scaled_img`` of shape (k, d).
    """
    gemm = gemm or Gemm(xp, scaled_img.dtype)
    if _jaxloops.enabled(xp, scaled_img, txt, row_lse, col_lse, positives):
        return _jaxloops.softmax_grad_sums(
            scaled_img,
            txt,
            row_lse,
            col_lse,
            positives=positives,
            block_size=block_size,
            col_weight=col_weight,
            gemm=gemm,
        )
    space = _inplace.workspace(
        xp, scaled_img, txt, positives=positives, block_size=block_size, gemm=gemm
    )
    m, k, d = scaled_img.shape[0], txt.shape[0], scaled_img.shape[1]
    row_blocks, col_blocks = list(blocks(m, block_size)), list(blocks(k, block_size))
    img_acc = space.accumulator(m, d, len(row_blocks))
    txt_acc = space.accumulator(k, d, len(col_blocks))
    minus = _Minus(row_lse, col_lse, col_weight, labelled=space.labelled)
    img_ops, txt_ops = space.operand(scaled_img), space.operand(txt)
    for row, rows in enumerate(row_blocks):
        img_rows = img_ops[rows[0] : rows[1], :]
        own = (row_lse[rows[0] : rows[1], 0:1], row_lse[rows[0] : rows[1], 1:2])  # (b, 1) each
        for col, cols in enumerate(col_blocks):
            txt_cols = txt_ops[cols[0] : cols[1], :]
            logits = space.logits(img_rows, txt_cols)  # (b, d) @ (d, c) -> (b, c)
            part = softmax_grad_tile(
                space.ops,
                logits,
                own,
                (col_lse[None, cols[0] : cols[1], 0], col_lse[None, cols[0] : cols[1], 1]),
                space.mask(rows, cols),
                minus.tile(rows, cols),
                col_weight=col_weight,
                work=space.work(*logits.shape),
            )
            factor = space.factor(part)
            img_acc.add(row, rows, factor, txt_cols)  # (b, c) @ (c, d) -> (b, d)
            txt_acc.add(col, cols, factor.T, img_rows)  # (c, b) @ (b, d) -> (c, d)
    return img_acc.result(), txt_acc.result()


class _Minus:
    """What a positive (i, j) of the gradient tile subtracts: 2 without ids, 1/c_i + w/c_j with.

    With ids, ``c`` are the rows' and columns' positive counts (column 2 of the pairs) and
    ``w`` the column weight; a tile gets the pair of slices (b, 1) and (1, c).
    """

    def __init__(self, row_lse: Array, col_lse: Array, col_weight: float, *, labelled: bool):
        self._labelled = labelled
        if labelled:
            self._rows, self._cols = 1.0 / row_lse[:, 2], col_weight / col_lse[:, 2]

    def tile(self, rows: tuple[int, int], cols: tuple[int, int]) -> float | Pair:
        """Return ``minus`` of :func:`softmax_grad_tile` for tile (rows, cols)."""
        if not self._labelled:
            return 2.0
        return self._rows[rows[0] : rows[1], None], self._cols[None, cols[0] : cols[1]]
