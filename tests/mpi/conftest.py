"""Tests that run on every rank of ``mpirun -n W python -m mpi4py -m pytest tests/mpi``.

Without mpirun they run as a single MPI process (W = 1). Every rank collects and runs the
same tests in the same order; a failure on any rank of a multi-rank job aborts the whole
job at once (``MPI_Abort``), so a rank that fails can never leave the others waiting in
an exchange.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from helpers import mpi_usable

# Each test module skips itself unless MPI is usable (``helpers.skip_without_mpi``): mpi4py
# installed without an MPI library, as on a GPU host without an MPI runtime, raises
# RuntimeError on ``from mpi4py import MPI``, not ImportError.
MPI: Any = None
if mpi_usable():
    from mpi4py import MPI


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if MPI is None:
        return
    world = MPI.COMM_WORLD
    if report.failed and world.Get_size() > 1:
        import sys

        print(
            f"\nrank {world.Get_rank()}: {item.nodeid} failed in {report.when}; aborting the job\n"
            f"{report.longreprtext}",
            file=sys.stderr,
            flush=True,
        )
        world.Abort(1)
