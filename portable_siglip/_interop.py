"""Loading array libraries by name and copying their arrays to NumPy.

Used by the command line and the conformance suite, never by the loss functions, which
work on whatever arrays they are given. NumPy and the named library are imported on call.
"""

from __future__ import annotations

import importlib
from contextlib import AbstractContextManager, nullcontext
from typing import Any

__all__ = [
    "BACKENDS",
    "DTYPES",
    "UsageError",
    "bfloat16_to_float32",
    "check_writable",
    "computing_in",
    "float32_to_bfloat16",
    "load_backend",
    "to_host",
    "to_numpy",
]

BACKENDS = ("numpy", "torch", "jax", "cupy", "array_api_strict")
DTYPES = ("float64", "float32", "float16", "bfloat16")


class UsageError(ValueError):
    """A problem with what the user asked for (unknown or missing library, missing dtype).

    A ``ValueError``, so callers that catch those keep working; the command line turns it
    into exit status 2, and :func:`portable_siglip.conformance.check` raises it for an
    unknown backend or dtype (exported there as ``portable_siglip.conformance.UsageError``).

    Examples
    --------
    >>> try:
    ...     load_backend("tensorflow", "float32")
    ... except UsageError as error:
    ...     print(type(error).__name__, isinstance(error, ValueError))
    UsageError True
    """


def load_backend(name: str, dtype: str, *, scoped: bool = False) -> tuple[Any, Any]:
    """Import backend `name` and return ``(namespace, dtype object)``.

    Parameters
    ----------
    name : {"numpy", "torch", "jax", "cupy", "array_api_strict"}
        The array library.
    dtype : {"float64", "float32", "float16", "bfloat16"}
        Name of the floating dtype wanted.
    scoped : bool, default False
        jax only. By default x64 is switched on for the whole process (``jax_enable_x64``),
        whatever `dtype` is, so that float64 arrays can be made anywhere. With
        ``scoped=True`` jax's configuration is left as it is: make and use the arrays
        inside :func:`computing_in`, which switches x64 on for float64 only, in one thread.

    Returns
    -------
    namespace, dtype
        The array-API namespace (jax: ``jax.numpy``) and the dtype object.

    Raises
    ------
    UsageError
        If the library is unknown or not installed, or lacks the dtype.
    """
    from array_api_compat import array_namespace

    if name not in BACKENDS:
        msg = f"`backend` must be one of {', '.join(BACKENDS)}; got {name!r}"
        raise UsageError(msg)
    try:
        module = importlib.import_module(name)
    except ImportError:
        msg = f"`backend`: {name!r} is not installed (pip install {name.replace('_', '-')})"
        raise UsageError(msg) from None
    if name == "jax":
        if not scoped:
            module.config.update("jax_enable_x64", True)
        xp = importlib.import_module("jax.numpy")
    elif name == "array_api_strict":
        xp = module
    else:
        xp = array_namespace(module.empty(0))
    dtype_object = getattr(xp, dtype, None)
    if dtype_object is None:
        msg = f"`dtype`: backend {name!r} has no dtype {dtype!r}"
        raise UsageError(msg)
    return xp, dtype_object


def computing_in(name: str, dtype: str) -> AbstractContextManager[Any]:
    """Return the context in which backend `name` computes in `dtype`, in this thread only.

    For jax it is ``jax.enable_x64(dtype == "float64")``: x64 is on for float64 and off for
    every other dtype, whatever the process-wide ``jax_enable_x64`` says, so ``jnp.eye(n)``
    and type promotion give float32 in a float32 computation, as they do in production. The
    setting is jax's per-thread context: other threads, and this one after the block, see
    jax's configuration unchanged. For the other backends it does nothing.

    Examples
    --------
    >>> with computing_in("numpy", "float32"):
    ...     pass
    """
    if name != "jax":
        return nullcontext()
    import jax

    return jax.enable_x64(dtype == "float64")  # type: ignore[no-any-return]


