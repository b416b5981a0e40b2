"""``cached_value_and_grad``: the two-pass jax step against ``jax.grad`` of a dense loss.

The goldens are the losses written densely here (the whole m x k logit matrix, float64),
applied to the encoders run on the whole batch at once and differentiated by ``jax.grad``
with respect to every parameter; nothing is taken from the code under test. Distributed:
a ThreadGroup of 2 and 3 ranks with uneven shards here, and ``shard_map`` over 4 CPU devices
with ``AxisComm`` in a subprocess (``tests/jax_scripts/cached_shard_map.py``).
"""

from __future__ import annotations

import contextlib
import doctest
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from portable_siglip.comm import ThreadComm, ThreadGroup

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
psj = pytest.importorskip("portable_siglip.backends.jax")

SCRIPT = Path(__file__).with_name("jax_scripts") / "cached_shard_map.py"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "frameworks.md"
RTOL = 1e-10
D_IN, HIDDEN, D = 6, 7, 4


@pytest.fixture(autouse=True)
def x64() -> Iterator[None]:
    # As tests/test_jax_bridge.py does; restored so this file leaves no trace.
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


# --- the model: a tiny MLP per tower, normalised features, learned log-scale and bias --------


def make_params(seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)

    def tower() -> dict[str, Any]:
        return {
            "w1": jnp.asarray(rng.standard_normal((D_IN, HIDDEN)) / np.sqrt(D_IN)),
            "b1": jnp.asarray(0.1 * rng.standard_normal(HIDDEN)),
            "w2": jnp.asarray(rng.standard_normal((HIDDEN, D)) / np.sqrt(HIDDEN)),
        }

    return {
        "img": tower(),
        "txt": tower(),
        "log_t": jnp.asarray(np.log(5.0)),
        "b": jnp.asarray(-2.0),
    }


def mlp(p: dict[str, Any], x: Any) -> Any:
    h = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
    return h / jnp.linalg.norm(h, axis=1, keepdims=True)


def encode_img(p: dict[str, Any], x: Any) -> Any:
    return mlp(p["img"], x)


def encode_txt(p: dict[str, Any], x: Any) -> Any:
    return mlp(p["txt"], x)


ENCODE = (encode_img, encode_txt)


def scale_and_bias(p: dict[str, Any]) -> tuple[Any, Any]:
    return jnp.exp(p["log_t"]), p["b"]


def batch(m: int, k: int, seed: int = 1) -> tuple[Any, Any]:
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((m, D_IN))
    texts = rng.standard_normal((k, D_IN))
    texts[: min(m, k)] += images[: min(m, k)]  # matched pairs look alike
    return jnp.asarray(images), jnp.asarray(texts)


def id_pairs() -> tuple[Any, Any]:
    """9 images and 12 texts; ids 0..5 each on both sides, some twice among the images."""
    img_ids = np.array([0, 0, 1, 2, 3, 3, 4, 5, 5])
    txt_ids = np.arange(12) % 6
    return jnp.asarray(img_ids), jnp.asarray(txt_ids)


# --- the dense float64 losses, written here ------------------------------------------------


def positives(m: int, k: int, img_ids: Any, txt_ids: Any) -> Any:
    if img_ids is None:
        return jnp.eye(m, k)
    return (img_ids[:, None] == txt_ids[None, :]).astype(jnp.float64)


def dense_sigmoid(img: Any, txt: Any, t: Any, b: Any, e: Any) -> Any:
    """Sum of softplus(-label * z) over all pairs, over the number of image rows."""
    z = t * (img @ txt.T) + b
    return jnp.sum(jnp.logaddexp(0.0, -(2.0 * e - 1.0) * z)) / img.shape[0]


