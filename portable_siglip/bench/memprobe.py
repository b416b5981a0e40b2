"""Peak extra memory of one benchmark case, measured in a process of its own.

Run as ``python -m portable_siglip.bench.memprobe --backend numpy --loss sigmoid --impl ours
--n 2048 --dim 768 --dtype float32``; prints one JSON line and exits 0. The sweep
(``python -m portable_siglip bench``) starts one such process per case, so that each
high-water mark belongs to that case alone.

Method: warm the case up on a tiny batch (so one-time library start-up, such as thread
pools and BLAS buffers, is not counted), create the real inputs, record the resident set
size (RSS) from ``/proc/self/statm``, reset the kernel's high-water mark through
``/proc/self/clear_refs``, run the case once and read the high-water mark back
(``VmHWM`` in ``/proc/self/status``). The extra memory is that high-water mark minus the
RSS before the run: the inputs are excluded, the outputs and every temporary included.

The jitted jax rows (``ours``, ``ours ids``) are compiled when their run is made, for the
warm-up batch and again for the real one, both before the RSS is read and the high-water
mark reset: the peak is that of the compiled run, without the compilation (whose leftovers
are in the RSS before, so excluded too). ``compile_s`` gives the real batch's compile time.

``resource.getrusage(...).ru_maxrss`` is recorded too, but it cannot be reset, and a child
started by ``fork``/``vfork`` + ``exec`` carries its parent's high-water mark in it (Linux
keeps the larger of the two across ``exec``), so it over-reports whenever the parent is
larger than the case; the JSON says when that happened. NumPy also reports its
allocations to :mod:`tracemalloc`, which gives an exact figure for the NumPy backend.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import tracemalloc
from typing import Any

from .._memory import high_water_bytes, reset_high_water, rss_bytes, ru_maxrss_bytes
from .common import BACKENDS, WARMUP_N, add_case_arguments, make_inputs
from .sweep import IMPLS, compile_seconds, make_run

__all__ = ["main", "measure"]


def measure(
    *,
    backend: str,
    loss: str,
    impl: str,
    n: int,
    dim: int,
    dtype: str,
    block_size: int | None,
    seed: int,
    positives_per_row: int = 2,
) -> dict[str, Any]:
    """Run one case once and return its peak extra memory.

    Parameters
    ----------
    backend : {"numpy", "torch", "jax"}
        Array library.
    loss : str
        A registered loss's name (ignored by the ``roofline`` case).
    impl : {"ours", "ours ids", "roofline", "dense numpy", "dense autograd", "open_clip"}
        What runs: the blockwise loss and gradient (plain, or with ids), the three GEMMs,
        the dense numpy loss and gradient, the dense torch loss or open_clip's.
    n, dim : int
        Batch size and feature dimension.
    dtype : {"float32", "float64"}
        Feature dtype.
    block_size : int or None
        Tile edge of the blockwise loss (None: the library default).
    seed : int
        Seed of the random inputs.
    positives_per_row : int
        K of ``ours ids``: ``img_ids = txt_ids = arange(n) // K``, made with the inputs.

    Returns
    -------
    dict
        ``peak_extra_bytes`` (the figure to report), ``method`` (how it was obtained),
        ``run_s`` (wall time of the measured run, tracemalloc included for NumPy),
        ``compile_s`` (seconds to compile the jitted jax rows for this batch, before the
        measured run; None for the rows that are not compiled),
        plus the raw readings: ``rss_before_bytes``, ``high_water_bytes``,
        ``ru_maxrss_extra_bytes``, ``ru_maxrss_inherited`` and, for NumPy,
        ``tracemalloc_peak_bytes``.
    """
    ru_maxrss_at_start = ru_maxrss_bytes()
    own_high_water_at_start = high_water_bytes()

    warm_img, warm_txt = make_inputs(backend, min(n, WARMUP_N), dim, dtype, seed + 1)
    make_run(backend, loss, impl, warm_img, warm_txt, block_size, positives_per_row)()
    del warm_img, warm_txt

    img, txt = make_inputs(backend, n, dim, dtype, seed)
    run = make_run(backend, loss, impl, img, txt, block_size, positives_per_row)  # compiles
    gc.collect()
    use_tracemalloc = backend == "numpy"
    if use_tracemalloc:
        tracemalloc.start()
        traced_before = tracemalloc.get_traced_memory()[0]
    rss_before = rss_bytes()
    reset = reset_high_water()
    started = time.perf_counter()
    run()
    run_s = time.perf_counter() - started
    high_water = high_water_bytes()
    ru_maxrss = ru_maxrss_bytes()
    traced_peak = None
    if use_tracemalloc:
        traced_peak = max(0, tracemalloc.get_traced_memory()[1] - traced_before)
        tracemalloc.stop()

    baseline = rss_before if rss_before is not None else 0
    ru_maxrss_extra = max(0, ru_maxrss - baseline)
    # A fresh process's ru_maxrss should not exceed its own high-water mark; when it does,
    # it was inherited from the parent across exec.
    inherited = own_high_water_at_start is not None and ru_maxrss_at_start > (
        own_high_water_at_start + 16 * 2**20
    )
    if reset and high_water is not None and rss_before is not None:
        method = "VmHWM after clear_refs reset"
        extra = max(0, high_water - rss_before)
    elif high_water is not None and rss_before is not None:
        method = "VmHWM (no reset; includes set-up transients)"
        extra = max(0, high_water - rss_before)
    else:
        method = "ru_maxrss"
        extra = ru_maxrss_extra
    return {
        "backend": backend,
        "loss": loss,
        "impl": impl,
        "n": n,
        "dim": dim,
        "dtype": dtype,
        "peak_extra_bytes": extra,
        "run_s": run_s,
        "compile_s": compile_seconds(run),
        "method": method,
        "rss_before_bytes": rss_before,
        "high_water_bytes": high_water,
        "ru_maxrss_extra_bytes": ru_maxrss_extra,
        "ru_maxrss_inherited": inherited,
        "tracemalloc_peak_bytes": traced_peak,
    }


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, measure one case and print it as one JSON line.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status, 0 on success.
    """
    parser = argparse.ArgumentParser(
        prog="python -m portable_siglip.bench.memprobe",
        description="Peak extra memory of one benchmark case (one JSON line on stdout).",
    )
    parser.add_argument("--backend", choices=BACKENDS, required=True)
    add_case_arguments(parser, IMPLS)
    parser.add_argument("--positives-per-row", type=int, default=2)
    result = measure(**vars(parser.parse_args(argv)))  # the options are its keywords
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
