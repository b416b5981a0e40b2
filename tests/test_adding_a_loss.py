"""The worked example of docs/adding-a-loss.md runs, and the loss it registers is right.

The page's example registers a sigmoid loss whose positive pairs weigh ``POSITIVE_WEIGHT``
through the registry only (no public function). These tests run the page's code, then check
that loss on every backend against a long-double oracle written here, from the page's
formula, with block sizes and ranks that do not divide the batch, with ids (m != k), and
under ``jax.jit`` (the jax loop runs the same tile formula).
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from itertools import accumulate, pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import assert_close, dtype_of
from test_ids import batch

from portable_siglip import _registry
from portable_siglip._losses import evaluate
from portable_siglip.comm import ThreadGroup

PAGE = Path(__file__).resolve().parents[1] / "docs" / "adding-a-loss.md"
SCALE, BIAS = 6.0, -2.5


def _example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), re.DOTALL)
    assert len(blocks) == 1, "the page has one worked example"
    return str(blocks[0])


def _run_example() -> tuple[dict[str, Any], str]:
    namespace: dict[str, Any] = {"__name__": "adding_a_loss_example"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(_example(), str(PAGE), "exec"), namespace)
    return namespace, out.getvalue()


@pytest.fixture(scope="module")
def example() -> Iterator[dict[str, Any]]:
    """The page's namespace, with its loss registered again for the tests (it unregisters)."""
    namespace, _ = _run_example()
    _registry.register(namespace["WEIGHTED"])
    try:
        yield namespace
    finally:
        _registry.unregister(namespace["WEIGHTED"].name)


def oracle(
    img: np.ndarray,
    txt: np.ndarray,
    weight: float,
    img_ids: np.ndarray | None = None,
    txt_ids: np.ndarray | None = None,
) -> dict[str, Any]:
    """Loss and gradients of the weighted sigmoid loss, dense, in long double."""
    img, txt = img.astype(np.longdouble), txt.astype(np.longdouble)
    m, k = img.shape[0], txt.shape[0]
    if img_ids is None:
        positive = np.eye(m, k, dtype=np.longdouble)
    else:
        positive = (img_ids[:, None] == txt_ids[None, :]).astype(np.longdouble)
    sims = img @ txt.T
    logits = np.longdouble(SCALE) * sims + np.longdouble(BIAS)
    weights = 1 + (np.longdouble(weight) - 1) * positive
    labels = 2 * positive - 1
    loss = (weights * np.logaddexp(np.longdouble(0), -labels * logits)).sum() / m
    dlogits = weights * (1 / (1 + np.exp(-logits)) - positive) / m
    return {
        "loss": loss,
        "img": SCALE * dlogits @ txt,
        "txt": SCALE * dlogits.T @ img,
        "scale": (dlogits * sims).sum(),
        "bias": dlogits.sum(),
    }


def check(result: tuple[Any, Any], want: dict[str, Any], rtol: float, what: str) -> None:
    loss, grads = result
    assert_close(loss, np.float64(want["loss"]), rtol, f"{what} loss")
    for name in ("img", "txt", "scale", "bias"):
        assert_close(getattr(grads, name), want[name].astype(np.float64), rtol, f"{what} d{name}")


def test_the_example_prints_what_the_page_says() -> None:
    _, printed = _run_example()
    claimed = re.findall(r"print\(.*\)\s+#\s?(.*)", _example())
    assert printed.splitlines() == claimed
    assert "weighted-sigmoid" not in _registry.names()  # the example cleans up after itself


@pytest.mark.parametrize("block", [3, 5, 64])
def test_weighted_loss_equals_the_oracle(xp: Any, example: dict[str, Any], block: int) -> None:
    rng = np.random.default_rng(block)
    img, txt = rng.standard_normal((13, 5)), rng.standard_normal((13, 5))
    f64 = dtype_of(xp, "float64")
    args = [xp.asarray(a, dtype=f64) for a in (img, txt)]
    result = evaluate(example["WEIGHTED"], *args, SCALE, BIAS, grad=True, block_size=block)
    check(result, oracle(img, txt, example["POSITIVE_WEIGHT"]), 1e-12, f"b={block}")
    alone, none = evaluate(example["WEIGHTED"], *args, SCALE, BIAS, grad=False, block_size=block)
    assert none is None
    assert_close(
        alone, np.float64(oracle(img, txt, example["POSITIVE_WEIGHT"])["loss"]), 1e-12, "alone"
    )


