"""Every invalid input raises a clear TypeError/ValueError naming the parameter."""

from __future__ import annotations

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
