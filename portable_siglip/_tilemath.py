"""The tile bodies of both losses: what one tile contributes, written once for every loop.

The array-API loops of :mod:`._sigmoid` and :mod:`._softmax` walk the tiles in Python; the
jax loops of :mod:`._jaxloops` walk them inside ``lax.fori_loop`` when the arrays are
being traced. Both call these functions, so the arithmetic of a tile lives here only (the
in-place kernels of :mod:`._inplace` are its allocation-free twin for NumPy and torch).
docs/math.md derives every formula.
"""

from __future__ import annotations

import array_api_compat

from ._typing import Array, Namespace

__all__ = [
    "Pair",
    "add_pairs",
    "lse_tile",
    "merge_lse",
    "merge_pairs",
    "positive_sums",
    "sigmoid_tile",
    "softmax_grad_tile",
    "stack_pairs",
]


def sigmoid_tile(
    xp: Namespace,
    logits: Array,
    mask: Array | None,
    *,
    grad: bool,
    valid: Array | None = None,
) -> tuple[Array, Array | None]:
    """One tile: the sum of its loss terms, and ``n * dL/dZ`` of its pairs when ``grad``.

    The tile body of every loop (the array-API loop below and the jax loop of
    :mod:`._jaxloops`). ``logits`` is ``Z`` of the tile, bias included; ``mask`` marks its
    positives (None: none); ``valid`` (jax loop only) marks the pairs of a padded tile that
    exist, the others contributing nothing.
    """
    zero = xp.zeros((), dtype=logits.dtype, device=array_api_compat.device(logits))
    if mask is not None:
        # Flip the sign of the positives instead of subtracting the trace later:
        # softplus(-Z) stays exact where softplus(Z) - Z would cancel for large Z.
        logits = xp.where(mask, -logits, logits)
    # softplus through logaddexp(0, u): never overflows, exact for u << 0.
    softplus = xp.logaddexp(zero, logits)
    part = None
    if grad:
        # sigmoid(u) = exp(u - softplus(u)) reuses the softplus and cannot overflow.
        part = xp.exp(logits - softplus)
        if mask is not None:
            part = xp.where(mask, -part, part)  # dL/dZ = -l * sigmoid(u)
        if valid is not None:
            part = xp.where(valid, part, zero)
    if valid is not None:
        softplus = xp.where(valid, softplus, zero)
    return xp.sum(softplus), part


def merge_lse(
    xp: Namespace, max_a: Array, log_a: Array, max_b: Array, log_b: Array
) -> tuple[Array, Array]:
    """Merge two partial log-sum-exps given as ``(M, s)`` pairs of vectors; return the pair.

    ``M = max(Ma, Mb)`` and ``s = log(exp(Ma - M + sa) + exp(Mb - M + sb))``: one shift is
    exactly 0, the other <= 0, so nothing overflows and ``M`` stays an actual logit.
    """
    top = xp.maximum(max_a, max_b)
    return top, xp.logaddexp((max_a - top) + log_a, (max_b - top) + log_b)


#: Two vectors that travel together: ``(M, s)`` of a log-sum-exp, or ``(c, S)`` positive sums.
Pair = tuple[Array, Array]


def merge_pairs(xp: Namespace, total: Pair | None, part: Pair) -> Pair:
    """:func:`merge_lse` of a running ``(M, s)`` pair (None before the first) and a new one."""
    return part if total is None else merge_lse(xp, *total, *part)


def add_pairs(total: Pair | None, part: Pair) -> Pair:
    """Add a ``(c, S)`` pair of positive counts and sums to a running one (None: none yet)."""
    return part if total is None else (total[0] + part[0], total[1] + part[1])


def lse_tile(xp: Namespace, logits: Array) -> tuple[Array, Array, Array, Array]:
    """Max-subtracted ``(M, s)`` of every row and every column of one tile.

    Returns ``row_max, row_log, col_max, col_log``, shapes (b,), (b,), (c,), (c,): exp never
    sees a positive argument, so nothing overflows for abs(Z) in the thousands. Entries
    set to ``-inf`` (the padding of the jax loop) contribute nothing.
    """
    row_max = xp.max(logits, axis=1)  # (b, c) -> (b,)
    row_sum = xp.sum(xp.exp(logits - row_max[:, None]), axis=1)  # (b, c) -> (b,)
    col_max = xp.max(logits, axis=0)  # (b, c) -> (c,)
    col_sum = xp.sum(xp.exp(logits - col_max[None, :]), axis=0)  # (b, c) -> (c,)
    return row_max, xp.log(row_sum), col_max, xp.log(col_sum)


def positive_sums(xp: Namespace, logits: Array, mask: Array) -> tuple[Array, Array, Array, Array]:
    """Count the positives of every row and column of a tile and sum their logits.

    Returns ``row_count, row_sum, col_count, col_sum``, in the dtype of ``logits``.
    """
    zero = xp.zeros((), dtype=logits.dtype, device=array_api_compat.device(logits))
    ones = xp.astype(mask, logits.dtype)
    chosen = xp.where(mask, logits, zero)
    return (
        xp.sum(ones, axis=1),
        xp.sum(chosen, axis=1),
        xp.sum(ones, axis=0),
        xp.sum(chosen, axis=0),
    )


def softmax_grad_tile(
    xp: Namespace,
    logits: Array,
    rows: tuple[Array, Array],
    cols: tuple[Array, Array],
    mask: Array | None,
    minus: float | Array,
    *,
    col_weight: float = 1.0,
    valid: Array | None = None,
) -> Array:
    """One tile of ``2n * dL/dZ``: ``softmax_rows + w * softmax_cols - minus`` on the positives.

    ``rows`` is ``(M, s)`` of the tile's rows, shape (b, 1) each, and ``cols`` of its
    columns, (1, c) each; both softmaxes are ``exp((Z - M) - s)``, in this order (``M + s``
    would round to ``ulp(M)``, see :mod:`._softmax`). ``minus`` is 2 on the diagonal
    without ids, or the (b, c) array ``1/c_i + w/c_j`` with ids. ``valid`` (jax loop only)
    zeroes the padding.
    """
    col_part = xp.exp((logits - cols[0]) - cols[1])
    if col_weight != 1.0:
        col_part = col_weight * col_part
    part = xp.exp((logits - rows[0]) - rows[1]) + col_part
    if mask is not None:
        part = xp.where(mask, part - minus, part)
    if valid is not None:
        zero = xp.zeros((), dtype=part.dtype, device=array_api_compat.device(part))
        part = xp.where(valid, part, zero)
    return part


def stack_pairs(xp: Namespace, pairs: list[Pair], extra: list[Pair] | None = None) -> Array:
    """Concatenate per-block ``(M, s)`` vector pairs into one (k, 2) array.

    ``extra``: per-block ``(c, S)`` positive counts and sums, appended as columns 2 and 3.
    """
    columns = [xp.concat([pair[i] for pair in pairs], axis=0) for i in (0, 1)]
    if extra is not None:
        columns += [xp.concat([pair[i] for pair in extra], axis=0) for i in (0, 1)]
    return xp.stack(columns, axis=1)  # 2 (4) x (k,) -> (k, 2) ((k, 4))
