"""The tile loops over in-place buffers against the same loops over fresh arrays.

The conformance, golden and gradient tests already run every backend through the public
functions, with the buffers on (numpy, torch) and off (numpy_readonly, torch_reference).
These tests pin the in-place workspace (:mod:`portable_siglip._inplace`) and the in-place
steps of the tile formulas (:class:`portable_siglip._tilemath.InplaceOps`) themselves: the
same sums as the fresh arrays on shapes the public functions reach only through the ring
(row and column shards of different lengths, no positives), at logits far outside the usual
range, and without the temporaries fresh arrays cost.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

import numpy as np
import pytest

from portable_siglip import _inplace, _sigmoid, _softmax

ENV = "PORTABLE_SIGLIP_FAST_PATHS"

# (rows m, columns k, block): blocks that divide neither, a single short block, k != m.
SHAPES = [(7, 7, 3), (12, 12, 5), (9, 4, 4), (5, 11, 3), (6, 6, 6), (1, 1, 4)]


def _natives() -> list[str]:
    names = ["numpy"]
    try:
        import torch  # noqa: F401

        names.append("torch")
    except ImportError:  # pragma: no cover - torch is a test dependency
        pass
    return names


def _arrays(native: str, m: int, k: int, spread: float, seed: int) -> tuple[Any, Any, Any]:
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((m, 8)) * spread
    txt = rng.standard_normal((k, 8))
    diag = rng.standard_normal(max(m, k))
    if native == "torch":
        import torch

        return torch.from_numpy(img), torch.from_numpy(txt), torch.from_numpy(diag)
    return img, txt, diag


def _namespace(array: Any) -> Any:
    import array_api_compat

    return array_api_compat.array_namespace(array)


def _np(value: Any) -> np.ndarray:
    return np.asarray(value.numpy() if hasattr(value, "numpy") else value, dtype=np.float64)


def _reference(monkeypatch: pytest.MonkeyPatch, function: Any, *args: Any, **kwargs: Any) -> Any:
    with monkeypatch.context() as patch:
        patch.setenv(ENV, "0")
        return function(*args, **kwargs)


def _both(monkeypatch: pytest.MonkeyPatch, function: Any, *args: Any, **kwargs: Any) -> Any:
    """``function`` with the in-place workspace, then with fresh arrays."""
    return (
        _inplace_run(monkeypatch, function, *args, **kwargs),
        _reference(monkeypatch, function, *args, **kwargs),
    )


def _inplace_run(monkeypatch: pytest.MonkeyPatch, function: Any, *args: Any, **kwargs: Any) -> Any:
    """``function`` with the in-place workspace on; asserts the loop really takes it."""
    chosen: list[Any] = []
    real = _inplace.workspace

    def spy(*a: Any, **k: Any) -> Any:
        chosen.append(real(*a, **k))
        return chosen[-1]

    with monkeypatch.context() as patch:
        patch.delenv(ENV, raising=False)
        patch.setattr(_inplace, "workspace", spy)
        result = function(*args, **kwargs)
    assert chosen
    assert all(isinstance(w, _inplace.InplaceWorkspace) for w in chosen)
    return result


@pytest.mark.parametrize("native", _natives())
@pytest.mark.parametrize(("m", "k", "block"), SHAPES)
@pytest.mark.parametrize("spread", [1.0, 300.0])
@pytest.mark.parametrize("grad", [True, False])
def test_sigmoid_kernel_equals_reference(
    monkeypatch: pytest.MonkeyPatch,
    native: str,
    m: int,
    k: int,
    block: int,
    spread: float,
    grad: bool,
) -> None:
    img, txt, _ = _arrays(native, m, k, spread, seed=m * 100 + k)
    xp = _namespace(img)
    assert _inplace.enabled(xp, img, txt)
    fast, slow = _both(
        monkeypatch,
        _sigmoid.sigmoid_sums,
        xp,
        img,
        txt,
        -2.5,
        positives=m == k,
        block_size=block,
        grad=grad,
    )
    for name, got, want in zip(("loss", "img_acc", "txt_acc", "bias"), fast, slow, strict=True):
        if want is None:
            assert got is None, name
            continue
        np.testing.assert_allclose(_np(got), _np(want), rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("native", _natives())
@pytest.mark.parametrize(("m", "k", "block"), SHAPES)
@pytest.mark.parametrize("spread", [1.0, 300.0])
def test_softmax_kernels_equal_reference(
    monkeypatch: pytest.MonkeyPatch, native: str, m: int, k: int, block: int, spread: float
) -> None:
    img, txt, _ = _arrays(native, m, k, spread, seed=m * 100 + k + 1)
    xp = _namespace(img)
    fast, slow = _both(monkeypatch, _softmax.softmax_lse, xp, img, txt, block_size=block)
    for name, got, want in zip(("rows", "cols"), fast, slow, strict=True):
        np.testing.assert_allclose(_np(got), _np(want), rtol=1e-12, atol=1e-12, err_msg=name)
    fast_acc, slow_acc = _both(
        monkeypatch,
        _softmax.softmax_grad_sums,
        xp,
        img,
        txt,
        slow.rows,
        slow.cols,
        positives=m == k,
        block_size=block,
    )
    for name, got, want in zip(("img_acc", "txt_acc"), fast_acc, slow_acc, strict=True):
        np.testing.assert_allclose(_np(got), _np(want), rtol=1e-12, atol=1e-12, err_msg=name)


def test_enabled_only_for_numpy_and_torch_without_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    import array_api_compat

    img = np.ones((2, 2))
    xp = array_api_compat.array_namespace(img)
    assert _inplace.enabled(xp, img, img, 1.0)
    monkeypatch.setenv(ENV, "0")
    assert not _inplace.enabled(xp, img, img)
    monkeypatch.setenv(ENV, "1")
    strict = pytest.importorskip("array_api_strict")
    assert not _inplace.enabled(strict, strict.asarray(img))
    torch = pytest.importorskip("torch")
    tensor = torch.ones((2, 2))
    txp = array_api_compat.array_namespace(tensor)
    assert _inplace.enabled(txp, tensor, tensor)
    assert not _inplace.enabled(txp, tensor, tensor.requires_grad_(True))


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_numpy_kernels_hold_two_tiles_not_a_tile_per_step(
    monkeypatch: pytest.MonkeyPatch, loss: str
) -> None:
    """Peak allocation of one call: the kernels stay within two tiles over the outputs.

    The outputs are the four gradients (two n x d arrays, then cast and scaled: about six
    n x d in all) and the tile buffers; the reference loops also hold a handful of
    b x b temporaries per step and a second copy of the accumulators.
    """
    import portable_siglip as ps

    n, d, block = 2048, 16, 512
    rng = np.random.default_rng(0)
    img = rng.standard_normal((n, d))
    txt = rng.standard_normal((n, d))
    function = ps.sigmoid_loss_and_grad if loss == "sigmoid" else ps.softmax_loss_and_grad
    tile = block * block * 8
    rows = n * d * 8

    def peak() -> int:
        function(img, txt, 10.0, -10.0, block_size=block)  # warm caches of the libraries
        tracemalloc.start()
        try:
            function(img, txt, 10.0, -10.0, block_size=block)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    fast = peak()
    assert fast <= 2 * tile + 8 * rows + 2**20, (fast, tile, rows)
    monkeypatch.setenv(ENV, "0")
    slow = peak()
    assert slow > 4 * tile, (slow, tile)  # the reference really is the one with temporaries
