"""The precision policy of the tile GEMMs: which operands they take, and full float32 matmuls.

Every loop (:mod:`._sigmoid`, :mod:`._softmax`, :mod:`._inplace`, :mod:`._jaxloops`) holds its
inputs, elementwise work and accumulators in the compute dtype (float32, or float64 for float64
inputs). What differs between ``precision="exact"`` and ``"fast"`` is only what the GEMMs
multiply (docs/conventions.md, "Precision"):

* ``"exact"``: the compute-dtype values themselves;
* ``"fast"`` (float16/bfloat16 inputs only): the features (exact already) and ``t * img`` are
  rounded once to the input dtype. Where the library multiplies half operands into float32
  itself (torch on CUDA through ``out_dtype``, jax through ``preferred_element_type``), they are
  half arrays, each tile's gradient factor ``G`` is rounded to the input dtype before the two
  gradient GEMMs, and the GEMMs run on tensor cores. Elsewhere (numpy, cupy, torch on the host)
  the GEMMs are float32 GEMMs of float32 arrays holding the rounded features, and ``G`` stays
  float32: rounding it there would cost a pass over every tile and buy no speed. Products
  accumulate in float32 and come out in float32 in every case.

:func:`full_precision` makes float32 GEMMs full float32 on every backend: jax's default on GPUs
is TF32 (jax#18934), and torch's is TF32 when a user set
``torch.set_float32_matmul_precision("high")``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import array_api_compat

from ._typing import Array, Namespace

__all__ = ["PRECISIONS", "Gemm", "full_precision", "make_gemm"]

#: The accepted values of ``precision=``.
PRECISIONS = ("fast", "exact")

#: Whether torch's ``out_dtype`` GEMM works, per (device type, dtype name): probed once.
_NATIVE: dict[tuple[str, str], bool] = {}


@dataclass(frozen=True)
class Gemm:
    """How the tile GEMMs of one evaluation take their operands.

    Attributes
    ----------
    xp : namespace
        Array-API namespace of the arrays.
    compute : dtype
        The dtype of the loops' inputs, tiles and accumulators.
    half : dtype or None
        The dtype the operands are rounded to (``"fast"`` with half inputs), or None:
        operands in ``compute``.
    native : bool
        Whether the operands are half arrays multiplied into ``compute`` by the library
        itself (tensor cores); otherwise they are ``compute`` arrays.
    """

    xp: Namespace
    compute: Any
    half: Any = None
    native: bool = False

    @property
    def rounds(self) -> bool:
        """Whether the operands are rounded to a half dtype (``"fast"``)."""
        return self.half is not None

    def factor(self, tile: Array) -> Array:
        """Return a tile's gradient factor as a GEMM operand: half only for a native GEMM."""
        return self.xp.astype(tile, self.half) if self.native else tile

    def rounded(self, x: Array, *, owned: bool = False) -> Array:
        """Return ``x`` rounded to ``half`` when fast, in the compute dtype (once per call).

        The loops take ``t * img`` so rounded, and the texts, which are half values already:
        their operands are then exactly representable in ``half``. ``owned``: ``x`` is a
        temporary of the caller's, which NumPy and torch may round in place (half the time
        of two ``astype``, which each allocate and fault in a fresh array).
        """
        if self.half is None:
            return x
        if owned and array_api_compat.is_numpy_namespace(self.xp) and type(x).__module__ == "numpy":
            import numpy

            numpy.copyto(x, x.astype(self.half), casting="unsafe")
            return x
        if owned and array_api_compat.is_torch_namespace(self.xp) and not x.requires_grad:
            return x.copy_(x.to(self.half))
        return self.xp.astype(self.xp.astype(x, self.half), self.compute)

    def operand(self, x: Array) -> Array:
        """Return ``x``, whose values :meth:`rounded` holds, as a GEMM operand.

        A half array for a native GEMM (an exact cast), else ``x`` itself.
        """
        return self.xp.astype(x, self.half) if self.native else x

    def vecdot(self, a: Array, b: Array) -> Array:
        """Return the row-wise dot products of ``a`` and ``b`` as the GEMMs would form them.

        (n, d), (n, d) -> (n,), in the compute dtype, from the same operands as the tile
        GEMMs (``a`` and ``b`` as the loops receive them), so that a logit formed here and in
        a tile agree.
        """
        if not (self.native and array_api_compat.is_jax_namespace(self.xp)):
            # The values the GEMMs multiply, exactly (a half times a half is exact in float32).
            return self.xp.vecdot(a, b)
        import jax.numpy as jnp

        # Half operands, not their float32 round trip: under jit XLA may drop a
        # float32 -> half -> float32 pair (excess precision) and skip the rounding.
        return jnp.einsum(
            "ij,ij->i", self.operand(a), self.operand(b), preferred_element_type=self.compute
        )

    def matmul(self, a: Array, b: Array) -> Array:
        """Return ``a @ b`` of two operands, in the compute dtype (2-D arrays)."""
        if not self.native:
            return self.xp.matmul(a, b)
        if array_api_compat.is_jax_namespace(self.xp):
            import jax.numpy as jnp

            # Explicitly DEFAULT: the enclosing full_precision() would otherwise ask for the
            # float32 algorithm, which gives the same products without tensor cores.
            return jnp.matmul(a, b, precision="default", preferred_element_type=self.compute)
        import torch

        return torch.mm(a, b, out_dtype=self.compute)


