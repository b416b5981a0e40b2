"""Resident-memory readings of this process (Linux ``/proc``), for the command line.

The peak extra memory of a call is the kernel's high-water mark of the resident set
(``VmHWM``), reset through ``/proc/self/clear_refs`` just before the call, minus the
resident set just before it. ``ru_maxrss`` cannot be reset, and a process started by
``fork`` + ``exec`` inherits its parent's value, so it is only a fallback.
"""

from __future__ import annotations

import os
import re
import resource
import sys

__all__ = ["high_water_bytes", "reset_high_water", "rss_bytes", "ru_maxrss_bytes"]


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
