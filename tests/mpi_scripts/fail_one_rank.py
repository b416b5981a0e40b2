"""Rank 1 fails in the middle of a distributed loss: it raises, or kills itself.

Usage: ``mpirun -n W python -m mpi4py fail_one_rank.py raise|kill``. The other ranks are
then blocked in an exchange with rank 1; the job must end with an error, not hang.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import numpy as np
from portable_siglip.backends.mpi import MPIComm

import portable_siglip as ps


class FailsMidRing(MPIComm):
    """MPIComm whose rank 1 fails at its third exchange."""

    calls = 0

    def isendrecv(self, send: Any, dest: int, source: int, shape: Any, *, tag: int = 0) -> Any:
        self.calls += 1
        if self.rank == 1 and self.calls == 3:
            if sys.argv[1] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("injected failure on rank 1")
        return super().isendrecv(send, dest, source, shape, tag=tag)


comm = FailsMidRing()
rng = np.random.default_rng(0)
img = rng.standard_normal((4, 3))
ps.sigmoid_loss_and_grad(img, img, 10.0, -10.0, comm=comm, strategy="shift")
print(f"rank {comm.rank} finished", flush=True)