def _torch_native(x: Array, half: Any, compute: Any) -> bool:
    """Whether torch multiplies ``half`` operands into ``compute`` on the device of ``x``.

    ``torch.mm(..., out_dtype=torch.float32)`` exists for half operands on CUDA (torch >= 2.8);
    the host has no such kernel. Tried once per device type and dtype on a 1 x 1 product;
    where it fails, the operands are float32 copies of the rounded values (the same numbers).
    """
    import torch

    kind = x.device.type
    if kind == "cpu":
        return False
    key = (kind, str(half))
    if key not in _NATIVE:
        try:
            probe = torch.ones((1, 1), dtype=half, device=x.device)
            out = torch.empty((1, 1), dtype=compute, device=x.device)
            torch.mm(probe, probe, out_dtype=compute, out=out)  # both forms the loops use
            torch.mm(probe, probe, out_dtype=compute)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError, TypeError):
            _NATIVE[key] = False
        else:
            _NATIVE[key] = True
    return _NATIVE[key]


def make_gemm(xp: Namespace, like: Array, compute: Any, half: Any) -> Gemm:
    """Return the :class:`Gemm` of arrays like ``like``; ``half`` None means exact operands."""
    if half is None:
        return Gemm(xp, compute)
    if array_api_compat.is_jax_namespace(xp):
        return Gemm(xp, compute, half, native=True)
    if array_api_compat.is_torch_namespace(xp):
        return Gemm(xp, compute, half, native=_torch_native(like, half, compute))
    return Gemm(xp, compute, half)


_torch_lock = threading.Lock()
_torch_users = 0
_torch_saved: str | None = None


@contextlib.contextmanager
def _torch_highest() -> Iterator[None]:
    """Hold torch's float32 matmul precision at "highest" (shared by concurrent threads)."""
    global _torch_users, _torch_saved
    import torch

    with _torch_lock:
        if _torch_users == 0:
            current = torch.get_float32_matmul_precision()
            _torch_saved = None if current == "highest" else current
            if _torch_saved is not None:
                torch.set_float32_matmul_precision("highest")
        _torch_users += 1
    try:
        yield
    finally:
        with _torch_lock:
            _torch_users -= 1
            if _torch_users == 0 and _torch_saved is not None:
                torch.set_float32_matmul_precision(_torch_saved)
                _torch_saved = None


@contextlib.contextmanager
def full_precision(xp: Namespace, like: Array) -> Iterator[None]:
    """Run float32 GEMMs at full float32 precision inside this block (no TF32).

    jax: ``jax.default_matmul_precision("highest")`` (a trace-time setting, so it also holds
    under ``jit``). torch on a GPU: ``torch.set_float32_matmul_precision("highest")`` while
    the loss runs, restored afterwards (only when the user had lowered it). Other
    libraries have no reduced float32 GEMM by default.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.ones((2, 2), dtype=np.float32)
    >>> with full_precision(array_api_compat.array_namespace(x), x):
    ...     print(float((x @ x)[0, 0]))
    2.0
    """
    if array_api_compat.is_jax_namespace(xp):
        import jax

        with jax.default_matmul_precision("highest"):
            yield
        return
    if array_api_compat.is_torch_namespace(xp) and getattr(like, "is_cuda", False):
        with _torch_highest():
            yield
        return
    yield
