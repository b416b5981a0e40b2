"""``python -m portable_siglip doctor``: exit statuses, the JSON report, injected failures.

The doctor runs in this process through ``_cli.main`` (the MPI and torch.distributed checks
still run in worker processes of their own), with the block-size probe shrunk to a small
problem; the failure tests inject a broken transport or a loss that is off by 1%.
"""

from __future__ import annotations

import argparse
import contextlib
import doctest
import importlib.util
import io
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import mpi_usable, run_python

import portable_siglip as ps
from portable_siglip import _losses
from portable_siglip.cli import _commands as _cli
from portable_siglip.cli import _devices, _doctor

SECTIONS = {"inventory", "agreement", "transports", "block_size"}
#: mpi4py counts only with an MPI library it can load: without one the doctor skips it.
HAVE = {"mpi4py": mpi_usable(), "torch": importlib.util.find_spec("torch") is not None}

#: Items that need a GPU, by section.
GPU_ITEMS = {
    "inventory": ["torch CUDA", "jax GPU", "cupy CUDA"],
    "agreement": ["torch cuda", "jax cuda", "cupy cuda"],
    "transports": ["torch.distributed nccl", "NCCLComm (cupy)"],
    "block_size": ["torch cuda", "cupy cuda"],
}


def run_doctor(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = _cli.main(["doctor", *argv])
    return status, out.getvalue()


def items(report: dict[str, Any], section: str) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in report["sections"][section]["items"]}


@pytest.fixture(scope="module")
def doctor(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, dict[str, Any]]:
    """One full doctor run on this machine (``--probe``), with a small block-size probe."""
    path = tmp_path_factory.mktemp("doctor") / "doctor.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_doctor, "PROBE_CPU", (512, 32))
        status, out = run_doctor("--probe", "--report", str(path))
    return status, out, json.loads(path.read_text())


def test_doctor_exits_0_here_with_every_section(doctor: tuple[int, str, dict[str, Any]]) -> None:
    status, out, report = doctor
    assert status == 0, out
    assert set(report["sections"]) == SECTIONS
    assert report["status"] == 0
    assert report["counts"]["failed"] == 0
    assert report["counts"]["ok"] >= 8
    for key, section in report["sections"].items():
        assert section["items"], key
        for item in section["items"]:
            assert item["status"] in ("ok", "skipped"), item
            assert item["seconds"] >= 0
            assert item["detail"], item  # a version, what was checked, or why it was skipped
    assert "\ndoctor: ok (" in out
    # One line per item on stdout, with its verdict.
    for section in report["sections"].values():
        for item in section["items"]:
            assert f"  {item['name']:<26} {item['status']}: " in out, item["name"]


def test_inventory_names_what_is_installed(doctor: tuple[int, str, dict[str, Any]]) -> None:
    inventory = items(doctor[2], "inventory")
    assert inventory["portable_siglip"]["data"]["version"] == ps.__version__
    assert inventory["numpy"]["data"]["version"] == np.__version__
    assert inventory["python"]["status"] == "ok"
    for name, installed in HAVE.items():
        assert inventory[name]["status"] == ("ok" if installed else "skipped"), inventory[name]
    if HAVE["mpi4py"]:
        assert inventory["mpi4py"]["data"]["mpi_version"][0].isdigit()


def test_agreement_checks_both_losses_on_every_cpu_backend(
    doctor: tuple[int, str, dict[str, Any]],
) -> None:
    agreement = items(doctor[2], "agreement")
    cases, dtypes = len(_doctor.AGREEMENT_CASES), len(_doctor.AGREEMENT_DTYPES)
    assert agreement["numpy cpu"]["status"] == "ok"
    # Both losses, five quantities each (loss and four gradients), every case and dtype.
    assert agreement["numpy cpu"]["data"]["checks"] == 2 * 5 * cases * dtypes
    assert 0 < agreement["numpy cpu"]["data"]["worst_over_tolerance"]["float32"] < 1
    for backend in ("torch", "jax", "array_api_strict"):
        installed = importlib.util.find_spec(backend) is not None
        assert agreement[f"{backend} cpu"]["status"] == ("ok" if installed else "skipped")


