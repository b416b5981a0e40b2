"""Plots of a benchmark report: time and peak extra memory against the batch size n.

``python -m portable_siglip bench --json REPORT.json`` writes the report; run
``python -m portable_siglip.bench.plots REPORT.json DIR`` to (re)draw ``DIR/bench-time.png`` and
``DIR/bench-memory.png`` from it. Each figure has one subplot per (d, loss), one line per
(backend, impl): the colour names the backend, the line style and marker the implementation.

matplotlib is imported only when a plot is drawn (``pip install matplotlib``, or the
``bench`` extra), and only its object-oriented API with the Agg canvas is used, so the
caller's pyplot backend is left alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "write_plots"]

#: Line colour of each backend (matplotlib's default cycle; unknown backends get C3...).
BACKEND_COLOURS = {"numpy": "C0", "torch": "C1", "jax": "C2"}
#: (line style, marker) of each implementation.
IMPL_STYLES = {
    "ours": ("-", "o"),
    "ours ids": ("-", "v"),
    "roofline": ("--", "s"),
    "dense numpy": (":", "<"),
    "dense autograd": (":", "^"),
    "open_clip": ("-.", "D"),
}
ITEMSIZE = {"float32": 4, "float64": 8}
#: (file name, row field, y label, impls left out) of each figure.
FIGURES = (
    ("bench-time.png", "median_s", "median time (s)", ()),
    ("bench-memory.png", "peak_extra_mib", "peak extra memory (MiB)", ("roofline",)),
)


def _size_label(n: float, _pos: object = None) -> str:
    """Return ``n`` as on the axis: ``1k`` for 1024, ``64k`` for 65536, ``500`` for 500."""
    size = round(n)
    return f"{size // 1024}k" if size >= 1024 and size % 1024 == 0 else str(size)


def _value(row: dict[str, Any], field: str) -> float | None:
    """Return the row's positive finite ``field`` (log axes take nothing else), else None."""
    value = row.get(field)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


def write_plots(report: dict[str, Any], directory: str | os.PathLike[str]) -> list[Path]:
    """Draw the time and memory plots of a benchmark report as PNG files.

    Parameters
    ----------
    report : dict
        A report as written by ``python -m portable_siglip bench --json``: ``"rows"``
        (dicts with ``backend``, ``loss``, ``n``, ``d``, ``impl``, ``median_s`` and
        ``peak_extra_mib``; rows whose value is None are left out), ``"machine"``
        (``cpu``, ``cpu_count``) and ``"config"`` (``dtype``).
    directory : str or os.PathLike
        Where to write; created if missing.

    Returns
    -------
    list of pathlib.Path
        ``directory/bench-time.png`` (median time in seconds against n) and
        ``directory/bench-memory.png`` (peak extra MiB against n, without the roofline,
        with the size of one n x n matrix of the dtype for reference). A figure with no
        measured value says so in its middle.

    Raises
    ------
    ModuleNotFoundError
        When matplotlib is not installed.
    ValueError
        When no row has a measured time or memory.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ModuleNotFoundError(
            "plotting the benchmark needs matplotlib: pip install matplotlib "
            '(or pip install "portable-siglip[bench]")',
            name="matplotlib",
        ) from error

    machine = report.get("machine") or {}
    dtype = str((report.get("config") or {}).get("dtype", "float32"))
    rows = [
        row
        for row in report.get("rows") or []
        if isinstance(row, dict)
        and row.get("dtype", dtype) == dtype
        and any(_value(row, field) is not None for _, field, _, _ in FIGURES)
    ]
    if not rows:
        raise ValueError(
            "the report has no plottable rows: no row of dtype "
            f"{dtype} has a measured median_s or peak_extra_mib"
        )
    dims = sorted({int(row["d"]) for row in rows}, reverse=True)
    losses = sorted({str(row["loss"]) for row in rows})
    title = (
        f"portable-siglip benchmark, {dtype}\n"
        f"{machine.get('cpu', 'unknown CPU')}, {machine.get('cpu_count', '?')} CPUs"
    )

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, field, ylabel, skip in FIGURES:
        fig = Figure(figsize=(5 * len(losses) + 2.2, 3.8 * len(dims) + 0.6), layout="constrained")
        FigureCanvasAgg(fig)
        fig.suptitle(title)
        kept = [r for r in rows if r["impl"] not in skip and _value(r, field) is not None]
        if not kept:
            fig.text(0.5, 0.5, f"no row has a measured {field}", ha="center", va="center")
        else:
            axes = fig.subplots(len(dims), len(losses), squeeze=False, sharex=True)
            panels = _Panels(rows, kept, field, dtype)
            for (i, d), (j, loss) in ((a, b) for a in enumerate(dims) for b in enumerate(losses)):
                ax = axes[i][j]
                ax.set_title(f"{loss}, d = {d}")
                _log_axes(ax, panels.sizes)
                if i == len(dims) - 1:
                    ax.set_xlabel("batch size n")
                if j == 0:
                    ax.set_ylabel(ylabel)
                panels.draw(ax, d, loss)
            keys = sorted(panels.handles)
            fig.legend(
                [panels.handles[k] for k in keys], [k[2] for k in keys], loc="outside right upper"
            )
        path = out / name
        fig.savefig(path, dpi=120)
        paths.append(path)
    return paths


def _log_axes(ax: Any, sizes: Sequence[int]) -> None:
    """Log axes, base 2 in n with a tick at each size, and their grid."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(FixedLocator(sizes))
    ax.xaxis.set_major_formatter(FuncFormatter(_size_label))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", axis="y", alpha=0.15)


