"""``python -m portable_siglip bench --device cuda``: the usage errors without a GPU, the whole
machinery on the CPU (rows, memory readings, skips, table, JSON), and the real run on a GPU."""

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

from portable_siglip.bench import cli, gpu
from portable_siglip.bench.baselines import dense_loss, open_clip_info

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent
HAS_CUDA = torch.cuda.is_available()
SMALL = gpu.GpuConfig(sizes=(48,), dims=(8,), dtypes=("float32", "bfloat16"), repeats=2)

ROW_KEYS = {
    "device",
    "loss",
    "n",
    "d",
    "dtype",
    "impl",
    "block_size",
    "compute_dtype",
    "times_s",
    "median_s",
    "gflops",
    "roofline_fraction",
    "peak_bytes",
    "peak_mib",
    "memory_source",
    "predicted_bytes",
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


def expected_impls(loss: str, dense: bool = True) -> list[str]:
    impls = ["ours torch", "roofline"]
    if dense:
        impls += ["open_clip"] if open_clip_info()["installed"] else []
        impls.append("dense autograd")
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


@pytest.mark.parametrize("mode", ["--profile", "--frameworks", "--distributed", "--reference"])
def test_cuda_excludes_the_cpu_modes(mode: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(parse(["--device", "cuda", mode])) == 2
    err = capsys.readouterr().err
    assert "runs the GPU benchmark" in err
    assert mode in err


@pytest.mark.parametrize(
    ("dtype", "message"),
    [("bfloat16", "for the GPU benchmark only"), ("float32,float64", "takes one dtype")],
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
    assert "bfloat16 is for the GPU benchmark only" in text


def test_gpu_defaults_and_cpu_defaults() -> None:
    gpu_args = cli._resolve_dims(parse(["--device", "cuda:0"]))
    assert gpu_args.sizes == [16384, 65536, 262144]
    assert gpu_args.dims == [1152]
    assert gpu_args.dtype == ["float32", "bfloat16"]
    custom = cli._resolve_dims(parse(["--device", "cuda", "--dim", "64", "--dtype", "float32"]))
    assert (custom.dims, custom.dtype) == ([64], ["float32"])
    cpu_args = cli._resolve_dims(parse([]))
    assert cpu_args.dtype == "float32"
    assert cli._resolve_dims(parse(["--dtype", "float64"])).dtype == "float64"
    config = gpu.config_from_args(gpu_args)
    assert config.sizes == (16384, 65536, 262144)
    assert config.dtypes == ("float32", "bfloat16")


# --------------------------------------------------------------------------- the machinery on cpu


def rows_by(report: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {(r["dtype"], r["loss"], r["impl"]): r for r in report["rows"]}


def test_cpu_dry_run_gives_every_row_of_every_case() -> None:
    report = gpu.run_benchmark(SMALL, "cpu", progress_stream=sys.stderr)
    assert set(report) == {"machine", "config", "rows", "notes", "errors"}
    assert report["errors"] == []
    assert report["machine"]["gpu"] is None
    assert report["config"]["device"] == "cpu"
    assert report["config"]["default_block_size"] == 1024
    order = [(r["dtype"], r["loss"], r["impl"]) for r in report["rows"]]
    assert order == [
        (dtype, loss, impl)
        for dtype in ("float32", "bfloat16")
        for loss in ("sigmoid", "softmax")
        for impl in expected_impls(loss)
    ]
    for row in report["rows"]:
        assert set(row) == ROW_KEYS
        assert row["skipped"] is None
        assert row["error"] is None
        assert (row["n"], row["d"], row["device"]) == (48, 8, "cpu")
        assert len(row["times_s"]) == 2
        assert row["median_s"] > 0
        assert row["gflops"] == pytest.approx(6 * 48 * 48 * 8 / row["median_s"] / 1e9)
        assert row["roofline_fraction"] > 0
        # The cpu fallback of the memory reading, or none where /proc has no VmHWM.
        assert row["memory_source"] in (gpu.MEMORY_RSS_FALLBACK, None)
        assert (row["peak_bytes"] is None) == (row["memory_source"] is None)
        if row["peak_bytes"] is not None:
            assert row["peak_bytes"] >= 0
            assert row["peak_mib"] == row["peak_bytes"] / 2**20
    rows = rows_by(report)
    for dtype, tolerance in (("float32", 1e-5), ("bfloat16", 2e-2)):
        for loss in ("sigmoid", "softmax"):
            ours = rows[(dtype, loss, "ours torch")]
            assert ours["block_size"] == 1024
            assert ours["compute_dtype"] == "float32"
            assert rows[(dtype, loss, "roofline")]["roofline_fraction"] == 1.0
            assert rows[(dtype, loss, "roofline")]["loss_value"] is None
            dense = rows[(dtype, loss, "dense autograd")]
            assert dense["compute_dtype"] == dtype
            assert dense["predicted_bytes"] >= gpu.DENSE_N2_MATRICES * 48 * 48 * 2
            assert math.isclose(ours["loss_value"], dense["loss_value"], rel_tol=tolerance)


def test_rows_predicted_above_the_free_memory_are_skipped_with_the_prediction(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "gpu.json"
    argv = ["--sizes", "40", "--dim", "8", "--repeats", "1", "--dtype", "float32"]
    args = cli._resolve_dims(parse([*argv, "--json", str(out), "--device", "cuda"]))
    args.device = "cpu"  # what the cli would hand over is a GPU; the machinery takes any
    assert gpu.main(args, memory_budget_bytes=1024) == 0
    printed = capsys.readouterr().out
    assert "skipped: predicted" in printed
    assert "roofline frac" in printed
    report = json.loads(out.read_text())
    assert set(report) == {"machine", "config", "rows", "notes", "errors"}
    assert report["config"]["memory_budget_bytes"] == 1024
    assert report["config"]["dtypes"] == ["float32"]
    for row in report["rows"]:
        if row["impl"] in gpu.N2_IMPLS:
            assert row["skipped"].startswith("predicted ")
            assert "> 0.000977 MiB free on cpu" in row["skipped"]
            assert row["predicted_bytes"] > 1024
            assert row["median_s"] is None
        else:
            assert row["skipped"] is None
            assert row["median_s"] > 0
    assert any("peak MiB" in note for note in report["notes"])


def test_out_of_memory_is_a_skip_and_other_errors_are_failures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def out_of_memory(loss: str, img: object, txt: object) -> object:
        def run() -> None:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

        return run

    def broken(img: object, txt: object) -> object:
        def run() -> None:
            raise RuntimeError("no kernel image is available")

        return run

    monkeypatch.setattr(gpu, "_dense", out_of_memory)
    monkeypatch.setattr(gpu, "_roofline", broken)
    config = gpu.GpuConfig(sizes=(32,), dims=(4,), dtypes=("float32",), losses=("sigmoid",))
    report = gpu.run_benchmark(config, "cpu")
    rows = rows_by(report)
    dense = rows[("float32", "sigmoid", "dense autograd")]
    assert dense["skipped"] == (
        "out of memory in the warm-up: OutOfMemoryError: CUDA out of memory. "
        "Tried to allocate 64.00 GiB"
    )
    assert dense["error"] is None
    roofline = rows[("float32", "sigmoid", "roofline")]
    assert roofline["error"] == "warm-up: RuntimeError: no kernel image is available"
    assert report["errors"] == [
        "float32 sigmoid d=4 n=32 roofline: warm-up: RuntimeError: no kernel image is available"
    ]
    ours = rows[("float32", "sigmoid", "ours torch")]
    assert ours["median_s"] > 0
    assert ours["roofline_fraction"] is None  # no roofline to compare with
    assert "error (see below)" in gpu.table(report["rows"])


def test_the_n2_prediction_scales_a_measured_peak() -> None:
    bench = gpu._Bench(SMALL, gpu._Device("cpu"), None, False, False, None)
    case = gpu.Case(8, "float32", 1000, "sigmoid")
    floor = gpu.DENSE_N2_MATRICES * 1000 * 1000 * 4
    assert bench.predict(case, "dense autograd") == floor
    bench.peaks[(8, "float32", "sigmoid", "dense autograd")] = (500, int(floor))
    assert bench.predict(case, "dense autograd") == 4 * floor


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
    # On the host the kernel (Triton) is not run: no row, and a note says why.
    report = gpu.run_benchmark(gpu.GpuConfig(sizes=(16,), dims=(4,), repeats=1), "cpu")
    assert all(r["impl"] != "siglip-kernel" for r in report["rows"])
    assert (
        "note: siglip-kernel needs a CUDA device (Triton); no `siglip-kernel` rows"
        in (report["notes"])
    )


def test_roofline_goes_by_panels_above_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "ROOFLINE_PANEL_BYTES", 3000 * 1024 * 4)
    assert gpu.roofline_panel(3000, 4) == 1024
    shapes: list[tuple[int, ...]] = []

    class Spy(torch.Tensor):  # type: ignore[misc]
        def __matmul__(self, other: Any) -> Any:
            shapes.append(tuple(self.shape))
            return torch.Tensor.__matmul__(self, other)

    img = torch.ones(3000, 2).as_subclass(Spy)
    gpu._roofline(img, torch.ones(3000, 2))()
    assert [s for s in shapes if s[1] == 2] == [(1024, 2), (1024, 2), (952, 2)]


def test_docstring_examples_run() -> None:
    result = doctest.testmod(gpu, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0


# --------------------------------------------------------------------------- on a GPU


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_the_real_thing_on_a_gpu(tmp_path: Path) -> None:
    config = gpu.GpuConfig(sizes=(1024, 2048), dims=(64,), repeats=2)
    report = gpu.run_benchmark(config, "cuda")
    assert report["errors"] == []
    assert report["machine"]["gpu"]["name"]
    assert report["config"]["default_block_size"] == 4096
    rows = report["rows"]
    impls = {r["impl"] for r in rows}
    assert {"ours torch", "roofline", "dense autograd"} <= impls
    for row in rows:
        assert row["device"].startswith("cuda:")
        if row["skipped"] is not None:
            continue
        assert row["median_s"] > 0
        assert row["roofline_fraction"] > 0
        if row["impl"] == "ours cupy":
            assert row["memory_source"] == gpu.MEMORY_CUPY_POOL
        else:
            assert row["memory_source"] == gpu.MEMORY_TORCH_CUDA
        assert row["peak_bytes"] >= 0
    by = {(r["dtype"], r["n"], r["loss"], r["impl"]): r for r in rows}
    for (dtype, n, loss, impl), row in by.items():
        if impl == "ours torch":
            dense = by[(dtype, n, loss, "dense autograd")]
            tolerance = 1e-4 if dtype == "float32" else 3e-2
            assert math.isclose(row["loss_value"], dense["loss_value"], rel_tol=tolerance)
    out = tmp_path / "gpu.json"
    done = bench_subprocess(
        "--device", "cuda", "--sizes", "1024", "--dim", "64", "--repeats", "1", "--json", str(out)
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["machine"]["gpu"]["name"]
