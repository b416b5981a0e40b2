"""Every invalid input raises a clear TypeError/ValueError naming the parameter."""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import numpy as np
import pytest
from helpers import dtype_of

import portable_siglip as ps

FUNCTIONS = [
    ps.sigmoid_loss,
    ps.sigmoid_loss_and_grad,
    ps.softmax_loss,
    ps.softmax_loss_and_grad,
]


def features(xp: Any, n: int = 4, d: int = 3, dtype: str = "float64") -> Any:
    return xp.asarray(np.ones((n, d)), dtype=dtype_of(xp, dtype))


@pytest.fixture(params=FUNCTIONS, ids=lambda f: f.__name__)
def function(request: pytest.FixtureRequest) -> Any:
    return request.param


def test_not_an_array(xp: Any, function: Any) -> None:
    txt = features(xp)
    with pytest.raises(TypeError, match=r"`img` must be an array.*list"):
        function([[1.0, 2.0]], txt, 1.0, 0.0)
    with pytest.raises(TypeError, match=r"`txt` must be an array.*NoneType"):
        function(txt, None, 1.0, 0.0)


@pytest.mark.parametrize("shape", [(4,), (2, 2, 3), ()])
def test_not_2d(xp: Any, function: Any, shape: tuple[int, ...]) -> None:
    bad = xp.asarray(np.ones(shape))
    with pytest.raises(
        ValueError, match=rf"`img` must be 2-D.*{shape}".replace("(", r"\(").replace(")", r"\)")
    ):
        function(bad, features(xp), 1.0, 0.0)
    with pytest.raises(ValueError, match=r"`txt` must be 2-D"):
        function(features(xp), bad, 1.0, 0.0)


def test_shape_mismatch(xp: Any, function: Any) -> None:
    with pytest.raises(ValueError, match=r"same shape.*\(4, 3\) and \(5, 3\)"):
        function(features(xp, 4, 3), features(xp, 5, 3), 1.0, 0.0)
    with pytest.raises(ValueError, match=r"same shape.*\(4, 3\) and \(4, 2\)"):
        function(features(xp, 4, 3), features(xp, 4, 2), 1.0, 0.0)


def test_empty_batch(xp: Any, function: Any) -> None:
    with pytest.raises(ValueError, match=r"at least one pair.*n = 0"):
        function(features(xp, 0, 3), features(xp, 0, 3), 1.0, 0.0)
    with pytest.raises(ValueError, match=r"at least one feature.*d = 0"):
        function(features(xp, 3, 0), features(xp, 3, 0), 1.0, 0.0)


def test_non_floating_dtype(xp: Any, function: Any) -> None:
    ints = xp.asarray(np.ones((4, 3), dtype=np.int64), dtype=xp.int64)
    with pytest.raises(TypeError, match=r"`img` must have a real floating dtype.*int64"):
        function(ints, features(xp), 1.0, 0.0)
    flags = xp.asarray(np.ones((4, 3), dtype=bool), dtype=xp.bool)
    with pytest.raises(TypeError, match=r"`txt` must have a real floating dtype.*bool"):
        function(features(xp), flags, 1.0, 0.0)


def test_mismatched_dtypes(xp: Any, function: Any) -> None:
    with pytest.raises(TypeError, match=r"same dtype.*float64.*float32"):
        function(features(xp), features(xp, dtype="float32"), 1.0, 0.0)


def test_two_libraries(xp: Any, function: Any) -> None:
    import array_api_strict

    other_xp: Any = np if xp is array_api_strict else array_api_strict
    other = other_xp.asarray(np.ones((4, 3)))
    other_scalar = other_xp.asarray(2.0)  # a 0-d array, not a NumPy scalar (which is a float)
    with pytest.raises(TypeError, match=r"`img` and `txt` must come from the same array library"):
        function(features(xp), other, 1.0, 0.0)
    with pytest.raises(TypeError, match=r"`scale` must come from the same array library"):
        function(features(xp), features(xp), other_scalar, 0.0)
    with pytest.raises(TypeError, match=r"`bias` must come from the same array library"):
        function(features(xp), features(xp), 1.0, other_scalar)


def test_two_devices(function: Any) -> None:
    # array_api_strict simulates devices: the cheapest way to test this without a GPU.
    xs = pytest.importorskip("array_api_strict")
    img = xs.asarray(np.ones((4, 3)))
    other = xs.asarray(np.ones((4, 3)), device=xs.Device("device1"))
    with pytest.raises(ValueError, match=r"`img` and `txt` must be on the same device"):
        function(img, other, 1.0, 0.0)
    with pytest.raises(ValueError, match=r"`scale` must be on the same device as `img`"):
        function(img, img, other[0, 0], 0.0)


