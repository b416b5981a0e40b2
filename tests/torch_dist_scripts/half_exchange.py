"""One rank of a gloo group: TorchDistComm moves float16 and bfloat16, CUDA tensors via the host.

Started W times by ``tests/test_torch_dist_half.py`` the way torchrun would (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Checks every exchange against values it computes
itself and exits 1 with the failures on stderr. ``allreduce`` must sum in float32 and round
once: at W = 3 the values of TRIPLE give another answer for any order of rounded pairwise
sums in bfloat16.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
from portable_siglip.backends.torch import TorchDistComm

TRIPLE = (1.0, 1.0 + 2.0**-7, 2.0**-9)


def values(rank: int, shape: tuple[int, ...], dtype: torch.dtype, device: str) -> torch.Tensor:
    """Exact in bfloat16 and float16; different for every rank and element."""
    count = 1
    for size in shape:
        count *= size
    base = (rank + 1) * 0.5 + torch.arange(count, dtype=torch.float32) / 8
    return base.reshape(shape).to(dtype).to(device)


def main() -> int:
    dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=120))
    comm = TorchDistComm()
    rank, size = comm.rank, comm.size
    devices = ["cpu", *(["cuda"] if os.environ.get("HALF_CUDA") == "1" else [])]
    failures: list[str] = []

    def check(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
        same = (
            got.dtype == want.dtype
            and got.device == want.device
            and tuple(got.shape) == tuple(want.shape)
            and torch.equal(got.view(torch.int16), want.view(torch.int16))
        )
        if not same:
            failures.append(f"rank {rank} {what}: got {got!r}, want {want!r}")

    for device in devices:
        for dtype in (torch.bfloat16, torch.float16):
            tag = f"{device} {dtype}"
            right, left = (rank + 1) % size, (rank - 1) % size
            got = comm.sendrecv(values(rank, (3, 5), dtype, device), right, left, (3, 5))
            check(f"{tag} sendrecv", got, values(left, (3, 5), dtype, device))
            parts = comm.allgather(values(rank, (rank + 1, 2), dtype, device))
            for owner, part in enumerate(parts):
                check(
                    f"{tag} allgather part {owner}",
                    part,
                    values(owner, (owner + 1, 2), dtype, device),
                )
            root = size - 1
            got = comm.bcast(values(rank, (4,), dtype, device), root=root)
            check(f"{tag} bcast", got, values(root, (4,), dtype, device))
            total = sum(TRIPLE[r % 3] for r in range(size))  # exact in float64
            for shape in ((), (2, 3)):
                mine = torch.full(shape, TRIPLE[rank % 3], dtype=torch.float32)
                got = comm.allreduce(mine.to(dtype).to(device))
                want = torch.full(shape, total, dtype=torch.float32).to(dtype).to(device)
                check(f"{tag} allreduce {shape}", got, want)
    dist.barrier()
    dist.destroy_process_group()
    if failures:
        print("\n".join(failures), file=sys.stderr)
        return 1
    print(f"rank {rank}: ok on {', '.join(devices)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
