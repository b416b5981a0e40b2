"""The distributed judge: an implementation run on W processes, judged against the goldens.

``python -m portable_siglip.conformance --loss L --impl FILE:FACTORY --backend torch
--world-size W`` starts W worker processes (``python -m
portable_siglip.conformance._distributed``, this module's entry) on a gloo process group
over a free local port. Each worker calls ``FACTORY(rank=r, world_size=W)`` (open_clip's
``SigLipLoss``/``ClipLoss`` classes are such factories, and so are this library's torch
modules), feeds it its shard of every golden case with the shard, ``scale`` and ``bias`` as
leaf tensors, takes the gradients by autograd and writes what it got to a file per case; the
parent (:func:`judge`) reads every rank's files and compares with the goldens.

Two conventions say what a conforming set of ranks returns (docs/conformance.md, "The
distributed judge"):

``global``
    Every rank returns the global loss and the exact gradients of the global loss with
    respect to its own rows and to the shared ``scale`` and ``bias``.
``ddp``
    What DistributedDataParallel needs to average into the exact gradient: the ranks' losses
    average to the global loss, rank r's feature gradients are W times the exact gradients
    of its rows, and the ranks' ``scale`` and ``bias`` gradients average to the exact ones.

With MPI (``mpirun -n W python -m portable_siglip.conformance ... --backend numpy --comm
mpi``), :func:`judge_mpi` runs on every rank of the job instead: ``FACTORY(comm)`` returns a
numpy callable that returns ``(loss, grads)``, judged under ``global``; rank 0 gathers and
reports, and a rank that raises aborts the job.

This module also holds :func:`import_attribute`, the ``MODULE:ATTR`` resolver that the
command line shares with the workers.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from portable_siglip import _registry as registry
from portable_siglip._interop import UsageError

from ._cases import Case, load_cases
from ._checks import _check_scalar_dtype, _scalar_notes, describe_exception
from ._judged import check_loss, golden_losses
from ._naive import naive_errors
from ._report import (
    CONVENTIONS,
    HALF_DTYPES,
    TOLERANCE,
    CheckResult,
    Report,
    case_error,
    check_bound,
    compare,
    tolerance_for,
)

__all__ = [
    "DIST_CONVENTIONS",
    "import_attribute",
    "judge",
    "judge_mpi",
    "schedule",
    "shards",
]

#: The distributed conventions, see the module docstring.
DIST_CONVENTIONS = ("ddp", "global")

#: Exit statuses of a worker beyond 0: the implementation raised (a failed check), or the
#: factory could not be loaded or called (a usage error).
_RAISED = 3
_USAGE = 4

_GRADIENTS = ("img", "txt", "scale", "bias")


# --------------------------------------------------------------------------- loading


def import_attribute(spec: str) -> Any:
    """Resolve ``MODULE:ATTR`` (MODULE importable, or a path to a ``.py`` file).

    ``ATTR`` may be dotted (``Class.method``). Nothing is constructed: a class comes back
    as the class.

    Raises
    ------
    UsageError
        If the module or attribute cannot be found, or importing the module raises (or
        calls ``sys.exit``).
    """
    module_name, sep, attribute = spec.rpartition(":")
    if not sep or not module_name or not attribute:
        msg = f"`--impl` must be MODULE:ATTR or path/to/file.py:ATTR, got {spec!r}"
        raise UsageError(msg)
    if module_name.endswith(".py") or "/" in module_name:
        module = _load_file(Path(module_name))
    else:
        module = _import_module(module_name)
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            msg = f"`--impl`: {module_name!r} has no attribute {attribute!r}"
            raise UsageError(msg)
        target = getattr(target, part)
    return target


def _load_file(path: Path) -> Any:
    """Load the Python file `path` as a module; a UsageError says why it cannot be."""
    if not path.is_file():
        msg = f"`--impl`: no such file {str(path)!r}"
        raise UsageError(msg)
    unique = f"_conformance_impl_{abs(hash(str(path.resolve())))}"
    loader_spec = importlib.util.spec_from_file_location(unique, path)
    if loader_spec is None or loader_spec.loader is None:
        msg = f"`--impl`: cannot load {str(path)!r} as a Python module"
        raise UsageError(msg)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[unique] = module
    sys.path.insert(0, str(path.resolve().parent))  # let it import its siblings
    try:
        loader_spec.loader.exec_module(module)
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # sys.exit at import is an error too
        msg = f"`--impl`: loading {str(path)!r} raised {describe_exception(error)}"
        raise UsageError(msg) from error
    return module


def _import_module(name: str) -> Any:
    """Import the module `name`; a UsageError says why it cannot be."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        msg = f"`--impl`: cannot import module {name!r}: {error}"
        raise UsageError(msg) from None
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # sys.exit at import is an error too
        msg = f"`--impl`: importing {name!r} raised {describe_exception(error)}"
        raise UsageError(msg) from error


# --------------------------------------------------------------------------- the cases


