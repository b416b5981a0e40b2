"""Smoke test of the benchmark (``python -m portable_siglip bench``): it runs, it reports."""

from __future__ import annotations

import argparse
import doctest
import io
import json
import math
import os
from pathlib import Path
from types import ModuleType

import pytest

from portable_siglip.bench import common, sweep
from portable_siglip.cli import _bench as cli
from portable_siglip.cli._bench import add_arguments, main


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
    # The dense baselines are always there; open_clip's row only when it is installed.
    has_open_clip = report["machine"].get("open_clip") is not None
    torch_rows = ("dense autograd", "open_clip") if has_open_clip else ("dense autograd",)
    expected = [
        (backend, loss, n, impl)
        for backend in ("numpy", "torch")
        for n in (64, 100)
        for loss in ("sigmoid", "softmax")
        for impl in ("ours", "roofline", *(torch_rows if backend == "torch" else ("dense numpy",)))
    ]
    assert sorted(cases) == sorted(expected)
    assert len(set(cases)) == len(cases)
    for row in report["rows"]:
        assert row["error"] is None
        assert row["skipped"] is None
        assert row["d"] == 16
        assert len(row["times_s"]) == 1
        assert row["timed_in"] == "interleaved"
        assert math.isfinite(row["median_s"])
        assert row["median_s"] > 0
        assert math.isfinite(row["gflops"])
        assert row["gflops"] > 0
        assert row["roofline_fraction"] > 0
        if row["impl"] == "roofline":
            assert row["peak_extra_mib"] is None  # not probed
            continue
        assert row["peak_extra_mib"] >= 0
        assert row["memory"]["run_s"] > 0
        traced = row["tracemalloc_peak_mib"]
        assert (traced is not None and traced >= 0) if row["backend"] == "numpy" else True
    assert report["machine"]["cpu_count"] >= 1
    assert report["config"]["dims"] == [16]


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


def test_bare_bench_is_the_quick_set() -> None:
    """The bare command was the 84-case sweep (hours); now a few representative cases."""
    args = cli._resolve_dims(parse([]))
    assert (args.sizes, args.dims, args.backends) == ([4096], [768], ["numpy", "torch"])
    assert args.sweep is False
    cases = sweep.plan(args)
    assert [(c.backend, c.d, c.n, c.loss) for c in cases] == [
        (backend, 768, 4096, loss)
        for backend in ("numpy", "torch")
        for loss in ("sigmoid", "softmax")
    ]
    # Each case sets ours against a dense baseline, and the roofline.
    assert sweep._impls("numpy", True, False) == ["ours", "roofline", "dense numpy"]
    assert sweep._impls("torch", True, False) == ["ours", "roofline", "dense autograd"]
    # --sizes, --dims and --backends replace the quick grid, as they replace the sweep's.
    chosen = cli._resolve_dims(parse(["--sizes", "8192", "--dims", "256", "--backends", "jax"]))
    assert [(c.backend, c.d, c.n) for c in sweep.plan(chosen)] == [("jax", 256, 8192)] * 2


@pytest.mark.parametrize("option", ["--sweep", "--full"])
def test_sweep_option_gives_the_full_sweep(option: str) -> None:
    args = cli._resolve_dims(parse([option]))
    assert args.sizes == [1024, 2048, 4096, 8192, 16384, 32768, 65536]
    assert args.dims == [256, 768]
    assert args.backends == ["numpy", "torch", "jax"]
    assert args.sweep is True
    assert len(sweep.plan(args)) == 7 * 2 * 3 * 2 == 84
    assert cli._resolve_dims(parse([option, "--dim", "64"])).dims == [64]


