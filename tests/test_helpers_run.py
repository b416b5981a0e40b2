"""The test helpers' process runner: a timed-out child is asked to stop before it is killed.

``mpirun`` forwards SIGTERM to its ranks; a SIGKILL of ``mpirun`` alone leaves them running,
so a hung MPI test must end its job with SIGTERM first.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_captured

_CHILD = """
import signal, sys, time
from pathlib import Path

def stop(signum, frame):
    Path(sys.argv[1]).write_text("terminated")
    sys.exit(0)

signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(60)
"""


def test_a_timed_out_child_gets_sigterm_first(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    with pytest.raises(subprocess.TimeoutExpired) as caught:
        run_captured([sys.executable, "-c", _CHILD, str(marker)], timeout=3)
    assert marker.read_text() == "terminated"
    assert "ready" in (caught.value.output or "")


def test_a_finished_child_returns_its_status_and_output() -> None:
    code = "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"
    result = run_captured([sys.executable, "-c", code], timeout=30)
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
