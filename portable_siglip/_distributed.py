"""Distributed evaluation: the handshake, and the schedules that move text blocks between ranks.

Every rank holds a shard of the global batch: its images stay home, its text block travels.
A *visit* computes everything one text block contributes on one rank (the tiles of the
local images against that block) and returns the block's share of its *accumulators*
(for the sigmoid loss, ``dL/dtxt`` before normalisation; for the softmax first pass, the
column log-sum-exp as ``(M, s)`` pairs, see :mod:`._softmax`). The accumulators travel with
the block and come home merged over every rank. A schedule decides how blocks and accumulators move:

- ``bidir`` (sigmoid default): each block travels both ways round the ring,
  ``ceil((W-1)/2)`` hops to the right and ``floor((W-1)/2)`` to the left; at the end of each
  chain the accumulator goes straight home.
- ``shift`` (sigmoid) and ``ring`` (softmax): one way round, W-1 hops, then one hop home.
- ``reduce``: rank by rank, the block is broadcast and its accumulator summed with
  ``allreduce``.
- ``gather``: all blocks at once by ``allgather``; accumulators by one ``allreduce``.

In the chain schedules the next block's exchange is posted before the current block is
computed, so the transfer overlaps the arithmetic. docs/distributed.md has the diagram and
the costs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import array_api_compat

from ._checks import Problem, check_positives, concrete_value, host_ids, prepare
from ._softmax import merge_lse_pairs
from ._typing import Array, Namespace
from .comm import Communicator, Request, check_communicator

__all__ = ["SCHEDULES", "Ring", "circulate", "global_sums", "raise_everywhere", "setup"]

#: ``visit(home, block)``: ``home`` says whether ``block`` is this rank's own (a Python bool,
#: or a traced boolean under an SPMD communicator whose rank is only known on the device).
Visit = Callable[[Any, tuple[Array, ...]], tuple[Array, ...]]

# Tags keep concurrent exchanges with the same neighbour apart: (chain, kind, field).
_STATIC, _ACC, _HOME = 0, 1, 2
_FIELDS = 8


def _tag(chain: int, kind: int, field: int) -> int:
    return (3 * chain + kind) * _FIELDS + field


@dataclass(frozen=True)
class Ring:
    """A validated distributed call: the communicator, every rank's rows and the schedule.

    ``sizes`` are the text rows of every rank (the blocks that travel), ``img_sizes`` the
    image rows (equal to ``sizes`` without ids).
    """

    comm: Communicator
    sizes: tuple[int, ...]
    strategy: str
    img_sizes: tuple[int, ...] = ()

    @property
    def img_total(self) -> int:
        """Image rows of the global batch (M, the loss's normaliser)."""
        return sum(self.img_sizes or self.sizes)

    @property
    def txt_total(self) -> int:
        """Text rows of the global batch (K)."""
        return sum(self.sizes)

    @property
    def offset(self) -> int:
        """Index of this rank's first text row in the global batch."""
        return sum(self.sizes[: self.comm.rank])


def spmd(comm: object) -> bool:
    """Whether every rank of ``comm`` runs one traced program (``AxisComm`` in ``shard_map``).

    Such a communicator's rank is a traced value, exchanges are collective shifts, and the
    handshake has nothing to compare: the ranks cannot disagree on what one program traced.
    """
    return bool(getattr(comm, "spmd", False))


def _scalar_value(value: float | Array) -> float:
    if isinstance(value, float):
        return value
    concrete = concrete_value(value)  # a torch tensor's value without autograd's warning
    if concrete is None:  # jax tracers and the like have no value to agree on
        msg = (
            "`comm` needs concrete `scale` and `bias` values (every rank checks they agree), "
            f"got {type(value).__name__}; distributed evaluation cannot run inside jax.jit"
        )
        raise TypeError(msg)
    return concrete


def _by_rank(values: Sequence[object]) -> str:
    return ", ".join(f"rank {rank}: {value!r}" for rank, value in enumerate(values))


def _ids_values(ids: Any) -> list[int]:
    values = host_ids(ids)
    if values is None:
        msg = (
            "`comm` needs concrete `img_ids` and `txt_ids` (the ranks swap them, to agree on "
            f"one id dtype and check the positives of the global batch), got "
            f"{type(ids).__name__}; distributed evaluation cannot run inside jax.jit"
        )
        raise TypeError(msg)
    return values


def _common_ids(problem: Problem, everyone: Sequence[dict[str, Any]], rank: int) -> Problem:
    """Return ``problem`` with its ids replaced by their index among the global distinct ids.

    A rank's text ids travel with its text blocks and are compared with the images' ids of
    every other rank, so they must have one dtype on every rank; the ranks may pass any
    integer dtypes (int32 on one, int64 or uint64 on another). Every rank holds every rank's
    ids as Python ints after the handshake, so each maps its own ids to their index in the
    sorted list of the distinct ids of the global batch: the same map on every rank, exact
    (equal ids get equal indices, different ids different ones), in int32 on every rank
    (int64 beyond 2**31 - 1 distinct ids).
    """
    distinct = sorted({value for entry in everyone for key in _ID_KEYS for value in entry[key]})
    index = {value: i for i, value in enumerate(distinct)}
    xp = problem.xp
    dtype = xp.int32 if len(distinct) < 2**31 else xp.int64
    mine = everyone[rank]
    img_ids, txt_ids = (
        xp.asarray([index[value] for value in mine[key]], dtype=dtype, device=problem.device)
        for key in _ID_KEYS
    )
    return replace(problem, img_ids=img_ids, txt_ids=txt_ids)


#: The summary fields holding a rank's ids, as Python ints.
_ID_KEYS = ("img_ids", "txt_ids")


def _check_global_ids(
    everyone: Sequence[dict[str, Any]], *, needs_positives: bool, unmatched_txt: str = "error"
) -> None:
    """Every rank passes ids or none; with ids, every global row has a positive if needed.

    With ``unmatched_txt="negatives"`` only the image rows need one (the ranks agree on it:
    :func:`_check_agreement` ran first).
    """
    given = [entry["ids"] for entry in everyone]
    if not all(given) and any(given):
        shown = _by_rank(["given" if g else "None" for g in given])
        msg = f"`img_ids` and `txt_ids` must be passed on every rank or on none, got {shown}"
        raise ValueError(msg)
    if not any(given) or not needs_positives:
        return
    check_positives(
        [entry["img_ids"] for entry in everyone],
        [entry["txt_ids"] for entry in everyone],
        unmatched_txt=unmatched_txt,
    )


def _same(a: object, b: object) -> bool:
    # `scale` and `bias` are finite here (prepare refuses NaN and inf on the rank that has
    # them, and the handshake then raises on every rank), so plain equality is agreement.
    return a == b


def setup(
    img: Any,
    txt: Any,
    scale: object,
    bias: object,
    *,
    block_size: object,
    comm: Communicator | None,
    strategy: object,
    loss: str,
    grad: bool,
    img_ids: object = None,
    txt_ids: object = None,
    precision: object = None,
    needs_positives: bool = True,
    unmatched_txt: object = "error",
) -> tuple[Problem, Ring | None]:
    """Validate a call; with a communicator, agree with the other ranks before any exchange.

    Every rank validates its own arguments, then all ranks swap a summary (one
    ``allgather_object``). If any rank's arguments are invalid, or the ranks disagree on
    the loss, whether gradients are wanted, the strategy, d, dtype, precision, scale or bias,
    ``unmatched_txt``, or whether ids are passed, every rank raises the same error, naming
    the rank and the parameter, so no rank is left waiting in an exchange. With ids, the
    ranks swap them too, so that a row without a positive anywhere in the global batch is
    refused everywhere where the loss needs one (``needs_positives``: the softmax loss; only
    the image rows with ``unmatched_txt="negatives"``), and every rank's ids are mapped to
    one dtype, int32 on every rank whatever integer dtypes the ranks passed
    (:func:`_common_ids`), before any of them travels.

    Returns
    -------
    problem : Problem
        This rank's validated inputs.
    ring : Ring or None
        None for ``comm=None``.
    """
    options: dict[str, Any] = {
        "block_size": block_size,
        "strategy": strategy,
        "loss": loss,
        "img_ids": img_ids,
        "txt_ids": txt_ids,
        "precision": precision,
        "needs_positives": needs_positives,
        "unmatched_txt": unmatched_txt,
    }
    if comm is None:
        return prepare(img, txt, scale, bias, **options), None
    checked = check_communicator(comm)
    traced = spmd(checked)
    problem: Problem | None = None
    local_error: BaseException | None = None
    try:
        problem = prepare(img, txt, scale, bias, check_ids=False, **options)
        summary = _summary(problem, loss=loss, grad=grad, strategy=strategy, traced=traced)
    except (TypeError, ValueError) as error:
        summary = {"error": (type(error).__name__, str(error))}
        local_error = error
    everyone = checked.allgather_object(summary)
    _raise_any_error(everyone, local_error)
    _check_agreement(everyone)
    assert problem is not None
    if not traced:
        _check_global_ids(
            everyone, needs_positives=needs_positives, unmatched_txt=problem.unmatched_txt
        )
        if problem.labelled:
            problem = _common_ids(problem, everyone, checked.rank)
    sizes = tuple(int(entry["k"]) for entry in everyone)
    img_sizes = tuple(int(entry["n"]) for entry in everyone)
    return problem, Ring(checked, sizes, str(strategy), img_sizes)


def raise_everywhere(comm: Communicator | None, error: TypeError | ValueError) -> None:
    """Raise ``error``, found on this rank before the call reached :func:`setup`, on every rank.

    For a bridge that refuses an argument before handing it to the core (the jax bridge's
    ids that jax would truncate): the other ranks are in :func:`setup`'s handshake, so this
    rank takes its place in that ``allgather_object`` with the error, and every rank raises
    it, naming this rank, as for an argument the core refuses. Without ``comm`` (or under an
    SPMD communicator, one program) it is raised here alone.
    """
    if comm is None or spmd(comm):
        raise error
    everyone = check_communicator(comm).allgather_object(
        {"error": (type(error).__name__, str(error))}
    )
    _raise_any_error(everyone, error)
    raise error  # pragma: no cover - _raise_any_error raises: this rank's entry is an error


def _summary(
    problem: Problem, *, loss: str, grad: bool, strategy: object, traced: bool
) -> dict[str, Any]:
    """Return what this rank tells the others of its call: every field the ranks must agree on."""
    summary: dict[str, Any] = {
        "error": None,
        "loss": loss,
        "gradients": grad,
        "strategy": strategy,
        "precision": problem.precision,
        "d": problem.d,
        "dtype": str(problem.input_dtype),
        "n": problem.n,
        "k": problem.k,
        "scale": None if traced else _scalar_value(problem.scale),
        "bias": None if traced else _scalar_value(problem.bias),
        "ids": problem.labelled,
        "unmatched_txt": problem.unmatched_txt,
    }
    if problem.labelled and not traced:
        summary["img_ids"] = _ids_values(problem.img_ids)
        summary["txt_ids"] = _ids_values(problem.txt_ids)
    return summary


def _raise_any_error(everyone: Sequence[dict[str, Any]], local_error: BaseException | None) -> None:
    """Raise, on every rank, the first invalid rank's error, naming it (and the other ones)."""
    failed = [rank for rank, entry in enumerate(everyone) if entry["error"] is not None]
    if not failed:
        return
    first = failed[0]
    kind, message = everyone[first]["error"]
    if len(failed) == len(everyone) and all(everyone[r]["error"][1] == message for r in failed):
        text = f"{message} (on every rank)"
    else:
        listed = ", ".join(map(str, failed))
        text = f"rank {first}: {message}" + (
            f" (ranks {listed} are invalid)" if len(failed) > 1 else ""
        )
    raise (TypeError if kind == "TypeError" else ValueError)(text) from local_error


#: How an agreement error names each summary field that differs between ranks.
_AGREED = {
    "loss": "`loss`",
    "gradients": "whether gradients are computed (the loss alone or with them)",
    "strategy": "`strategy`",
    "d": "the feature dimension d",
    "dtype": "the dtype of `img` and `txt`",
    "precision": "`precision`",
    "scale": "`scale`",
    "bias": "`bias`",
    "unmatched_txt": "`unmatched_txt`",
}


def _check_agreement(everyone: Sequence[dict[str, Any]]) -> None:
    """Every field of :data:`_AGREED` is the same on every rank, else a named error."""
    for name, label in _AGREED.items():
        values = [entry[name] for entry in everyone]
        if not all(_same(value, values[0]) for value in values):
            msg = f"{label} must be the same on every rank, got {_by_rank(values)}"
            raise (TypeError if name == "dtype" else ValueError)(msg)


def global_sums(ring: Ring, xp: Namespace, values: Sequence[Array]) -> list[Array]:
    """Sum 0-d arrays over ranks, in rank order, so every rank gets the same bits."""
    if ring.comm.size == 1 and not spmd(ring.comm):
        return list(values)
    stacked = xp.stack(list(values))  # k x () -> (k,)
    # One program: its allreduce gives every rank the same bits, and tells shard_map so
    # (even on one device, where the sum is the value itself).
    if spmd(ring.comm):
        total = ring.comm.allreduce(stacked)
        return [total[i] for i in range(len(values))]
    parts = ring.comm.allgather(stacked)
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return [total[i] for i in range(len(values))]


def _merge_fn(xp: Namespace, merge: str) -> Callable[[Array, Array], Array]:
    if merge == "sum":
        return lambda a, b: a + b
    if merge == "lse":  # (k, 2) log-sum-exp pairs (M, s)
        return lambda a, b: merge_lse_pairs(xp, a, b)
    msg = f"unknown merge {merge!r}"
    raise ValueError(msg)


def circulate(
    ring: Ring,
    xp: Namespace,
    static: tuple[Array, ...],
    visit: Visit,
    *,
    acc_tails: tuple[tuple[int, ...], ...],
    merge: str,
) -> tuple[Array, ...]:
    """Show every rank's block to every rank; return this rank's merged accumulators.

    Parameters
    ----------
    ring : Ring
        Communicator, rows per rank and strategy.
    xp : namespace
        Array namespace of the arrays.
    static : tuple of arrays
        This rank's block: arrays whose leading dimension is this rank's row count.
    visit : callable
        ``visit(home, block) -> contributions``: called once for every rank's block (this
        rank's own included, ``home`` true for it); returns one array per accumulator, with
        the block's leading dimension and trailing shape ``acc_tails[i]``.
    acc_tails : tuple of shapes
        Trailing shape of each accumulator (empty: nothing travels back).
    merge : {"sum", "lse"}
        How contributions to an accumulator combine: added, or merged as (k, 2) log-sum-exp
        pairs ``(M, s)`` by :func:`portable_siglip._softmax.merge_lse_pairs`.

    Returns
    -------
    tuple of arrays
        This rank's accumulators, merged over every rank's contribution.
    """
    if ring.comm.size == 1:  # every schedule degenerates to the one block at home
        return visit(True, static)
    schedule = _SCHEDULES.get(ring.strategy)
    if schedule is None:
        msg = f"unknown schedule {ring.strategy!r}; the schedules are {', '.join(_SCHEDULES)}"
        raise ValueError(msg)
    return schedule(_Pass(ring, xp, static, visit, acc_tails, merge, _merge_fn(xp, merge)))


@dataclass(frozen=True)
class _Pass:
    """One call of :func:`circulate`, as every schedule receives it."""

    ring: Ring
    xp: Namespace
    static: tuple[Array, ...]
    visit: Visit
    acc_tails: tuple[tuple[int, ...], ...]
    merge: str
    combine: Callable[[Array, Array], Array]


def _bidir(p: _Pass) -> tuple[Array, ...]:
    """``bidir``: ceil((W-1)/2) hops to the right and floor((W-1)/2) to the left."""
    size = p.ring.comm.size
    return _chains(p, size // 2, (size - 1) // 2)


def _one_way(p: _Pass) -> tuple[Array, ...]:
    """``shift`` and ``ring``: W-1 hops one way round, then one hop home."""
    return _chains(p, p.ring.comm.size - 1, 0)


def _block_shapes(arrays: Sequence[Array], rows: int) -> list[tuple[int, ...]]:
    """Shapes of another rank's block of ``rows`` rows, laid out like ``arrays``."""
    return [(rows, *tuple(a.shape[1:])) for a in arrays]


def _acc_shapes(tails: Sequence[tuple[int, ...]], rows: int) -> list[tuple[int, ...]]:
    """Shapes of the accumulators of a block of ``rows`` rows."""
    return [(rows, *tail) for tail in tails]


def _rows_of(ring: Ring, offset: int) -> int:
    """Text rows of the rank ``offset`` places away (all equal under an SPMD communicator)."""
    if spmd(ring.comm):
        return ring.sizes[0]
    return ring.sizes[(ring.comm.rank + offset) % ring.comm.size]


def _post(
    comm: Communicator,
    arrays: Sequence[Array],
    offset: int,
    shapes: Sequence[tuple[int, ...]],
    chain: int,
    kind: int,
) -> list[Request]:
    """Send ``arrays`` to the rank ``offset`` places on; receive from ``offset`` places back.

    Every exchange of the chain schedules is such a shift, the same on every rank: an SPMD
    communicator performs it as one collective permutation (``ishift``).
    """
    if spmd(comm):
        return [comm.ishift(array, offset) for array in arrays]  # type: ignore[attr-defined]
    dest, source = (comm.rank + offset) % comm.size, (comm.rank - offset) % comm.size
    return [
        comm.isendrecv(array, dest, source, shape, tag=_tag(chain, kind, field))
        for field, (array, shape) in enumerate(zip(arrays, shapes, strict=True))
    ]


def _wait(requests: list[Request]) -> tuple[Array, ...]:
    return tuple(request.wait() for request in requests)


def _chains(p: _Pass, right: int, left: int) -> tuple[Array, ...]:
    """Blocks travel ``right`` hops rightwards and ``left`` hops leftwards; then home."""
    ring, static, visit, acc_tails, combine = p.ring, p.static, p.visit, p.acc_tails, p.combine
    comm = ring.comm
    # (step sign, hops, chain id): at step s of a chain, rank r holds block r - sign * s.
    chains = [(sign, hops, chain) for chain, (sign, hops) in enumerate(((1, right), (-1, left)))]
    chains = [c for c in chains if c[1] > 0]
    incoming: dict[int, list[Request]] = {}
    travelling: dict[int, list[Request]] = {}
    returning: dict[int, list[Request]] = {}
    for sign, _, chain in chains:  # the first hop is posted before the home tiles run
        incoming[chain] = _post(
            comm,
            static,
            sign,
            _block_shapes(static, _rows_of(ring, -sign)),
            chain,
            _STATIC,
        )
    result = visit(True, static)
    for step in range(1, max((hops for _, hops, _ in chains), default=0) + 1):
        active = [c for c in chains if c[1] >= step]
        held: dict[int, tuple[Array, ...]] = {}
        for sign, hops, chain in active:
            held[chain] = _wait(incoming.pop(chain))
            if step < hops:  # forward it now, so the transfer overlaps this step's tiles
                incoming[chain] = _post(
                    comm,
                    held[chain],
                    sign,
                    _block_shapes(held[chain], _rows_of(ring, -sign * (step + 1))),
                    chain,
                    _STATIC,
                )
        for sign, hops, chain in active:
            # The block held at step >= 1 is rank - sign * step's, never this rank's own.
            contribution = visit(False, held.pop(chain))
            if not acc_tails:
                continue
            if step == 1:
                acc = contribution
            else:
                arrived = _wait(travelling.pop(chain))
                acc = tuple(combine(a, c) for a, c in zip(arrived, contribution, strict=True))
            if step < hops:  # pass it on with the block; take the next block's from behind
                travelling[chain] = _post(
                    comm,
                    acc,
                    sign,
                    _acc_shapes(acc_tails, _rows_of(ring, -sign * (step + 1))),
                    chain,
                    _ACC,
                )
            else:  # end of the chain: straight home (the owner, sign * hops places back);
                # ours arrives from our chain's end
                returning[chain] = _post(
                    comm,
                    acc,
                    -sign * hops,
                    _acc_shapes(acc_tails, _rows_of(ring, 0)),
                    chain,
                    _HOME,
                )
    for chain in sorted(returning):
        arrived = _wait(returning[chain])
        result = tuple(combine(a, c) for a, c in zip(result, arrived, strict=True))
    return result


def _by_broadcast(p: _Pass) -> tuple[Array, ...]:
    """``reduce``: rank by rank, broadcast its block and reduce its accumulators."""
    xp, static, visit, merge, combine = p.xp, p.static, p.visit, p.merge, p.combine
    comm, sizes = p.ring.comm, p.ring.sizes
    device = array_api_compat.device(static[0])
    mine: tuple[Array, ...] = ()
    for owner in range(comm.size):
        home: Any
        if spmd(comm):  # one program: every rank offers its block, the root's is kept
            home = comm.rank == owner
            block = tuple(comm.bcast(array, root=owner) for array in static)
        elif owner == comm.rank:
            home = True
            for array in static:
                comm.bcast(array, root=owner)
            block = static
        else:
            home = False
            block = tuple(
                comm.bcast(xp.empty(shape, dtype=a.dtype, device=device), root=owner)
                for a, shape in zip(static, _block_shapes(static, sizes[owner]), strict=True)
            )
        contribution = visit(home, block)
        reduced = tuple(_reduce(comm, c, merge, combine) for c in contribution)
        if spmd(comm):
            mine = (
                reduced
                if not mine
                else tuple(xp.where(home, r, m) for r, m in zip(reduced, mine, strict=True))
            )
        elif home:
            mine = reduced
    return mine


def _reduce(
    comm: Communicator, contribution: Array, merge: str, combine: Callable[[Array, Array], Array]
) -> Array:
    if merge == "sum":
        return comm.allreduce(contribution)
    parts = comm.allgather(contribution)  # (M, s) pairs: no allreduce for their merge
    total = parts[0]
    for part in parts[1:]:
        total = combine(total, part)
    return total


def _by_gather(p: _Pass) -> tuple[Array, ...]:
    """``gather``: every block at once; the accumulators of all blocks reduced together."""
    ring, xp, static, visit, acc_tails = p.ring, p.xp, p.static, p.visit, p.acc_tails
    merge, combine = p.merge, p.combine
    comm = ring.comm
    gathered = [comm.allgather(array) for array in static]  # field -> rank -> block
    contributions = [
        visit(comm.rank == owner, tuple(field[owner] for field in gathered))
        for owner in range(comm.size)
    ]
    del gathered
    mine = []
    for field in range(len(acc_tails)):
        stacked = xp.concat([c[field] for c in contributions], axis=0)  # W x (n_r, ...) -> (N, ...)
        total = _reduce(comm, stacked, merge, combine)
        if spmd(comm):  # equal shards: this rank's rows by a (traced) index
            rows = ring.sizes[0]
            mine.append(xp.reshape(total, (comm.size, rows, *acc_tails[field]))[comm.rank])
        else:
            start = ring.offset
            mine.append(total[start : start + ring.sizes[comm.rank], ...])
    return tuple(mine)


#: The schedules by name: what a loss's ``schedules`` (:mod:`._registry`) may list.
_SCHEDULES: dict[str, Callable[[_Pass], tuple[Array, ...]]] = {
    "bidir": _bidir,
    "shift": _one_way,
    "ring": _one_way,
    "reduce": _by_broadcast,
    "gather": _by_gather,
}
#: The names of every schedule :func:`circulate` runs.
SCHEDULES = tuple(_SCHEDULES)
