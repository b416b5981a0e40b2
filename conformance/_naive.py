"""The naive reference of a half-precision run, and the bound it sets (FlashAttention's rule).

In a float16 or bfloat16 run, a correct loss cannot match the goldens much better than its
dtype allows, and how well it can depends on the case: its logits rounded to 8 significant
bits are off by ``2^-9 |Z|``, which a softmax of logits near 100 turns into probabilities
several percent off. FlashAttention's tests judge a half-precision kernel the same way
(``tests/test_flash_attn.py``): its error against a high-precision reference must be at most
twice the error of a naive implementation run in the same dtype, on the same inputs.

The naive reference here is a plain dense loss as a framework computes it in the half
dtype, written against the array API:

- the logits ``t * img @ txt.T + b`` as open_clip writes them (``t * img`` first), or as
  big_vision does (``img @ txt.T``, then ``* t + b``): each operation's result is rounded to
  the dtype, and the GEMM accumulates in float32;
- the per-pair terms (``softplus``, ``log_softmax``), each computed from the rounded logits
  in float32 and rounded once, as a framework's fused kernel does;
- the sums (``sum``, ``mean``) accumulated in float32 and rounded once, as torch and jax
  do for half dtypes;
- the gradients as autograd forms them from those operations, each rounded likewise.

That is float32 arithmetic with the result of every framework operation rounded to the
half dtype, which is what torch and jax compute on CPUs and GPUs. It is evaluated on the
host in NumPy (:func:`naive_values`): the bound is then the same on every backend and
device, a GPU run included, and costs no compilation under jax. NumPy has no bfloat16, so
there the rounding is done on the float32 bits (to nearest, ties to even, as the hardware
converts); float16 rounds through NumPy's float16. The same function runs on the arrays of
any array-API library with a rounding made of two ``astype`` calls
(:func:`astype_rounding`).

The naive error of a quantity is the larger of its two logit orders' errors: a single
evaluation of a scalar such as ``dL/dt`` (a sum of n^2 terms that cancel) can be right by
luck, which would make the bound a lottery on the small cases.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from portable_siglip._interop import bfloat16_to_float32, float32_to_bfloat16

from ._cases import Case
from ._report import FLOOR, natural_scale, relative_error

__all__ = [
    "LOGIT_ORDERS",
    "NAIVE_LOSSES",
    "astype_rounding",
    "host_rounding",
    "naive_errors",
    "naive_loss_and_grad",
    "naive_values",
    "round_half",
]

#: ``"features"``: ``(t * img) @ txt.T + b`` (open_clip); ``"logits"``: ``(img @ txt.T) * t + b``
#: (big_vision).
LOGIT_ORDERS = ("features", "logits")

QUANTITIES = ("loss", "img", "txt", "scale", "bias")

Rounding = Callable[[Any], Any]


def round_half(values: Any, dtype: str) -> Any:
    """Round float32 `values` to `dtype` (float16 or bfloat16), to nearest even, as float32.

    Adding two half values in float32 and rounding the sum is the half-precision addition
    (the float32 sum is exact or far from a half tie), which is what a CPU does with them.
    A value beyond the dtype's range becomes infinite.

    Examples
    --------
    >>> import numpy as np
    >>> round_half(np.float32(1 + 2**-9 + 2**-12), "bfloat16").item() == 1 + 2**-7
    False
    >>> round_half(np.float32(1 + 2**-8 + 2**-12), "bfloat16").item() == 1 + 2**-7
    True
    """
    import numpy as np

    values = np.asarray(values, dtype=np.float32)
    if dtype == "float16":
        with np.errstate(over="ignore"):
            return values.astype(np.float16).astype(np.float32)
    if dtype != "bfloat16":
        msg = f"`dtype` must be 'float16' or 'bfloat16', got {dtype!r}"
        raise ValueError(msg)
    try:
        from ml_dtypes import bfloat16  # the same rounding, in C, where it is installed
    except ImportError:
        pass
    else:
        return values.astype(bfloat16).astype(np.float32)
    return bfloat16_to_float32(float32_to_bfloat16(values))


def _unchanged(values: Any) -> Any:
    """No rounding: what a fused kernel does inside."""
    return values


def host_rounding(dtype: str) -> Rounding:
    """Return the rounding of NumPy float32 arrays to `dtype` (kept as float32)."""
    return lambda values: round_half(values, dtype)


def astype_rounding(xp: Any, half: Any, work: Any) -> Rounding:
    """Return the rounding of `work` arrays of `xp` to its dtype `half` (kept as `work`).

    For a library that has the half dtype: torch, cupy, jax outside ``jit`` (under ``jit``
    XLA may drop the round trip as excess precision).
    """
    return lambda values: xp.astype(xp.astype(values, half), work)


def _naive_sigmoid(xp: Any, z: Any, eye: Any, rounding: Rounding, k: Rounding) -> tuple[Any, Any]:
    """SigLIP's ``-logsigmoid(labels * Z).sum() / n`` and its ``dL/dZ``, as autograd forms it."""
    r = rounding
    n, work = eye.shape[0], eye.dtype  # eye: (n, n) in the working dtype
    signs = 2 * eye - 1
    y = signs * z  # exact: a sign
    # -logsigmoid(y) = softplus(-y) = max(-y, 0) + log1p(exp(-|y|)), without overflow
    terms = r(xp.maximum(-y, 0.0) + xp.log1p(xp.exp(-xp.abs(y))))
    value = r(r(xp.sum(terms)) / n)
    weight = r(xp.asarray(1.0 / n, dtype=work))  # d(sum / n) / d(term), in the dtype
    # logsigmoid's backward: grad * sigmoid(-y) = grad / (1 + exp(y)); exp(y) = inf gives 0,
    # the right limit.
    return value, signs * r(-weight * k(1.0 / k(1.0 + k(xp.exp(y)))))


