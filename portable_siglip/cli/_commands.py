"""Command line: ``python -m portable_siglip run|bench|doctor``.

``run`` evaluates one loss and its gradients on random L2-normalised features and prints
the loss, gradient norms, wall time and peak extra memory; ``--verify`` checks the result
against a dense float64 evaluation (the textbook formulas by row blocks, :mod:`._verify`,
which never holds the n x n matrix) and exits with status 1 if they disagree. Launched by
``mpirun -n W`` or ``torchrun``, ``run`` shards the global batch over the W ranks (rank r
holds rows ``[r n / W, (r + 1) n / W)`` of the same seed-determined batch as one process
would) and reports each rank's time and bytes sent. ``--captions-per-image K`` and
``--duplicate-rate P`` draw a batch with several positives per row instead
(:func:`random_batch`), evaluated with ``img_ids`` and ``txt_ids``; images and captions are
then sharded independently. ``--device`` puts the arrays on a GPU
(:mod:`._devices`), ``--comm`` picks the transport: MPI, NCCL or torch.distributed
(:mod:`._launch`). ``bench`` times the blockwise path against the same run's matmul
roofline (see :mod:`portable_siglip.bench`); ``doctor`` checks this machine
(:mod:`._doctor`).

Exit status: 0 success, 1 verification failed or an internal error, 2 invalid arguments,
a missing library, or a run predicted to need more host memory than is available
(:mod:`._footprint`, checked before anything is drawn). ``run`` checks every option it hands
to the loss, so an exception from inside a run (a ``TypeError`` deep in a library included)
is reported as an internal error, with its traceback, not as a usage error. Under MPI every
rank exits with the same status, and a usage error is printed by rank 0 only; an unexpected
error on any rank aborts the whole job (``MPI_Abort``) instead of leaving the other ranks
waiting.

``run`` sets ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` unless the user set it or the backend
is jax (:func:`limit_jax_preallocation`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
import tracemalloc
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any, TypeVar

from .. import _losses, _memory
from .. import _registry as registry
from .._interop import BACKENDS, DTYPES, UsageError, load_backend, to_numpy
from . import _footprint, _launch
from ._devices import Device, parse_device, place, resolve_device, wait_until_computed

__all__ = ["JAX_PREALLOCATE", "limit_jax_preallocation", "load_run_backend", "main"]

_Number = TypeVar("_Number", int, float)

#: jax's switch for taking 75% of a GPU's memory when it first uses the GPU.
JAX_PREALLOCATE = "XLA_PYTHON_CLIENT_PREALLOCATE"


#: Seconds a rank other than 0 waits, after a usage error found before the ranks connect,
#: for the launcher to end it once rank 0 has said the error (see ``_usage_error``).
QUIET_RANK_WAIT_S = 10.0


#: Rows per generator chunk of ``random_pairs``: any shard regenerates only its chunks.
CHUNK_ROWS = 4096

#: Last words of the generator seeds of the extra captions, ``(seed, chunk, CAPTION_KEY)``,
#: and of the duplicate draw, ``(seed, 0, DUPLICATE_KEY)``. Never 0: NumPy pads a seed with
#: zeros, so ``(seed, chunk, 0)`` would be ``random_pairs``'s ``(seed, chunk)``.
CAPTION_KEY = 1
DUPLICATE_KEY = 2

#: Normwise relative tolerance of ``--verify`` per input dtype: (loss, gradients). The
#: blockwise result and the dense reference see the same rounded inputs, so these only
#: cover the arithmetic (float32 accumulation for half inputs; half-precision outputs).
VERIFY_RTOL = {
    "float64": (1e-10, 1e-10),
    "float32": (1e-4, 1e-4),
    "float16": (1e-4, 4e-3),
    "bfloat16": (1e-4, 3e-2),
}


def _checked(
    convert: Callable[[str], _Number],
    accept: Callable[[_Number], bool],
    wanted: str,
    shown: str = "",
) -> Callable[[str], _Number]:
    """Return an argparse ``type``: `convert` the text, then refuse what `accept` rejects.

    Either error says "expected `wanted`, got ...": the text as typed when it does not
    convert, else the value, formatted with the format spec `shown`.
    """

    def parse(text: str) -> _Number:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {value:{shown}}")
        return value

    return parse


_positive_int = _checked(int, lambda value: value > 0, "a positive integer")
_nonnegative_int = _checked(int, lambda value: value >= 0, "an integer >= 0")
# The comparison also refuses nan.
_rate = _checked(float, lambda value: 0.0 <= value < 1.0, "a number in [0, 1)", "g")


class HelpFormatter(argparse.HelpFormatter):
    """Help that shows every option's default, unless its text already says it.

    ``ArgumentDefaultsHelpFormatter`` would also print "(default: None)" for options whose
    default is computed later and repeat defaults the help text explains in words.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        # Identity, not equality: a default of 0 is shown, a default of False (a flag) is not.
        unshown = any(action.default is value for value in (None, False, argparse.SUPPRESS))
        if not action.option_strings or "(default" in text or unshown:
            return text
        return f"{text} (default: %(default)s)"


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    # The registered losses when the parser is built: a loss registered at runtime is a choice.
    losses = registry.losses()
    parser.add_argument(
        "--loss",
        choices=registry.names(),
        default=losses[0].name,
        help=f"which loss: {' or '.join(loss.title for loss in losses)}",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="numpy",
        help="array library the loss runs on (the features are drawn with numpy, then copied)",
    )
    parser.add_argument("--batch", type=_positive_int, default=4096, help="global batch n")
    parser.add_argument("--dim", type=_positive_int, default=512, help="feature dimension d")
    parser.add_argument(
        "--captions-per-image",
        type=_positive_int,
        default=1,
        metavar="K",
        help="captions per image: the batch has n images and K n captions, caption j "
        "belonging to image j // K (img_ids = arange(n), txt_ids = repeat(arange(n), K)) and "
        "drawn near its image's features; K > 1 evaluates the loss with img_ids and txt_ids",
    )
    parser.add_argument(
        "--duplicate-rate",
        type=_rate,
        default=0.0,
        metavar="P",
        help="fraction of duplicated captions, in [0, 1): every image but the first, with "
        "probability P (seeded by --seed), joins the group of a uniformly drawn earlier "
        "image: it takes that image's id and exact copies of its captions (keeping its own "
        "image features), so every image of a group is a positive of every caption of the "
        "group; P > 0 evaluates the loss with img_ids and txt_ids",
    )
    parser.add_argument(
        "--block-size",
        type=_positive_int,
        default=None,
        help="tile edge of the blockwise evaluation (default: the library's, 1024)",
    )
    parser.add_argument(
        "--strategy",
        default=None,
        help="distributed schedule, used when sharded over ranks: "
        + "; ".join(f"{loss.name} {', '.join(loss.schedules)}" for loss in losses)
        + " (default: "
        + ", ".join(f"{loss.default_schedule} for {loss.name}" for loss in losses)
        + ")",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="dtype of the features (half precision accumulates in float32)",
    )
    parser.add_argument(
        "--precision",
        choices=("fast", "exact"),
        default=None,
        help="GEMM operands for float16/bfloat16 features: fast (the default) rounds them to "
        "the features' dtype and accumulates in float32 (tensor cores on a GPU), exact uses "
        "float32 operands; float32 and float64 ignore it",
    )
    parser.add_argument(
        "--seed", type=_nonnegative_int, default=0, help="seed of the random features"
    )
    parser.add_argument("--scale", type=float, default=10.0, help="t, the logit multiplier")
    ignored = [loss.name for loss in losses if not loss.uses_bias]
    parser.add_argument(
        "--bias",
        type=float,
        default=-10.0,
        help="b, the logit bias" + (f" (no effect on {' or '.join(ignored)})" if ignored else ""),
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="compare with a dense float64 evaluation: the textbook formulas in float64 "
        "NumPy, evaluated by row blocks (no n x n matrix; on top of the run, about three "
        "float64 copies of the features on rank 0); errors are normwise, relative to no "
        "less than the smallest normal number of --dtype, so a reference that underflows "
        "the dtype is met by its rounding to the dtype (0)",
    )
    parser.add_argument(
        "--device",
        default=None,
        metavar="{cpu,cuda,cuda:N}",
        help="where the arrays live (default: the backend's default device: the host, "
        "GPU 0 for cupy, jax's first device); a bare `cuda` under mpirun or torchrun "
        "means GPU local_rank %% device_count",
    )
    parser.add_argument(
        "--comm",
        choices=_launch.COMMS,
        default="auto",
        help="how ranks talk. auto: under mpirun NCCL for CUDA arrays of torch or cupy and "
        "MPI otherwise, under torchrun torch.distributed, else one process; none: one "
        "process; mpi: mpi4py; nccl: NCCLComm (cupy's NCCL, under mpirun); torch: "
        "torch.distributed (gloo on the host, NCCL on CUDA; under mpirun or torchrun)",
    )


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of ``python -m portable_siglip``."""
    parser = argparse.ArgumentParser(
        prog="python -m portable_siglip",
        description="SigLIP sigmoid and CLIP softmax losses with analytic gradients.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run_help = "evaluate one loss and its gradients on random features"
    run = commands.add_parser(
        "run",
        help=run_help,
        description=f"{run_help[0].upper()}{run_help[1:]}: one process, or sharded over the "
        "ranks of `mpirun -n W`; --verify checks against a dense float64 evaluation.",
        formatter_class=HelpFormatter,
    )
    _add_run_arguments(run)
    bench_help = (
        "time forward + gradient against the roofline; --distributed: the MPI "
        "strategies; --frameworks: torch modules against open_clip and autograd; --cached: "
        "a training step with cached_step against a plain backward"
    )
    bench = commands.add_parser(
        "bench",
        help=bench_help,
        description=f"Benchmark: {bench_help}. Results are ratios measured side by side in "
        "one run (docs/benchmarks.md).",
        formatter_class=HelpFormatter,
    )
    from . import _bench as bench_cli

    bench_cli.add_arguments(bench)
    doctor_help = "check this machine: libraries, GPUs, our losses on each, transports"
    doctor = commands.add_parser(
        "doctor",
        help=doctor_help,
        description="Check this machine: the installed libraries and GPUs, our losses "
        "against the goldens on every backend and device, a one-rank exchange on every "
        "transport, and the block size on each device. Exit status 0 when everything found "
        "works (skips are fine), 1 when something is broken.",
        formatter_class=HelpFormatter,
    )
    from . import _doctor

    _doctor.add_arguments(doctor)
    return parser


def limit_jax_preallocation(backend: str, environ: MutableMapping[str, str] | None = None) -> bool:
    """Keep jax from taking most of a GPU that another array library computes on.

    jax preallocates 75% of a GPU's memory when it first uses it. A run whose backend is
    torch or cupy does not compute with jax, but jax may still start on the same GPU in the
    process (a library that imports it, a check that runs it) and would leave the backend a
    quarter of the memory. So, unless the backend is jax (which then owns the GPU and gains
    from its pool) or the user set the variable, this sets ``XLA_PYTHON_CLIENT_PREALLOCATE``
    to ``"false"``: jax then allocates what it uses, when it uses it. jax reads the variable
    when it first starts a GPU client, so this must run before that; ``run`` calls it first.

    Parameters
    ----------
    backend : str
        The array library the run computes with (``--backend``).
    environ : mutable mapping of str to str, optional
        The environment to change; ``os.environ`` by default.

    Returns
    -------
    bool
        Whether the variable was set.

    Examples
    --------
    >>> env = {}
    >>> limit_jax_preallocation("torch", env), env
    (True, {'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'})
    >>> limit_jax_preallocation("jax", {})  # jax owns the GPU: its pool is its own
    False
    >>> limit_jax_preallocation("cupy", {JAX_PREALLOCATE: "true"})  # the user's choice stays
    False
    """
    environ = os.environ if environ is None else environ
    if backend == "jax" or JAX_PREALLOCATE in environ:
        return False
    environ[JAX_PREALLOCATE] = "false"
    return True


def load_run_backend(backend: str, dtype: str) -> tuple[Any, Any]:
    """:func:`~portable_siglip._interop.load_backend` for ``run``, with NumPy's bfloat16.

    NumPy has no bfloat16 of its own; the losses take arrays of ml_dtypes' bfloat16, so
    ``run --backend numpy --dtype bfloat16`` uses it when ml_dtypes is installed (it comes
    with jax). Without it, the usage error says what to install.

    Examples
    --------
    >>> import numpy as np
    >>> load_run_backend("numpy", "float32")[1] is np.float32
    True
    """
    try:
        return load_backend(backend, dtype)
    except UsageError:
        if backend == "cupy" and not _launch.installed("cupy"):
            # The same package name as --comm nccl's message: cupy's wheel for the CUDA.
            msg = f"`backend`: 'cupy' is not installed ({_launch.cupy_install()})"
            raise UsageError(msg) from None
        if backend != "numpy" or dtype != "bfloat16":
            raise
        xp, _ = load_backend(backend, "float32")
        try:
            import ml_dtypes
        except ImportError:
            msg = (
                "`dtype`: backend 'numpy' has no dtype 'bfloat16' without ml_dtypes: "
                "pip install ml-dtypes"
            )
            raise UsageError(msg) from None
        import numpy

        return xp, numpy.dtype(ml_dtypes.bfloat16)


def _bias(args: argparse.Namespace) -> float | None:
    """Return the ``--bias`` a run hands to its loss: None for a loss the bias does not change."""
    return args.bias if registry.get(args.loss).uses_bias else None


def _check_values(args: argparse.Namespace) -> None:
    """Refuse the ``run`` option values that the losses would refuse, as usage errors.

    Every other argument ``run`` hands to the loss it makes itself (arrays, ids, block size
    and strategy checked above), so after this a ``TypeError`` or ``ValueError`` from inside
    the run is an internal error, not the user's.
    """
    if not (math.isfinite(args.scale) and args.scale > 0):
        msg = (
            f"`scale` must be the positive multiplier t = exp(t') applied to the logits, a "
            f"finite number > 0, got {args.scale:g}"
        )
        raise UsageError(msg)
    if _bias(args) is not None and not math.isfinite(args.bias):
        msg = f"`bias` must be finite, got {args.bias:g}"
        raise UsageError(msg)


def _import_numpy() -> Any:
    try:
        import numpy
    except ImportError:
        msg = "the command line needs NumPy: pip install 'portable-siglip[numpy]'"
        raise UsageError(msg) from None
    return numpy


def random_pairs(
    np: Any, n: int, d: int, seed: int, rows: tuple[int, int] | None = None
) -> tuple[Any, Any]:
    """Seed-deterministic L2-normalised image rows and correlated text rows, float64.

    The batch of ``n`` pairs is generated in chunks of ``CHUNK_ROWS`` rows, each from its
    own generator seeded by ``(seed, chunk)``, so ``rows=(start, stop)`` returns exactly
    those rows of the full batch while generating only the chunks they touch: every rank
    of a sharded run sees its part of the same global batch, whatever the number of ranks.

    Examples
    --------
    >>> import numpy as np
    >>> img, txt = random_pairs(np, 10, 4, seed=0)
    >>> part, _ = random_pairs(np, 10, 4, seed=0, rows=(3, 7))
    >>> bool((part == img[3:7]).all())
    True
    """
    start, stop = (0, n) if rows is None else rows
    images, texts = [], []
    for chunk in range(start // CHUNK_ROWS, (stop - 1) // CHUNK_ROWS + 1):
        first = chunk * CHUNK_ROWS
        count = min(first + CHUNK_ROWS, n) - first
        rng = np.random.default_rng([seed, chunk])
        img = rng.standard_normal((count, d))
        noise = rng.standard_normal((count, d))
        keep = slice(max(start, first) - first, min(stop, first + count) - first)
        images.append(img[keep])
        texts.append(noise[keep])
    img = np.concatenate(images, axis=0)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = img + np.concatenate(texts, axis=0) / np.sqrt(d)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img, txt


def _normal_rows(
    np: Any, indices: Any, total: int, d: int, seed: int, tail: Sequence[int], draw: int
) -> Any:
    """Rows `indices` of a seed-determined (total, d) standard normal matrix, float64.

    The matrix is drawn in chunks of ``CHUNK_ROWS`` rows, chunk ``c`` by the generator
    seeded ``(seed, c, *tail)`` as its draw number `draw` (0 first) of a (rows, d) block:
    ``tail=(), draw=0`` are the images of :func:`random_pairs`, ``draw=1`` its text noise.
    Only the chunks that hold some of `indices` are drawn, one at a time.
    """
    out = np.empty((len(indices), d))
    chunks = indices // CHUNK_ROWS
    for chunk in np.unique(chunks).tolist():
        first = chunk * CHUNK_ROWS
        count = min(first + CHUNK_ROWS, total) - first
        rng = np.random.default_rng([seed, chunk, *tail])
        for _ in range(draw):
            rng.standard_normal((count, d))
        block = rng.standard_normal((count, d))
        here = chunks == chunk
        out[here] = block[indices[here] - first]
    return out


def batch_ids(np: Any, n: int, captions: int, duplicate_rate: float, seed: int) -> tuple[Any, Any]:
    """Ids of the images and captions of :func:`random_batch`: int64 arrays (n,), (captions n,).

    Image ``i`` has the id of its group's first image; caption ``j`` belongs to image
    ``j // captions`` and has its id. Without duplicates the groups are single images:
    ``img_ids = arange(n)``, ``txt_ids = repeat(arange(n), captions)``. With
    ``duplicate_rate = P``, every image but the first joins, with probability P, the group of
    an earlier image drawn uniformly (one generator, seeded ``(seed, 0, DUPLICATE_KEY)``,
    draws both for the whole batch), so every id is the id of some image and of its captions.

    Examples
    --------
    >>> import numpy as np
    >>> img_ids, txt_ids = batch_ids(np, 3, 2, 0.0, seed=0)
    >>> img_ids.tolist(), txt_ids.tolist()
    ([0, 1, 2], [0, 0, 1, 1, 2, 2])
    >>> img_ids, txt_ids = batch_ids(np, 1000, 1, 0.5, seed=0)
    >>> set(img_ids.tolist()) == set(txt_ids.tolist())
    True
    >>> 400 < int((img_ids != np.arange(1000)).sum()) < 600  # about half joined a group
    True
    """
    index = np.arange(n, dtype=np.int64)
    group = index.copy()
    if duplicate_rate > 0 and n > 1:
        rng = np.random.default_rng([seed, 0, DUPLICATE_KEY])
        joins = rng.random(n) < duplicate_rate
        earlier = rng.integers(0, np.maximum(index, 1))  # uniform in [0, i); 0 for i = 0
        joins[0] = False
        group = np.where(joins, earlier, index)
        while True:  # pointer jumping to the group's first image (each step halves chains)
            jumped = group[group]
            if np.array_equal(jumped, group):
                break
            group = jumped
    return group, np.repeat(group, captions)


def random_batch(
    np: Any,
    n: int,
    d: int,
    seed: int,
    captions: int = 1,
    duplicate_rate: float = 0.0,
    img_rows: tuple[int, int] | None = None,
    txt_rows: tuple[int, int] | None = None,
) -> tuple[Any, Any, Any, Any]:
    """Draw a seed-determined batch with several positives per row: features and ids.

    ``n`` L2-normalised images (those of :func:`random_pairs`) and ``captions * n``
    captions; caption ``j`` belongs to image ``j // captions``. Its feature is that of
    caption ``j % captions`` of the first image ``r`` of the image's group
    (:func:`batch_ids`): ``normalise(img[r] + noise / sqrt(d))``, the noise of caption 0
    being :func:`random_pairs`'s text noise of row ``r`` and that of caption ``c >= 1`` row
    ``r (captions - 1) + c - 1`` of a matrix seeded ``(seed, chunk, CAPTION_KEY)``. So
    ``captions=1, duplicate_rate=0`` is :func:`random_pairs`'s batch, and duplicated
    captions are exact copies. ``img_rows`` and ``txt_rows`` select rows ``[start, stop)``
    of each side, drawing only the chunks they need.

    Returns
    -------
    tuple
        ``(img, txt, img_ids, txt_ids)`` of the selected rows: float64 features, int64 ids.

    Examples
    --------
    >>> import numpy as np
    >>> img, txt, img_ids, txt_ids = random_batch(np, 4, 3, seed=0, captions=2)
    >>> img.shape, txt.shape, txt_ids.tolist()
    ((4, 3), (8, 3), [0, 0, 1, 1, 2, 2, 3, 3])
    >>> part = random_batch(np, 4, 3, seed=0, captions=2, img_rows=(1, 2), txt_rows=(3, 6))
    >>> bool((part[0] == img[1:2]).all() and (part[1] == txt[3:6]).all())
    True
    """
    img_ids, txt_ids = batch_ids(np, n, captions, duplicate_rate, seed)
    img_start, img_stop = (0, n) if img_rows is None else img_rows
    txt_start, txt_stop = (0, captions * n) if txt_rows is None else txt_rows
    img = _normal_rows(np, np.arange(img_start, img_stop), n, d, seed, (), 0)
    img /= np.linalg.norm(img, axis=1, keepdims=True)

    caption = np.arange(txt_start, txt_stop)
    first = txt_ids[txt_start:txt_stop]  # the first image of each caption's group
    which = caption % captions
    txt = _normal_rows(np, first, n, d, seed, (), 0)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    noise = np.empty_like(txt)
    zero = which == 0
    noise[zero] = _normal_rows(np, first[zero], n, d, seed, (), 1)
    extra = first[~zero] * (captions - 1) + which[~zero] - 1
    noise[~zero] = _normal_rows(np, extra, n * (captions - 1), d, seed, (CAPTION_KEY,), 0)
    txt += noise / np.sqrt(d)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img, txt, img_ids[img_start:img_stop], txt_ids[txt_start:txt_stop]


def positive_pairs(np: Any, img_ids: Any, txt_ids: Any) -> int:
    """Count the pairs (i, j) with ``img_ids[i] == txt_ids[j]``, by id.

    Examples
    --------
    >>> import numpy as np
    >>> positive_pairs(np, np.array([0, 0, 1]), np.array([0, 1, 1, 1]))
    5
    """
    ids, img_count = np.unique(img_ids, return_counts=True)
    txt_count = np.zeros_like(img_count)
    found, counts = np.unique(txt_ids, return_counts=True)
    where = np.searchsorted(ids, found)
    inside = (where < ids.size) & (ids[np.minimum(where, ids.size - 1)] == found)
    txt_count[where[inside]] = counts[inside]
    return int((img_count * txt_count).sum())


def shard(n: int, size: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of rank ``rank`` of ``size``: sizes differ by at most one.

    Examples
    --------
    >>> [shard(10, 4, r) for r in range(4)]
    [(0, 2), (2, 5), (5, 7), (7, 10)]
    """
    return n * rank // size, n * (rank + 1) // size