@pytest.mark.parametrize(
    "mode", ["--profile", "--frameworks", "--distributed", "--compare-precision"]
)
def test_sweep_with_another_mode_is_a_usage_error(
    mode: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(parse([mode, "--sweep"])) == 2
    assert "`--sweep` is the full sweep of the default benchmark" in capsys.readouterr().err


def test_bare_bench_runs_the_quick_set_and_sets_ours_against_dense(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The quick set end to end, its n and d shrunk through the plan's constants."""
    monkeypatch.setattr(sweep, "QUICK_SIZES", (48,))
    monkeypatch.setattr(sweep, "QUICK_DIMS", (8,))
    out = tmp_path / "quick.json"
    assert main(parse(["--repeats", "1", "--no-memory", "--json", str(out)])) == 0
    report = json.loads(out.read_text())
    assert report["config"]["plan"] == "quick"
    backends = ["numpy", "torch"] if common.installed("torch") else ["numpy"]
    assert report["config"]["backends"] == backends
    rows = {(r["backend"], r["loss"], r["impl"]): r for r in report["rows"]}
    assert {(r["n"], r["d"]) for r in report["rows"]} == {(48, 8)}
    dense = {"numpy": "dense numpy", "torch": "dense autograd"}
    for backend in backends:
        for loss in ("sigmoid", "softmax"):
            ours, base = rows[(backend, loss, "ours")], rows[(backend, loss, dense[backend])]
            assert base["error"] is None
            assert base["median_s"] > 0
            assert base["vs_ours"]["time"] == pytest.approx(base["median_s"] / ours["median_s"])
    text = capsys.readouterr().out
    assert "plan: the quick set (`bench --sweep`: the full sweep, 84 cases); " in text
    assert "ours against the dense baseline: same inputs, same rounds" in text
    assert "time baseline/ours" in text


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_dense_numpy_baseline_matches_the_oracle(loss: str) -> None:
    import numpy as np
    from oracle import sigmoid_reference, softmax_reference

    from portable_siglip.bench.baselines import dense_numpy_loss_and_grad

    img, txt = common.make_inputs("numpy", 37, 5, "float64", 3)
    value, (d_img, d_txt, d_scale, d_bias) = dense_numpy_loss_and_grad(loss, img, txt, 3.0, -2.0)
    oracle = {"sigmoid": sigmoid_reference, "softmax": softmax_reference}[loss]
    want = oracle(img, txt, 3.0, -2.0)
    assert value == pytest.approx(float(want.loss), rel=1e-12)
    np.testing.assert_allclose(d_img, want.img.astype(np.float64), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(d_txt, want.txt.astype(np.float64), rtol=1e-10, atol=1e-14)
    assert d_scale == pytest.approx(float(want.scale), rel=1e-10, abs=1e-14)
    assert d_bias == pytest.approx(float(want.bias), rel=1e-10, abs=1e-14)
    # float32 inputs give float32 gradients: the baseline runs in the inputs' dtype.
    small = [x.astype(np.float32) for x in (img, txt)]
    assert dense_numpy_loss_and_grad(loss, *small, 3.0, -2.0)[1][0].dtype == np.float32


def test_dense_numpy_memory_probe_runs() -> None:
    from portable_siglip.bench import memprobe

    result = memprobe.measure(
        backend="numpy",
        loss="sigmoid",
        impl="dense numpy",
        n=256,
        dim=8,
        dtype="float32",
        block_size=None,
        seed=0,
    )
    # At least the n x n similarities and logits: 2 x 256 KiB.
    assert result["tracemalloc_peak_bytes"] >= 2 * 256 * 256 * 4


def test_per_mode_dimension() -> None:
    assert cli._resolve_dims(parse(["--dim", "64"])).dims == [64]
    assert cli._resolve_dims(parse(["--dims", "8,16", "--dim", "64"])).dims == [8, 16]
    assert cli._resolve_dims(parse(["--frameworks"])).dim == 768
    assert cli._resolve_dims(parse(["--distributed", "--dim", "32"])).dim == 32


def test_long_cases_run_once_and_are_timed_in_their_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every case after the first n is "long": predicted from the smaller n, above 0 s. At the
    # first n there is no smaller one, and an infinite prior rate predicts 0 s: short.
    monkeypatch.setattr(sweep, "LONG_CASE_S", 0.0)
    monkeypatch.setattr(sweep, "PRIOR_FLOPS", math.inf)
    out = tmp_path / "bench.json"
    options = ["--backends", "numpy", "--losses", "sigmoid", "--no-dense", "--repeats", "3"]
    args = parse(["--sizes", "40,80", "--dims", "8,12", *options, "--json", str(out)])
    assert main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["d"], r["n"], r["impl"]) for r in rows] == [
        (d, n, impl) for d in (8, 12) for n in (40, 80) for impl in ("ours", "roofline")
    ]
    for row in rows:
        if row["n"] == 40:
            assert (row["timed_in"], len(row["times_s"])) == ("interleaved", 3)
        elif row["impl"] == "roofline":
            assert (row["timed_in"], len(row["times_s"])) == ("once", 1)
        else:
            assert (row["timed_in"], row["times_s"]) == ("memory probe", [row["memory"]["run_s"]])


def test_dense_rows_over_the_memory_cap_are_skipped_with_the_prediction(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "bench.json"
    argv = ["--backends", "torch", "--sizes", "64", "--dim", "8", "--repeats", "1", "--no-memory"]
    assert main(parse([*argv, "--memory-cap-gib", "1e-9", "--json", str(out)])) == 0
    rows = json.loads(out.read_text())["rows"]
    skipped = {r["impl"]: r["skipped"] for r in rows if r["skipped"]}
    assert "dense autograd" in skipped
    assert all("predicted" in reason and "GiB cap" in reason for reason in skipped.values())
    assert all(r["median_s"] > 0 for r in rows if r["impl"] in ("ours", "roofline"))
    assert "skipped: predicted" in capsys.readouterr().out


def test_jax_backend_runs(tmp_path: Path) -> None:
    pytest.importorskip("jax")
    out = tmp_path / "bench.json"
    argv = ["--backends", "jax", "--sizes", "48", "--dim", "8", "--repeats", "1", "--no-memory"]
    assert main(parse([*argv, "--json", str(out)])) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["backend"], r["impl"]) for r in rows} == {("jax", "ours"), ("jax", "roofline")}
    assert all(r["median_s"] > 0 for r in rows)


