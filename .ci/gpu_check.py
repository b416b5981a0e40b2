"""Helpers of ``.ci/gpu-check``, the offline check of the GPU path; run by that script.

Only the standard library at import, so that every subcommand runs with the bare ``python3``
of the GPU host before anything is installed::

    python3 .ci/gpu_check.py fits WHEEL...             # which wheels this Python can install
    python3 .ci/gpu_check.py install WHEEL (--target DIR | --prefix DIR)  # where pip is missing
    python3 .ci/gpu_check.py layout PYPROJECT DEST     # the installed package layout, in DEST
    python3 .ci/gpu_check.py conformance --backend torch --device cuda --report FILE

``conformance`` judges portable_siglip itself with the conformance suite
(:func:`portable_siglip.conformance.check`) on one GPU library, in float32 and bfloat16 (both
``precision`` options where the library has them), for both losses, all in one process. The
suite's command line makes its inputs on the host for torch and has no device option, so torch
is judged through a wrapper that moves the inputs to the device, and cupy's bfloat16 through
torch bfloat16 tensors handed over by DLPack (how cupy 14 receives bfloat16 arrays from torch);
jax's arrays go to its default device, the GPU where jax has one. Every check is appended to
the JSON report as soon as it is done, so a run cut short still reports.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import shutil
import sys
import sysconfig
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: What each GPU library is judged in by default: DTYPE or DTYPE:PRECISION.
RUNS = "float32,bfloat16:fast,bfloat16:exact"

#: Used when pyproject.toml cannot be read (Python 3.10 has no tomllib).
DEFAULT_PACKAGES = (
    "portable_siglip",
    "portable_siglip.bench",
    "portable_siglip.cli",
    "portable_siglip.backends",
    "portable_siglip.conformance",
)
DEFAULT_PACKAGE_DIR = {
    "portable_siglip.backends": "backends",
    "portable_siglip.conformance": "conformance",
}


# --------------------------------------------------------------------------- wheels


def wheel_fits(path: str) -> str | None:
    """Return None if this interpreter can install wheel `path`, else the reason it cannot."""
    for prefix in ("", "pip._vendor."):  # packaging, or the copy inside pip
        try:
            tags_module = importlib.import_module(prefix + "packaging.tags")
            utils_module = importlib.import_module(prefix + "packaging.utils")
            break
        except ImportError:
            continue
    else:  # nothing to read the tags with: let pip decide
        return None
    try:
        _, _, _, tags = utils_module.parse_wheel_filename(os.path.basename(path))
    except Exception as error:  # an odd file name: pip would refuse it too
        return f"not a wheel name ({error})"
    if tags & set(tags_module.sys_tags()):
        return None
    wanted = ", ".join(sorted(str(tag) for tag in tags))
    python = f"{sys.implementation.name} {sys.version_info.major}.{sys.version_info.minor}"
    return f"built for {wanted}, not for this {python}"


def _fits(paths: Sequence[str]) -> int:
    """Print ``fits PATH`` or ``skip PATH REASON`` (tab-separated) for each wheel."""
    for path in paths:
        reason = wheel_fits(path)
        print(f"fits\t{path}" if reason is None else f"skip\t{path}\t{reason}")
    return 0


def install_wheel(path: Path, *, target: Path | None = None, prefix: Path | None = None) -> int:
    """Unpack wheel `path` as ``pip install --no-deps --target``/``--prefix`` would.

    For a Python without pip. The package files go to `target`, or to the site-packages
    folder of `prefix`; the wheel's ``.data/data`` files to `target` or `prefix` itself (Open
    MPI's ``bin/``, ``lib/``, ...), its ``.data/scripts`` to their ``bin/``. File modes are
    kept, so programs stay executable.

    Returns
    -------
    int
        The number of files written.
    """
    if (target is None) == (prefix is None):
        msg = "give exactly one of `target` and `prefix`"
        raise ValueError(msg)
    if target is not None:
        base = site = target
    else:
        assert prefix is not None
        base = prefix
        relative = sysconfig.get_path(
            "purelib", scheme="posix_prefix", vars={"base": "", "platbase": ""}
        )
        site = prefix / relative.lstrip("/")
    written = 0
    with zipfile.ZipFile(path) as wheel:
        for info in wheel.infolist():
            if info.is_dir():
                continue
            parts = info.filename.split("/")
            if ".." in parts:
                msg = f"{path.name}: unsafe path {info.filename!r}"
                raise ValueError(msg)
            if parts[0].endswith(".data") and len(parts) > 2:
                scheme, rest = parts[1], parts[2:]
                roots = {"data": base, "scripts": base / "bin", "purelib": site, "platlib": site}
                if scheme not in roots:  # headers: not needed to run anything
                    continue
                destination = roots[scheme].joinpath(*rest)
            else:
                destination = site.joinpath(*parts)
            destination.parent.mkdir(parents=True, exist_ok=True)
            with wheel.open(info) as source, destination.open("wb") as sink:
                shutil.copyfileobj(source, sink)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                destination.chmod(mode)
            written += 1
    return written


# --------------------------------------------------------------------------- layout


def _package_map(pyproject: Path) -> tuple[list[str], dict[str, str]]:
    """Return the packages and the package-dir mapping of `pyproject`'s setuptools table."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        return list(DEFAULT_PACKAGES), dict(DEFAULT_PACKAGE_DIR)
    table = tomllib.loads(pyproject.read_text(encoding="utf-8"))["tool"]["setuptools"]
    return list(table["packages"]), dict(table.get("package-dir", {}))