def _placement(args: argparse.Namespace) -> tuple[Device, str]:
    """Resolve ``--device`` and ``--comm``: where the arrays live and which transport."""
    # What is missing is said first, before an array library is imported (seconds per rank).
    _launch.check_installed(args.comm)
    load_run_backend(args.backend, args.dtype)
    try:
        asked = None if args.device is None else parse_device(args.device)
    except ValueError as error:
        raise UsageError(f"`device`: {error}") from None
    implied_by = None
    if asked is None and args.comm == "nccl" and args.backend == "torch":
        asked = Device("cuda")  # NCCL moves GPU memory only: --comm nccl implies the GPU
        implied_by = "--comm nccl"
    device = resolve_device(
        args.backend, asked, local_rank=_launch.local_rank(), implied_by=implied_by
    )
    return device, _launch.choose(args.comm, args.backend, device)


class _DeviceMemory:
    """Peak memory of one call on a GPU, from the array library's allocator (:mod:`._memory`)."""

    def __init__(self, backend: str, device: Device) -> None:
        self.start = _memory.reset_device_peak(backend, device.index)

    def peak(self) -> tuple[int, str]:
        peak, note = _memory.device_peak_bytes(self.start)
        return (0 if peak is None else peak), note


def _measure_peak(exact: bool, rss_before: int | None, reset: bool) -> tuple[int, str]:
    high_water = _memory.high_water_bytes()
    if exact:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak, "tracemalloc peak of every allocation made by the call"
    if reset and high_water is not None and rss_before is not None:
        note = "resident-set high-water mark during the call minus the RSS before it"
        return max(0, high_water - rss_before), note
    return max(
        0, _memory.ru_maxrss_bytes() - (rss_before or 0)
    ), "growth of ru_maxrss; a lower bound"


