"""The benchmarks read the loss registry: a loss registered at runtime is benchmarked.

``--losses`` accepts every registered name, a loss runs through the functions its
description names (``evaluate`` for one without public functions), its GEMMs per tile set the
roofline and progress, and its schedules are the distributed benchmark's strategies. The
baselines of other libraries are tables keyed by loss name: a loss they lack is a clear
error, never the other loss. A copy of the sigmoid loss under another name, registered for
one test, proves it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from portable_siglip import _losses
from portable_siglip import _registry as registry
from portable_siglip.bench import baselines, common, distributed, frameworks, gpu
from portable_siglip.cli import _bench as cli

COPY = "sigmoid-copy"


@pytest.fixture
def sigmoid_copy() -> Iterator[registry.Loss]:
    """The sigmoid loss registered as ``sigmoid-copy``, without public functions."""
    loss = dataclasses.replace(
        registry.get("sigmoid"),
        name=COPY,
        schedules=("shift", "gather"),
        functions=(),
        gemms_per_tile=5,
    )
    registry.register(loss)
    try:
        yield loss
    finally:
        registry.unregister(COPY)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_the_sweep_times_a_loss_registered_at_runtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sigmoid_copy: registry.Loss
) -> None:
    evaluated: list[str] = []
    evaluate = _losses.evaluate

    def spy(loss: registry.Loss, *args: Any, **options: Any) -> Any:
        evaluated.append(loss.name)
        return evaluate(loss, *args, **options)

    monkeypatch.setattr(_losses, "evaluate", spy)
    out = tmp_path / "bench.json"
    options = ["--backends", "numpy", "--losses", COPY, "--no-memory", "--no-dense"]
    args = _parse(["--sizes", "64", "--dim", "8", "--repeats", "1", *options, "--json", str(out)])
    assert args.losses == [COPY]
    assert cli.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["loss"], r["impl"]) for r in rows] == [(COPY, "ours"), (COPY, "roofline")]
    assert all(r["error"] is None and r["median_s"] > 0 for r in rows)
    # It ran the copy itself (it has no public function: through evaluate), not a look-alike.
    assert evaluated
    assert set(evaluated) == {COPY}


def test_the_default_losses_are_the_registered_ones(sigmoid_copy: registry.Loss) -> None:
    assert _parse([]).losses == ["sigmoid", "softmax", COPY]
    assert gpu.GpuConfig().losses == ("sigmoid", "softmax", COPY)
    args = _parse(["--losses", COPY])
    args.dtype, args.repeats = "float32", 1  # as the bench command resolves them
    assert common.check_args(args) is None


def test_an_unregistered_loss_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parse(["--losses", COPY])
    assert f"`--losses` must be among sigmoid, softmax; got {COPY!r}" in capsys.readouterr().err
    args = _parse([])
    args.losses = ["sigmoid", COPY]
    assert common.check_args(args) == f"`--losses` must be among sigmoid, softmax; got {COPY}"
    config = gpu.GpuConfig(losses=(COPY,))
    assert config.problem() == f"`--losses` must be among sigmoid, softmax; got [{COPY!r}]"


def test_a_loss_s_description_sets_its_gemms_and_strategies(sigmoid_copy: registry.Loss) -> None:
    assert gpu.floor_gemms(COPY) == 5
    case = gpu.Case(768, "bfloat16", 65536, COPY)
    sigmoid = case._replace(loss="sigmoid")
    floor = gpu.predict_row_seconds("GEMM floor", case)
    assert floor == pytest.approx(gpu.predict_row_seconds("GEMM floor", sigmoid) * 5 / 3)
    assert distributed.strategies(COPY) == ("shift", "gather")
    assert common.loss_and_grad(COPY) is not common.loss_and_grad("sigmoid")


def test_a_baseline_without_the_loss_is_a_clear_error(sigmoid_copy: registry.Loss) -> None:
    torch = pytest.importorskip("torch")
    img = torch.nn.functional.normalize(torch.randn(4, 3), dim=1)
    with pytest.raises(ValueError, match=f"dense autograd baseline has no '{COPY}' loss"):
        baselines.dense_loss(COPY, img, img, torch.tensor(10.0), None)
    with pytest.raises(ValueError, match=f"open_clip has no '{COPY}' loss"):
        baselines.open_clip_loss(COPY)
    with pytest.raises(ValueError, match=f"has no '{COPY}' loss; it has 'sigmoid', 'softmax'"):
        frameworks.make_loss(COPY, frameworks.OURS, block_size=None, chunk_size=8)
    # No chunked rows for it: they are the sigmoid loss's, written by others.
    assert frameworks.impls_for(COPY, {"installed": False, "chunk_size": False}, True) == [
        frameworks.OURS,
        frameworks.DENSE,
    ]