def shards(n: int, world_size: int, convention: str) -> list[list[int]]:
    """Rows per rank to cut a case of `n` pairs into: none when `n` is too small.

    ``ddp`` takes equal shards only (DDP's average is the global loss only then), so `n`
    must be a multiple of `world_size`. ``global`` takes the balanced split (uneven when
    `world_size` does not divide `n`) and, when it differs, a skewed one with one pair on
    every rank but the last.
    """
    if n < world_size:
        return []
    balanced = [(r + 1) * n // world_size - r * n // world_size for r in range(world_size)]
    if convention == "ddp":
        return [balanced] if n % world_size == 0 else []
    skewed = [1] * (world_size - 1) + [n - world_size + 1]
    return [balanced] if skewed == balanced else [balanced, skewed]


def schedule(
    cases: Iterable[Case], world_size: int, convention: str
) -> list[tuple[Case, list[int]]]:
    """Every (case, rows per rank) the judge runs, in the order every rank runs them."""
    work = [(case, sizes) for case in cases for sizes in shards(case.n, world_size, convention)]
    # Equal shards first: code that needs them (open_clip's) is judged on those before an
    # uneven split ends the run.
    return sorted(work, key=lambda item: len(set(item[1])) > 1)


def _label(case: Case, sizes: Sequence[int]) -> str:
    return f"{case.name} [{'+'.join(map(str, sizes))}]"


def _rows(sizes: Sequence[int], rank: int) -> slice:
    """Return the rows of rank `rank` when a case is cut into shards of `sizes` rows."""
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _scheduled(world_size: int, convention: str) -> tuple[list[tuple[Case, list[int]]], int]:
    """Return the judge's :func:`schedule` and how many cases it leaves out.

    The large cases (n in the thousands) test one-process tile tails; they would only slow
    the distributed runs down, and are neither run nor counted.
    """
    selected = tuple(case for case in load_cases() if "large" not in case.tags)
    work = schedule(selected, world_size, convention)
    return work, len(selected) - len({case.name for case, _ in work})


# --------------------------------------------------------------------------- the worker


def _scalar_loss(result: Any) -> Any:
    """Return the 0-d loss tensor in what the implementation returned.

    A tensor is the loss; a mapping (open_clip's ``output_dict=True``) or a tuple/list of
    tensors is summed, as open_clip's training loop sums its losses.
    """
    import torch

    if isinstance(result, Mapping):
        parts = list(result.values())
    elif isinstance(result, tuple | list):
        parts = list(result)
    else:
        parts = [result]
    if not parts or not all(isinstance(p, torch.Tensor) and p.numel() == 1 for p in parts):
        msg = (
            "the implementation must return a scalar loss tensor, or a dict or tuple of "
            f"them (summed); got {type(result).__name__}"
        )
        raise TypeError(msg)
    return sum(p.reshape(()) for p in parts[1:]) + parts[0].reshape(())


def _takes_bias(loss: str) -> bool:
    """Whether a distributed implementation of `loss` is handed the bias: not where it cancels.

    open_clip's ``ClipLoss`` (the softmax loss) takes none.
    """
    return bool(registry.get(loss).uses_bias)


def _worker_case(
    function: Callable[..., Any],
    case: Case,
    rows: slice,
    loss: str,
    dtype: Any,
    scalar_dtype: Any = None,
) -> dict[str, Any]:
    """Return the loss and autograd's gradients of `function` on the shard `rows` of `case`.

    The shard is a pair of leaf tensors of torch dtype `dtype`, ``scale`` and ``bias`` leaf
    tensors of `scalar_dtype` (`dtype` when None); a leaf the loss does not reach gets a
    zero gradient. What the implementation raises propagates.
    """
    import numpy as np
    import torch

    leaves = [
        torch.tensor(np.array(case.img[rows]), dtype=dtype, requires_grad=True),
        torch.tensor(np.array(case.txt[rows]), dtype=dtype, requires_grad=True),
        torch.tensor(case.scale, dtype=scalar_dtype or dtype, requires_grad=True),
        torch.tensor(case.bias, dtype=scalar_dtype or dtype, requires_grad=True),
    ]
    inputs = leaves if _takes_bias(loss) else leaves[:3]  # ClipLoss takes no bias
    value = _scalar_loss(function(*inputs))
    if value.requires_grad:
        value.backward()
    values: dict[str, Any] = {"loss": np.float64(value.detach().double().item())}
    for name, leaf in zip(_GRADIENTS, leaves, strict=True):
        grad = leaf.grad
        values[name] = (
            np.zeros(tuple(leaf.shape)) if grad is None else grad.detach().double().numpy()
        )
    return values


def _worker_run(args: argparse.Namespace) -> int:
    """Body of one rank: returns its exit status, having written its file."""
    import datetime

    import numpy as np
    import torch
    import torch.distributed as dist

    from portable_siglip._interop import load_backend

    out = Path(args.out)
    rank, world = args.rank, args.world_size
    error_file = out / f"rank{rank}.error"
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=args.timeout if args.timeout > 0 else 1800)
    dist.init_process_group(
        "gloo", init_method=args.init, rank=rank, world_size=world, timeout=timeout
    )
    try:
        factory = import_attribute(args.impl)
        function = factory(rank=rank, world_size=world)
    except KeyboardInterrupt:
        raise
    except BaseException as error:
        text = error if isinstance(error, UsageError) else describe_exception(error)
        error_file.write_text(f"rank {rank}: constructing the implementation: {text}")
        return _USAGE
    (out / f"rank{rank}.built").touch()
    _, dtype = load_backend("torch", args.dtype)
    scalar_dtype = None
    if args.scalar_dtype != "same":
        scalar_dtype = load_backend("torch", args.scalar_dtype)[1]
    work, _ = _scheduled(world, args.dist_convention)
    for index, (case, sizes) in enumerate(work):
        rows = _rows(sizes, rank)
        try:
            values = _worker_case(function, case, rows, args.loss, dtype, scalar_dtype)
        except KeyboardInterrupt:
            raise
        except BaseException as error:  # SystemExit too: a failed run
            error_file.write_text(
                f"rank {rank}, {_label(case, sizes)}: {describe_exception(error)}"
            )
            return _RAISED
        np.savez(out / f"rank{rank}-case{index}.npz", **values)
    # Leave together: a rank that tears gloo down while a peer is still in its last
    # collective can make that peer's gloo thread abort the process.
    dist.barrier()
    dist.destroy_process_group()
    # A rank that exits with status 0 and no such file left the run early (os._exit(0)).
    (out / f"rank{rank}.done").touch()
    return 0


def _worker_main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m portable_siglip.conformance._distributed")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--init", required=True, help="tcp://HOST:PORT of the rendezvous")
    parser.add_argument("--impl", required=True)
    parser.add_argument("--loss", choices=golden_losses(), required=True)
    parser.add_argument("--dtype", choices=tuple(TOLERANCE), default="float64")
    parser.add_argument("--scalar-dtype", choices=("same", "float32"), default="same")
    parser.add_argument("--dist-convention", choices=DIST_CONVENTIONS, default="ddp")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--out", required=True)
    status = _worker_run(parser.parse_args(argv))
    # Skip the interpreter's teardown, where a gloo thread that autograd's collectives left
    # behind can end the process with "terminate called without an active exception".
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


# --------------------------------------------------------------------------- the parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker_command(
    spec: str,
    loss: str,
    world_size: int,
    convention: str,
    dtype: str,
    timeout: float | None,
    out: Path,
    scalar_dtype: str | None = None,
) -> list[str]:
    """Return the command line of a worker, but its ``--rank``."""
    return [
        sys.executable,
        "-m",
        "portable_siglip.conformance._distributed",
        "--world-size",
        str(world_size),
        "--init",
        f"tcp://127.0.0.1:{_free_port()}",
        "--impl",
        spec,
        "--loss",
        loss,
        "--dtype",
        dtype,
        "--scalar-dtype",
        scalar_dtype or "same",
        "--dist-convention",
        convention,
        "--timeout",
        str(timeout or 0),
        "--out",
        str(out),
    ]


