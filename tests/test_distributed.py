"""Distributed losses on the in-process thread group: W = 1..5, every strategy, uneven shards.

Each rank gets a shard of one global batch; every rank must return the one-process loss
of the whole batch (the same bits on every rank) and the one-process gradients of its own
rows. Shard sizes are uneven on purpose, and the block sizes do not divide them.
"""

from __future__ import annotations

import math
import time
from itertools import accumulate
from typing import Any

import array_api_compat
import numpy as np
import pytest
from helpers import (
    LOSS,
    LOSS_AND_GRAD,
    SCHEDULE_IDS,
    SCHEDULES,
    assert_close,
    dtype_of,
    on_backend,
    pairs,
    to_numpy,
)

import portable_siglip as ps
from portable_siglip import _losses
from portable_siglip.comm import (
    Communicator,
    RankFailedError,
    SelfComm,
    ThreadComm,
    ThreadGroup,
    check_communicator,
)

#: Uneven shards of 13 rows for each world size (a rank of a single row included).
SHARDS = {1: [13], 2: [9, 4], 3: [1, 7, 5], 4: [3, 1, 6, 3], 5: [2, 4, 1, 5, 1]}
SCALE, BIAS = 7.0, -3.0


def bounds(sizes: list[int]) -> list[int]:
    return [0, *accumulate(sizes)]


def sharded(
    xp: Any,
    function: Any,
    sizes: list[int],
    img: Any,
    txt: Any,
    *args: Any,
    **kwargs: Any,
) -> list[Any]:
    """Call ``function`` on every rank of a thread group with that rank's rows."""
    edges = bounds(sizes)

    def rank_call(comm: ThreadComm) -> Any:
        rows = slice(edges[comm.rank], edges[comm.rank + 1])
        return function(img[rows, :], txt[rows, :], *args, comm=comm, **kwargs)

    return ThreadGroup(len(sizes), timeout=60.0).run(rank_call)


def concat(parts: list[Any]) -> np.ndarray:
    return np.concatenate([to_numpy(part) for part in parts], axis=0)


@pytest.mark.parametrize("block_size", [2, None])
@pytest.mark.parametrize("world", sorted(SHARDS))
@pytest.mark.parametrize(("loss", "strategy"), SCHEDULES, ids=SCHEDULE_IDS)
def test_matches_one_process(
    xp: Any, loss: str, strategy: str, world: int, block_size: int | None
) -> None:
    img_np, txt_np = pairs(np.random.default_rng(world), 13, 4)
    img, _ = on_backend(xp, img_np, "float64")
    txt, _ = on_backend(xp, txt_np, "float64")
    function = LOSS_AND_GRAD[loss]
    want_loss, want = function(img, txt, SCALE, BIAS, block_size=block_size)
    results = sharded(
        xp, function, SHARDS[world], img, txt, SCALE, BIAS, strategy=strategy, block_size=block_size
    )
    losses = [to_numpy(result[0]) for result in results]
    for rank, got in enumerate(losses):
        assert got == losses[0], f"rank {rank} returned a different loss: {got} != {losses[0]}"
    assert_close(results[0][0], to_numpy(want_loss), 1e-12, "loss")
    assert_close(concat([r[1].img for r in results]), to_numpy(want.img), 1e-12, "grads.img")
    assert_close(concat([r[1].txt for r in results]), to_numpy(want.txt), 1e-12, "grads.txt")
    for rank, (_, grads) in enumerate(results):
        assert_close(grads.scale, to_numpy(want.scale), 1e-12, f"grads.scale on rank {rank}")
        assert_close(grads.bias, to_numpy(want.bias), 1e-12, f"grads.bias on rank {rank}")
        for name, value in zip(grads._fields, grads, strict=True):
            assert array_api_compat.array_namespace(value) is array_api_compat.array_namespace(
                img
            ), name
            assert value.dtype == dtype_of(xp, "float64"), name
        assert tuple(grads.img.shape) == (SHARDS[world][rank], 4)


