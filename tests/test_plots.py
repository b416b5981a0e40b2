"""Plots of a benchmark report (``portable_siglip.bench.plots``)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from portable_siglip.bench import plots

needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed"
)
NAMES = ["bench-time.png", "bench-memory.png"]


def synthetic_report() -> dict[str, Any]:
    """2 backends x 2 losses x 2 d x 4 sizes x 3 impls, one case failed and one skipped."""
    rows = []
    for backend, speed in (("numpy", 1.0), ("torch", 0.6)):
        for loss in ("sigmoid", "softmax"):
            for d in (256, 768):
                for n in (1024, 2048, 4096, 8192):
                    for k, impl in enumerate(("ours", "roofline", "dense autograd")):
                        seconds = speed * (1.0 + k) * n * n * d * 1e-11
                        mib = (speed * n * d + k * n * n) * 4 / 2**20
                        rows.append(
                            {
                                "backend": backend,
                                "loss": loss,
                                "n": n,
                                "d": d,
                                "dtype": "float32",
                                "impl": impl,
                                "median_s": seconds,
                                "peak_extra_mib": mib,
                                "skipped": None,
                                "error": None,
                            }
                        )
    rows[1]["peak_extra_mib"] = None  # a roofline row may have no memory measured
    rows[-1].update(median_s=None, peak_extra_mib=None, skipped="predicted to exceed memory")
    rows[-2].update(median_s=None, peak_extra_mib=None, error="MemoryError: ")
    return {
        "machine": {"cpu": "Test CPU 9000", "cpu_count": 2},
        "config": {"dtype": "float32"},
        "rows": rows,
    }


def check_pngs(paths: list[Path], directory: Path) -> None:
    assert [p.name for p in paths] == NAMES
    for path in paths:
        assert path.parent == directory
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n"), path
        assert len(data) > 20_000, (path, len(data))


@needs_matplotlib
def test_write_plots_writes_two_pngs(tmp_path: Path) -> None:
    directory = tmp_path / "new" / "dir"  # created on demand
    paths = plots.write_plots(synthetic_report(), directory)
    check_pngs(paths, directory)
    assert sorted(p.name for p in directory.iterdir()) == sorted(NAMES)


@needs_matplotlib
def test_figure_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    figures: list[Any] = []
    original = Figure.savefig

    def spy(self: Any, *args: Any, **kwargs: Any) -> None:
        figures.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    plots.write_plots(synthetic_report(), tmp_path)
    time_fig, memory_fig = figures
    for fig in figures:
        assert "float32" in fig.get_suptitle()
        assert "Test CPU 9000" in fig.get_suptitle()
        assert "2 CPUs" in fig.get_suptitle()
        titles = sorted(ax.get_title() for ax in fig.axes)
        assert titles == sorted(
            f"{loss}, d = {d}" for loss in ("sigmoid", "softmax") for d in (256, 768)
        )
        ax = fig.axes[-1]  # bottom row: the shared n axis is labelled there
        assert ax.get_xscale() == "log"
        assert ax.get_yscale() == "log"
        assert [t.get_text() for t in ax.get_xticklabels()] == ["1k", "2k", "4k", "8k"]
        assert len(fig.legends) == 1
    time_labels = [t.get_text() for t in time_fig.legends[0].get_texts()]
    assert time_labels == [
        f"{b}, {i}" for b in ("numpy", "torch") for i in ("ours", "roofline", "dense autograd")
    ]
    memory_labels = [t.get_text() for t in memory_fig.legends[0].get_texts()]
    assert memory_labels == [
        f"{b}, {i}" for b in ("numpy", "torch") for i in ("ours", "dense autograd")
    ] + ["one n x n float32 matrix"]
    # The failed and skipped torch softmax d = 768 n = 8192 rows are left out.
    ax = next(a for a in time_fig.axes if a.get_title() == "softmax, d = 768")
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["torch, ours"].get_xdata()) == [1024, 2048, 4096, 8192]
    assert list(lines["torch, roofline"].get_xdata()) == [1024, 2048, 4096]
    assert list(lines["torch, dense autograd"].get_xdata()) == [1024, 2048, 4096]
    # The reference line is n * n * 4 bytes in MiB.
    ax = memory_fig.axes[0]
    reference = next(ln for ln in ax.get_lines() if ln.get_label().startswith("one n x n"))
    assert list(reference.get_ydata()) == [n * n * 4 / 2**20 for n in (1024, 2048, 4096, 8192)]


@needs_matplotlib
def test_no_plottable_rows(tmp_path: Path) -> None:
    report = synthetic_report()
    for row in report["rows"]:
        row.update(median_s=None, peak_extra_mib=None, skipped="not run")
    with pytest.raises(ValueError, match="no plottable rows"):
        plots.write_plots(report, tmp_path)
    with pytest.raises(ValueError, match="no plottable rows"):
        plots.write_plots({"rows": []}, tmp_path)
    assert list(tmp_path.iterdir()) == []


@needs_matplotlib
def test_memory_not_measured_still_writes_both(tmp_path: Path) -> None:
    report = synthetic_report()
    for row in report["rows"]:
        row["peak_extra_mib"] = None
    check_pngs(plots.write_plots(report, tmp_path), tmp_path)


def test_missing_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ModuleNotFoundError, match="pip install matplotlib") as info:
        plots.write_plots(synthetic_report(), tmp_path)
    assert "portable-siglip[bench]" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_import_does_not_import_matplotlib() -> None:
    code = (
        "import sys, portable_siglip, portable_siglip.bench.plots; "
        "assert 'matplotlib' not in sys.modules, sorted(sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr


@needs_matplotlib
def test_main_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "report.json"
    report.write_text(json.dumps(synthetic_report()))
    directory = tmp_path / "plots"
    assert plots.main([str(report), str(directory)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [str(directory / name) for name in NAMES]
    check_pngs([directory / name for name in NAMES], directory)
