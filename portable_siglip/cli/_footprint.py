"""How much host memory a ``run`` will take, predicted from its options before it allocates.

``run --dim 10**9`` used to start drawing features and end in a ``MemoryError`` traceback
(exit 1, which means "verification failed"); ``--batch 10**9`` worked 35 s first. ``run``
now predicts its host memory from the options (:func:`predict`), compares it with what the
machine has free (:func:`available_bytes`) and refuses, as a usage error, a run that cannot
fit, naming the option and the estimate.

The prediction follows what ``run`` holds at its peak, on each rank and in bytes:

- drawing the features: the float64 images and captions, their noise and temporaries;
- the run: its features in ``--dtype`` and their gradients, the tile workspace (a few
  ``b x b`` float32-or-wider tiles, b the block size) and, sharded, the text blocks in
  flight (all of them for ``gather``);
- ``--verify`` on rank 0: the whole batch again in float64, the gathered gradients, the
  reference's float64 gradients and its row blocks (:mod:`._verify`).

It counts host memory only: on a GPU (``--device cuda``) the run's arrays live in the
GPU's memory, which this does not predict, and only the drawing and ``--verify`` count.
Ranks of one node share its memory, so each rank's part is multiplied by the ranks of its
node (:func:`._launch.local_size`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

__all__ = ["Footprint", "available_bytes", "largest_option", "predict"]

#: The bytes of one element of each ``--dtype``.
ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}

#: The library's default tile edge, for a run without ``--block-size``.
DEFAULT_BLOCK = 1024

#: Rows per chunk of the feature generator (``_commands.CHUNK_ROWS``).
CHUNK_ROWS = 4096

#: Float32-sized tiles of b x b that the workspace holds at once (measured: 24 b^2 bytes).
TILES = 6


@dataclass(frozen=True)
class Footprint:
    """A run's predicted host memory in bytes, by phase.

    Attributes
    ----------
    draw : int
        Drawing the features in float64 and placing them in the run's dtype.
    run : int
        The loss and its gradients: features, gradients, tiles, text blocks in flight.
    verify : int
        What ``--verify`` adds on rank 0 (0 without it), while the run's arrays live.
    """

    draw: int
    run: int
    verify: int

    @property
    def peak(self) -> int:
        """The most of the phases at once: drawing, the run, or the run plus the check."""
        return max(self.draw, self.run + self.verify)


def predict(
    n: int,
    d: int,
    captions: int = 1,
    *,
    dtype: str = "float32",
    block_size: int | None = None,
    world: int = 1,
    strategy: str = "",
    verify: bool = False,
    on_gpu: bool = False,
) -> Footprint:
    """Predict the host memory of ``run`` on one rank (rank 0, the one that verifies).

    Parameters
    ----------
    n, d, captions : int
        ``--batch``, ``--dim`` and ``--captions-per-image``.
    dtype : str
        ``--dtype``.
    block_size : int, optional
        ``--block-size`` (default: the library's).
    world : int
        The number of ranks the batch is sharded over.
    strategy : str
        The distributed schedule (``gather`` holds every text block).
    verify : bool
        ``--verify``.
    on_gpu : bool
        The run's arrays live on a GPU: only the drawing and ``--verify`` use the host.

    Returns
    -------
    Footprint
        Bytes by phase; Python integers, exact for any size.

    Examples
    --------
    >>> small = predict(4096, 512)  # the default run: tens of MiB
    >>> 30 < small.peak / 2**20 < 100
    True
    >>> predict(4096, 10**9).peak > 10**13  # --dim 10**9: tens of terabytes
    True
    """
    item = ITEMSIZE.get(dtype, 8)
    wide = max(item, 4)  # half precision accumulates in float32
    m_rank = -(-n // world)
    k_total = captions * n
    k_rank = -(-k_total // world)
    rows = (m_rank + k_rank) * d
    # float64 images, captions, their noise and a temporary; one chunk of the generator.
    draw = (m_rank + 3 * k_rank) * d * 8 + min(CHUNK_ROWS, n) * d * 8 + rows * item
    edge = min(block_size or DEFAULT_BLOCK, max(m_rank, k_rank))
    held = 0 if on_gpu else rows * (item + wide) + TILES * edge * edge * 4
    if world > 1 and not on_gpu:
        held += (k_total if strategy == "gather" else 2 * k_rank) * d * wide
    check = 0
    if verify:
        everything = (n + k_total) * d
        # The features in float64, the reference's float64 gradients, its row blocks (a
        # quarter of the features each, about five at once), the comparison's float64
        # copies of one gradient and its difference, and the ids (measured: 40 bytes per
        # feature value in one process).
        check = everything * (8 + 8 + 10 + 16) + (n + k_total) * 8 * 3
        if world > 1:  # rank 0 draws the batch again and gathers the gradient shards
            check += everything * (8 + item + item + 8)
    return Footprint(draw=draw, run=held, verify=check)


def largest_option(n: int, d: int, captions: int) -> str:
    """Return the option that makes a run big: the one farthest above its default.

    Examples
    --------
    >>> largest_option(4096, 10**9, 1)
    'dim'
    >>> largest_option(10**9, 512, 1), largest_option(4096, 512, 10**6)
    ('batch', 'captions_per_image')
    """
    ratios = {"batch": n / 4096, "dim": d / 512, "captions_per_image": float(captions)}
    return max(ratios, key=lambda name: ratios[name])


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_headroom() -> int | None:
    """Return what the memory cgroup (a container limit) still allows; None without one."""
    pairs = (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",  # cgroup v1
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    )
    for limit_path, usage_path in pairs:
        try:
            with open(limit_path) as limit_file, open(usage_path) as usage_file:
                limit, usage = limit_file.read().strip(), usage_file.read().strip()
        except OSError:
            continue
        if not limit.isdigit() or not usage.isdigit() or int(limit) >= 2**60:  # "max"
            return None
        return max(0, int(limit) - int(usage))
    return None


def available_bytes() -> int | None:
    """Return the memory this process could still take, or None where nothing says.

    ``MemAvailable`` of ``/proc/meminfo`` (free memory plus the caches the kernel can
    drop); else psutil's ``virtual_memory().available`` where psutil is installed; else
    the free pages of ``os.sysconf``. A container's memory cgroup limit lowers it.
    """
    found = _meminfo_available()
    if found is None:
        try:
            import psutil  # type: ignore[import-not-found,import-untyped,unused-ignore]

            found = int(psutil.virtual_memory().available)
        except Exception:  # not installed, or no reading on this system
            found = None
    if found is None:
        try:
            found = int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):  # no such sysconf name here
            found = None
    headroom = _cgroup_headroom()
    if headroom is not None:
        found = headroom if found is None else min(found, headroom)
    return found


def gigabytes(count: int) -> str:
    """Format a byte count in GB (10^9 bytes), readable at any size.

    Examples
    --------
    >>> gigabytes(49_152_000_000_000)
    '49152 GB'
    >>> gigabytes(430_000_000)
    '0.43 GB'
    """
    value = count / 1e9
    if value >= 100:
        return f"{value:.0f} GB"
    digits = max(0, 1 - math.floor(math.log10(value))) if value > 0 else 0
    return f"{value:.{digits}f} GB"
