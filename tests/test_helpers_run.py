"""The test helpers' process runners: a timed-out child is asked to stop before it is killed,
and a hung or failed rank of a torch.distributed job is named with its output.

``mpirun`` forwards SIGTERM to its ranks; a SIGKILL of ``mpirun`` alone leaves them running,
so a hung MPI test must end its job with SIGTERM first.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import run_captured, run_torch_ranks

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


# The runner of torch.distributed jobs (run_torch_ranks) with plain Python "ranks": what it
# reports when a rank hangs or fails, and its one new start when MASTER_PORT was taken.
_RANK = """
import os, sys, time
from pathlib import Path

rank = int(os.environ["RANK"])
behaviour = os.environ["BEHAVIOUR"].split(",")[rank]
if behaviour == "hang":
    print(f"rank {rank} waits for ever", flush=True)
    time.sleep(600)
elif behaviour == "fail":
    sys.exit(f"rank {rank} gave up")
elif behaviour == "port-once":
    marker = Path(sys.argv[1])
    if not marker.exists():
        marker.write_text("1")
        sys.exit("RuntimeError: ... EADDRINUSE: address already in use")
print(f"rank {rank} port {os.environ['MASTER_PORT']}", flush=True)
"""


def _ranks(tmp_path: Path, behaviour: str, timeout: float) -> list[str]:
    script = tmp_path / "rank.py"
    script.write_text(_RANK)
    world = len(behaviour.split(","))
    marker = str(tmp_path / "marker")
    return run_torch_ranks(script, world, marker, env={"BEHAVIOUR": behaviour}, timeout=timeout)


def test_a_hung_rank_is_named_with_where_it_waited(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception) as caught:
        _ranks(tmp_path, "ok,hang,ok", timeout=5)
    message = str(caught.value)
    assert "rank 1 still running" in message
    assert "rank 0 exited 0" in message
    assert "rank 1 waits for ever" in message  # its output so far
    assert 'rank.py", line 9 in <module>' in message  # the fault handler's stack: the sleep


def test_a_failed_rank_ends_the_job_before_the_timeout(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(AssertionError) as caught:
        _ranks(tmp_path, "fail,hang", timeout=120)
    assert time.monotonic() - start < 60  # 15 s of grace, not the 120 s timeout
    assert "exit codes [1, None]" in str(caught.value)
    assert "rank 0 gave up" in str(caught.value)


def test_a_taken_port_starts_the_job_once_more(tmp_path: Path) -> None:
    outputs = _ranks(tmp_path, "port-once,ok", timeout=60)
    assert outputs[0].startswith("rank 0 port ")
    first_port = outputs[0].split()[-1]
    assert outputs[1] == f"rank 1 port {first_port}\n"  # both ranks of the second start
