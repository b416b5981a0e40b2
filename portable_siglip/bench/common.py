"""What the benchmarks share: constants, inputs, timing, machine notes, tables and reports.

Nothing here is particular to one benchmark, and this module imports none of them. NumPy and
torch are imported inside functions only. The losses are those of the registry
(:mod:`portable_siglip._registry`): ``--losses`` accepts every registered name, and a loss
runs through the functions its description names (:func:`loss_and_grad`).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import _registry as registry

__all__ = [
    "BACKENDS",
    "BIAS",
    "DEFAULT_DIM",
    "DTYPES",
    "GIB",
    "GPU_DTYPES",
    "MIB",
    "PROBE_TIMEOUT_BASE_S",
    "SCALE",
    "TEXT_NOISE",
    "WARMUP_N",
    "Progress",
    "add_case_arguments",
    "among",
    "check_args",
    "comma_list",
    "compare_rows",
    "fmt",
    "installed",
    "log_progress",
    "loss_and_grad",
    "machine_info",
    "make_inputs",
    "mib",
    "nonnegative_float_arg",
    "panel_rows",
    "positive_float_arg",
    "positive_int",
    "positive_int_arg",
    "print_load_after",
    "print_notes",
    "proc_kib",
    "refuse",
    "render_table",
    "run_config",
    "run_json_line",
    "source_env",
    "time_interleaved",
    "timed",
    "torch_leaves",
    "wait_ready",
    "write_json_atomic",
    "write_report",
]

BACKENDS = ("numpy", "torch", "jax")
DTYPES = ("float32", "float64")
#: Dtypes of the GPU benchmark (``bench --device cuda``): bfloat16 is for it only.
GPU_DTYPES = (*DTYPES, "bfloat16")

#: d of ``--distributed`` and ``--frameworks`` when ``--dim`` is not given.
DEFAULT_DIM = 768

#: Logit scale t and bias b of the benchmark (SigLIP's initialisation, t' = log 10).
SCALE = 10.0
BIAS = -10.0

#: How strongly each text row is correlated with its image row (noise amplitude).
TEXT_NOISE = 0.5

#: Seconds a memory probe may take beyond ten times the timed median of its case.
PROBE_TIMEOUT_BASE_S = 120.0

#: Batch size of the warm-up call that triggers lazy library initialisation.
WARMUP_N = 64

MIB = 2**20
GIB = 2**30


# --------------------------------------------------------------------------- command line


def comma_list(name: str, convert: Callable[[str], Any], allowed: Sequence[Any] | None) -> Any:
    """Return an argparse ``type`` that reads a comma-separated list of distinct values."""

    def parse(text: str) -> list[Any]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            msg = f"`{name}` needs at least one value, got {text!r}"
            raise argparse.ArgumentTypeError(msg)
        values = []
        for item in items:
            try:
                value = convert(item)
            except ValueError:
                msg = f"`{name}` got {item!r}, which is not a valid value"
                raise argparse.ArgumentTypeError(msg) from None
            if allowed is not None and value not in allowed:
                msg = f"`{name}` must be among {', '.join(allowed)}; got {item!r}"
                raise argparse.ArgumentTypeError(msg)
            if value not in values:
                values.append(value)
        return values

    return parse


def positive_int(text: str) -> int:
    """Read a positive integer; raise ValueError otherwise."""
    value = int(text)
    if value <= 0:
        msg = f"must be a positive integer, got {text!r}"
        raise ValueError(msg)
    return value


def positive_int_arg(text: str) -> int:
    """Read a positive integer, as an argparse ``type``."""
    try:
        return positive_int(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def positive_float_arg(text: str) -> float:
    """Read a positive finite number, as an argparse ``type``."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        msg = f"must be a positive number, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def nonnegative_float_arg(text: str) -> float:
    """Read a finite number >= 0, as an argparse ``type``."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        msg = f"must be a number >= 0, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def among(name: str, values: Sequence[str], allowed: Sequence[str]) -> str | None:
    """Say which of `values` (of the option ``--name``) are not `allowed`, or None.

    Examples
    --------
    >>> among("losses", ["sigmoid", "hinge"], ("sigmoid", "softmax"))
    '`--losses` must be among sigmoid, softmax; got hinge'
    """
    unknown = [value for value in values if value not in allowed]
    if unknown:
        return f"`--{name}` must be among {', '.join(allowed)}; got {', '.join(unknown)}"
    return None


def check_args(args: argparse.Namespace) -> str | None:
    """Validate a namespace that may not have come through the ``bench`` parser.

    Returns
    -------
    str or None
        What is wrong with the common options, or None.
    """
    for name, allowed in (("backends", BACKENDS), ("losses", registry.names())):
        # None: not resolved yet (the bench command fills in the backends of its plan).
        problem = among(name, getattr(args, name) or (), allowed)
        if problem is not None:
            return problem
    if args.dtype not in DTYPES:
        return f"`--dtype` must be one of {', '.join(DTYPES)}; got {args.dtype!r}"
    if int(args.repeats) <= 0:
        return f"`--repeats` must be a positive integer; got {args.repeats!r}"
    for name in ("sizes", "dims"):  # dims is only resolved for the sweep
        values = getattr(args, name, None)
        if values is not None and any(int(v) <= 0 for v in values):
            return f"`--{name}` must be positive integers; got {values!r}"
    dim = getattr(args, "dim", None)
    if dim is not None and int(dim) <= 0:
        return f"`--dim` must be a positive integer; got {dim!r}"
    if args.block_size is not None and int(args.block_size) <= 0:
        return f"`--block-size` must be a positive integer; got {args.block_size!r}"
    positives = getattr(args, "positives_per_row", 1)
    if isinstance(positives, bool) or not isinstance(positives, int) or positives <= 0:
        return f"`--positives-per-row` must be a positive integer; got {positives!r}"
    cap = getattr(args, "memory_cap_gib", 16.0)
    if not (isinstance(cap, (int, float)) and math.isfinite(cap) and cap > 0):
        return f"`--memory-cap-gib` must be a positive number; got {cap!r}"
    return None


def refuse(
    problem: str | None, mode: str = "", needs: Sequence[str] = (), hint: str | None = None
) -> bool:
    """Print why ``bench`` cannot start, if it cannot; return whether it cannot.

    Parameters
    ----------
    problem : str or None
        What is wrong with the options (``check_args``), or None.
    mode : str
        The mode's option (``"--frameworks"``), which names it in a missing module's message.
    needs : sequence of str
        Modules the mode needs, in the order they are looked for.
    hint : str, optional
        How to install what is missing (default: ``pip install NAME``).

    Returns
    -------
    bool
        True when it printed an error (the caller exits with status 2).

    Examples
    --------
    >>> refuse(None, "--frameworks", ("json",))
    False
    """
    if problem is not None:
        print(f"bench: error: {problem}", file=sys.stderr)
        return True
    for name in needs:
        if not installed(name):
            how = hint or f"pip install {name}"
            print(f"bench {mode}: error: needs {name}; {how}", file=sys.stderr)
            return True
    return False


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """Return what the JSON's ``config`` of every CPU benchmark holds: dtype, tiles, rounds.

    Examples
    --------
    >>> args = argparse.Namespace(dtype="float32", block_size=None, repeats=3, seed=0)
    >>> sorted(run_config(args))
    ['bias', 'block_size', 'default_block_size', 'dtype', 'repeats', 'scale', 'seed']
    """
    from .._checks import DEFAULT_BLOCK_SIZE

    return {
        "dtype": args.dtype,
        "block_size": args.block_size,
        "default_block_size": DEFAULT_BLOCK_SIZE,
        "repeats": args.repeats,
        "seed": args.seed,
        "scale": SCALE,
        "bias": BIAS,
    }


def add_case_arguments(parser: argparse.ArgumentParser, impls: Sequence[str]) -> None:
    """Add the options of a worker that measures one case of row `impls` in a fresh process.

    ``--loss``, ``--impl``, ``--n``, ``--dim``, ``--dtype``, ``--seed`` and ``--block-size``,
    spelled as the keyword arguments of the function that measures it.

    Examples
    --------
    >>> parser = argparse.ArgumentParser()
    >>> add_case_arguments(parser, ("ours",))
    >>> args = parser.parse_args(["--loss", "sigmoid", "--impl", "ours", "--n", "8", "--dim", "4"])
    >>> args.n, args.dtype, args.seed, args.block_size
    (8, 'float32', 0, None)
    """
    parser.add_argument("--loss", choices=registry.names(), required=True)
    parser.add_argument("--impl", choices=impls, required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--dim", type=int, required=True)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block-size", type=int, default=None)


def loss_and_grad(loss: str) -> Callable[..., Any]:
    """Return our ``f(img, txt, scale, bias, **options) -> (loss, grads)`` of a registered loss.

    The package's public function that the loss's description names, looked up when called
    (a test that replaces ``portable_siglip.sigmoid_loss_and_grad`` is what runs), or
    :func:`portable_siglip._losses.evaluate` bound to a loss without one.

    Examples
    --------
    >>> import portable_siglip as ps
    >>> loss_and_grad("softmax") is ps.softmax_loss_and_grad
    True
    """
    import portable_siglip as ps

    from .. import _losses

    return _losses.loss_functions(registry.get(loss), ps)[1]


# --------------------------------------------------------------------------- inputs


def make_inputs(backend: str, n: int, dim: int, dtype: str, seed: int) -> tuple[Any, Any]:
    """Random L2-normalised image and text features, text rows correlated with image rows.

    Drawn with ``numpy.random.default_rng(seed)`` directly in ``dtype`` (no float64
    temporaries), then handed to ``backend`` without a copy.

    Parameters
    ----------
    backend : {"numpy", "torch", "jax"}
        Array library of the returned arrays.
    n, dim : int
        Shape ``(n, dim)`` of each.
    dtype : {"float32", "float64"}
        Their dtype.
    seed : int
        Seed of the generator.

    Returns
    -------
    img, txt : array
        Arrays of ``backend``, rows of unit norm.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n, dim), dtype=np.dtype(dtype))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = rng.standard_normal((n, dim), dtype=np.dtype(dtype))
    txt *= TEXT_NOISE
    txt += img
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    if backend == "torch":
        import torch

        return torch.from_numpy(img), torch.from_numpy(txt)
    if backend == "jax":
        import jax

        if dtype == "float64":
            jax.config.update("jax_enable_x64", True)  # type: ignore[no-untyped-call]
        return jax.device_put(img), jax.device_put(txt)
    return img, txt


