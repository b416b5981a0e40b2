"""One DDP training step per schedule, on a gloo process group; run by test_torch_ddp.py.

Every rank builds the same two-tower model, wraps it in DistributedDataParallel, feeds its
shard of one global batch and takes one backward with portable_siglip's module, made the
open_clip way (``rank=``, ``world_size=``: the module finds the process group itself),
then with open_clip's own module where open-clip-torch is installed (equal shards only:
open_clip's neighbour exchange needs them). Rank 0 writes the DDP-averaged gradients as
JSON to the path in argv[1].

Environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (as torchrun sets them) and
SHARDS (comma-separated rows per rank).
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

from portable_siglip.backends.torch import ClipLoss, SigLipLoss
from test_torch_bridge import TwoTowers, batch, bounds

SCHEDULES = [
    ("sigmoid", "bidir"),
    ("sigmoid", "shift"),
    ("sigmoid", "reduce"),
    ("sigmoid", "gather"),
    ("softmax", "ring"),
    ("softmax", "gather"),
]


def open_clip_losses(rank: int, world: int) -> dict[str, object]:
    try:
        from peers.open_clip_losses import load_loss_module
    except ImportError:
        return {}
    module = load_loss_module()
    losses: dict[str, object] = {
        f"sigmoid-{s}": module.SigLipLoss(rank=rank, world_size=world, dist_impl=s)
        for s in ("bidir", "shift", "reduce", "gather")
    }
    losses["softmax"] = module.ClipLoss(
        local_loss=True, gather_with_grad=True, rank=rank, world_size=world
    )
    return losses


def step(model: DistributedDataParallel, loss_fn: object, x_img, x_txt) -> dict[str, list]:
    model.zero_grad(set_to_none=True)
    value = loss_fn(*model(x_img, x_txt))  # type: ignore[operator]
    value.backward()  # DDP averages the gradients over the ranks here
    grads = {n: p.grad.reshape(-1).tolist() for n, p in model.module.named_parameters()}
    return {"loss": value.item(), "grads": grads}


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = [int(s) for s in os.environ["SHARDS"].split(",")]
    edges = bounds(sizes)
    x_img, x_txt = batch(sum(sizes))
    rows = slice(edges[rank], edges[rank + 1])
    model = DistributedDataParallel(TwoTowers())
    out: dict[str, object] = {}
    for loss, strategy in SCHEDULES:
        cls = SigLipLoss if loss == "sigmoid" else ClipLoss
        ours = cls(rank=rank, world_size=world, strategy=strategy, block_size=2)
        out[f"ours {loss}-{strategy}"] = step(model, ours, x_img[rows], x_txt[rows])
    if len(set(sizes)) == 1:
        for name, peer in open_clip_losses(rank, world).items():
            out[f"open_clip {name}"] = step(model, peer, x_img[rows], x_txt[rows])
    if rank == 0:
        Path(sys.argv[1]).write_text(json.dumps(out))
    # Leave together (a rank that tears gloo down while a peer is still in its last
    # collective can make that peer's gloo thread abort the process), then leave at once,
    # the model and the group still alive: with torch 2.13, dropping the DDP model after
    # destroy_process_group() destroys the gloo group from the main thread, which holds
    # the GIL while it joins gloo's worker threads, and a worker that is destroying a
    # finished allreduce waits for the GIL to release a Python object: a deadlock seen in
    # CI (3 ranks, 240 s) and here (gdb: ~ProcessGroupGloo in Reducer::~Reducer joining
    # pt_gloo_runloop, which waits in take_gil from ~AsyncAllreduceWork).
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