def test_other_device_is_kept(function: Any) -> None:
    xs = pytest.importorskip("array_api_strict")
    device = xs.Device("device1")
    img = xs.asarray(np.eye(3) + 0.5, device=device)
    out = function(img, img, xs.asarray(2.0, device=device), 0.5)
    for value in out if isinstance(out, tuple) and not hasattr(out, "shape") else (out,):
        for array in value if isinstance(value, tuple) else (value,):
            assert array.device == device


@pytest.mark.parametrize("name", ["scale", "bias"])
@pytest.mark.parametrize("value", ["1.0", [1.0], True, object()])
def test_scalar_wrong_type(xp: Any, function: Any, name: str, value: object) -> None:
    kwargs = {"scale": 1.0, "bias": 0.0, name: value}
    with pytest.raises(TypeError, match=rf"`{name}` must be a Python float or a 0-d array"):
        function(features(xp), features(xp), kwargs["scale"], kwargs["bias"])


@pytest.mark.parametrize("name", ["scale", "bias"])
def test_scalar_not_0d(xp: Any, function: Any, name: str) -> None:
    kwargs = {"scale": 1.0, "bias": 0.0, name: xp.asarray(np.ones(1))}
    with pytest.raises(TypeError, match=rf"`{name}` must be a Python float or a 0-d array.*\(1,\)"):
        function(features(xp), features(xp), kwargs["scale"], kwargs["bias"])


@pytest.mark.parametrize("name", ["scale", "bias"])
def test_scalar_integer_array(xp: Any, function: Any, name: str) -> None:
    kwargs = {"scale": 1.0, "bias": 0.0, name: xp.asarray(1, dtype=xp.int32)}
    with pytest.raises(TypeError, match=rf"`{name}` must have a real floating dtype"):
        function(features(xp), features(xp), kwargs["scale"], kwargs["bias"])


