"""``python -m portable_siglip bench --device cuda``: the usage errors without a GPU, the whole
machinery on the CPU (rows, precision, memory readings, skips, the time plan and budget, the
JSON written case by case, cupy's bfloat16 replayed with numpy + ml_dtypes), the device-memory
helper of ``portable_siglip._memory`` with fake libraries, and the real run on a GPU."""

from __future__ import annotations

import argparse
import doctest
import importlib.machinery
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from portable_siglip import _memory
from portable_siglip.bench import common, gpu
from portable_siglip.bench.baselines import dense_loss, open_clip_info
from portable_siglip.cli import _bench as cli
from portable_siglip.cli import _commands as _cli
from portable_siglip.cli._devices import Device

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent
HAS_CUDA = torch.cuda.is_available()
SMALL = gpu.GpuConfig(
    sizes=(48,), dims=(8,), dtypes=("bfloat16", "float32"), repeats=2, compiled=False
)

ROW_KEYS = {
    "device",
    "loss",
    "n",
    "d",
    "dtype",
    "impl",
    "step",
    "precision",
    "block_size",
    "input_dtype",
    "compute_dtype",
    "warmup_s",
    "times_s",
    "median_s",
    "gflops",
    "floor_fraction",
    "peak_bytes",
    "peak_mib",
    "memory_source",
    "predicted_bytes",
    "predicted_s",
    "loss_value",
    "skipped",
    "error",
}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def bench_subprocess(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "portable_siglip", "bench", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


def expected_impls(dtype: str, dense: bool = True, compiled: bool = False) -> list[str]:
    """The main-step rows of a case, in order: every row is there, skipped or not."""
    impls = ["ours torch", *(["ours torch exact"] if dtype == "bfloat16" else [])]
    impls += ["ours cupy", "GEMM floor"]
    if dense:
        impls += [*(["compiled dense"] if compiled else []), "dense autograd", "open_clip"]
    return impls


# --------------------------------------------------------------------------- usage errors


@pytest.mark.skipif(HAS_CUDA, reason="a GPU is here: --device cuda is no usage error")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:7"])
def test_cuda_without_a_gpu_is_a_usage_error(device: str) -> None:
    done = bench_subprocess("--device", device, "--sizes", "64")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stdout == ""  # before any work: no header, no progress
    assert done.stderr.startswith("bench: error: ")
    assert f"--device {device} needs a CUDA GPU, and none was found" in done.stderr


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="there is a GPU 7")
def test_a_gpu_that_is_not_there_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(parse(["--device", "cuda:7", "--sizes", "64"])) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "cuda:7" in captured.err
    assert "needs a CUDA GPU" in captured.err or "does not exist" in captured.err


@pytest.mark.parametrize("text", ["gpu", "cuda:x", "cuda0"])
def test_a_device_string_that_is_no_device_is_a_usage_error(text: str) -> None:
    done = bench_subprocess("--device", text)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "invalid choice" not in done.stderr
    assert f"bench: error: `--device`: expected cpu, cuda or cuda:N, got {text!r}" in done.stderr


