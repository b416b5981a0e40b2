"""The arithmetic of one tile, for both losses, written once for every loop.

Three loops walk the tiles of the logit matrix: the Python loop of :mod:`._sigmoid` and
:mod:`._softmax` over fresh arrays (any array-API library), the same loop over reusable
buffers (NumPy and torch, :mod:`._inplace`), and ``lax.fori_loop`` for arrays jax is
tracing (:mod:`._jaxloops`). They differ in how they iterate and allocate; what a tile
contributes is computed here only, by the formula functions below (:func:`sigmoid_tile`,
:func:`lse_tile`, :func:`positive_sums`, :func:`softmax_grad_tile`).

The formulas are written as a sequence of elementwise steps, each naming the buffer it may
overwrite (``out=``), through an :class:`Ops` object:

* :class:`Ops` (any array-API namespace) ignores ``out`` and returns a new array each step;
* :class:`InplaceOps` (NumPy and torch) writes each step into ``out``, so a tile costs two
  reusable buffers and no temporaries.

A formula's result is the same either way; only the inputs named as ``out`` (the logits and
the ``work`` buffer) may be overwritten, and only by :class:`InplaceOps`. docs/math.md
derives every formula.
"""

from __future__ import annotations

from typing import Any

import array_api_compat

from ._typing import Array, Namespace

