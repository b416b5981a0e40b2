"""portable_siglip passes its own conformance suite on every backend and dtype."""

from __future__ import annotations

import doctest
import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import portable_siglip.conformance as conformance
import pytest
from portable_siglip.conformance import UsageError, check, load_cases
from portable_siglip.conformance.__main__ import load_implementation, main

import portable_siglip as ps

FUNCTIONS = {"sigmoid": ps.sigmoid_loss_and_grad, "softmax": ps.softmax_loss_and_grad}


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("backend", ["numpy", "array_api_strict", "torch", "jax"])
def test_portable_siglip_conforms(loss_name: str, backend: str, dtype: str) -> None:
    pytest.importorskip(backend)
    try:
        report = check(FUNCTIONS[loss_name], loss=loss_name, backend=backend, dtype=dtype)
    except UsageError as error:  # numpy has no bfloat16, array_api_strict no float16
        pytest.skip(str(error))
    assert report.passed, report.diagnosis + [str(r) for r in report.failed[:5]]
    assert report.gradients_checked
    # The block-size invariant ran: our functions take block_size.
    assert any(r.check == "blocks" for r in report.results)
    assert any(r.check == "permutation" for r in report.results)


def test_loss_only_numpy_is_value_only(loss_name: str) -> None:
    loss_only = {"sigmoid": ps.sigmoid_loss, "softmax": ps.softmax_loss}[loss_name]
    report = check(loss_only, loss=loss_name, backend="numpy")
    assert report.passed
    assert not report.gradients_checked
    assert any("gradients NOT checked" in note for note in report.notes)
    assert {r.quantity for r in report.results} == {"loss"}


def test_convention_rescales_the_goldens() -> None:
    def mean_convention(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
        loss, grads = ps.sigmoid_loss_and_grad(img, txt, scale, bias)
        n = img.shape[0]
        return loss / n, grads._replace(**{k: getattr(grads, k) / n for k in grads._fields})

    assert not check(mean_convention, loss="sigmoid").passed
    assert check(mean_convention, loss="sigmoid", convention="mean").passed
    assert not check(ps.sigmoid_loss_and_grad, loss="sigmoid", convention="mean").passed


def test_exceptions_are_failed_checks() -> None:
    def broken(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
        raise RuntimeError("kernel launch failed")

    report = check(broken, loss="softmax", cases=load_cases()[:3])
    assert not report.passed
    assert all("RuntimeError: kernel launch failed" in r.message for r in report.failed)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="`loss` must be"):
        check(ps.sigmoid_loss, loss="hinge")
    with pytest.raises(ValueError, match="`convention` must be"):
        check(ps.sigmoid_loss, loss="sigmoid", convention="median")
    with pytest.raises(ValueError, match=r"`backend` must be one of.*'tensorflow'"):
        check(ps.sigmoid_loss, loss="sigmoid", backend="tensorflow")
    with pytest.raises(ValueError, match=r"`dtype` must be one of.*'float8'"):
        check(ps.sigmoid_loss, loss="sigmoid", dtype="float8")


def test_usage_error_is_public_and_is_what_check_raises_on_what_cannot_run() -> None:
    assert "UsageError" in conformance.__all__
    with pytest.raises(ValueError, match="'tensorflow'") as raised:
        check(ps.sigmoid_loss, loss="sigmoid", backend="tensorflow")
    assert type(raised.value) is UsageError


def test_constants_are_read_only() -> None:
    with pytest.raises(TypeError):
        conformance.CONVENTIONS["median"] = lambda n: 1.0  # type: ignore[index]
    with pytest.raises(TypeError):
        conformance.TOLERANCE["float32"] = 1.0  # type: ignore[index]
    assert set(conformance.CONVENTIONS) == {"default", "mean", "sum"}


def test_every_public_class_and_function_has_examples() -> None:
    """The public names defined by the suite document themselves with a runnable example."""
    names = [name for name in conformance.__all__ if callable(getattr(conformance, name))]
    assert {"Case", "CheckResult", "Golden", "Report", "check", "load_cases"} <= set(names)
    for name in names:
        value = getattr(conformance, name)
        if value.__module__.startswith("portable_siglip.conformance"):
            _, _, examples = (value.__doc__ or "").partition("\n    Examples\n    --------\n")
            assert ">>> " in examples, f"{name} has no Examples section"


@pytest.mark.parametrize(
    "module",
    [
        "portable_siglip.conformance",
        "portable_siglip.conformance._cases",
        "portable_siglip.conformance._checks",
        "portable_siglip.conformance._errors",
        "portable_siglip.conformance._generate",
        "portable_siglip.conformance._ids",
        "portable_siglip.conformance._judged",
        "portable_siglip.conformance._naive",
        "portable_siglip.conformance._report",
    ],
)
def test_docstring_examples_run(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), verbose=False)
    assert result.attempted > 0, f"{module} has no examples"
    assert result.failed == 0


def test_load_implementation_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="MODULE:ATTR"):
        load_implementation("no_colon")
    with pytest.raises(UsageError, match="cannot import module"):
        load_implementation("surely_not_a_module_xyz:f")
    with pytest.raises(UsageError, match="no such file"):
        load_implementation(str(tmp_path / "missing.py") + ":f")
    source = tmp_path / "impl.py"
    source.write_text("def f(img, txt, scale, bias):\n    return 0.0\nvalue = 3\n")
    with pytest.raises(UsageError, match="has no attribute"):
        load_implementation(f"{source}:g")
    with pytest.raises(UsageError, match="not callable"):
        load_implementation(f"{source}:value")
    assert callable(load_implementation(f"{source}:f"))


def test_cli_report_and_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report_path = tmp_path / "report.json"
    status = main(["--loss", "softmax", "--dtype", "float32", "--report", str(report_path)])
    assert status == 0
    assert "PASSED" in capsys.readouterr().out
    data = json.loads(report_path.read_text())
    assert data["passed"] is True
    assert data["gradients_checked"] is True
    assert len(data["results"]) > 100
    assert main(["--loss", "sigmoid", "--impl", "nowhere_xyz:f"]) == 2
    assert "cannot import module" in capsys.readouterr().err


def test_cli_module_entry_point(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.py"
    wrong.write_text(
        "import numpy as np\n"
        "def loss(img, txt, scale, bias):\n"
        "    z = scale * img @ txt.T + bias\n"
        "    labels = 2 * np.eye(len(img)) - 1\n"
        "    return np.logaddexp(0, -labels * z).mean()  # mean over n^2 pairs\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "portable_siglip.conformance",
            "--loss",
            "sigmoid",
            "--impl",
            f"{wrong}:loss",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED" in result.stdout
    assert "[mean-over-pairs]" in result.stdout
    assert "gradients NOT checked" in result.stdout
