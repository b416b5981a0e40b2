"""Which losses the suite judges: the registered ones its golden cases hold outputs of."""

from __future__ import annotations

from portable_siglip import _registry as registry

from ._cases import load_cases
from ._ids import load_ids_cases

__all__ = ["check_loss", "golden_losses"]


def golden_losses(*, ids: bool = False) -> tuple[str, ...]:
    """Return the losses the suite can judge: the registered ones that every golden case has.

    A loss is judged against the expected outputs the data files hold for it, so a loss
    registered without them (:mod:`portable_siglip._registry`) is not one.

    Parameters
    ----------
    ids : bool
        Read the cases with several positives per row (:func:`._ids.load_ids_cases`)
        instead of the one-to-one golden cases.

    Returns
    -------
    tuple of str
        Their names, in the registry's order.

    Examples
    --------
    >>> golden_losses()
    ('sigmoid', 'softmax')
    """
    cases = load_ids_cases() if ids else load_cases()
    return tuple(name for name in registry.names() if all(name in c.goldens for c in cases))


def check_loss(loss: object, *, ids: bool = False, error: type[ValueError] = ValueError) -> None:
    """Raise `error` (naming ``loss``) unless `loss` is one the suite can judge.

    Parameters
    ----------
    loss : object
        What the caller was given as ``loss``.
    ids : bool
        Whether the cases with ids are to judge it (:func:`golden_losses`).
    error : type
        The ``ValueError`` to raise (the distributed judge raises its ``UsageError``).

    Examples
    --------
    >>> check_loss("softmax")
    >>> check_loss("hinge")
    Traceback (most recent call last):
    ...
    ValueError: `loss` must be one of 'sigmoid', 'softmax', got 'hinge'
    """
    judged = golden_losses(ids=ids)
    if loss in judged:
        return
    names = ", ".join(repr(name) for name in judged)
    if isinstance(loss, str) and loss in registry.names():
        msg = (
            f"`loss` {loss!r} is a registered loss, but the golden cases hold no expected "
            f"outputs of it: the suite judges {names}"
        )
    else:
        msg = f"`loss` must be one of {names}, got {loss!r}"
    raise error(msg)
