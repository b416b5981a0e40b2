"""What the torch bridge (``backends/torch.py``) and its two-pass step share.

Small helpers that both :mod:`portable_siglip.backends.torch` and the two-pass training
step (``backends/_torch_cached.py``, ``cached_step``) use; apart, so that neither of those
two imports the other's internals (the bridge re-exports ``cached_step``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

import portable_siglip as ps
from portable_siglip import _losses, _registry

__all__ = ["as_scalar", "detached", "loss_functions", "without_autocast"]


def loss_functions(loss: str) -> tuple[Any, Any]:
    """Return the library's ``(loss, loss_and_grad)`` functions of the registered `loss`."""
    return _losses.loss_functions(_registry.get(loss), ps)


def detached(value: Any) -> Any:
    """Return `value` detached from autograd if it is a tensor, else unchanged.

    The core sees plain tensors: no autograd bookkeeping, and DLPack export (MPIComm's host
    staging) refuses tensors that require grad.
    """
    return value.detach() if isinstance(value, torch.Tensor) else value


def as_scalar(value: Any) -> Any:
    """Let a one-element tensor (shape ``(1,)``, ``(1, 1)``, ...) stand for a 0-d one."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.numel() == 1:
        return value.reshape(())
    return value


def without_autocast(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """Switch autocast off on `device_type`; a no-op where autocast does not exist (meta).

    The meta device has no autocast (``torch.autocast(device_type="meta")`` raises), and
    nothing to switch off: on it the loss only infers shapes and dtypes.
    """
    available = getattr(torch.amp, "is_autocast_available", None)
    if device_type == "meta" or (available is not None and not available(device_type)):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)