@pytest.mark.parametrize("world", sorted(SHARDS))
@pytest.mark.parametrize(("loss", "strategy"), SCHEDULES, ids=SCHEDULE_IDS)
def test_loss_alone_matches_one_process(xp: Any, loss: str, strategy: str, world: int) -> None:
    img_np, txt_np = pairs(np.random.default_rng(10 + world), 13, 5)
    img, _ = on_backend(xp, img_np, "float64")
    txt, _ = on_backend(xp, txt_np, "float64")
    want = LOSS[loss](img, txt, SCALE, BIAS, block_size=3)
    results = sharded(
        xp, LOSS[loss], SHARDS[world], img, txt, SCALE, BIAS, strategy=strategy, block_size=3
    )
    for rank, got in enumerate(results):
        assert tuple(got.shape) == ()
        assert_close(got, to_numpy(want), 1e-12, f"loss on rank {rank}")


@pytest.mark.parametrize(("loss", "strategy"), SCHEDULES, ids=SCHEDULE_IDS)
def test_float32_and_array_scale_bias(xp: Any, loss: str, strategy: str) -> None:
    img_np, txt_np = pairs(np.random.default_rng(3), 11, 6)
    img, _ = on_backend(xp, img_np, "float32")
    txt, _ = on_backend(xp, txt_np, "float32")
    scale = xp.asarray(12.0, dtype=dtype_of(xp, "float64"))
    bias = xp.asarray(-4.0, dtype=dtype_of(xp, "float32"))
    want_loss, want = LOSS_AND_GRAD[loss](img, txt, scale, bias, block_size=2)
    results = sharded(
        xp, LOSS_AND_GRAD[loss], [4, 2, 5], img, txt, scale, bias, strategy=strategy, block_size=2
    )
    assert_close(results[1][0], to_numpy(want_loss), 1e-5, "loss")
    assert_close(concat([r[1].img for r in results]), to_numpy(want.img), 1e-5, "grads.img")
    assert_close(concat([r[1].txt for r in results]), to_numpy(want.txt), 1e-5, "grads.txt")
    grads = results[2][1]
    assert_close(grads.scale, to_numpy(want.scale), 1e-5, "grads.scale")
    assert grads.img.dtype == dtype_of(xp, "float32")
    assert grads.scale.dtype == dtype_of(xp, "float64")
    assert grads.bias.dtype == dtype_of(xp, "float32")


def test_self_comm_equals_no_comm(xp: Any, loss_name: str) -> None:
    img_np, txt_np = pairs(np.random.default_rng(4), 9, 3)
    img, _ = on_backend(xp, img_np, "float64")
    txt, _ = on_backend(xp, txt_np, "float64")
    want_loss, want = LOSS_AND_GRAD[loss_name](img, txt, SCALE, BIAS, block_size=4)
    got_loss, got = LOSS_AND_GRAD[loss_name](
        img, txt, SCALE, BIAS, block_size=4, comm=SelfComm(), strategy="gather"
    )
    assert_close(got_loss, to_numpy(want_loss), 1e-14, "loss")
    for name in got._fields:
        assert_close(getattr(got, name), to_numpy(getattr(want, name)), 1e-14, f"grads.{name}")


# --- bytes on the wire: the costs docs/distributed.md states, for W = 4 equal shards ---


def expected_bytes(loss: str, strategy: str, world: int, n: int, d: int, item: int) -> int:
    """Payload each rank hands to the transport, from the schedule's definition."""
    block, vector = n * d * item, n * item
    if loss == "sigmoid":
        scalars = 3 * item  # loss, scale and bias sums, allgathered once
        if strategy in ("bidir", "shift"):
            return (world - 1) * (block + block) + scalars  # text out, accumulator back
        if strategy == "reduce":
            return block + world * block + scalars  # broadcast own, allreduce every block's
        return block + world * block + scalars  # gather: allgather own, allreduce all (N d)
    scalars = 2 * item  # loss and scale sums
    pair = 2 * vector  # a column log-sum-exp as (M, s): two numbers per row
    if strategy == "ring":
        first = (world - 1) * (block + pair)  # text out, column lse pairs
        second = (world - 1) * (block + pair + block)  # text + column lse out, dL/dtxt
        return first + second + scalars
    first = block + world * pair  # allgather text and all column partials (N x 2)
    second = block + pair + world * block
    return first + second + scalars