def _with_ids(args: argparse.Namespace) -> bool:
    """Whether ``run`` draws a batch with several positives per row and passes ids."""
    return bool(args.captions_per_image > 1 or args.duplicate_rate > 0)


def _batch_shape(args: argparse.Namespace) -> tuple[int, int, int, int, float]:
    """Return the arguments ``(n, d, seed, captions, duplicate_rate)`` of :func:`random_batch`."""
    return args.batch, args.dim, args.seed, args.captions_per_image, args.duplicate_rate


def _run(args: argparse.Namespace, comm: Any = None, device: Device | None = None) -> int:
    np = _import_numpy()
    device = Device("cpu") if device is None else device
    xp, dtype = load_run_backend(args.backend, args.dtype)
    rank, size = (comm.rank, comm.size) if comm is not None else (0, 1)
    _check_values(args)
    if args.batch < size:
        msg = f"`batch`: the global batch ({args.batch}) must have a row for each of {size} ranks"
        raise UsageError(msg)
    spec = registry.get(args.loss)
    strategy = args.strategy or spec.default_schedule
    if args.strategy is not None and args.strategy not in spec.schedules:
        msg = (
            f"`strategy` for the {spec.name} loss must be one of {spec.schedules}, "
            f"got {args.strategy!r}"
        )
        raise UsageError(msg)
    if args.strategy is not None and comm is None:
        # Accepted (the loss still checks it belongs to --loss), but say it changes nothing.
        print(
            f"python -m portable_siglip run: warning: --strategy {args.strategy} has no effect "
            "in one process; start the command with `mpirun -n W` to shard the batch over W "
            "ranks",
            file=sys.stderr,
        )
    _check_memory(args, comm, device, strategy)  # before anything is drawn
    rows = shard(args.batch, size, rank)
    ids: dict[str, Any] = {}
    ids_np: tuple[Any, Any] | None = None
    if _with_ids(args):
        txt_rows = shard(args.captions_per_image * args.batch, size, rank)
        img_np, txt_np, img_ids, txt_ids = random_batch(
            np, *_batch_shape(args), img_rows=rows, txt_rows=txt_rows
        )
        ids_dtype = xp.int64 if args.backend != "jax" else xp.int32  # jax: int64 needs x64
        ids["img_ids"] = place(args.backend, xp, img_ids, ids_dtype, device)
        ids["txt_ids"] = place(args.backend, xp, txt_ids, ids_dtype, device)
        ids_np = (img_ids, txt_ids)
    else:
        txt_rows = rows
        img_np, txt_np = random_pairs(np, args.batch, args.dim, args.seed, rows=rows)
    img = place(args.backend, xp, img_np, dtype, device)
    txt = place(args.backend, xp, txt_np, dtype, device)
    del img_np, txt_np
    bias = _bias(args)

    exact_memory = args.backend == "numpy"  # NumPy reports its allocations to tracemalloc
    wait_until_computed([img, txt])
    if comm is not None:
        comm.allgather_object(None)  # start together, so times measure the call itself
    if exact_memory:
        tracemalloc.start()
    on_gpu = _DeviceMemory(args.backend, device) if device.is_cuda else None
    rss_before = _memory.rss_bytes()
    high_water_reset = _memory.reset_high_water()
    start = time.perf_counter()
    loss, grads = _losses.evaluate(
        spec,
        img,
        txt,
        args.scale,
        bias,
        grad=True,
        block_size=args.block_size,
        comm=comm,
        strategy=strategy,
        precision=args.precision,
        **ids,  # only with --captions-per-image > 1 or --duplicate-rate > 0
    )
    assert grads is not None  # asked for with grad=True
    wait_until_computed([loss, *grads])
    seconds = time.perf_counter() - start
    if on_gpu is not None:
        peak, memory_note = on_gpu.peak()
    else:
        peak, memory_note = _measure_peak(exact_memory, rss_before, high_water_reset)
    sent = getattr(comm, "bytes_sent", 0)  # optional for third-party transports

    norm_img = float(np.linalg.norm(to_numpy(grads.img))) ** 2
    norm_txt = float(np.linalg.norm(to_numpy(grads.txt))) ** 2
    report = (
        rows[1] - rows[0],
        seconds,
        sent,
        peak,
        norm_img,
        norm_txt,
        float(to_numpy(loss)),
        txt_rows[1] - txt_rows[0],
    )
    per_rank = comm.allgather_object(report) if comm is not None else [report]
    if rank == 0:
        _print_run(np, args, strategy, comm, per_rank, loss, grads, memory_note, device)
    if not args.verify:
        return 0
    if comm is None:
        return _verify(np, args, img, txt, loss, grads, ids_np)
    return _verify_sharded(np, args, dtype, xp, comm, loss, grads, per_rank)