def test_weighted_loss_with_ids(xp: Any, example: dict[str, Any]) -> None:
    img, txt, img_ids, txt_ids = batch()
    f64 = dtype_of(xp, "float64")
    args = [xp.asarray(a, dtype=f64) for a in (img, txt)]
    ids = {
        "img_ids": xp.asarray(img_ids, dtype=xp.int64),
        "txt_ids": xp.asarray(txt_ids, dtype=xp.int64),
    }
    result = evaluate(example["WEIGHTED"], *args, SCALE, BIAS, grad=True, block_size=4, **ids)
    want = oracle(img, txt, example["POSITIVE_WEIGHT"], img_ids, txt_ids)
    check(result, want, 1e-12, "ids")


def test_the_weight_is_used(example: dict[str, Any]) -> None:
    """Weight 1 is the sigmoid loss, and the example's weight changes the loss."""
    rng = np.random.default_rng(7)
    img, txt = rng.standard_normal((9, 4)), rng.standard_normal((9, 4))
    plain = evaluate(_registry.get("sigmoid"), img, txt, SCALE, BIAS, grad=False)[0]
    weighted = evaluate(example["WEIGHTED"], img, txt, SCALE, BIAS, grad=False)[0]
    assert_close(plain, np.float64(oracle(img, txt, 1.0)["loss"]), 1e-12, "weight 1")
    assert abs(float(weighted) - float(plain)) > 1e-3


@pytest.mark.parametrize("world", [2, 3])
def test_weighted_loss_across_ranks(example: dict[str, Any], world: int) -> None:
    loss = example["WEIGHTED"]
    rng = np.random.default_rng(world)
    img, txt = rng.standard_normal((11, 4)), rng.standard_normal((11, 4))
    want = oracle(img, txt, example["POSITIVE_WEIGHT"])
    edges = [0, *accumulate({2: [7, 4], 3: [2, 5, 4]}[world])]
    rows = [slice(a, b) for a, b in pairwise(edges)]
    for strategy in loss.schedules:
        results = ThreadGroup(world).run(
            lambda comm, strategy=strategy: evaluate(
                loss,
                img[rows[comm.rank]],
                txt[rows[comm.rank]],
                SCALE,
                BIAS,
                grad=True,
                comm=comm,
                strategy=strategy,
                block_size=3,
            )
        )
        for rank, (value, grads) in enumerate(results):
            assert_close(value, np.float64(want["loss"]), 1e-12, f"{strategy} rank {rank} loss")
            shard = rows[rank]
            assert_close(grads.img, want["img"][shard].astype(np.float64), 1e-12, "dimg")
            assert_close(grads.txt, want["txt"][shard].astype(np.float64), 1e-12, "dtxt")
            assert_close(grads.bias, np.float64(want["bias"]), 1e-12, "dbias")


def test_weighted_loss_under_jit(example: dict[str, Any]) -> None:
    """Traced arrays take the jax loop, which runs the same tile formula over padded tiles."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    rng = np.random.default_rng(3)
    img, txt = rng.standard_normal((10, 4)), rng.standard_normal((10, 4))

    @jax.jit
    def run(a: Any, b: Any) -> Any:
        value, grads = evaluate(example["WEIGHTED"], a, b, SCALE, BIAS, grad=True, block_size=4)
        return value, grads.img

    value, d_img = run(jnp.asarray(img), jnp.asarray(txt))
    want = oracle(img, txt, example["POSITIVE_WEIGHT"])
    assert_close(value, np.float64(want["loss"]), 1e-12, "jit loss")
    assert_close(d_img, want["img"].astype(np.float64), 1e-12, "jit dimg")
