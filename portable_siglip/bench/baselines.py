"""The losses the benchmarks compare ours against, and a prediction of their peak memory.

``dense autograd``
    :func:`dense_loss`: the loss written densely in torch (the n x n logits in one piece),
    differentiated by autograd.
``dense numpy``
    :func:`dense_numpy_loss_and_grad`: the loss and its gradients written densely in numpy,
    by hand, in the inputs' dtype: the naive baseline of a numpy user.
``chunked autograd``
    :func:`chunked_sigmoid_loss`: the sigmoid loss summed over blocks of image rows, with
    autograd, as open_clip's ``SigLipLoss(chunk_size=...)`` does.
``open_clip``
    open_clip's own ``SigLipLoss`` / ``ClipLoss`` (:func:`open_clip_loss`). Only
    ``open_clip/loss.py`` is loaded, straight from the installed open-clip-torch
    (:func:`load_open_clip_loss`; the package's ``__init__`` needs torchvision and more); it
    needs only torch.

Each is a fact about one loss as written elsewhere, so each is a table keyed by the loss's
name (:data:`DENSE_LOSSES`, :data:`OPEN_CLIP_LOSSES`): a loss without an entry there is a
clear ``ValueError``, never the other loss.

Both the sweep (its torch rows) and ``bench --frameworks`` use them, and both skip a case
whose peak :func:`predict_peak_bytes` puts above the memory cap. torch is imported inside
functions only.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = [
    "DENSE",
    "DENSE_LOSSES",
    "DENSE_NUMPY",
    "OPEN_CLIP",
    "OPEN_CLIP_LOSSES",
    "OURS",
    "baseline",
    "chunked_sigmoid_loss",
    "dense_loss",
    "load_open_clip_loss",
    "open_clip_forward",
    "open_clip_info",
    "open_clip_loss",
    "predict_peak_bytes",
]

#: Names of the rows both benchmarks have: our loss, open_clip's, the dense autograd loss.
OURS = "ours"
OPEN_CLIP = "open_clip"
DENSE = "dense autograd"
#: The dense numpy loss and gradient (:func:`dense_numpy_loss_and_grad`).
DENSE_NUMPY = "dense numpy"

#: Lower bounds of the peak extra memory, in units of ``n^2 * itemsize`` for the framework
#: losses (the dense and chunked losses keep several n x n tensors for backward; 4 to 6 were
#: measured at n = 4096, d = 768) ...
N2_TENSORS = 3.0
#: ... and, for ``ours``, of ``n d itemsize`` (saved gradients and the leaves' gradients,
#: two each)
#: plus ``block^2 itemsize`` (one tile of logits).
OURS_ND_TENSORS = 4.0
OURS_TILES = 1.0

DISTRIBUTION = "open-clip-torch"
MODULE_NAME = "_portable_siglip_open_clip_loss"  # not "open_clip.loss": never the package


# --------------------------------------------------------------------------- autograd losses


def baseline(table: dict[str, Any], loss: str, what: str) -> Any:
    """Return ``table[loss]``: what `what` has for the loss named `loss`.

    Raises
    ------
    ValueError
        When `what` has nothing for that loss, naming the losses it has.

    Examples
    --------
    >>> baseline(OPEN_CLIP_LOSSES, "softmax", "open_clip")
    ('ClipLoss', False)
    >>> baseline(OPEN_CLIP_LOSSES, "hinge", "open_clip")
    Traceback (most recent call last):
    ...
    ValueError: open_clip has no 'hinge' loss; it has 'sigmoid', 'softmax'
    """
    if loss in table:
        return table[loss]
    known = ", ".join(repr(name) for name in table)
    msg = f"{what} has no {loss!r} loss; it has {known}"
    raise ValueError(msg)


def _dense_sigmoid(logits: Any) -> Any:
    import torch
    from torch.nn import functional

    n = logits.shape[0]
    # Built on every call, as open_clip's SigLipLoss does.
    labels = 2 * torch.eye(n, dtype=logits.dtype, device=logits.device) - 1
    return -functional.logsigmoid(labels * logits).sum() / n


def _dense_softmax(logits: Any) -> Any:
    import torch
    from torch.nn import functional

    target = torch.arange(logits.shape[0], device=logits.device)
    return (
        functional.cross_entropy(logits, target) + functional.cross_entropy(logits.T, target)
    ) / 2


#: The dense torch loss of each loss, from its (n, n) logits (:func:`dense_loss`).
DENSE_LOSSES: dict[str, Callable[[Any], Any]] = {
    "sigmoid": _dense_sigmoid,
    "softmax": _dense_softmax,
}


def dense_loss(loss: str, img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Write the loss densely in torch, for autograd: the n x n logits in one piece.

    Parameters
    ----------
    loss : str
        A loss of :data:`DENSE_LOSSES`.
    img, txt : torch.Tensor, shape (n, d)
        Image and text features.
    scale : torch.Tensor, 0-d
        The logit multiplier t.
    bias : torch.Tensor, 0-d, or None
        The logit bias b (None: 0; no effect on softmax).

    Returns
    -------
    torch.Tensor, 0-d
        The loss, differentiable by autograd.

    Raises
    ------
    ValueError
        For a loss without a dense baseline.
    """
    formula = baseline(DENSE_LOSSES, loss, "the dense autograd baseline")
    logits = scale * img @ txt.T  # (n, d) @ (d, n) -> (n, n)
    if bias is not None:
        logits = logits + bias
    return formula(logits)


