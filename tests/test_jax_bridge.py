"""The JAX bridge: custom_vjp losses against JAX autodiff of dense float64 formulas.

The goldens are the losses written densely here (the whole n x n logit matrix) and
differentiated by ``jax.grad``, or the core's analytic gradients where the issue asks for
exactly that comparison; nothing is taken from the bridge itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from itertools import accumulate
from typing import Any

import numpy as np
import pytest
from helpers import GRAD_RTOL, assert_close, pairs, to_numpy
from helpers import LOSS_AND_GRAD as CORE_LOSS_AND_GRAD

import portable_siglip as ps
from portable_siglip.comm import SelfComm, ThreadComm, ThreadGroup

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
psj = pytest.importorskip("portable_siglip.backends.jax")

BRIDGE = {"sigmoid": psj.sigmoid_loss, "softmax": psj.softmax_loss}
SCALE, BIAS = 6.0, -3.0
ALL = (0, 1, 2, 3)
#: One shape and tile edge throughout (7 rows, tiles of 3, 3 and 1): eager JAX compiles
#: every operation once per shape, so sharing them keeps this file fast.
N, BLOCK = 7, 3


@pytest.fixture(autouse=True)
def x64() -> Iterator[None]:
    # As tests/conftest.py does for its jax backend; restored so this file leaves no trace.
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def dense_sigmoid(img: Any, txt: Any, t: Any, b: Any) -> Any:
    """SigLIP loss from the whole logit matrix: softplus(-label * z) summed, over n."""
    n = img.shape[0]
    z = t * (img @ txt.T) + b
    labels = 2.0 * jnp.eye(n, dtype=z.dtype) - 1.0
    return jnp.sum(jnp.logaddexp(0.0, -labels * z)) / n


def dense_softmax(img: Any, txt: Any, t: Any, b: Any) -> Any:
    """Symmetric CLIP loss: mean of the row and column cross-entropies of the diagonal."""
    n = img.shape[0]
    z = t * (img @ txt.T) + b
    rows = z - jax.scipy.special.logsumexp(z, axis=1, keepdims=True)
    cols = z - jax.scipy.special.logsumexp(z, axis=0, keepdims=True)
    return -(jnp.trace(rows) + jnp.trace(cols)) / (2 * n)


DENSE = {"sigmoid": dense_sigmoid, "softmax": dense_softmax}
#: The goldens: the dense loss and its four gradients by jax autodiff (compiled once).
GOLDEN = {name: jax.jit(jax.value_and_grad(f, argnums=ALL)) for name, f in DENSE.items()}


def inputs(n: int = N, d: int = 4, seed: int = 0) -> tuple[Any, Any, Any, Any]:
    img, txt = pairs(np.random.default_rng(seed), n, d)
    return jnp.asarray(img), jnp.asarray(txt), jnp.asarray(SCALE), jnp.asarray(BIAS)


def close(actual: Any, expected: Any, what: str, rtol: float = 1e-10) -> None:
    got = np.asarray(actual, dtype=np.float64) if isinstance(actual, float) else to_numpy(actual)
    np.testing.assert_allclose(got, to_numpy(expected), rtol=rtol, atol=1e-12, err_msg=what)


def compare_grads(loss: str, got: tuple[Any, ...], want: tuple[Any, ...]) -> None:
    for name, g, w in zip(("img", "txt", "scale", "bias"), got, want, strict=True):
        if loss == "softmax" and name == "bias":
            # Exactly zero analytically; dense autodiff leaves round-off of n^2 terms.
            assert float(to_numpy(g)) == 0.0
            assert abs(float(to_numpy(w))) < 1e-13
        else:
            close(g, w, f"d{name}")


# --- 1. jax.grad / value_and_grad against autodiff of the dense loss ---


@pytest.mark.parametrize("n", [7, 1])
def test_grad_matches_dense_autodiff(loss_name: str, n: int) -> None:
    img, txt, t, b = inputs(n)
    bridge = BRIDGE[loss_name]
    want_loss, want = GOLDEN[loss_name](img, txt, t, b)
    value, got = jax.value_and_grad(bridge, argnums=ALL)(img, txt, t, b, block_size=BLOCK)
    close(value, want_loss, "loss")
    assert value.dtype == jnp.float64
    compare_grads(loss_name, got, want)
    compare_grads(loss_name, jax.grad(bridge, argnums=ALL)(img, txt, t, b, block_size=BLOCK), want)
    # Single arguments, in any order of argnums.
    close(jax.grad(bridge)(img, txt, t, b, block_size=BLOCK), want[0], "grad img alone")
    got_bt = jax.grad(bridge, argnums=(3, 1))(img, txt, t, b, block_size=BLOCK)
    compare_grads(loss_name, (want[0], got_bt[1], want[2], got_bt[0]), want)


def test_cotangent_is_applied(loss_name: str) -> None:
    # The backward pass must scale the stored gradients by the incoming cotangent:
    # d(2.5 L + L^2) = (2.5 + 2 L) dL.
    img, txt, t, b = inputs(seed=1)
    bridge = partial(BRIDGE[loss_name], block_size=BLOCK)
    got = jax.grad(lambda *a: 2.5 * bridge(*a) + bridge(*a) ** 2, argnums=ALL)(img, txt, t, b)
    loss, want = GOLDEN[loss_name](img, txt, t, b)
    compare_grads(loss_name, got, tuple((2.5 + 2.0 * loss) * w for w in want))


# --- 2. jit(grad) matches the core's analytic gradients ---


def test_jit_grad_matches_analytic_gradients(loss_name: str) -> None:
    img, txt, t, b = inputs(seed=2)
    _, want = CORE_LOSS_AND_GRAD[loss_name](
        to_numpy(img), to_numpy(txt), SCALE, BIAS, block_size=BLOCK
    )
    grad = jax.jit(jax.grad(BRIDGE[loss_name], argnums=ALL), static_argnames="block_size")
    got = grad(img, txt, t, b, block_size=BLOCK)
    for name, g in zip(ps.Gradients._fields, got, strict=True):
        assert_close(g, to_numpy(getattr(want, name)), 1e-12, name)
    # Closed-over arrays next to a traced one (constants of the jitted function).
    d_img = jax.jit(jax.grad(lambda i: BRIDGE[loss_name](i, txt, t, b, block_size=BLOCK)))(img)
    assert_close(d_img, want.img, 1e-12, "img, the rest closed over")


# --- 3. static (Python) scale/bias against array ones ---


def test_static_and_array_scalars_agree(loss_name: str) -> None:
    img, txt, t, b = inputs(seed=3)
    bridge = BRIDGE[loss_name]
    want, want_grads = GOLDEN[loss_name](img, txt, t, b)
    for scale, bias in [(SCALE, BIAS), (t, BIAS), (SCALE, b), (t, b), (np.asarray(SCALE), b)]:
        value = bridge(img, txt, scale, bias, block_size=BLOCK)
        close(value, want, f"{type(scale)}, {type(bias)}")
    # Under jit, Python floats closed over stay static (traced ones: the tests below).
    jitted = jax.jit(lambda i, x: bridge(i, x, SCALE, BIAS, block_size=BLOCK))
    close(jitted(img, txt), want, "jit, static")
    # A static scale still gives the features their gradient; an array one gets its own.
    d_img = jax.grad(bridge)(img, txt, SCALE, BIAS, block_size=BLOCK)
    close(d_img, want_grads[0], "img, static scalars")
    d_scale = jax.grad(bridge, argnums=2)(img, txt, t, BIAS, block_size=BLOCK)
    close(d_scale, want_grads[2], "scale, static bias")
    if loss_name == "softmax":
        close(bridge(img, txt, t, block_size=BLOCK), want, "bias=None")
        d_scale = jax.grad(bridge, argnums=2)(img, txt, t, None, block_size=BLOCK)
        close(d_scale, want_grads[2], "scale, bias=None")


def test_numpy_inputs_become_jax_arrays(loss_name: str) -> None:
    img, txt, t, b = inputs(seed=4)
    bridge = BRIDGE[loss_name]
    want, want_grads = GOLDEN[loss_name](img, txt, t, b)
    arrays = (to_numpy(img), to_numpy(txt), np.asarray(SCALE), np.asarray(BIAS))
    value = bridge(*arrays, block_size=BLOCK)
    assert isinstance(value, jax.Array)
    close(value, want, "loss")
    got = jax.grad(bridge, argnums=ALL)(*arrays, block_size=BLOCK)
    assert all(isinstance(g, jax.Array) for g in got)
    compare_grads(loss_name, got, want_grads)


# --- 4. float32 and bfloat16 ---


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_low_precision_dtypes(loss_name: str, dtype: str) -> None:
    img64, txt64, t64, b64 = inputs(seed=5)
    img, txt = img64.astype(dtype), txt64.astype(dtype)
    # Each gradient comes back in the dtype of its primal: a float32 scale and a float64
    # bias next to `dtype` features, a float32 loss.
    t = jnp.asarray(SCALE, dtype=jnp.float32)
    bridge = partial(BRIDGE[loss_name], block_size=BLOCK, precision="exact")
    value, got = jax.jit(jax.value_and_grad(bridge, argnums=ALL))(img, txt, t, b64)
    assert value.dtype == jnp.float32
    assert [g.dtype for g in got] == [img.dtype, txt.dtype, jnp.float32, jnp.float64]
    # The golden is float64 autodiff at the inputs as rounded to `dtype`.
    rounded = (img.astype(jnp.float64), txt.astype(jnp.float64), t64, b64)
    want_loss, want = GOLDEN[loss_name](*rounded)
    assert_close(value, float(want_loss), 1e-5, "loss")
    for name, g, w in zip(("img", "txt", "scale"), got[:3], want[:3], strict=True):
        assert_close(g, to_numpy(w), GRAD_RTOL[dtype], name)
    if loss_name == "sigmoid":
        assert_close(got[3], to_numpy(want[3]), 1e-5, "bias")


# --- 5. the value alone does no gradient work; a gradient runs the core once ---


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    calls = {"loss": 0, "loss_and_grad": 0}
    for loss in ("sigmoid", "softmax"):
        for suffix in ("loss", "loss_and_grad"):
            original = getattr(ps, f"{loss}_{suffix}")

            def wrapper(*a: Any, _f: Any = original, _k: str = suffix, **kw: Any) -> Any:
                calls[_k] += 1
                return _f(*a, **kw)

            monkeypatch.setattr(ps, f"{loss}_{suffix}", wrapper)
    return calls


def test_gradient_pass_runs_the_core_once(loss_name: str, counted: dict[str, int]) -> None:
    img, txt, t, b = inputs(seed=6)
    jax.value_and_grad(BRIDGE[loss_name], argnums=ALL)(img, txt, t, b, block_size=BLOCK)
    assert counted == {"loss": 0, "loss_and_grad": 1}
    BRIDGE[loss_name](img, txt, t, b, block_size=BLOCK)
    assert counted == {"loss": 1, "loss_and_grad": 1}


def test_value_alone_computes_no_gradients(loss_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    img, txt, t, b = inputs(seed=7)
    want = GOLDEN[loss_name](img, txt, t, b)[0]

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("gradients computed for a value-only call")

    monkeypatch.setattr(ps, f"{loss_name}_loss_and_grad", refuse)
    bridge = partial(BRIDGE[loss_name], block_size=BLOCK)
    close(bridge(img, txt, t, b), want, "eager")
    close(jax.jit(bridge)(img, txt, t, b), want, "jit")
    # The patch is the function the bridge uses: differentiating does reach it.
    with pytest.raises(AssertionError, match="value-only"):
        jax.grad(bridge)(img, txt, t, b)


# --- 6. distributed, outside jit ---

SHARDS = {2: [4, 3], 3: [3, 3, 1]}
#: (loss, strategy, world, static scale/bias): the default schedules with array scalars at
#: both world sizes, the gather schedules with Python-float scalars at three ranks.
DISTRIBUTED = [
    ("sigmoid", "bidir", 2, False),
    ("sigmoid", "bidir", 3, False),
    ("softmax", "ring", 2, False),
    ("softmax", "ring", 3, False),
    ("sigmoid", "gather", 3, True),
    ("softmax", "gather", 3, True),
]


@pytest.mark.parametrize(
    ("loss", "strategy", "world", "static"),
    DISTRIBUTED,
    ids=[f"{a}-{b}-W{c}-{'float' if d else 'array'}" for a, b, c, d in DISTRIBUTED],
)
def test_distributed_grad_outside_jit(loss: str, strategy: str, world: int, static: bool) -> None:
    img, txt, t, b = inputs(seed=8)
    want_loss, want = GOLDEN[loss](img, txt, t, b)
    edges = [0, *accumulate(SHARDS[world])]
    bridge = BRIDGE[loss]
    argnums = (0, 1) if static else ALL
    scale, bias = (SCALE, BIAS) if static else (t, b)

    def rank_call(comm: ThreadComm) -> Any:
        rows = slice(edges[comm.rank], edges[comm.rank + 1])
        return jax.value_and_grad(bridge, argnums=argnums)(
            img[rows], txt[rows], scale, bias, block_size=BLOCK, comm=comm, strategy=strategy
        )

    results = ThreadGroup(world, timeout=60.0).run(rank_call)
    values = [float(value) for value, _ in results]
    assert values == [values[0]] * world, "every rank must return the same loss"
    close(values[0], want_loss, "loss")
    for rank, (_, grads) in enumerate(results):
        rows = slice(edges[rank], edges[rank + 1])
        close(grads[0], want[0][rows], f"rank {rank} img")
        close(grads[1], want[1][rows], f"rank {rank} txt")
        if not static:
            compare_grads(loss, (want[0], want[1], *grads[2:]), want)


# --- 7. comm under jit ---


def test_comm_under_jit_raises(loss_name: str) -> None:
    img, txt, t, b = inputs(seed=9)
    bridge = partial(BRIDGE[loss_name], block_size=BLOCK)
    match = "`comm` cannot be used under jax.jit"
    with pytest.raises(TypeError, match=match):
        jax.jit(lambda i, x: bridge(i, x, SCALE, BIAS, comm=SelfComm()))(img, txt)
    with pytest.raises(TypeError, match=match):
        jax.jit(jax.grad(lambda i: bridge(i, txt, SCALE, BIAS, comm=SelfComm())))(img)
    with pytest.raises(TypeError, match=match):
        jax.vmap(lambda i: bridge(i, txt, t, b, comm=SelfComm()))(img[None])

    def rank_call(comm: ThreadComm) -> BaseException:
        try:
            jax.jit(lambda i, x: bridge(i, x, t, b, comm=comm))(img, txt)
        except TypeError as error:
            return error
        raise AssertionError(f"rank {comm.rank} raised nothing")

    errors = ThreadGroup(2, timeout=30.0).run(rank_call)
    assert all(match in str(error) for error in errors)
    # Eagerly, the same comm works (one rank: the loss of the whole batch).
    close(bridge(img, txt, t, b, comm=SelfComm()), GOLDEN[loss_name](img, txt, t, b)[0], "eager")


# --- 8. invalid input: the core's errors ---


def test_invalid_input_raises_the_core_errors(loss_name: str) -> None:
    img, txt, t, b = inputs(seed=10)
    bridge = partial(BRIDGE[loss_name], block_size=BLOCK)
    with pytest.raises(TypeError, match="`img` must be an array"):
        bridge(img.tolist(), txt, t, b)
    with pytest.raises(TypeError, match="`txt` must be an array"):
        jax.grad(bridge)(img, "text", t, b)
    with pytest.raises(ValueError, match="`scale` must be the positive multiplier"):
        bridge(img, txt, -1.0, b)
    with pytest.raises(ValueError, match="`scale` must be the positive multiplier"):
        jax.jit(jax.grad(lambda i: bridge(i, txt, -1.0, b)))(img)
    with pytest.raises(ValueError, match=r"`strategy` for the \w+ loss must be one of"):
        bridge(img, txt, t, b, comm=SelfComm(), strategy="nope")
    with pytest.raises(ValueError, match=r"`strategy` for the \w+ loss must be one of"):
        jax.grad(bridge)(img, txt, t, b, strategy="nope")
    with pytest.raises(TypeError, match="`scale` must be a Python float or a 0-d array"):
        jax.grad(bridge)(img, txt, jnp.ones(2), b)


def test_invalid_shard_raises_on_every_rank(loss_name: str) -> None:
    # A list on rank 1 only: the core's handshake makes every rank raise, none hangs.
    img, _, t, b = inputs(seed=11)
    bridge = partial(BRIDGE[loss_name], block_size=BLOCK)

    def rank_call(comm: ThreadComm) -> BaseException:
        mine = img[4 * comm.rank : 4 * comm.rank + 4]
        try:
            jax.grad(bridge)(mine, mine.tolist() if comm.rank else mine, t, b, comm=comm)
        except TypeError as error:
            return error
        raise AssertionError(f"rank {comm.rank} raised nothing")

    errors = ThreadGroup(2, timeout=30.0).run(rank_call)
    assert all(str(error).startswith("rank 1: `txt` must be an array") for error in errors)


def test_distributed_value_alone_and_mixed_modes(loss_name: str) -> None:
    img, txt, t, b = inputs(seed=12)
    want = GOLDEN[loss_name](img, txt, t, b)[0]
    bridge = partial(BRIDGE[loss_name], block_size=BLOCK)
    edges = [0, *accumulate(SHARDS[2])]

    def shard(comm: ThreadComm) -> tuple[Any, Any]:
        rows = slice(edges[comm.rank], edges[comm.rank + 1])
        return img[rows], txt[rows]

    values = ThreadGroup(2, timeout=30.0).run(lambda comm: bridge(*shard(comm), t, b, comm=comm))
    for value in values:
        close(value, want, "value alone")

    # One rank differentiating, the other not: the core's handshake stops both.
    def mixed(comm: ThreadComm) -> BaseException:
        try:
            if comm.rank == 0:
                jax.grad(bridge)(*shard(comm), t, b, comm=comm)
            else:
                bridge(*shard(comm), t, b, comm=comm)
        except ValueError as error:
            return error
        raise AssertionError(f"rank {comm.rank} raised nothing")

    errors = ThreadGroup(2, timeout=30.0).run(mixed)
    assert all("whether gradients are computed" in str(error) for error in errors)


def test_vmap_over_a_batch_of_problems() -> None:
    # No comm: vmap hands the loss tracers next to concrete closed-over arrays.
    img, txt, t, b = inputs(seed=13)
    bridge = partial(BRIDGE["sigmoid"], block_size=BLOCK)
    values, grads = jax.vmap(jax.value_and_grad(lambda i: bridge(i, txt, t, b)))(
        jnp.stack([img, txt])
    )
    for k, i in enumerate((img, txt)):
        want, want_grads = GOLDEN["sigmoid"](i, txt, t, b)
        close(values[k], want, f"value {k}")
        close(grads[k], want_grads[0], f"grad {k}")


# --- 10. higher order: forward mode refused, second derivatives exact ---

FORWARD_MODE = "can't apply forward-mode autodiff"


def test_forward_mode_of_the_loss_is_refused(loss_name: str) -> None:
    # custom_vjp defines no JVP: forward mode applied to the loss itself raises.
    img, txt, t, b = inputs(seed=14)
    loss = partial(BRIDGE[loss_name], txt=txt, scale=t, bias=b, block_size=BLOCK)
    with pytest.raises(TypeError, match=FORWARD_MODE):
        jax.jvp(loss, (img,), (jnp.ones_like(img),))
    with pytest.raises(TypeError, match=FORWARD_MODE):
        jax.jacfwd(loss)(img)
    with pytest.raises(TypeError, match=FORWARD_MODE):
        jax.linearize(loss, img)[1](jnp.ones_like(img))  # recent JAX raises at the call


def hessian_blocks(hessian: Any) -> list[Any]:
    """The 16 blocks d2L / d(arg_i) d(arg_j) of a Hessian over ALL, flattened."""
    return [block for row in hessian for block in row]


@pytest.mark.slow
def test_second_derivatives_match_dense_autodiff(loss_name: str) -> None:
    # jax.hessian is jacfwd(jacrev): the outer forward mode differentiates the custom_vjp's
    # forward rule, i.e. the core's blockwise gradient code, written in jnp operations, and the
    # backward rule (cotangent * stored gradients) is linear in it. So the second derivatives
    # are those of the analytic gradients, exact to round-off, for every argument.
    img, txt, t, b = inputs(seed=15)
    bridge = partial(BRIDGE[loss_name], block_size=BLOCK)
    dense = DENSE[loss_name]
    got = jax.jit(jax.hessian(bridge, argnums=ALL))(img, txt, t, b)
    want = jax.jit(jax.hessian(dense, argnums=ALL))(img, txt, t, b)
    for k, (g, w) in enumerate(zip(hessian_blocks(got), hessian_blocks(want), strict=True)):
        assert g.shape == w.shape, k
        close(g, w, f"hessian block {divmod(k, 4)}")
    # Hessian-vector products: forward over reverse, and reverse over reverse.
    v = jnp.asarray(np.random.default_rng(16).standard_normal(img.shape))
    want_hvp = jnp.tensordot(want[0][0], v, axes=2)
    grad_img = jax.grad(bridge)
    fwd_rev = jax.jit(lambda i: jax.jvp(lambda j: grad_img(j, txt, t, b), (i,), (v,))[1])(img)
    close(fwd_rev, want_hvp, "jvp of grad")
    rev_rev = jax.jit(jax.grad(lambda i: jnp.vdot(grad_img(i, txt, t, b), v)))(img)
    close(rev_rev, want_hvp, "grad of grad")


def test_second_derivatives_with_comm_are_refused(loss_name: str) -> None:
    # The forward rule then sees tracers of the outer transformation: comm needs arrays.
    img, txt, t, b = inputs(seed=17)
    bridge = partial(BRIDGE[loss_name], block_size=BLOCK, comm=SelfComm())
    with pytest.raises(TypeError, match=r"`comm` cannot be used under jax\.jit"):
        jax.hessian(bridge)(img, txt, t, b)