def _launch(
    command: Sequence[str], world_size: int, deadline_s: float, out: Path, labels: Sequence[str]
) -> tuple[list[list[dict[str, Any]]], str | None]:
    """Run the W workers; return each rank's outputs of the cases every rank finished.

    The second item says why the run ended early (a rank raised, crashed or overran), or
    is None.

    Raises
    ------
    UsageError
        If a rank could not load or construct the implementation.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    logs = []
    try:
        for rank in range(world_size):
            log = (out / f"rank{rank}.log").open("w")
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [*command, "--rank", str(rank)], env=env, stdout=log, stderr=subprocess.STDOUT
                )
            )
        failure, usage = _wait(procs, out, deadline_s, labels)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for log in logs:
            log.close()
    if usage:
        raise UsageError(failure or "a rank could not construct the implementation")
    return _read_outputs(out, world_size, len(labels)), failure


def _wait(
    procs: Sequence[subprocess.Popen[bytes]], out: Path, deadline_s: float, labels: Sequence[str]
) -> tuple[str | None, bool]:
    """Wait for the workers: why they failed (or None), and whether it was usage.

    A rank fails when it ends with a nonzero status, or with status 0 before the end of
    the run (no ``.done`` file: it called ``os._exit(0)``); then the others get a moment to
    fail in turn (a peer waiting for it in a collective does) and :func:`_why` says who
    is to blame.
    """
    end = time.monotonic() + deadline_s
    while True:
        codes = [proc.poll() for proc in procs]
        done = [
            code == 0 and (out / f"rank{rank}.done").exists() for rank, code in enumerate(codes)
        ]
        if all(done):
            return None, False
        if any(code is not None and not ok for code, ok in zip(codes, done, strict=True)):
            time.sleep(0.5)  # let the other ranks write their own errors, if they have one
            return _why(out, [proc.poll() for proc in procs], labels)
        if time.monotonic() > end:
            running = [rank for rank, code in enumerate(codes) if code is None]
            where = ", ".join(f"rank {r} in {_where(out, r, labels)}" for r in running)
            failure = (
                f"timeout: no result from every rank within {deadline_s:.0f} s (the whole "
                f"run's budget); still running: {where}"
            )
            return failure, False
        time.sleep(0.05)


def _read_outputs(out: Path, world_size: int, cases: int) -> list[list[dict[str, Any]]]:
    """Return each rank's outputs of the first cases every rank wrote, in order."""
    import numpy as np

    results: list[list[dict[str, Any]]] = [[] for _ in range(world_size)]
    for index in range(cases):
        paths = [out / f"rank{rank}-case{index}.npz" for rank in range(world_size)]
        if not all(path.exists() for path in paths):
            break
        for rank, path in enumerate(paths):
            with np.load(path) as data:
                results[rank].append({key: np.array(data[key]) for key in data.files})
    return results


#: What gloo (and the sockets under it) says on a rank whose peer left, crashed or hung.
_PEER_ERRORS = (
    "gloo",
    "Connection closed by peer",
    "Connection reset by peer",
    "Timed out waiting",
    "Broken pipe",
)


def _where(out: Path, rank: int, labels: Sequence[str]) -> str:
    """Say where rank `rank` is, or was when it ended, from the files it wrote."""
    if not (out / f"rank{rank}.built").exists():
        return "constructing the implementation"
    index = 0
    while index < len(labels) and (out / f"rank{rank}-case{index}.npz").exists():
        index += 1
    return labels[index] if index < len(labels) else "its last collective, after every case"


def _why(out: Path, codes: Sequence[int | None], labels: Sequence[str]) -> tuple[str, bool]:
    """Say why the run failed, naming first the ranks to blame; whether it was usage.

    To blame: a rank that raised (not a peer error), crashed, or left with status 0 before
    the end; else, when every error is a peer's (gloo's "Connection closed by peer",
    "Timed out waiting ..."), the ranks still running: they hung. The ranks that only
    failed waiting for those come after.
    """
    blamed: list[str] = []
    waited: list[str] = []
    running = [rank for rank, code in enumerate(codes) if code is None]
    usage = False
    for rank, code in enumerate(codes):
        if code is None or (out / f"rank{rank}.done").exists():
            continue
        where = _where(out, rank, labels)
        error = out / f"rank{rank}.error"
        if error.exists():
            text = error.read_text(errors="replace").strip()
            usage |= code == _USAGE
            peer = any(marker in text for marker in _PEER_ERRORS)
            (waited if peer else blamed).append(text)
        elif code == 0:
            blamed.append(
                f"rank {rank} left the run: it exited with status 0 in {where}, before the "
                "end (os._exit, or the implementation ended its process)"
            )
        else:
            log = (out / f"rank{rank}.log").read_text(errors="replace").strip().splitlines()
            last = " | ".join(log[-3:])[-600:] if log else "no output"
            blamed.append(f"rank {rank} ended with exit status {code} in {where}: {last}")
    hung = [f"rank {rank} hung: still running in {_where(out, rank, labels)}" for rank in running]
    if blamed:
        lines = blamed + [f"then {text}" for text in waited]
        if hung:
            lines.append(f"still running: {', '.join(f'rank {rank}' for rank in running)}")
    else:
        lines = hung + [f"then {text}" for text in waited] if hung else waited
    return "; ".join(lines), usage


def _gathered(
    raw: Sequence[Mapping[str, Any]], convention: str
) -> tuple[dict[str, Any], list[float]]:
    """Return what to compare with the goldens, from the ranks' raw outputs of one case.

    ``global``: the features' gradients concatenated in rank order; loss, scale and bias
    are compared rank by rank (returned here from the rank that is furthest off, by the
    caller). ``ddp``: the losses and the scale and bias gradients averaged over the ranks,
    the features' gradients concatenated and divided by W.
    """
    import numpy as np

    world = len(raw)
    losses = [float(r["loss"]) for r in raw]
    values: dict[str, Any] = {}
    for name in ("img", "txt"):
        if not all(name in r for r in raw):
            continue  # a loss without gradients (numpy)
        values[name] = np.concatenate([r[name] for r in raw])
        if convention == "ddp":
            values[name] = values[name] / world
    for name in ("loss", "scale", "bias"):
        if not all(name in r for r in raw):
            continue
        per_rank = [float(r[name]) for r in raw]
        values[name] = float(np.mean(per_rank)) if convention == "ddp" else per_rank
    return values, losses