def dense_numpy_loss_and_grad(
    loss: str, img: Any, txt: Any, scale: float, bias: float
) -> tuple[float, tuple[Any, Any, float, float]]:
    """Compute the loss and its four gradients densely in numpy: the n x n matrices whole.

    The textbook formula of the registered loss (its ``dense``, which ``run --verify``
    evaluates in float64) on ``S = img @ txt.T`` in the inputs' own dtype, and the chain
    rule by hand: ``d_img = t G txt``, ``d_txt = t G^T img``, ``d_t = sum(G * S)``,
    ``d_b = sum(G)`` with ``G = dL/dZ``. What a numpy user writes without this library.

    Parameters
    ----------
    loss : str
        A registered loss's name.
    img, txt : numpy.ndarray, shape (n, d)
        Image and text features; row i of each is a positive pair.
    scale, bias : float
        ``t`` and ``b``.

    Returns
    -------
    tuple
        ``(loss, (d_img, d_txt, d_scale, d_bias))``.

    Examples
    --------
    >>> import numpy as np
    >>> value, (d_img, d_txt, d_t, d_b) = dense_numpy_loss_and_grad(
    ...     "softmax", np.eye(2), np.eye(2), 1.0, 0.0)
    >>> round(value, 6), d_img.shape, d_b
    (0.313262, (2, 2), 0.0)
    """
    import numpy as np

    from .. import _registry as registry

    spec = registry.get(loss)
    sims = img @ txt.T  # (n, d) @ (d, n) -> (n, n)
    positive = np.eye(sims.shape[0], sims.shape[1], dtype=sims.dtype)
    value, dlogits = spec.dense(sims, scale, bias, positive)
    dlogits = dlogits.astype(sims.dtype, copy=False)
    d_img = scale * (dlogits @ txt)  # (n, n) @ (n, d)
    d_txt = scale * (dlogits.T @ img)
    d_scale = float((dlogits * sims).sum())
    d_bias = float(dlogits.sum()) if spec.uses_bias else 0.0
    return float(value), (d_img, d_txt, d_scale, d_bias)


def chunked_sigmoid_loss(img: Any, txt: Any, scale: Any, bias: Any, chunk_size: int) -> Any:
    """Sum the sigmoid loss over blocks of ``chunk_size`` image rows, for autograd.

    What open_clip's ``SigLipLoss(chunk_size=...)`` does: each block's logits are
    ``(chunk_size, n)``, but autograd keeps every block's intermediates until backward.

    Parameters
    ----------
    img, txt : torch.Tensor, shape (n, d)
        Image and text features.
    scale : torch.Tensor, 0-d
        The logit multiplier t.
    bias : torch.Tensor, 0-d, or None
        The logit bias b (None: 0).
    chunk_size : int
        Image rows per block.

    Returns
    -------
    torch.Tensor, 0-d
        The loss, ``-sum log sigmoid(z_ij (t x_i . y_j + b)) / n``.

    Examples
    --------
    >>> import torch
    >>> img = torch.nn.functional.normalize(torch.randn(7, 3, dtype=torch.float64), dim=1)
    >>> txt = torch.nn.functional.normalize(torch.randn(7, 3, dtype=torch.float64), dim=1)
    >>> t, b = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    >>> chunked = chunked_sigmoid_loss(img, txt, t, b, chunk_size=3)
    >>> bool(torch.isclose(chunked, dense_loss("sigmoid", img, txt, t, b)))
    True
    """
    import torch
    from torch.nn import functional

    n = img.shape[0]
    total = img.new_zeros(())
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        logits = scale * img[start:stop] @ txt.T  # (c, d) @ (d, n) -> (c, n)
        if bias is not None:
            logits = logits + bias
        labels = -torch.ones_like(logits)
        labels.diagonal(offset=start).fill_(1.0)  # pairs (i, start + i)
        total = total - functional.logsigmoid(labels * logits).sum()
    return total / n


# --------------------------------------------------------------------------- open_clip


