"""The `xp` fixture: one test body, every installed array library.

Backends that are not installed, or that need a GPU this machine lacks, skip themselves.
Select a subset with ``PORTABLE_SIGLIP_BACKENDS=numpy,torch``.

NumPy and torch arrays take the in-place tile kernels of ``portable_siglip._inplace``;
``numpy_readonly`` and ``torch_reference`` run the same arrays through the reference
(array-API-only) tile loops, with ``PORTABLE_SIGLIP_FAST_PATHS=0`` set for the test, so both
implementations pass every test. array_api_strict and jax always take the reference loops.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from enum import Enum
from typing import Any

import numpy as np
import pytest


class Backend(Enum):
    """Array libraries the tests run on."""

    NUMPY = "numpy"
    NUMPY_READONLY = "numpy_readonly"
    ARRAY_API_STRICT = "array_api_strict"
    TORCH = "torch"
    TORCH_REFERENCE = "torch_reference"
    JAX = "jax"
    CUPY = "cupy"
    TORCH_GPU = "torch_gpu"
    JAX_GPU = "jax_gpu"


class NumPyReadOnly:
    """NumPy namespace of read-only arrays: any in-place write by the code under test raises."""

    def __init__(self) -> None:
        import array_api_compat.numpy

        self._xp = array_api_compat.numpy
        self.__name__ = "numpy_readonly"

    def __getattr__(self, name: str) -> Any:
        return getattr(self._xp, name)

    def asarray(self, *args: Any, **kwargs: Any) -> Any:
        out = np.array(self._xp.asarray(*args, **kwargs), copy=True)
        out.flags.writeable = False
        return out


def _selected() -> set[str] | None:
    raw = os.environ.get("PORTABLE_SIGLIP_BACKENDS")
    return None if not raw else {name.strip() for name in raw.split(",")}


def _namespace(backend: Backend) -> Any:
    from array_api_compat import array_namespace

    if backend is Backend.NUMPY:
        import numpy

        return array_namespace(numpy.empty(0))
    if backend is Backend.NUMPY_READONLY:
        return NumPyReadOnly()
    if backend is Backend.ARRAY_API_STRICT:
        xs = pytest.importorskip("array_api_strict")
        xs.set_array_api_strict_flags(api_version="2024.12")
        return xs
    if backend in (Backend.TORCH, Backend.TORCH_REFERENCE, Backend.TORCH_GPU):
        torch = pytest.importorskip("torch")
        if backend is Backend.TORCH_GPU:
            if not torch.cuda.is_available():
                pytest.skip("torch_gpu needs a CUDA device")
            torch.set_default_device("cuda")
        else:
            torch.set_default_device("cpu")
        return array_namespace(torch.empty(0))
    if backend in (Backend.JAX, Backend.JAX_GPU):
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)
        # No TF32 on GPU: the tolerances below are for true float32 matmuls.
        jax.config.update("jax_default_matmul_precision", "highest")
        if backend is Backend.JAX_GPU:
            try:
                gpu = jax.devices("gpu")[0]
            except RuntimeError:
                pytest.skip("jax_gpu needs a GPU")
            jax.config.update("jax_default_device", gpu)
        else:
            jax.config.update("jax_default_device", jax.devices("cpu")[0])
        import jax.numpy as jnp

        return jnp
    if backend is Backend.CUPY:
        cupy = pytest.importorskip("cupy")
        try:
            cupy.cuda.runtime.getDeviceCount()
        except Exception:
            pytest.skip("cupy needs a CUDA device")
        return array_namespace(cupy.empty(0))
    raise AssertionError(backend)  # pragma: no cover


#: Backends whose tests run with the in-place kernels switched off.
REFERENCE_LOOPS = (Backend.NUMPY_READONLY, Backend.TORCH_REFERENCE)


@pytest.fixture(params=list(Backend), ids=[b.value for b in Backend])
def xp(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Array namespace of each backend in turn."""
    backend: Backend = request.param
    selected = _selected()
    if selected is not None and backend.value not in selected:
        pytest.skip(f"{backend.value} not in PORTABLE_SIGLIP_BACKENDS")
    namespace = _namespace(backend)
    if backend in REFERENCE_LOOPS:
        monkeypatch.setenv("PORTABLE_SIGLIP_FAST_PATHS", "0")
    yield namespace
    if backend is Backend.TORCH_GPU:
        import torch

        torch.set_default_device("cpu")


@pytest.fixture(params=["sigmoid", "softmax"])
def loss_name(request: pytest.FixtureRequest) -> str:
    """Each of the two losses in turn."""
    return str(request.param)
