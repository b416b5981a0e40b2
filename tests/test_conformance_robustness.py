"""The conformance suite cannot be fooled or stalled by the implementation it judges.

An implementation is foreign code: it may write into its inputs, call ``sys.exit``, sleep
forever or need constructor arguments. None of that may corrupt the goldens, make the
command line exit 0, hang it, or end it in a traceback. The command-line tests run
``python -m portable_siglip.conformance`` in a subprocess on a small file in ``tmp_path``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from portable_siglip.conformance import __main__ as cli
from portable_siglip.conformance import check, load_cases

import portable_siglip as ps

# A correct numpy implementation, for files the command line loads by path.
RIGHT = """\
import numpy as np

def right(img, txt, scale, bias):
    z = scale * img @ txt.T + bias
    labels = 2 * np.eye(len(img)) - 1
    return np.logaddexp(0, -labels * z).sum() / len(img)
"""


def _write(tmp_path: Path, source: str, name: str = "my_losses.py") -> Path:
    path = tmp_path / name
    path.write_text(source, encoding="utf-8")
    return path


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "portable_siglip.conformance", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _flat(text: str) -> str:
    """`text` with every run of whitespace made one space (argparse wraps its help)."""
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------
# The goldens are not the implementation's to write into
# ---------------------------------------------------------------------------------------


def test_an_implementation_writing_into_its_inputs_corrupts_nothing() -> None:
    def vandal(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
        result = ps.sigmoid_loss_and_grad(img, txt, scale, bias)
        img[...] = 0.0  # writes into the array it was given
        txt *= 2.0
        return result

    try:
        check(vandal, loss="sigmoid")
        check(vandal, loss="sigmoid")  # the second run sees fresh arrays too
        report = check(ps.sigmoid_loss_and_grad, loss="sigmoid")
        assert report.passed, f"{len(report.failed)} of {len(report.results)} failed"
        fresh = load_cases.__wrapped__()
        for cached, case in zip(load_cases(), fresh, strict=True):
            np.testing.assert_array_equal(cached.img, case.img)
            np.testing.assert_array_equal(cached.txt, case.txt)
    finally:
        load_cases.cache_clear()  # never leave a corrupted cache to the other tests


def test_each_call_gets_its_own_arrays() -> None:
    seen: list[Any] = []

    def keep(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
        seen.append(img)
        return ps.sigmoid_loss(img, txt, scale, bias)

    cases = load_cases()[:2]
    check(keep, loss="sigmoid", cases=cases)
    check(keep, loss="sigmoid", cases=cases)
    assert len(seen) == 4
    assert all(img is not case.img for img in seen for case in cases)
    assert not np.shares_memory(seen[0], seen[2])  # the same case, called twice
    assert all(not np.shares_memory(img, case.img) for img in seen for case in cases)


# ---------------------------------------------------------------------------------------
# An escape from the implementation is a failure
# ---------------------------------------------------------------------------------------


def test_sys_exit_in_the_implementation_is_a_failed_check() -> None:
    def quitter(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
        sys.exit(0)

    report = check(quitter, loss="sigmoid", cases=load_cases()[:2])
    assert not report.passed
    assert report.failed
    assert all("SystemExit" in r.message for r in report.failed)


def test_cli_sys_exit_in_the_implementation_exits_1(tmp_path: Path) -> None:
    path = _write(tmp_path, "import sys\n\ndef siglip(img, txt, scale, bias):\n    sys.exit(0)\n")
    result = _cli("--loss", "sigmoid", "--impl", f"{path}:siglip", "--backend", "numpy")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "FAILED" in result.stdout, output
    assert "SystemExit" in result.stdout, output


def test_cli_sys_exit_at_import_is_a_usage_error(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "import sys\n\nsys.exit(0)\n\ndef siglip(img, txt, scale, bias):\n    pass\n"
    )
    result = _cli("--loss", "sigmoid", "--impl", f"{path}:siglip", "--backend", "numpy")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "SystemExit" in result.stderr, output
    assert "Traceback" not in output


# ---------------------------------------------------------------------------------------
# Timeouts
# ---------------------------------------------------------------------------------------


def test_check_times_out_a_sleeping_implementation() -> None:
    def sleeper(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
        time.sleep(3)
        return ps.sigmoid_loss_and_grad(img, txt, scale, bias)

    start = time.monotonic()
    report = check(sleeper, loss="sigmoid", timeout=0.2)
    assert time.monotonic() - start < 2.5  # one timeout, not one per case
    assert not report.passed
    assert any(r.message.startswith("timeout") for r in report.failed)
    assert all(not r.passed for r in report.results)
    assert any("timeout" in note for note in report.notes)
    assert "timeout" in str(report)


def test_check_timeout_must_be_positive() -> None:
    for timeout in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="`timeout` must be"):
            check(ps.sigmoid_loss, loss="sigmoid", timeout=timeout)


def test_check_timeout_leaves_a_fast_implementation_alone() -> None:
    report = check(ps.softmax_loss_and_grad, loss="softmax", timeout=60)
    assert report.passed, report.table()
    assert report.gradients_checked


def test_cli_times_out_a_sleeping_implementation(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "import time\n\ndef siglip(img, txt, scale, bias):\n    time.sleep(600)\n"
    )
    report_file = tmp_path / "report.json"
    start = time.monotonic()
    result = _cli(
        "--loss",
        "sigmoid",
        "--impl",
        f"{path}:siglip",
        "--backend",
        "numpy",
        "--timeout",
        "0.5",
        "--report",
        str(report_file),
        timeout=120,
    )
    elapsed = time.monotonic() - start
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert elapsed < 60, output  # neither one timeout per case nor waiting for the sleeper
    assert "timeout" in result.stdout, output
    data = json.loads(report_file.read_text(encoding="utf-8"))
    assert data["passed"] is False
    assert any(r["message"].startswith("timeout") for r in data["results"])


def test_cli_does_not_wait_for_threads_the_implementation_started(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        RIGHT
        + "\nimport threading, time\n\n"
        + "def lingering(img, txt, scale, bias):\n"
        + "    threading.Thread(target=time.sleep, args=(600,)).start()  # not a daemon\n"
        + "    return right(img, txt, scale, bias)\n",
    )
    for timeout in ("0", "60"):  # the calls run on the main thread, or in daemon threads
        result = _cli(
            "--loss", "sigmoid", "--impl", f"{path}:lingering", "--timeout", timeout, timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "PASSED" in result.stdout


def test_cli_timeout_must_not_be_negative() -> None:
    result = _cli("--loss", "sigmoid", "--timeout", "-1")
    assert result.returncode == 2
    assert "--timeout" in result.stderr


# ---------------------------------------------------------------------------------------
# Usage errors up front, not tracebacks at the end
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["directory", "under-a-file", "missing-folder"])
def test_cli_unwritable_report_is_a_usage_error_up_front(tmp_path: Path, where: str) -> None:
    path = _write(tmp_path, RIGHT)
    target = {
        "directory": tmp_path,
        "under-a-file": path / "report.json",
        "missing-folder": tmp_path / "nowhere" / "report.json",
    }[where]
    result = _cli(
        "--loss",
        "sigmoid",
        "--impl",
        f"{path}:right",
        "--backend",
        "numpy",
        "--report",
        str(target),
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "--report" in result.stderr, output
    assert "Traceback" not in output
    assert "PASSED" not in result.stdout, output  # checked before the checks ran
    assert not (tmp_path / "nowhere").exists()


def test_cli_report_check_leaves_no_file_on_a_usage_error(tmp_path: Path) -> None:
    report_file = tmp_path / "report.json"
    result = _cli("--loss", "sigmoid", "--impl", "nowhere_xyz:f", "--report", str(report_file))
    assert result.returncode == 2
    assert not report_file.exists()


def test_cli_class_needing_arguments_is_a_usage_error(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        RIGHT
        + "\n\nclass Loss:\n"
        + "    def __init__(self, rank, world_size):\n"
        + "        self.rank = rank\n\n"
        + "    def __call__(self, img, txt, scale, bias):\n"
        + "        return right(img, txt, scale, bias)\n",
    )
    result = _cli("--loss", "sigmoid", "--impl", f"{path}:Loss", "--backend", "numpy")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    assert "without arguments" in result.stderr, output
    assert "Loss" in result.stderr, output


# ---------------------------------------------------------------------------------------
# Friction
# ---------------------------------------------------------------------------------------


def test_cli_header_names_the_implementation_as_given(tmp_path: Path) -> None:
    path = _write(tmp_path, RIGHT)
    report_file = tmp_path / "report.json"
    spec = f"{path}:right"
    result = _cli(
        "--loss", "sigmoid", "--impl", spec, "--backend", "numpy", "--report", str(report_file)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert spec in result.stdout.splitlines()[0]
    assert "_conformance_impl_" not in result.stdout
    assert json.loads(report_file.read_text(encoding="utf-8"))["implementation"] == spec


def test_agreement_shows_progress_on_stderr(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "BACKENDS", ("numpy", "array_api_strict"))
    monkeypatch.setattr(cli, "DTYPES", ("float64", "float32"))
    assert cli.main(["--agreement", "--loss", "sigmoid"]) == 0
    captured = capsys.readouterr()
    progress = captured.err.splitlines()
    assert any("numpy" in line for line in progress), captured.err
    assert any("array_api_strict" in line for line in progress), captured.err
    assert len(progress) <= 6, captured.err  # a line per group, not a flood
    assert "numpy" in captured.out


def test_agreement_writes_its_report(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """--report with --agreement used to be ignored silently; it now holds every cell."""
    monkeypatch.setattr(cli, "BACKENDS", ("numpy", "no-such-backend"))
    monkeypatch.setattr(cli, "DTYPES", ("float64",))
    out = tmp_path / "agreement.json"
    assert cli.main(["--agreement", "--loss", "softmax", "--report", str(out)]) == 0
    cells = json.loads(out.read_text(encoding="utf-8"))["agreement"]
    assert cells[0]["backend"] == "numpy"
    assert cells[0]["passed"] is True
    assert cells[0]["worst"] < 1
    assert "passed" not in cells[1]  # the missing backend: no verdict
    assert str(out) in capsys.readouterr().out


def test_report_prints_short_and_keeps_the_table() -> None:
    def mean_over_pairs(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
        loss, grads = ps.sigmoid_loss_and_grad(img, txt, scale, bias)
        return loss / img.shape[0], grads

    report = check(mean_over_pairs, loss="sigmoid")
    assert not report.passed
    for text in (str(report), repr(report)):
        assert len(text) < 800, text
        assert "FAILED" in text
        assert f"{len(report.failed)} of {len(report.results)}" in text
        assert "mean-over-pairs" in text
    worst = max(report.failed, key=lambda r: r.error / r.tolerance)
    assert worst.case in str(report)
    table = report.table()
    assert len(table) > len(str(report))
    assert all(r.case in table for r in report.failed)
    assert "[mean-over-pairs]" in table

    passed = check(ps.sigmoid_loss_and_grad, loss="sigmoid")
    assert "PASSED" in str(passed)
    assert len(repr(passed)) < 800
    assert "PASSED" in passed.table()


def test_help_describes_every_option_with_its_default() -> None:
    parser = cli.build_parser()
    assert parser.description
    assert "\n" not in parser.description.strip()
    text = _flat(parser.format_help())
    for action in parser._actions:
        assert action.help, action.option_strings
        default = action.default
        # Flags (--agreement, --ids) are off unless given; their help says what they do.
        if action.nargs == 0 or default is None:
            continue
        assert f"default: {default}" in text, (action.option_strings, text)
    result = _cli("--help")
    assert result.returncode == 0
    assert "default: numpy" in _flat(result.stdout)
    assert "default: 60" in _flat(result.stdout)


def test_a_bare_torch_loss_is_differentiated_under_no_grad() -> None:
    """A caller inside torch.no_grad() must not get zero autodiff gradients (and a pass)."""
    torch = pytest.importorskip("torch")

    def dense(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
        logits = scale * img @ txt.T + bias
        labels = 2 * torch.eye(img.shape[0], dtype=img.dtype) - 1
        return -torch.nn.functional.logsigmoid(labels * logits).sum() / img.shape[0]

    with torch.no_grad():
        report = check(dense, loss="sigmoid", backend="torch")
    assert report.passed, report.table()
    assert report.gradients_checked


def test_the_mpi_watchdog_blames_the_rank_that_blocked() -> None:
    # Issue 24 item 6: which rank an overrun MPI run blames, from the ranks' states.
    from portable_siglip.conformance._distributed import _blame, _timeout_message

    def state(rank: int, step: int, user: bool, exchanging: bool) -> dict[str, Any]:
        what = "in the implementation's call on c" if user else "waiting for the others"
        where = "f.py:1 in g: comm.allreduce(x)" if exchanging else "f.py:2 in g: sleep(9)"
        return {"rank": rank, "step": step, "what": what, "user": user, "seconds": 4.0,
                "where": where, "exchanging": exchanging}  # fmt: skip

    # A factory blocking on rank 2, ranks 0 and 1 waiting in the suite.
    waiting = [state(0, -1, False, False), state(1, -1, False, False), state(2, -1, True, False)]
    assert _blame(waiting, 3) == [2]
    # A call blocking on rank 1; ranks 0 and 2 are in the same call, in an MPI exchange.
    exchange = [state(0, 5, True, True), state(1, 5, True, False), state(2, 5, True, True)]
    assert _blame(exchange, 3) == [1]
    # Rank 0 blocked in case 3 while rank 1, needing nothing from it, went on to case 9.
    assert _blame([state(0, 3, True, False), state(1, 9, True, True)], 2) == [0]
    # Every rank in an exchange: the suite cannot tell; it names them all.
    assert _blame([state(0, 5, True, True), state(1, 5, True, True)], 2) == [0, 1]
    # A rank that sends no state, the others waiting in the suite: that one.
    assert _blame([state(0, 9, False, False), None], 2) == [1]
    message = _timeout_message(exchange, 4.0)
    assert message.startswith("rank 1 blocked in the implementation's call on c"), message
    assert "rank 0 waited for it" in message
    assert "within 4 s (2 x --timeout, construction included)" in message
