"""``run --verify``: its float64 reference by row blocks, and how it compares a run with it.

The reference (:mod:`portable_siglip.cli._verify`) must give the dense float64 formulas'
values (:func:`portable_siglip._reference.dense_loss_and_grad`, the m x k matrix whole)
without forming the m x k matrix.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

import numpy as np
import pytest

from portable_siglip import _losses, _reference
from portable_siglip.cli import _commands as _cli
from portable_siglip.cli import _verify

SMALL = ["--batch", "300", "--dim", "16", "--block-size", "64"]


def _batch(m: int, k: int, d: int, groups: int | None, seed: int = 0) -> tuple[Any, ...]:
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((m, d))
    txt = rng.standard_normal((k, d))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    if groups is None:
        return img, txt, None, None
    # Every id is the id of some image and of some caption: no row or column lacks a positive.
    img_ids = np.arange(m) % groups
    txt_ids = np.concatenate([np.arange(groups), rng.integers(0, groups, k - groups)])
    return img, txt, img_ids, rng.permutation(txt_ids)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
@pytest.mark.parametrize(
    ("m", "k", "groups"),
    [(50, 50, None), (1, 1, None), (37, 91, 23), (64, 20, 20)],
    ids=["diagonal", "one-pair", "ids-m<k", "ids-m>k"],
)
@pytest.mark.parametrize("rows", [None, 1, 7, 13, 1000])
def test_blockwise_reference_equals_the_dense_one(
    loss: str, m: int, k: int, groups: int | None, rows: int | None
) -> None:
    img, txt, img_ids, txt_ids = _batch(m, k, 12, groups)
    scale, bias = 7.5, -3.25
    want = _reference.dense_loss_and_grad(loss, img, txt, scale, bias, img_ids, txt_ids)
    got = _verify.reference_loss_and_grad(loss, img, txt, scale, bias, img_ids, txt_ids, rows=rows)
    names = ("loss", "img", "txt", "scale", "bias")
    for name, actual, expected in zip(names, got, want, strict=True):
        expected = np.asarray(expected, dtype=np.float64)
        size = max(float(np.max(np.abs(expected))), 1e-300)
        error = float(np.max(np.abs(np.asarray(actual) - expected)))
        assert error <= 1e-12 * size, f"{loss} {name}: {error:.3e} against {size:.3e}"
    if loss == "softmax":
        assert got[4] == 0.0  # the bias cancels


def test_blockwise_reference_never_holds_the_n_by_n_matrix() -> None:
    n, d = 2048, 8  # one n x n float64 matrix is 32 MiB; the features 128 KiB each
    img, txt, _, _ = _batch(n, n, d, None)
    for loss in ("sigmoid", "softmax"):
        tracemalloc.start()
        try:
            _verify.reference_loss_and_grad(loss, img, txt, 10.0, -10.0)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < n * n * 8 / 4, f"{loss}: peak {peak / 2**20:.1f} MiB"


def test_run_verify_uses_no_dense_matrix(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def dense(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("run --verify formed the n x n matrix")

    monkeypatch.setattr(_reference, "dense_loss_and_grad", dense)
    monkeypatch.setattr(_reference, "dense_logit_gradient", dense)
    for loss in ("sigmoid", "softmax"):
        assert _cli.main(["run", "--loss", loss, *SMALL, "--verify"]) == 0
        assert "verify: ok" in capsys.readouterr().out
    argv = ["run", *SMALL, "--captions-per-image", "3", "--verify"]
    assert _cli.main(argv) == 0
    assert "verify: ok" in capsys.readouterr().out


def test_help_says_the_reference_is_blockwise(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _cli.main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "by row blocks (no n x n matrix" in text


# --------------------------------------------------------------------- item 13: underflow


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_gradients_that_underflow_the_dtype_verify(
    capsys: pytest.CaptureFixture[str], loss: str, dtype: str
) -> None:
    # t = 1e-300: t G txt is about 1e-302, zero in float32 and float16, the correctly
    # rounded value; the float64 reference holds 1e-302.
    argv = ["run", "--loss", loss, "--dtype", dtype, *SMALL, "--scale", "1e-300", "--verify"]
    assert _cli.main(argv) == 0, capsys.readouterr().out
    assert "verify: ok" in capsys.readouterr().out


def test_a_wrong_result_below_the_dtype_still_fails(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    original = _losses.evaluate

    def evaluate(spec: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        value, grads = original(spec, *args, **kwargs)
        img = np.array(grads.img, copy=True)
        img[3, 5] = 1e-36  # about 100 times float32's smallest normal number: not a rounding
        return value, grads._replace(img=img)

    monkeypatch.setattr(_losses, "evaluate", evaluate)
    assert _cli.main(["run", *SMALL, "--scale", "1e-300", "--verify"]) == 1
    assert "verify: FAILED (grads.img)" in capsys.readouterr().out


def test_comparison_floors_the_reference_at_the_dtypes_smallest_normal() -> None:
    tiny32 = float(np.finfo(np.float32).tiny)
    want = np.full((4, 3), 1e-302)  # float64 values that float32 rounds to 0
    zeros = np.zeros((4, 3), dtype=np.float32)
    assert _verify.compare(zeros, want, 1e-4)[1]  # the correctly rounded result
    planted = zeros.copy()
    planted[2, 1] = np.float32(1e3 * 1e-4 * tiny32)  # 1000 times the allowed error
    rel, ok = _verify.compare(planted, want, 1e-4)
    assert not ok
    assert rel == pytest.approx(0.1, rel=1e-3)
    subnormal = np.float32(3 * 2.0**-149)  # a few subnormal steps off: within the floor
    assert _verify.compare(zeros + subnormal, want, 1e-4)[1]
    # In the normal range the rule is the relative error it always was.
    normal = np.full((4, 3), 0.5)
    assert _verify.compare((normal * (1 + 5e-5)).astype(np.float32), normal, 1e-4)[1]
    assert not _verify.compare((normal * (1 + 5e-4)).astype(np.float32), normal, 1e-4)[1]
    # The floor is the run's dtype's: float16's smallest normal is 6.1e-5.
    half_want = np.full(3, 1e-9)
    assert _verify.compare(np.zeros(3, dtype=np.float16), half_want, 4e-3)[1]
    assert not _verify.compare(np.full(3, 1e-6, dtype=np.float16), half_want, 4e-3)[1]
    # NaN or infinity never passes, and a scalar can be judged against another size.
    assert not _verify.compare(np.float32(np.nan), 1.0, 1e-4)[1]
    assert _verify.compare(np.float32(1e-3), 0.0, 1e-4, size=100.0)[1]
