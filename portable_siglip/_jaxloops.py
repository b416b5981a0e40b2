"""The tile loops as jax loops, for arrays that jax is tracing (``jit``, ``grad``, ``shard_map``).

The array-API loops of :mod:`._sigmoid` and :mod:`._softmax` are Python ``for`` loops: under
``jax.jit`` every tile is traced once and unrolled into the program, so the program and its
compile time grow with ``(n / block_size)^2`` (44 s at n = 16384, b = 256). Here the same
tile formulas (:mod:`._tilemath`) run inside one ``lax.fori_loop`` over all tiles: the program
holds one tile, whatever the batch.

Tiles have a fixed shape inside a jax loop, so the rows and columns are padded with zeros up
to whole tiles; a ``valid`` mask makes the padding contribute nothing (padded logits are
``-inf`` in the log-sum-exp pass, padded loss terms and gradient entries are zeroed), and
the outputs are cut back to the true rows. The tile shape is
``(min(b, m), min(b, k))``, so a batch smaller than a block is not padded at all. A new
batch shape still compiles anew, as any jitted function does; the program size does not
grow with it.

The loop bounds are Python ints, so ``fori_loop`` lowers to ``scan``, which JAX can
differentiate in both modes (the bridge's Hessians differentiate the forward rule).
Only arrays that jax is tracing take these loops; eager jax arrays take the array-API loops,
which stay the reference.
"""

from __future__ import annotations

import math
from typing import Any

import array_api_compat

from ._precision import Gemm
from ._tilemath import Ops, lse_tile, merge_lse, positive_sums, sigmoid_tile, softmax_grad_tile
from ._typing import Array, Namespace

__all__ = ["enabled", "sigmoid_sums", "softmax_grad_sums", "softmax_lse"]


def _traced(value: object) -> bool:
    if isinstance(value, tuple):
        return any(_traced(item) for item in value)
    import jax

    return isinstance(value, jax.core.Tracer)


def enabled(xp: Namespace, *values: object) -> bool:
    """Whether the jax loops apply: a jax namespace and any of ``values`` a jax tracer.

    ``values`` may hold arrays, Python scalars and tuples of arrays (the ids).
    """
    if not array_api_compat.is_jax_namespace(xp):
        return False
    return any(_traced(value) for value in values)


def _varying(*refs: object) -> tuple[str, ...]:
    """Mesh axes along which any of ``refs`` varies (inside ``shard_map``; else none)."""
    import jax

    names: set[str] = set()
    for ref in refs:
        if isinstance(ref, tuple):
            names.update(_varying(*ref))
            continue
        if not isinstance(ref, jax.Array | jax.core.Tracer):
            continue
        try:
            kind = jax.typeof(ref)
        except Exception:  # older jax: no typeof, no varying axes to match
            continue
        axes = getattr(getattr(kind, "manual_axis_type", None), "varying", None)
        names.update(axes or getattr(kind, "vma", None) or ())
    return tuple(sorted(names))


def _carry(init: tuple[Array, ...], axes: tuple[str, ...]) -> tuple[Array, ...]:
    """Mark a loop's initial carry as varying along ``axes``, as its updates will be.

    Inside ``shard_map`` a loop's carry must keep its type, and a constant (zeros) does not
    vary across devices while the tiles of a sharded batch do.
    """
    if not axes:
        return init
    from jax import lax

    out = []
    for x in init:
        missing = tuple(axis for axis in axes if axis not in _varying(x))
        out.append(lax.pcast(x, missing, to="varying") if missing else x)
    return tuple(out)