def test_jax_rows_are_jitted_and_report_their_compile_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("jax")
    out = tmp_path / "bench.json"
    argv = ["--backends", "numpy,jax", "--losses", "sigmoid", "--sizes", "40", "--dim", "8"]
    options = ["--repeats", "1", "--no-memory", "--no-dense", "--positives-per-row", "2"]
    assert main(parse([*argv, *options, "--json", str(out)])) == 0
    rows = json.loads(out.read_text())["rows"]
    compiled = {(r["backend"], r["impl"]): r["compile_s"] for r in rows}
    assert set(compiled) == {
        (backend, impl) for backend in ("numpy", "jax") for impl in ("ours", "ours ids", "roofline")
    }
    for (backend, impl), seconds in compiled.items():
        if backend == "jax" and impl != "roofline":
            assert seconds is not None
            assert math.isfinite(seconds)
            assert seconds > 0
        else:
            assert seconds is None
    text = capsys.readouterr().out
    # The main table: from its header to the first blank line (the ids table follows).
    table = text.split("\nbackend ", 1)[1].split("\n\n", 1)[0].splitlines()
    header, body = "backend " + table[0], table[2:]
    assert "compile s" in header
    # Numbers are right-aligned: the cell ends where its header ends.
    start, end = header.index("median s") + len("median s"), header.index("compile s") + 9
    impl = header.index("impl")
    cells = {(line.split()[0], line[impl:].split("  ")[0]): line[start:end] for line in body}
    assert len(cells) == len(body) == 6
    assert float(cells[("jax", "ours")]) > 0
    assert float(cells[("jax", "ours ids")]) > 0
    assert cells[("jax", "roofline")].strip() == ""
    assert all(cells[("numpy", impl)].strip() == "" for impl in ("ours", "ours ids", "roofline"))
    assert "lax.fori_loop" in text  # the note says what compile s is


