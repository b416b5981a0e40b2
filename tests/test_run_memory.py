"""``run`` predicts its host memory before it draws anything, and refuses what cannot fit.

``run --dim 10**9`` (or ``--batch``, ``--captions-per-image``) used to start and end in a
``MemoryError`` traceback with status 1, which means "verification failed".
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from portable_siglip.cli import _commands as _cli
from portable_siglip.cli import _footprint
from portable_siglip.comm import ThreadGroup

HUGE = 10**9


@pytest.fixture
def nothing_drawn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make drawing the features an error: a refused run must not get that far."""

    def drawn(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the run drew its features before refusing")

    monkeypatch.setattr(_cli, "random_pairs", drawn)
    monkeypatch.setattr(_cli, "random_batch", drawn)


@pytest.mark.parametrize(
    ("option", "name"),
    [("--dim", "dim"), ("--batch", "batch"), ("--captions-per-image", "captions_per_image")],
)
@pytest.mark.parametrize("verify", [False, True], ids=["run", "verify"])
def test_a_run_too_big_for_the_machine_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
    nothing_drawn: None,
    option: str,
    name: str,
    verify: bool,
) -> None:
    start = time.perf_counter()
    status = _cli.main(["run", option, str(HUGE), *(["--verify"] if verify else [])])
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    assert status == 2, err
    assert f"run: error: `{name}`: " in err
    assert f"{option} {HUGE}" in err
    assert f"choose a smaller {option}" in err
    found = re.search(r"needs about ([\d.]+) GB of host memory", err)
    assert found is not None, err
    assert float(found.group(1)) > 1000  # terabytes, at the least
    assert ("--verify reference" in err) == verify
    assert "Traceback" not in err
    assert "MemoryError" not in err
    assert seconds < 10


def test_the_estimate_is_compared_with_the_available_memory(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["run", "--batch", "300", "--dim", "16", "--verify"]
    need = _footprint.predict(300, 16, verify=True).peak
    monkeypatch.setattr(_footprint, "available_bytes", lambda: need - 1)
    assert _cli.main(argv) == 2
    assert "GB is available; choose a smaller" in capsys.readouterr().err
    monkeypatch.setattr(_footprint, "available_bytes", lambda: need)
    assert _cli.main(argv) == 0
    monkeypatch.setattr(_footprint, "available_bytes", lambda: None)  # nothing says: run
    assert _cli.main(argv) == 0


def test_the_estimate_covers_what_the_run_takes(capsys: pytest.CaptureFixture[str]) -> None:
    # The run's own tracemalloc peak (numpy reports every allocation to it): the predicted
    # run phase is no smaller, and not wildly larger.
    for argv, shape in (
        (["--batch", "2048", "--dim", "64"], (2048, 64, 1)),
        (["--batch", "1024", "--dim", "32", "--captions-per-image", "3"], (1024, 32, 3)),
        (["--batch", "1500", "--dim", "48", "--block-size", "256"], (1500, 48, 1)),
    ):
        assert _cli.main(["run", *argv]) == 0
        out = capsys.readouterr().out
        found = re.search(r"peak extra mem\s+([\d.]+) MiB", out)
        assert found is not None, out
        measured = float(found.group(1)) * 2**20
        block = int(argv[-1]) if "--block-size" in argv else None
        predicted = _footprint.predict(*shape, block_size=block).run
        assert measured <= predicted <= 4 * measured + 2**20, (argv, measured, predicted)


def test_every_rank_refuses_together(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, nothing_drawn: None
) -> None:
    # One rank short of memory: every rank exits 2, before drawing anything.
    available = {"count": 0}

    def short_on_one_rank() -> int:
        available["count"] += 1
        return 1 if available["count"] == 2 else 10**15

    monkeypatch.setattr(_footprint, "available_bytes", short_on_one_rank)
    statuses = ThreadGroup(3).run(
        lambda comm: _cli.main(["run", "--batch", "300", "--dim", "16"], comm=comm)
    )
    assert statuses == [2, 2, 2]
    assert capsys.readouterr().err.count("GB is available") == 1  # said by rank 0


def test_available_memory_is_read_here() -> None:
    found = _footprint.available_bytes()
    assert found is None or found > 0
