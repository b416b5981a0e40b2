"""Smoke test of the benchmark (``python -m portable_siglip bench``): it runs, it reports."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from portable_siglip._bench import add_arguments, main


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.slow
def test_bench_writes_one_row_per_case(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "bench.json"
    argv = ["--sizes", "64,100", "--dim", "16", "--repeats", "1"]
    args = parse([*argv, "--backends", "numpy,torch", "--json", str(out)])
    assert main(args) == 0

    report = json.loads(out.read_text())
    cases = [(r["backend"], r["loss"], r["n"], r["impl"]) for r in report["rows"]]
    expected = [
        (backend, loss, n, impl)
        for backend in ("numpy", "torch")
        for n in (64, 100)
        for loss in ("sigmoid", "softmax")
        for impl in ("ours", "roofline", *(("dense autograd",) if backend == "torch" else ()))
    ]
    assert sorted(cases) == sorted(expected)
    assert len(set(cases)) == len(cases)
    for row in report["rows"]:
        assert row["error"] is None
        assert len(row["times_s"]) == 1
        assert math.isfinite(row["median_s"])
        assert row["median_s"] > 0
        assert math.isfinite(row["gflops"])
        assert row["gflops"] > 0
        assert row["roofline_fraction"] > 0
        assert row["peak_extra_mib"] >= 0
        traced = row["tracemalloc_peak_mib"]
        assert (traced is not None and traced >= 0) if row["backend"] == "numpy" else True
    assert report["machine"]["cpu_count"] >= 1


def test_bench_without_memory_or_dense(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    sizes = ["--sizes", "50", "--dim", "8", "--repeats", "2", "--block-size", "16"]
    options = ["--backends", "numpy", "--losses", "softmax", "--no-memory", "--no-dense"]
    args = parse([*sizes, *options, "--json", str(out)])
    assert main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["loss"], r["impl"]) for r in rows] == [("softmax", "ours"), ("softmax", "roofline")]
    assert all(r["peak_extra_mib"] is None and len(r["times_s"]) == 2 for r in rows)
    assert "roofline frac" in capsys.readouterr().out


def test_unknown_backend_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse(["--backends", "numpy,tensorflow"])
    assert exit_info.value.code == 2
    assert "tensorflow" in capsys.readouterr().err


def test_unknown_backend_in_a_namespace_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(["--sizes", "8", "--dim", "4"])
    args.backends = ["numpy", "tensorflow"]
    assert main(args) == 2
    assert "tensorflow" in capsys.readouterr().err


def test_bad_sizes_are_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse(["--sizes", "64,zero"])
    assert exit_info.value.code == 2