def test_numpy_only_sweep_has_no_compile_column(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--backends", "numpy", "--losses", "sigmoid", "--sizes", "32", "--dim", "4"]
    assert main(parse([*argv, "--repeats", "1", "--no-memory"])) == 0
    assert "compile s" not in capsys.readouterr().out


def test_jax_memory_probe_measures_the_compiled_run() -> None:
    pytest.importorskip("jax")
    from portable_siglip.bench import memprobe

    common_case = {"loss": "softmax", "n": 40, "dim": 8, "dtype": "float32", "seed": 0}
    result = memprobe.measure(backend="jax", impl="ours", block_size=16, **common_case)
    assert result["compile_s"] > 0
    assert result["run_s"] > 0
    assert result["peak_extra_bytes"] >= 0
    numpy = memprobe.measure(backend="numpy", impl="ours", block_size=16, **common_case)
    assert numpy["compile_s"] is None


def test_plots_are_written_next_to_the_json(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    argv = ["--backends", "numpy", "--sizes", "32,64", "--dim", "8", "--repeats", "1"]
    assert main(parse([*argv, "--plots", str(tmp_path / "plots")])) == 0
    for name in ("bench-time.png", "bench-memory.png"):
        assert (tmp_path / "plots" / name).read_bytes().startswith(b"\x89PNG")


def test_roofline_goes_by_panels_above_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    np = pytest.importorskip("numpy")
    monkeypatch.setattr(sweep, "ROOFLINE_PANEL_BYTES", 3000 * 1024 * 8)
    assert sweep.roofline_panel(3000, 8) == 1024  # 3 panels: 1024, 1024, 952 rows
    calls: list[tuple[int, ...]] = []

    class Spy(np.ndarray):  # type: ignore[misc]
        def __matmul__(self, other: object) -> object:
            calls.append(tuple(self.shape))
            return np.ndarray.__matmul__(self, other)

    img = np.ones((3000, 2)).view(Spy)
    sweep._roofline(img, np.ones((3000, 2)))()
    assert [c for c in calls if c[1] == 2] == [(1024, 2), (1024, 2), (952, 2)]


def test_progress_reports_cases_elapsed_and_left() -> None:
    stream = io.StringIO()
    progress = common.Progress([1.0, 3.0], stream=stream)
    progress.start("first")
    progress.advance()
    progress.start("second")
    progress.advance()
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert "0/2 cases" in lines[0]
    assert "~? left" in lines[0]
    assert lines[0].endswith("| first")
    assert "1/2 cases" in lines[1]
    assert "[######" in lines[1]
    assert lines[1].endswith("| second")


def test_profile_splits_our_time_into_tile_gemms_and_the_rest(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--profile", "--backends", "numpy", "--sizes", "96", "--dim", "8", "--repeats", "1"]
    assert main(parse([*argv, "--block-size", "40"])) == 0
    out = capsys.readouterr().out
    assert "tile GEMMs s" in out
    assert "GEMM ceiling" in out
    body = [line.split() for line in out.splitlines() if line.startswith("numpy ")]
    assert [(row[1], row[3]) for row in body] == [("sigmoid", "96"), ("softmax", "96")]


@pytest.mark.parametrize("gemms", [3, 4])
def test_tile_gemms_do_the_loop_s_products(gemms: int) -> None:
    np = pytest.importorskip("numpy")
    from portable_siglip.bench import profile

    calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    real = np.matmul

    def spy(a: object, b: object, out: object = None) -> object:
        calls.append((np.shape(a), np.shape(b)))
        return real(a, b, out=out)

    img = np.ones((7, 2))
    run = profile.tile_gemms(img, img, 3, gemms)
    np.matmul = spy
    try:
        run()
    finally:
        np.matmul = real
    tiles = 3 * 3  # blocks [0, 3), [3, 6), [6, 7) in each direction
    assert len(calls) == gemms * tiles


def test_reference_rows_run_the_array_api_loops_and_restore_the_switch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from portable_siglip import _inplace

    seen: list[bool] = []
    real = _inplace.enabled

    def spy(xp: object, *arrays: object) -> bool:
        seen.append(real(xp, *arrays))
        return seen[-1]

    monkeypatch.setattr(_inplace, "enabled", spy)
    monkeypatch.delenv(_inplace.ENV, raising=False)
    out = tmp_path / "bench.json"
    argv = ["--backends", "numpy", "--losses", "sigmoid", "--sizes", "40", "--dim", "8"]
    options = ["--repeats", "1", "--no-memory", "--no-dense", "--reference", "--json", str(out)]
    assert main(parse([*argv, *options])) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["ours", "reference loops", "roofline"]
    # warm-up and one round: ours twice on the kernels, the reference twice on the loops
    assert seen == [True, False, True, False]
    assert _inplace.ENV not in os.environ


@pytest.mark.parametrize("module", [common, sweep], ids=lambda m: m.__name__)
def test_docstring_examples_run(module: ModuleType) -> None:
    result = doctest.testmod(module, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0


def test_ids_row_is_timed_with_ours_and_reported_as_ratios(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    argv = ["--backends", "numpy", "--sizes", "40", "--dim", "8", "--repeats", "2"]
    options = ["--no-dense", "--positives-per-row", "2", "--json", str(out)]
    assert main(parse([*argv, *options])) == 0
    report = json.loads(out.read_text())
    assert report["config"]["positives_per_row"] == 2
    rows = report["rows"]
    assert [(r["loss"], r["impl"]) for r in rows] == [
        (loss, impl) for loss in ("sigmoid", "softmax") for impl in ("ours", "ours ids", "roofline")
    ]
    for ours, ids in zip(rows[0::3], rows[1::3], strict=True):
        assert (ids["positives_per_row"], ours["positives_per_row"]) == (2, None)
        assert ids["timed_in"] == ours["timed_in"] == "interleaved"
        assert len(ids["times_s"]) == len(ours["times_s"]) == 2
        assert ids["vs_plain"]["time"] == pytest.approx(ids["median_s"] / ours["median_s"])
        assert ids["memory"]["impl"] == "ours ids"  # probed in its own process
        assert ids["tracemalloc_peak_mib"] > 0
        assert ids["vs_plain"]["tracemalloc"] == pytest.approx(
            ids["tracemalloc_peak_mib"] / ours["tracemalloc_peak_mib"]
        )
    text = capsys.readouterr().out
    assert "several positives per row: ours ids against ours" in text
    table = text.split("several positives per row: ours ids against ours")[1]
    assert "time ids/plain" in table
    assert "peak ids/plain" in table
    body = [line.split() for line in table.splitlines() if line.startswith("numpy ")]
    assert [(row[1], row[3], row[4]) for row in body] == [
        ("sigmoid", "40", "2"),
        ("softmax", "40", "2"),
    ]
    assert all(float(row[7]) > 0 for row in body)


def test_ids_rows_go_with_ours_even_when_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sweep, "LONG_CASE_S", 0.0)  # every case is long
    out = tmp_path / "bench.json"
    argv = ["--backends", "numpy", "--losses", "sigmoid", "--sizes", "40", "--dim", "8"]
    options = ["--repeats", "1", "--no-dense", "--no-memory", "--positives-per-row", "3"]
    assert main(parse([*argv, *options, "--json", str(out)])) == 0
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["ours"]["timed_in"] == rows["ours ids"]["timed_in"] == "interleaved"
    assert rows["roofline"]["timed_in"] == "once"
    assert rows["ours ids"]["vs_plain"]["peak"] is None  # not probed


def test_ids_are_groups_of_duplicated_pairs() -> None:
    np = pytest.importorskip("numpy")
    ids = sweep.group_ids("numpy", 7, 3)
    assert ids.tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert ids.dtype == np.int64


@pytest.mark.parametrize("mode", ["--profile", "--frameworks", "--distributed"])
def test_positives_per_row_is_for_the_sweep(mode: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(parse([mode, "--positives-per-row", "2"])) == 2
    assert "`--positives-per-row` adds a row to the sweep" in capsys.readouterr().err


def test_bad_positives_per_row_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse(["--positives-per-row", "0"])
    assert exit_info.value.code == 2
    args = parse(["--sizes", "8", "--dim", "4"])
    args.positives_per_row = 0
    assert main(args) == 2
    assert "`--positives-per-row` must be a positive integer" in capsys.readouterr().err


# --------------------------------------------------------------------------- --compare-precision


def test_compare_precision_runs_both_options_side_by_side(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("ml_dtypes")  # numpy's bfloat16
    np = pytest.importorskip("numpy")
    out = tmp_path / "precision.json"
    argv = ["--compare-precision", "--backends", "numpy,torch", "--sizes", "48", "--dim", "8"]
    assert main(parse([*argv, "--repeats", "2", "--block-size", "16", "--json", str(out)])) == 0
    printed = capsys.readouterr().out
    assert "exact/fast" in printed
    report = json.loads(out.read_text())
    assert report["errors"] == []
    assert report["config"]["dtypes"] == ["bfloat16"]
    rows = report["rows"]
    assert [(r["backend"], r["loss"], r["precision"]) for r in rows] == [
        (backend, loss, precision)
        for backend in ("numpy", "torch")
        for loss in ("sigmoid", "softmax")
        for precision in ("fast", "exact")
    ]
    for fast, exact in zip(rows[::2], rows[1::2], strict=True):
        for row in (fast, exact):
            assert (row["dtype"], row["n"], row["d"]) == ("bfloat16", 48, 8)
            assert row["skipped"] is None
            assert row["error"] is None
            assert len(row["times_s"]) == 2
            assert row["median_s"] > 0
            assert row["exact_over_fast"] == pytest.approx(exact["median_s"] / fast["median_s"])
        # exact computes the rounded inputs in float32; fast rounds its gradient GEMMs'
        # operands to bfloat16. Both return bfloat16 gradients (2^-9 relative rounding).
        assert exact["loss_rel_error"] < 1e-5
        assert fast["loss_rel_error"] < 2e-3
        for row in (fast, exact):
            assert 0 < row["grad_rel_error"] < 2e-2
    # The errors are measured against an independent float64 evaluation of the same inputs.
    from portable_siglip.bench import common, precision

    img, txt = precision.half_inputs(
        "numpy", *common.make_inputs("numpy", 48, 8, "float32", 0), "bfloat16"
    )
    import portable_siglip as ps

    value, _ = ps.sigmoid_loss_and_grad(img, txt, 10.0, -10.0, block_size=16, precision="exact")
    img64, txt64 = np.asarray(img, dtype=np.float64), np.asarray(txt, dtype=np.float64)
    logits = 10.0 * img64 @ txt64.T - 10.0
    labels = 2 * np.eye(48) - 1
    golden = float(np.logaddexp(0, -labels * logits).sum() / 48)
    assert rows[1]["loss_rel_error"] == pytest.approx(
        abs(float(value) - golden) / golden, abs=1e-12
    )


def test_compare_precision_takes_half_dtypes_only(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(parse(["--compare-precision", "--dtype", "float32"])) == 2
    assert "`--compare-precision` compares half-precision inputs" in capsys.readouterr().err
    assert main(parse(["--compare-precision", "--profile"])) == 2
    assert "`--profile` and `--compare-precision` exclude each other" in capsys.readouterr().err


def test_compare_precision_rounds_alike_in_numpy_and_torch() -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("ml_dtypes")
    np = pytest.importorskip("numpy")
    from portable_siglip.bench import common, precision

    base = common.make_inputs("numpy", 64, 16, "float32", 3)
    for dtype in ("bfloat16", "float16"):
        (a, _), (b, _) = (precision.half_inputs(k, *base, dtype) for k in ("numpy", "torch"))
        assert str(a.dtype) == dtype
        assert b.dtype == getattr(torch, dtype)
        np.testing.assert_array_equal(a.astype(np.float32), b.float().numpy())