def _check_memory(args: argparse.Namespace, comm: Any, device: Device, strategy: str) -> None:
    """Refuse a run whose predicted host memory exceeds what is available, on every rank.

    The prediction (:func:`._footprint.predict`) is rank 0's, which verifies; the ranks of
    one node share its memory. Every rank decides, then the ranks agree: any refusal is
    every rank's, so all exit with status 2 before any array is drawn.
    """
    size = comm.size if comm is not None else 1
    shape = (args.batch, args.dim, args.captions_per_image)
    footprint = _footprint.predict(
        *shape,
        dtype=args.dtype,
        block_size=args.block_size,
        world=size,
        strategy=strategy,
        verify=args.verify,
        on_gpu=device.is_cuda,
    )
    here = min(_launch.local_size(), size) if comm is not None else 1
    need = footprint.peak + (here - 1) * max(footprint.draw, footprint.run)
    free = _footprint.available_bytes()
    refusal = None
    if free is not None and need > free:
        option = _footprint.largest_option(*shape)
        parts = "features drawn in float64, the run's features and gradients, its tiles"
        refusal = (
            f"`{option}`: run --batch {args.batch} --dim {args.dim} --captions-per-image "
            f"{args.captions_per_image} needs about {_footprint.gigabytes(need)} of host memory"
            + (f" on this node ({here} ranks)" if here > 1 else "")
            + f" ({parts}{', the --verify reference' if args.verify else ''}), and "
            f"{_footprint.gigabytes(free)} is available; choose a smaller "
            f"--{option.replace('_', '-')}"
        )
    if comm is not None:
        refusal = next((text for text in comm.allgather_object(refusal) if text), None)
    if refusal is not None:
        raise UsageError(refusal)