def torch_leaves(img: Any, txt: Any) -> tuple[Any, Any, Any, Any]:
    """Return the leaves of a torch autograd case: ``img``, ``txt``, ``scale``, ``bias``.

    ``img`` and ``txt`` are detached and made to require gradients; ``detach()`` shares
    storage, so the tensors passed in stay free of autograd (other cases may use them).
    ``scale`` and ``bias`` are new 0-d parameters, :data:`SCALE` and :data:`BIAS` in the
    features' dtype, on their device.

    Parameters
    ----------
    img, txt : torch.Tensor, shape (n, d)
        The features.

    Returns
    -------
    tuple of torch.Tensor
        ``(img, txt, scale, bias)``, each with ``requires_grad``.
    """
    import torch

    scale = torch.tensor(SCALE, dtype=img.dtype, device=img.device, requires_grad=True)
    bias = torch.tensor(BIAS, dtype=img.dtype, device=img.device, requires_grad=True)
    return img.detach().requires_grad_(True), txt.detach().requires_grad_(True), scale, bias


# --------------------------------------------------------------------------- timing


def wait_ready(*arrays: Any) -> None:
    """Wait until ``arrays`` exist: jax dispatches asynchronously, a timing must wait."""
    for array in arrays:
        ready = getattr(array, "block_until_ready", None)
        if ready is not None:
            ready()