def to_host(x: Any) -> Any:
    """Return an array of any backend and device as a NumPy array of its own dtype.

    CPU arrays are viewed without a copy where the library allows it; device arrays are
    copied to the host.

    Examples
    --------
    >>> import numpy as np
    >>> to_host(np.ones(2, dtype=np.float32)).dtype
    dtype('float32')
    """
    import array_api_compat
    import numpy as np

    if isinstance(x, np.ndarray):
        return x
    if array_api_compat.is_torch_array(x):
        return x.detach().to("cpu").numpy()
    if array_api_compat.is_cupy_array(x):
        return x.get()
    if hasattr(x, "__array_namespace__") and not array_api_compat.is_jax_array(x):
        xp = x.__array_namespace__()
        if getattr(xp, "__name__", "") == "array_api_strict":
            x = x.to_device(xp.Device("CPU_DEVICE"))
    return np.asarray(x)


def to_numpy(x: Any) -> Any:
    """Copy an array of any backend, device and float dtype to a float64 NumPy array.

    Examples
    --------
    >>> import numpy as np
    >>> to_numpy(np.ones(2, dtype=np.float32)).dtype
    dtype('float64')
    """
    import array_api_compat
    import numpy as np

    if array_api_compat.is_torch_array(x):
        return x.detach().to("cpu").double().numpy()  # NumPy has no bfloat16
    # jax's bfloat16 comes to the host as ml_dtypes' NumPy bfloat16, which NumPy widens
    # (converting on the device would compile a conversion for every new shape).
    return np.asarray(to_host(x), dtype=np.float64)


def check_writable(path: Any, option: str = "--report") -> None:
    """Raise :class:`UsageError` unless `path` can be written, leaving no file behind.

    For an output option such as ``--report``, checked before any work so that a typo in
    the path costs nothing.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> check_writable(pathlib.Path(tempfile.mkdtemp()) / "report.json")

    A device that takes no bytes is refused before the work, not after it:

    >>> check_writable("/dev/full")  # doctest: +SKIP
    Traceback (most recent call last):
    ...
    UsageError: `--report`: cannot write '/dev/full': No space left on device
    """
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        msg = f"`{option}`: {str(path)!r} is a directory; give the path of a file"
        raise UsageError(msg)
    existed = path.exists()
    try:
        with path.open("a", encoding="utf-8") as stream:
            if existed and not path.is_file():
                # A device or pipe (/dev/full, /dev/null) accepts the open and may still
                # refuse the bytes: try one, as the report will write them.
                stream.write("\n")
                stream.flush()
    except OSError as error:
        msg = f"`{option}`: cannot write {str(path)!r}: {error.strerror or error}"
        raise UsageError(msg) from None
    if not existed:
        path.unlink(missing_ok=True)


def bfloat16_to_float32(bits: Any) -> Any:
    """Widen bfloat16 bit patterns (``uint16``) to float32, exactly.

    Examples
    --------
    >>> import numpy as np
    >>> bfloat16_to_float32(np.array([0x3F80, 0xC040, 0x7F80], dtype=np.uint16))
    array([ 1., -3., inf], dtype=float32)
    """
    import numpy as np

    wide = np.asarray(bits, dtype=np.uint16).astype(np.uint32)
    return np.asarray(wide << np.uint32(16)).view(np.float32)


def float32_to_bfloat16(values: Any) -> Any:
    """Round float32 values to the nearest bfloat16, ties to even; return its bit patterns.

    Overflow gives infinities, NaNs stay NaN (quiet, sign kept), as in torch and ml_dtypes.

    Examples
    --------
    >>> import numpy as np
    >>> bits = float32_to_bfloat16(np.array([1.0, 1.00390625, 1.01171875], dtype=np.float32))
    >>> bfloat16_to_float32(bits)  # 1 + 2^-8 ties to 1 (even), 1 + 3 * 2^-8 to 1 + 2^-6
    array([1.      , 1.      , 1.015625], dtype=float32)
    """
    import numpy as np

    values = np.asarray(values, dtype=np.float32)
    flat = np.ascontiguousarray(values).reshape(-1)  # arrays: uint32 addition wraps silently
    bits = flat.view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(flat)
    out[nan] = (bits[nan] >> 16).astype(np.uint16) | np.uint16(0x0040)
    return out.reshape(values.shape)
