"""``python -m portable_siglip run``: output, --verify, exit statuses."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any

import pytest
from helpers import run_python

from portable_siglip import _losses
from portable_siglip.cli import _commands as _cli

SMALL = ["--batch", "300", "--dim", "16", "--block-size", "64"]


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
@pytest.mark.parametrize(
    ("backend", "dtype"),
    [
        ("numpy", "float32"),
        ("numpy", "float64"),
        ("array_api_strict", "float32"),
        ("torch", "bfloat16"),
        ("jax", "float16"),
    ],
)
def test_run_verify_passes(
    capsys: pytest.CaptureFixture[str], loss: str, backend: str, dtype: str
) -> None:
    pytest.importorskip(backend)
    status = _cli.main(
        ["run", "--loss", loss, "--backend", backend, "--dtype", dtype, *SMALL, "--verify"]
    )
    out = capsys.readouterr().out
    assert status == 0, out
    for field in ("loss", "|grad img|", "|grad txt|", "wall time", "peak extra mem", "verify: ok"):
        assert field in out


def _off_by_one_percent(loss: Any, grads: Any) -> tuple[Any, Any]:
    return loss * 1.01, grads


def _transposed(loss: Any, grads: Any) -> tuple[Any, Any]:
    return loss, grads._replace(img=grads.txt, txt=grads.img)


@pytest.mark.parametrize(
    ("loss", "wrong", "verdict"),
    [
        ("sigmoid", _off_by_one_percent, "verify: FAILED (loss)"),
        ("softmax", _transposed, "verify: FAILED (grads.img, grads.txt)"),
    ],
)
def test_run_verify_catches_a_wrong_result(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    loss: str,
    wrong: Callable[[Any, Any], tuple[Any, Any]],
    verdict: str,
) -> None:
    original = _losses.evaluate

    def evaluate(spec: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        value, grads = original(spec, *args, **kwargs)
        return wrong(value, grads) if spec.name == loss else (value, grads)

    monkeypatch.setattr(_losses, "evaluate", evaluate)  # what run calls, with the loss named
    assert _cli.main(["run", "--loss", loss, *SMALL, "--verify"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out
    assert verdict in out


def test_invalid_value_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli.main(["run", *SMALL, "--scale", "0"]) == 2
    assert "`scale` must be the positive multiplier" in capsys.readouterr().err


def test_unknown_strategy_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli.main(["run", *SMALL, "--loss", "softmax", "--strategy", "bidir"]) == 2
    assert "`strategy` for the softmax loss" in capsys.readouterr().err


def test_bad_option_value_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _cli.main(["run", "--batch", "0"])
    assert exit_info.value.code == 2
    assert "expected a positive integer, got 0" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="cupy is installed")
def test_missing_backend_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli.main(["run", *SMALL, "--backend", "cupy"]) == 2
    assert "`backend`: 'cupy' is not installed" in capsys.readouterr().err


def test_missing_dtype_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("array_api_strict")
    assert _cli.main(["run", *SMALL, "--backend", "array_api_strict", "--dtype", "float16"]) == 2
    assert "backend 'array_api_strict' has no dtype 'float16'" in capsys.readouterr().err


def test_numpy_bfloat16_is_ml_dtypes(capsys: pytest.CaptureFixture[str]) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    np = pytest.importorskip("numpy")
    assert _cli.load_run_backend("numpy", "bfloat16")[1] == np.dtype(ml_dtypes.bfloat16)
    assert _cli.main(["run", *SMALL, "--dtype", "bfloat16", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "backend=numpy" in out
    assert "dtype=bfloat16" in out
    assert "verify: ok" in out


def test_numpy_bfloat16_without_ml_dtypes_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # import ml_dtypes raises ImportError
    assert _cli.main(["run", *SMALL, "--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err
    assert "backend 'numpy' has no dtype 'bfloat16' without ml_dtypes: pip install ml-dtypes" in err


def test_module_entry_point() -> None:
    argv = ["run", "--batch", "64", "--dim", "8", "--verify"]
    result = run_python("-m", "portable_siglip", *argv, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "verify: ok" in result.stdout


def test_same_seed_same_features() -> None:
    np = pytest.importorskip("numpy")
    first = _cli.random_pairs(np, 10, 4, seed=3)
    second = _cli.random_pairs(np, 10, 4, seed=3)
    other = _cli.random_pairs(np, 10, 4, seed=4)
    np.testing.assert_array_equal(first[0], second[0])
    assert not np.allclose(first[0], other[0])
    np.testing.assert_allclose(np.linalg.norm(first[1], axis=1), 1.0)


def test_shards_of_the_batch_are_rows_of_the_full_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    np = pytest.importorskip("numpy")
    monkeypatch.setattr(_cli, "CHUNK_ROWS", 4)  # shards cross chunk boundaries
    full_img, full_txt = _cli.random_pairs(np, 11, 3, seed=5)
    for world in (1, 2, 3, 5):
        pieces = [
            _cli.random_pairs(np, 11, 3, seed=5, rows=_cli.shard(11, world, r))
            for r in range(world)
        ]
        np.testing.assert_array_equal(np.concatenate([p[0] for p in pieces]), full_img)
        np.testing.assert_array_equal(np.concatenate([p[1] for p in pieces]), full_txt)
    assert [_cli.shard(11, 3, r) for r in range(3)] == [(0, 3), (3, 7), (7, 11)]


@pytest.mark.parametrize(
    ("loss", "strategy"), [("sigmoid", "bidir"), ("sigmoid", "gather"), ("softmax", "ring")]
)
def test_run_sharded_over_a_thread_group(
    capsys: pytest.CaptureFixture[str], loss: str, strategy: str
) -> None:
    from portable_siglip.comm import ThreadGroup

    argv = ["run", "--loss", loss, "--strategy", strategy, *SMALL, "--verify"]
    statuses = ThreadGroup(3).run(lambda comm: _cli.main(argv, comm=comm))
    out = capsys.readouterr().out
    assert statuses == [0, 0, 0], out
    assert f"ranks           3 (ThreadComm), strategy {strategy}" in out
    assert "loss identical on every rank: yes" in out
    assert out.count("verify: ok") == 1
    # 300 rows over 3 ranks: 100 each, and each rank sent something.
    rows = [line.split() for line in out.splitlines() if line.startswith("       ")]
    assert [int(row[1]) for row in rows] == [100, 100, 100]
    assert all(float(row[3]) > 0 for row in rows)


def test_run_sharded_verify_catches_one_wrong_rank(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from portable_siglip.comm import ThreadGroup

    original = _losses.evaluate

    def wrong_on_rank_2(*args: Any, **kwargs: Any) -> Any:
        loss, grads = original(*args, **kwargs)
        return (loss * 1.01 if kwargs["comm"].rank == 2 else loss), grads

    monkeypatch.setattr(_losses, "evaluate", wrong_on_rank_2)
    statuses = ThreadGroup(3).run(lambda comm: _cli.main(["run", *SMALL, "--verify"], comm=comm))
    out = capsys.readouterr().out
    assert statuses == [1, 1, 1], out
    assert "loss identical on every rank: NO" in out
    assert "verify: FAILED (the ranks returned different losses)" in out


@pytest.mark.parametrize("command", ["run", "bench"])
def test_help_describes_every_option_and_its_default(command: str) -> None:
    parser = _cli.build_parser()
    sub = next(
        action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
    ).choices[command]
    text = sub.format_help()
    assert sub.description
    assert sub.description.split(".")[0] in " ".join(text.split())
    formatter = sub._get_formatter()
    for action in sub._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, f"{command} {action.option_strings[0]} has no help"
        shown = formatter._get_help_string(action) or ""
        if action.default is not None and action.default is not False:
            assert "(default" in shown, f"{command} {action.option_strings[0]}: {shown!r}"


def test_strategy_without_ranks_warns(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli.main(["run", *SMALL, "--strategy", "shift"]) == 0
    err = capsys.readouterr().err
    assert "--strategy shift has no effect in one process" in err
    assert "mpirun -n W" in err


def test_strategy_of_the_other_loss_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli.main(["run", *SMALL, "--strategy", "ring"]) == 2
    err = capsys.readouterr().err
    assert "`strategy` for the sigmoid loss must be one of" in err
    assert "no effect" not in err


@pytest.fixture
def no_jax_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset XLA_PYTHON_CLIENT_PREALLOCATE for the test; restored afterwards."""
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)