@pytest.mark.parametrize(("loss", "strategy"), SCHEDULES, ids=SCHEDULE_IDS)
def test_bytes_sent_per_rank(loss: str, strategy: str) -> None:
    world, n, d = 4, 5, 3
    rng = np.random.default_rng(5)
    img, txt = pairs(rng, world * n, d)
    edges = bounds([n] * world)

    def rank_call(comm: ThreadComm) -> int:
        rows = slice(edges[comm.rank], edges[comm.rank + 1])
        LOSS_AND_GRAD[loss](img[rows], txt[rows], SCALE, BIAS, comm=comm, strategy=strategy)
        return comm.bytes_sent

    sent = ThreadGroup(world).run(rank_call)
    assert sent == [expected_bytes(loss, strategy, world, n, d, 8)] * world


# --- overlap: the next block is on its way before the current one is computed ---


class Recorder:
    """A communicator wrapper that logs every posted exchange."""

    def __init__(self, comm: ThreadComm, log: list[str]) -> None:
        self._comm = comm
        self._log = log
        self.rank, self.size = comm.rank, comm.size

    def __getattr__(self, name: str) -> Any:
        return getattr(self._comm, name)

    def isendrecv(self, send: Any, dest: int, source: int, shape: Any, *, tag: int = 0) -> Any:
        self._log.append(f"post tag={tag}")
        return self._comm.isendrecv(send, dest, source, shape, tag=tag)