def _compare(
    label: str,
    case: Case,
    values: Mapping[str, Any],
    expected: Mapping[str, Any],
    tolerance: float,
    naive: Mapping[str, float] | None = None,
    dtype: str = "",
) -> list[CheckResult]:
    """Compare each quantity with `expected`, within `tolerance`.

    In a half-precision run (`naive`: the naive reference's error per quantity), each
    quantity is bounded by FlashAttention's rule instead (:func:`check_bound`).
    """
    results = []
    for quantity, want in expected.items():
        if quantity in values:  # else not returned: the report says gradients were not checked
            bound, reference = check_bound(tolerance, naive, quantity, dtype)
            got = values[quantity]  # a list of one value per rank: the worst rank counts
            result = compare(
                "distributed", label, case, quantity, got, want, bound, reference, dtype
            )
            results.append(result)
    return results


# --------------------------------------------------------------------------- diagnosis

#: The shapes of distributed mistakes :func:`_diagnose` tells apart (see :func:`_fits`).
_MISTAKES = (
    "exact",
    "ddp-ready",
    "texts-no-grad",
    "no-exchange",
    "sum-of-parts",
    "mean-of-parts",
)


def _local_losses(
    case: Case, sizes: Sequence[int], loss: str, factor: Callable[[int], float]
) -> list[float]:
    """Return the one-process loss of each rank's shard alone (under the convention)."""
    from portable_siglip._reference import dense_loss_and_grad

    losses = []
    for rank, size in enumerate(sizes):
        rows = _rows(sizes, rank)
        value = dense_loss_and_grad(loss, case.img[rows], case.txt[rows], case.scale, case.bias)
        losses.append(value[0] * factor(size))
    return losses


def _own_texts_gradient(case: Case, sizes: Sequence[int], loss: str) -> Any:
    """Return the texts' gradients each rank's own rows alone send to its own texts, in float64.

    With ``G = dL/dZ`` of the global loss (dense, float64), rank r's rows ``R`` and texts
    ``C``: ``t * G[R, C].T @ img[R]``, concatenated in rank order. It is what a rank's
    texts get when the texts are gathered without gradient: only the rank's own loss (its
    rows against every text) reaches them, through its own slot of the gathered texts.
    """
    import numpy as np

    from portable_siglip._reference import dense_logit_gradient

    _, dlogits, _ = dense_logit_gradient(loss, case.img, case.txt, case.scale, case.bias)
    parts = []
    for rank in range(len(sizes)):
        own = _rows(sizes, rank)
        parts.append(case.scale * dlogits[own, own].T @ np.asarray(case.img[own]))
    return np.concatenate(parts)


def _fits(
    item: tuple[Case, list[int], dict[str, Any], list[float], bool],
    loss: str,
    world_size: int,
    factor: Callable[[int], float],
    dtype: str,
    convention: str = "ddp",
) -> dict[str, bool]:
    """Say which of :data:`_MISTAKES` the ranks' outputs of one failing case fit.

    ``exact``: every rank returns the global loss and its exact gradients; ``ddp-ready``:
    what DDP's average needs; ``texts-no-grad``: what `convention` needs, but each rank's
    texts' gradients are only its own rows' share (:func:`_own_texts_gradient`; W times it
    under ``ddp``); ``no-exchange``: each rank's loss is its shard's alone;
    ``sum-of-parts`` and ``mean-of-parts``: the ranks' losses differ and add up, or
    average, to the global loss.
    """
    import numpy as np

    case, sizes, raw, losses, _ = item
    tolerance = tolerance_for(dtype, case)
    golden = case.goldens[loss]
    f = factor(case.n)
    gl = golden.loss * f
    scalars = {"scale": golden.scale * f, "bias": golden.bias * f}
    names = ("scale", "bias") if _takes_bias(loss) else ("scale",)

    def close(got: Any, want: Any, quantity: str) -> bool:
        return case_error(got, want, case, quantity) <= tolerance

    def every(values: Sequence[float], want: float, quantity: str) -> bool:
        return all(close(v, want, quantity) for v in values)

    # Without gradients (a numpy loss alone) none of the first three can be told.
    gradients = all(k in raw for k in ("img", "txt", *names))

    def outputs(divide: int, txt: Any) -> bool:
        """Whether the outputs, features' gradients divided by `divide`, are exact but `txt`.

        1: every rank's loss and scalar gradients are exact; W: their means are (DDP).
        """
        if not gradients:
            return False
        if divide == 1:
            rest = every(losses, gl, "loss") and all(every(raw[k], scalars[k], k) for k in names)
        else:
            rest = close(np.mean(losses), gl, "loss") and all(
                close(np.mean(raw[k]), scalars[k], k) for k in names
            )
        return (
            rest
            and close(raw["img"] / divide, golden.img * f, "img")
            and close(raw["txt"] / divide, txt, "txt")
        )

    differ = not every(losses, losses[0], "loss")
    local = _local_losses(case, sizes, loss, factor)
    divide = world_size if convention == "ddp" else 1
    return {
        "exact": outputs(1, golden.txt * f),
        "ddp-ready": outputs(world_size, golden.txt * f),
        "texts-no-grad": gradients and outputs(divide, _own_texts_gradient(case, sizes, loss) * f),
        "no-exchange": all(close(g, w, "loss") for g, w in zip(losses, local, strict=True)),
        "sum-of-parts": differ and close(sum(losses), gl, "loss"),
        "mean-of-parts": differ and close(np.mean(losses), gl, "loss"),
    }


def _diagnose(
    items: Sequence[tuple[Case, list[int], dict[str, Any], list[float], bool]],
    loss: str,
    world_size: int,
    convention: str,
    factor: Callable[[int], float],
    dtype: str,
) -> list[tuple[str, str]]:
    """Name the distributed mistake behind the failing cases, when one fits them all.

    `items` holds, per failing case, the case, its shards, the ranks' raw outputs (``loss``
    a list per rank; ``img``/``txt`` concatenated, undivided; ``scale``/``bias`` lists), the
    per-rank losses and whether the case failed.
    """
    failing = [item for item in items if item[4]]
    if not failing or world_size < 2:
        return []
    fits = dict.fromkeys(_MISTAKES, True)
    for item in failing:
        for mistake, fit in _fits(item, loss, world_size, factor, dtype, convention).items():
            fits[mistake] &= fit
    return [_mistake(fits, world_size, convention)]


