"""In-place tile kernels for NumPy and PyTorch: the same arithmetic, without temporaries.

The reference tile loops (:mod:`._sigmoid`, :mod:`._softmax`) are written against the
array API alone, so every elementwise step allocates a fresh b x b array. On the CPU the
cost of those allocations is not the arithmetic: a 1024 x 1024 float64 tile is 8 MiB, and
the allocator hands such blocks back to the kernel when they are freed, so every new
temporary pays a page fault per 4 KiB page. NumPy's ``logaddexp`` is also a scalar loop
(about 15 ms per 1024 x 1024 float32 tile against 0.6 ms for ``exp``).

For namespaces whose arrays are mutable and whose functions take ``out=`` (NumPy and
PyTorch, and only for torch tensors that do not require grad), these kernels compute the
same quantities with two reusable tile buffers, in place:

* the sigmoid tile is 9 elementwise passes (``relu``, ``-|u|``, ``exp``, ``log1p``, two sums,
  ``u - softplus(u)``, ``exp``, one sum) and three GEMMs;
* the softmax first pass keeps the reference's max-subtracted row and column ``(M, s)``
  pairs; the second pass writes ``softmax_rows + softmax_cols``, each as
  ``exp((Z - M) - s)``, over the logits;
* gradient rows accumulate into preallocated outputs (``addmm_`` in torch, one product
  and one in-place add in NumPy).

The reference loops stay the definition: the conformance suite runs both, and
``PORTABLE_SIGLIP_FAST_PATHS=0`` in the environment switches these kernels off.
"""

from __future__ import annotations

import os
from typing import Any

import array_api_compat

from ._precision import Gemm
from ._tilemath import Pair, add_pairs, merge_pairs, stack_pairs
from ._tiles import Positives, blocks
from ._typing import Array, Namespace

__all__ = ["enabled", "sigmoid_sums", "softmax_grad_sums", "softmax_lse"]

#: Environment variable that switches the in-place kernels off when set to ``0``.
ENV = "PORTABLE_SIGLIP_FAST_PATHS"


def enabled(xp: Namespace, *arrays: Array) -> bool:
    """Whether the in-place kernels apply to ``arrays`` of namespace ``xp``.

    True for NumPy arrays, and for torch tensors none of which requires grad (``out=``
    refuses those), unless ``PORTABLE_SIGLIP_FAST_PATHS=0``.
    """
    if os.environ.get(ENV, "1").strip() == "0":
        return False
    arrays = tuple(a for a in arrays if array_api_compat.is_array_api_obj(a))
    if array_api_compat.is_numpy_namespace(xp):
        return all(type(a).__module__ == "numpy" for a in arrays)
    if array_api_compat.is_torch_namespace(xp):
        return not any(getattr(a, "requires_grad", False) for a in arrays)
    return False


def _native(xp: Namespace) -> Any:
    if array_api_compat.is_torch_namespace(xp):
        import torch

        return torch
    import numpy

    return numpy


class _Tiles:
    """Reusable flat buffers of ``size**2`` elements, viewed as contiguous (r, c) tiles."""

    def __init__(self, xp: Namespace, size: int, count: int, dtype: Any, device: Any) -> None:
        self._flat = [xp.empty((size * size,), dtype=dtype, device=device) for _ in range(count)]

    def view(self, index: int, rows: int, cols: int) -> Array:
        return self._flat[index][: rows * cols].reshape(rows, cols)


class _Operands:
    """The GEMM operands of one kernel call under its :class:`Gemm` policy.

    With exact operands, and with ``"fast"`` on the host, the gradient factor is the float32
    (float64) tile itself. With ``"fast"`` and a native half GEMM (torch on CUDA) it is rounded
    to the half dtype into one reusable half buffer, which the two gradient GEMMs read.
    """

    def __init__(self, xp: Namespace, nat: Any, gemm: Gemm, size: int, device: Any) -> None:
        self.nat = nat
        self.gemm = gemm
        self._half = (
            xp.empty((size * size,), dtype=gemm.half, device=device) if gemm.native else None
        )

    def matrix(self, x: Array) -> Array:
        """Return an (n, d) matrix of the compute dtype as a GEMM operand."""
        return self.gemm.operand(x)

    def factor(self, tile: Array) -> Array:
        """Return the (b, c) gradient factor ``tile`` as a GEMM operand."""
        if self._half is None:
            return tile
        half = self._half[: tile.shape[0] * tile.shape[1]].reshape(tile.shape)
        half.copy_(tile)  # torch only: the native half GEMM
        return half

    def product(self, a: Array, b: Array, out: Array) -> None:
        """``out = a @ b`` of two operands, in the dtype of ``out``."""
        if self.gemm.native:
            self.nat.mm(a, b, out_dtype=out.dtype, out=out)
        else:
            self.nat.matmul(a, b, out=out)

    def add_product(self, acc: Array, a: Array, b: Array, step: Array, first: bool) -> None:
        """``acc += a @ b`` (``acc = a @ b`` when ``first``) of two operands."""
        if not self.gemm.native:
            _add_product(self.nat, acc, a, b, step, first)
        elif first:
            self.product(a, b, acc)
        else:
            self.product(a, b, step)
            acc += step