@cache
def load_open_clip_loss() -> ModuleType:
    """Execute ``open_clip/loss.py`` of the installed open-clip-torch as a module of its own.

    The package's ``__init__`` (which needs torchvision) is never run.

    Returns
    -------
    module
        The executed ``loss.py``, with ``SigLipLoss`` and ``ClipLoss``.

    Raises
    ------
    ImportError
        If open-clip-torch is not installed or has no ``open_clip/loss.py``.
    """
    try:
        distribution = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        msg = f"{DISTRIBUTION} is not installed"
        raise ImportError(msg, name=DISTRIBUTION) from None
    path = Path(str(distribution.locate_file("open_clip/loss.py")))
    if not path.is_file():
        msg = f"{DISTRIBUTION} {distribution.version} has no open_clip/loss.py (looked at {path})"
        raise ImportError(msg, name=DISTRIBUTION, path=str(path))
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    if spec is None or spec.loader is None:
        msg = f"cannot load {path} as a module"
        raise ImportError(msg, name=DISTRIBUTION, path=str(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[MODULE_NAME]
        raise
    return module


def open_clip_info() -> dict[str, Any]:
    """Say what the installed open-clip-torch offers.

    Returns
    -------
    dict
        ``installed`` (bool: its ``loss.py`` loads), ``version`` (str or None),
        ``chunk_size`` (bool: its ``SigLipLoss`` takes ``chunk_size``) and ``problem``
        (why it is not usable, or None).
    """
    try:
        version: str | None = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = None
    try:
        module = load_open_clip_loss()
    except Exception as error:  # not installed, or its loss.py fails to load
        return {"installed": False, "version": version, "chunk_size": False, "problem": str(error)}
    chunked = "chunk_size" in inspect.signature(module.SigLipLoss).parameters
    return {"installed": True, "version": version, "chunk_size": chunked, "problem": None}


#: open_clip's module of each loss it has, and whether its ``forward`` takes the logit bias.
OPEN_CLIP_LOSSES = {"sigmoid": ("SigLipLoss", True), "softmax": ("ClipLoss", False)}


def open_clip_loss(loss: str, chunk_size: int | None = None) -> Callable[..., Any]:
    """Return open_clip's loss module: ``SigLipLoss()`` / ``ClipLoss()``.

    Parameters
    ----------
    loss : str
        A loss of :data:`OPEN_CLIP_LOSSES`.
    chunk_size : int, optional
        ``SigLipLoss(chunk_size=...)``, on releases that have it (sigmoid only).

    Returns
    -------
    torch.nn.Module
        Called as ``(img, txt, logit_scale, logit_bias)`` (sigmoid) or
        ``(img, txt, logit_scale)`` (softmax).

    Raises
    ------
    ImportError
        When open-clip-torch cannot be loaded.
    ValueError
        For a loss open_clip does not have, or a chunk size with the softmax loss.
    """
    name, _ = baseline(OPEN_CLIP_LOSSES, loss, "open_clip")
    module = getattr(load_open_clip_loss(), name)
    if chunk_size is None:
        return module()  # type: ignore[no-any-return]
    if name != "SigLipLoss":
        msg = f"open_clip's {name} has no chunk_size"
        raise ValueError(msg)
    return module(chunk_size=chunk_size)  # type: ignore[no-any-return]


def open_clip_forward(loss: str, chunk_size: int | None = None) -> Callable[..., Any]:
    """Return open_clip's loss as ``f(img, txt, scale, bias) -> loss``, for every loss alike.

    A module whose ``forward`` takes no bias (``ClipLoss``) is called without it.
    """
    module = open_clip_loss(loss, chunk_size)
    if baseline(OPEN_CLIP_LOSSES, loss, "open_clip")[1]:
        return module

    def without_bias(img: Any, txt: Any, scale: Any, _bias: Any) -> Any:
        return module(img, txt, scale)

    return without_bias


# --------------------------------------------------------------------------- memory


def predict_peak_bytes(
    loss: str,
    impl: str,
    n: int,
    dim: int,
    itemsize: int,
    block_size: int,
    previous: tuple[int, int] | None,
) -> float:
    """Predict the peak extra memory of one case, to skip it when above the cap.

    The larger of a lower-bound formula and, when a smaller n of the same case was
    measured, that peak scaled to n: as ``n^2`` for the framework losses, as ``n`` for
    ``ours`` (whose memory is O(n d + block^2)).

    Parameters
    ----------
    loss : str
        Which loss (the prediction is the same for every loss).
    impl : str
        The row: :data:`OURS` or one of the framework losses.
    n, dim : int
        Batch size and feature dimension.
    itemsize : int
        Bytes per element.
    block_size : int
        Tile edge of ``ours``.
    previous : (int, int) or None
        ``(n0, peak0)``: the measured peak extra bytes at the largest smaller size n0.

    Returns
    -------
    float
        Predicted bytes.

    Examples
    --------
    >>> MiB = 2**20
    >>> predict_peak_bytes("sigmoid", "dense autograd", 2048, 8, 4, 1024, (1024, 20 * MiB)) / MiB
    80.0
    >>> predict_peak_bytes("sigmoid", "ours", 2048, 8, 4, 1024, (1024, 20 * MiB)) / MiB
    40.0
    >>> predict_peak_bytes("sigmoid", "dense autograd", 2048, 8, 4, 1024, None) / MiB  # 3 n^2
    48.0
    """
    if impl == OURS:
        tile = min(block_size, n)
        formula = (OURS_ND_TENSORS * n * dim + OURS_TILES * tile * tile) * itemsize
        power = 1
    else:
        formula = N2_TENSORS * n * n * itemsize
        power = 2
    if previous is None:
        return float(formula)
    n0, peak0 = previous
    return float(max(formula, peak0 * (n / n0) ** power))
