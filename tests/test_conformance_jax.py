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


def test_compiling_ahead_changes_no_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planned shapes compile in other threads: the results are those of plain jit calls."""
    import portable_siglip.conformance._checks as checks

    cases = [c for c in load_cases() if "large" not in c.tags][:10]
    made: list[Any] = []

    class Recorded(checks.CompileAhead):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            made.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(checks, "CompileAhead", Recorded)
    monkeypatch.setattr(checks, "ahead_workers", lambda: 2)
    ahead = check(_dense_sigmoid, loss="sigmoid", backend="jax", dtype="float32", cases=cases)
    assert len(made) == 1
    monkeypatch.setattr(checks, "ahead_workers", lambda: 0)
    plain = check(_dense_sigmoid, loss="sigmoid", backend="jax", dtype="float32", cases=cases)
    assert len(made) == 1
    assert ahead.passed, _explain(ahead)
    assert [(r.check, r.case, r.quantity, r.error) for r in ahead.results] == [
        (r.check, r.case, r.quantity, r.error) for r in plain.results
    ]


def _unrolled_sigmoid(img: Any, txt: Any, scale: Any, bias: Any, block_size: Any) -> Any:
    """SigLIP loss by a Python loop over row and column tiles: unrolled under jit."""
    n = img.shape[0]
    b = block_size or n
    total = jnp.zeros((), img.dtype)
    for r in range(0, n, b):
        for c in range(0, n, b):
            logits = scale * img[r : r + b] @ txt[c : c + b].T + bias
            rows, cols = jnp.arange(r, min(r + b, n)), jnp.arange(c, min(c + b, n))
            labels = jnp.where(rows[:, None] == cols[None, :], 1.0, -1.0).astype(img.dtype)
            total = total - jnp.sum(jax.nn.log_sigmoid(labels * logits))
    return total / n


def test_blocks_check_jits_small_programs_and_runs_unrolled_ones_eagerly() -> None:
    """Many blocks: jitted when the traced program is small, eager when a loop unrolled.

    Both return (loss, grads), so that an eager call sees concrete arrays, a jitted one
    tracers.
    """
    calls: list[tuple[str, Any, bool]] = []
    both = jax.value_and_grad(_unrolled_sigmoid, argnums=(0, 1, 2, 3))

    def unrolled(img: Any, txt: Any, scale: Any, bias: Any, block_size: Any = None) -> Any:
        calls.append(("unrolled", block_size, isinstance(img, jax.core.Tracer)))
        return both(img, txt, scale, bias, block_size)

    def dense(img: Any, txt: Any, scale: Any, bias: Any, block_size: Any = None) -> Any:
        """Takes a block size and ignores it: a small program whatever it is."""
        calls.append(("dense", block_size, isinstance(img, jax.core.Tracer)))
        return both(img, txt, scale, bias, None)

    for function in (unrolled, dense):
        report = check(function, loss="sigmoid", backend="jax", dtype="float32", cases=CASES)
        assert report.passed, _explain(report)
        assert any(r.check == "blocks" for r in report.results)
    # random-n7-d3 by block_size 1 and 3: 49 and 9 tiles, each some 40 equations with its
    # gradient, over MAX_TRACED_EQUATIONS: eager. 6 and 12 (two blocks, one) are jitted, and
    # the dense program is jitted at every block size.
    eager = {(name, size) for name, size, traced in calls if not traced and size is not None}
    assert eager == {("unrolled", 1), ("unrolled", 3)}
    assert {(name, size) for name, size, traced in calls if traced} >= {
        ("unrolled", 6),
        ("unrolled", 12),
        ("dense", 1),
        ("dense", 3),
    }
