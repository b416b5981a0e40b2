"""Command line: ``python -m portable_siglip run|bench``.

``run`` evaluates one loss and its gradients on random L2-normalised features and prints
the loss, gradient norms, wall time and peak extra memory; ``--verify`` checks the result
against a dense float64 evaluation and exits with status 1 if they disagree. ``bench``
times the blockwise path against the same run's matmul roofline (see ``_bench``).

Exit status: 0 success, 1 verification failed, 2 invalid arguments or missing library.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from collections.abc import Sequence
from typing import Any

from . import _losses, _memory
from ._checks import SIGMOID_STRATEGIES, SOFTMAX_STRATEGIES
from ._interop import BACKENDS, DTYPES, UsageError, load_backend, to_numpy

__all__ = ["main"]


#: Normwise relative tolerance of ``--verify`` per input dtype: (loss, gradients). The
#: blockwise result and the dense reference see the same rounded inputs, so these only
#: cover the arithmetic (float32 accumulation for half inputs; half-precision outputs).
VERIFY_RTOL = {
    "float64": (1e-10, 1e-10),
    "float32": (1e-4, 1e-4),
    "float16": (1e-4, 4e-3),
    "bfloat16": (1e-4, 3e-2),
}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loss", choices=("sigmoid", "softmax"), default="sigmoid")
    parser.add_argument("--backend", choices=BACKENDS, default="numpy")
    parser.add_argument("--batch", type=_positive_int, default=4096, help="global batch n")
    parser.add_argument("--dim", type=_positive_int, default=512, help="feature dimension d")
    parser.add_argument(
        "--block-size", type=_positive_int, default=None, help="tile edge (default: library's)"
    )
    parser.add_argument(
        "--strategy",
        default=None,
        help=f"distributed schedule: sigmoid {SIGMOID_STRATEGIES}, softmax {SOFTMAX_STRATEGIES}",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=10.0, help="t, the logit multiplier")
    parser.add_argument(
        "--bias", type=float, default=-10.0, help="b, the logit bias (no effect on softmax)"
    )
    parser.add_argument(
        "--verify", action="store_true", help="compare with a dense float64 evaluation"
    )


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of ``python -m portable_siglip``."""
    parser = argparse.ArgumentParser(
        prog="python -m portable_siglip",
        description="SigLIP sigmoid and CLIP softmax losses with analytic gradients.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="evaluate one loss and its gradients")
    _add_run_arguments(run)
    bench = commands.add_parser("bench", help="time forward + gradient against the roofline")
    from . import _bench

    _bench.add_arguments(bench)
    return parser


def _import_numpy() -> Any:
    try:
        import numpy
    except ImportError:
        msg = "the command line needs NumPy: pip install 'portable-siglip[numpy]'"
        raise UsageError(msg) from None
    return numpy


def random_pairs(np: Any, n: int, d: int, seed: int) -> tuple[Any, Any]:
    """Seed-deterministic L2-normalised image rows and correlated text rows, float64."""
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n, d))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = img + rng.standard_normal((n, d)) / np.sqrt(d)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img, txt


def _synchronise(values: Sequence[Any]) -> None:
    """Wait until lazy or asynchronous backends have finished computing `values`."""
    for value in values:
        block = getattr(value, "block_until_ready", None)
        if block is not None:
            block()
    import array_api_compat

    if any(array_api_compat.is_cupy_array(v) for v in values):
        import cupy

        cupy.cuda.get_current_stream().synchronize()
    if any(array_api_compat.is_torch_array(v) and v.is_cuda for v in values):
        import torch

        torch.cuda.synchronize()