@pytest.mark.parametrize("strategy", ["shift", "bidir"])
def test_next_exchange_is_posted_before_the_tiles(
    monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    world = 5
    logs: list[list[str]] = [[] for _ in range(world)]
    original = _losses.sigmoid_sums

    def logged(*args: Any, **kwargs: Any) -> Any:
        rank = int(threading_rank())
        logs[rank].append("tiles")
        return original(*args, **kwargs)

    monkeypatch.setattr(_losses, "sigmoid_sums", logged)
    img, txt = pairs(np.random.default_rng(6), 10, 3)

    def rank_call(comm: ThreadComm) -> None:
        rows = slice(2 * comm.rank, 2 * comm.rank + 2)
        recorder = Recorder(comm, logs[comm.rank])
        ps.sigmoid_loss_and_grad(
            img[rows], txt[rows], SCALE, BIAS, comm=recorder, strategy=strategy
        )

    ThreadGroup(world).run(rank_call)
    static_tags = {0, 3 * 8}  # field 0 of the static blocks of the right and left chains
    for rank, log in enumerate(logs):
        tiles = [i for i, event in enumerate(log) if event == "tiles"]
        assert len(tiles) == world, f"rank {rank} computed {len(tiles)} blocks: {log}"
        posts = [
            i
            for i, event in enumerate(log)
            if event.startswith("post") and int(event.split("=")[1]) in static_tags
        ]
        assert len(posts) == world - 1, f"rank {rank}: {log}"
        # Every block but the first is received through a post made before an earlier
        # block's tiles were computed, so the transfer can overlap the arithmetic.
        for k, post in enumerate(posts):
            assert post < tiles[k], f"rank {rank}: block {k + 1} was posted after tiles {k}: {log}"


def threading_rank() -> str:
    import threading

    return threading.current_thread().name.rsplit("-", 1)[1]


# --- agreement: a disagreement or an invalid shard raises the same error on every rank ---


def errors_on_every_rank(world: int, call: Any) -> list[BaseException]:
    """Run ``call(comm)`` on every rank; return the exception each rank raised."""

    def rank_call(comm: ThreadComm) -> BaseException:
        try:
            call(comm)
        except (TypeError, ValueError) as error:
            return error
        raise AssertionError(f"rank {comm.rank} raised nothing")

    return ThreadGroup(world, timeout=30.0).run(rank_call)


def features(xp: Any, n: int = 3, d: int = 4, dtype: str = "float64") -> Any:
    values = np.arange(n * d, dtype=np.float64).reshape(n, d) / (n * d)
    return xp.asarray(values, dtype=dtype_of(xp, dtype))


MISMATCHES = {
    "d": (
        lambda xp, r: dict(img=features(xp, d=4 + r), txt=features(xp, d=4 + r)),
        ValueError,
        r"the feature dimension d must be the same on every rank, got rank 0: 4, rank 1: 5",
    ),
    "dtype": (
        lambda xp, r: dict(
            img=features(xp, dtype="float32" if r == 2 else "float64"),
            txt=features(xp, dtype="float32" if r == 2 else "float64"),
        ),
        TypeError,
        r"the dtype of `img` and `txt` must be the same on every rank.*rank 2: '.*float32'",
    ),
    "strategy": (
        lambda xp, r: dict(strategy="gather" if r == 1 else "bidir"),
        ValueError,
        r"`strategy` must be the same on every rank, got rank 0: 'bidir', rank 1: 'gather'",
    ),
    "scale": (
        lambda xp, r: dict(scale=10.0 + r),
        ValueError,
        r"`scale` must be the same on every rank, got rank 0: 10.0, rank 1: 11.0",
    ),
    "bias": (
        lambda xp, r: dict(bias=xp.asarray(-1.0 * r, dtype=dtype_of(xp, "float64"))),
        ValueError,
        r"`bias` must be the same on every rank, got rank 0: -0.0, rank 1: -1.0",
    ),
    "NaN scale array on one rank": (
        lambda xp, r: dict(scale=xp.asarray(math.nan if r == 1 else 10.0)),
        ValueError,
        r"^rank 1: `scale` must be finite, got nan \(a 0-d \w+ array\)$",
    ),
    "infinite bias array everywhere": (
        lambda xp, r: dict(bias=xp.asarray(math.inf, dtype=dtype_of(xp, "float64"))),
        ValueError,
        r"`bias` must be finite, got inf \(a 0-d \w+ array\) \(on every rank\)",
    ),
    "log-scale array on every rank": (
        lambda xp, r: dict(scale=xp.asarray(-2.3, dtype=dtype_of(xp, "float64"))),
        ValueError,
        r"`scale` must be the positive multiplier.*got -2.3 \(a 0-d \w+ array\).*exp\(t'\)",
    ),
    "invalid shard": (
        lambda xp, r: dict(img=features(xp, n=0), txt=features(xp, n=0)) if r == 1 else {},
        ValueError,
        r"^rank 1: `img` and `txt` must hold at least one pair",
    ),
    "invalid everywhere": (
        lambda xp, r: dict(block_size=0),
        ValueError,
        r"`block_size` must be a positive int or None, got 0 \(on every rank\)",
    ),
    "wrong type on two ranks": (
        lambda xp, r: dict(scale="10") if r in (1, 2) else {},
        TypeError,
        r"^rank 1: `scale` must be a Python float or a 0-d array.*\(ranks 1, 2 are invalid\)",
    ),
}


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_disagreement_raises_the_same_error_everywhere(xp: Any, case: str) -> None:
    overrides, kind, pattern = MISMATCHES[case]

    def call(comm: ThreadComm) -> None:
        kwargs: dict[str, Any] = dict(
            img=features(xp), txt=features(xp), scale=10.0, bias=0.0, strategy="bidir"
        )
        kwargs.update(overrides(xp, comm.rank))
        ps.sigmoid_loss_and_grad(
            kwargs.pop("img"),
            kwargs.pop("txt"),
            kwargs.pop("scale"),
            kwargs.pop("bias"),
            comm=comm,
            **kwargs,
        )

    errors = errors_on_every_rank(3, call)
    for rank, error in enumerate(errors):
        assert type(error) is kind, f"rank {rank}: {error!r}"
        assert str(error) == str(errors[0]), f"rank {rank} says something else: {error}"
    with pytest.raises(kind, match=pattern):
        raise errors[0]


def test_loss_mismatch_raises_everywhere(xp: Any) -> None:
    def call(comm: ThreadComm) -> None:
        function = ps.sigmoid_loss if comm.rank == 0 else ps.softmax_loss
        function(features(xp), features(xp), 10.0, 0.0, comm=comm, strategy="gather")

    errors = errors_on_every_rank(2, call)
    for error in errors:
        assert isinstance(error, ValueError)
        assert (
            "`loss` must be the same on every rank, got rank 0: 'sigmoid', rank 1: 'softmax'"
            in str(error)
        )


# --- failures: a rank that raises or disappears does not leave the others waiting ---


class FailingComm(Recorder):
    """Raises on its third exchange, as a rank that crashes mid-ring would."""

    def isendrecv(self, send: Any, dest: int, source: int, shape: Any, *, tag: int = 0) -> Any:
        if len(self._log) == 2:
            raise RuntimeError(f"injected failure on rank {self.rank}")
        return super().isendrecv(send, dest, source, shape, tag=tag)


@pytest.mark.parametrize(("loss", "strategy"), [("sigmoid", "shift"), ("softmax", "ring")])
def test_a_raising_rank_releases_the_others(loss: str, strategy: str) -> None:
    img, txt = pairs(np.random.default_rng(7), 12, 3)
    seen: dict[int, BaseException] = {}

    def rank_call(comm: ThreadComm) -> None:
        rows = slice(3 * comm.rank, 3 * comm.rank + 3)
        wrapped = FailingComm(comm, []) if comm.rank == 1 else comm
        try:
            LOSS_AND_GRAD[loss](img[rows], txt[rows], SCALE, BIAS, comm=wrapped, strategy=strategy)
        except BaseException as error:
            seen[comm.rank] = error
            raise

    start = time.monotonic()
    with pytest.raises(RuntimeError, match="injected failure on rank 1"):
        ThreadGroup(4, timeout=60.0).run(rank_call)
    assert time.monotonic() - start < 20.0, "the other ranks waited for their timeout"
    assert sorted(seen) == [0, 1, 2, 3]
    for rank in (0, 2, 3):
        assert isinstance(seen[rank], RankFailedError), f"rank {rank}: {seen[rank]!r}"
        assert "rank 1 failed" in str(seen[rank])


def test_a_vanished_rank_times_out_instead_of_hanging() -> None:
    img, txt = pairs(np.random.default_rng(8), 6, 3)

    def rank_call(comm: ThreadComm) -> Any:
        if comm.rank == 2:
            return None  # leaves without a word, as a killed process would
        rows = slice(2 * comm.rank, 2 * comm.rank + 2)
        return ps.sigmoid_loss(img[rows], txt[rows], SCALE, BIAS, comm=comm)

    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"waited 1 s for the other ranks' allgather_object"):
        ThreadGroup(3, timeout=1.0).run(rank_call)
    assert time.monotonic() - start < 15.0


