"""Smoke test of ``python -m portable_siglip bench --cached``: it runs, it reports, it skips.

Each case runs in a worker process of its own (a few seconds of torch import each), so the
real run here is one tiny size; the rest call the pieces in this process.
"""

from __future__ import annotations

import argparse
import doctest
import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from portable_siglip.bench import baselines, cached  # noqa: E402
from portable_siglip.cli import _bench as cli  # noqa: E402
from portable_siglip.cli import _commands as _cli  # noqa: E402

GIB = 2**30


def bench(argv: list[str]) -> int:
    return _cli.main(["bench", "--cached", *argv])


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(["--cached", *argv])


def test_cached_and_plain_steps_agree_in_this_process() -> None:
    """The two steps are one training step: the same loss, and the same parameter gradients."""
    options = {"loss": "sigmoid", "dim": 16, "dtype": "float32", "seed": 0, "block_size": 64}
    results = {
        impl: cached.run_case(impl=impl, n=128, chunk_size=48, repeats=1, cap_bytes=None, **options)
        for impl in (cached.CACHED, cached.PLAIN)
    }
    for result in results.values():
        assert result["status"] == "ok"
        assert len(result["times_s"]) == 1
        assert result["peak_extra_bytes"] is not None
    value = results[cached.CACHED]["loss_value"]
    assert results[cached.PLAIN]["loss_value"] == pytest.approx(value, rel=1e-5)

    impls = [cached.CACHED, cached.PLAIN]
    if baselines.open_clip_info()["installed"]:
        impls.append(cached.PLAIN_OPEN_CLIP)
    grads = {}
    for impl in impls:
        model = cached._model(16, 0)
        x, y = torch.randn(100, cached.IN_DIM), torch.randn(100, cached.IN_DIM)
        torch.manual_seed(0)
        cached.make_step(impl, "softmax", model, chunk_size=48, block_size=None)(x, y)
        grads[impl] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    for impl in impls[1:]:
        for got, want in zip(grads[cached.CACHED], grads[impl], strict=True):
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), impl


@pytest.mark.slow
def test_a_tiny_run_reports_every_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers (open_clip's row is left out here; the test above runs its step)."""
    info = {"installed": False, "version": None, "chunk_size": False, "problem": "left out"}
    monkeypatch.setattr(cached, "open_clip_info", lambda: info)
    out = tmp_path / "cached.json"
    argv = ["--losses", "sigmoid", "--sizes", "256", "--dim", "16", "--repeats", "1"]
    assert bench([*argv, "--chunk-size", "100", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert [row["impl"] for row in report["rows"]] == [cached.CACHED, cached.PLAIN]
    for row in report["rows"]:
        assert row["status"] == "ok", row
        assert row["peak_extra_mib"] is not None
        assert row["median_s"] > 0
    assert report["rows"][0]["time_ratio"] == 1.0
    assert report["rows"][0]["chunk_size"] == 100
    assert report["config"]["memory_budget_gib"] == 16.0
    assert report["errors"] == []
    assert "bench --cached" in printed
    assert "open-clip-torch not available (no plain open_clip rows)" in printed


def test_a_tiny_budget_skips_every_case(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cached.json"
    budget = ["--memory-cap-gib", "1e-6"]  # 1 KiB: nothing fits; no worker starts
    assert bench(["--sizes", "64,128", "--dim", "8", *budget, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) >= 2 * 2 * 2
    assert {row["status"] for row in rows} == {"skipped"}
    assert all(row["worker"] is None for row in rows)
    assert "skipped: predicted" in capsys.readouterr().out


def test_a_plain_row_over_the_budget_is_skipped_with_the_larger_sizes() -> None:
    args = cli._resolve_dims(parse(["--sizes", "1024,2048", "--memory-cap-gib", "1.5"]))
    previous: dict[str, tuple[int, int, float | None]] = {cached.PLAIN: (1024, GIB, 1.0)}
    errors: list[str] = []
    row = cached._new_row(args, "sigmoid", cached.PLAIN, 2048)
    cached._run_one(args, row, previous, errors)  # 1 GiB at n = 1024: 2 GiB at 2048
    assert row["status"] == "skipped"
    assert row["predicted_peak_gib"] == pytest.approx(2.0)
    assert row["notes"] == ["skipped: predicted 2 GiB > budget 1.5 GiB"]
    assert previous[cached.PLAIN][:2] == (2048, 2 * GIB)
    assert errors == []


def test_cached_step_out_of_memory_fails_the_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def out_of_memory(*_: Any) -> tuple[dict[str, Any], None]:
        result: dict[str, Any] = {"peak_extra_bytes": None, "loss_value": None}
        result.update(status="out of memory", error="MemoryError: x")
        return result, None

    monkeypatch.setattr(cached, "run_json_line", out_of_memory)
    assert bench(["--losses", "softmax", "--sizes", "64", "--dim", "4"]) == 1
    printed = capsys.readouterr().out
    assert "out of memory under the 16 GiB budget" in printed
    assert "error: softmax n=64 cached_step: out of memory" in printed
    assert "error: softmax n=64 plain ours" not in printed  # a plain row may run out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--frameworks"], "`--frameworks` and `--cached` exclude each other"),
        (["--no-memory"], "`--no-memory` does not apply to `--cached`"),
        (["--dtype", "float64"], "`--dtype` must be float32"),
        (["--sweep"], "`--sweep` is the full sweep"),
    ],
)
def test_conflicting_options_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench(["--sizes", "64", "--dim", "4", *argv]) == 2
    assert message in capsys.readouterr().err


def test_defaults() -> None:
    args = cli._resolve_dims(parse([]))
    assert args.dim == cached.DEFAULT_DIM == 128
    assert args.sizes is None  # cached.main fills in DEFAULT_SIZES
    assert cached.DEFAULT_SIZES == (4096, 8192)
    assert cli._resolve_dims(parse(["--dim", "32"])).dim == 32


def test_docstring_examples_run() -> None:
    result = doctest.testmod(cached, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0
