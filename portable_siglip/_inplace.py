"""Reusable tile buffers for NumPy and PyTorch: the same loops and formulas, no temporaries.

The tile loops (:mod:`._sigmoid`, :mod:`._softmax`) are written against the array API, so
with the plain :class:`._tiles.Workspace` every elementwise step allocates a fresh b x b
array. On the CPU the cost of those allocations is not the arithmetic: a 1024 x 1024
float64 tile is 8 MiB, and the allocator hands such blocks back to the kernel when they are
freed, so every new temporary pays a page fault per 4 KiB page. NumPy's ``logaddexp`` is
also a scalar loop (about 15 ms per 1024 x 1024 float32 tile against 0.6 ms for ``exp``).

For namespaces whose arrays are mutable and whose functions take ``out=`` (NumPy and
PyTorch, and only for torch tensors that do not require grad), :class:`InplaceWorkspace`
gives the same loops two reusable tile buffers and the in-place steps of
:class:`._tilemath.InplaceOps`; the formulas themselves are :mod:`._tilemath`'s:

* the sigmoid tile is 9 elementwise passes (``relu``, ``-|u|``, ``exp``, ``log1p``, two sums,
  ``u - softplus(u)``, ``exp``, one sum) and three GEMMs;
* the positives of a home block without ids are its diagonal, flipped through a strided view
  (:data:`._tilemath.DIAGONAL`) instead of a mask;
* gradient rows accumulate into preallocated outputs (``addmm_`` in torch, one product
  and one in-place add in NumPy).

The allocating workspace stays the definition: the conformance suite runs both, and
``PORTABLE_SIGLIP_FAST_PATHS=0`` in the environment switches these buffers off.
"""

from __future__ import annotations

import os
from typing import Any

import array_api_compat

from ._precision import Gemm
from ._tilemath import DIAGONAL, InplaceOps
from ._tiles import Positives, Workspace
from ._typing import Array, Namespace

__all__ = ["ENV", "InplaceWorkspace", "enabled", "workspace"]

#: Environment variable that switches the in-place buffers off when set to ``0``.
ENV = "PORTABLE_SIGLIP_FAST_PATHS"