# --- the communicators themselves ---


def test_thread_group_primitives(xp: Any) -> None:
    def rank_call(comm: ThreadComm) -> dict[str, Any]:
        mine = xp.asarray(
            np.full((comm.rank + 1, 2), float(comm.rank)), dtype=dtype_of(xp, "float64")
        )
        right, left = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
        request = comm.isendrecv(mine, right, left, (left + 1, 2), tag=7)
        return {
            "ring": to_numpy(request.wait()),
            "sum": to_numpy(
                comm.allreduce(xp.asarray([1.0, float(comm.rank)], dtype=dtype_of(xp, "float64")))
            ),
            "gather": [to_numpy(part) for part in comm.allgather(mine)],
            "bcast": to_numpy(
                comm.bcast(
                    mine if comm.rank == 2 else xp.zeros((3, 2), dtype=dtype_of(xp, "float64")),
                    root=2,
                )
            ),
            "objects": comm.allgather_object(f"r{comm.rank}"),
        }

    results = ThreadGroup(3).run(rank_call)
    for rank, result in enumerate(results):
        left = (rank - 1) % 3
        np.testing.assert_array_equal(result["ring"], np.full((left + 1, 2), float(left)))
        np.testing.assert_array_equal(result["sum"], [3.0, 3.0])
        assert [part.shape for part in result["gather"]] == [(1, 2), (2, 2), (3, 2)]
        np.testing.assert_array_equal(result["gather"][1], np.ones((2, 2)))
        np.testing.assert_array_equal(result["bcast"], np.full((3, 2), 2.0))
        assert result["objects"] == ["r0", "r1", "r2"]