def _mistake(fits: Mapping[str, bool], w: int, convention: str) -> tuple[str, str]:
    """Return the finding (code, explanation) of the mistake that `fits` every failing case."""
    if convention == "ddp" and fits["exact"]:
        return (
            "gather-without-grad",
            f"the features' gradients are 1/W = 1/{w} of what DDP needs: each rank's "
            "gradients are the exact gradients of the global loss for its own rows, so "
            "DDP's average over the ranks divides them by W. The features were gathered "
            "without gradient, so no rank's loss sends gradient to the other ranks' "
            "features (open_clip: ClipLoss(local_loss=True, gather_with_grad=True), not "
            "ClipLoss()). These outputs do pass --dist-convention global.",
        )
    if fits["texts-no-grad"]:
        times = f"W = {w} times " if convention == "ddp" else ""
        return (
            "gather-without-grad",
            "the texts' gradients miss the other ranks' share, and everything else is "
            f"right: each rank's texts get only {times}the gradient of its own rows' part "
            "of the global loss (t * G[own rows, own texts]^T @ img, G = dL/dZ), none from "
            "the other ranks' rows, whose negatives they also are. The texts were gathered "
            "without gradient (torch.distributed.all_gather, the own slot kept as the local "
            "tensor); gather them with gradient (torch.distributed.nn.functional.all_gather, "
            "or open_clip's SigLipLoss(rank=, world_size=))",
        )
    if convention == "global" and fits["ddp-ready"]:
        return (
            "ddp-gradients",
            f"the features' gradients are W = {w} times the exact ones and the ranks' "
            "losses, scale and bias gradients average to the exact ones: this is what "
            "DDP's averaging needs, not the global loss and its exact gradients; judge it "
            "with --dist-convention ddp",
        )
    if fits["no-exchange"]:
        return (
            "no-exchange",
            "each rank's loss is the one-process loss of its own shard: the other ranks' "
            "texts never appear as its negatives, and the global batch is never formed. "
            "Exchange the text features (in torch with gradient: an all_gather from "
            "torch.distributed.nn, or open_clip's SigLipLoss(rank=, world_size=))",
        )
    if fits["sum-of-parts"] or (convention == "global" and fits["mean-of-parts"]):
        how = "sum" if fits["sum-of-parts"] else "mean"
        return (
            "loss-not-reduced",
            f"the ranks return different losses whose {how} is the global loss: each "
            "returns only its part, never reduced over the ranks"
            + (
                "; under DDP the ranks' losses must average to the global loss"
                if convention == "ddp"
                else "; every rank must return the global loss (all-reduce the parts)"
            ),
        )
    return (
        "unknown",
        "the failures fit no known distributed mistake; the table lists every failed check",
    )


# --------------------------------------------------------------------------- the judge


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        msg = f"`--convention` must be one of {tuple(CONVENTIONS)}, got {convention!r}"
        raise UsageError(msg)


def _check_judge_arguments(
    loss: str, world_size: int, dist_convention: str, convention: str
) -> None:
    """Raise a UsageError on arguments :func:`judge` cannot run with, torch's lack included."""
    check_loss(loss, error=UsageError)
    if dist_convention not in DIST_CONVENTIONS:
        msg = f"`--dist-convention` must be one of {DIST_CONVENTIONS}, got {dist_convention!r}"
        raise UsageError(msg)
    _check_convention(convention)
    if not isinstance(world_size, int) or world_size < 1:
        msg = f"`--world-size` must be a positive integer, got {world_size!r}"
        raise UsageError(msg)
    try:
        import torch.distributed as dist
    except ImportError:
        msg = "the distributed judge needs torch (python -m pip install torch)"
        raise UsageError(msg) from None
    if not dist.is_available() or not dist.is_gloo_available():
        msg = "the distributed judge needs torch.distributed with gloo"
        raise UsageError(msg)


def judge(
    spec: str,
    *,
    loss: str,
    world_size: int,
    dist_convention: str = "ddp",
    dtype: str = "float64",
    convention: str = "default",
    timeout: float | None = 60.0,
    scalar_dtype: str | None = None,
) -> Report:
    """Run the factory `spec` on `world_size` gloo processes and judge it against the goldens.

    Parameters
    ----------
    spec : str
        ``MODULE:ATTR`` or ``path/to/file.py:ATTR`` naming a factory: ``ATTR(rank=r,
        world_size=W)`` returns the loss callable of rank r, ``f(img, txt, scale, bias)``
        for the sigmoid loss and ``f(img, txt, scale)`` for the softmax loss (a loss whose
        bias cancels takes none), returning a scalar torch tensor (or a dict or tuple of
        them, summed).
    loss : str
        Which loss it claims to compute: one with golden cases, as for
        :func:`~portable_siglip.conformance.check`.
    world_size : int
        Number of processes, at least 1.
    dist_convention : {"ddp", "global"}
        What the ranks are to return (see the module docstring).
    dtype : str
        Dtype of the inputs; sets the tolerance.
    convention : {"default", "mean", "sum"}
        The declared normalisation, as for :func:`~portable_siglip.conformance.check`.
    timeout : float, optional
        Seconds a rank may wait in a collective for its peers (a hung rank fails the run
        after that); the whole run is bounded by `timeout` times the number of cases plus
        two. None: 30 minutes per collective and no bound on the run.
    scalar_dtype : {None, "float32"}
        As for :func:`~portable_siglip.conformance.check`: ``"float32"`` hands every rank
        ``scale`` and ``bias`` in float32 beside float32, float16 or bfloat16 features.

    Returns
    -------
    Report
        One ``"distributed"`` check per case, shard split and quantity. A rank that
        raised, crashed or overran ends the run: the case it stopped at fails with its
        error (code ``rank-failed``) and the later ones as ``not run``.

    Raises
    ------
    UsageError
        If `spec` cannot be loaded or called on a rank, or the arguments are wrong.
    """
    _check_judge_arguments(loss, world_size, dist_convention, convention)
    _check_scalar_dtype(scalar_dtype, dtype)
    from portable_siglip._interop import load_backend

    load_backend("torch", dtype)  # UsageError for a dtype torch lacks
    factory = import_attribute(spec)  # a usage error here, before any process starts
    if not callable(factory):
        msg = f"`--impl`: {spec!r} is not callable"
        raise UsageError(msg)
    work, skipped = _scheduled(world_size, dist_convention)
    if not work:
        msg = f"no golden case has a number of pairs that splits over {world_size} ranks"
        raise UsageError(msg)
    module, sep, attribute = spec.rpartition(":")
    if sep and (module.endswith(".py") or "/" in module):
        spec = f"{Path(module).resolve()}:{attribute}"  # the workers resolve it alike
    deadline = (timeout or math.inf) * (len(work) + 2)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="conformance-dist-") as folder:
        out = Path(folder)
        command = _worker_command(
            spec, loss, world_size, dist_convention, dtype, timeout, out, scalar_dtype
        )
        labels = [_label(case, sizes) for case, sizes in work]
        raw, failure = _launch(command, world_size, deadline, out, labels)
    run = _Run(dist_convention, f"{world_size} processes on gloo", _takes_bias(loss), skipped)
    report = Report(loss, "torch", dtype, convention, spec)  # ClipLoss takes no bias
    report.notes += _scalar_notes(scalar_dtype, dtype)
    return _build_report(report, run, raw, work, failure, time.monotonic() - started)


