"""The losses, each described once: what every layer reads instead of spelling a loss's name.

A :class:`Loss` holds everything the project knows about one loss: its name (what users
type: ``run --loss``, ``bench --losses``, ``conformance --loss``, the golden files' stem),
its tile formula, how its evaluation normalises and assembles the gradients, its distributed
schedules, and its dense float64 reference. The core registers the sigmoid and the softmax
loss when it is imported (:mod:`._losses`); the command line, the benchmarks, doctor and the
conformance suite iterate over :func:`losses` or look one up with :func:`get`.

docs/adding-a-loss.md walks a contributor through adding one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Loss", "get", "losses", "names", "register", "unregister"]


@dataclass(frozen=True)
class Loss:
    """One loss, as every layer of the project sees it.

    Attributes
    ----------
    name : str
        The name users type (``run --loss NAME``) and the stem of its golden files.
    title : str
        What the loss is, for reports and help texts.
    schedules : tuple of str
        The distributed schedules it supports, the default first (docs/distributed.md).
    evaluate : callable
        ``evaluate(loss, problem, ring, grad=...) -> (value, Gradients | None)``: the
        passes over the tiles (alone or round the ring), the normaliser and the gradient
        assembly. It reads the tile formula from ``loss.tile``.
    tile : callable
        The per-tile formula of :mod:`._tilemath` its evaluation runs (for the sigmoid
        family, ``tile(ops, logits, mask, *, grad, work, valid) -> (loss_sum, dL/dZ part)``).
    dense : callable
        ``dense(sims, scale, bias, positive) -> (value, dL/dZ)``: the textbook formula on the
        whole matrix in float64 NumPy (``sims = img @ txt.T``, ``positive`` the 0/1 matrix of
        positive pairs), sharing no code with the tiles; ``run --verify`` compares with it.
    uses_bias : bool
        Whether the logit bias changes the loss (False: it cancels, ``dL/db`` is exactly 0).
    functions : tuple of str
        The public functions that compute it: the loss alone, and with its gradients
        (empty for a loss that is not public, such as an example).
    gemms_per_tile : int
        The (b, d) x (d, b) GEMMs its loss and gradients cost per tile (the benchmarks'
        roofline): 3 for one pass (logits, two gradient products), 4 for the softmax
        loss's two passes.
    needs_positives : bool
        Whether, with ids, every row and column must hold a positive pair (a ``ValueError``
        otherwise, raised eagerly): the softmax loss's target is a uniform distribution over
        a row's positives, which does not exist without one. The sigmoid family's labels are
        defined for any ids (a row without a positive is all negatives): False. Such a loss
        takes ``unmatched_txt="negatives"`` (:func:`._losses.evaluate`): a text column without
        a positive is then a negative of every image instead of an error, and the loss's
        evaluation reads ``problem.txt_negatives`` (docs/math.md, section 9); for a loss
        without ``needs_positives`` the option is validated and changes nothing.

    Examples
    --------
    >>> import portable_siglip  # registers the library's losses
    >>> from portable_siglip._registry import get, names
    >>> names()
    ('sigmoid', 'softmax')
    >>> get("softmax").schedules
    ('ring', 'gather')
    >>> get("sigmoid").functions
    ('sigmoid_loss', 'sigmoid_loss_and_grad')
    """

    name: str
    title: str
    schedules: tuple[str, ...]
    evaluate: Callable[..., Any]
    tile: Callable[..., Any]
    dense: Callable[..., Any]
    uses_bias: bool = True
    functions: tuple[str, ...] = ()
    gemms_per_tile: int = 3
    needs_positives: bool = False

    @property
    def default_schedule(self) -> str:
        """The schedule used when none is named."""
        return self.schedules[0]


_LOSSES: dict[str, Loss] = {}


def register(loss: Loss) -> Loss:
    """Add ``loss`` to the registry; return it. A second loss of the same name is an error.

    Examples
    --------
    >>> import portable_siglip
    >>> from dataclasses import replace
    >>> from portable_siglip._registry import get, register, unregister
    >>> twin = register(replace(get("sigmoid"), name="sigmoid-twin", functions=()))
    >>> get("sigmoid-twin") is twin
    True
    >>> unregister("sigmoid-twin")
    """
    if loss.name in _LOSSES:
        msg = f"a loss named {loss.name!r} is registered already"
        raise ValueError(msg)
    if not loss.schedules:
        msg = f"loss {loss.name!r} must name at least one schedule"
        raise ValueError(msg)
    _LOSSES[loss.name] = loss
    return loss


def unregister(name: str) -> None:
    """Remove the loss ``name`` (an example or a test's loss) from the registry."""
    _LOSSES.pop(name, None)


def losses() -> tuple[Loss, ...]:
    """Return every registered loss, in the order they were registered."""
    return tuple(_LOSSES.values())


def names() -> tuple[str, ...]:
    """Return the names of every registered loss."""
    return tuple(_LOSSES)


def get(name: object, *, parameter: str = "loss") -> Loss:
    """Return the loss called ``name``; a clear ``ValueError`` (naming ``parameter``) if none is.

    Examples
    --------
    >>> import portable_siglip
    >>> from portable_siglip._registry import get
    >>> get("cosine")
    Traceback (most recent call last):
    ...
    ValueError: `loss` must be one of 'sigmoid', 'softmax', got 'cosine'
    """
    if isinstance(name, str) and name in _LOSSES:
        return _LOSSES[name]
    known = ", ".join(repr(key) for key in _LOSSES)
    msg = f"`{parameter}` must be one of {known}, got {name!r}"
    raise ValueError(msg)