@pytest.mark.parametrize(
    "mode", ["--profile", "--frameworks", "--distributed", "--reference", "--compare-precision"]
)
def test_cuda_excludes_the_cpu_modes(mode: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(parse(["--device", "cuda", mode])) == 2
    err = capsys.readouterr().err
    assert "runs the GPU benchmark" in err
    assert mode in err


@pytest.mark.parametrize(
    ("dtype", "message"),
    [
        ("bfloat16", "is for the GPU benchmark (--device cuda) and --compare-precision only"),
        ("float16", "is for the GPU benchmark (--device cuda) and --compare-precision only"),
        ("float32,float64", "takes one dtype"),
    ],
)
def test_cpu_benchmarks_take_one_cpu_dtype(
    dtype: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(parse(["--dtype", dtype, "--sizes", "8", "--dim", "4"])) == 2
    assert message in capsys.readouterr().err


def test_help_shows_device_with_its_default() -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert "--device {cpu,cuda,cuda:N}" in text
    assert "default: cpu" in text
    assert "bfloat16 is for the GPU benchmark and --compare-precision only" in text
    assert "--time-budget SECONDS" in text
    assert "--no-compile" in text


def test_gpu_defaults_and_cpu_defaults() -> None:
    gpu_args = cli._resolve_dims(parse(["--device", "cuda:0"]))
    assert gpu_args.sizes == [8192, 16384, 32768, 65536]
    assert gpu_args.dims == [768]
    assert gpu_args.dtype == ["bfloat16", "float32"]
    assert gpu_args.repeats is None  # by size: gpu.REPEATS_BY_SIZE
    assert gpu_args.time_budget == 170.0
    custom = cli._resolve_dims(
        parse(["--device", "cuda", "--dim", "64", "--dtype", "float32", "--time-budget", "0"])
    )
    assert (custom.dims, custom.dtype, custom.time_budget) == ([64], ["float32"], 0.0)
    assert gpu.config_from_args(custom).time_budget_s is None  # 0: no limit
    cpu_args = cli._resolve_dims(parse([]))
    assert (cpu_args.dtype, cpu_args.repeats) == ("float32", 3)
    assert cli._resolve_dims(parse(["--dtype", "float64"])).dtype == "float64"
    config = gpu.config_from_args(gpu_args)
    assert config.sizes == (8192, 16384, 32768, 65536)
    assert config.dtypes == ("bfloat16", "float32")
    assert (config.time_budget_s, config.compiled, config.dense) == (170.0, True, True)
    assert [config.repeats_for(n) for n in config.sizes] == [5, 5, 3, 2]
    no_compile = gpu.config_from_args(
        cli._resolve_dims(parse(["--device", "cuda", "--no-compile", "--repeats", "4"]))
    )
    assert (no_compile.compiled, no_compile.repeats_for(65536)) == (False, 4)


# --------------------------------------------------------------------------- the machinery on cpu


def rows_by(report: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {(r["dtype"], r["loss"], r["impl"]): r for r in report["rows"]}


def test_cpu_dry_run_gives_every_row_of_every_case(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    report = gpu.run_benchmark(SMALL, "cpu", progress_stream=sys.stderr, json_path=out)
    assert set(report) == {
        "complete",
        "machine",
        "config",
        "plan",
        "rows",
        "notes",
        "errors",
        "baseline_failures",
    }
    assert report["complete"] is True
    assert report["errors"] == []
    assert report["baseline_failures"] == []
    assert report["machine"]["gpu"] is None
    assert report["config"]["device"] == "cpu"
    assert report["config"]["default_block_size"] == 1024
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    order = [(r["dtype"], r["loss"], r["impl"]) for r in report["rows"]]
    main_rows = [
        (dtype, loss, impl)
        for dtype in ("bfloat16", "float32")
        for loss in ("sigmoid", "softmax")
        for impl in expected_impls(dtype)
    ]
    # siglip-kernel has its own step, after every other row: bfloat16 sigmoid only.
    assert order == [*main_rows, ("bfloat16", "sigmoid", "siglip-kernel")]
    skipped = {
        "ours cupy": "cupy arrays need a CUDA device",
        "siglip-kernel": (
            "siglip-kernel needs a CUDA device (Triton)",
            f"siglip-kernel {gpu.siglip_kernel_status()[1]}",
        ),
    }
    if not open_clip_info()["installed"]:
        skipped["open_clip"] = "open-clip-torch is not installed"
    for row in report["rows"]:
        assert set(row) == ROW_KEYS
        assert (row["n"], row["d"], row["device"]) == (48, 8, "cpu")
        assert row["error"] is None
        if row["impl"] in skipped:
            reason = skipped[row["impl"]]
            assert row["skipped"] in (reason if isinstance(reason, tuple) else (reason,))
            assert row["median_s"] is None
            continue
        assert row["skipped"] is None
        assert len(row["times_s"]) == 2
        assert row["median_s"] > 0
        assert row["warmup_s"] > 0
        floor_gemms = 3 if row["loss"] == "sigmoid" else 4
        assert row["gflops"] == pytest.approx(floor_gemms * 2 * 48 * 48 * 8 / row["median_s"] / 1e9)
        assert row["floor_fraction"] > 0
        # The cpu fallback of the memory reading, or none where /proc has no VmHWM.
        assert row["memory_source"] in (gpu.MEMORY_RSS_FALLBACK, None)
        assert (row["peak_bytes"] is None) == (row["memory_source"] is None)
        if row["peak_bytes"] is not None:
            assert row["peak_bytes"] >= 0
            assert row["peak_mib"] == row["peak_bytes"] / 2**20
    rows = rows_by(report)
    assert any("no `ours cupy` rows" in note for note in report["notes"])
    for loss in ("sigmoid", "softmax"):
        fast, exact = (
            rows[("bfloat16", loss, "ours torch")],
            rows[("bfloat16", loss, "ours torch exact")],
        )
        assert (fast["precision"], exact["precision"]) == ("fast", "exact")
        assert fast["compute_dtype"] == "bfloat16 GEMMs accumulating in float32, float32 sums"
        assert exact["compute_dtype"] == "float32"
        assert fast["input_dtype"] == exact["input_dtype"] == "bfloat16 (torch)"
        assert rows[("bfloat16", loss, "ours cupy")]["precision"] == "fast"
        single = rows[("float32", loss, "ours torch")]
        assert (single["precision"], single["compute_dtype"]) == (None, "float32")
        assert ("float32", loss, "ours torch exact") not in rows  # float32 ignores the option
        for dtype in ("bfloat16", "float32"):
            assert rows[(dtype, loss, "ours torch")]["block_size"] == 1024
            assert rows[(dtype, loss, "GEMM floor")]["floor_fraction"] == 1.0
            assert rows[(dtype, loss, "GEMM floor")]["loss_value"] is None
            dense = rows[(dtype, loss, "dense autograd")]
            assert dense["compute_dtype"] == dtype
            assert dense["predicted_bytes"] >= 5.5 * 48 * 48 * (2 if dtype == "bfloat16" else 4)
    # Every loss value against an independent float64 evaluation of the same rounded inputs:
    # float32 and precision="exact" compute in float32; "fast" and the dense bfloat16 rows
    # within the bfloat16 class.
    from portable_siglip._reference import dense_loss_and_grad

    tolerances = {"ours torch": 1e-5, "ours torch exact": 1e-5, "dense autograd": 1e-5}
    half = {"ours torch": 2e-3, "ours torch exact": 1e-5, "dense autograd": 3e-2}
    for dtype in ("float32", "bfloat16"):
        img, txt = gpu.make_inputs(48, 8, dtype, 0, "cpu")
        for loss in ("sigmoid", "softmax"):
            golden = dense_loss_and_grad(loss, img.double().numpy(), txt.double().numpy(), 10, -10)
            for impl, tolerance in (half if dtype == "bfloat16" else tolerances).items():
                if (dtype, loss, impl) in rows:
                    value = rows[(dtype, loss, impl)]["loss_value"]
                    assert math.isclose(value, golden[0], rel_tol=tolerance), (dtype, loss, impl)


def test_rows_predicted_above_the_free_memory_are_skipped_with_the_prediction(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "gpu.json"
    argv = ["--sizes", "40", "--dim", "8", "--repeats", "1", "--dtype", "float32"]
    argv += ["--losses", "sigmoid", "--no-compile"]
    args = cli._resolve_dims(parse([*argv, "--json", str(out), "--device", "cuda"]))
    args.device = "cpu"  # what the cli would hand over is a GPU; the machinery takes any
    assert gpu.main(args, memory_budget_bytes=1024) == 0
    printed = capsys.readouterr().out
    assert "skipped: predicted" in printed
    assert "floor frac" in printed
    assert "float32 sigmoid d=8 n=40 ours torch: " in printed  # the line of a measured row
    report = json.loads(out.read_text())
    assert report["complete"] is True
    assert report["config"]["memory_budget_bytes"] == 1024
    assert report["config"]["dtypes"] == ["float32"]
    assert report["config"]["time_budget_s"] == 170.0
    for row in report["rows"]:
        if row["impl"] in ("dense autograd", "open_clip") and row["skipped"] != (
            "open-clip-torch is not installed"
        ):
            assert row["skipped"].startswith("predicted ")
            assert "> 0.000977 MiB free on cpu" in row["skipped"]
            assert row["predicted_bytes"] > 1024
            assert row["median_s"] is None
        elif row["impl"] in ("ours torch", "GEMM floor"):
            assert row["skipped"] is None
            assert row["median_s"] > 0
    assert any("peak MiB" in note for note in report["notes"])


def test_out_of_memory_is_a_skip_our_errors_fail_and_baseline_errors_are_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def out_of_memory(loss: str, img: object, txt: object) -> object:
        def run() -> None:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

        return run

    def broken(*args: object) -> object:
        def run() -> None:
            raise RuntimeError("no kernel image is available")

        return run

    monkeypatch.setattr(gpu, "_dense", out_of_memory)
    monkeypatch.setattr(gpu, "_floor", broken)
    monkeypatch.setattr(gpu, "_open_clip", broken)
    monkeypatch.setattr(
        "portable_siglip.bench.baselines.open_clip_info",
        lambda: {"installed": True, "version": "0"},
    )
    config = gpu.GpuConfig(
        sizes=(32,), dims=(4,), dtypes=("float32",), losses=("sigmoid",), repeats=1, compiled=False
    )
    report = gpu.run_benchmark(config, "cpu")
    rows = rows_by(report)
    dense = rows[("float32", "sigmoid", "dense autograd")]
    assert dense["skipped"] == (
        "out of memory in the warm-up: OutOfMemoryError: CUDA out of memory. "
        "Tried to allocate 64.00 GiB"
    )
    assert dense["error"] is None
    floor = rows[("float32", "sigmoid", "GEMM floor")]
    assert floor["error"] == "warm-up: RuntimeError: no kernel image is available"
    # A failure of the floor (or of ours) counts; a failed baseline is reported apart.
    assert report["errors"] == [
        "float32 sigmoid d=4 n=32 GEMM floor: warm-up: RuntimeError: no kernel image is available"
    ]
    assert report["baseline_failures"] == [
        "float32 sigmoid d=4 n=32 open_clip: warm-up: RuntimeError: no kernel image is available"
    ]
    ours = rows[("float32", "sigmoid", "ours torch")]
    assert ours["median_s"] > 0
    assert ours["floor_fraction"] is None  # no floor to compare with
    assert "error (see below)" in gpu.table(report["rows"])


def test_the_n2_prediction_scales_a_measured_peak() -> None:
    bench = gpu._Bench(SMALL, gpu._Device("cpu"), None, {}, None)
    case = gpu.Case(8, "float32", 1000, "sigmoid")
    floor = 5.5 * 1000 * 1000 * 4
    assert bench.predict_bytes(case, "dense autograd") == floor
    assert bench.predict_bytes(case, "compiled dense") == 2.0 * 1000 * 1000 * 4
    bench.peaks[(8, "float32", "sigmoid", "dense autograd")] = (500, int(floor))
    assert bench.predict_bytes(case, "dense autograd") == 4 * floor


def test_the_compiled_row_compiles_once_per_loss_and_matches_dense(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compiled: list[tuple[str, bool]] = []
    real = gpu.compile_dense

    def spy(loss: str, on_gpu: bool) -> Any:
        compiled.append((loss, on_gpu))
        return real(loss, on_gpu)  # on the host: torch.compile(backend="eager")

    monkeypatch.setattr(gpu, "compile_dense", spy)
    config = gpu.GpuConfig(
        sizes=(24, 32), dims=(4,), dtypes=("float32",), losses=("sigmoid",), repeats=1
    )
    report = gpu.run_benchmark(config, "cpu")
    assert compiled == [("sigmoid", False)]  # dynamic shapes: one compilation for both n
    assert report["errors"] == []
    assert report["baseline_failures"] == []
    for n in (24, 32):
        by = {r["impl"]: r for r in report["rows"] if r["n"] == n}
        row = by["compiled dense"]
        assert row["skipped"] is None
        assert row["warmup_s"] > 0
        assert row["predicted_bytes"] == 2.0 * n * n * 4
        assert row["loss_value"] == pytest.approx(by["dense autograd"]["loss_value"], rel=1e-6)


# --------------------------------------------------------------------------- the time plan


def test_the_plan_of_the_default_run_fits_its_budget() -> None:
    config = gpu.GpuConfig()
    steps = gpu.plan(config)
    labels = [label for label, _ in steps]
    assert labels[0] == "start-up"
    cases = [
        f"{t} {loss} d=768 n={n}"
        for t in ("bfloat16", "float32")
        for n in (8192, 16384, 32768, 65536)
        for loss in ("sigmoid", "softmax")
    ]
    kernel = [f"siglip-kernel bfloat16 sigmoid d=768 n={n}" for n in (65536, 32768, 16384, 8192)]
    assert labels == ["start-up", *cases, *kernel]
    seconds = dict(steps)
    # One call of the floor at n = 65536, bfloat16, sigmoid: 3 GEMMs of 2 n^2 d flops at the
    # assumed 600 TFLOP/s.
    floor = 3 * 2 * 65536**2 * 768 / 6.0e14
    case = gpu.Case(768, "bfloat16", 65536, "sigmoid")
    assert gpu.predict_row_seconds("GEMM floor", case) == pytest.approx(floor)
    assert gpu.predict_row_seconds("GEMM floor", case._replace(loss="softmax")) == pytest.approx(
        floor * 4 / 3
    )
    # float32 and the exact row run at the float32 rate, twelve times slower.
    exact = gpu.predict_row_seconds("ours torch exact", case)
    assert exact == pytest.approx(floor * 12 + 65536**2 * 24 / 2.5e12)
    # The main step fits the budget with room for the largest siglip-kernel row, which runs
    # first in its step; the smaller ones may be skipped by the budget.
    main = sum(s for label, s in steps if not label.startswith("siglip-kernel"))
    assert main + seconds[kernel[0]] <= gpu.DEFAULT_TIME_BUDGET_S
    assert 60 < main < 140
    # Dense and open_clip at float32, n = 65536: 5.5 x 16 GiB > 78 GiB, not counted.
    f32 = gpu.Case(768, "float32", 65536, "sigmoid")
    only_dense = dict(gpu.plan(config, impls=("dense autograd",)))
    assert only_dense[gpu._label(f32)] == 0.0
    assert only_dense[gpu._label(case)] == pytest.approx(
        4 * gpu.predict_row_seconds("dense autograd", case)  # 2 + 2 rounds at n = 65536
    )
    # Compilation: 20 s for the first (loss, dtype), 10 for each of the other three.
    with_compile = dict(gpu.plan(config, impls=("compiled dense",)))
    without = {c: 0.0 for c in cases}
    for label in cases:
        n = int(label.rsplit("=", 1)[1])
        dtype, loss = label.split()[:2]
        calls = 2 + config.repeats_for(n)
        without[label] = calls * gpu.predict_row_seconds(
            "compiled dense", gpu.Case(768, dtype, n, loss)
        )
    extra = sum(with_compile[c] - without[c] for c in cases)
    assert extra == pytest.approx(20 + 3 * 10)


def test_the_time_budget_skips_what_would_pass_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real = gpu.predict_row_seconds

    def predict(impl: str, case: gpu.Case, rates: gpu.Rates = gpu.H100) -> float:
        return 1000.0 if case.n == 32 else real(impl, case, rates)

    monkeypatch.setattr(gpu, "predict_row_seconds", predict)
    config = gpu.GpuConfig(
        sizes=(16, 32),
        dims=(4,),
        dtypes=("float32",),
        losses=("sigmoid",),
        repeats=1,
        dense=False,
        time_budget_s=100.0,
    )
    report = gpu.run_benchmark(config, "cpu")
    assert report["errors"] == []
    ran = [r for r in report["rows"] if r["n"] == 16 and r["impl"] in ("ours torch", "GEMM floor")]
    assert [r["median_s"] > 0 for r in ran] == [True, True]
    for row in (r for r in report["rows"] if r["n"] == 32):
        if row["impl"] == "ours cupy":
            assert row["skipped"] == "cupy arrays need a CUDA device"  # its own reason first
        else:
            assert row["skipped"].startswith("time budget: ~"), row
            assert "would pass --time-budget 100 s" in row["skipped"]
            assert row["median_s"] is None


def test_the_budget_keeps_room_for_the_largest_siglip_kernel_row() -> None:
    pace = gpu._Pace(100.0)
    assert pace.refusal(50.0) is None
    assert pace.refusal(50.0, reserve=45.0) is None
    refusal = pace.refusal(50.0, reserve=60.0)
    assert refusal is not None
    assert "keeping 60 s for siglip-kernel" in refusal
    assert gpu._Pace(None).refusal(1e9) is None  # no budget
    pace.done(10.0, 30.0)  # three times slower than predicted: later predictions follow
    assert pace.factor() == 3.0
    assert pace.refusal(40.0) is not None  # 120 s expected
    assert pace.refusal(30.0) is None  # 90 s expected


# --------------------------------------------------------------------------- the JSON, case by case


def test_the_json_is_rewritten_after_every_case(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    snapshots: list[tuple[bool, int]] = []
    real = gpu.write_json_atomic

    def spy(path: Any, report: dict[str, Any]) -> None:
        snapshots.append((report["complete"], len(report["rows"])))
        real(path, report)

    monkeypatch.setattr(gpu, "write_json_atomic", spy)
    out = tmp_path / "gpu.json"
    config = gpu.GpuConfig(
        sizes=(16, 24), dims=(4,), dtypes=("bfloat16",), losses=("sigmoid",), repeats=1, dense=False
    )
    report = gpu.run_benchmark(config, "cpu", json_path=out)
    # rows per case: ours torch, ours torch exact, ours cupy, GEMM floor; then siglip-kernel
    assert snapshots == [(False, 4), (False, 8), (False, 9), (False, 10), (True, 10)]
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(report["rows"]))
    assert [p.name for p in tmp_path.iterdir()] == ["gpu.json"]  # no temporary file left


def test_a_run_cut_short_leaves_the_rows_it_measured(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real = gpu.make_inputs

    def make_inputs(n: int, *args: Any) -> Any:
        if n == 24:
            raise KeyboardInterrupt  # the GPU check's timeout, say
        return real(n, *args)

    monkeypatch.setattr(gpu, "make_inputs", make_inputs)
    out = tmp_path / "gpu.json"
    config = gpu.GpuConfig(
        sizes=(16, 24), dims=(4,), dtypes=("float32",), losses=("sigmoid",), repeats=1, dense=False
    )
    with pytest.raises(KeyboardInterrupt):
        gpu.run_benchmark(config, "cpu", json_path=out)
    report = json.loads(out.read_text())
    assert report["complete"] is False
    assert {(r["n"], r["impl"]) for r in report["rows"]} == {
        (16, "ours torch"),
        (16, "ours cupy"),
        (16, "GEMM floor"),
    }
    assert all(r["median_s"] > 0 for r in report["rows"] if r["impl"] != "ours cupy")


def test_write_json_atomic_replaces_the_file_whole_or_not_at_all(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    common.write_json_atomic(out, {"a": 1})
    assert json.loads(out.read_text()) == {"a": 1}
    with pytest.raises(TypeError):
        common.write_json_atomic(out, {"a": object()})  # not serialisable: old file kept
    assert json.loads(out.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


# --------------------------------------------------------------------------- cupy's bfloat16


def test_bfloat16_travels_to_numpy_as_ml_dtypes_without_a_copy() -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    np = pytest.importorskip("numpy")
    tensor = torch.tensor([[1.5, -2.0], [0.25, 3.0]], dtype=torch.bfloat16)
    array = gpu.from_torch(np, tensor)  # numpy's DLPack refuses bfloat16: the int16 route
    assert array.dtype == ml_dtypes.bfloat16
    assert array.astype(np.float32).tolist() == [[1.5, -2.0], [0.25, 3.0]]
    tensor[0, 0] = 7.0
    assert float(array[0, 0]) == 7.0  # the same memory
    assert gpu.from_torch(np, torch.ones(2)).dtype == np.float32


def test_bfloat16_without_ml_dtypes_is_a_skip_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    np = pytest.importorskip("numpy")
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # import fails
    with pytest.raises(gpu.Skip, match="numpy has no bfloat16 here: ml_dtypes is not installed"):
        gpu.from_torch(np, torch.ones(2, dtype=torch.bfloat16))


def fake_cupy(np: ModuleType, calls: list[str]) -> ModuleType:
    """numpy dressed as cupy 14 with ml_dtypes: from_dlpack refuses nothing it can read."""

    class Device:
        def __init__(self, index: int) -> None:
            self.index = index

        def __enter__(self) -> Device:
            calls.append(f"enter {self.index}")
            return self

        def __exit__(self, *exc: object) -> None:
            calls.append(f"exit {self.index}")

        def synchronize(self) -> None:
            calls.append("synchronize")

    module = ModuleType("cupy")
    module.ndarray = type("ndarray", (), {})  # type: ignore[attr-defined]  # not numpy's
    module.from_dlpack = np.from_dlpack  # type: ignore[attr-defined]
    module.cuda = ModuleType("cupy.cuda")  # type: ignore[attr-defined]
    module.cuda.Device = Device  # type: ignore[attr-defined]
    return module


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_the_cupy_row_takes_bfloat16_on_purpose_replayed_with_numpy(
    loss: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cupy 14 + ml_dtypes hands the loss ml_dtypes bfloat16 arrays: the row takes them."""
    pytest.importorskip("ml_dtypes")
    np = pytest.importorskip("numpy")
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(np, calls))
    img, txt = gpu.make_inputs(40, 8, "bfloat16", 0, "cpu")
    run, input_dtype = gpu._ours_cupy(loss, img, txt, 16, "fast", 3)
    assert input_dtype == "bfloat16 (numpy)"  # on a GPU: "bfloat16 (cupy)"
    value = float(np.asarray(run(), dtype=np.float64))
    assert calls[:2] == ["enter 3", "exit 3"]  # arrays made on the row's device, ...
    assert calls[-2:] == ["enter 3", "exit 3"]  # ... and the call made there
    from portable_siglip._reference import dense_loss_and_grad

    golden = dense_loss_and_grad(loss, img.double().numpy(), txt.double().numpy(), 10.0, -10.0)
    assert math.isclose(value, golden[0], rel_tol=1e-4)
    torch_value = float(gpu._ours(loss, img, txt, 16, "fast")())
    assert math.isclose(value, torch_value, rel_tol=1e-5)


# --------------------------------------------------------------------------- device memory


def test_the_gpu_rows_read_memory_through_the_helper(monkeypatch: pytest.MonkeyPatch) -> None:
    readings: list[tuple[str, int | None]] = []

    def reset(backend: str, index: int | None = None) -> _memory.DevicePeak:
        readings.append((backend, index))
        return _memory.DevicePeak(backend, index or 0, 5)

    monkeypatch.setattr(_memory, "reset_device_peak", reset)
    monkeypatch.setattr(_memory, "device_peak_bytes", lambda start: (42, start.backend))
    device = gpu._Device("cpu")
    device.is_cuda, device.index = True, 2
    monkeypatch.setattr(device, "sync", lambda: None)
    assert device.measure("ours cupy", lambda: None) == (42, "cupy")
    assert device.measure("ours torch", lambda: None) == (42, "torch")
    assert device.measure("dense autograd", lambda: None) == (42, "torch")
    assert readings == [("cupy", 2), ("torch", 2), ("torch", 2)]


class FakePool:
    """cupy's default memory pool: blocks in use, and blocks cached for reuse."""

    def __init__(self, used: int, cached: int) -> None:
        self.used, self.cached, self.freed = used, cached, 0

    def free_all_blocks(self) -> None:
        self.freed += 1
        self.cached = 0

    def total_bytes(self) -> int:
        return self.used + self.cached

    def used_bytes(self) -> int:
        return self.used


def test_cupy_peak_frees_the_pool_first(monkeypatch: pytest.MonkeyPatch) -> None:
    np = pytest.importorskip("numpy")
    calls: list[str] = []
    cupy = fake_cupy(np, calls)
    pool = FakePool(used=40, cached=100)
    cupy.get_default_memory_pool = lambda: pool  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    start = _memory.reset_device_peak("cupy", 1)
    assert pool.freed == 1
    assert start == _memory.DevicePeak("cupy", 1, 40)
    # The call needs 130 bytes at its peak and gives them back to the pool: a pool that kept
    # its 100 cached bytes would have grown by 30 only.
    pool.cached = 130
    peak, source = _memory.device_peak_bytes(start)
    assert peak == 130
    assert source == _memory.DEVICE_PEAK_SOURCES["cupy"]
    assert "free_all_blocks()" in source
    assert calls == ["enter 1", "synchronize", "exit 1", "enter 1", "synchronize", "exit 1"]
    # run's reading is the same helper
    pool.cached = 0
    on_gpu = _cli._DeviceMemory("cupy", Device("cuda", 1))
    pool.cached = 7
    assert on_gpu.peak() == (7, source)


def test_torch_peak_resets_the_allocator_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, Any]] = []
    state = {"allocated": 100, "max": 900}

    def reset(index: Any) -> None:
        calls.append(("reset", index))
        state["max"] = state["allocated"]

    monkeypatch.setattr(torch.cuda, "synchronize", lambda index=None: calls.append(("sync", index)))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda index=None: state["max"])
    start = _memory.reset_device_peak("torch", None)
    assert start == _memory.DevicePeak("torch", 0, 100)
    state["max"] = 350
    assert _memory.device_peak_bytes(start) == (250, _memory.DEVICE_PEAK_SOURCES["torch"])
    assert calls == [("sync", 0), ("reset", 0), ("sync", 0)]


def test_jax_peak_reads_the_device_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    stats: dict[str, int] = {"bytes_in_use": 10, "peak_bytes_in_use": 60}

    class FakeDevice:
        def __init__(self, reports: bool) -> None:
            self.reports = reports

        def memory_stats(self) -> dict[str, int] | None:
            return dict(stats) if self.reports else None

    jax = ModuleType("jax")
    jax.devices = lambda: [FakeDevice(False), FakeDevice(True)]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "jax", jax)
    start = _memory.reset_device_peak("jax", 1)
    assert start.before == 10
    stats.update(bytes_in_use=12, peak_bytes_in_use=110)
    assert _memory.device_peak_bytes(start) == (100, _memory.DEVICE_PEAK_SOURCES["jax"])
    silent = _memory.reset_device_peak("jax", 0)  # jax's CPU reports no statistics
    assert _memory.device_peak_bytes(silent) == (
        None,
        "not measured: this jax device reports no memory statistics",
    )


def test_the_memory_helper_names_an_unknown_backend() -> None:
    with pytest.raises(ValueError, match="`backend` must be one of torch, cupy, jax; got 'numpy'"):
        _memory.reset_device_peak("numpy")


def test_importing_the_memory_helper_imports_no_framework() -> None:
    code = (
        "import sys, portable_siglip._memory as m; "
        "print(sorted(x for x in ('torch', 'cupy', 'jax', 'numpy') if x in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert done.stdout.strip() == "[]"


# --------------------------------------------------------------------------- siglip-kernel


def fake_siglip_kernel(monkeypatch: pytest.MonkeyPatch, function: object | None) -> None:
    module = ModuleType("siglip_kernel")
    module.__spec__ = importlib.machinery.ModuleSpec("siglip_kernel", None)
    if function is not None:
        module.fused_siglip_loss = function  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "siglip_kernel", module)


def test_siglip_kernel_is_found_or_said_to_be_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    if "siglip_kernel" not in sys.modules and gpu.installed("siglip_kernel") is False:
        assert gpu.siglip_kernel_status() == (None, "not installed")
    fake_siglip_kernel(monkeypatch, None)
    function, status = gpu.siglip_kernel_status()
    assert function is None
    assert status == "installed but unsupported API: no siglip_kernel.fused_siglip_loss"
    fake_siglip_kernel(monkeypatch, lambda img, txt: None)
    function, status = gpu.siglip_kernel_status()
    assert function is None
    assert status.startswith("installed but unsupported API: fused_siglip_loss(img, txt)")


def test_siglip_kernel_row_calls_its_documented_api(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fused_siglip_loss(img: Any, txt: Any, log_temp: Any, bias: Any, backend: Any = None) -> Any:
        calls.append((img.requires_grad, float(log_temp.detach().exp()), float(bias.detach())))
        return dense_loss("sigmoid", img, txt, log_temp.exp(), bias)

    fake_siglip_kernel(monkeypatch, fused_siglip_loss)
    function, status = gpu.siglip_kernel_status()
    assert function is fused_siglip_loss
    assert status == "unknown version"
    img, txt = gpu.make_inputs(16, 4, "float32", 0, "cpu")
    value = gpu._siglip_kernel(function, img, txt)()
    assert calls == [(True, pytest.approx(10.0, rel=1e-6), -10.0)]
    expected = dense_loss("sigmoid", img, txt, torch.tensor(10.0), torch.tensor(-10.0))
    assert float(value) == pytest.approx(float(expected), rel=1e-5)
    assert not img.requires_grad  # the inputs stay free of autograd


def test_siglip_kernel_runs_last_largest_first_against_the_earlier_floor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fused_siglip_loss(img: Any, txt: Any, log_temp: Any, bias: Any) -> Any:
        return dense_loss("sigmoid", img, txt, log_temp.exp(), bias)

    fake_siglip_kernel(monkeypatch, fused_siglip_loss)
    config = gpu.GpuConfig(
        sizes=(16, 24), dims=(4,), dtypes=("bfloat16",), losses=("sigmoid",), repeats=1, dense=False
    )
    report = gpu.run_benchmark(config, "cpu")
    kernel = [r for r in report["rows"] if r["impl"] == "siglip-kernel"]
    assert report["rows"][-2:] == kernel  # after every other row, ...
    assert [r["n"] for r in kernel] == [24, 16]  # ... the largest first
    for row in kernel:
        assert row["step"] == "siglip-kernel"
        assert row["skipped"] == "siglip-kernel needs a CUDA device (Triton)"
    # On a GPU the fraction of its row comes from the floor of the same case, measured earlier.
    bench = gpu._Bench(config, gpu._Device("cpu"), None, {}, fused_siglip_loss)
    case = gpu.Case(4, "bfloat16", 16, "sigmoid")
    img, txt = gpu.make_inputs(16, 4, "bfloat16", 0, "cpu")
    bench.run_case(case, img, txt, 16, ["GEMM floor"])
    bench.run_case(case, img, txt, 16, ["siglip-kernel"])
    row = bench.rows[-1]
    assert row["impl"] == "siglip-kernel"
    assert row["floor_fraction"] == pytest.approx(bench.floors[case] / row["median_s"])
    assert row["compute_dtype"] == "bfloat16"


def test_floor_goes_by_panels_above_the_limit_and_the_softmax_forms_s_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gpu, "FLOOR_PANEL_BYTES", 3000 * 1024 * 4)
    assert gpu.floor_panel(3000, 4) == 1024
    shapes: list[tuple[int, ...]] = []

    class Spy(torch.Tensor):  # type: ignore[misc]
        def __matmul__(self, other: Any) -> Any:
            shapes.append(tuple(self.shape))
            return torch.Tensor.__matmul__(self, other)

    img = torch.ones(3000, 2).as_subclass(Spy)
    gpu._floor("sigmoid", img, torch.ones(3000, 2))()
    assert [s for s in shapes if s[1] == 2] == [(1024, 2), (1024, 2), (952, 2)]
    assert len(shapes) == 3 * 3  # three GEMMs per panel
    shapes.clear()
    gpu._floor("softmax", img, torch.ones(3000, 2))()
    assert len(shapes) == 3 * 4  # the softmax's log-sum-exp pass forms S once more


def test_docstring_examples_run() -> None:
    for module in (gpu, _memory):
        result = doctest.testmod(module, verbose=False)
        assert result.failed == 0
    assert doctest.testmod(gpu, verbose=False).attempted > 0


# --------------------------------------------------------------------------- on a GPU


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_the_real_thing_on_a_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Quick: no compilation, no autotuning (the benchmark itself runs those).
    monkeypatch.setattr(gpu, "siglip_kernel_status", lambda: (None, "left out by this test"))
    config = gpu.GpuConfig(sizes=(1024, 2048), dims=(64,), repeats=2, compiled=False)
    report = gpu.run_benchmark(config, "cuda")
    assert report["errors"] == []
    assert report["machine"]["gpu"]["name"]
    assert report["config"]["default_block_size"] == 4096
    rows = report["rows"]
    impls = {r["impl"] for r in rows}
    assert {"ours torch", "ours torch exact", "GEMM floor", "dense autograd"} <= impls
    for row in rows:
        assert row["device"].startswith("cuda:")
        if row["skipped"] is not None or row["error"] is not None:
            continue
        assert row["median_s"] > 0
        assert row["floor_fraction"] > 0
        if row["impl"] == "ours cupy":
            assert row["memory_source"] == _memory.DEVICE_PEAK_SOURCES["cupy"]
            if row["dtype"] == "bfloat16":
                assert row["input_dtype"] == "bfloat16 (cupy)"
        else:
            assert row["memory_source"] == _memory.DEVICE_PEAK_SOURCES["torch"]
        assert row["peak_bytes"] >= 0
    by = {(r["dtype"], r["n"], r["loss"], r["impl"]): r for r in rows}
    for (dtype, n, loss, impl), row in by.items():
        if impl.startswith("ours") and row["loss_value"] is not None:
            dense = by[(dtype, n, loss, "dense autograd")]
            tolerance = 1e-4 if dtype == "float32" else 3e-2
            assert math.isclose(row["loss_value"], dense["loss_value"], rel_tol=tolerance)
    out = tmp_path / "gpu.json"
    argv = ["--device", "cuda", "--sizes", "1024", "--dim", "64", "--repeats", "1"]
    done = bench_subprocess(*argv, "--losses", "softmax", "--no-compile", "--json", str(out))
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["machine"]["gpu"]["name"]
