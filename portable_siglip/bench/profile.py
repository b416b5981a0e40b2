"""``python -m portable_siglip bench --profile``: where the time of one blockwise call goes.

For each backend (numpy, torch), loss and batch size, four things run on the same inputs,
interleaved as in the main benchmark (:func:`portable_siglip.bench.common.time_interleaved`):

``roofline``
    The three dense GEMMs of the loss and its gradient (the benchmark's roofline).
``tile GEMMs``
    Exactly the GEMMs our tile loop does, on the same tiles, into reused buffers, and nothing
    else: the GEMMs per tile of the loss's description (``gemms_per_tile``): 3 for the
    sigmoid loss, 4 for the softmax loss (its log-sum-exp pass recomputes every tile once
    more).
``ours``
    :func:`portable_siglip.sigmoid_loss_and_grad` / :func:`softmax_loss_and_grad`.

The split reads directly off the three times: ``roofline / tile GEMMs`` is the ceiling the
loop's GEMMs allow (about 1 for the sigmoid loss, about 3/4 for the softmax loss),
``tile GEMMs / ours`` is the share of the call spent in GEMMs, and ``ours - tile GEMMs`` is
everything else (elementwise passes, reductions, accumulation, Python).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from .. import _registry as registry
from .common import (
    check_args,
    installed,
    log_progress,
    machine_info,
    make_inputs,
    print_notes,
    refuse,
    render_table,
    time_interleaved,
)
from .sweep import make_run

__all__ = ["main", "tile_gemms"]


def tile_gemms(img: Any, txt: Any, block_size: int, gemms: int) -> Callable[[], None]:
    """Return a function doing the tile loop's GEMMs alone, in reused buffers.

    Parameters
    ----------
    img, txt : numpy.ndarray or torch.Tensor, shape (n, d)
        The inputs.
    block_size : int
        Tile edge.
    gemms : {3, 4}
        GEMMs per tile: the logits, then ``P @ txt`` and ``P.T @ img``; 4 adds the first
        pass's logits.

    Returns
    -------
    callable
        No arguments, returns None.
    """
    if type(img).__module__ == "numpy":
        import numpy as native
    else:
        import torch as native  # type: ignore[no-redef]
    n, d = img.shape
    b = min(block_size, n)
    tile = native.empty((b, b), dtype=img.dtype)
    img_acc = native.empty((b, d), dtype=img.dtype)
    txt_acc = native.empty((b, d), dtype=img.dtype)

    def run() -> None:
        for _ in range(gemms - 2):  # the logits of each pass
            for i in range(0, n, b):
                for j in range(0, n, b):
                    rows, cols = img[i : i + b], txt[j : j + b]
                    native.matmul(rows, cols.T, out=tile[: len(rows), : len(cols)])
        for i in range(0, n, b):
            for j in range(0, n, b):
                rows, cols = img[i : i + b], txt[j : j + b]
                part = tile[: len(rows), : len(cols)]
                native.matmul(part, cols, out=img_acc[: len(rows)])
                native.matmul(part.T, rows, out=txt_acc[: len(cols)])

    return run


def main(args: argparse.Namespace) -> int:
    """Run the profile described by ``args`` (the ``bench`` options) and print its table.

    Parameters
    ----------
    args : argparse.Namespace
        ``bench`` options after their defaults are filled in; ``--backends`` other than
        numpy and torch are ignored (only they have the in-place kernels), ``--sizes`` and
        ``--dims`` default to 8192 and 768 here.

    Returns
    -------
    int
        0; 2 for invalid options.
    """
    from .._checks import DEFAULT_BLOCK_SIZE

    if refuse(check_args(args)):
        return 2
    backends = [b for b in args.backends if b in ("numpy", "torch") and installed(b)]
    block = args.block_size or DEFAULT_BLOCK_SIZE
    machine = machine_info(backends)
    print(
        f"portable-siglip bench --profile: {args.dtype}, block_size = {block}, median of "
        f"{args.repeats} interleaved rounds; {machine['cpu']}, {machine['cpu_count']} CPUs; "
        f"load before {', '.join(f'{x:.2f}' for x in machine['load_average_before'])}",
        flush=True,
    )
    lines = [
        (
            "backend",
            "loss",
            "d",
            "n",
            "roofline s",
            "tile GEMMs s",
            "ours s",
            "GEMM ceiling",
            "GEMM share",
            "other s",
            "roofline frac",
        )
    ]
    for backend in backends:
        for d in args.dims:
            for n in args.sizes:
                img, txt = make_inputs(backend, n, d, args.dtype, args.seed)
                for loss in args.losses:
                    log_progress(f"  {backend} {loss} d={d} n={n} ...")
                    runs = [
                        make_run(backend, loss, "roofline", img, txt, None),
                        tile_gemms(img, txt, block, registry.get(loss).gemms_per_tile),
                        make_run(backend, loss, "ours", img, txt, args.block_size),
                    ]
                    roof, gemm, ours = (
                        statistics.median(t) for t in time_interleaved(runs, args.repeats)
                    )
                    lines.append(
                        (
                            backend,
                            loss,
                            str(d),
                            str(n),
                            f"{roof:.3f}",
                            f"{gemm:.3f}",
                            f"{ours:.3f}",
                            f"{roof / gemm:.2f}",
                            f"{gemm / ours:.2f}",
                            f"{ours - gemm:.3f}",
                            f"{roof / ours:.2f}",
                        )
                    )
    print()
    print(render_table(lines, left={0, 1}))
    print()
    print_notes(
        (
            "GEMM ceiling = roofline / tile GEMMs: the best roofline frac the loop's GEMMs "
            "allow. GEMM share = tile GEMMs / ours. other = ours - tile GEMMs: elementwise "
            "passes, reductions, accumulation and Python overhead.",
        ),
        (),
    )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average after: {load}; {time.strftime('%Y-%m-%d %H:%M:%S')}", file=sys.stdout)
    return 0
