"""TorchDistComm on a real gloo group moves float16 and bfloat16, and CUDA tensors via the host.

Each case starts W processes of ``torch_dist_scripts/half_exchange.py`` the way torchrun
would, under a timeout that kills them all; the script checks every exchange (ring,
uneven all-gather, broadcast, and an allreduce that must sum in float32 and round once).
Where torch sees a GPU the same exchanges run on CUDA tensors too: gloo has no GPU send,
receive or all-gather, so they must be staged through the host, with W ranks on one GPU.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

SCRIPT = Path(__file__).parent / "torch_dist_scripts" / "half_exchange.py"
TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(world: int, cuda: bool) -> list[str]:
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(world),
        "OMP_NUM_THREADS": "1",
        "HALF_CUDA": "1" if cuda else "0",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT)],
            env={**env, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung: {world} gloo ranks of {SCRIPT.name}")
    finally:
        for proc in procs:
            proc.kill()
    codes = [proc.returncode for proc in procs]
    assert codes == [0] * world, "\n".join(outputs)
    return outputs


@pytest.mark.parametrize("world", [1, 3])
def test_half_precision_on_gloo(world: int) -> None:
    outputs = launch(world, cuda=False)
    assert all("ok on cpu" in output for output in outputs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("world", [1, 2])
def test_cuda_tensors_through_the_host_on_gloo(world: int) -> None:
    outputs = launch(world, cuda=True)
    assert all("ok on cpu, cuda" in output for output in outputs)