def _naive_softmax(xp: Any, z: Any, eye: Any, rounding: Rounding, k: Rounding) -> tuple[Any, Any]:
    """CLIP's mean of the two cross-entropies and its ``dL/dZ``, as autograd forms it."""
    r = rounding
    n, work = eye.shape[0], eye.dtype  # eye: (n, n) in the working dtype

    def log_softmax(axis: int) -> Any:
        top = xp.max(z, axis=axis, keepdims=True)
        shifted = k(z - top)
        total = k(xp.sum(k(xp.exp(shifted)), axis=axis, keepdims=True))
        return r(shifted - k(xp.log(total)))

    rows, cols = log_softmax(1), log_softmax(0)
    image_to_text = r(-xp.mean(xp.sum(rows * eye, axis=1)))  # nll: the diagonal
    text_to_image = r(-xp.mean(xp.sum(cols * eye, axis=0)))
    value = r(r(image_to_text + text_to_image) / 2)
    weight = r(xp.asarray(0.5 / n, dtype=work))  # d(loss) / d(nll term), in the dtype
    # log_softmax's backward, fused: (exp(output) - onehot) * weight, then the sum of the
    # two directions' gradients.
    return value, r(r(k(k(xp.exp(rows)) - eye) * weight) + r(k(k(xp.exp(cols)) - eye) * weight))


#: The naive dense terms of each loss: ``(loss, dL/dZ)`` from the rounded logits ``Z``.
NAIVE_LOSSES = {"sigmoid": _naive_sigmoid, "softmax": _naive_softmax}


