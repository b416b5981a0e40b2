"""The public surface: names, no framework imported, runnable docstring examples."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import inspect
import subprocess
import sys

import pytest
from helpers import mpi_usable

import portable_siglip as ps

PUBLIC = {
    "Gradients",
    "__version__",
    "sigmoid_loss",
    "sigmoid_loss_and_grad",
    "softmax_loss",
    "softmax_loss_and_grad",
}


def test_all_matches_public_names() -> None:
    public = {name for name in dir(ps) if not name.startswith("_")} | {"__version__"}
    # Submodules (`comm`, `backends`, `conformance`, `bench`, `cli`) are reached by path, not
    # re-exported.
    public -= {"backends", "bench", "cli", "comm", "conformance"}
    assert set(ps.__all__) == PUBLIC == public
    assert list(ps.__all__) == sorted(ps.__all__)


def test_gradients_fields() -> None:
    assert ps.Gradients._fields == ("img", "txt", "scale", "bias")


def test_import_pulls_in_no_framework() -> None:
    code = (
        "import sys, portable_siglip, portable_siglip.backends, portable_siglip.conformance\n"
        "heavy = [m for m in ('numpy', 'torch', 'jax', 'cupy', 'mpi4py', 'array_api_strict') "
        "if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "", f"imported at import time: {result.stdout.strip()}"


#: The backend modules, each skipped where its library is missing. nccl imports no CuPy
#: until a communicator is made; its examples that need a GPU are marked +SKIP.
BACKENDS = [
    pytest.param(
        "portable_siglip.backends.mpi",
        marks=pytest.mark.skipif(
            not mpi_usable(), reason="MPI is not usable (mpi4py or its MPI library missing)"
        ),
    ),
    pytest.param(
        "portable_siglip.backends.torch",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("torch") is None, reason="torch is not installed"
        ),
    ),
    pytest.param(
        "portable_siglip.backends.jax",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("jax") is None, reason="jax is not installed"
        ),
    ),
    "portable_siglip.backends.nccl",
]


#: The modules whose docstring examples run here (the conformance suite's run beside its tests).
DOCTESTED = ["portable_siglip", "portable_siglip._losses", "portable_siglip.comm", *BACKENDS]
DOCTESTED += [
    "portable_siglip.cli._commands",
    "portable_siglip._tiles",
    "portable_siglip._reference",
    "portable_siglip._registry",
    "portable_siglip._tilemath",
    "portable_siglip._precision",
    "portable_siglip._interop",
]


@pytest.mark.parametrize("module", DOCTESTED)
def test_docstring_examples_run(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), verbose=False)
    assert result.attempted > 0, f"{module} has no examples"
    assert result.failed == 0


@pytest.mark.parametrize("module", ["portable_siglip.comm", *BACKENDS])
def test_every_public_name_has_examples(module: str) -> None:
    imported = importlib.import_module(module)
    missing = [
        name
        for name in imported.__all__
        if "\nExamples\n--------\n" not in (inspect.getdoc(getattr(imported, name)) or "")
    ]
    assert missing == [], f"{module}: no Examples section in the docstrings of {missing}"
