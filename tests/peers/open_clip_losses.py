"""open_clip's SigLipLoss and ClipLoss as conformance peers: ``f(img, txt, scale, bias)``.

Each callable wraps one loss of the installed ``open-clip-torch`` distribution and returns the
loss alone, a 0-d torch tensor; the conformance suite takes the gradients by autodiff.
``scale`` is the multiplier t itself (open_clip's models pass ``logit_scale.exp()``), ``bias``
the logit bias b as a 0-d tensor.

Only the file ``open_clip/loss.py`` is loaded, straight from the installed distribution: the
package's ``__init__`` imports the whole model zoo and needs torchvision, timm and friends,
which this project does not install (CI installs ``open-clip-torch`` with ``--no-deps``).
``loss.py`` itself needs only torch; ``torch.distributed`` and horovod are optional imports in
``try`` blocks that are used only when ``world_size > 1``. Importing this module raises
ImportError, with the install command, when open-clip-torch is missing. ``siglip_chunked``
raises NotImplementedError on releases whose ``SigLipLoss`` has no ``chunk_size`` (3.3.0).

Check one with, for example::

    python -m portable_siglip.conformance --loss sigmoid --backend torch \\
        --impl tests/peers/open_clip_losses.py:siglip
"""

from __future__ import annotations

import importlib.metadata
import inspect
from functools import cache
from types import ModuleType
from typing import Any

from portable_siglip.bench.baselines import load_open_clip_loss

__all__ = [
    "CHUNK_SIZE",
    "clip",
    "has_chunked_siglip",
    "load_loss_module",
    "open_clip_version",
    "siglip",
    "siglip_chunked",
]

DISTRIBUTION = "open-clip-torch"
CHUNK_SIZE = 8  # rows per block for the chunked path: smaller than the larger golden cases


def open_clip_version() -> str:
    """The installed version of open-clip-torch.

    Raises
    ------
    ImportError
        If open-clip-torch is not installed.
    """
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        msg = (
            f"{DISTRIBUTION} is not installed; install it without its dependencies (its package "
            f"__init__ needs torchvision, but loss.py needs only torch): "
            f"python -m pip install --no-deps {DISTRIBUTION}"
        )
        raise ImportError(msg, name=DISTRIBUTION) from None


def load_loss_module() -> ModuleType:
    """Execute ``open_clip/loss.py`` of the installed distribution as a module of its own.

    ``open_clip/__init__.py`` is never run; the loader is the benchmark's
    (:func:`portable_siglip.bench.baselines.load_open_clip_loss`).

    Raises
    ------
    ImportError
        If open-clip-torch is not installed or its distribution has no ``open_clip/loss.py``.
    """
    open_clip_version()  # the ImportError that says how to install it
    return load_open_clip_loss()


load_loss_module()  # fail at import, with a clear ImportError, when open-clip-torch is missing


@cache
def _sig_lip_loss(chunk_size: int = 0) -> Any:
    """One shared ``SigLipLoss`` (stateless: its label cache is unused)."""
    cls = load_loss_module().SigLipLoss
    return cls(chunk_size=chunk_size) if chunk_size else cls()


@cache
def _clip_loss() -> Any:
    """One shared ``ClipLoss`` with its defaults (labels are rebuilt on every call)."""
    return load_loss_module().ClipLoss()


def has_chunked_siglip() -> bool:
    """Whether the installed ``SigLipLoss`` takes ``chunk_size`` (open_clip PR #1145)."""
    return "chunk_size" in inspect.signature(load_loss_module().SigLipLoss).parameters


def siglip(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """open_clip ``SigLipLoss()(img, txt, scale, bias)``: the sigmoid loss."""
    return _sig_lip_loss()(img, txt, scale, bias)


def clip(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """open_clip ``ClipLoss()(img, txt, scale, logit_bias=bias)``: the softmax loss.

    ``ClipLoss`` adds ``logit_bias`` to both logit matrices when given; the softmax loss is
    shift invariant, so the value is unchanged and the bias gradient is a rounding-level zero.
    """
    return _clip_loss()(img, txt, scale, logit_bias=bias)


def siglip_chunked(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """open_clip ``SigLipLoss(chunk_size=CHUNK_SIZE)(img, txt, scale, bias)``.

    Raises
    ------
    NotImplementedError
        If the installed open_clip's ``SigLipLoss`` has no ``chunk_size``.
    """
    if not has_chunked_siglip():
        msg = (
            f"SigLipLoss of {DISTRIBUTION} {open_clip_version()} takes no `chunk_size` "
            f"(the chunked path came with open_clip PR #1145)"
        )
        raise NotImplementedError(msg)
    return _sig_lip_loss(CHUNK_SIZE)(img, txt, scale, bias)