@pytest.mark.parametrize("error", [TypeError, ValueError, RuntimeError])
def test_error_inside_a_run_is_an_internal_error(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    no_jax_setting: None,
    error: type[Exception],
) -> None:
    # What MPIComm raised when it staged bfloat16 through NumPy: a library's fault, not the
    # user's, so not exit 2 with "error: ...", which reads as a mistake in the options.
    def fails(*args: Any, **kwargs: Any) -> Any:
        raise error("Got unsupported ScalarType BFloat16")

    monkeypatch.setattr(_losses, "evaluate", fails)
    assert _cli.main(["run", *SMALL]) == 1
    err = capsys.readouterr().err
    assert f"run: internal error: {error.__name__}: Got unsupported ScalarType BFloat16" in err
    assert "not a problem with the options" in err
    assert "Traceback (most recent call last)" in err
    assert "in fails" in err  # the traceback reaches where it was raised
    assert "run: error:" not in err


def test_error_in_verify_is_an_internal_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, no_jax_setting: None
) -> None:
    def fails(*args: Any, **kwargs: Any) -> Any:
        raise TypeError("cannot convert")

    monkeypatch.setattr(_cli, "to_numpy", fails)
    assert _cli.main(["run", *SMALL, "--verify"]) == 1
    assert "run: internal error: TypeError: cannot convert" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--scale", "nan"], "`scale` must be the positive multiplier t = exp(t')"),
        (["--scale=-inf"], "`scale` must be the positive multiplier t = exp(t')"),
        (["--scale=-2"], "a finite number > 0, got -2"),
        (["--bias", "inf"], "`bias` must be finite, got inf"),
        (["--bias", "nan"], "`bias` must be finite, got nan"),
    ],
)
def test_values_the_loss_refuses_are_usage_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert _cli.main(["run", *SMALL, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert "internal error" not in err


def test_softmax_ignores_the_bias() -> None:
    assert _cli.main(["run", "--loss", "softmax", *SMALL, "--bias", "nan"]) == 0


def test_jax_preallocation_is_limited_unless_jax_owns_the_gpu() -> None:
    env: dict[str, str] = {}
    assert _cli.limit_jax_preallocation("torch", env)
    assert env == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    for backend in ("numpy", "cupy", "array_api_strict"):
        assert _cli.limit_jax_preallocation(backend, env := {})
        assert env[_cli.JAX_PREALLOCATE] == "false"
    assert not _cli.limit_jax_preallocation("jax", env := {})
    assert env == {}
    assert not _cli.limit_jax_preallocation("cupy", env := {_cli.JAX_PREALLOCATE: "true"})
    assert env == {_cli.JAX_PREALLOCATE: "true"}  # the user's setting stays


def test_run_sets_jax_preallocation_in_its_process() -> None:
    # A fresh process, without the variable: `run` on numpy sets it, `run` on jax does not.
    code = (
        "import os, sys\n"
        "from portable_siglip.cli import _commands as _cli\n"
        "status = _cli.main(['run', '--backend', 'numpy', '--batch', '8', '--dim', '4'])\n"
        "print('status', status, 'env', os.environ.get(_cli.JAX_PREALLOCATE))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != _cli.JAX_PREALLOCATE}
    result = run_python("-c", code, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert "status 0 env false" in result.stdout
    jax_run = code.replace("'numpy'", "'jax'")
    if importlib.util.find_spec("jax") is not None:
        result = run_python("-c", jax_run, timeout=120, env=env)
        assert result.returncode == 0, result.stderr
        assert "status 0 env None" in result.stdout