class _Grid:
    """The padded tiling of an (m, k) logit matrix: tile shape, counts and tile masks."""

    def __init__(self, m: int, k: int, block_size: int, positives: Any) -> None:
        import jax.numpy as jnp

        self.m, self.k = m, k
        self.rows, self.cols = min(block_size, m), min(block_size, k)
        self.row_tiles, self.col_tiles = math.ceil(m / self.rows), math.ceil(k / self.cols)
        self.positives = positives
        self._ids: tuple[Array, Array] | None = None
        if isinstance(positives, tuple):
            self._ids = (
                self.pad(positives[0], self.row_tiles * self.rows),
                self.pad(positives[1], self.col_tiles * self.cols),
            )
        self._row_index = jnp.arange(self.rows)
        self._col_index = jnp.arange(self.cols)

    @property
    def count(self) -> int:
        """Number of tiles."""
        return self.row_tiles * self.col_tiles

    @staticmethod
    def pad(x: Array, rows: int) -> Array:
        """``x`` with zero rows appended up to ``rows`` rows."""
        import jax.numpy as jnp

        extra = rows - x.shape[0]
        if extra == 0:
            return x
        return jnp.pad(x, ((0, extra),) + ((0, 0),) * (x.ndim - 1))

    def starts(self, tile: Array) -> tuple[Array, Array]:
        """First row and first column of tile number ``tile`` (row-major order)."""
        return (tile // self.col_tiles) * self.rows, (tile % self.col_tiles) * self.cols

    def masks(
        self, row_start: Array, col_start: Array, *, positives: bool = True
    ) -> tuple[Array, Array | None]:
        """Return ``valid`` (the pairs that exist) and the positive mask of a tile (or None)."""
        from jax import lax

        rows = row_start + self._row_index
        cols = col_start + self._col_index
        valid = (rows < self.m)[:, None] & (cols < self.k)[None, :]
        kind = self.positives
        if not positives or kind is False:
            return valid, None
        if self._ids is not None:
            row_ids = lax.dynamic_slice_in_dim(self._ids[0], row_start, self.rows)
            col_ids = lax.dynamic_slice_in_dim(self._ids[1], col_start, self.cols)
            return valid, row_ids[:, None] == col_ids[None, :]
        diagonal = rows[:, None] == cols[None, :]
        # True: the home block's diagonal; otherwise a traced flag (is this the home block?).
        return valid, diagonal if kind is True else diagonal & kind


def _add_rows(acc: Array, start: Array, value: Array) -> Array:
    """``acc[start : start + len(value)] += value`` for a traced ``start``."""
    from jax import lax

    current = lax.dynamic_slice_in_dim(acc, start, value.shape[0])
    return lax.dynamic_update_slice_in_dim(acc, current + value, start, 0)


def _slice(x: Array, start: Array, size: int) -> Array:
    from jax import lax

    return lax.dynamic_slice_in_dim(x, start, size)


def sigmoid_sums(
    scaled_img: Array,
    txt: Array,
    bias: float | Array,
    *,
    positives: Any,
    block_size: int,
    grad: bool,
    gemm: Gemm,
    tile: Any = sigmoid_tile,
) -> tuple[Array, Array | None, Array | None, Array | None]:
    """Jax-loop twin of :func:`portable_siglip._sigmoid.sigmoid_sums`; same arguments and sums."""
    import jax.numpy as jnp
    from jax import lax

    m = scaled_img.shape[0]
    k = txt.shape[0]
    grid = _Grid(m, k, block_size, positives)
    img = grid.pad(scaled_img, grid.row_tiles * grid.rows)
    texts = grid.pad(txt, grid.col_tiles * grid.cols)
    zero = jnp.zeros((), dtype=scaled_img.dtype)
    img_ops, txt_ops = gemm.operand(img), gemm.operand(texts)

    def body(index: Array, carry: tuple[Array, ...]) -> tuple[Array, ...]:
        row_start, col_start = grid.starts(index)
        rows = _slice(img_ops, row_start, grid.rows)
        cols = _slice(txt_ops, col_start, grid.cols)
        logits = gemm.matmul(rows, cols.T) + bias  # (b, d) @ (d, c) -> (b, c)
        valid, mask = grid.masks(row_start, col_start)
        tile_loss, part = tile(Ops(jnp), logits, mask, grad=grad, valid=valid)
        if part is None:
            return (carry[0] + tile_loss,)
        loss, bias_sum, img_acc, txt_acc = carry
        factor = gemm.factor(part)
        return (
            loss + tile_loss,
            bias_sum + jnp.sum(part),
            _add_rows(img_acc, row_start, gemm.matmul(factor, cols)),  # (b, c) @ (c, d) -> (b, d)
            _add_rows(txt_acc, col_start, gemm.matmul(factor.T, rows)),  # (c, b) @ (b, d)
        )

    axes = _varying(scaled_img, txt, bias, positives)
    if not grad:
        (loss,) = lax.fori_loop(0, grid.count, body, _carry((zero,), axes))
        return loss, None, None, None
    init = _carry((zero, zero, jnp.zeros_like(img), jnp.zeros_like(texts)), axes)
    loss, bias_sum, img_acc, txt_acc = lax.fori_loop(0, grid.count, body, init)
    return loss, img_acc[:m], txt_acc[:k], bias_sum


def softmax_lse(
    scaled_img: Array,
    txt: Array,
    *,
    block_size: int,
    positives: tuple[Array, Array] | None = None,
    gemm: Gemm,
) -> tuple[Array, Array]:
    """Jax-loop twin of :func:`portable_siglip._softmax.softmax_lse`; returns (rows, cols)."""
    import jax.numpy as jnp
    from jax import lax

    m = scaled_img.shape[0]
    k = txt.shape[0]
    grid = _Grid(m, k, block_size, positives if positives is not None else False)
    img = grid.pad(scaled_img, grid.row_tiles * grid.rows)
    texts = grid.pad(txt, grid.col_tiles * grid.cols)
    dtype = scaled_img.dtype
    columns = 4 if positives is not None else 2
    # Per row and column: M (from -inf: the first merge takes the tile's max), s, and with
    # ids the positive count and logit sum. Padded rows end as NaN and are cut off.
    row_init = jnp.zeros((img.shape[0], columns), dtype=dtype).at[:, 0].set(-jnp.inf)
    col_init = jnp.zeros((texts.shape[0], columns), dtype=dtype).at[:, 0].set(-jnp.inf)
    img_ops, txt_ops = gemm.operand(img), gemm.operand(texts)

    def merged(acc: Array, start: Array, top: Array, log: Array, extra: Any) -> Array:
        current = lax.dynamic_slice_in_dim(acc, start, top.shape[0])
        new_top, new_log = merge_lse(jnp, current[:, 0], current[:, 1], top, log)
        parts = [new_top, new_log]
        if extra is not None:
            parts += [current[:, 2] + extra[0], current[:, 3] + extra[1]]
        return lax.dynamic_update_slice_in_dim(acc, jnp.stack(parts, axis=1), start, 0)

    def body(tile: Array, carry: tuple[Array, Array]) -> tuple[Array, Array]:
        row_acc, col_acc = carry
        row_start, col_start = grid.starts(tile)
        rows, cols = _slice(img_ops, row_start, grid.rows), _slice(txt_ops, col_start, grid.cols)
        logits = gemm.matmul(rows, cols.T)  # (b, d) @ (d, c) -> (b, c)
        valid, mask = grid.masks(row_start, col_start)
        row_max, row_log, col_max, col_log = lse_tile(Ops(jnp), jnp.where(valid, logits, -jnp.inf))
        row_extra = col_extra = None
        if mask is not None:
            counts = positive_sums(Ops(jnp), logits, mask & valid)
            row_extra, col_extra = counts[:2], counts[2:]
        row_acc = merged(row_acc, row_start, row_max, row_log, row_extra)
        col_acc = merged(col_acc, col_start, col_max, col_log, col_extra)
        return row_acc, col_acc

    init = _carry((row_init, col_init), _varying(scaled_img, txt, positives))
    rows, cols = lax.fori_loop(0, grid.count, body, init)
    return rows[:m], cols[:k]


def softmax_grad_sums(
    scaled_img: Array,
    txt: Array,
    row_lse: Array,
    col_lse: Array,
    *,
    positives: Any,
    block_size: int,
    col_weight: float = 1.0,
    gemm: Gemm,
) -> tuple[Array, Array]:
    """Jax-loop twin of :func:`portable_siglip._softmax.softmax_grad_sums`."""
    import jax.numpy as jnp
    from jax import lax

    m = scaled_img.shape[0]
    k = txt.shape[0]
    grid = _Grid(m, k, block_size, positives)
    img = grid.pad(scaled_img, grid.row_tiles * grid.rows)
    texts = grid.pad(txt, grid.col_tiles * grid.cols)
    rows_lse = grid.pad(row_lse, img.shape[0])
    cols_lse = grid.pad(col_lse, texts.shape[0])
    labelled = isinstance(positives, tuple)
    if labelled:  # what a positive (i, j) subtracts: 1/c_i + w/c_j (padding: inf, masked)
        row_minus, col_minus = 1.0 / rows_lse[:, 2], col_weight / cols_lse[:, 2]
    img_ops, txt_ops = gemm.operand(img), gemm.operand(texts)

    def body(tile: Array, carry: tuple[Array, Array]) -> tuple[Array, Array]:
        img_acc, txt_acc = carry
        row_start, col_start = grid.starts(tile)
        rows = _slice(img_ops, row_start, grid.rows)
        cols = _slice(txt_ops, col_start, grid.cols)
        logits = gemm.matmul(rows, cols.T)  # (b, d) @ (d, c) -> (b, c)
        valid, mask = grid.masks(row_start, col_start)
        own = _slice(rows_lse, row_start, grid.rows)
        other = _slice(cols_lse, col_start, grid.cols)
        minus: float | tuple[Array, Array] = 2.0
        if labelled:
            minus = (
                _slice(row_minus, row_start, grid.rows)[:, None],
                _slice(col_minus, col_start, grid.cols)[None, :],
            )
        part = softmax_grad_tile(
            Ops(jnp),
            logits,
            (own[:, 0:1], own[:, 1:2]),
            (other[None, :, 0], other[None, :, 1]),
            mask,
            minus,
            col_weight=col_weight,
            valid=valid,
        )
        factor = gemm.factor(part)
        return (
            _add_rows(img_acc, row_start, gemm.matmul(factor, cols)),  # (b, c) @ (c, d) -> (b, d)
            _add_rows(txt_acc, col_start, gemm.matmul(factor.T, rows)),  # (c, b) @ (b, d)
        )

    axes = _varying(scaled_img, txt, row_lse, col_lse, positives)
    init = _carry((jnp.zeros_like(img), jnp.zeros_like(texts)), axes)
    img_acc, txt_acc = lax.fori_loop(0, grid.count, body, init)
    return img_acc[:m], txt_acc[:k]
