"""One `cached_step` per loss on a gloo process group, the model wrapped in DDP; run by
test_cached_step.py.

Every rank builds the same model (tests/test_cached_step.py's ``Towers``, dropout on), wraps it
in DistributedDataParallel, seeds torch with 100 + rank and takes one `cached_step` on its shard
of one global batch, with a TorchDistComm and the encoders of the wrapped module (the step
averages the gradients itself). Rank 0 writes the loss and the gradients as JSON to argv[1].

Environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (as torchrun sets them), SHARDS
(comma-separated rows per rank) and CHUNK (rows per encoder call).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the helpers

from portable_siglip.backends.torch import TorchDistComm, cached_step
from test_cached_step import Towers, inputs, shard


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = [int(s) for s in os.environ["SHARDS"].split(",")]
    chunk = int(os.environ["CHUNK"])
    assert world == len(sizes), (world, sizes)
    images, texts = inputs(sum(sizes), sum(sizes))
    x_img, x_txt = shard(images, sizes)[rank], shard(texts, sizes)[rank]
    model = DistributedDataParallel(Towers())
    towers = model.module
    comm = TorchDistComm()
    out: dict[str, object] = {}
    for loss in ("sigmoid", "softmax"):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(100 + rank)
        value = cached_step(
            towers.encode_img,
            towers.encode_txt,
            x_img,
            x_txt,
            loss=loss,
            logit_scale=towers.logit_scale.exp(),
            logit_bias=towers.logit_bias if loss == "sigmoid" else None,
            chunk_size=chunk,
            comm=comm,
            block_size=3,
        )
        grads = {
            name: p.grad.reshape(-1).tolist()
            for name, p in towers.named_parameters()
            if p.grad is not None
        }
        out[loss] = {"loss": value.item(), "grads": grads}
    if rank == 0:
        Path(sys.argv[1]).write_text(json.dumps(out))
    # As ddp_step.py: leave together, then at once, the DDP model and the group alive
    # (destroy_process_group with a live DDP model deadlocks in torch 2.13).
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