def _source_of(package: str, package_dir: dict[str, str]) -> str:
    """Return the folder of `package` relative to the project root, as setuptools maps it."""
    parts = package.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in package_dir:
            return "/".join([package_dir[head], *parts[cut:]])
    root = package_dir.get("", "")
    return "/".join([root, *parts]) if root else "/".join(parts)


def layout(pyproject: Path, dest: Path) -> list[str]:
    """Copy every package of `pyproject` to where an install would put it, under `dest`.

    Copies, not links: the doctor and the benchmarks start workers with the folder above
    their own resolved ``__file__`` first on ``PYTHONPATH``, which for a link is the source
    tree, where ``portable_siglip.backends`` does not exist.

    Returns
    -------
    list of str
        ``"package <- source folder"`` for each package.
    """
    root = pyproject.parent
    packages, package_dir = _package_map(pyproject)
    done = []
    for package in sorted(packages, key=lambda name: name.count(".")):
        source = root / _source_of(package, package_dir)
        target = dest.joinpath(*package.split("."))
        if not (source / "__init__.py").is_file():
            msg = f"package {package}: no {source}/__init__.py"
            raise FileNotFoundError(msg)
        shutil.copytree(
            source,
            target,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        done.append(f"{package} <- {source.relative_to(root)}")
    return done


# --------------------------------------------------------------------------- conformance


def _takes_precision(function: Callable[..., Any]) -> bool:
    try:
        return "precision" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def _call(
    ours: Callable[..., Any], arrays: Sequence[Any], precision: str | None, block_size: Any
) -> tuple[Any, Any]:
    kwargs: dict[str, Any] = {}
    if block_size is not None:
        kwargs["block_size"] = block_size
    if precision is not None:
        kwargs["precision"] = precision
    return ours(*arrays, **kwargs)  # type: ignore[no-any-return]


def torch_on(
    ours: Callable[..., Any], device: str, precision: str | None
) -> Callable[..., tuple[Any, Any]]:
    """Our loss on torch tensors moved to `device` (the suite makes them on the host)."""

    def on_device(img: Any, txt: Any, scale: Any, bias: Any, block_size: Any = None) -> Any:
        arrays = [value.detach().to(device) for value in (img, txt, scale, bias)]
        return _call(ours, arrays, precision, block_size)

    return on_device


def cupy_from_torch(
    ours: Callable[..., Any], device: str, precision: str | None
) -> Callable[..., tuple[Any, Any]]:
    """Our loss on cupy arrays taken from torch tensors on `device` through DLPack."""
    import cupy

    def through_dlpack(img: Any, txt: Any, scale: Any, bias: Any, block_size: Any = None) -> Any:
        arrays = [
            cupy.from_dlpack(value.detach().to(device).contiguous())
            for value in (img, txt, scale, bias)
        ]
        return _call(ours, arrays, precision, block_size)

    return through_dlpack


def plain(ours: Callable[..., Any], precision: str | None) -> Callable[..., tuple[Any, Any]]:
    """Our loss on the suite's own arrays (cupy: on the GPU; jax: on its default device)."""

    def call(img: Any, txt: Any, scale: Any, bias: Any, block_size: Any = None) -> Any:
        return _call(ours, (img, txt, scale, bias), precision, block_size)

    return call


def _where_jax_runs(device: str) -> str:
    import jax

    platform = jax.default_backend()
    if device.startswith("cuda") and platform not in ("gpu", "cuda", "rocm"):
        msg = f"jax's default backend is {platform!r}, not a GPU (jax.devices(): {jax.devices()})"
        raise RuntimeError(msg)
    return f"jax default device {jax.devices()[0]}"


def _plan(backend: str, device: str, loss: str, dtype: str, precision: str | None) -> Any:
    """Return (the function to judge, the suite's backend, a note on how it is called)."""
    import portable_siglip as ps

    ours = ps.sigmoid_loss_and_grad if loss == "sigmoid" else ps.softmax_loss_and_grad
    if precision is not None and not _takes_precision(ours):
        if precision == "exact":
            return None, backend, "skipped: this portable_siglip has no precision option"
        precision = None  # "fast": the library's only behaviour, judged once
    if backend == "torch":
        note = f"suite's torch tensors moved to {device}"
        return torch_on(ours, device, precision), "torch", note
    if backend == "cupy":
        if dtype == "bfloat16":
            note = "torch bfloat16 tensors on the GPU handed to cupy through DLPack"
            return cupy_from_torch(ours, device, precision), "torch", note
        return plain(ours, precision), "cupy", "suite's cupy arrays"
    if backend == "jax":
        return plain(ours, precision), "jax", _where_jax_runs(device)
    msg = f"`--backend` must be torch, cupy or jax, got {backend!r}"
    raise ValueError(msg)


def _write_json(path: Path, data: Any) -> None:
    """Write `data` to `path` whole or not at all (a run cut short leaves the last version)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(partial, path)


def parse_runs(text: str) -> list[tuple[str, str | None]]:
    """``"float32,bfloat16:fast"`` -> ``[("float32", None), ("bfloat16", "fast")]``."""
    runs: list[tuple[str, str | None]] = []
    for item in text.split(","):
        dtype, _, precision = item.strip().partition(":")
        if dtype not in ("float32", "float64", "float16", "bfloat16"):
            msg = f"`--runs`: unknown dtype {dtype!r} in {text!r}"
            raise ValueError(msg)
        if precision not in ("", "fast", "exact"):
            msg = f"`--runs`: precision must be fast or exact, got {precision!r} in {text!r}"
            raise ValueError(msg)
        runs.append((dtype, precision or None))
    return runs


def conformance(
    backend: str,
    device: str,
    report: Path | None,
    timeout: float,
    runs: Sequence[tuple[str, str | None]] = parse_runs(RUNS),
) -> int:
    """Judge portable_siglip on `backend` in each (dtype, precision) of `runs`, both losses.

    Returns
    -------
    int
        0 when every check ran and passed, 1 otherwise.
    """
    from portable_siglip.conformance import check  # type: ignore[import-not-found]

    data: dict[str, Any] = {"runs": []}
    if report is not None and report.is_file():
        try:
            data = json.loads(report.read_text(encoding="utf-8"))
        except ValueError:
            data = {"runs": []}
    failed = 0
    for loss in ("sigmoid", "softmax"):
        for dtype, precision in runs:
            label = f"{backend} {device} {loss} {dtype}" + (f" {precision}" if precision else "")
            start = time.perf_counter()
            entry: dict[str, Any] = {"backend": backend, "device": device, "loss": loss}
            entry.update(dtype=dtype, precision=precision)
            try:
                function, suite_backend, note = _plan(backend, device, loss, dtype, precision)
                if function is None:
                    print(f"{label}: {note}", flush=True)
                    entry.update(passed=None, note=note)
                else:
                    result = check(
                        function, loss=loss, backend=suite_backend, dtype=dtype, timeout=timeout
                    )
                    seconds = time.perf_counter() - start
                    verdict = "passed" if result.passed else "FAILED"
                    print(f"{label} ({note}): {verdict} in {seconds:.1f} s", flush=True)
                    print(result, flush=True)
                    entry.update(passed=result.passed, note=note, seconds=round(seconds, 2))
                    entry["report"] = result.to_dict()
                    failed += not result.passed
            except Exception as error:  # the run goes on with the next check
                print(f"{label}: FAILED: {type(error).__name__}: {error}", flush=True)
                entry.update(passed=False, error=f"{type(error).__name__}: {error}")
                failed += 1
            data["runs"].append(entry)
            if report is not None:
                _write_json(report, data)
    return 1 if failed else 0


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; return the exit status."""
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fits = sub.add_parser("fits", help="which wheels this Python can install")
    fits.add_argument("wheels", nargs="*")
    unpack = sub.add_parser("install", help="unpack a wheel where pip is missing")
    unpack.add_argument("wheel", type=Path)
    where = unpack.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", type=Path)
    where.add_argument("--prefix", type=Path)
    lay = sub.add_parser("layout", help="copy the packages to where an install puts them")
    lay.add_argument("pyproject", type=Path)
    lay.add_argument("dest", type=Path)
    conf = sub.add_parser("conformance", help="judge portable_siglip on one GPU library")
    conf.add_argument("--backend", choices=("torch", "cupy", "jax"), required=True)
    conf.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    conf.add_argument("--report", type=Path, help="JSON file the checks are appended to")
    conf.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    conf.add_argument(
        "--runs",
        type=parse_runs,
        default=RUNS,
        help=f"comma-separated DTYPE or DTYPE:PRECISION (default: {RUNS})",
    )
    args = parser.parse_args(argv)
    if args.command == "fits":
        return _fits(args.wheels)
    if args.command == "install":
        count = install_wheel(args.wheel, target=args.target, prefix=args.prefix)
        print(f"unpacked {args.wheel.name}: {count} files")
        return 0
    if args.command == "layout":
        for line in layout(args.pyproject, args.dest):
            print(line)
        return 0
    return conformance(args.backend, args.device, args.report, args.timeout, args.runs)


if __name__ == "__main__":
    sys.exit(main())
