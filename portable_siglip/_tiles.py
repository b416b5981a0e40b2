"""Tiling of the n x n logit matrix into square blocks."""

from __future__ import annotations

from collections.abc import Iterator

from ._typing import Array, Namespace

__all__ = ["blocks", "diagonal_mask"]


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
