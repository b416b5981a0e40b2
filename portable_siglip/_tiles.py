"""Tiling of the n x n logit matrix into square blocks."""

from __future__ import annotations

from collections.abc import Iterator

from ._typing import Array, Namespace

__all__ = ["Positives", "blocks", "diagonal_mask", "positive_mask"]

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