@dataclass(frozen=True)
class _Run:
    """How a distributed run was made, for its report."""

    dist_convention: str
    how: str  # "2 processes on gloo"
    with_bias: bool  # whether the implementation takes a bias (ClipLoss does not)
    skipped: int  # golden cases too small (or uneven, under ddp) for the world size


def _judge_split(
    report: Report,
    run: _Run,
    case: Case,
    sizes: list[int],
    outputs: Sequence[Mapping[str, Any]],
) -> tuple[Case, list[int], dict[str, Any], list[float], bool]:
    """Add the checks of the ranks' `outputs` of one case split to `report`.

    Returns what :func:`_diagnose` reads of it: the case, its shards, the ranks' outputs
    undivided (features concatenated, ``scale``/``bias`` per rank), their losses, and
    whether a check failed.
    """
    world_size = len(outputs)
    report.gradients_checked |= all("img" in output for output in outputs)
    values, losses = _gathered(outputs, run.dist_convention)
    golden = case.goldens[report.loss]
    f = CONVENTIONS[report.convention](case.n)
    quantities = ("loss", *_GRADIENTS) if run.with_bias else ("loss", *_GRADIENTS[:3])
    expected = {name: getattr(golden, name) * f for name in quantities}
    dtype = report.dtype
    naive = naive_errors(case, report.loss, dtype, f) if dtype in HALF_DTYPES else None
    tolerance = tolerance_for(dtype, case)
    results = _compare(_label(case, sizes), case, values, expected, tolerance, naive, dtype)
    report.results += results
    undivided = dict(values)
    for name in ("img", "txt"):
        if name in values:
            undivided[name] = values[name] * (world_size if run.dist_convention == "ddp" else 1)
    for name in ("scale", "bias"):
        if name in values:
            undivided[name] = [float(r[name]) for r in outputs]
    return case, sizes, undivided, losses, any(r.failed for r in results)


def _build_report(
    report: Report,
    run: _Run,
    raw: Sequence[Sequence[Mapping[str, Any]]],
    work: Sequence[tuple[Case, list[int]]],
    failure: str | None,
    seconds: float,
) -> Report:
    """Judge the ranks' outputs (``raw[rank][index]``) of the splits in `work` into `report`.

    The splits no rank finished fail: the first with `failure`, the others as not run.
    """
    done = min(len(outputs) for outputs in raw)
    items = [
        _judge_split(report, run, case, sizes, [outputs[index] for outputs in raw])
        for index, (case, sizes) in enumerate(work[:done])
    ]
    quantities = [q for q in ("loss", *_GRADIENTS) if run.with_bias or q != "bias"]
    for index, (case, sizes) in enumerate(work[done:], start=done):
        message = failure if index == done and failure else "not run: an earlier case failed"
        report.results += [
            CheckResult("distributed", _label(case, sizes), q, math.inf, 0.0, False, message)
            for q in quantities
        ]
    report.notes += _run_notes(report, run, len(raw), work, done, failure, seconds)
    if not report.passed:
        factor = CONVENTIONS[report.convention]
        report.findings = _diagnose(
            items, report.loss, len(raw), run.dist_convention, factor, report.dtype
        )
        if failure:
            report.findings = [f for f in report.findings if f[0] != "unknown"]
            report.findings.append(("rank-failed", failure))
    return report


def _run_notes(
    report: Report,
    run: _Run,
    world_size: int,
    work: Sequence[tuple[Case, list[int]]],
    done: int,
    failure: str | None,
    seconds: float,
) -> list[str]:
    """Say how the run went: its processes, its splits, where it ended, what it skipped."""
    source = "torch autograd" if report.backend == "torch" else "the implementation"
    notes = [
        f"distributed: {run.how}, --dist-convention {run.dist_convention}, {done} of "
        f"{len(work)} case splits in {seconds:.1f} s; gradients from {source}"
    ]
    if not report.gradients_checked and done:
        notes.append(
            "gradients NOT checked: the implementation returned a loss only; return "
            "(loss, grads) to have them checked"
        )
    if failure:
        where = _label(*work[done]) if done < len(work) else "the end of the run"
        notes.append(f"the run ended at {where}: {failure}")
    if run.skipped:
        notes.append(
            f"{run.skipped} cases skipped: fewer than {world_size} pairs"
            + (
                f", or not a multiple of {world_size} (ddp takes equal shards)"
                if run.dist_convention == "ddp"
                else ""
            )
        )
    return notes


# --------------------------------------------------------------------------- MPI


#: How many times `--timeout` the whole MPI run gets, from its start to the report, the
#: construction of the implementation included: one for starting and constructing, one for
#: every call (a correct implementation needs a few seconds for all of them).
MPI_BUDGET_TIMEOUTS = 2