def _run(args: argparse.Namespace) -> int:
    np = _import_numpy()
    xp, dtype = load_backend(args.backend, args.dtype)
    strategy = args.strategy or ("bidir" if args.loss == "sigmoid" else "ring")
    img_np, txt_np = random_pairs(np, args.batch, args.dim, args.seed)
    img = xp.asarray(img_np, dtype=dtype)
    txt = xp.asarray(txt_np, dtype=dtype)
    loss_and_grad = (
        _losses.sigmoid_loss_and_grad if args.loss == "sigmoid" else _losses.softmax_loss_and_grad
    )
    bias = args.bias if args.loss == "sigmoid" else None

    exact_memory = args.backend == "numpy"  # NumPy reports its allocations to tracemalloc
    if exact_memory:
        tracemalloc.start()
    rss_before = _memory.rss_bytes()
    high_water_reset = _memory.reset_high_water()
    start = time.perf_counter()
    loss, grads = loss_and_grad(
        img, txt, args.scale, bias, block_size=args.block_size, strategy=strategy
    )
    _synchronise([loss, *grads])
    seconds = time.perf_counter() - start
    high_water = _memory.high_water_bytes()
    if exact_memory:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        memory_note = "tracemalloc peak of every allocation made by the call"
    elif high_water_reset and high_water is not None and rss_before is not None:
        peak = max(0, high_water - rss_before)
        memory_note = "resident-set high-water mark during the call minus the RSS before it"
    else:
        peak = max(0, _memory.ru_maxrss_bytes() - (rss_before or 0))
        memory_note = "growth of ru_maxrss; a lower bound"

    n, d = args.batch, args.dim
    norm = {name: float(np.linalg.norm(to_numpy(getattr(grads, name)))) for name in ("img", "txt")}
    print(
        f"portable_siglip run: loss={args.loss} backend={args.backend} dtype={args.dtype} "
        f"n={n} d={d} block_size={args.block_size or 'default'} seed={args.seed}"
    )
    print(f"  scale t = {args.scale:g}, bias b = {args.bias if bias is not None else 'none'}")
    print(f"  loss            {float(to_numpy(loss)):.10g}")
    print(f"  |grad img|      {norm['img']:.6g}")
    print(f"  |grad txt|      {norm['txt']:.6g}")
    print(f"  grad scale      {float(to_numpy(grads.scale)):.6g}")
    print(f"  grad bias       {float(to_numpy(grads.bias)):.6g}")
    print(f"  wall time       {seconds:.4f} s (forward + gradient, first call)")
    print(f"  peak extra mem  {peak / 2**20:.1f} MiB ({memory_note})")
    print(f"  for scale: one n x n float32 matrix is {n * n * 4 / 2**20:.1f} MiB")
    if not args.verify:
        return 0
    return _verify(np, args, img, txt, loss, grads)


def _verify(np: Any, args: argparse.Namespace, img: Any, txt: Any, loss: Any, grads: Any) -> int:
    from ._reference import dense_loss_and_grad

    bias = args.bias if args.loss == "sigmoid" else 0.0
    expected = dense_loss_and_grad(args.loss, to_numpy(img), to_numpy(txt), args.scale, bias)
    actual = [loss, grads.img, grads.txt, grads.scale, grads.bias]
    names = ["loss", "grads.img", "grads.txt", "grads.scale", "grads.bias"]
    loss_rtol, grad_rtol = VERIFY_RTOL[args.dtype]
    print("verify against a dense float64 evaluation (normwise relative error):")
    failed = []
    for name, got, want in zip(names, actual, expected, strict=True):
        got_np = to_numpy(got)
        want_np = np.asarray(want, dtype=np.float64)
        # Scalars are sums of n^2 terms: judge them like the loss, against its magnitude.
        rtol = grad_rtol if name in ("grads.img", "grads.txt") else loss_rtol
        ref = float(np.max(np.abs(want_np)))
        if name in ("grads.scale", "grads.bias"):
            ref = max(ref, abs(float(expected[0])))
        err = float(np.max(np.abs(got_np - want_np)))
        rel = err / ref if ref > 0 else err
        ok = bool(np.all(np.isfinite(got_np))) and rel <= rtol
        print(f"  {name:12s} {rel:10.3e}  (tolerance {rtol:.0e})  {'ok' if ok else 'FAIL'}")
        if not ok:
            failed.append(name)
    if failed:
        print(f"verify: FAILED ({', '.join(failed)})")
        return 1
    print("verify: ok")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit status.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; ``sys.argv[1:]`` by default.

    Returns
    -------
    int
        0 on success, 1 when ``--verify`` finds a disagreement, 2 on invalid input.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        from . import _bench

        return _bench.main(args)
    except (UsageError, TypeError, ValueError) as error:
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
        return 2