def dense_softmax(img: Any, txt: Any, t: Any, b: Any, e: Any) -> Any:
    """Mean of the row and column cross-entropies against the uniform target on positives.

    A column without a positive (a text no image matches, ``unmatched_txt="negatives"``)
    is in every row's log-sum-exp and has no column term; the columns average over the
    k' that have one (docs/math.md).
    """
    z = t * (img @ txt.T) + b
    rows = jax.scipy.special.logsumexp(z, axis=1) - jnp.sum(e * z, axis=1) / jnp.sum(e, axis=1)
    counts = jnp.sum(e, axis=0)
    cols = jax.scipy.special.logsumexp(z, axis=0) - jnp.sum(e * z, axis=0) / jnp.maximum(counts, 1)
    matched = counts > 0
    return (jnp.mean(rows) + jnp.sum(jnp.where(matched, cols, 0.0)) / jnp.sum(matched)) / 2


DENSE = {"sigmoid": dense_sigmoid, "softmax": dense_softmax}


def golden(
    loss: str, params: Any, images: Any, texts: Any, img_ids: Any = None, txt_ids: Any = None
) -> tuple[Any, Any]:
    def whole(p: Any) -> Any:
        img, txt = encode_img(p, images), encode_txt(p, texts)
        t, b = scale_and_bias(p)
        return DENSE[loss](img, txt, t, b, positives(len(img), len(txt), img_ids, txt_ids))

    return jax.jit(jax.value_and_grad(whole))(params)