def _print_run(
    np: Any,
    args: argparse.Namespace,
    strategy: str,
    comm: Any,
    per_rank: list[tuple[Any, ...]],
    loss: Any,
    grads: Any,
    memory_note: str,
    device: Device,
) -> None:
    n, d = args.batch, args.dim
    bias = _bias(args)
    # Norms of the full gradients from each rank's squared norm of its shard.
    norm_img = float(np.sqrt(sum(entry[4] for entry in per_rank)))
    norm_txt = float(np.sqrt(sum(entry[5] for entry in per_rank)))
    print(
        f"portable_siglip run: loss={args.loss} backend={args.backend} device={device} "
        f"dtype={args.dtype} n={n} d={d} block_size={args.block_size or 'default'} "
        f"seed={args.seed}"
        + (
            f" precision={args.precision or 'fast'}"
            if args.dtype in ("float16", "bfloat16")
            else ""
        )
    )
    print(f"  scale t = {args.scale:g}, bias b = {args.bias if bias is not None else 'none'}")
    m, k = n, n
    if _with_ids(args):
        k = args.captions_per_image * n
        img_ids, txt_ids = batch_ids(np, n, args.captions_per_image, args.duplicate_rate, args.seed)
        positives = positive_pairs(np, img_ids, txt_ids)
        groups = len(np.unique(img_ids))
        print(
            f"  batch           m = {m} images, k = {k} captions ({args.captions_per_image} per "
            f"image, duplicate rate {args.duplicate_rate:g})"
        )
        print(
            f"  positives       {positives} pairs, {groups} distinct ids ({positives / m:.3g} "
            f"per image, {positives / k:.3g} per caption)"
        )
    print(f"  loss            {float(to_numpy(loss)):.10g}")
    print(f"  |grad img|      {norm_img:.6g}")
    print(f"  |grad txt|      {norm_txt:.6g}")
    print(f"  grad scale      {float(to_numpy(grads.scale)):.6g}")
    print(f"  grad bias       {float(to_numpy(grads.bias)):.6g}")
    slowest = max(entry[1] for entry in per_rank)
    print(f"  wall time       {slowest:.4f} s (forward + gradient, first call, slowest rank)")
    peak = max(entry[3] for entry in per_rank)
    print(f"  peak extra mem  {peak / 2**20:.1f} MiB per rank at most ({memory_note})")
    shape = "n x n" if m == k else "m x k"
    print(f"  for scale: one {shape} float32 matrix is {m * k * 4 / 2**20:.1f} MiB")
    if comm is None:
        return
    same = all(entry[6] == per_rank[0][6] for entry in per_rank)
    print(
        f"  ranks           {len(per_rank)} ({type(comm).__name__}), strategy {strategy}; "
        f"loss identical on every rank: {'yes' if same else 'NO'}"
    )
    if not _with_ids(args):
        print("    rank   rows   time s   sent MiB   peak MiB")
    else:  # images and captions are sharded independently
        print("    rank   rows captions   time s   sent MiB   peak MiB")
    for index, (count, seconds, sent, peak_rank, *_, captions) in enumerate(per_rank):
        mib = (sent / 2**20, peak_rank / 2**20)
        texts = f" {captions:8d}" if _with_ids(args) else ""
        print(f"    {index:4d} {count:6d}{texts} {seconds:8.4f} {mib[0]:10.2f} {mib[1]:10.1f}")