def enabled(xp: Namespace, *arrays: Array) -> bool:
    """Whether the in-place buffers apply to ``arrays`` of namespace ``xp``.

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


class _Rows:
    """An (n, d) sum in one preallocated array; each block's first product is written, not added.

    ``add`` is ``acc[span] += a @ b`` without a temporary: ``addmm_`` in torch, a product
    into a reusable ``step`` buffer and one in-place add in NumPy (and for native half GEMMs,
    which write through ``out_dtype``).
    """

    def __init__(self, space: InplaceWorkspace, n: int, d: int, count: int) -> None:
        self._space = space
        self._acc = space.xp.empty((n, d), dtype=space.dtype, device=space.device)
        self._step = space.xp.empty((space.size, d), dtype=space.dtype, device=space.device)
        self._started = [False] * count

    def add(self, index: int, span: tuple[int, int], a: Array, b: Array) -> None:
        """Add ``a @ b`` to the rows ``span`` of block ``index``."""
        target = self._acc[span[0] : span[1], :]
        if not self._started[index]:
            self._started[index] = True
            self._space.product(a, b, target)
        elif hasattr(target, "addmm_") and not self._space.gemm.native:
            target.addmm_(a, b)
        else:
            step = self._step[: span[1] - span[0], :]
            self._space.product(a, b, step)
            target += step

    def result(self) -> Array:
        """Return the (n, d) sum."""
        return self._acc


class InplaceWorkspace(Workspace):
    """Two reusable (size, size) tile buffers, a mask buffer and preallocated sums.

    Slot 0 holds the logits, which the formulas overwrite with the tile's gradient part;
    slot 1 is their ``work`` buffer. With ``"fast"`` and a native half GEMM (torch on
    CUDA) the gradient factor is rounded into one more reusable half buffer.

    On the host, a tile without any positive (most tiles, when ids repeat within small
    groups) gets the mask None, so that the formulas skip the masked passes over it: that
    keeps the ids loss within a few tenths of a percent of the plain one. On a GPU that test
    would wait for the device once per tile, so every tile keeps its mask there.
    """

    def __init__(
        self,
        xp: Namespace,
        gemm: Gemm,
        positives: Positives,
        device: Any,
        *,
        size: int,
        dtype: Any,
    ) -> None:
        super().__init__(xp, gemm, positives, device)
        self.native = _native(xp)
        self.ops = InplaceOps(xp, self.native)
        self.size = size
        self.dtype = dtype

        def buffer(kind: Any) -> Array:
            return xp.empty((size * size,), dtype=kind, device=device)

        self._tiles = [buffer(dtype), buffer(dtype)]
        self._mask = buffer(xp.bool) if self.labelled else None
        self._half = buffer(gemm.half) if gemm.native else None
        self._host = str(getattr(device, "type", device)) == "cpu"

    def _view(self, flat: Array, rows: int, cols: int) -> Array:
        return flat[: rows * cols].reshape(rows, cols)

    def product(self, a: Array, b: Array, out: Array) -> None:
        """``out = a @ b`` of two operands, in the dtype of ``out``."""
        if self.gemm.native:
            self.native.mm(a, b, out_dtype=out.dtype, out=out)
        else:
            self.native.matmul(a, b, out=out)

    def logits(self, img_rows: Array, txt_cols: Array) -> Array:
        """Return the tile ``img_rows @ txt_cols.T``, written into slot 0."""
        out = self._view(self._tiles[0], img_rows.shape[0], txt_cols.shape[0])
        self.product(img_rows, txt_cols.T, out)
        return out

    def work(self, rows: int, cols: int) -> Array:
        """Return slot 1, viewed as (rows, cols)."""
        return self._view(self._tiles[1], rows, cols)

    def mask(self, rows: tuple[int, int], cols: tuple[int, int]) -> Any:
        """Return the positives of tile (rows, cols).

        :data:`DIAGONAL` on a home block without ids; with ids a mask, or None on the host
        where the tile holds no positive.
        """
        if self._mask is None:
            return DIAGONAL if self.positives is True and rows[0] == cols[0] else None
        row_ids, col_ids = self.positives  # type: ignore[misc]
        mask = self._view(self._mask, rows[1] - rows[0], cols[1] - cols[0])
        # torch.equal compares whole tensors; its elementwise comparison is torch.eq.
        equal = getattr(self.native, "eq", None) or self.native.equal
        equal(row_ids[rows[0] : rows[1], None], col_ids[None, cols[0] : cols[1]], out=mask)
        if self._host and not bool(mask.any()):
            return None
        return mask

    def factor(self, part: Array) -> Array:
        """Return the gradient factor: the tile itself, or its copy in the half buffer."""
        if self._half is None:
            return part
        half = self._view(self._half, part.shape[0], part.shape[1])
        half.copy_(part)  # torch only: the native half GEMM
        return half

    def accumulator(self, n: int, d: int, count: int) -> Any:
        """Return an (n, d) sum in one preallocated array."""
        return _Rows(self, n, d, count)


def workspace(
    xp: Namespace,
    scaled_img: Array,
    txt: Array,
    *others: object,
    positives: Positives,
    block_size: int,
    gemm: Gemm,
) -> Workspace:
    """Return the workspace of a tile loop over ``scaled_img`` and ``txt``, in place if it can.

    :class:`InplaceWorkspace` where :func:`enabled` holds for the arrays (``others``: further
    arrays or scalars the loop reads, such as the bias), else the allocating
    :class:`._tiles.Workspace`.
    """
    device = array_api_compat.device(scaled_img)
    if not enabled(xp, scaled_img, txt, *others):
        return Workspace(xp, gemm, positives, device)
    size = min(block_size, max(scaled_img.shape[0], txt.shape[0]))
    return InplaceWorkspace(xp, gemm, positives, device, size=size, dtype=scaled_img.dtype)