def judge_mpi(
    spec: str,
    *,
    loss: str,
    dtype: str = "float64",
    convention: str = "default",
    timeout: float | None = 60.0,
    comm: Any = None,
    on_timeout: Callable[[Report], object] | None = None,
) -> Report | None:
    """Judge a numpy implementation on the ranks of an MPI job; call it on every rank.

    ``ATTR(comm)`` (with `comm` an mpi4py communicator, ``MPI.COMM_WORLD`` by default)
    returns the rank's callable ``f(img, txt, scale, bias)``, returning ``(loss, grads)``
    or the loss alone, judged under the ``global`` convention (numpy has no autodiff, so
    the gradients are what `f` returns).

    With a `timeout`, the whole run, the construction included, gets
    :data:`MPI_BUDGET_TIMEOUTS` times `timeout` seconds. A run that overruns is aborted
    (``MPI_Abort``, nothing can interrupt a rank that waits for a hung peer), after rank 0
    has built a failed report naming the rank that blocked, and where, and handed it to
    `on_timeout` (the command line prints it and writes ``--report``).

    Returns
    -------
    Report or None
        The report on rank 0, None on the other ranks.

    Raises
    ------
    UsageError
        On every rank, if the factory cannot be loaded or called on some rank, or `loss`
        has no golden cases.
    """
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    check_loss(loss, error=UsageError)  # on every rank alike
    _check_convention(convention)
    work, skipped = _scheduled(comm.Get_size(), "global")
    labels = [_label(case, sizes) for case, sizes in work]
    progress = _Progress()
    started = time.monotonic()
    watchdog = None
    if timeout is not None:
        budget = MPI_BUDGET_TIMEOUTS * timeout
        report = Report(loss, "numpy", dtype, convention, spec)
        watchdog = _Watchdog(comm, budget, progress, report, on_timeout)
    try:
        progress.enter(-1, _CONSTRUCTING)
        function, arrays = _mpi_function(spec, dtype, comm, progress)
        outputs = []
        for index, (case, sizes) in enumerate(work):
            progress.enter(index, f"in the implementation's call on {labels[index]}")
            outputs.append(_mpi_case(function, arrays, case, sizes, comm))
        progress.enter(len(work), _FINISHING, user=False)
        gathered = comm.gather(outputs, root=0)
    finally:
        if watchdog is not None:
            watchdog.cancel()
    if comm.Get_rank() != 0:
        return None
    run = _Run("global", f"{comm.Get_size()} MPI ranks", True, skipped)
    report = Report(loss, "numpy", dtype, convention, spec)
    return _build_report(report, run, gathered, work, None, time.monotonic() - started)


_CONSTRUCTING = "constructing the implementation"
_CONSTRUCTED = "waiting for the other ranks to construct theirs"
_FINISHING = "waiting for the other ranks to finish"


def _mpi_function(
    spec: str, dtype: str, comm: Any, progress: _Progress | None = None
) -> tuple[Callable[..., Any], Callable[[Any], Any]]:
    """Return this rank's implementation, ``ATTR(comm)``, and the maker of its arrays.

    Raises
    ------
    UsageError
        On every rank, if the factory cannot be loaded or called on some rank.
    """
    from portable_siglip._interop import load_backend

    rank = comm.Get_rank()
    error = ""
    try:
        xp, dtype_object = load_backend("numpy", dtype)
        function = import_attribute(spec)(comm)
    except KeyboardInterrupt:
        raise
    except UsageError as usage:
        error = f"rank {rank}: {usage}"
    except BaseException as raised:
        error = f"rank {rank}: constructing the implementation: {describe_exception(raised)}"
    if progress is not None:
        progress.enter(-1, _CONSTRUCTED, user=False)
    errors = [e for e in comm.allgather(error) if e]
    if errors:
        raise UsageError(errors[0])
    return function, lambda values: xp.asarray(values, dtype=dtype_object)


class _Progress:
    """Where this rank's main thread is in the run.

    Its step (-1 constructing, then the case indices), what it does there, and whether that
    is the implementation's code (else the suite's, waiting for the other ranks).
    """

    def __init__(self) -> None:
        self.step = -1
        self.what = "starting"
        self.user = False
        self.since = time.monotonic()

    def enter(self, step: int, what: str, *, user: bool = True) -> None:
        self.step, self.what, self.user, self.since = step, what, user, time.monotonic()

    def state(self, rank: int) -> dict[str, Any]:
        """Return this rank's state and where its main thread is in the source."""
        where, exchanging = _main_thread_location()
        return {
            "rank": rank,
            "step": self.step,
            "what": self.what,
            "user": self.user,
            "seconds": time.monotonic() - self.since,
            "where": where,
            "exchanging": exchanging,
        }


#: A source line that calls MPI (mpi4py's methods, lower and upper case): a rank there waits
#: for its peers rather than blocking on its own.
_MPI_CALL = re.compile(
    r"\.(Sendrecv|sendrecv|Send|send|Recv|recv|Isend|isend|Irecv|irecv|Wait\w*|wait\w*|"
    r"Test\w*|Barrier|barrier|Allreduce|allreduce|Allgather\w*|allgather|Bcast|bcast|"
    r"Gather\w*|gather|Reduce\w*|reduce|Scatter\w*|scatter|Alltoall\w*|alltoall|Probe|probe)\s*\("
)


def _main_thread_location() -> tuple[str, bool]:
    """Say where the main thread is (``file:line in function: source``), and if in MPI.

    In MPI: in mpi4py, in this library's MPI module, or on a line that calls MPI.
    """
    import linecache

    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    if frame is None:
        return "unknown", False
    code = frame.f_code
    line = linecache.getline(code.co_filename, frame.f_lineno).strip()
    module = str(frame.f_globals.get("__name__", ""))
    exchanging = module.startswith(("mpi4py", "portable_siglip.backends.mpi")) or bool(
        _MPI_CALL.search(line)
    )
    where = f"{code.co_filename}:{frame.f_lineno} in {code.co_name}" + (f": {line}" if line else "")
    return where, exchanging


def _blame(states: Sequence[dict[str, Any] | None], world: int) -> list[int]:
    """Return the ranks that blocked, from every rank's state (None: it did not answer).

    The ranks in the implementation's code at the earliest step: those of them not in an
    MPI call (the others wait there for them), or all of them if each is, or none is.
    """
    inside = [s for s in states if s is not None and s["user"]]
    if not inside:
        return [r for r in range(world) if states[r] is None]
    first = min(s["step"] for s in inside)
    behind = [s for s in inside if s["step"] == first]
    alone = [s for s in behind if not s["exchanging"]]
    return [s["rank"] for s in (alone or behind)]


