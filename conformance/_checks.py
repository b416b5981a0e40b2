"""Judge a contrastive-loss implementation against the golden cases.

An implementation is a callable ``f(img, txt, scale, bias)`` on arrays of one backend that
returns the loss, or ``(loss, grads)`` with grads a NamedTuple, mapping or 4-tuple
``(img, txt, scale, bias)``. With torch and jax a loss alone is differentiated by
autodiff; with the other backends a loss alone is checked for its value only.

Every case yields one check per quantity (loss and each gradient) against the goldens;
two invariants follow (permuting the pairs permutes the gradients; the block size, when
the callable takes one, changes nothing). When checks fail, :func:`diagnose` looks for
the signature of known mistakes and names them with a stable code.

The implementation is foreign code, and nothing it does may fool the verdict: every call
gets fresh copies of the inputs (the cached cases are read-only), any exception it raises,
``SystemExit`` included, is a failed check, and with a ``timeout`` each call runs in a
daemon thread that is abandoned when it overruns (see :class:`Runner`).
"""

from __future__ import annotations

import contextvars
import inspect
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from portable_siglip._interop import UsageError, computing_in, load_backend, to_numpy

from ._ahead import EAGER, CompileAhead, Key, ahead_workers, signature
from ._cases import Case, load_cases
from ._diagnose import _diagnose_raised, diagnose
from ._ids import NONE_FITS, bind_ids, diagnose_ids, ids_not_accepted, load_ids_cases
from ._judged import check_loss
from ._naive import naive_errors
from ._report import (
    CONVENTIONS,
    HALF_DTYPES,
    QUANTITIES,
    RULE_FLOOR,
    TOLERANCE,
    CheckResult,
    Outcome,
    Report,
    check_bound,
    compare,
    tolerance_for,
)

__all__ = [
    "CONVENTIONS",
    "QUANTITIES",
    "TOLERANCE",
    "CheckResult",
    "Outcome",
    "Report",
    "Runner",
    "UsageError",
    "abandoned_calls",
    "check",
    "tolerance_for",
]

# --------------------------------------------------------------------------- running f


def _as_grads(grads: Any) -> dict[str, Any]:
    names = ("img", "txt", "scale", "bias")
    if isinstance(grads, Mapping):
        return {name: grads[name] for name in names}
    if all(hasattr(grads, name) for name in names):
        return {name: getattr(grads, name) for name in names}
    if isinstance(grads, Sequence) and len(grads) == 4:
        return dict(zip(names, grads, strict=True))
    msg = (
        "the implementation returned (loss, grads) but grads is neither a NamedTuple, a "
        f"mapping nor a 4-tuple with img, txt, scale, bias: got {type(grads).__name__}"
    )
    raise TypeError(msg)


def _split(result: Any) -> tuple[Any, dict[str, Any] | None]:
    """Tell a bare loss from ``(loss, grads)``."""
    if isinstance(result, tuple | list) and len(result) == 2:
        return result[0], _as_grads(result[1])
    return result, None


#: Calls abandoned after a timeout (daemon threads that may still be running).
_ABANDONED: list[threading.Thread] = []


def abandoned_calls() -> list[threading.Thread]:
    """Threads of timed-out calls that are still running (they cannot be killed).

    A process that must not wait for them, such as the command line, ends with
    ``os._exit`` when this is not empty.
    """
    return [thread for thread in _ABANDONED if thread.is_alive()]


def describe_exception(error: BaseException) -> str:
    """``"Type: message"`` for an exception escaping the implementation."""
    if isinstance(error, SystemExit):
        return f"SystemExit: {error.code!r} (the implementation called sys.exit)"
    return f"{type(error).__name__}: {error}"


