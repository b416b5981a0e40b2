"""Smoke test of ``python -m portable_siglip bench --frameworks``: it runs, it reports, it skips.

Each case of the benchmark runs in a worker process of its own (about 3 s of torch import
each), so the real runs here are kept to a few tiny cases.
"""

from __future__ import annotations

import argparse
import doctest
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from portable_siglip.bench import baselines, frameworks, sweep  # noqa: E402
from portable_siglip.cli import _bench as cli  # noqa: E402
from portable_siglip.cli import _commands as _cli  # noqa: E402

GIB = 2**30


def bench(argv: list[str]) -> int:
    return _cli.main(["bench", "--frameworks", *argv])


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(["--frameworks", *argv])


@pytest.mark.slow
def test_sigmoid_rows_run_are_measured_and_skipped_by_prediction(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fw.json"
    argv = ["--losses", "sigmoid", "--sizes", "2048,1024", "--dim", "64", "--repeats", "1"]
    # 40 MiB: at n = 1024 every case fits (the n^2 ones need 3-6 n^2 floats, 12-24 MiB); at
    # 2048 they are predicted at 4x that, while ours (O(n d + block^2)) doubles at most.
    options = ["--block-size", "512", "--chunk-size", "256", "--memory-cap-gib", "0.04"]
    assert bench([*argv, *options, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())

    info = baselines.open_clip_info()
    impls = frameworks.impls_for("sigmoid", info, dense=True)
    assert impls[0] == "ours"
    assert impls[-1] == "dense autograd"
    assert ("chunked autograd" if not info["chunk_size"] else "open_clip chunked") in impls
    assert ("open_clip" in impls) == info["installed"]
    expected = [("sigmoid", n, impl) for n in (1024, 2048) for impl in impls]
    assert [(row["loss"], row["n"], row["impl"]) for row in report["rows"]] == expected

    rows = {(row["n"], row["impl"]): row for row in report["rows"]}
    for row in report["rows"]:
        assert row["impl"] in printed
        if row["n"] == 2048 and row["impl"] != "ours":
            assert row["status"] == "skipped"
            assert row["predicted_peak_gib"] > 0.04
            assert any(note.startswith("skipped: predicted") for note in row["notes"])
            assert row["times_s"] == []
            assert row["median_s"] is None
            assert row["peak_extra_mib"] is None
            assert row["worker"] is None
            continue
        assert row["status"] == "ok", row
        assert row["error"] is None
        assert len(row["times_s"]) == 1
        assert row["median_s"] > 0
        assert row["time_ratio"] > 0
        assert row["worker"]["method"].startswith("VmHWM")
        assert row["worker"]["rlimit_as_bytes"] is not None
        assert row["peak_extra_mib"] >= row["backward_peak_mib"] >= 0
        assert math.isfinite(row["loss_value"])
    for n in (1024, 2048):
        ours = rows[(n, "ours")]
        assert ours["peak_extra_mib"] > 0  # measured, and not the n x n logits (4 MiB at 1024)
        assert ours["time_ratio"] == 1.0
        assert ours["memory_ratio"] == 1.0
    ours, dense = rows[(1024, "ours")], rows[(1024, "dense autograd")]
    assert dense["peak_extra_mib"] > 3 * 4  # three n x n float32 tensors at least
    assert dense["memory_ratio"] == pytest.approx(dense["peak_extra_mib"] / ours["peak_extra_mib"])
    assert dense["loss_value"] == pytest.approx(ours["loss_value"], rel=1e-4)
    chunked = [row for row in report["rows"] if "chunk" in row["impl"]]
    assert [row["chunk_size"] for row in chunked] == [256, 256]
    if not info["installed"]:
        assert "no open_clip" in chunked[0]["notes"][0]
    elif not info["chunk_size"]:
        assert "no chunk_size" in chunked[0]["notes"][0]
    assert report["errors"] == []
    assert "skipped: predicted" in printed
    assert "portable-siglip bench --frameworks" in printed
    assert "sigmoid ours: n 1024 -> 2048: peak x" in printed
    assert "load average after" in printed


def test_softmax_cases_run() -> None:
    # In this process (no address-space limit): the worker's measurement, without a worker.
    values = {}
    for impl in frameworks.impls_for("softmax", baselines.open_clip_info(), dense=True):
        result = frameworks.run_case(
            loss="softmax",
            impl=impl,
            n=256,
            dim=16,
            dtype="float32",
            seed=0,
            block_size=64,
            chunk_size=64,
            repeats=2,
            cap_bytes=None,
        )
        assert result["status"] == "ok"
        assert len(result["times_s"]) == 2
        assert result["peak_extra_bytes"] >= 0
        assert result["rlimit_as_bytes"] is None
        values[impl] = result["loss_value"]
    assert "dense autograd" in values
    for value in values.values():
        assert value == pytest.approx(values["ours"], rel=1e-5)


def test_a_tiny_cap_skips_every_case(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fw.json"
    cap = ["--memory-cap-gib", "1e-6"]  # 1 KiB: nothing fits, not even ours; no worker starts
    assert bench(["--sizes", "64,128", "--dim", "8", *cap, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) >= 2 * 2 * 2
    assert {row["status"] for row in rows} == {"skipped"}
    assert all(row["worker"] is None for row in rows)
    assert "skipped: predicted" in capsys.readouterr().out


def test_a_skipped_size_skips_the_larger_ones() -> None:
    args = parse(["--sizes", "1024,2048", "--dim", "16", "--memory-cap-gib", "1"])
    previous: dict[str, tuple[int, int, float | None]] = {"dense autograd": (1024, GIB, 1.0)}
    errors: list[str] = []
    row = frameworks._new_row(args, "sigmoid", "dense autograd", 2048)
    frameworks._run_one(args, row, previous, errors)  # 1 GiB at n = 1024: 4 GiB at 2048
    assert row["status"] == "skipped"
    assert row["predicted_peak_gib"] == pytest.approx(4.0)
    assert row["notes"] == ["skipped: predicted 4 GiB > cap 1 GiB"]
    assert previous["dense autograd"][:2] == (2048, 4 * GIB)
    assert errors == []


def test_out_of_memory_under_the_limit_is_reported() -> None:
    if frameworks._vm_size_bytes() is None:
        pytest.skip("needs /proc/self/status (Linux) to limit the address space")
    # The limit is the worker's size + 0 + 512 MiB of slack; the logits alone are 1 GiB.
    command = [sys.executable, "-m", "portable_siglip.bench.frameworks", "--loss=sigmoid"]
    command += ["--impl=dense autograd", "--n=16384", "--dim=8", "--repeats=1", "--cap-bytes=0"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == "out of memory"
    assert "alloc" in result["error"].lower() or "memory" in result["error"].lower()
    assert result["times_s"] == []


def test_out_of_memory_makes_the_run_fail(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def out_of_memory(*_: Any) -> tuple[dict[str, Any], None, float]:
        result = dict.fromkeys(
            ("peak_extra_bytes", "forward_peak_extra_bytes", "backward_peak_extra_bytes")
        )
        result.update(status="out of memory", error="MemoryError: x", loss_value=None)
        return result, None, 0.1

    monkeypatch.setattr(frameworks, "_run_worker", out_of_memory)
    assert bench(["--losses", "softmax", "--sizes", "64", "--dim", "4", "--no-dense"]) == 1
    printed = capsys.readouterr().out
    assert "out of memory under RLIMIT_AS (cap 16 GiB)" in printed
    assert "error: softmax n=64 ours" in printed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--memory-cap-gib", "0"], "--memory-cap-gib"),
        (["--memory-cap-gib", "nan"], "--memory-cap-gib"),
        (["--chunk-size", "0"], "--chunk-size"),
        (["--sizes", "64,zero"], "--sizes"),
        (["--losses", "hinge"], "--losses"),
    ],
)
def test_invalid_options_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--distributed"], "exclude each other"),
        (["--no-memory"], "--no-memory"),
    ],
)
def test_conflicting_options_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench(["--sizes", "64", "--dim", "4", *argv]) == 2
    assert message in capsys.readouterr().err


def test_invalid_namespace_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(["--sizes", "64"])
    args.memory_cap_gib = -1.0
    assert cli.main(args) == 2
    assert "--memory-cap-gib" in capsys.readouterr().err


def test_default_sizes() -> None:
    assert parse([]).sizes is None  # resolved per mode: 8192,16384,32768 here
    assert frameworks.DEFAULT_SIZES == (8192, 16384, 32768)
    assert sweep.DEFAULT_SIZES == (1024, 2048, 4096, 8192, 16384, 32768, 65536)


def test_chunked_autograd_matches_the_dense_loss_and_gradients() -> None:
    generator = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(
        torch.randn(37, 5, generator=generator, dtype=torch.float64)
    )
    txt = torch.nn.functional.normalize(
        torch.randn(37, 5, generator=generator, dtype=torch.float64)
    )
    results = []
    for chunked in (True, False):
        leaves = [img.clone().requires_grad_(), txt.clone().requires_grad_()]
        scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
        bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
        if chunked:
            loss = baselines.chunked_sigmoid_loss(*leaves, scale, bias, chunk_size=8)
        else:
            loss = baselines.dense_loss("sigmoid", *leaves, scale, bias)
        loss.backward()
        results.append([loss, *(t.grad for t in (*leaves, scale, bias))])
    for chunked_value, dense_value in zip(*results, strict=True):
        torch.testing.assert_close(chunked_value, dense_value, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("module", [frameworks, baselines], ids=lambda m: m.__name__)
def test_docstring_examples_run(module: ModuleType) -> None:
    result = doctest.testmod(module, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0