def test_thread_group_reports_schedule_mismatches() -> None:
    def wrong_shape(comm: ThreadComm) -> None:
        comm.sendrecv(np.zeros(2), 1 - comm.rank, 1 - comm.rank, (3,))

    with pytest.raises(ValueError, match=r"expected shape \(3,\), received \(2,\)"):
        ThreadGroup(2).run(wrong_shape)

    def different_collectives(comm: ThreadComm) -> None:
        if comm.rank == 0:
            comm.allreduce(np.zeros(1))
        else:
            comm.allgather(np.zeros(1))

    with pytest.raises(RuntimeError, match=r"the ranks called different operations"):
        ThreadGroup(2).run(different_collectives)


def test_communicator_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match=r"`size` must be a positive int, got 0"):
        ThreadGroup(0)
    with pytest.raises(ValueError, match=r"`timeout` must be positive, got -1"):
        ThreadGroup(2, timeout=-1)
    with pytest.raises(ValueError, match=r"`dest` must be 0 on a one-process communicator"):
        SelfComm().sendrecv(np.zeros(1), 1, 0, (1,))
    with pytest.raises(ValueError, match=r"`dest` must be a rank in 0\.\.1, got 2"):
        ThreadGroup(2).run(lambda comm: comm.isendrecv(np.zeros(1), 2, 0, (1,)))
    assert isinstance(SelfComm(), Communicator)
    assert check_communicator(SelfComm()).size == 1


@pytest.mark.parametrize(("loss", "strategy"), SCHEDULES, ids=SCHEDULE_IDS)
def test_one_rank_sends_nothing(loss: str, strategy: str) -> None:
    img, txt = pairs(np.random.default_rng(9), 6, 3)
    comm = SelfComm()
    LOSS_AND_GRAD[loss](img, txt, SCALE, BIAS, comm=comm, strategy=strategy)
    assert comm.bytes_sent == 0
    assert ThreadGroup(1).run(
        lambda c: (LOSS[loss](img, txt, SCALE, BIAS, comm=c, strategy=strategy), c.bytes_sent)[1]
    ) == [0]


def test_gradient_mismatch_raises_everywhere(xp: Any) -> None:
    # e.g. one rank of a torch job under no_grad: the loss alone there, with gradients elsewhere
    def call(comm: ThreadComm) -> None:
        function = ps.softmax_loss if comm.rank == 1 else ps.softmax_loss_and_grad
        function(features(xp), features(xp), 10.0, 0.0, comm=comm)

    errors = errors_on_every_rank(3, call)
    for error in errors:
        assert isinstance(error, ValueError)
        assert (
            "whether gradients are computed (the loss alone or with them) must be the same on "
            "every rank, got rank 0: True, rank 1: False, rank 2: True"
        ) in str(error)


def test_torch_scale_that_requires_grad_warns_nowhere() -> None:
    """``ps.sigmoid_loss(img, txt, logit_scale.exp(), b)`` under ``comm``: no autograd warning.

    Every rank reads the scale's value to agree on it; reading a tensor that requires grad
    with ``float()`` made torch warn (an error under ``-W error``).
    """
    import warnings

    torch = pytest.importorskip("torch")
    img = torch.eye(4, dtype=torch.float64)
    logit_scale = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    want = ps.sigmoid_loss(img, img, logit_scale.exp().detach(), bias.detach())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        alone = ps.sigmoid_loss(img, img, logit_scale.exp(), bias)
        shards = [slice(0, 1), slice(1, 4)]
        ranks = ThreadGroup(2).run(
            lambda comm: ps.sigmoid_loss(
                img[shards[comm.rank]], img[shards[comm.rank]], logit_scale.exp(), bias, comm=comm
            )
        )
    assert math.isclose(float(alone.detach()), float(want), rel_tol=1e-12)
    assert all(math.isclose(float(v.detach()), float(want), rel_tol=1e-12) for v in ranks)