def _timeout_message(states: Sequence[dict[str, Any] | None], budget: float) -> str:
    """Say which ranks blocked, where, and what the others were doing."""
    world = len(states)
    blamed = _blame(states, world)

    def describe(state: dict[str, Any]) -> str:
        return f"{state['what']} for {state['seconds']:.0f} s, at {state['where'][:300]}"

    parts = []
    for rank in blamed:
        state = states[rank]
        parts.append(
            f"rank {rank} blocked: no answer to the watchdog"
            if state is None
            else f"rank {rank} blocked {describe(state)}"
        )
    for rank, state in enumerate(states):
        if rank in blamed:
            continue
        if state is None:
            parts.append(f"rank {rank} did not answer the watchdog")
        else:
            role = "waited for it" if len(blamed) == 1 else "waited for them"
            parts.append(f"rank {rank} {role}: {describe(state)}")
    return "; ".join(parts) + (
        f"; timeout: no result from every rank within {budget:g} s ({MPI_BUDGET_TIMEOUTS} x "
        "--timeout, construction included), so the job was aborted"
    )


class _Watchdog:
    """Ends an MPI run that overruns its budget, after rank 0 has said which rank blocked.

    Started on every rank at the same moment (after a barrier), before the implementation
    is constructed. When the budget runs out, each rank's watchdog thread sends its
    :class:`_Progress` state to rank 0 over a communicator of its own (MPI must allow
    threads: ``MPI_THREAD_MULTIPLE``, which mpi4py asks for); rank 0's builds the failed
    report, hands it to `on_timeout` and aborts the job. Without threaded MPI, or when rank
    0 does not act, each rank prints its own state and aborts.
    """

    def __init__(
        self,
        comm: Any,
        budget: float,
        progress: _Progress,
        report: Report,
        on_timeout: Callable[[Report], object] | None,
    ) -> None:
        from mpi4py import MPI

        self.comm, self.budget, self.progress = comm, budget, progress
        self.report, self.on_timeout = report, on_timeout
        threaded = MPI.Query_thread() >= MPI.THREAD_MULTIPLE
        self.side = comm.Dup() if threaded else None
        comm.Barrier()  # every rank's budget starts now
        self.started = time.monotonic()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="conformance-watchdog", daemon=True)
        self.thread.start()

    def cancel(self) -> None:
        """Stop watching: the run ended in time (called on every rank alike)."""
        self.stop.set()
        self.thread.join()
        if self.side is not None:
            self.side.Free()

    def _watch(self) -> None:
        if self.stop.wait(self.budget):
            return
        rank = self.comm.Get_rank()
        state = self.progress.state(rank)
        if self.side is not None and rank == 0:
            states = self._collect(state)
            self._report(_timeout_message(states, self.budget), states)
            self.comm.Abort(1)
        if self.side is not None:
            self.side.isend(state, dest=0, tag=_WATCHDOG_TAG)
            time.sleep(10)  # rank 0 reports and aborts the job meanwhile
        print(
            f"rank {rank}: no result within {self.budget:g} s; it is {state['what']} "
            f"({'the implementation' if state['user'] else 'the suite'}) at {state['where']}; "
            "aborting the job",
            file=sys.stderr,
            flush=True,
        )
        self.comm.Abort(1)

    def _collect(self, own: dict[str, Any]) -> list[dict[str, Any] | None]:
        """Rank 0: every rank's state, None for a rank that sends none within 3 s."""
        assert self.side is not None
        world = self.comm.Get_size()
        states: list[dict[str, Any] | None] = [own] + [None] * (world - 1)
        pending = {r: self.side.irecv(source=r, tag=_WATCHDOG_TAG) for r in range(1, world)}
        end = time.monotonic() + 3.0
        while pending and time.monotonic() < end:
            for r, request in list(pending.items()):
                done, state = request.test()
                if done:
                    states[r] = state
                    del pending[r]
            time.sleep(0.01)
        return states

    def _report(self, message: str, states: Sequence[dict[str, Any] | None]) -> None:
        """Rank 0: build the failed report of an overrun and hand it over (or print it)."""
        report = self.report
        known = [s for s in states if s is not None]
        step = min((s["step"] for s in known if s["user"]), default=-1)
        case = "construction" if step < 0 else str(states[0] and _step_label(states, step))
        report.results = [
            CheckResult("distributed", case, "loss", math.inf, 0.0, False, message[:200])
        ]
        report.notes.append(
            f"distributed: {len(states)} MPI ranks, --dist-convention global; the run was "
            f"aborted after {time.monotonic() - self.started:.0f} s, its budget being "
            f"{self.budget:g} s ({MPI_BUDGET_TIMEOUTS} x --timeout, construction included)"
        )
        report.findings = [("rank-failed", message)]
        try:
            if self.on_timeout is not None:
                self.on_timeout(report)
            else:
                print(report.table(), flush=True)
        finally:
            sys.stdout.flush()
            print(message, file=sys.stderr, flush=True)


def _step_label(states: Sequence[dict[str, Any] | None], step: int) -> str:
    """Return the case label of `step`, as a rank in it says it."""
    for state in states:
        if state is not None and state["step"] == step and " on " in state["what"]:
            return str(state["what"].split(" on ", 1)[1])
    return f"case {step}"


#: The tag of the watchdogs' messages, on their own communicator.
_WATCHDOG_TAG = 7061


def _mpi_case(
    function: Callable[..., Any],
    arrays: Callable[[Any], Any],
    case: Case,
    sizes: list[int],
    comm: Any,
) -> dict[str, Any]:
    """Return what `function` gives on this rank's shard of `case`, as float64 numpy.

    A rank whose implementation raises aborts the job: its peers may be waiting for it.
    """
    import numpy as np

    from ._checks import _split

    rank = comm.Get_rank()
    rows = _rows(sizes, rank)
    args = [
        arrays(np.array(case.img[rows])),
        arrays(np.array(case.txt[rows])),
        arrays(case.scale),
        arrays(case.bias),
    ]
    try:
        value, grads = _split(function(*args))
        output: dict[str, Any] = {"loss": np.float64(np.asarray(value, dtype=np.float64))}
        for name, grad in (grads or {}).items():
            output[name] = np.asarray(grad, dtype=np.float64)
    except KeyboardInterrupt:
        raise
    except BaseException as raised:  # the peers may wait for this rank: end the job
        print(
            f"rank {rank}, {_label(case, sizes)}: {describe_exception(raised)}; aborting the job",
            file=sys.stderr,
            flush=True,
        )
        comm.Abort(1)
    return output


if __name__ == "__main__":
    _worker_main()