def _add_product(nat: Any, acc: Array, a: Array, b: Array, step: Array, first: bool) -> None:
    """``acc += a @ b`` (``acc = a @ b`` when ``first``), without a temporary in torch."""
    if first:
        nat.matmul(a, b, out=acc)
    elif hasattr(acc, "addmm_"):
        acc.addmm_(a, b)
    else:
        nat.matmul(a, b, out=step)
        acc += step


def _negate_diagonal(tile: Array) -> None:
    # The diagonal of a contiguous square tile is every (size + 1)-th element of its rows.
    flat = tile.reshape(-1)
    flat[:: tile.shape[1] + 1] *= -1


class _Masks:
    """A reusable boolean tile buffer for the positives of a tile, from two id slices.

    On the host, a tile without any positive (most tiles, when ids repeat within small
    groups) reports None, so that the kernels skip the masked passes over it: that keeps
    the ids loss within a few tenths of a percent of the plain one. On a GPU that test would
    wait for the device once per tile, so every tile keeps its mask there.
    """

    def __init__(self, xp: Namespace, nat: Any, size: int, positives: Positives, device: Any):
        self._nat = nat
        self._ids = None if isinstance(positives, bool) else positives
        self._flat = (
            None if self._ids is None else xp.empty((size * size,), dtype=xp.bool, device=device)
        )
        self._host = str(getattr(device, "type", device)) == "cpu"

    @property
    def labelled(self) -> bool:
        """Whether the positives come from ids."""
        return self._ids is not None

    def tile(self, rows: tuple[int, int], cols: tuple[int, int]) -> Array | None:
        """Return the mask of the positives of tile (rows, cols); None without any (or ids)."""
        if self._ids is None or self._flat is None:
            return None
        row_ids, col_ids = self._ids
        mask = self._flat[: (rows[1] - rows[0]) * (cols[1] - cols[0])].reshape(
            rows[1] - rows[0], cols[1] - cols[0]
        )
        # torch.equal compares whole tensors; its elementwise comparison is torch.eq.
        equal = getattr(self._nat, "eq", None) or self._nat.equal
        equal(row_ids[rows[0] : rows[1], None], col_ids[None, cols[0] : cols[1]], out=mask)
        if self._host and not bool(mask.any()):
            return None
        return mask