def test_gpu_parts_are_skipped_with_a_reason(doctor: tuple[int, str, dict[str, Any]]) -> None:
    if _devices.gpu_backends():
        pytest.skip("this machine has a GPU")
    report = doctor[2]
    for section, names in GPU_ITEMS.items():
        found = items(report, section)
        for name in names:
            assert found[name]["status"] == "skipped", (section, name)
            reason = found[name]["detail"]
            assert "not installed" in reason or "no CUDA device" in reason or "no GPU" in reason


def test_gloo_mpi_and_threads_transports_work(doctor: tuple[int, str, dict[str, Any]]) -> None:
    transports = items(doctor[2], "transports")
    assert transports["ThreadGroup(2)"]["status"] == "ok"
    assert transports["ThreadGroup(2)"]["data"]["ranks"] == 2
    expected = {"MPIComm (COMM_SELF)": HAVE["mpi4py"], "torch.distributed gloo": HAVE["torch"]}
    for name, installed in expected.items():
        item = transports[name]
        assert item["status"] == ("ok" if installed else "skipped"), item
        if installed:
            # Every schedule of both losses ran over the transport.
            assert item["data"]["schedules"] == 6
            assert item["data"]["worst_relative_difference"] <= _doctor.SHARDED_RTOL


def test_block_size_probe_reports_the_best_and_the_default(
    doctor: tuple[int, str, dict[str, Any]],
) -> None:
    probe = items(doctor[2], "block_size")["numpy cpu"]
    assert probe["status"] == "ok"
    data = probe["data"]
    assert (data["n"], data["d"]) == (512, 32)
    assert set(data["seconds"]) == {"256", "512"}  # 1024 and above are capped at n
    assert data["default_block"] == 512  # the host default, 1024, capped at n
    assert str(data["best_block"]) in data["seconds"]
    assert data["default_over_best"] >= 1


