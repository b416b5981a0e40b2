"""Real DistributedDataParallel on a gloo process group: our modules vs one process and open_clip.

Each case starts W processes of ``torch_dist_scripts/ddp_step.py`` the way torchrun would
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), under a timeout that kills them all.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import run_torch_ranks, torch_with_gloo

torch = torch_with_gloo()

from test_torch_bridge import TwoTowers, assert_grads_close, batch, dense_loss, train_step  # noqa: E402

SCRIPT = Path(__file__).parent / "torch_dist_scripts" / "ddp_step.py"
TIMEOUT_S = 240


def launch(sizes: list[int], out: Path) -> dict[str, Any]:
    shards = {"SHARDS": ",".join(map(str, sizes))}
    run_torch_ranks(SCRIPT, len(sizes), str(out), env=shards, timeout=TIMEOUT_S)
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def as_tensors(grads: dict[str, list[float]], like: dict[str, Any]) -> dict[str, Any]:
    return {
        name: torch.tensor(values, dtype=torch.float64).reshape(like[name].shape)
        for name, values in grads.items()
    }


@pytest.mark.parametrize("sizes", [[6, 6], [4, 4, 4], [7, 2, 5]], ids=str)
def test_ddp_step_equals_one_process(sizes: list[int], tmp_path: Path) -> None:
    results = launch(sizes, tmp_path / "grads.json")
    x_img, x_txt = batch(sum(sizes))
    for name, result in results.items():
        loss = "sigmoid" if "sigmoid" in name else "softmax"
        value, want = train_step(TwoTowers(), lambda *a, k=loss: dense_loss(k, *a), x_img, x_txt)
        got = as_tensors(result["grads"], want)
        assert_grads_close(got, want, 1e-10, f"{len(sizes)} DDP ranks, {name}")
        if name.startswith("ours"):  # the global loss; open_clip returns each rank's part
            assert abs(result["loss"] - value) <= 1e-12 * abs(value), name
    names = set(results)
    assert {f"ours sigmoid-{s}" for s in ("bidir", "shift", "reduce", "gather")} <= names
    assert {"ours softmax-ring", "ours softmax-gather"} <= names