__all__ = [
    "DIAGONAL",
    "InplaceOps",
    "Ops",
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


class _Diagonal:
    """The positive mask "the tile's main diagonal", without forming it (see :data:`DIAGONAL`)."""

    def __repr__(self) -> str:
        return "DIAGONAL"


#: A positive mask that stands for the diagonal of a square tile (a home block without ids).
#: :class:`InplaceOps` works on the diagonal through a strided view instead of a (b, b) mask.
DIAGONAL: Any = _Diagonal()

#: A tile's positive mask: a boolean (b, c) array, :data:`DIAGONAL`, or None (no positives).
Mask = Any


class Ops:
    """The elementwise steps of the tile formulas over any array-API namespace.

    Every step returns a new array; the ``out`` argument names the buffer that
    :class:`InplaceOps` would write and is ignored here.

    Parameters
    ----------
    xp : namespace
        The array-API namespace of the tiles.

    Examples
    --------
    >>> import numpy as np
    >>> ops = Ops(array_api_compat.array_namespace(np.zeros(1)))
    >>> loss, part = sigmoid_tile(ops, np.array([[0.0]]), None, grad=True)
    >>> round(float(loss), 6), float(part[0, 0])
    (0.693147, 0.5)
    """

    def __init__(self, xp: Namespace) -> None:
        self.xp = xp

    def zero(self, like: Array) -> Array:
        """Return a 0-d zero of the dtype and device of ``like``."""
        return self.xp.zeros((), dtype=like.dtype, device=array_api_compat.device(like))

    def exp(self, x: Array, *, out: Array | None = None) -> Array:
        """``exp(x)``."""
        return self.xp.exp(x)

    def log1p(self, x: Array, *, out: Array | None = None) -> Array:
        """``log(1 + x)``."""
        return self.xp.log1p(x)

    def maximum(self, x: Array, y: Array, *, out: Array | None = None) -> Array:
        """``max(x, y)`` elementwise."""
        return self.xp.maximum(x, y)

    def add(self, x: Array, y: Array | float, *, out: Array | None = None) -> Array:
        """``x + y``."""
        return x + y

    def subtract(self, x: Array, y: Array | float, *, out: Array | None = None) -> Array:
        """``x - y``."""
        return x - y

    def multiply(self, x: Array, y: float, *, out: Array | None = None) -> Array:
        """``x * y`` for a Python scalar ``y``."""
        return y * x

    def mask_array(self, mask: Mask, tile: Array) -> Array:
        """Return ``mask`` as a boolean array of the shape of ``tile`` (None: no positive).

        For a formula that needs the positives as an array (a weight per pair, say); the
        library's own formulas take :data:`DIAGONAL` and None without forming one.
        """
        device = array_api_compat.device(tile)
        if mask is None:
            return self.xp.zeros(tile.shape, dtype=self.xp.bool, device=device)
        if mask is not DIAGONAL:
            return mask
        index = self.xp.arange(tile.shape[0], device=device)
        return index[:, None] == index[None, :]  # (b, 1) == (1, b) -> (b, b)

    def flip(self, tile: Array, mask: Mask, work: Array | None) -> Array:
        """``tile`` with the sign of its positives flipped (``-l * tile`` for labels ``l``)."""
        if mask is None:
            return tile
        return self.xp.where(self.mask_array(mask, tile), -tile, tile)

    def subtract_on(self, tile: Array, mask: Mask, minus: Array | float, work: Any) -> Array:
        """``tile - minus`` on the positives, ``tile`` elsewhere."""
        return self.xp.where(self.mask_array(mask, tile), tile - minus, tile)

    def select(self, mask: Array, x: Array, *, out: Array | None = None) -> Array:
        """``x`` on the positives, 0 elsewhere."""
        return self.xp.where(mask, x, self.zero(x))

    def count(self, mask: Array, axis: int, dtype: Any) -> Array:
        """Count the positives along ``axis``, in ``dtype``."""
        return self.xp.sum(self.xp.astype(mask, dtype), axis=axis)

    def total(self, x: Array, valid: Array | None = None) -> Array:
        """Sum ``x`` (of its ``valid`` entries only, when given)."""
        if valid is not None:
            x = self.xp.where(valid, x, self.zero(x))
        return self.xp.sum(x)


class InplaceOps(Ops):
    """The same steps written into ``out`` (NumPy, and torch tensors without grad).

    ``native`` is the library itself (``numpy`` or ``torch``): its functions take ``out=``,
    which the array-API namespace does not promise. A step without ``out`` allocates.

    Examples
    --------
    >>> import numpy as np
    >>> ops = InplaceOps(array_api_compat.array_namespace(np.zeros(1)), np)
    >>> logits, work = np.array([[0.0, 2.0], [1.0, -1.0]]), np.empty((2, 2))
    >>> loss, part = sigmoid_tile(ops, logits, DIAGONAL, grad=True, work=work)
    >>> part is logits  # the gradient part was written over the logits
    True
    """

    def __init__(self, xp: Namespace, native: Any) -> None:
        super().__init__(xp)
        self.native = native

    def exp(self, x: Array, *, out: Array | None = None) -> Array:
        """``exp(x)`` into ``out``."""
        return self.native.exp(x, out=out)

    def log1p(self, x: Array, *, out: Array | None = None) -> Array:
        """``log(1 + x)`` into ``out``."""
        return self.native.log1p(x, out=out)

    def maximum(self, x: Array, y: Array, *, out: Array | None = None) -> Array:
        """``max(x, y)`` into ``out``."""
        return self.native.maximum(x, y, out=out)

    def add(self, x: Array, y: Array | float, *, out: Array | None = None) -> Array:
        """``x + y`` into ``out``."""
        return self.native.add(x, y, out=out)

    def subtract(self, x: Array, y: Array | float, *, out: Array | None = None) -> Array:
        """``x - y`` into ``out``."""
        return self.native.subtract(x, y, out=out)

    def multiply(self, x: Array, y: float, *, out: Array | None = None) -> Array:
        """``x * y`` into ``out``."""
        return self.native.multiply(x, y, out=out)

    def flip(self, tile: Array, mask: Mask, work: Array | None) -> Array:
        """Flip the positives' sign in place: the diagonal by a strided view, a mask exactly.

        A mask goes through the free ``work`` buffer: ``tile -= 2 * (tile * mask)``.
        """
        if mask is None:
            return tile
        if mask is DIAGONAL:
            # The diagonal of a contiguous square tile is every (size + 1)-th element.
            flat = tile.reshape(-1)
            flat[:: tile.shape[1] + 1] *= -1
            return tile
        assert work is not None, "InplaceOps.flip of a mask needs a work buffer"
        self.native.multiply(tile, mask, out=work)
        work *= 2
        tile -= work
        return tile

    def subtract_on(self, tile: Array, mask: Mask, minus: Array | float, work: Any) -> Array:
        """``tile -= minus`` on the positives, in place (through ``work`` for a mask)."""
        if mask is DIAGONAL:
            flat = tile.reshape(-1)
            flat[:: tile.shape[1] + 1] -= minus
            return tile
        self.native.multiply(minus, mask, out=work)  # minus on the positives, 0 elsewhere
        tile -= work
        return tile

    def select(self, mask: Array, x: Array, *, out: Array | None = None) -> Array:
        """``x`` on the positives, 0 elsewhere, into ``out``."""
        return self.native.multiply(x, mask, out=out)

    def count(self, mask: Array, axis: int, dtype: Any) -> Array:
        """Count the positives along ``axis``, summed in ``dtype`` without a cast copy."""
        return self.xp.sum(mask, axis=axis, dtype=dtype)


def sigmoid_tile(
    ops: Ops,
    logits: Array,
    mask: Mask,
    *,
    grad: bool,
    work: Array | None = None,
    valid: Array | None = None,
) -> tuple[Array, Array | None]:
    """One tile: the sum of its loss terms, and ``n * dL/dZ`` of its pairs when ``grad``.

    ``logits`` is ``Z`` of the tile, bias included; ``mask`` marks its positives (None:
    none); ``work`` is a buffer of the tile's shape; ``valid`` (jax loop only) marks the
    pairs of a padded tile that exist, the others contributing nothing. With
    :class:`InplaceOps`, ``logits`` and ``work`` are overwritten and the gradient part is
    returned in ``logits``.

    With labels ``l = +1`` on the positives and ``-1`` elsewhere and ``u = -l * Z``, the loss
    terms are ``softplus(u) = max(u, 0) + log1p(exp(-|u|))`` (never overflows, exact for
    ``u << 0``), and ``n * dL/dZ = -l * sigmoid(u)`` with ``sigmoid(u) = exp(u - softplus(u))``,
    which reuses the softplus and cannot overflow.
    """
    # Flip the sign of the positives instead of subtracting the trace later:
    # softplus(-Z) stays exact where softplus(Z) - Z would cancel for large Z.
    u = ops.flip(logits, mask, work)
    relu = ops.maximum(u, ops.zero(u), out=work)  # max(u, 0)
    loss = ops.total(relu, valid)
    low = ops.subtract(u, relu, out=u)  # min(u, 0)
    tail = ops.subtract(low, relu, out=work)  # min(u, 0) - max(u, 0) = -|u|
    tail = ops.log1p(ops.exp(tail, out=tail), out=tail)  # log1p(exp(-|u|))
    loss = loss + ops.total(tail, valid)
    if not grad:
        return loss, None
    # u - softplus(u) = min(u, 0) - log1p(exp(-|u|)) <= 0
    part = ops.exp(ops.subtract(low, tail, out=low), out=low)  # sigmoid(u)
    part = ops.flip(part, mask, work)  # dL/dZ = -l * sigmoid(u)
    if valid is not None:
        part = ops.xp.where(valid, part, ops.zero(part))
    return loss, part


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


def lse_tile(
    ops: Ops, logits: Array, work: Array | None = None
) -> tuple[Array, Array, Array, Array]:
    """Max-subtracted ``(M, s)`` of every row and every column of one tile.

    Returns ``row_max, row_log, col_max, col_log``, shapes (b,), (b,), (c,), (c,): exp never
    sees a positive argument, so nothing overflows for abs(Z) in the thousands. Entries
    set to ``-inf`` (the padding of the jax loop) contribute nothing. With
    :class:`InplaceOps`, ``logits`` and ``work`` are overwritten.
    """
    xp = ops.xp
    row_max = xp.max(logits, axis=1)  # (b, c) -> (b,)
    shifted = ops.subtract(logits, row_max[:, None], out=work)
    row_sum = xp.sum(ops.exp(shifted, out=shifted), axis=1)  # (b, c) -> (b,)
    col_max = xp.max(logits, axis=0)  # (b, c) -> (c,)
    shifted = ops.subtract(logits, col_max[None, :], out=logits)
    col_sum = xp.sum(ops.exp(shifted, out=shifted), axis=0)  # (b, c) -> (c,)
    return row_max, xp.log(row_sum), col_max, xp.log(col_sum)


def positive_sums(
    ops: Ops, logits: Array, mask: Array, work: Array | None = None
) -> tuple[Array, Array, Array, Array]:
    """Count the positives of every row and column of a tile and sum their logits.

    Returns ``row_count, row_sum, col_count, col_sum``, in the dtype of ``logits``.
    ``logits`` is left as it is; with :class:`InplaceOps`, ``work`` is overwritten.
    """
    xp = ops.xp
    chosen = ops.select(mask, logits, out=work)
    return (
        ops.count(mask, 1, logits.dtype),
        xp.sum(chosen, axis=1),
        ops.count(mask, 0, logits.dtype),
        xp.sum(chosen, axis=0),
    )


def softmax_grad_tile(
    ops: Ops,
    logits: Array,
    rows: Pair,
    cols: Pair,
    mask: Mask,
    minus: float | Pair,
    *,
    col_weight: float = 1.0,
    work: Array | None = None,
    valid: Array | None = None,
) -> Array:
    """One tile of ``2n * dL/dZ``: ``softmax_rows + w * softmax_cols - minus`` on the positives.

    ``rows`` is ``(M, s)`` of the tile's rows, shape (b, 1) each, and ``cols`` of its
    columns, (1, c) each; both softmaxes are ``exp((Z - M) - s)``, in this order (``M + s``
    would round to ``ulp(M)``, see :mod:`._softmax`). ``minus`` is 2 on the diagonal
    without ids, or with ids the pair ``(1/c_i, w/c_j)`` of shapes (b, 1) and (1, c), whose
    sum a positive (i, j) subtracts. ``valid`` (jax loop only) zeroes the padding. With
    :class:`InplaceOps`, ``logits`` and ``work`` are overwritten and the result is returned
    in ``logits``.
    """
    # Z - M first: a difference of two logits, exact where it matters.
    row_part = ops.subtract(ops.subtract(logits, rows[0], out=work), rows[1], out=work)
    row_part = ops.exp(row_part, out=row_part)  # softmax over the row
    part = ops.subtract(ops.subtract(logits, cols[0], out=logits), cols[1], out=logits)
    part = ops.exp(part, out=part)  # softmax over the column
    if col_weight != 1.0:
        part = ops.multiply(part, col_weight, out=part)
    part = ops.add(part, row_part, out=part)
    if mask is not None:
        if isinstance(minus, tuple):
            minus = ops.add(minus[0], minus[1], out=work)  # (b, 1) + (1, c) -> (b, c)
        part = ops.subtract_on(part, mask, minus, work)
    if valid is not None:
        part = ops.xp.where(valid, part, ops.zero(part))
    return part


def stack_pairs(xp: Namespace, pairs: list[Pair], extra: list[Pair] | None = None) -> Array:
    """Concatenate per-block ``(M, s)`` vector pairs into one (k, 2) array.

    ``extra``: per-block ``(c, S)`` positive counts and sums, appended as columns 2 and 3.
    """
    columns = [xp.concat([pair[i] for pair in pairs], axis=0) for i in (0, 1)]
    if extra is not None:
        columns += [xp.concat([pair[i] for pair in extra], axis=0) for i in (0, 1)]
    return xp.stack(columns, axis=1)  # 2 (4) x (k,) -> (k, 2) ((k, 4))