def _verify_sharded(
    np: Any,
    args: argparse.Namespace,
    dtype: Any,
    xp: Any,
    comm: Any,
    loss: Any,
    grads: Any,
    per_rank: list[tuple[Any, ...]],
) -> int:
    """Gather the shards' gradients and check them on rank 0; every rank returns its status."""
    pieces = {name: comm.allgather(getattr(grads, name)) for name in ("img", "txt")}
    status = 0
    if comm.rank == 0:
        ids: tuple[Any, Any] | None = None
        if _with_ids(args):
            img_np, txt_np, *both = random_batch(np, *_batch_shape(args))
            ids = (both[0], both[1])
        else:
            img_np, txt_np = random_pairs(np, args.batch, args.dim, args.seed)
        full = grads._replace(
            img=np.concatenate([to_numpy(part) for part in pieces["img"]], axis=0),
            txt=np.concatenate([to_numpy(part) for part in pieces["txt"]], axis=0),
        )
        # Rounded to the run's dtype exactly as every rank rounded its shard.
        img = xp.asarray(img_np, dtype=dtype)
        txt = xp.asarray(txt_np, dtype=dtype)
        status = _verify(np, args, img, txt, loss, full, ids)
        if not all(entry[6] == per_rank[0][6] for entry in per_rank):
            print("verify: FAILED (the ranks returned different losses)")
            status = 1
    statuses: list[int] = comm.allgather_object(status)
    return max(statuses)


