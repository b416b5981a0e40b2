"""The ``"large"`` golden cases have teeth: mistakes that only show at kernel tile sizes.

The small cases have n <= 33. A loss that accumulates its per-pair terms in the half dtype,
or a tiled kernel that drops its last, partial tile while clamping its tile to n, passes
every one of them; the large cases (n from 127 to 2049, one either side of multiples of
16 to 1024) reject both. The library's own losses pass every large case in every dtype:
``check`` runs every case by default, so ``tests/test_conformance_self.py`` checks that.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import pytest
from portable_siglip.conformance import check, load_cases
from wrong_impls import half_accumulating_sigmoid

import portable_siglip as ps

LARGE = [case for case in load_cases() if "large" in case.tags]
SMALL = [case for case in load_cases() if "large" not in case.tags]


class Grads(NamedTuple):
    img: Any
    txt: Any
    scale: Any
    bias: Any


def dropped_tail_tile_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Tiled numpy sigmoid loss and gradients, tiles of min(64, n): the partial tile is lost.

    ``for r in range(n // tile)`` over rows and columns, the classic off-by-a-tile loop;
    clamping the tile to n makes every n <= 64 (all the small cases) come out right.
    """
    img, txt = np.asarray(img, dtype=np.float64), np.asarray(txt, dtype=np.float64)
    t, b, n = float(scale), float(bias), img.shape[0]
    tile = min(64, n)
    loss, d_scale, d_bias = 0.0, 0.0, 0.0
    d_img, d_txt = np.zeros_like(img), np.zeros_like(txt)
    for r in range(n // tile):
        for c in range(n // tile):
            rows, cols = slice(r * tile, (r + 1) * tile), slice(c * tile, (c + 1) * tile)
            S = img[rows] @ txt[cols].T
            z = t * S + b
            positive = np.eye(tile) if r == c else np.zeros((tile, tile))
            loss += float(np.logaddexp(0.0, -(2 * positive - 1) * z).sum())
            G = (0.5 * (1 + np.tanh(z / 2)) - positive) / n
            d_img[rows] += t * G @ txt[cols]
            d_txt[cols] += t * G.T @ img[rows]
            d_scale += float((G * S).sum())
            d_bias += float(G.sum())
    return loss / n, Grads(d_img, d_txt, np.asarray(d_scale), np.asarray(d_bias))


def _failed_large(report: Any) -> set[str]:
    return {r.case for r in report.failed if r.case in {c.name for c in LARGE}}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_accumulation_is_rejected(dtype: str) -> None:
    pytest.importorskip("torch")
    # Every small case passes: without the large cases this mistake goes unnoticed.
    assert check(
        half_accumulating_sigmoid, loss="sigmoid", backend="torch", dtype=dtype, cases=SMALL
    ).passed
    large = LARGE
    report = check(
        half_accumulating_sigmoid, loss="sigmoid", backend="torch", dtype=dtype, cases=large
    )
    assert not report.passed
    failed = {r.case for r in report.failed if r.quantity == "loss"}
    assert {c.name for c in large if c.n >= 1023} <= failed, report.table()
    worst = max(r.error for r in report.failed if r.quantity == "loss")
    assert worst > 3 * report.failed[0].tolerance


def test_dropped_tail_tile_is_rejected() -> None:
    assert check(dropped_tail_tile_sigmoid, loss="sigmoid", cases=SMALL).passed
    report = check(dropped_tail_tile_sigmoid, loss="sigmoid", cases=LARGE)
    assert not report.passed
    assert _failed_large(report) == {case.name for case in LARGE}, report.table()
    assert {r.quantity for r in report.failed} >= {"loss", "img", "txt"}


def test_the_default_selection_runs_the_large_cases() -> None:
    """``check`` runs every case by default, the large ones included, in every dtype."""
    report = check(ps.sigmoid_loss_and_grad, loss="sigmoid", dtype="float32")
    assert report.passed
    assert {case.name for case in LARGE} <= {r.case for r in report.results}