def timed(run: Callable[[], None]) -> float:
    """Return the wall-clock seconds of one call of ``run``, after a garbage collection."""
    gc.collect()  # not inside the timed region
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def time_interleaved(runs: Sequence[Callable[[], None]], repeats: int) -> list[list[float]]:
    """Warm every run up once, then time ``repeats`` rounds of all of them in turn.

    Parameters
    ----------
    runs : sequence of callables
        The rows of one case.
    repeats : int
        Rounds; each times every run once.

    Returns
    -------
    list of list of float
        Wall-clock seconds of each run, one list per run.

    Examples
    --------
    >>> times = time_interleaved([lambda: None, lambda: None], 3)
    >>> [len(t) for t in times]
    [3, 3]
    """
    for run in runs:
        run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, record in zip(runs, times, strict=True):
            record.append(timed(run))
    return times


# --------------------------------------------------------------------------- subprocesses


def source_env() -> dict[str, str]:
    """Return this process's environment with the source checkout first on ``PYTHONPATH``.

    A child started with ``python -m portable_siglip...`` then imports this copy of the
    package, from a source checkout too, not only from an installed package.
    """
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def run_json_line(
    command: Sequence[str], timeout: float, what: str
) -> tuple[dict[str, Any] | None, str | None]:
    """Run a command that prints its result as one JSON line, with :func:`source_env`.

    Parameters
    ----------
    command : sequence of str
        The command line.
    timeout : float
        Seconds it may take.
    what : str
        What it is, for the error messages ("memory probe", "worker").

    Returns
    -------
    result, error : (dict, None) or (None, str)
        The object on the last line of its standard output; or why there is none (a
        timeout, a non-zero exit status with the last line of its standard error, or no
        JSON).
    """
    try:
        done = subprocess.run(
            list(command),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=source_env(),
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None, f"{what} timed out after {timeout:.0f} s"
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return None, f"{what} failed with status {done.returncode}: {tail[0]}"
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return None, f"{what} printed no JSON: {done.stdout[-200:]!r}"
    return dict(result), None


def panel_rows(n: int, itemsize: int, limit: int) -> int:
    """Rows per panel of an (n, n) matrix of `itemsize` bytes: n while it fits `limit` bytes.

    Above that, a multiple of 1024 rows (at least 1024) whose panel fits.

    Examples
    --------
    >>> panel_rows(16384, 4, 2**31), panel_rows(262144, 4, 2**31)
    (16384, 2048)
    """
    if n * n * itemsize <= limit:
        return n
    return max(1024, limit // (n * itemsize) // 1024 * 1024)


# --------------------------------------------------------------------------- machine notes


def proc_kib(path: str, field: str) -> int | None:
    """Return the value of `field` (in kB) of a ``/proc`` file, in bytes; None where unreadable.

    Examples
    --------
    >>> proc_kib("/no/such/file", "VmSize") is None
    True
    """
    try:
        with open(path) as lines:
            for line in lines:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return None


def installed(name: str) -> bool:
    """Say whether the module ``name`` can be imported, without importing it."""
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _versions(backends: Sequence[str]) -> dict[str, Any]:
    import numpy as np

    info: dict[str, Any] = {"numpy": np.__version__}
    try:
        config = np.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        info["numpy_blas"] = f"{blas['name']} {blas['version']}"
    except Exception:  # older numpy: no mode="dicts"
        info["numpy_blas"] = None
    if "torch" in backends:
        import torch

        info["torch"] = torch.__version__
        info["torch_num_threads"] = torch.get_num_threads()
    if "jax" in backends:
        import jax

        info["jax"] = jax.__version__
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(backends: Sequence[str]) -> dict[str, Any]:
    """Describe the machine, the versions of numpy and of ``backends``, and the load now."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "python": platform.python_version(),
        **_versions(backends),
        "load_average_before": list(os.getloadavg()),
    }


# --------------------------------------------------------------------------- reporting


def mib(value: int | None) -> float | None:
    """Convert bytes to MiB; None stays None."""
    return None if value is None else value / MIB


def fmt(value: float | None, spec: str) -> str:
    """Format a table cell: ``-`` for None or a non-finite value."""
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def render_table(lines: Sequence[Sequence[str]], left: set[int]) -> str:
    """Lay out a header line and rows as aligned text columns under a rule.

    Columns in ``left`` (text) align left; the others (numbers) align right.

    Examples
    --------
    >>> print(render_table([("name", "s"), ("a", "1.5"), ("bb", "10.25")], left={0}))
    name      s
    ----  -----
    a       1.5
    bb    10.25
    """
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]

    def render(line: Sequence[str]) -> str:
        cells = [
            cell.ljust(width) if i in left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([render(lines[0]), rule, *(render(line) for line in lines[1:])])


def print_notes(notes: Sequence[str], errors: Sequence[str]) -> None:
    """Print a benchmark's notes, then its errors, wrapped at 100 columns."""
    for note in (*notes, *(f"error: {e}" for e in errors)):
        print(textwrap.fill(note, width=100, subsequent_indent="  "))


def print_load_after(machine: dict[str, Any]) -> None:
    """Print the load average after the run and its wall time, from ``machine``."""
    load = ", ".join(f"{x:.2f}" for x in machine["load_average_after"])
    print(f"load average after: {load}; total {machine['wall_s']:.0f} s")


def write_json_atomic(path: str | os.PathLike[str], report: dict[str, Any]) -> None:
    """Write ``report`` as indented JSON to ``path`` all at once, or not at all.

    The text goes to a temporary file beside ``path``, which then replaces it
    (:func:`os.replace`), so a reader, or a run killed mid-write, never sees half a file.
    """
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def write_report(path: str | os.PathLike[str] | None, report: dict[str, Any]) -> None:
    """Write a benchmark's report as indented JSON to ``path`` and say so; None: nothing."""
    if path is None:
        return
    write_json_atomic(path, report)
    print(f"results written to {path}")


# --------------------------------------------------------------------------- progress


def log_progress(message: str) -> None:
    """Write one line of progress to stderr."""
    print(message, file=sys.stderr, flush=True)


class Progress:
    """A progress line on stderr: cases done, elapsed time and an estimate of what is left.

    The estimate weighs each case by its flop count ``n^2 d`` (times four thirds for the
    softmax), which is what its time is proportional to.

    Parameters
    ----------
    weights : sequence of float
        Work of each case, in the order they will run.
    stream : file-like, optional
        Where to write (default: ``sys.stderr``). On a terminal the line is redrawn in
        place; otherwise one line per case is written.
    """

    def __init__(self, weights: Sequence[float], stream: Any = None) -> None:
        self._weights = list(weights)
        self._total = sum(self._weights) or 1.0
        self._done = 0.0
        self._count = 0
        self._started = time.perf_counter()
        self._stream = sys.stderr if stream is None else stream
        self._tty = bool(getattr(self._stream, "isatty", lambda: False)())

    def start(self, label: str) -> None:
        """Show that the next case, ``label``, is running."""
        elapsed = time.perf_counter() - self._started
        fraction = self._done / self._total
        left = elapsed / fraction * (1.0 - fraction) if fraction > 0 else None
        width = 24
        bar = "#" * round(width * fraction) + "." * (width - round(width * fraction))
        eta = "?" if left is None else _clock(left)
        line = (
            f"[{bar}] {self._count}/{len(self._weights)} cases, {_clock(elapsed)} elapsed, "
            f"~{eta} left | {label}"
        )
        if self._tty:
            self._stream.write("\r\033[K" + line)
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def advance(self) -> None:
        """Mark the current case done."""
        self._done += self._weights[self._count]
        self._count += 1

    def close(self) -> None:
        """End the line on a terminal."""
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()


def _clock(seconds: float) -> str:
    """Format seconds as ``h:mm:ss``.

    Examples
    --------
    >>> _clock(3725.2)
    '1:02:05'
    """
    whole = round(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def compare_rows(
    rows: Sequence[dict[str, Any]], reference: str, rtol: float, name: str, errors: list[str]
) -> None:
    """Fill in each row's time and memory ratios to the `reference` row; check the losses.

    `rows` are one case's (one loss, one n), each with ``impl``, ``median_s``,
    ``peak_extra_mib``, ``loss_value``, ``notes``, ``loss`` and ``n``; ``time_ratio`` and
    ``memory_ratio`` are set where both figures exist. A loss value more than `rtol`
    (relative) from the reference's is a note of its row and an entry of `errors`, naming
    the reference as `name` ("ours", "cached_step's").

    Examples
    --------
    >>> rows = [
    ...     {"impl": "a", "median_s": 2.0, "peak_extra_mib": 10.0, "loss_value": 1.0},
    ...     {"impl": "b", "median_s": 3.0, "peak_extra_mib": 40.0, "loss_value": 1.5,
    ...      "notes": [], "loss": "sigmoid", "n": 8},
    ... ]
    >>> errors = []
    >>> compare_rows(rows, "a", 1e-3, "a's", errors)
    >>> rows[1]["time_ratio"], rows[1]["memory_ratio"], errors
    (1.5, 4.0, ["sigmoid n=8 b: loss 1.5 differs from a's 1"])
    """
    base = next((row for row in rows if row["impl"] == reference), None)
    if base is None:
        return
    for row in rows:
        if base["median_s"] and row["median_s"] is not None:
            row["time_ratio"] = row["median_s"] / base["median_s"]
        if base["peak_extra_mib"] and row["peak_extra_mib"] is not None:
            row["memory_ratio"] = row["peak_extra_mib"] / base["peak_extra_mib"]
        mine, theirs = base["loss_value"], row["loss_value"]
        if row is base or mine is None or theirs is None:
            continue
        if not abs(theirs - mine) <= rtol * max(abs(mine), 1e-30):
            error = f"loss {theirs:.7g} differs from {name} {mine:.7g}"
            row["notes"].append(error)
            errors.append(f"{row['loss']} n={row['n']} {row['impl']}: {error}")