def naive_loss_and_grad(
    xp: Any,
    img: Any,
    txt: Any,
    scale: Any,
    bias: Any,
    *,
    loss: str,
    rounding: Rounding,
    logits: str = "features",
    fused: bool = True,
) -> tuple[Any, tuple[Any, Any, Any, Any]]:
    """Evaluate a plain dense loss and its autograd gradients in a half dtype.

    Parameters
    ----------
    xp : namespace
        Array-API namespace of the arrays.
    img, txt : array, shape (n, d)
        Features of a float32 dtype (holding values of the half dtype).
    scale, bias : array, shape ()
        ``t`` and ``b``, likewise.
    loss : str
        A loss of :data:`NAIVE_LOSSES`: SigLIP's ``-logsigmoid(labels * Z).sum() / n``
        (``"sigmoid"``), or CLIP's mean of the two cross-entropies (``"softmax"``).
    rounding : callable
        Rounds a float32 array to the half dtype (keeping it float32): applied to the
        result of every framework operation.
    logits : {"features", "logits"}
        Where ``t`` multiplies (:data:`LOGIT_ORDERS`).

    Returns
    -------
    loss, (img, txt, scale, bias)
        The loss and its four gradients, float32 arrays holding half values.
    """
    if loss not in NAIVE_LOSSES:
        names = ", ".join(repr(name) for name in NAIVE_LOSSES)
        msg = f"`loss` must be one of {names} (those with a naive reference), got {loss!r}"
        raise ValueError(msg)
    r = rounding
    n = img.shape[0]
    work = img.dtype
    eye = xp.eye(n, dtype=work)
    txt_t = xp.permute_dims(txt, (1, 0))
    if logits == "features":
        features = r(scale * img)
        z = r(r(xp.matmul(features, txt_t)) + bias)  # (n, d) @ (d, n) -> (n, n)
    elif logits == "logits":
        sims = r(xp.matmul(img, txt_t))  # (n, d) @ (d, n) -> (n, n)
        z = r(r(sims * scale) + bias)
    else:
        msg = f"`logits` must be one of {LOGIT_ORDERS}, got {logits!r}"
        raise ValueError(msg)
    # fused: a framework kernel computes in float32 inside and rounds its result once;
    # composed: every array-API operation inside it rounds too.
    k: Rounding = _unchanged if fused else r
    value, dz = NAIVE_LOSSES[loss](xp, z, eye, r, k)
    dbias = r(xp.sum(dz))
    if logits == "features":
        dfeatures = r(xp.matmul(dz, txt))  # (n, n) @ (n, d) -> (n, d)
        dimg = r(scale * dfeatures)
        dtxt = r(xp.matmul(xp.permute_dims(dz, (1, 0)), features))  # (n, n) @ (n, d)
        dscale = r(xp.sum(r(dfeatures * img)))
    else:
        dsims = r(dz * scale)
        dimg = r(xp.matmul(dsims, txt))  # (n, n) @ (n, d) -> (n, d)
        dtxt = r(xp.matmul(xp.permute_dims(dsims, (1, 0)), img))  # (n, n) @ (n, d)
        dscale = r(xp.sum(r(dz * sims)))
    return value, (dimg, dtxt, dscale, dbias)


#: ``(case name, id(case), loss, dtype, logits, fused)`` -> (case, the naive values, float64).
_VALUES: dict[tuple[str, int, str, str, str, bool], tuple[Case, dict[str, Any]]] = {}


def naive_values(
    case: Case, loss: str, dtype: str, logits: str = "features", *, fused: bool = True
) -> dict[str, Any]:
    """Return the naive reference's loss and gradients on `case`, as float64 NumPy values.

    Evaluated on the host (NumPy float32, rounded to `dtype` by :func:`round_half`), once per
    case, loss, dtype and logit order. The gradients of a large case are its stored rows.
    """
    import numpy as np

    key = (case.name, id(case), loss, dtype, logits, fused)
    cached = _VALUES.get(key)
    if cached is not None and cached[0] is case:
        return cached[1]
    if len(_VALUES) >= 512:  # cases made on the fly: keep none of them alive long
        _VALUES.clear()
    r = host_rounding(dtype)
    img, txt = r(case.img), r(case.txt)  # exact: the inputs lie on the bfloat16 grid
    scale, bias = r(np.float32(case.scale)), r(np.float32(case.bias))
    with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
        value, grads = naive_loss_and_grad(
            np, img, txt, scale, bias, loss=loss, rounding=r, logits=logits, fused=fused
        )
    golden = case.goldens[loss]
    values = {"loss": np.asarray(value, dtype=np.float64)}
    for name, grad in zip(QUANTITIES[1:], grads, strict=True):
        values[name] = golden.stored(name, np.asarray(grad, dtype=np.float64), case.n)
    _VALUES[key] = (case, values)
    return values


def naive_errors(
    case: Case, loss: str, dtype: str, factor: float = 1.0, *, fused: bool = True
) -> dict[str, float]:
    """Return the naive reference's error on each quantity of `case` (``inf``: not finite).

    The error is the suite's normwise relative error against the golden (both scaled by the
    convention's `factor`), the larger of the two logit orders'; ``inf`` where either order
    gives a non-finite value (a float16 sum beyond 65504).
    """
    golden = case.goldens[loss]
    errors = dict.fromkeys(QUANTITIES, 0.0)
    for logits in LOGIT_ORDERS:
        values = naive_values(case, loss, dtype, logits, fused=fused)
        for quantity in QUANTITIES:
            floor = FLOOR * natural_scale(case, quantity)
            want = getattr(golden, quantity)
            error = relative_error(values[quantity] * factor, want * factor, floor)
            errors[quantity] = max(errors[quantity], error)
    return errors
