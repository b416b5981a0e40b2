"""Validation of the public entry points.

Everything a caller can get wrong is checked here, once, before any arithmetic or
communication, and reported as a ``TypeError`` (wrong kind or dtype) or a
``ValueError`` (wrong shape or value) that names the parameter and what was received.
Shapes, dtypes, devices and Python numbers are inspected, and the values of 0-d ``scale``
and ``bias`` arrays where they have one (numpy, eager torch, eager jax, cupy, ...). Under
``jax.jit`` or ``jax.grad`` those are tracers without a value, and a torch meta tensor has
none either: there the value checks are skipped and everything else runs unchanged. The
feature matrices' values are never inspected (a NaN in them gives a NaN loss, as in any
array library; docs/conventions.md).
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import array_api_compat

from . import _registry as registry
from ._precision import PRECISIONS, Gemm, make_gemm
from ._typing import Array, Namespace

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_GPU_BLOCK_SIZE",
    "UNMATCHED_TXT",
    "Problem",
    "check_positives",
    "check_unmatched_txt",
    "concrete_value",
    "default_block_size",
    "host_ids",
    "on_accelerator",
    "prepare",
]

#: Tile edge used when ``block_size=None``: the smallest block at which the CPU loop reaches its
#: plateau (256 is slower; 1024, 2048 and 4096 are equal within noise at n = 8192, d = 768),
#: with two tile buffers of 8 MiB (float32) or 16 MiB (float64) that stay in a 32 MiB L3.
#: docs/benchmarks.md, "Block size", has the measurements.
DEFAULT_BLOCK_SIZE = 1024

#: Tile edge used when ``block_size=None`` and the features are on a GPU (cupy, torch CUDA,
#: jax on a GPU). A GPU runs each elementwise step of a tile as its own kernel: at 1024 a
#: tile's GEMMs take tens of microseconds on a current GPU, about as long as the dozen
#: launches around them, so the device idles between kernels; at 4096 the GEMMs are 16
#: times longer and the launches a small fraction. Two float32 tile buffers take 128 MiB.
#: Not yet measured on a GPU: ``python -m portable_siglip doctor`` probes the block sizes
#: on every device it finds and reports the best, and docs/gpu.md records the result.
DEFAULT_GPU_BLOCK_SIZE = 4096

#: The values of ``unmatched_txt``: what the softmax loss does with a text row whose id no
#: image row has. "error" (the default) refuses it; "negatives" makes it a negative of every
#: image (it joins every image row's denominator, and has no column term of its own).
UNMATCHED_TXT = ("error", "negatives")


def on_accelerator(array: Any) -> bool:
    """Say whether `array` lives on a GPU (or another accelerator) rather than the host.

    Decided from the array's type and device alone, without importing any library: cupy
    arrays always; torch tensors on a device other than ``cpu`` and ``meta``; jax arrays
    whose device's platform is not ``cpu``. A jax tracer (under ``jit``) has no device and
    counts as the host.

    Examples
    --------
    >>> import numpy as np
    >>> on_accelerator(np.ones(2))
    False
    """
    if array_api_compat.is_cupy_array(array):
        return True
    if array_api_compat.is_torch_array(array):
        return str(array.device.type) not in ("cpu", "meta")
    if array_api_compat.is_jax_array(array):
        try:
            device = array_api_compat.device(array)
        except Exception:  # a tracer without a committed device
            return False
        return str(getattr(device, "platform", "cpu")) not in ("cpu",)
    return False


def default_block_size(array: Any) -> int:
    """Return the tile edge used for ``block_size=None`` on the device of `array`.

    Examples
    --------
    >>> import numpy as np
    >>> default_block_size(np.ones((2, 2)))
    1024
    """
    return DEFAULT_GPU_BLOCK_SIZE if on_accelerator(array) else DEFAULT_BLOCK_SIZE


@dataclass(frozen=True)
class Problem:
    """Validated inputs, cast to the dtype the arithmetic runs in.

    Attributes
    ----------
    xp : namespace
        Array-API namespace of the inputs.
    img, txt : array
        The (n, d) features, in ``compute_dtype``.
    scale, bias : float or array
        Python floats stay Python floats; 0-d arrays are cast to ``compute_dtype``.
    n, d : int
        Rows of ``img`` (m) and feature dimension.
    k : int
        Rows of ``txt``: equal to ``n`` without ids, any count with them.
    img_ids, txt_ids : array or None
        The integer ids of the rows of ``img`` and ``txt`` (pair (i, j) is positive iff
        ``img_ids[i] == txt_ids[j]``), or None for the diagonal labels.
    device : object
        Device of the inputs (``None`` for jax under ``jit``).
    input_dtype, compute_dtype : dtype
        Dtype of the features as given, and the dtype the loss accumulates in (float64
        for float64 inputs, float32 otherwise).
    scale_dtype, bias_dtype : dtype
        Dtype the gradient of ``scale``/``bias`` is returned in.
    block_size : int
        Tile edge, at most ``n``.
    gemm : Gemm
        How the tile GEMMs take their operands (:mod:`._precision`).
    unmatched_txt : {"error", "negatives"}
        What a loss that needs positives does with a text row without one (docs/math.md,
        section 9): refuse it, or treat it as a negative of every image.
    """

    xp: Namespace
    img: Array
    txt: Array
    scale: float | Array
    bias: float | Array
    n: int
    d: int
    device: Any
    input_dtype: Any
    compute_dtype: Any
    scale_dtype: Any
    bias_dtype: Any
    block_size: int
    gemm: Gemm
    k: int = 0
    img_ids: Array | None = None
    txt_ids: Array | None = None
    unmatched_txt: str = "error"

    @property
    def precision(self) -> str:
        """The GEMM policy in force: "fast" (half operands) or "exact" (always for wide inputs)."""
        return "fast" if self.gemm.rounds else "exact"

    @property
    def labelled(self) -> bool:
        """Whether positives come from ids rather than the diagonal."""
        return self.img_ids is not None

    @property
    def txt_negatives(self) -> bool:
        """Whether text rows without a positive are negatives (ids and ``"negatives"``)."""
        return self.labelled and self.unmatched_txt == "negatives"


def _describe(value: Any) -> str:
    """Say what a received value is, for error messages."""
    if array_api_compat.is_array_api_obj(value):
        kind = f"{type(value).__module__}.{type(value).__name__}"
        return f"{kind} of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"{type(value).__name__} {value!r}"[:200]


def _library(value: Any) -> str:
    """Name the array library of `value` as users say it (torch, jax, numpy, cupy, ...)."""
    for library in ("torch", "jax", "cupy", "numpy"):
        if getattr(array_api_compat, f"is_{library}_array")(value):
            return library
    return type(value).__module__.split(".")[0]


def _namespace_name(xp: Namespace) -> str:
    return str(getattr(xp, "__name__", type(xp).__name__))


def _same_device(a: object, b: object) -> bool:
    # A jax tracer has no device (None) until the traced function is placed: it goes with any.
    return a is None or b is None or a == b


#: Accepted bit widths of floating features: float16/bfloat16, float32, float64. Wider
#: (numpy's longdouble) computes in float64; narrower (float8) is refused.
_FLOAT_BITS = (16, 32, 64)


def _float_bits(xp: Namespace, dtype: Any) -> int:
    """Bit width of a real floating dtype (64 for big-endian float64, 80/128 for longdouble)."""
    try:
        return int(xp.finfo(dtype).bits)
    except (TypeError, ValueError):  # a library without finfo for this dtype: judge by name
        name = str(dtype)
        return 16 if "16" in name else 64 if "64" in name else 32


def _real_floating(xp: Namespace, dtype: Any) -> bool:
    """Whether ``dtype`` is a real floating dtype, ml_dtypes' bfloat16 included.

    NumPy and CuPy arrays can hold ml_dtypes' ``bfloat16`` (CuPy 14 imports torch bfloat16
    tensors through DLPack as such when ml_dtypes is installed); ``isdtype`` raises
    TypeError on it, as on every dtype the standard does not know.
    """
    try:
        return bool(xp.isdtype(dtype, "real floating"))
    except TypeError:
        return str(dtype) == "bfloat16"


def _check_layout(name: str, value: Any) -> None:
    """Refuse array objects whose extra semantics the loss would silently drop."""
    module = type(value).__module__
    if module.startswith("numpy.ma"):
        msg = (
            f"`{name}` must be a plain array, got a numpy masked array of shape "
            f"{tuple(value.shape)}; the mask would be ignored: drop the masked rows or pass "
            f"`{name}.filled(...)`"
        )
        raise TypeError(msg)
    if array_api_compat.is_torch_array(value) and str(value.layout) != "torch.strided":
        msg = (
            f"`{name}` must be a dense (strided) torch tensor, got layout {value.layout} of "
            f"shape {tuple(value.shape)}; call `{name}.to_dense()` first"
        )
        raise TypeError(msg)


def _check_features(img: Any, txt: Any, *, paired: bool = True) -> Namespace:
    """Check the two feature matrices and return their common namespace.

    ``paired``: the rows are pairs (no ids), so the shapes must be equal; with ids only the
    feature dimension must agree.
    """
    xp = _check_namespace(img, txt)
    for name, value in (("img", img), ("txt", txt)):
        shape = tuple(value.shape)
        if len(shape) != 2:
            msg = f"`{name}` must be 2-D with shape (n, d), got shape {shape}"
            raise ValueError(msg)
        if not _real_floating(xp, value.dtype) or (_float_bits(xp, value.dtype) < min(_FLOAT_BITS)):
            msg = (
                f"`{name}` must have a real floating dtype (float16, bfloat16, float32 "
                f"or float64), got {value.dtype}"
            )
            raise TypeError(msg)
    _check_shapes(img, txt, paired=paired)
    if img.dtype != txt.dtype:
        msg = f"`img` and `txt` must have the same dtype, got {img.dtype} and {txt.dtype}"
        raise TypeError(msg)
    dev_img = array_api_compat.device(img)
    dev_txt = array_api_compat.device(txt)
    if not _same_device(dev_img, dev_txt):
        msg = f"`img` and `txt` must be on the same device, got {dev_img} and {dev_txt}"
        raise ValueError(msg)
    return xp


def _check_namespace(img: Any, txt: Any) -> Namespace:
    """Check that both features are dense arrays of one array-API library; return it."""
    for name, value in (("img", img), ("txt", txt)):
        if not array_api_compat.is_array_api_obj(value):
            msg = (
                f"`{name}` must be an array of an array-API library (numpy, torch, jax, "
                f"cupy, ...), got {_describe(value)}"
            )
            raise TypeError(msg)
        _check_layout(name, value)
    xp_img = array_api_compat.array_namespace(img)
    xp_txt = array_api_compat.array_namespace(txt)
    if xp_img is not xp_txt:
        msg = (
            "`img` and `txt` must come from the same array library, got "
            f"{_namespace_name(xp_img)} and {_namespace_name(xp_txt)}"
        )
        raise TypeError(msg)
    return xp_img


def _check_shapes(img: Any, txt: Any, *, paired: bool) -> None:
    """Check that the 2-D features pair up (or share d, with ids) and are not empty."""
    if paired and tuple(img.shape) != tuple(txt.shape):
        msg = (
            "`img` and `txt` must have the same shape (n, d), row i of each being a pair; "
            f"got {tuple(img.shape)} and {tuple(txt.shape)} (pass `img_ids` and `txt_ids` "
            "for batches with several captions per image)"
        )
        raise ValueError(msg)
    if not paired and img.shape[1] != txt.shape[1]:
        msg = (
            "`img` and `txt` must have the same feature dimension d, got shapes "
            f"{tuple(img.shape)} and {tuple(txt.shape)}"
        )
        raise ValueError(msg)
    for name, value in (("img", img), ("txt", txt)):
        rows, d = value.shape
        if rows == 0:
            msg = (
                f"`img` and `txt` must hold at least one pair, got shape {(rows, d)} (n = 0)"
                if paired
                else f"`{name}` must hold at least one row, got shape {(rows, d)}"
            )
            raise ValueError(msg)
        if d == 0:
            msg = f"`img` and `txt` must have at least one feature, got shape {(rows, d)} (d = 0)"
            raise ValueError(msg)


def _check_value(name: str, number: float, *, positive: bool, what: str) -> None:
    """Check the value of `scale` or `bias`; `what` says what kind of object held it."""
    # An array's value is shown to 8 digits: a float32 -2.3 reads -2.3, not -2.2999999523.
    shown = f"{number:.8g}" if what else repr(number)
    if not math.isfinite(number):
        msg = f"`{name}` must be finite, got {shown}{what}"
        raise ValueError(msg)
    if positive and number <= 0.0:
        msg = (
            f"`{name}` must be the positive multiplier t = exp(t') applied to the "
            f"logits, got {shown}{what}; if you hold the log-scale t' (open_clip's "
            "`logit_scale` parameter), pass exp(t'), e.g. `logit_scale.exp()`"
        )
        raise ValueError(msg)


def concrete_value(value: Any) -> float | None:
    """Read a 0-d array's value as a Python float; None where it has none.

    jax tracers (under ``jit``/``grad``) and torch meta or fake tensors carry no value; their
    checks are left to the caller. Reading a device array's value waits for it (one sync).
    """
    if array_api_compat.is_torch_array(value):
        if value.device.type == "meta":
            return None
        value = value.detach()  # float() of a tensor that requires grad warns
    try:
        return float(value)
    except Exception:  # a tracer or another abstract value: nothing to check
        return None


def _check_alongside(name: str, value: Any, xp: Namespace, device: object) -> None:
    """Check that the array `name` comes from the library and device of ``img``."""
    xp_value = array_api_compat.array_namespace(value)
    if xp_value is not xp:
        msg = (
            f"`{name}` must come from the same array library as `img`, got "
            f"{_namespace_name(xp_value)} and {_namespace_name(xp)}"
        )
        raise TypeError(msg)
    dev = array_api_compat.device(value)
    if not _same_device(dev, device):
        msg = f"`{name}` must be on the same device as `img`, got {dev} and {device}"
        raise ValueError(msg)


def _check_scalar(
    name: str, value: Any, xp: Namespace, device: object, *, positive: bool
) -> float | Array:
    """Check `scale` or `bias`: a finite Python real, or a 0-d floating array of `xp`."""
    if isinstance(value, bool):
        msg = f"`{name}` must be a Python float or a 0-d array, got bool {value!r}"
        raise TypeError(msg)
    if isinstance(value, numbers.Real):
        number = float(value)
        _check_value(name, number, positive=positive, what="")
        return number
    if array_api_compat.is_array_api_obj(value):
        shape = tuple(value.shape)
        if shape != ():
            msg = f"`{name}` must be a Python float or a 0-d array, got an array of shape {shape}"
            raise TypeError(msg)
        _check_alongside(name, value, xp, device)
        if not _real_floating(xp, value.dtype):
            msg = f"`{name}` must have a real floating dtype, got {value.dtype}"
            raise TypeError(msg)
        concrete = concrete_value(value)
        if concrete is not None:
            kind = f" (a 0-d {_library(value)} array)"
            _check_value(name, concrete, positive=positive, what=kind)
        return value
    msg = f"`{name}` must be a Python float or a 0-d array, got {_describe(value)}"
    raise TypeError(msg)


def _check_fits(name: str, value: Any, xp: Namespace, compute: Any, features: Any) -> None:
    """Refuse a ``scale`` or ``bias`` that is finite as given but inf in the compute dtype.

    1e39 is a finite Python float (or float64 array), but float32 features compute in
    float32, where it rounds to inf and the loss and gradients come out NaN. A value that
    rounds to a finite one is taken, however large (a huge bias then saturates: an inf
    loss with finite gradients, docs/conventions.md). Tracers have no value to check.
    """
    number = value if isinstance(value, float) else concrete_value(value)
    if number is None:
        return
    info = xp.finfo(compute)
    largest = float(info.max)
    if largest == 1.7976931348623157e308:  # float64: every Python float fits
        return
    # Round to nearest overflows from max + half an ulp of max on: the digits of the format
    # are 1 - log2(eps), and max = m 2**e with m in [0.5, 1), so its ulp is 2**(e - digits).
    digits = 1 - round(math.log2(float(info.eps)))
    half_ulp = math.ldexp(1.0, math.frexp(largest)[1] - digits - 1)
    if abs(number) < largest + half_ulp:
        return
    dtype = f"float{int(info.bits)}"
    msg = (
        f"`{name}` must be finite in {dtype}, the dtype the loss computes in for {features} "
        f"features, got {number:.8g}, which rounds to inf there (largest finite {dtype}: "
        f"{largest:.8g}); pass a smaller value or float64 features"
    )
    raise ValueError(msg)


def _check_ids(
    img_ids: Any, txt_ids: Any, xp: Namespace, device: object, m: int, k: int
) -> tuple[Array, Array] | None:
    """Check the optional integer ids of the rows: both or neither, shapes (m,) and (k,)."""
    if img_ids is None and txt_ids is None:
        return None
    for name, value, other in (("img_ids", img_ids, "txt_ids"), ("txt_ids", txt_ids, "img_ids")):
        if value is None:
            msg = (
                f"`{name}` must be given together with `{other}` (pair (i, j) is positive iff "
                f"img_ids[i] == txt_ids[j]), got None"
            )
            raise TypeError(msg)
    for name, value, rows, of in (
        ("img_ids", img_ids, m, "img"),
        ("txt_ids", txt_ids, k, "txt"),
    ):
        _check_layout(name, value)  # a masked or sparse id array, as for the features
        if not array_api_compat.is_array_api_obj(value):
            msg = (
                f"`{name}` must be an integer array of the library of `img`, got {_describe(value)}"
            )
            raise TypeError(msg)
        _check_alongside(name, value, xp, device)
        if not xp.isdtype(value.dtype, "integral"):
            msg = f"`{name}` must have an integer dtype, got {value.dtype}"
            raise TypeError(msg)
        if tuple(value.shape) != (rows,):
            msg = (
                f"`{name}` must have shape ({rows},), one id per row of `{of}`, got shape "
                f"{tuple(value.shape)}"
            )
            raise ValueError(msg)
    return _common_dtype(xp, img_ids, txt_ids)


def _integer_kind(xp: Namespace, dtype: Any) -> tuple[bool, int]:
    """Whether an integer dtype is signed, and its bit width."""
    info = xp.iinfo(dtype)
    return int(info.min) < 0, int(info.bits)


def _common_dtype(xp: Namespace, img_ids: Array, txt_ids: Array) -> tuple[Array, Array]:
    """Return the ids in one integer dtype that holds every value of both, else raise.

    Ids are compared as integers. Of two dtypes of one signedness the wider holds the
    narrower's values, as does a signed dtype wider than an unsigned one: the other array
    is cast to it, traced or not. A signed dtype against an unsigned one at least as wide
    (int64 against uint64, int32 against uint32) holds both only for some values, so these
    are read: every value fits the signed dtype (or, none negative, the unsigned one) and
    that dtype is taken; otherwise ``ValueError`` naming both, and without values (jax
    tracers) ``TypeError``. Every library then compares one dtype with itself: no float64
    promotion (jax), raw promotion error (torch) or unnamed ``TypeError`` (array_api_strict).
    """
    if img_ids.dtype == txt_ids.dtype:
        return img_ids, txt_ids
    arrays = {"img_ids": img_ids, "txt_ids": txt_ids}
    kinds = {name: _integer_kind(xp, array.dtype) for name, array in arrays.items()}
    if kinds["img_ids"][0] == kinds["txt_ids"][0]:  # one signedness: the wider
        target = max(arrays.values(), key=lambda a: _integer_kind(xp, a.dtype)[1]).dtype
    else:
        signed, unsigned = ("img_ids", "txt_ids") if kinds["img_ids"][0] else ("txt_ids", "img_ids")
        if kinds[signed][1] > kinds[unsigned][1]:
            target = arrays[signed].dtype
        else:
            target = _value_dtype(xp, arrays, signed, unsigned)
    return xp.astype(img_ids, target, copy=False), xp.astype(txt_ids, target, copy=False)


def _value_dtype(xp: Namespace, arrays: dict[str, Array], signed: str, unsigned: str) -> Any:
    """Return the dtype of ``signed`` or ``unsigned`` that holds every id of both (values read)."""
    described = f"`img_ids` ({arrays['img_ids'].dtype}) and `txt_ids` ({arrays['txt_ids'].dtype})"
    values = {name: host_ids(array) for name, array in arrays.items()}
    signed_values, unsigned_values = values[signed], values[unsigned]
    if signed_values is None or unsigned_values is None:
        msg = (
            f"{described} must have one integer dtype where their values cannot be read "
            "(under jax.jit): no dtype of the two holds every value of the other, so they "
            "could not be compared exactly; cast both to one dtype before tracing"
        )
        raise TypeError(msg)
    signed_max = int(xp.iinfo(arrays[signed].dtype).max)
    if max(unsigned_values, default=0) <= signed_max:
        return arrays[signed].dtype
    if min(signed_values, default=0) >= 0:
        return arrays[unsigned].dtype
    negative = min(signed_values)
    big = max(unsigned_values)
    msg = (
        f"{described} have no common dtype that holds all their values, so they cannot be "
        f"compared as integers: `{signed}` holds {negative} and `{unsigned}` holds {big} "
        f"(beyond {signed_max}); pass both in one dtype (e.g. each id's index among the "
        "batch's distinct ids)"
    )
    raise ValueError(msg)


def host_ids(ids: Any) -> list[int] | None:
    """Read an integer id array's values as Python ints; None where they have none.

    jax tracers (under ``jit``) and torch meta tensors carry no values: the checks that need
    them are skipped, as for ``scale`` and ``bias``. Reading device arrays waits for them.
    """
    if array_api_compat.is_torch_array(ids) and ids.device.type == "meta":
        return None
    try:
        if hasattr(ids, "tolist"):
            return [int(v) for v in ids.tolist()]
        return [int(ids[i]) for i in range(ids.shape[0])]
    except Exception:  # a tracer or another abstract value
        return None


def check_positives(
    img_ids: Sequence[Sequence[int]],
    txt_ids: Sequence[Sequence[int]],
    *,
    unmatched_txt: str = "error",
) -> None:
    """Raise ``ValueError`` unless every image id has a text and every text id an image.

    For a loss that needs a positive in every row and column (the softmax loss). With
    ``unmatched_txt="negatives"`` only the images are checked: a text without an image is a
    negative of every image (docs/math.md, section 9).

    ``img_ids`` and ``txt_ids`` hold the ids of every rank's rows, one sequence per rank (a
    single one in one process): the check is over the global batch, and the message names
    the first row without a positive (and its rank, with several).
    """
    distributed = len(img_ids) > 1
    images = {value for shard in img_ids for value in shard}
    texts = {value for shard in txt_ids for value in shard}
    sides = [("img_ids", img_ids, texts, "image", "text")]
    if unmatched_txt == "error":
        sides.append(("txt_ids", txt_ids, images, "text", "image"))
    for name, shards, others, row, other in sides:
        lonely = [
            (rank, i, value)
            for rank, shard in enumerate(shards)
            for i, value in enumerate(shard)
            if value not in others
        ]
        if not lonely:
            continue
        rank, first, value = lonely[0]
        total = sum(len(shard) for shard in shards)
        where, anywhere, batch = (
            (f" of rank {rank}", " on any rank", " of the global batch")
            if distributed
            else ("", "", "")
        )
        msg = (
            f"`{name}`: {row} row {first}{where} (id {value}) has no {other} row with the same "
            f"id{anywhere}, so it has no positive pair; {len(lonely)} of {total} {row} rows"
            f"{batch} have none (every id must appear in both `img_ids` and `txt_ids` for this "
            "loss, whose target is a distribution over a row's positives)"
        )
        raise ValueError(msg)


def _check_block_size(block_size: Any, n: int, default: int = DEFAULT_BLOCK_SIZE) -> int:
    if block_size is None:
        return min(n, default)
    if isinstance(block_size, bool) or not hasattr(block_size, "__index__"):
        msg = f"`block_size` must be a positive int or None, got {_describe(block_size)}"
        raise TypeError(msg)
    try:
        size = operator.index(block_size)
    except TypeError:  # an array with __index__ that is not a single integer
        msg = f"`block_size` must be a positive int or None, got {_describe(block_size)}"
        raise TypeError(msg) from None
    if size <= 0:
        msg = f"`block_size` must be a positive int or None, got {size}"
        raise ValueError(msg)
    return min(int(size), n)


def _check_choice(name: str, value: object, allowed: tuple[str, ...], rule: str) -> str:
    """Check that `value` of parameter `name` is one of the strings `allowed`.

    `rule` begins the message of a string that is not allowed (``"... must be one of"``).
    """
    if not isinstance(value, str):
        msg = f"`{name}` must be a string, one of {allowed}, got {_describe(value)}"
        raise TypeError(msg)
    if value not in allowed:
        msg = f"{rule}, got {value!r}"
        raise ValueError(msg)
    return value


def _check_strategy(strategy: object, allowed: tuple[str, ...], loss: str) -> str:
    rule = f"`strategy` for the {loss} loss must be one of {allowed}"
    return _check_choice("strategy", strategy, allowed, rule)


def check_unmatched_txt(unmatched_txt: object) -> str:
    """Check ``unmatched_txt``: one of :data:`UNMATCHED_TXT`.

    Examples
    --------
    >>> check_unmatched_txt("negatives")
    'negatives'
    >>> check_unmatched_txt("ignore")
    Traceback (most recent call last):
    ...
    ValueError: `unmatched_txt` must be one of ('error', 'negatives'), got 'ignore'
    """
    rule = f"`unmatched_txt` must be one of {UNMATCHED_TXT}"
    return _check_choice("unmatched_txt", unmatched_txt, UNMATCHED_TXT, rule)


def _check_precision(precision: object) -> str | None:
    """Check ``precision``: None (the default for the dtype) or one of :data:`PRECISIONS`."""
    if precision is None:
        return None
    rule = f"`precision` must be one of {PRECISIONS} (or None)"
    return _check_choice("precision", precision, PRECISIONS, rule)


def prepare(
    img: Any,
    txt: Any,
    scale: object,
    bias: object,
    *,
    block_size: object,
    strategy: object,
    loss: str,
    img_ids: object = None,
    txt_ids: object = None,
    check_ids: bool = True,
    needs_positives: bool = True,
    precision: object = None,
    unmatched_txt: object = "error",
) -> Problem:
    """Validate the arguments of a public loss function and cast them for the arithmetic.

    Parameters
    ----------
    img, txt, scale, bias, block_size, strategy, img_ids, txt_ids, precision
        The public arguments, as received (``comm`` is checked by the caller).
    loss : str
        The name of the loss being called (its registered description gives the allowed
        strategies, :mod:`._registry`).
    check_ids : bool
        Whether the ids are the whole batch, so that every row's having a positive can be
        checked here (a distributed caller checks the global ids instead).
    needs_positives : bool
        Whether the loss needs a positive in every row and column (the softmax loss, whose
        target is a distribution over them); the sigmoid loss does not (such a row's pairs
        are all negatives), and its rows are not checked.
    unmatched_txt : {"error", "negatives"}
        With ``needs_positives``: whether a text row without a positive is refused or is a
        negative of every image (then only the image rows are checked). Validated for
        every loss; a loss without ``needs_positives`` treats such rows as negatives either
        way, and without ids there are none.

    Returns
    -------
    Problem
        The validated inputs.

    Raises
    ------
    TypeError, ValueError
        On any invalid argument; the message names the parameter and what was received.
    """
    paired = img_ids is None and txt_ids is None
    xp = _check_features(img, txt, paired=paired)
    device = array_api_compat.device(img)
    n, d = (int(s) for s in img.shape)
    k = int(txt.shape[0])
    ids = _check_ids(img_ids, txt_ids, xp, device, n, k)
    scale_checked = _check_scalar("scale", scale, xp, device, positive=True)
    bias_checked = _check_scalar("bias", 0.0 if bias is None else bias, xp, device, positive=False)
    size = _check_block_size(block_size, max(n, k), default_block_size(img))
    allowed = registry.get(loss).schedules
    _check_strategy(strategy, allowed, loss)
    chosen = _check_precision(precision)
    unmatched = check_unmatched_txt(unmatched_txt)
    if ids is not None and check_ids and needs_positives:
        values = (host_ids(ids[0]), host_ids(ids[1]))
        if values[0] is not None and values[1] is not None:
            check_positives([values[0]], [values[1]], unmatched_txt=unmatched)

    input_dtype = img.dtype
    # Half-precision inputs accumulate in float32; float32 and float64 in themselves. Any
    # 64-bit or wider float computes in native float64: big-endian float64 exactly, and
    # numpy's longdouble with float64 accuracy (its results are cast back to longdouble).
    bits = _float_bits(xp, input_dtype)
    compute_dtype = xp.float64 if bits >= 64 else xp.float32
    for name, value in (("scale", scale_checked), ("bias", bias_checked)):
        _check_fits(name, value, xp, compute_dtype, input_dtype)
    # "fast" (the default for half inputs) rounds the GEMM operands to the input dtype, so
    # that GPUs multiply them on tensor cores; wider inputs always compute exactly.
    policy = (chosen or "fast") if bits == 16 else "exact"
    gemm = make_gemm(xp, img, compute_dtype, input_dtype if policy == "fast" else None)

    def cast(value: Any) -> Any:
        if isinstance(value, float):
            return value
        return xp.astype(value, compute_dtype, copy=False)

    def grad_dtype(value: Any) -> Any:
        return compute_dtype if isinstance(value, float) else value.dtype

    return Problem(
        xp=xp,
        img=cast(img),
        txt=cast(txt),
        scale=cast(scale_checked),
        bias=cast(bias_checked),
        n=n,
        d=d,
        device=device,
        input_dtype=input_dtype,
        compute_dtype=compute_dtype,
        scale_dtype=grad_dtype(scale_checked),
        bias_dtype=grad_dtype(bias_checked),
        block_size=size,
        k=k,
        img_ids=None if ids is None else ids[0],
        txt_ids=None if ids is None else ids[1],
        gemm=gemm,
        unmatched_txt=unmatched,
    )