def _verify(
    np: Any,
    args: argparse.Namespace,
    img: Any,
    txt: Any,
    loss: Any,
    grads: Any,
    ids: tuple[Any, Any] | None = None,
) -> int:
    from ._verify import compare, reference_loss_and_grad

    bias = _bias(args)
    # The bias of a loss it does not change is 0; ids only for a batch with several positives.
    rest = (0.0 if bias is None else bias, *(ids or ()))

    def dense(img_np: Any, scale: float) -> Any:
        return reference_loss_and_grad(args.loss, img_np, to_numpy(txt), scale, *rest)

    expected = dense(to_numpy(img), args.scale)
    actual = [loss, grads.img, grads.txt, grads.scale, grads.bias]
    names = ["loss", "grads.img", "grads.txt", "grads.scale", "grads.bias"]
    loss_rtol, grad_rtol = VERIFY_RTOL[args.dtype]
    fast = args.dtype in ("float16", "bfloat16") and args.precision != "exact"
    if fast:
        # "fast" multiplies t * img rounded to the features' dtype: its loss is checked
        # against the dense loss of that operand (scale 1), its gradients against the
        # true ones with one more rounding of the half dtype allowed.
        import array_api_compat

        xp = array_api_compat.array_namespace(img)
        operand = xp.astype(xp.astype(img, xp.float32) * args.scale, img.dtype)
        expected = [dense(to_numpy(operand), 1.0)[0], *expected[1:]]
        grad_rtol = 2 * grad_rtol
    print(
        "verify against a dense float64 evaluation (normwise relative error"
        + ("; the loss at the rounded operand t * img of precision fast):" if fast else "):")
    )
    failed = []
    for name, got, want in zip(names, actual, expected, strict=True):
        # Scalars are sums of n^2 terms: judge them like the loss, against its magnitude.
        rtol = grad_rtol if name in ("grads.img", "grads.txt") else loss_rtol
        if fast and name in ("grads.scale", "grads.bias"):
            rtol = 10 * loss_rtol  # sums of n^2 roundings that mostly cancel
        size = abs(float(expected[0])) if name in ("grads.scale", "grads.bias") else 0.0
        # Relative to no less than the dtype's smallest normal number: where the reference
        # underflows the dtype, the correctly rounded result (often 0) passes.
        rel, ok = compare(to_numpy(got), want, rtol, dtype=args.dtype, size=size)
        print(f"  {name:12s} {rel:10.3e}  (tolerance {rtol:.0e})  {'ok' if ok else 'FAIL'}")
        if not ok:
            failed.append(name)
    if failed:
        print(f"verify: FAILED ({', '.join(failed)})")
        return 1
    print("verify: ok")
    return 0