@pytest.mark.parametrize("name", ["scale", "bias"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_scalar_not_finite(xp: Any, function: Any, name: str, value: float) -> None:
    kwargs = {"scale": 1.0, "bias": 0.0, name: value}
    with pytest.raises(ValueError, match=rf"`{name}` must be finite, got {value!r}"):
        function(features(xp), features(xp), kwargs["scale"], kwargs["bias"])


@pytest.mark.parametrize("value", [0.0, -2.5])
def test_scale_not_positive(xp: Any, function: Any, value: float) -> None:
    with pytest.raises(ValueError, match=r"`scale` must be the positive multiplier.*exp\(t'\)"):
        function(features(xp), features(xp), value, 0.0)


@pytest.mark.parametrize("value", [1.5, "8", True])
def test_block_size_wrong_type(xp: Any, function: Any, value: object) -> None:
    with pytest.raises(TypeError, match=r"`block_size` must be a positive int or None"):
        function(features(xp), features(xp), 1.0, 0.0, block_size=value)


@pytest.mark.parametrize("value", [0, -3])
def test_block_size_not_positive(xp: Any, function: Any, value: int) -> None:
    with pytest.raises(
        ValueError, match=rf"`block_size` must be a positive int or None, got {value}"
    ):
        function(features(xp), features(xp), 1.0, 0.0, block_size=value)


def test_block_size_numpy_integer(xp: Any, function: Any) -> None:
    out = function(features(xp), features(xp), 1.0, 0.0, block_size=np.int64(2))
    assert out is not None


def test_unknown_strategy(xp: Any, function: Any) -> None:
    with pytest.raises(ValueError, match=r"`strategy` for the \w+ loss must be one of.*'ringg'"):
        function(features(xp), features(xp), 1.0, 0.0, strategy="ringg")
    with pytest.raises(TypeError, match=r"`strategy` must be a string"):
        function(features(xp), features(xp), 1.0, 0.0, strategy=None)


def test_strategy_belongs_to_its_loss(xp: Any) -> None:
    # "ring" is a softmax schedule, "bidir" a sigmoid one: crossing them is an error.
    with pytest.raises(ValueError, match=r"sigmoid loss must be one of.*'ring'"):
        ps.sigmoid_loss(features(xp), features(xp), 1.0, 0.0, strategy="ring")
    with pytest.raises(ValueError, match=r"softmax loss must be one of.*'bidir'"):
        ps.softmax_loss(features(xp), features(xp), 1.0, strategy="bidir")


def test_comm_must_be_a_communicator(xp: Any, function: Any) -> None:
    with pytest.raises(TypeError, match=r"`comm` must be None or a communicator.*object without"):
        function(features(xp), features(xp), 1.0, 0.0, comm=object())


# --- values of 0-d `scale`/`bias` arrays, wherever the array has a value ---


@pytest.mark.parametrize("name", ["scale", "bias"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_scalar_array_not_finite(xp: Any, function: Any, name: str, value: float) -> None:
    array = xp.asarray(value, dtype=dtype_of(xp, "float64"))
    kwargs = {"scale": 1.0, "bias": 0.0, name: array}
    with pytest.raises(ValueError, match=rf"`{name}` must be finite, got {value!r} \(a 0-d"):
        function(features(xp), features(xp), kwargs["scale"], kwargs["bias"])


@pytest.mark.parametrize("value", [0.0, -2.3])
def test_scale_array_not_positive(xp: Any, function: Any, value: float) -> None:
    # -2.3: a log-scale (open_clip's `logit_scale` parameter) passed where t = exp(t') belongs.
    scale = xp.asarray(value, dtype=dtype_of(xp, "float32"))
    with pytest.raises(ValueError, match=r"`scale` must be the positive multiplier.*logit_scale"):
        function(features(xp), features(xp), scale, 0.0)


@pytest.mark.parametrize("name", ["scale", "bias"])
@pytest.mark.parametrize("kind", ["python", "array"])
def test_scalar_that_overflows_the_compute_dtype(
    xp: Any, function: Any, name: str, kind: str
) -> None:
    """1e39 is finite as a Python float or a float64 array, but inf in float32: refused, named.

    float32 features compute in float32, where ``t * img`` or ``Z + b`` was inf and the loss
    and gradients NaN.
    """
    value: Any = 1e39 if kind == "python" else xp.asarray(1e39, dtype=dtype_of(xp, "float64"))
    kwargs = {"scale": 10.0, "bias": -5.0, name: value}
    pattern = rf"`{name}` must be finite in float32.*got 1e\+39.*largest finite float32"
    x32 = features(xp, dtype="float32")
    with pytest.raises(ValueError, match=pattern):
        function(x32, x32, kwargs["scale"], kwargs["bias"])


@pytest.mark.parametrize("name", ["scale", "bias"])
def test_scalar_that_fits_the_compute_dtype_is_taken(xp: Any, name: str) -> None:
    """Just below float32's largest finite value, and beyond float16's with float16 features
    (which compute in float32): accepted. A huge bias saturates: an inf loss, finite gradients."""
    x32 = features(xp, dtype="float32")
    with np.errstate(over="ignore"):  # NumPy warns of the overflow to an inf loss
        loss, grads = ps.sigmoid_loss_and_grad(x32, x32, 10.0, 3e38)
    assert math.isinf(float(loss))
    for grad in grads:
        assert bool(xp.all(xp.isfinite(grad)))
    x16 = features(xp, dtype="float16")
    kwargs = {"scale": 1.0, "bias": 0.0, name: 1e5}  # float16's largest finite is 65504
    # "exact": float32 GEMM operands ("fast" rounds t * img to float16, where 1e5 is inf)
    value = ps.sigmoid_loss(x16, x16, kwargs["scale"], kwargs["bias"], precision="exact")
    assert value.dtype == dtype_of(xp, "float32")


def test_scalar_array_values_unchecked_under_jit() -> None:
    # Under jax.jit `scale` is a tracer without a value: the documented limit of the checks.
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    img = jnp.asarray(np.eye(3) + 0.5)
    loss = jax.jit(ps.sigmoid_loss)(img, img, jnp.asarray(-1.0), jnp.asarray(0.0))
    assert loss.shape == ()
    with pytest.raises(ValueError, match=r"`scale` must be the positive multiplier"):
        ps.sigmoid_loss(img, img, jnp.asarray(-1.0), jnp.asarray(0.0))  # eager: checked


def test_torch_module_refuses_a_log_scale() -> None:
    torch = pytest.importorskip("torch")
    from portable_siglip.backends.torch import ClipLoss, SigLipLoss

    img = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1).requires_grad_()
    logit_scale = torch.tensor(-2.3, requires_grad=True)  # log t, not t
    with pytest.raises(ValueError, match=r"`scale` must be the positive.*-2.3.*logit_scale.exp"):
        SigLipLoss()(img, img, logit_scale, torch.tensor(-10.0))
    with pytest.raises(ValueError, match=r"`scale` must be finite, got nan"):
        ClipLoss()(img, img, torch.tensor(math.nan))


# --- array objects whose meaning the loss would drop, and dtypes it cannot honour ---


def test_masked_array_is_refused() -> None:
    img = np.ma.masked_array(np.ones((4, 3)), mask=np.zeros((4, 3), dtype=bool))
    for function in FUNCTIONS:
        with pytest.raises(TypeError, match=r"`img` must be a plain array.*masked array"):
            function(img, np.ones((4, 3)), 1.0, 0.0)
        with pytest.raises(TypeError, match=r"`txt` must be a plain array.*masked array"):
            function(np.ones((4, 3)), img, 1.0, 0.0)


@pytest.mark.parametrize("side", ["img_ids", "txt_ids"])
def test_masked_ids_are_refused(side: str) -> None:
    """Masked ids as masked features: a TypeError naming the argument, in the core and jax bridge.

    The mask would be ignored: the masked id 3 would still pair image 3 with text 3.
    """
    img, txt = np.eye(4), np.eye(4)[::-1]
    ids = {"img_ids": np.arange(4), "txt_ids": np.arange(4)}
    ids[side] = np.ma.masked_array(np.arange(4), mask=[False, False, False, True])
    pattern = rf"`{side}` must be a plain array, got a numpy masked array.*mask would be ignored"
    for function in FUNCTIONS:
        with pytest.raises(TypeError, match=pattern):
            function(img, txt, 1.0, 0.0, **ids)
    if importlib.util.find_spec("jax") is not None:
        from portable_siglip.backends import jax as psj

        for bridged in (psj.sigmoid_loss, psj.softmax_loss):
            with pytest.raises(TypeError, match=pattern):
                bridged(img, txt, 1.0, 0.0, **ids)
        with pytest.raises(TypeError, match=r"`img` must be a plain array.*masked array"):
            psj.sigmoid_loss(np.ma.masked_array(img), txt, 1.0, 0.0)


def test_torch_sparse_is_refused_before_the_handshake() -> None:
    torch = pytest.importorskip("torch")
    from portable_siglip.comm import ThreadGroup

    sparse = torch.ones(4, 3, dtype=torch.float64).to_sparse()
    dense = torch.ones(4, 3, dtype=torch.float64)
    for function in FUNCTIONS:
        with pytest.raises(TypeError, match=r"`img` must be a dense \(strided\).*sparse_coo"):
            function(sparse, dense, 1.0, 0.0)

    def rank_call(comm: Any) -> str:
        try:
            ps.sigmoid_loss(sparse if comm.rank == 1 else dense, dense, 1.0, 0.0, comm=comm)
        except TypeError as error:
            return str(error)
        return "no error"

    messages = ThreadGroup(2, timeout=30.0).run(rank_call)
    assert messages[0] == messages[1]
    assert messages[0].startswith("rank 1: `img` must be a dense (strided) torch tensor")


def test_torch_float8_is_refused() -> None:
    torch = pytest.importorskip("torch")
    img = torch.ones(4, 3).to(torch.float8_e4m3fn)
    for function in FUNCTIONS:
        with pytest.raises(TypeError, match=r"`img` must have a real floating dtype.*float8"):
            function(img, img, 1.0, 0.0)


def test_big_endian_float64_computes_in_float64() -> None:
    rng = np.random.default_rng(0)
    img, txt = rng.standard_normal((7, 5)), rng.standard_normal((7, 5))
    for function in (ps.sigmoid_loss_and_grad, ps.softmax_loss_and_grad):
        loss, grads = function(img, txt, 3.0, -1.0, block_size=3)
        loss_be, grads_be = function(img.astype(">f8"), txt.astype(">f8"), 3.0, -1.0, block_size=3)
        assert grads_be.img.dtype == np.dtype(">f8")
        assert float(loss_be) == pytest.approx(float(loss), rel=1e-14)
        np.testing.assert_allclose(np.asarray(grads_be.img, np.float64), grads.img, rtol=1e-13)
        np.testing.assert_allclose(np.asarray(grads_be.txt, np.float64), grads.txt, rtol=1e-13)


def test_longdouble_reaches_float64_accuracy() -> None:
    # numpy's longdouble computes in float64 (documented); its results come back as longdouble.
    rng = np.random.default_rng(1)
    img, txt = rng.standard_normal((6, 4)), rng.standard_normal((6, 4))
    for function in (ps.sigmoid_loss_and_grad, ps.softmax_loss_and_grad):
        loss, grads = function(img, txt, 3.0, -1.0)
        wide = function(img.astype(np.longdouble), txt.astype(np.longdouble), 3.0, -1.0)
        assert wide[1].img.dtype == np.longdouble
        assert float(wide[0]) == pytest.approx(float(loss), rel=1e-14)
        np.testing.assert_allclose(np.asarray(wide[1].img, np.float64), grads.img, rtol=1e-13)


# --- the remaining arguments: each message names its parameter ---


@pytest.mark.parametrize("make", ["numpy pair", "torch float"])
def test_block_size_array_that_is_not_one_int(function: Any, make: str) -> None:
    if make == "numpy pair":
        block_size: Any = np.array([2, 3])
    else:
        block_size = pytest.importorskip("torch").tensor(2.0)
    with pytest.raises(TypeError, match=r"`block_size` must be a positive int or None, got"):
        function(np.ones((4, 3)), np.ones((4, 3)), 1.0, 0.0, block_size=block_size)


def test_comm_class_instead_of_instance(function: Any) -> None:
    from portable_siglip.comm import SelfComm

    with pytest.raises(TypeError, match=r"`comm` must be a communicator instance.*class SelfComm"):
        function(np.ones((4, 3)), np.ones((4, 3)), 1.0, 0.0, comm=SelfComm)


def test_thread_group_timeout_type() -> None:
    from portable_siglip.comm import ThreadGroup

    with pytest.raises(TypeError, match=r"`timeout` must be a positive number of seconds.*'5'"):
        ThreadGroup(2, timeout="5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`timeout` must be positive, got nan"):
        ThreadGroup(2, timeout=math.nan)


@pytest.mark.parametrize("value", ["", "ring", 3])
def test_siglip_module_dist_impl(value: object) -> None:
    pytest.importorskip("torch")
    from portable_siglip.backends.torch import SigLipLoss

    kind = TypeError if not isinstance(value, str) else ValueError
    with pytest.raises(kind, match=r"SigLipLoss: `dist_impl` must be None or one of"):
        SigLipLoss(dist_impl=value)  # type: ignore[arg-type]


def test_torch_modules_infer_shapes_on_meta() -> None:
    torch = pytest.importorskip("torch")
    from portable_siglip.backends.torch import ClipLoss, SigLipLoss

    for module in (SigLipLoss(), ClipLoss()):
        img = torch.empty(5, 3, device="meta", requires_grad=True)
        txt = torch.empty(5, 3, device="meta", requires_grad=True)
        scale = torch.empty((), device="meta", requires_grad=True)
        bias = torch.empty((), device="meta", requires_grad=True)
        loss = module(img, txt, scale, bias)
        assert (loss.shape, loss.device.type) == ((), "meta")
        loss.backward()
        assert img.grad is not None
        assert img.grad.shape == (5, 3)
        assert scale.grad is not None
        assert scale.grad.device.type == "meta"


# --- the default block size follows the device of the features ---


def test_default_block_size_follows_the_device(xp: Any) -> None:
    from portable_siglip import _checks

    img = features(xp, n=5000, d=2)
    problem = _checks.prepare(img, img, 1.0, 0.0, block_size=None, strategy="bidir", loss="sigmoid")
    expected = (
        _checks.DEFAULT_GPU_BLOCK_SIZE
        if _checks.on_accelerator(img)
        else _checks.DEFAULT_BLOCK_SIZE
    )
    assert problem.block_size == expected
    small = _checks.prepare(
        features(xp, n=7),
        features(xp, n=7),
        1.0,
        0.0,
        block_size=None,
        strategy="bidir",
        loss="sigmoid",
    )
    assert small.block_size == 7  # never more than n


def test_accelerator_arrays_are_told_apart() -> None:
    torch = pytest.importorskip("torch")
    from portable_siglip._checks import DEFAULT_BLOCK_SIZE, default_block_size, on_accelerator

    assert not on_accelerator(np.ones(3))
    assert not on_accelerator(torch.ones(3))
    assert not on_accelerator(torch.empty(3, device="meta"))
    assert default_block_size(torch.ones(3)) == DEFAULT_BLOCK_SIZE
    if torch.cuda.is_available():
        assert on_accelerator(torch.ones(3, device="cuda"))