def _negate_where(nat: Any, tile: Array, mask: Array, work: Array) -> None:
    """``tile[mask] *= -1`` through a free tile buffer: ``tile -= 2 * (tile * mask)`` (exact)."""
    nat.multiply(tile, mask, out=work)
    work *= 2
    tile -= work


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
) -> tuple[Array, Array | None, Array | None, Array | None]:
    """In-place twin of :func:`portable_siglip._sigmoid.sigmoid_sums`; same arguments and sums."""
    nat = _native(xp)
    gemm = gemm or Gemm(xp, scaled_img.dtype)
    m, k, d = scaled_img.shape[0], txt.shape[0], scaled_img.shape[1]
    dtype = scaled_img.dtype
    device = array_api_compat.device(scaled_img)
    zero = xp.zeros((), dtype=dtype, device=device)
    tiles = _Tiles(xp, min(block_size, max(m, k)), 2, dtype, device)
    masks = _Masks(xp, nat, min(block_size, max(m, k)), positives, device)
    ops = _Operands(xp, nat, gemm, min(block_size, max(m, k)), device)
    img_ops, txt_ops = ops.matrix(scaled_img), ops.matrix(txt)
    loss = zero
    bias_sum = zero
    img_acc: Array = None
    txt_acc: Array = None
    step: Array = None
    if grad:
        img_acc = xp.empty((m, d), dtype=dtype, device=device)
        txt_acc = xp.empty((k, d), dtype=dtype, device=device)
        step = xp.empty((min(block_size, max(m, k)), d), dtype=dtype, device=device)
    for row, (row_start, row_stop) in enumerate(blocks(m, block_size)):
        img_rows = img_ops[row_start:row_stop, :]
        for col, (col_start, col_stop) in enumerate(blocks(k, block_size)):
            txt_cols = txt_ops[col_start:col_stop, :]
            u = tiles.view(0, row_stop - row_start, col_stop - col_start)
            work = tiles.view(1, row_stop - row_start, col_stop - col_start)
            ops.product(img_rows, txt_cols.T, u)  # (b, d) @ (d, c) -> (b, c)
            u += bias
            on_diagonal = positives is True and row_start == col_start
            mask = masks.tile((row_start, row_stop), (col_start, col_stop))
            if on_diagonal:
                _negate_diagonal(u)  # u = -l * Z: the positives flip sign
            elif mask is not None:
                _negate_where(nat, u, mask, work)
            # softplus(u) = max(u, 0) + log1p(exp(-|u|)), summed in two non-negative parts.
            nat.maximum(u, zero, out=work)  # relu(u)
            loss = loss + xp.sum(work)
            u -= work  # min(u, 0)
            nat.subtract(u, work, out=work)  # min(u, 0) - max(u, 0) = -|u|
            nat.exp(work, out=work)
            nat.log1p(work, out=work)  # log1p(exp(-|u|))
            loss = loss + xp.sum(work)
            if not grad:
                continue
            u -= work  # min(u, 0) - log1p(exp(-|u|)) = u - softplus(u)
            nat.exp(u, out=u)  # sigmoid(u)
            if on_diagonal:
                _negate_diagonal(u)  # dL/dZ = -l * sigmoid(u)
            elif mask is not None:
                _negate_where(nat, u, mask, work)
            bias_sum = bias_sum + xp.sum(u)
            rows = row_stop - row_start
            cols = col_stop - col_start
            factor = ops.factor(u)
            ops.add_product(
                img_acc[row_start:row_stop, :], factor, txt_cols, step[:rows, :], col == 0
            )
            ops.add_product(
                txt_acc[col_start:col_stop, :], factor.T, img_rows, step[:cols, :], row == 0
            )
    return loss, img_acc, txt_acc, bias_sum if grad else None


