"""Tiling of the logit matrix into square blocks, and the arrays a tile loop writes.

:func:`blocks` cuts a range into blocks, :func:`positive_mask` marks a tile's positives, and
a :class:`Workspace` gives the loops of :mod:`._sigmoid` and :mod:`._softmax` their tiles,
masks and sums: a fresh array each here, reusable buffers in :mod:`._inplace`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ._precision import Gemm
from ._tilemath import Ops
from ._typing import Array, Namespace

__all__ = [
    "Accumulator",
    "Positives",
    "Workspace",
    "blocks",
    "diagonal_mask",
    "positive_mask",
]

#: Which pairs of a (row block, column block) are positives: ``True`` the diagonal (row i
#: with text i, rows and columns tiled alike), ``False`` none (another rank's texts without
#: ids), or ``(row_ids, col_ids)``: pair (i, j) is positive iff ``row_ids[i] == col_ids[j]``.
#: Under an SPMD communicator (jax ``AxisComm``) whether a block is the home block is known
#: only on the device: a traced 0-d boolean stands for True/False there (jax loops only).
Positives = bool | Array | tuple[Array, Array]


def blocks(n: int, block_size: int) -> Iterator[tuple[int, int]]:
    """Yield ``(start, stop)`` of consecutive blocks covering ``range(n)``; the last may be short.

    Examples
    --------
    >>> list(blocks(7, 3))
    [(0, 3), (3, 6), (6, 7)]
    """
    for start in range(0, n, block_size):
        yield start, min(start + block_size, n)


def diagonal_mask(xp: Namespace, size: int, device: object) -> Array:
    """Boolean (size, size) diagonal mask, by comparison (a bool ``eye`` is not portable)."""
    index = xp.arange(size, device=device)
    return index[:, None] == index[None, :]  # (size, 1) == (1, size) -> (size, size)


def positive_mask(
    xp: Namespace,
    positives: Positives,
    rows: tuple[int, int],
    cols: tuple[int, int],
    device: object,
) -> Array | None:
    """Boolean mask of the positive pairs of one tile, or None when it holds none.

    ``rows`` and ``cols`` are the tile's ``(start, stop)``. With ids the mask compares two
    id slices, (b, 1) == (1, c); no label matrix larger than a tile is ever formed.
    """
    if positives is False:
        return None
    if positives is True:
        return diagonal_mask(xp, rows[1] - rows[0], device) if rows[0] == cols[0] else None
    row_ids, col_ids = positives
    return row_ids[rows[0] : rows[1], None] == col_ids[None, cols[0] : cols[1]]


class Accumulator:
    """An (n, d) sum built block by block of rows: ``add`` a product to one block's rows.

    The allocating form: each block keeps its own array, and :meth:`result` concatenates
    them (the in-place twin in :mod:`._inplace` adds into one preallocated array).
    """

    def __init__(self, xp: Namespace, gemm: Gemm, count: int) -> None:
        self._xp = xp
        self._gemm = gemm
        self._parts: list[Array | None] = [None] * count

    def add(self, index: int, span: tuple[int, int], a: Array, b: Array) -> None:
        """Add ``a @ b`` to the rows ``span`` of block ``index``."""
        step = self._gemm.matmul(a, b)
        previous = self._parts[index]
        self._parts[index] = step if previous is None else previous + step

    def result(self) -> Array:
        """Return the (n, d) sum."""
        return self._xp.concat(self._parts, axis=0)


class Workspace:
    """How a tile loop gets its tiles, masks and sums: here, a fresh array for each.

    The loops of :mod:`._sigmoid` and :mod:`._softmax` ask the workspace for every array
    they write, so that one loop serves any array-API library (this class) and NumPy and
    torch without temporaries (:class:`._inplace.InplaceWorkspace`, same methods).
    ``ops`` are the tile formulas' steps (:mod:`._tilemath`).
    """

    def __init__(self, xp: Namespace, gemm: Gemm, positives: Positives, device: Any) -> None:
        self.xp = xp
        self.gemm = gemm
        self.positives = positives
        self.device = device
        self.ops: Ops = Ops(xp)

    @property
    def labelled(self) -> bool:
        """Whether the positives come from ids."""
        return not isinstance(self.positives, bool)

    def operand(self, x: Array) -> Array:
        """Return an (n, d) matrix as the GEMMs' operand (:meth:`Gemm.operand`)."""
        return self.gemm.operand(x)

    def logits(self, img_rows: Array, txt_cols: Array) -> Array:
        """Return the tile ``img_rows @ txt_cols.T``: (b, d) @ (d, c) -> (b, c)."""
        return self.gemm.matmul(img_rows, txt_cols.T)

    def work(self, rows: int, cols: int) -> Array | None:
        """Return a scratch tile of shape (rows, cols) for the formulas (none needed here)."""
        return None

    def mask(self, rows: tuple[int, int], cols: tuple[int, int]) -> Any:
        """Return the positive mask of tile (rows, cols) (:func:`positive_mask`)."""
        return positive_mask(self.xp, self.positives, rows, cols, self.device)

    def factor(self, part: Array) -> Array:
        """Return a tile's gradient factor as a GEMM operand (:meth:`Gemm.factor`)."""
        return self.gemm.factor(part)

    def accumulator(self, n: int, d: int, count: int) -> Accumulator:
        """Return an (n, d) sum over ``count`` blocks of rows."""
        return Accumulator(self.xp, self.gemm, count)
