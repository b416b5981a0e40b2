"""TorchDistComm on a real gloo group moves float16 and bfloat16, and CUDA tensors via the host.

Each case starts W processes of ``torch_dist_scripts/half_exchange.py`` the way torchrun
would, under a timeout that kills them all; the script checks every exchange (ring,
uneven all-gather, broadcast, and an allreduce that must sum in float32 and round once).
Where torch sees a GPU the same exchanges run on CUDA tensors too: gloo has no GPU send,
receive or all-gather, so they must be staged through the host, with W ranks on one GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_torch_ranks, torch_with_gloo

torch = torch_with_gloo()

SCRIPT = Path(__file__).parent / "torch_dist_scripts" / "half_exchange.py"
TIMEOUT_S = 180


def launch(world: int, cuda: bool) -> list[str]:
    half_cuda = {"HALF_CUDA": "1" if cuda else "0"}
    return run_torch_ranks(SCRIPT, world, env=half_cuda, timeout=TIMEOUT_S)


@pytest.mark.parametrize("world", [1, 3])
def test_half_precision_on_gloo(world: int) -> None:
    outputs = launch(world, cuda=False)
    assert all("ok on cpu" in output for output in outputs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("world", [1, 2])
def test_cuda_tensors_through_the_host_on_gloo(world: int) -> None:
    outputs = launch(world, cuda=True)
    assert all("ok on cpu, cuda" in output for output in outputs)