def main(argv: Sequence[str] | None = None, *, comm: Any = None) -> int:
    """Run the command line and return its exit status.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; ``sys.argv[1:]`` by default.
    comm : Communicator, optional
        Shard ``run`` over this communicator instead of choosing one from ``--comm``
        (tests use a :class:`~portable_siglip.comm.ThreadGroup` rank).

    Returns
    -------
    int
        0 on success, 1 when ``--verify`` finds a disagreement, 2 on invalid input.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        limit_jax_preallocation(args.backend)
    transport = "none"
    try:
        if args.command == "run":
            device, transport = _placement(args)
            if comm is None:
                comm = _launch.connect(transport, args.backend, device)
            else:
                transport = "given"
            status = _run(args, comm, device)
            _launch.disconnect(transport)
            return status
        if args.command == "doctor":
            from . import _doctor

            return _doctor.main(args)
        from . import _bench as bench_cli

        return bench_cli.main(args)
    except UsageError as error:
        return _usage_error(parser, args, comm, transport, error)
    except Exception as error:
        if args.command == "run":
            # run checked every option it was given: this is a bug, not the user's input.
            return _internal_error(parser, comm, transport, error)
        if isinstance(error, TypeError | ValueError):  # bench and doctor check as they go
            return _usage_error(parser, args, comm, transport, error)
        _abort_job(parser, comm)
        raise
    except BaseException:
        _abort_job(parser, comm)
        raise


def _usage_error(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    comm: Any,
    transport: str,
    error: Exception,
) -> int:
    """Say what was wrong with the input on rank 0 and return status 2."""
    # Invalid input is found on every rank alike (the losses agree before exchanging),
    # so every rank exits with status 2 and rank 0 says why; before the ranks are
    # connected, rank 0 of the launcher (mpirun, torchrun) does.
    rank = comm.rank if comm is not None else _launch.launch_rank()
    if rank == 0:
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
    elif comm is None:
        # Not connected: this rank cannot know that rank 0 found the same error. The
        # launcher ends the job when rank 0 exits with it, so this rank waits for that,
        # quietly; still running after the wait, it says the error itself.
        time.sleep(QUIET_RANK_WAIT_S)
        print(f"{parser.prog} {args.command}: rank {rank}: error: {error}", file=sys.stderr)
    _launch.disconnect(transport, barrier=False)
    return 2


def _internal_error(
    parser: argparse.ArgumentParser, comm: Any, transport: str, error: Exception
) -> int:
    """Report an exception from inside ``run`` as an internal error: traceback, status 1."""
    several = comm is not None and comm.size > 1
    where = f"rank {comm.rank}: " if several else ""
    traceback.print_exc()
    print(
        f"{parser.prog} run: {where}internal error: {type(error).__name__}: {error}\n"
        "  (not a problem with the options: a failure inside portable_siglip or a library "
        "it calls; the traceback is above)",
        file=sys.stderr,
        flush=True,
    )
    _abort_job(parser, comm, printed=True)
    _launch.disconnect(transport, barrier=False)
    return 1


def _abort_job(parser: argparse.ArgumentParser, comm: Any, *, printed: bool = False) -> None:
    """End every rank of a multi-rank job at once, if the transport can (``MPI_Abort``)."""
    abort = getattr(comm, "abort", None) or _launch.mpi_abort()
    if abort is None or comm is None or comm.size == 1:
        return
    # One rank failing must end the job: the others may be waiting for its messages.
    print(f"{parser.prog}: rank {comm.rank} failed; aborting all ranks", file=sys.stderr)
    if not printed:
        traceback.print_exc()
    sys.stderr.flush()
    abort(1)
