"""Memory readings of this process, for the command line and the benchmarks.

On the host (Linux ``/proc``): the peak extra memory of a call is the kernel's high-water
mark of the resident set (``VmHWM``), reset through ``/proc/self/clear_refs`` just before the
call, minus the resident set just before it. ``ru_maxrss`` cannot be reset, and a process
started by ``fork`` + ``exec`` inherits its parent's value, so it is only a fallback.

On a GPU: :func:`reset_device_peak` before the call and :func:`device_peak_bytes` after it
read the array library's own allocator (torch, cupy, jax; what each reading means is
:data:`DEVICE_PEAK_SOURCES`). ``python -m portable_siglip run`` and ``bench --device cuda``
both read device memory through these two functions. No array library is imported here
until one of them is called.
"""

from __future__ import annotations

import os
import re
import resource
import sys
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEVICE_PEAK_SOURCES",
    "DevicePeak",
    "device_peak_bytes",
    "high_water_bytes",
    "reset_device_peak",
    "reset_high_water",
    "rss_bytes",
    "ru_maxrss_bytes",
]


def page_size() -> int:
    return int(os.sysconf("SC_PAGE_SIZE"))


def rss_bytes() -> int | None:
    """Return the resident set size, from ``/proc/self/statm`` (None where unavailable)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * page_size()
    except (OSError, IndexError, ValueError):
        return None


def high_water_bytes() -> int | None:
    """Return the peak resident set size (``VmHWM``), or None where unavailable."""
    try:
        with open("/proc/self/status") as status:
            match = re.search(r"^VmHWM:\s+(\d+)\s+kB", status.read(), re.MULTILINE)
    except OSError:
        return None
    return None if match is None else int(match.group(1)) * 1024


def reset_high_water() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); return whether that worked."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def ru_maxrss_bytes() -> int:
    """Return ``ru_maxrss`` in bytes (the kernel gives KiB on Linux, bytes on macOS)."""
    maxrss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return maxrss if sys.platform == "darwin" else maxrss * 1024


# --------------------------------------------------------------------------- device memory

#: What :func:`device_peak_bytes` returns for each array library, in words.
DEVICE_PEAK_SOURCES = {
    "torch": (
        "torch CUDA allocator: max_memory_allocated() during the call (after "
        "reset_peak_memory_stats()) minus memory_allocated() before it"
    ),
    "cupy": (
        "cupy default memory pool: growth of total_bytes() over the call, started after "
        "free_all_blocks(); the pool keeps what it got during the call, so this is the most "
        "it held at once, rounded up to its allocation units (an upper bound of the call's "
        "peak; memory outside the pool, such as cuBLAS workspaces, is not counted)"
    ),
    "jax": (
        "jax device memory_stats(): peak_bytes_in_use after the call minus bytes_in_use "
        "before it; jax cannot reset its peak, so this is exact when the call sets the "
        "process's peak and an upper bound otherwise"
    ),
}


@dataclass(frozen=True)
class DevicePeak:
    """The start of a device peak-memory reading (from :func:`reset_device_peak`).

    Attributes
    ----------
    backend : {"torch", "cupy", "jax"}
        The array library whose allocator is read.
    index : int
        The GPU's index (for jax: the index in ``jax.devices()``).
    before : int or None
        Bytes in use (torch, jax) or held by the pool (cupy) when the reading started; None
        where the library gives no reading.
    """

    backend: str
    index: int
    before: int | None


def _jax_stats(index: int) -> dict[str, Any] | None:
    import jax

    stats = jax.devices()[index].memory_stats()
    return stats if isinstance(stats, dict) and "peak_bytes_in_use" in stats else None


def reset_device_peak(backend: str, index: int | None = None) -> DevicePeak:
    """Start a peak-memory reading of one call on GPU ``index`` (default 0).

    Waits for the device, then: torch resets its peak statistics; cupy first frees the
    cached blocks of its default memory pool (:meth:`cupy.cuda.MemoryPool.free_all_blocks`),
    so that a block cached by earlier calls cannot hide the call's growth; jax has no reset.

    Parameters
    ----------
    backend : {"torch", "cupy", "jax"}
        The array library of the call.
    index : int, optional
        The GPU (default 0).

    Returns
    -------
    DevicePeak
        To pass to :func:`device_peak_bytes` after the call.

    Raises
    ------
    ValueError
        For another ``backend``.
    """
    index = 0 if index is None else int(index)
    if backend == "torch":
        import torch

        torch.cuda.synchronize(index)
        torch.cuda.reset_peak_memory_stats(index)
        return DevicePeak(backend, index, int(torch.cuda.memory_allocated(index)))
    if backend == "cupy":
        import cupy

        device = cupy.cuda.Device(index)
        with device:
            device.synchronize()
            pool = cupy.get_default_memory_pool()
            pool.free_all_blocks()
            return DevicePeak(backend, index, int(pool.total_bytes()))
    if backend == "jax":
        stats = _jax_stats(index)
        before = None if stats is None else int(stats.get("bytes_in_use", 0))
        return DevicePeak(backend, index, before)
    msg = f"`backend` must be one of torch, cupy, jax; got {backend!r}"
    raise ValueError(msg)


def device_peak_bytes(start: DevicePeak) -> tuple[int | None, str]:
    """Finish a reading begun by :func:`reset_device_peak`: the call's peak extra bytes.

    Call it once the call's results exist (for jax: after ``block_until_ready``); it waits
    for the device itself on torch and cupy.

    Parameters
    ----------
    start : DevicePeak
        What :func:`reset_device_peak` returned before the call.

    Returns
    -------
    peak, source : (int or None, str)
        Peak bytes beyond those in use before the call (never negative), and what the number
        means (:data:`DEVICE_PEAK_SOURCES`); None and the reason where the library gives no
        reading (jax on a device without memory statistics, such as its CPU).
    """
    source = DEVICE_PEAK_SOURCES[start.backend]
    if start.backend == "torch":
        import torch

        torch.cuda.synchronize(start.index)
        high = int(torch.cuda.max_memory_allocated(start.index))
        return max(0, high - int(start.before or 0)), source
    if start.backend == "cupy":
        import cupy

        device = cupy.cuda.Device(start.index)
        with device:
            device.synchronize()
            total = int(cupy.get_default_memory_pool().total_bytes())
        return max(0, total - int(start.before or 0)), source
    stats = _jax_stats(start.index)
    if stats is None or start.before is None:
        return None, "not measured: this jax device reports no memory statistics"
    return max(0, int(stats["peak_bytes_in_use"]) - start.before), source