class Runner:
    """Calls an implementation on golden cases in one backend and dtype.

    Every call gets fresh arrays, copied from the (read-only, shared) case, so an
    implementation that writes into its inputs harms only itself. Whatever it raises,
    ``SystemExit`` included, becomes a failed outcome; only ``KeyboardInterrupt`` (Ctrl-C)
    propagates, and only from a call made on the caller's thread.

    With a `timeout` (seconds), each call runs in a daemon thread (in a copy of the
    caller's context variables) and the caller waits that long for it. A thread cannot be
    killed: a call that overruns is abandoned, still running, and every later call of the
    runner fails at once without calling the implementation. Without a timeout the calls run
    on the caller's thread and nothing bounds them.
    """

    def __init__(
        self,
        function: Callable[..., Any],
        backend: str,
        dtype: str,
        timeout: float | None = None,
        scalar_dtype: str | None = None,
    ) -> None:
        self.function = function
        self.backend = backend
        self.dtype = dtype
        self.timeout = timeout
        self.timed_out = False
        # scoped: jax's x64 is set around each call (see _run), never for the whole process.
        self.xp, self.dtype_object = load_backend(backend, dtype, scoped=True)
        # Scale and bias: in the run's dtype, or float32 (scalar_dtype) as in mixed precision.
        self.scalar_object = (
            self.dtype_object
            if scalar_dtype is None
            else load_backend(backend, scalar_dtype, scoped=True)[1]
        )
        self.autodiff = backend in ("torch", "jax")
        self.gradients_seen = False
        self.autodiff_used = False
        self.jax_returns_grads: bool | None = None
        # jax: the jitted implementation (and its value_and_grad) per keyword arguments; jit
        # compiles once per shape. None once a jitted call failed: eager from then on.
        self.jax_jitted: dict[tuple[str, tuple[Any, ...]], Any] | None = {}
        # jax: the coming calls (see plan), and per kind the threads that compile them
        # ahead once a first jitted call has worked.
        self.jax_planned: list[Key] = []
        self.jax_ahead: dict[str, CompileAhead] = {}

    def plan(self, calls: Sequence[tuple[Case, dict[str, Any]]]) -> None:
        """Announce the calls about to be made (case, keyword arguments), in their order.

        jax compiles them ahead (see :mod:`._ahead`); the other backends need nothing.
        """
        if self.backend != "jax":
            return
        import numpy as np

        dtype, scalar = np.dtype(self.dtype_object), np.dtype(self.scalar_object)
        self.jax_planned = [
            (
                tuple(sorted(kwargs.items())),
                ((c.img.shape, dtype), (c.txt.shape, dtype), ((), scalar), ((), scalar)),
            )
            for c, kwargs in calls
        ]

    def close(self, *, wait: bool = True) -> None:
        """Stop compiling ahead (the run is over, or the calls went eager).

        With `wait`, compiles under way are waited for (up to the timeout of a call, if
        any), so that no compiling thread outlives the run.
        """
        for ahead in self.jax_ahead.values():
            ahead.cancel(wait=self.timeout if wait else 0.0)

    def _arrays(self, case_img: Any, case_txt: Any, scale: float, bias: float) -> list[Any]:
        import numpy as np

        xp, dtype, scalar = self.xp, self.dtype_object, self.scalar_object
        # Fresh copies: xp.asarray returns the cached array itself when the dtype matches.
        img, txt = np.array(case_img, copy=True), np.array(case_txt, copy=True)
        pairs = ((img, dtype), (txt, dtype), (scale, scalar), (bias, scalar))
        if self.backend == "torch":
            import torch

            return [torch.tensor(value, dtype=d, requires_grad=True) for value, d in pairs]
        if self.backend == "jax":
            import jax

            # Convert on the host and copy to the device: jnp.asarray compiles a conversion
            # (or a staging copy) for every new shape, one more compile per case.
            return [jax.device_put(np.asarray(value, dtype=np.dtype(d))) for value, d in pairs]
        return [xp.asarray(value, dtype=d) for value, d in pairs]

    def run(self, img: Any, txt: Any, scale: float, bias: float, **kwargs: Any) -> Outcome:
        """Evaluate the implementation once; what it raises becomes a failed outcome."""
        if self.timed_out:
            return Outcome({}, "not run: an earlier call timed out")
        if self.timeout is None:
            try:
                return self._run(img, txt, scale, bias, **kwargs)
            except KeyboardInterrupt:
                raise
            except BaseException as error:  # SystemExit is a failed check too
                return describe_failure(error)
        box: list[Outcome] = []

        def call() -> None:
            try:
                box.append(self._run(img, txt, scale, bias, **kwargs))
            except BaseException as error:  # no Ctrl-C reaches this thread
                box.append(describe_failure(error))

        context = contextvars.copy_context()
        thread = threading.Thread(
            target=context.run, args=(call,), name="conformance-call", daemon=True
        )
        thread.start()
        thread.join(self.timeout)
        if thread.is_alive():
            _ABANDONED[:] = [*abandoned_calls(), thread]
            self.timed_out = True
            return Outcome({}, f"timeout: no result within {self.timeout:g} s")
        return box[0] if box else Outcome({}, "the call ended without a result")

    def _run(self, img: Any, txt: Any, scale: float, bias: float, **kwargs: Any) -> Outcome:
        if self.backend == "jax":
            # x64 on for float64 only, off otherwise, in this thread alone: around making the
            # arrays, the call and autodiff, so f computes in the dtype it does in production.
            with computing_in("jax", self.dtype):
                return self._run_jax(self._arrays(img, txt, scale, bias), kwargs)
        if self.backend == "torch":
            import torch

            # Autograd on even when the caller runs the suite under torch.no_grad() (or
            # inference_mode off): a bare loss must be differentiable to be judged.
            with torch.enable_grad():
                return self._run_eager(img, txt, scale, bias, kwargs)
        return self._run_eager(img, txt, scale, bias, kwargs)

    def _run_eager(
        self, img: Any, txt: Any, scale: float, bias: float, kwargs: dict[str, Any]
    ) -> Outcome:
        args = self._arrays(img, txt, scale, bias)
        loss, grads = _split(self.function(*args, **kwargs))
        values: dict[str, Any] = {"loss": to_numpy(loss)}
        if grads is None and self.backend == "torch" and getattr(loss, "requires_grad", False):
            loss.backward()
            self.autodiff_used = True
            grads = {
                name: (arg.grad if arg.grad is not None else None)
                for name, arg in zip(("img", "txt", "scale", "bias"), args, strict=True)
            }
        elif grads is None and self.backend == "torch":
            # The loss does not depend on any input that requires grad: all gradients zero.
            self.autodiff_used = True
            grads = dict.fromkeys(("img", "txt", "scale", "bias"))
        if grads is not None:
            self.gradients_seen = True
            for name, value in grads.items():
                shape = args[("img", "txt", "scale", "bias").index(name)].shape
                values[name] = _zeros(shape) if value is None else to_numpy(value)
        return Outcome(values)

    def _run_jax(self, args: list[Any], kwargs: dict[str, Any]) -> Outcome:
        import jax

        grads: dict[str, Any] | None = None
        if self.jax_returns_grads is None and self.jax_jitted is not None:
            # First call: tracing tells a bare loss from (loss, grads) without compiling f
            # alone, which a bare loss would never use again.
            try:
                traced = _split(jax.eval_shape(self._jax_function("call", kwargs), *args))
            except Exception:  # not traceable, or it fails: the call below finds out
                traced = None
            if traced is not None:
                self.jax_returns_grads = traced[1] is not None
        if self.jax_returns_grads is not False:
            # First call, or an implementation known to return (loss, grads).
            loss, grads = _split(self._call_jax("call", args, kwargs))
            self.jax_returns_grads = grads is not None
        if not self.jax_returns_grads:
            # A bare loss: one value_and_grad call gives both (no separate forward call).
            self.autodiff_used = True
            loss, auto = self._call_jax("value_and_grad", args, kwargs)
            grads = dict(zip(("img", "txt", "scale", "bias"), auto, strict=True))
        self.gradients_seen = True
        values: dict[str, Any] = {"loss": to_numpy(loss)}
        for name, value in (grads or {}).items():
            values[name] = to_numpy(value)
        return Outcome(values)

    def _jax_function(self, kind: str, kwargs: dict[str, Any]) -> Callable[..., Any]:
        """Return f with `kwargs` (``kind="call"``), or its value_and_grad in the four arrays."""
        import jax

        def function(*inputs: Any) -> Any:
            return self.function(*inputs, **kwargs)

        if kind == "value_and_grad":
            return jax.value_and_grad(function, argnums=(0, 1, 2, 3))
        return function

    def _jitted(self, kind: str, kwargs: dict[str, Any]) -> Any:
        """Return the jitted function of `kind` and `kwargs`, made once and kept for the run."""
        import jax

        assert self.jax_jitted is not None
        key = (kind, tuple(sorted(kwargs.items())))
        jitted = self.jax_jitted.get(key)
        if jitted is None:
            jitted = self.jax_jitted[key] = jax.jit(self._jax_function(kind, kwargs))
        return jitted

    def _call_jax(self, kind: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """Call f with `kwargs`, or its value_and_grad (`kind`), under jit where it fits.

        Eagerly, jax compiles every operation for every new shape: jitted, each case's shape
        compiles once, and the permutation check reuses it. The jitted function is kept per
        `kind` and keyword arguments (the one runner is one implementation and dtype; jax
        keys its cache on the x64 setting too). A jitted call that raises (f branches on
        values, returns something that is not an array, or fails) is made again eagerly,
        which gives the verdict, and every later call is eager. Once a first call has
        compiled, the planned calls are compiled ahead in other threads (:mod:`._ahead`).
        """
        function = self._jax_function(kind, kwargs)
        if self.jax_jitted is None or not _jittable(kwargs):
            return function(*args)
        ahead = self.jax_ahead.get(kind)
        if ahead is not None:
            compiled = ahead.compiled((tuple(sorted(kwargs.items())), signature(args)))
            if compiled is EAGER:
                return function(*args)
            if compiled is not None:
                try:
                    return compiled(*args)
                except Exception:  # the call below says whose the error is
                    pass
        if not _jit_fits(args[0].shape[0], kwargs):
            return _call_if_small(self._jitted(kind, kwargs), function, args)
        jitted = self._jitted(kind, kwargs)
        try:
            result = jitted(*args)
        except KeyboardInterrupt:
            raise
        except BaseException:  # not traceable, or it fails: eager says which
            self.jax_jitted = None
            self.close(wait=False)
            return function(*args)
        if not kwargs and kind not in self.jax_ahead and not self.timed_out:
            self._compile_ahead(kind, signature(args))
        return result

    def _compile_ahead(self, kind: str, done: Any) -> None:
        """Compile the other planned calls while the cases run (f traces and compiles)."""
        workers = ahead_workers()
        if not workers:
            return
        jobs = []
        for kwargs_key, planned in self.jax_planned:
            if (kwargs_key, planned) == ((), done):
                continue  # in its jitted function's own cache already
            kwargs = dict(kwargs_key)
            n = planned[0][0][0]
            limit = None if _jit_fits(n, kwargs) else MAX_TRACED_EQUATIONS
            jobs.append(((kwargs_key, planned), self._jitted(kind, kwargs), limit))
        if jobs:
            self.jax_ahead[kind] = CompileAhead(jobs, self.dtype, workers)


#: Most equations a traced program of many blocks may have and still be compiled: a loop
#: over tiles (``lax.fori_loop``, ``scan``) traces to a few dozen, whatever the number of
#: tiles; a Python loop unrolls into a few per tile (thousands at block_size=1).
MAX_TRACED_EQUATIONS = 200


def _call_if_small(jitted: Any, function: Callable[..., Any], args: list[Any]) -> Any:
    """Call `function`, a call of many blocks, jitted if its program is small, else eagerly.

    It is traced first (``jitted.trace``, the first step of jit): a program that loops over
    its tiles is compiled and called, which takes a fraction of eager dispatch's time; one
    that unrolls them is called eagerly, as compiling it would take longer than running it.
    A trace or a compiled call that fails is left to the eager call, which gives the
    verdict.
    """
    try:
        traced = jitted.trace(*args)
        small = len(traced.jaxpr.eqns) <= MAX_TRACED_EQUATIONS
    except KeyboardInterrupt:
        raise
    except BaseException:  # not traceable: eager says why
        small = False
    if small:
        try:
            return traced.lower().compile()(*args)
        except KeyboardInterrupt:
            raise
        except BaseException:  # eager says why
            pass
    return function(*args)


def _jittable(kwargs: dict[str, Any]) -> bool:
    """Whether a jax call with `kwargs` may be jitted: none, or a positive int block_size."""
    if not kwargs:
        return True
    block = kwargs.get("block_size")
    return set(kwargs) == {"block_size"} and isinstance(block, int) and block >= 1


def _jit_fits(n: int, kwargs: dict[str, Any]) -> bool:
    """Whether a jax call with `kwargs` on n rows is worth jitting.

    A Python loop over tiles unrolls under jit into one graph of every tile, which compiles
    far longer than eager dispatch takes to run it: calls that split the n rows into more
    than two blocks (the small block sizes of the blocks check) are jitted only when their
    traced program turns out small (:func:`_call_if_small`).
    """
    if not kwargs:
        return True
    block = kwargs.get("block_size")
    if set(kwargs) != {"block_size"} or not isinstance(block, int) or block < 1:
        return False
    return -(-n // block) <= 2


def describe_failure(error: BaseException) -> Outcome:
    """Return the failed outcome of a call that raised `error`, with its traceback."""
    import traceback

    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return Outcome({}, describe_exception(error), text)


def _zeros(shape: Any) -> Any:
    import numpy as np

    return np.zeros(tuple(shape))


# --------------------------------------------------------------------------- comparing


def _compare(
    check: str,
    case: Case,
    outcome: Outcome,
    expected: dict[str, Any],
    tolerance: float,
    naive: Mapping[str, float] | None = None,
    dtype: str = "",
) -> list[CheckResult]:
    """Compare each quantity of `outcome` with `expected`, within `tolerance`.

    With `naive` (the naive reference's error per quantity, in a half-precision run of
    `dtype`), each quantity is bounded by FlashAttention's rule instead (:func:`check_bound`).
    """
    results = []
    for quantity, want in expected.items():
        bound, reference = check_bound(tolerance, naive, quantity, dtype)
        if outcome.error is not None:
            error = outcome.error
            results.append(
                CheckResult(check, case.name, quantity, math.inf, bound, False, error, reference)
            )
        elif quantity in outcome.values:
            got = outcome.values[quantity]
            results.append(
                compare(check, case.name, case, quantity, got, want, bound, reference, dtype)
            )
    return results


# --------------------------------------------------------------------------- the suite


def _describe(function: Callable[..., Any]) -> str:
    module = getattr(function, "__module__", None) or "?"
    name = getattr(function, "__qualname__", None) or type(function).__name__
    return f"{module}:{name}"


def _takes_block_size(function: Callable[..., Any]) -> bool:
    try:
        return "block_size" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def _invariant_case(cases: Sequence[Case]) -> Case | None:
    """Return the case the invariants run on: the random one with the most pairs."""
    random_cases = [c for c in cases if "random" in c.tags]
    return max(random_cases, key=lambda c: c.n) if random_cases else None


def _block_sizes(n: int) -> tuple[int, ...]:
    """Block sizes the blocks check runs a case of n pairs with."""
    return tuple(max(1, b) for b in (1, 3, n - 1, n + 5))


def _invariants(
    runner: Runner,
    cases: Sequence[Case],
    outcomes: dict[str, Outcome],
    dtype: str,
) -> list[CheckResult]:
    import numpy as np

    results: list[CheckResult] = []
    case = _invariant_case([c for c in cases if outcomes[c.name].error is None])
    if case is None:
        return results
    base = outcomes[case.name]
    tolerance = tolerance_for(dtype, case)
    # Permuting the pairs (the same rows of img and txt) permutes the gradients.
    order = np.random.default_rng(0).permutation(case.n)
    permuted = runner.run(case.img[order], case.txt[order], case.scale, case.bias)
    expected = {"loss": base.values["loss"]}
    for name in ("img", "txt"):
        if name in base.values:
            expected[name] = base.values[name][order]
    for name in ("scale", "bias"):
        if name in base.values:
            expected[name] = base.values[name]
    results += _compare("permutation", case, permuted, expected, tolerance)
    # The block size changes nothing, where the implementation takes one.
    if _takes_block_size(runner.function):
        for block_size in _block_sizes(case.n):
            blocked = runner.run(case.img, case.txt, case.scale, case.bias, block_size=block_size)
            expected = {name: value for name, value in base.values.items()}
            for result in _compare("blocks", case, blocked, expected, tolerance):
                results.append(
                    CheckResult(
                        result.check,
                        f"{result.case} (block_size={block_size})",
                        result.quantity,
                        result.error,
                        result.tolerance,
                        result.passed,
                        result.message,
                    )
                )
    return results


def check(
    function: Callable[..., Any],
    *,
    loss: str,
    backend: str = "numpy",
    dtype: str = "float64",
    convention: str = "default",
    cases: Iterable[Case] | None = None,
    timeout: float | None = None,
    ids: bool = False,
    scalar_dtype: str | None = None,
) -> Report:
    """Check an implementation of a contrastive loss against the golden cases.

    Parameters
    ----------
    function : callable
        ``f(img, txt, scale, bias)`` taking arrays of `backend` (scale and bias as 0-d
        arrays; with torch, leaves that require grad) and returning the loss or
        ``(loss, grads)``.
    loss : str
        Which loss it claims to compute: a registered loss (:mod:`portable_siglip._registry`)
        that the golden cases hold expected outputs of (:func:`._cases.golden_losses`: the
        sigmoid and the softmax loss).
    backend : {"numpy", "torch", "jax", "cupy", "array_api_strict"}
        Array library to call it with.
    dtype : {"float64", "float32", "float16", "bfloat16"}
        Dtype of the inputs. In a float16 or bfloat16 run each golden check must be within
        twice the error of a naive dense loss computed in that dtype, plus one ulp
        (FlashAttention's rule, :mod:`._naive`); each result's ``naive`` holds that error.
    convention : {"default", "mean", "sum"}
        Normalisation the implementation declares: this library's (sum over pairs / n),
        the mean over n^2 pairs, or the plain sum. Under "mean" and "sum" the goldens are
        rescaled accordingly.
    cases : iterable of Case, optional
        Subset of the golden cases (all by default).
    timeout : float, optional
        Seconds each call of `function` may take (each case, and each call of the
        invariants). By default nothing bounds them. With a timeout each call runs in a
        daemon thread; one that overruns fails as ``"timeout"``, is abandoned (a thread
        cannot be killed, so it may go on running in this process) and no later call is
        made: the remaining checks fail as ``"not run"``.
    ids : bool
        Judge a loss with several positives per row instead (docs/multi-positive.md): it is
        called as ``f(img, txt, scale, bias, img_ids=..., txt_ids=...)`` on the golden cases
        with ids (:mod:`._ids`: duplicates, rectangular batches), whose mistakes (ids
        ignored, log inside the sum, ...) are named. Needs the default convention.
    scalar_dtype : {None, "float32"}
        Dtype of scale and bias: by default the run's `dtype`; "float32" keeps them float32
        while img and txt are in `dtype` (a float32, float16 or bfloat16 run), as big_vision
        and most mixed-precision training keep them. Their gradients are then compared as
        the float32 they come back in. The naive reference of FlashAttention's rule stays
        the loss computed with all four inputs in `dtype`.

    Returns
    -------
    Report
        ``report.passed``, the per-check ``report.results``, ``report.codes`` and
        ``report.diagnosis`` naming known mistakes.

    Raises
    ------
    ValueError
        On a `loss` without golden cases or an unknown `convention`, or a `timeout` that is
        not positive, or a `scalar_dtype` other than None and "float32" (or "float32" in a
        float64 run).
    UsageError
        If the backend is unknown or not installed, or lacks the dtype (a ValueError too:
        :class:`~portable_siglip.conformance.UsageError`).

    Examples
    --------
    >>> import portable_siglip as ps
    >>> from portable_siglip.conformance import check
    >>> check(ps.sigmoid_loss_and_grad, loss="sigmoid").passed
    True
    """
    _check_arguments(loss, convention, dtype, timeout, ids)
    _check_scalar_dtype(scalar_dtype, dtype)
    if ids:
        chosen = tuple(load_ids_cases() if cases is None else cases)
        return _check_ids(function, loss, backend, dtype, chosen, timeout, scalar_dtype)
    selected = tuple(load_cases() if cases is None else cases)
    runner = Runner(function, backend, dtype, timeout, scalar_dtype)
    report = Report(loss, backend, dtype, convention, _describe(function))
    outcomes: dict[str, Outcome] = {}
    calls: list[tuple[Case, dict[str, Any]]] = [(case, {}) for case in selected]
    blocks_case = _invariant_case(selected)
    if blocks_case is not None and _takes_block_size(function):
        calls += [(blocks_case, {"block_size": b}) for b in _block_sizes(blocks_case.n)]
    runner.plan(calls)
    try:
        for case in selected:
            outcomes[case.name] = _golden_checks(report, runner, case)
        report.results += _invariants(runner, selected, outcomes, dtype)
    finally:
        runner.close()
    report.gradients_checked = runner.gradients_seen
    report.notes += _run_notes(report, runner, outcomes) + _scalar_notes(scalar_dtype, dtype)
    report.findings = diagnose(report, loss, selected, outcomes, convention)
    return report


def _check_arguments(
    loss: str, convention: str, dtype: str, timeout: float | None, ids: bool
) -> None:
    """Raise a ValueError on arguments :func:`check` does not take."""
    check_loss(loss, ids=ids)
    if convention not in CONVENTIONS:
        msg = f"`convention` must be one of {tuple(CONVENTIONS)}, got {convention!r}"
        raise ValueError(msg)
    if dtype not in TOLERANCE:
        msg = f"`dtype` must be one of {tuple(TOLERANCE)}, got {dtype!r}"
        raise ValueError(msg)
    if timeout is not None and not timeout > 0:
        msg = f"`timeout` must be a positive number of seconds or None, got {timeout!r}"
        raise ValueError(msg)
    if ids and convention != "default":
        msg = f"`convention` must be 'default' with `ids=True`, got {convention!r}"
        raise ValueError(msg)


def _check_scalar_dtype(scalar_dtype: str | None, dtype: str) -> None:
    """Raise a UsageError (a ValueError) on a `scalar_dtype` :func:`check` does not take."""
    if scalar_dtype not in (None, "float32"):
        msg = f"`scalar_dtype` must be None or 'float32', got {scalar_dtype!r}"
        raise UsageError(msg)
    if scalar_dtype is not None and dtype == "float64":
        msg = (
            f"`scalar_dtype={scalar_dtype!r}` needs a float32, float16 or bfloat16 run "
            f"(float32 scale and bias would round the float64 cases' scalars), got {dtype!r}"
        )
        raise UsageError(msg)


def _scalar_notes(scalar_dtype: str | None, dtype: str) -> list[str]:
    """Return the note of a run with float32 scale and bias (none otherwise)."""
    if scalar_dtype is None:
        return []
    return [
        f"scale and bias float32, img and txt {dtype} (scalar_dtype='float32'); the naive "
        f"reference of the half-precision rule keeps all four in {dtype}"
    ]


def _golden_checks(report: Report, runner: Runner, case: Case) -> Outcome:
    """Run `case` and add its golden checks to `report`; return the outcome, as compared.

    A large case stores some gradient rows only: the outcome keeps those rows.
    """
    outcome = runner.run(case.img, case.txt, case.scale, case.bias)
    golden = case.goldens[report.loss]
    if golden.rows is not None:
        values = {q: golden.stored(q, v, case.n) for q, v in outcome.values.items()}
        outcome = Outcome(values, outcome.error, outcome.traceback)
    dtype = report.dtype
    factor = CONVENTIONS[report.convention](case.n)
    expected = {q: getattr(golden, q) * factor for q in QUANTITIES}
    tolerance = tolerance_for(dtype, case)
    naive = naive_errors(case, report.loss, dtype, factor) if dtype in HALF_DTYPES else None
    report.results += _compare("golden", case, outcome, expected, tolerance, naive, dtype)
    return outcome


def _run_notes(report: Report, runner: Runner, outcomes: dict[str, Outcome]) -> list[str]:
    """Say what the reader of `report` must know: a timeout, autodiff, unchecked gradients."""
    backend = report.backend
    notes = []
    if runner.timed_out:
        late = next(r for r in report.results if r.message.startswith("timeout"))
        notes.append(
            f"timeout: the call for the {late.check} check of {late.case} gave no result "
            f"within {runner.timeout} s; it was abandoned (it may still be running) and no "
            "later call was made"
        )
    if runner.autodiff_used:
        notes.append(_AUTODIFF.format(backend=backend))
    if not runner.gradients_seen and any(o.error is None for o in outcomes.values()):
        notes.append(_NO_GRADIENTS.format(backend=backend))
    if report.dtype in HALF_DTYPES:
        notes += _rule_notes(report, report.dtype)
    return notes


#: The notes of a run whose gradients autodiff took, and of one that has none.
_AUTODIFF = "gradients taken by {backend} autodiff of the returned loss"
_NO_GRADIENTS = (
    "gradients NOT checked: the implementation returned a loss only and {backend} has no "
    "autodiff; return (loss, grads) to have them checked"
)


def _rule_notes(report: Report, dtype: str) -> list[str]:
    """Say how a half-precision run was judged, and where the rule could not be applied."""
    notes = [
        f"{dtype}: each golden check's bound is 2 x the error of a naive dense {dtype} loss "
        f"on the same inputs + {RULE_FLOOR[dtype]:.2g} (FlashAttention's rule; the naive "
        "reference's error is the 'naive' of each result); the permutation and blocks "
        f"checks keep the fixed tolerance {TOLERANCE[dtype]:g}"
    ]
    fallback = [
        f"{r.case} {r.quantity}"
        for r in report.results
        if r.naive is not None and not math.isfinite(r.naive)
    ]
    if fallback:
        notes.append(
            f"the naive {dtype} reference is not finite on {len(fallback)} checks "
            f"({', '.join(fallback[:4])}{', ...' if len(fallback) > 4 else ''}): the fixed "
            "tolerance applies there"
        )
    return notes


def _diagnose_ids_run(
    function: Callable[..., Any],
    report: Report,
    loss: str,
    cases: Sequence[Case],
    outcomes: dict[str, Outcome],
    losses: dict[str, float | None],
) -> list[tuple[str, str]]:
    """Name why a failed ids run failed: never nothing.

    In order: an implementation that takes no ids; a known multi-positive mistake
    (:func:`._ids.diagnose_ids`); what the calls raised; a call that timed out; else, in
    words, that none fits.
    """
    errors = [outcome.error for outcome in outcomes.values()]
    findings = ids_not_accepted(function, errors)
    if findings:
        return findings
    late = next(
        (name for name, o in outcomes.items() if (o.error or "").startswith("timeout")), None
    )
    failed = {r.case for r in report.results if r.failed and r.quantity == "loss"}
    dtype = report.dtype
    findings = diagnose_ids(loss, cases, losses, failed, lambda case: tolerance_for(dtype, case))
    findings += _diagnose_raised(report, cases, outcomes)
    if late is not None:
        findings.append(
            (
                "timeout",
                f"the call on {late} gave no result within the timeout ({outcomes[late].error}); "
                "it was abandoned (it may still be running) and no later call was made",
            )
        )
    return findings or [NONE_FITS]


def _check_ids(
    function: Callable[..., Any],
    loss: str,
    backend: str,
    dtype: str,
    cases: Sequence[Case],
    timeout: float | None,
    scalar_dtype: str | None = None,
) -> Report:
    """:func:`check` with ``ids=True``: every case's ids bound as keywords, then the goldens.

    One runner per case (each binds other ids); after a timeout the later cases are not run.
    """
    report = Report(loss, backend, dtype, "default", _describe(function))
    losses: dict[str, float | None] = {}
    outcomes: dict[str, Outcome] = {}
    autodiff = seen = False
    for case in cases:
        if any(r.message.startswith("timeout") for r in report.results):
            outcome = Outcome({}, "not run: an earlier call timed out")
        else:
            runner = Runner(
                bind_ids(function, case, backend), backend, dtype, timeout, scalar_dtype
            )
            outcome = runner.run(case.img, case.txt, case.scale, case.bias)
            autodiff, seen = autodiff or runner.autodiff_used, seen or runner.gradients_seen
        outcomes[case.name] = outcome
        value = outcome.values.get("loss")
        losses[case.name] = None if value is None else float(value)
        golden = case.goldens[loss]
        expected = {q: getattr(golden, q) for q in QUANTITIES}
        report.results += _compare("golden", case, outcome, expected, tolerance_for(dtype, case))
    report.gradients_checked = seen
    report.notes += _scalar_notes(scalar_dtype, dtype)
    if autodiff:
        report.notes.append(_AUTODIFF.format(backend=backend))
    if not seen and any(o.error is None for o in outcomes.values()):
        report.notes.append(_NO_GRADIENTS.format(backend=backend))
    if not report.passed:
        report.findings = _diagnose_ids_run(function, report, loss, cases, outcomes, losses)
    return report