def relative(got: Any, want: Any) -> float:
    """Largest error over the golden's largest entry, floored at 1e-6: the softmax bias
    gradient is zero, up to round-off in the golden, so that one is checked to 1e-16."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.max(np.abs(got - want))) / max(float(np.max(np.abs(want))), 1e-6)


def assert_matches(got: tuple[Any, Any], want: tuple[Any, Any]) -> None:
    (value, grads), (want_value, want_grads) = got, want
    assert relative(value, want_value) <= RTOL
    flat, tree = jax.tree.flatten_with_path(grads)
    assert tree == jax.tree.structure(want_grads)
    for (path, leaf), expected in zip(flat, jax.tree.leaves(want_grads), strict=True):
        assert leaf.shape == expected.shape, path
        assert leaf.dtype == expected.dtype, path
        error = relative(leaf, expected)
        assert error <= RTOL, f"{jax.tree_util.keystr(path)}: relative error {error:.2e}"


# --- one device -------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
@pytest.mark.parametrize("chunk", [5, 4, 1, 16])  # divides 10, does not, one row, above n
def test_jit_equals_dense_grad(loss: str, chunk: int) -> None:
    params = make_params()
    images, texts = batch(10, 10)

    @jax.jit
    def step(p: Any, x: Any, y: Any) -> Any:
        return psj.cached_value_and_grad(
            ENCODE, p, x, y, loss=loss, chunk_size=chunk, scale_and_bias=scale_and_bias,
            block_size=3,
        )  # fmt: skip

    assert_matches(step(params, images, texts), golden(loss, params, images, texts))


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
@pytest.mark.parametrize("chunk", [3, 4])  # divides 9 images and 12 texts; divides neither
def test_ids_with_more_texts_than_images(loss: str, chunk: int) -> None:
    params = make_params(2)
    images, texts = batch(9, 12)
    img_ids, txt_ids = id_pairs()

    @jax.jit
    def step(p: Any, x: Any, y: Any, a: Any, c: Any) -> Any:
        return psj.cached_value_and_grad(
            ENCODE, p, x, y, loss=loss, chunk_size=chunk, scale_and_bias=scale_and_bias,
            img_ids=a, txt_ids=c, block_size=5,
        )  # fmt: skip

    want = golden(loss, params, images, texts, img_ids, txt_ids)
    assert_matches(step(params, images, texts, img_ids, txt_ids), want)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_hard_negative_texts(loss: str) -> None:
    """Texts 6 and 7 have ids no image has: with ``unmatched_txt="negatives"`` they are
    negatives of every image (the softmax loss's option; the sigmoid loss's own rule)."""
    params = make_params(9)
    images, texts = batch(9, 12)
    img_ids, _ = id_pairs()
    txt_ids = jnp.arange(12) % 8

    @jax.jit
    def step(p: Any, x: Any, y: Any, a: Any, c: Any) -> Any:
        return psj.cached_value_and_grad(
            ENCODE, p, x, y, loss=loss, chunk_size=4, scale_and_bias=scale_and_bias,
            img_ids=a, txt_ids=c, unmatched_txt="negatives", block_size=5,
        )  # fmt: skip

    want = golden(loss, params, images, texts, img_ids, txt_ids)
    assert_matches(step(params, images, texts, img_ids, txt_ids), want)


def test_unmatched_texts_are_refused_by_default() -> None:
    img_ids, _ = id_pairs()
    images, texts = batch(9, 12)
    with pytest.raises(ValueError, match=r"`txt_ids`: text row 6 \(id 6\) has no image row"):
        call(loss="softmax", images=images, texts=texts, img_ids=img_ids,
             txt_ids=jnp.arange(12) % 8)  # fmt: skip


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_eager_equals_dense_grad(loss: str) -> None:
    params = make_params(3)
    images, texts = batch(7, 7)
    got = psj.cached_value_and_grad(
        ENCODE, params, images, texts, loss=loss, chunk_size=3, scale_and_bias=scale_and_bias,
        block_size=16,
    )  # fmt: skip
    assert_matches(got, golden(loss, params, images, texts))


def test_pytree_inputs_and_dropout_keyed_per_row() -> None:
    """Inputs as a dict, sliced alike; dropout drawing from a key per row draws the same
    mask in both passes and in the golden, so the step is exact with it."""
    params = make_params(4)
    images, texts = batch(10, 10)
    keys = jax.random.split(jax.random.key(7), 10)

    def dropped(p: Any, inputs: dict[str, Any]) -> Any:
        def drop(key: Any, row: Any) -> Any:
            return jnp.where(jax.random.bernoulli(key, 0.7, row.shape), row / 0.7, 0.0)

        x = jax.vmap(drop)(inputs["key"], inputs["x"])
        return encode_img(p, x)

    got = jax.jit(
        lambda p, x, y: psj.cached_value_and_grad(
            (dropped, encode_txt), p, x, y, chunk_size=4, scale_and_bias=scale_and_bias
        )
    )(params, {"x": images, "key": keys}, texts)

    def whole(p: Any) -> Any:
        img, txt = dropped(p, {"x": images, "key": keys}), encode_txt(p, texts)
        t, b = scale_and_bias(p)
        return dense_sigmoid(img, txt, t, b, jnp.eye(10))

    want = jax.jit(jax.value_and_grad(whole))(params)
    assert_matches(got, want)
    # The dropout acted: without it the gradient differs.
    plain = golden("sigmoid", params, images, texts)
    assert relative(got[1]["img"]["w1"], plain[1]["img"]["w1"]) > 1e-3


def test_constant_scale_and_no_bias() -> None:
    """``scale_and_bias`` may return a Python number and None: those get no gradient."""
    params = make_params(5)
    images, texts = batch(6, 6)
    got = jax.jit(
        lambda p, x, y: psj.cached_value_and_grad(
            ENCODE, p, x, y, loss="softmax", chunk_size=4, scale_and_bias=lambda p: (10.0, None)
        )
    )(params, images, texts)

    def whole(p: Any) -> Any:
        return dense_softmax(encode_img(p, images), encode_txt(p, texts), 10.0, 0.0, jnp.eye(6))

    want = jax.jit(jax.value_and_grad(whole))(params)
    assert_matches(got, want)
    assert float(got[1]["log_t"]) == 0.0
    assert float(got[1]["b"]) == 0.0


@pytest.mark.parametrize(
    ("world", "shards", "strategy"), [(2, [3, 8], None), (3, [4, 1, 6], "reduce")]
)
def test_thread_group_uneven_shards(world: int, shards: list[int], strategy: str | None) -> None:
    """Eagerly with a host communicator: every rank gets the global loss and full gradient."""
    params = make_params(6)
    n = sum(shards)
    images, texts = batch(n, n)
    bounds = np.cumsum([0, *shards])

    def rank(comm: ThreadComm) -> Any:
        rows = slice(int(bounds[comm.rank]), int(bounds[comm.rank + 1]))
        return psj.cached_value_and_grad(
            ENCODE, params, images[rows], texts[rows], chunk_size=2, comm=comm,
            scale_and_bias=scale_and_bias, block_size=16, strategy=strategy,
        )  # fmt: skip

    want = golden("sigmoid", params, images, texts)
    for got in ThreadGroup(world).run(rank):
        assert_matches(got, want)


# --- memory: one chunk's activations, plus the features ----------------------------------


def _temporaries(function: Any, params: Any, n: int) -> int:
    x = jax.ShapeDtypeStruct((n, 32), jnp.float32)
    compiled = jax.jit(function).lower(params, x, x).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def test_compiled_memory_grows_with_the_features_not_the_activations() -> None:
    """A 512-wide hidden layer and 16-d features, float32, chunks of 256 rows.

    Whole-batch ``jax.value_and_grad`` keeps n x 512 activations for its backward pass:
    its temporaries grow about 16x from n = 1024 to 16384. The two-pass step keeps one
    chunk's and the n x 16 features with their gradients: it grows by a few n x d arrays
    (measured 2.7 -> 6.8 MiB, against 13 -> 194 MiB).
    """
    d, hidden, chunk = 16, 512, 256
    keys = jax.random.split(jax.random.key(0), 4)
    params = {
        "img": {"w1": jax.random.normal(keys[0], (32, hidden), jnp.float32) / 6,
                "w2": jax.random.normal(keys[1], (hidden, d), jnp.float32) / 20},
        "txt": {"w1": jax.random.normal(keys[2], (32, hidden), jnp.float32) / 6,
                "w2": jax.random.normal(keys[3], (hidden, d), jnp.float32) / 20},
        "log_t": jnp.asarray(2.3, jnp.float32),
        "b": jnp.asarray(-5.0, jnp.float32),
    }  # fmt: skip

    def tower(p: Any, x: Any) -> Any:
        h = jnp.tanh(x @ p["w1"]) @ p["w2"]
        return h / jnp.linalg.norm(h, axis=1, keepdims=True)

    encode = (lambda p, x: tower(p["img"], x), lambda p, x: tower(p["txt"], x))

    def cached(p: Any, x: Any, y: Any) -> Any:
        return psj.cached_value_and_grad(
            encode, p, x, y, chunk_size=chunk, scale_and_bias=scale_and_bias, block_size=256
        )

    def whole(p: Any, x: Any, y: Any) -> Any:
        def value(q: Any) -> Any:
            t, b = scale_and_bias(q)
            return psj.sigmoid_loss(encode[0](q, x), encode[1](q, y), t, b, block_size=256)

        return jax.value_and_grad(value)(p)

    small, large = _temporaries(cached, params, 1024), _temporaries(cached, params, 16384)
    plain = _temporaries(whole, params, 16384)
    features = (16384 - 1024) * d * 4  # bytes of one more n x d float32 array
    assert large - small <= 8 * features, f"cached: {small} -> {large} bytes"
    assert plain - _temporaries(whole, params, 1024) > 16 * features  # the golden has teeth
    assert large < plain / 10, f"cached {large} bytes, whole batch {plain}"


# --- bad input --------------------------------------------------------------------------


def call(**changes: Any) -> Any:
    images, texts = batch(4, 4)
    arguments: dict[str, Any] = {
        "encode": ENCODE,
        "params": make_params(),
        "images": images,
        "texts": texts,
        "chunk_size": 2,
        "scale_and_bias": scale_and_bias,
        **changes,
    }
    return psj.cached_value_and_grad(**arguments)


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"chunk_size": 0}, ValueError, "`chunk_size` must be a positive int, got 0"),
        ({"chunk_size": -3}, ValueError, "`chunk_size` must be a positive int, got -3"),
        ({"chunk_size": 2.0}, TypeError, "`chunk_size` must be a positive int, got 2.0"),
        ({"chunk_size": True}, TypeError, "`chunk_size` must be a positive int, got True"),
        ({"loss": "cosine"}, ValueError, "`loss` must be one of 'sigmoid', 'softmax'"),
        ({"unmatched_txt": "ignore"}, ValueError, "`unmatched_txt` must be one of"),
        ({"encode": encode_img}, TypeError, "`encode` must be a pair"),
        ({"encode": (encode_img, 3)}, TypeError, "`encode` must be a pair"),
        ({"scale_and_bias": 5.0}, TypeError, "`scale_and_bias` must be a callable"),
        ({"scale_and_bias": lambda p: 5.0}, TypeError, "`scale_and_bias` must return a pair"),
        ({"params": {"w": jnp.arange(3)}}, TypeError, "`params` must hold floating leaves"),
        (
            {"images": {"a": jnp.ones((4, 6)), "b": jnp.ones((3, 6))}},
            ValueError,
            "`images` must be an array, or a pytree of arrays, whose leaves all have the same",
        ),
        (
            {"encode": (lambda p, x: encode_img(p, x)[0], encode_txt)},
            ValueError,
            r"`encode` \(images\) must map a chunk of 2 rows to a \(2, d\) array",
        ),
    ],
)
def test_bad_input_names_the_parameter(changes: dict[str, Any], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        call(**changes)


def test_host_comm_under_jit_is_refused() -> None:
    def rank(comm: ThreadComm) -> str:
        try:
            jax.jit(lambda p: call(params=p, comm=comm))(make_params())
        except TypeError as caught:
            return str(caught)
        return "no error"

    for message in ThreadGroup(2).run(rank):
        assert "cannot be used under jax.jit" in message


# --- the docstring and the docs page ------------------------------------------------------


def test_docstring_example_runs() -> None:
    # doctest.testmod(portable_siglip.backends.jax) skips names defined in another module.
    finder = doctest.DocTestFinder()
    (test,) = finder.find(psj.cached_value_and_grad, "cached_value_and_grad", globs={})
    assert test.examples
    result = doctest.DocTestRunner().run(test)
    assert result.failed == 0


def test_docs_example_runs_and_prints_what_it_claims() -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.DOTALL)
    (block,) = [b for b in blocks if "cached_value_and_grad" in b]
    claimed = re.findall(r"^\s*print\(.*\)\s+#\s?(.*)$", block, flags=re.MULTILINE)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "frameworks.md", "exec"), {"__name__": "docs_cached"})
    assert claimed
    assert out.getvalue().splitlines() == claimed


# --- shard_map over 4 CPU devices, in a subprocess ----------------------------------------


@pytest.fixture(scope="module")
def sharded() -> dict[str, Any]:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["devices"] == 4
    return report


#: Chunks of 5 divide the 10 rows per device, 3 do not; with ids 4 divides 12 texts, not
#: 9 images; hard-negative texts; the default schedules, reduce and gather; check_vma on and
#: off.
CASES = ["sigmoid-5", "sigmoid-ids", "softmax-ids", "softmax-negatives", "sigmoid-3-reduce",
         "softmax-3-gather", "sigmoid-3-unchecked"]  # fmt: skip


def test_shard_map_ran_every_case(sharded: dict[str, Any]) -> None:
    assert sorted(sharded) == sorted(["devices", *CASES])


@pytest.mark.parametrize("case", CASES)
def test_shard_map_equals_one_device(sharded: dict[str, Any], case: str) -> None:
    """Each device's loss and gradient equal the dense full-batch ones (and one another)."""
    for quantity, error in sharded[case].items():
        assert error <= RTOL, f"{case} {quantity}: relative error {error:.2e}"
