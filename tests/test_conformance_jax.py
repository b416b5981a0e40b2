"""The conformance suite runs a jax implementation in the dtype it is checked in.

x64 is on for float64 runs and off for the others, only around the suite's own calls, so a
float32 implementation computes in float32 as it does in production, and the process's
``jax_enable_x64`` is the same after ``check()`` as before (issue 16, item 3). The calls are
jitted, falling back to eager calls for an implementation that jit cannot trace.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from portable_siglip.conformance import check, load_cases

from portable_siglip._interop import computing_in, load_backend

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

#: Few and small cases, one of them random (the permutation invariant needs one).
CASES = [c for c in load_cases() if c.name in ("n1-d5", "identity-4", "random-n7-d3")]


@pytest.fixture(params=[False, True], ids=["x64-off", "x64-on"])
def x64(request: pytest.FixtureRequest) -> Iterator[bool]:
    """The process-wide ``jax_enable_x64`` before the check (the ``xp`` fixture sets it)."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", request.param)
    try:
        yield request.param
    finally:
        jax.config.update("jax_enable_x64", previous)


def _dense_sigmoid(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """SigLIP loss with jnp's default dtypes, as a jax user writes it."""
    logits = scale * img @ txt.T + bias
    labels = 2 * jnp.eye(logits.shape[0]) - 1  # float64 when x64 is on, else float32
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / logits.shape[0]


def _computes_in(dtype: Any, img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """The dense loss, after asserting that jax computes in `dtype` during the call."""
    if not all(x.dtype == dtype for x in (img, txt, scale, bias)):
        raise TypeError(f"inputs {[x.dtype for x in (img, txt, scale, bias)]}, not {dtype}")
    default = jnp.asarray(1.0).dtype
    if default != dtype or jnp.eye(3).dtype != dtype:
        raise TypeError(f"jax computes in {default} under a {jnp.dtype(dtype)} check")
    loss = _dense_sigmoid(img, txt, scale, bias)
    if loss.dtype != dtype:
        raise TypeError(f"the loss came out in {loss.dtype}")
    return loss


def float32_only(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """A float32 implementation that fails if the suite makes jax compute in float64."""
    return _computes_in(jnp.float32, img, txt, scale, bias)


def float64_only(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """A float64 implementation that fails unless jax computes in float64."""
    return _computes_in(jnp.float64, img, txt, scale, bias)


def _explain(report: Any) -> str:
    return "\n".join([str(report), *(str(r) for r in report.failed[:5])])


@pytest.mark.parametrize("timeout", [None, 60.0], ids=["caller-thread", "timeout-thread"])
def test_float32_run_computes_in_float32(x64: bool, timeout: float | None) -> None:
    report = check(
        float32_only, loss="sigmoid", backend="jax", dtype="float32", cases=CASES, timeout=timeout
    )
    assert report.passed, _explain(report)
    assert report.gradients_checked
    assert any(r.check == "permutation" for r in report.results)
    assert jax.config.jax_enable_x64 is x64


@pytest.mark.parametrize("timeout", [None, 60.0], ids=["caller-thread", "timeout-thread"])
def test_float64_run_computes_in_float64(x64: bool, timeout: float | None) -> None:
    report = check(
        float64_only, loss="sigmoid", backend="jax", dtype="float64", cases=CASES, timeout=timeout
    )
    assert report.passed, _explain(report)
    assert jax.config.jax_enable_x64 is x64


def test_a_float32_check_does_not_pass_a_float64_only_implementation() -> None:
    """The assertions above have teeth: float64 code fails a float32 check, and back."""
    report = check(float64_only, loss="sigmoid", backend="jax", dtype="float32", cases=CASES)
    assert not report.passed
    assert "TypeError: inputs" in report.failed[0].message
    report = check(float32_only, loss="sigmoid", backend="jax", dtype="float64", cases=CASES)
    assert not report.passed


def test_other_threads_keep_the_process_setting() -> None:
    """The x64 of a check is jax's per-thread context: another thread sees the global flag."""
    seen: list[Any] = []
    ready, done = threading.Event(), threading.Event()

    def other() -> None:
        ready.wait()
        seen.append(jnp.asarray(1.0).dtype)
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    xp, dtype = load_backend("jax", "float64", scoped=True)
    with computing_in("jax", "float64"):
        assert xp.asarray(1.0, dtype=dtype).dtype == jnp.float64
        ready.set()
        done.wait(10)
    thread.join(10)
    assert seen == [jnp.asarray(1.0).dtype]
    assert jnp.asarray(1.0).dtype == (jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)


def test_an_implementation_jit_cannot_trace_runs_eagerly() -> None:
    """Python control flow on values fails under jit; the eager call then gives the verdict."""
    calls: list[bool] = []

    def branches_on_values(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
        calls.append(isinstance(img, jax.core.Tracer))
        if float(scale) < 0:  # concrete values only: not traceable
            raise ValueError("negative scale")
        return jax.value_and_grad(_dense_sigmoid, argnums=(0, 1, 2, 3))(img, txt, scale, bias)

    report = check(branches_on_values, loss="sigmoid", backend="jax", dtype="float32", cases=CASES)
    assert report.passed, _explain(report)
    assert report.gradients_checked
    # Traced by eval_shape and by jit on the first case, then eager for every call.
    assert calls[:2] == [True, True]
    assert not any(calls[2:])
    assert len(calls) == 2 + len(CASES) + 1  # and the permutation check


def test_errors_are_reported_from_the_eager_call() -> None:
    def fails(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
        raise RuntimeError("kernel launch failed")

    report = check(fails, loss="sigmoid", backend="jax", dtype="float32", cases=CASES)
    assert not report.passed
    assert all("RuntimeError: kernel launch failed" in r.message for r in report.failed)


def test_jit_compiles_each_shape_once() -> None:
    """Jitted: f is traced once per shape (value_and_grad), not called once per check."""
    traced: list[tuple[int, ...]] = []

    def counted(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
        traced.append(tuple(img.shape))
        return _dense_sigmoid(img, txt, scale, bias)

    report = check(counted, loss="sigmoid", backend="jax", dtype="float32", cases=CASES)
    assert report.passed, _explain(report)
    # One trace per case's shape, plus the first case's eval_shape; the permutation check,
    # on the random case's shape again, is a cache hit.
    assert len(traced) == len(CASES) + 1
    assert len(set(traced)) == len(CASES)