def softmax_lse(
    xp: Namespace,
    scaled_img: Array,
    txt: Array,
    *,
    block_size: int,
    positives: tuple[Array, Array] | None = None,
    gemm: Gemm | None = None,
) -> tuple[Array, Array]:
    """In-place twin of :func:`portable_siglip._softmax.softmax_lse`; returns (rows, cols)."""
    nat = _native(xp)
    gemm = gemm or Gemm(xp, scaled_img.dtype)
    m, k = scaled_img.shape[0], txt.shape[0]
    dtype = scaled_img.dtype
    device = array_api_compat.device(scaled_img)
    tiles = _Tiles(xp, min(block_size, max(m, k)), 2, dtype, device)
    masks = _Masks(xp, nat, min(block_size, max(m, k)), positives or False, device)
    ops = _Operands(xp, nat, gemm, 0, device)
    img_ops, txt_ops = ops.matrix(scaled_img), ops.matrix(txt)
    col_blocks = list(blocks(k, block_size))
    col_lse: list[Pair | None] = [None] * len(col_blocks)
    col_pos: list[Pair | None] = [None] * len(col_blocks)
    row_lse: list[Pair] = []
    row_pos: list[Pair] = []
    for row_start, row_stop in blocks(m, block_size):
        img_rows = img_ops[row_start:row_stop, :]
        row_total: Pair | None = None
        row_found: Pair | None = None
        for col, (col_start, col_stop) in enumerate(col_blocks):
            logits = tiles.view(0, row_stop - row_start, col_stop - col_start)
            work = tiles.view(1, row_stop - row_start, col_stop - col_start)
            ops.product(img_rows, txt_ops[col_start:col_stop, :].T, logits)
            mask = masks.tile((row_start, row_stop), (col_start, col_stop))
            if mask is not None:  # positive counts and logit sums, before the tile changes
                nat.multiply(logits, mask, out=work)
                found = (xp.sum(mask, axis=1, dtype=dtype), xp.sum(work, axis=1))
                row_found = add_pairs(row_found, found)
                found = (xp.sum(mask, axis=0, dtype=dtype), xp.sum(work, axis=0))
                col_pos[col] = add_pairs(col_pos[col], found)
            elif masks.labelled:  # a tile without positives: zero counts and sums
                none = xp.zeros((row_stop - row_start,), dtype=dtype, device=device)
                row_found = add_pairs(row_found, (none, none))
                none = xp.zeros((col_stop - col_start,), dtype=dtype, device=device)
                col_pos[col] = add_pairs(col_pos[col], (none, none))
            row_max = xp.max(logits, axis=1)  # (b, c) -> (b,)
            nat.subtract(logits, row_max[:, None], out=work)
            nat.exp(work, out=work)
            row_total = merge_pairs(xp, row_total, (row_max, xp.log(xp.sum(work, axis=1))))
            col_max = xp.max(logits, axis=0)  # (b, c) -> (c,)
            logits -= col_max[None, :]
            nat.exp(logits, out=logits)
            part = (col_max, xp.log(xp.sum(logits, axis=0)))
            col_lse[col] = merge_pairs(xp, col_lse[col], part)
        assert row_total is not None
        row_lse.append(row_total)
        if row_found is not None:
            row_pos.append(row_found)
    lse_cols = [pair for pair in col_lse if pair is not None]
    if positives is None:
        return stack_pairs(xp, row_lse), stack_pairs(xp, lse_cols)
    pos_cols = [pair for pair in col_pos if pair is not None]
    return stack_pairs(xp, row_lse, row_pos), stack_pairs(xp, lse_cols, pos_cols)


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
    """In-place twin of :func:`portable_siglip._softmax.softmax_grad_sums`."""
    nat = _native(xp)
    gemm = gemm or Gemm(xp, scaled_img.dtype)
    m, k, d = scaled_img.shape[0], txt.shape[0], scaled_img.shape[1]
    dtype = scaled_img.dtype
    device = array_api_compat.device(scaled_img)
    size = min(block_size, max(m, k))
    tiles = _Tiles(xp, size, 2, dtype, device)
    masks = _Masks(xp, nat, size, positives, device)
    ops = _Operands(xp, nat, gemm, size, device)
    img_ops, txt_ops = ops.matrix(scaled_img), ops.matrix(txt)
    if not isinstance(positives, bool):  # what a positive (i, j) subtracts: 1/c_i + w/c_j
        row_minus, col_minus = 1.0 / row_lse[:, 2], col_weight / col_lse[:, 2]
    img_acc = xp.empty((m, d), dtype=dtype, device=device)
    txt_acc = xp.empty((k, d), dtype=dtype, device=device)
    step = xp.empty((size, d), dtype=dtype, device=device)
    row_top, row_log = row_lse[:, 0], row_lse[:, 1]
    col_top, col_log = col_lse[:, 0], col_lse[:, 1]
    for row, (row_start, row_stop) in enumerate(blocks(m, block_size)):
        img_rows = img_ops[row_start:row_stop, :]
        top, log = row_top[row_start:row_stop, None], row_log[row_start:row_stop, None]
        for col, (col_start, col_stop) in enumerate(blocks(k, block_size)):
            txt_cols = txt_ops[col_start:col_stop, :]
            part = tiles.view(0, row_stop - row_start, col_stop - col_start)
            work = tiles.view(1, row_stop - row_start, col_stop - col_start)
            ops.product(img_rows, txt_cols.T, part)  # (b, d) @ (d, c) -> (b, c)
            # exp((Z - M) - s), in this order: M + s would round to ulp(M) (see _softmax).
            nat.subtract(part, top, out=work)
            work -= log
            nat.exp(work, out=work)  # softmax over the row
            part -= col_top[None, col_start:col_stop]
            part -= col_log[None, col_start:col_stop]
            nat.exp(part, out=part)  # softmax over the column
            if col_weight != 1.0:
                part *= col_weight
            part += work
            mask = masks.tile((row_start, row_stop), (col_start, col_stop))
            if mask is not None:
                nat.add(
                    row_minus[row_start:row_stop, None],
                    col_minus[None, col_start:col_stop],
                    out=work,
                )
                work *= mask
                part -= work
            elif positives is True and row_start == col_start:
                flat = part.reshape(-1)
                flat[:: part.shape[1] + 1] -= 2
            rows = row_stop - row_start
            cols = col_stop - col_start
            factor = ops.factor(part)
            ops.add_product(
                img_acc[row_start:row_stop, :], factor, txt_cols, step[:rows, :], col == 0
            )
            ops.add_product(
                txt_acc[col_start:col_stop, :], factor.T, img_rows, step[:cols, :], row == 0
            )
    return img_acc, txt_acc