def test_quick_skips_the_probe(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(_doctor, "transport_checks", lambda timeout: [])
    monkeypatch.setattr(_doctor, "agreement_checks", lambda: [])
    path = tmp_path / "quick.json"
    assert _cli.main(["doctor", "--quick", "--report", str(path)]) == 0
    probe = json.loads(path.read_text())["sections"]["block_size"]["items"]
    assert [(item["status"], item["detail"]) for item in probe] == [("skipped", "--quick")]


def _fast_doctor(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Leave the inventory as it is, drop agreement and transports; record probe calls."""
    ran: list[str] = []

    def probe() -> tuple[str, dict[str, Any]]:
        ran.append("probe")
        return "timed", {"best_block": 512}

    def probe_checks() -> list[tuple[str, Any]]:
        ran.append("probe_checks")
        return [("numpy cpu", probe)]

    monkeypatch.setattr(_doctor, "transport_checks", lambda timeout: [])
    monkeypatch.setattr(_doctor, "agreement_checks", lambda: [("numpy cpu", lambda: ("ok", {}))])
    monkeypatch.setattr(_doctor, "probe_checks", probe_checks)
    return ran


def test_default_does_not_run_the_probe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The probe took 30 s per backend on a loaded 2-core machine: only `--probe` runs it."""
    ran = _fast_doctor(monkeypatch)
    path = tmp_path / "default.json"
    status, out = run_doctor("--report", str(path))
    assert status == 0, out
    assert ran == []
    report = json.loads(path.read_text())
    assert (report["quick"], report["probe"]) == (True, False)
    probe = report["sections"]["block_size"]["items"]
    assert [item["status"] for item in probe] == ["skipped"]
    assert "`doctor --probe`" in probe[0]["detail"]


def test_probe_option_runs_the_probe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ran = _fast_doctor(monkeypatch)
    path = tmp_path / "probe.json"
    status, out = run_doctor("--probe", "--report", str(path))
    assert status == 0, out
    assert ran == ["probe_checks", "probe"]
    report = json.loads(path.read_text())
    assert (report["quick"], report["probe"]) == (False, True)
    probe = items(report, "block_size")["numpy cpu"]
    assert (probe["status"], probe["detail"]) == ("ok", "timed")


def test_quick_and_probe_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _cli.main(["doctor", "--quick", "--probe"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_progress_says_which_check_runs_on_stderr(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One line per check on stderr, before it runs; the report alone on stdout."""
    seen: list[str] = []
    out: list[str] = []

    def check() -> tuple[str, dict[str, Any]]:
        before = capsys.readouterr()
        seen.append(before.err)  # what stderr said before this check ran
        out.append(before.out)
        return "looked", {}

    monkeypatch.setattr(_doctor, "inventory_checks", lambda: [("first", check), ("second", check)])
    monkeypatch.setattr(_doctor, "agreement_checks", lambda: [("numpy cpu", check)])
    monkeypatch.setattr(_doctor, "transport_checks", lambda timeout: [("ThreadGroup(2)", check)])
    monkeypatch.setattr(_doctor, "probe_checks", lambda: [("numpy cpu", check)])
    assert _cli.main(["doctor", "--probe"]) == 0
    out.append(capsys.readouterr().out)
    assert [text.splitlines()[-1].split("] ", 1)[1] for text in seen] == [
        "inventory: first ...",
        "inventory: second ...",
        "agreement: numpy cpu ...",
        "transports: ThreadGroup(2) ...",
        "block size: numpy cpu ...",
    ]
    assert all(text.splitlines()[-1].startswith("doctor: [0:00:") for text in seen)
    stdout = "".join(out)
    assert "doctor: [" not in stdout
    assert "  first " in stdout
    assert "\ndoctor: ok (5 ok, 0 skipped, 0 failed" in stdout


def test_a_broken_transport_exits_1(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken(timeout: float) -> tuple[str, dict[str, Any]]:
        raise RuntimeError("injected: the process group did not form")

    monkeypatch.setattr(_doctor, "transport_gloo", broken)
    path = tmp_path / "broken.json"
    status, out = run_doctor("--quick", "--report", str(path))
    assert status == 1, out
    report = json.loads(path.read_text())
    assert report["status"] == 1
    assert report["counts"]["failed"] == 1
    gloo = items(report, "transports")["torch.distributed gloo"]
    assert gloo["status"] == "failed"
    assert gloo["detail"] == "RuntimeError: injected: the process group did not form"
    assert "torch.distributed gloo" in out.split("\ndoctor: FAILED")[1]
    assert "FAILED: RuntimeError: injected" in out


def test_a_loss_off_by_one_percent_exits_1(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    right = _losses.evaluate

    def off(spec: Any, *args: Any, **kwargs: Any) -> Any:
        loss, grads = right(spec, *args, **kwargs)
        return (loss * 1.01 if spec.name == "sigmoid" else loss), grads

    monkeypatch.setattr(_losses, "evaluate", off)  # what doctor calls for each loss
    monkeypatch.setattr(_doctor, "transport_checks", lambda timeout: [])
    path = tmp_path / "off.json"
    status, out = run_doctor("--quick", "--report", str(path))
    assert status == 1, out
    agreement = items(json.loads(path.read_text()), "agreement")
    assert agreement["numpy cpu"]["status"] == "failed"
    failures = agreement["numpy cpu"]["data"]["failures"]
    cases, dtypes = len(_doctor.AGREEMENT_CASES), len(_doctor.AGREEMENT_DTYPES)
    assert len(failures) == cases * dtypes  # the sigmoid loss, on every case and dtype
    assert all(f.startswith("sigmoid") and " loss: error " in f for f in failures), failures
    for name, item in agreement.items():
        assert item["status"] in ("failed", "skipped"), name


def test_report_to_a_directory_exits_2_before_checking(tmp_path: Path) -> None:
    result = run_python("-m", "portable_siglip", "doctor", "--report", str(tmp_path), timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "is a directory" in result.stderr
    assert result.stdout == ""


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full on this system")
def test_report_to_a_full_device_exits_2_before_checking() -> None:
    """/dev/full opens and refuses every byte: refused up front, not after the whole run."""
    result = run_python(
        "-m", "portable_siglip", "doctor", "--quick", "--report", "/dev/full", timeout=60
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "cannot write '/dev/full'" in result.stderr
    assert result.stdout == ""


def test_a_hanging_worker_is_killed_at_its_timeout() -> None:
    start = time.monotonic()
    with pytest.raises(_doctor.BrokenError, match=r"no answer within 1 s"):
        _doctor.run_worker([sys.executable, "-c", "import time; time.sleep(60)"], timeout=1)
    assert time.monotonic() - start < 20


@pytest.mark.parametrize(
    ("code", "says"),
    [
        ("import sys; print('boom', file=sys.stderr); sys.exit(3)", "exit status 3 .*: boom"),
        ("import os; os.abort()", "killed by SIGABRT"),
        ("print('no result line')", "exit status 0 and no result"),
    ],
)
def test_a_worker_that_fails_is_reported(code: str, says: str) -> None:
    with pytest.raises(_doctor.BrokenError, match=says):
        _doctor.run_worker([sys.executable, "-c", code], timeout=30)


def test_exercise_finds_a_transport_that_corrupts_data() -> None:
    from portable_siglip.comm import ThreadGroup

    def corrupting(comm: Any) -> Any:
        right = comm.allreduce

        def allreduce(x: Any) -> Any:
            return right(x) + 1.0

        comm.allreduce = allreduce
        return _doctor.exercise(comm, np.asarray)

    with pytest.raises(_doctor.BrokenError, match="allreduce returned wrong values"):
        ThreadGroup(2).run(corrupting)


@pytest.mark.parametrize("world", [1, 2])
def test_exercise_passes_on_nccl_comm_over_the_fake(world: int) -> None:
    from test_nccl_comm import on_fake

    details = on_fake(world, lambda comm: _doctor.exercise(comm, np.asarray))
    assert all(data["ranks"] == world and data["schedules"] == 6 for _, data in details)


def test_mpi4py_without_its_library_is_skipped_not_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The GPU host's mpi4py has no libmpi: the doctor says so and does not fail."""
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed")
    monkeypatch.setenv("MPI4PY_LIBMPI", "/nonexistent/libmpi.so")  # the workers inherit it
    for name, check in (
        ("mpi4py", _doctor._mpi4py),
        ("MPIComm (COMM_SELF)", lambda: _doctor.transport_mpi(60)),
    ):
        item = _doctor.run_check(name, check)
        assert item.status == "skipped", item
        assert "mpi4py installed, no MPI library (" in item.detail, item.detail


@pytest.mark.parametrize("missing", ["mpi4py", "mpi4py.MPI"])
def test_nccl_check_needs_no_mpi(missing: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without mpi4py, or with mpi4py and no MPI library, NCCLComm is made by single()."""
    from fake_nccl import FakeNccl, FakeRuntime

    monkeypatch.setitem(sys.modules, missing, None)  # importing it raises ImportError
    if missing == "mpi4py.MPI" and "mpi4py" in sys.modules and sys.modules["mpi4py"] is not None:
        # Once another test has imported mpi4py.MPI, `from mpi4py import MPI` finds it as
        # an attribute of the package, whatever sys.modules says.
        monkeypatch.delattr(sys.modules["mpi4py"], "MPI", raising=False)
    comm, how = _doctor.nccl_bootstrap(FakeRuntime(FakeNccl()))
    assert how == "single(), without MPI"
    assert (comm.rank, comm.size, comm.device, comm.mpi_comm) == (0, 1, 0, None)
    _, data = _doctor.exercise(comm, np.asarray)
    assert data["schedules"] == 6


@pytest.mark.parametrize("preset", [None, "true"])
def test_doctor_keeps_jax_from_preallocating_the_gpus(
    preset: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch, cupy and jax share the GPUs in the doctor: jax must not take 75% of each."""
    seen: list[str | None] = []

    def check() -> tuple[str, dict[str, Any]]:
        seen.append(os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"))
        return "looked", {}

    if preset is None:
        monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    else:
        monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", preset)
    monkeypatch.setattr(_doctor, "inventory_checks", lambda: [("jax", check)])
    monkeypatch.setattr(_doctor, "agreement_checks", lambda: [])
    monkeypatch.setattr(_doctor, "transport_checks", lambda timeout: [])
    status, out = run_doctor("--quick")
    assert status == 0, out
    assert seen == ["false" if preset is None else preset]  # the user's value is kept


def test_docstring_examples_run() -> None:
    result = doctest.testmod(_doctor, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0


def test_import_does_not_load_the_doctor() -> None:
    code = "import sys, portable_siglip; print('portable_siglip.cli._doctor' in sys.modules)"
    result = run_python("-c", code, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_help_describes_every_option_and_its_default() -> None:
    parser = _cli.build_parser()
    sub = next(
        action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
    ).choices["doctor"]
    assert sub.description
    assert "Exit status" in sub.description
    formatter = sub._get_formatter()
    for action in sub._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, action.option_strings
        if action.default is not None and action.default is not False:
            assert "(default" in (formatter._get_help_string(action) or ""), action.dest


@pytest.fixture(autouse=True)
def _no_leftover_process_group() -> Iterator[None]:
    yield
    if HAVE["torch"]:
        import torch.distributed as dist

        assert not (dist.is_available() and dist.is_initialized())