class _Panels:
    """Draws the panels (d, loss) of one figure: a line per backend and impl, one legend."""

    def __init__(
        self, rows: Sequence[dict[str, Any]], kept: Sequence[dict[str, Any]], field: str, dtype: str
    ) -> None:
        self.kept, self.field, self.dtype = kept, field, dtype
        self.sizes = sorted({int(row["n"]) for row in rows})
        self.colours = dict(BACKEND_COLOURS)
        for backend in sorted({str(row["backend"]) for row in rows} - set(self.colours)):
            self.colours[backend] = f"C{len(self.colours)}"
        self.handles: dict[tuple[int, int, str], Any] = {}  # (backend, impl, label): line

    def draw(self, ax: Any, d: int, loss: str) -> None:
        here = [r for r in self.kept if r["d"] == d and r["loss"] == loss]
        impls = list(IMPL_STYLES)
        for backend, impl in sorted({(str(r["backend"]), str(r["impl"])) for r in here}):
            points = {
                int(r["n"]): _value(r, self.field)
                for r in here
                if r["backend"] == backend and r["impl"] == impl
            }
            style, marker = IMPL_STYLES.get(impl, ("-", "x"))
            label = f"{backend}, {impl}"
            key = (list(self.colours).index(backend), [*impls, impl].index(impl), label)
            (self.handles[key],) = ax.plot(
                sorted(points),
                [points[n] for n in sorted(points)],
                linestyle=style,
                marker=marker,
                markersize=4,
                color=self.colours[backend],
                label=label,
            )
        if self.field == "peak_extra_mib":  # the dense cost, for reference
            ns = sorted({int(r["n"]) for r in here}) or self.sizes
            label = f"one n x n {self.dtype} matrix"
            (self.handles[len(self.colours), 0, label],) = ax.plot(
                ns,
                [n * n * ITEMSIZE.get(self.dtype, 4) / 2**20 for n in ns],
                color="grey",
                linewidth=0.8,
                zorder=1,
                label=label,
            )
        if not here:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center")


def main(argv: Sequence[str] | None = None) -> int:
    """Redraw the plots of a saved report: ``python -m portable_siglip.bench.plots REPORT DIR``.

    Parameters
    ----------
    argv : sequence of str, optional
        The command-line arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0; the written paths are printed, one a line.
    """
    parser = argparse.ArgumentParser(
        prog="python -m portable_siglip.bench.plots",
        description="Draw bench-time.png and bench-memory.png from a saved benchmark report.",
    )
    parser.add_argument("report", type=Path, help="JSON report of `bench --json`")
    parser.add_argument("directory", type=Path, help="where to write the PNG files")
    args = parser.parse_args(argv)
    for path in write_plots(json.loads(args.report.read_text()), args.directory):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
