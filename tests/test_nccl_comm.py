"""NCCLComm against a thread-backed fake of ``cupy.cuda.nccl`` (CPU), and on a real GPU.

The fake (``fake_nccl.py``) runs W ranks as threads on NumPy arrays that stand in for
device arrays; it keeps NCCL's matching, group and collective rules. The tests at the end
(``test_gpu_*``) need CuPy and a GPU and skip without them.
"""

from __future__ import annotations

import json
import os
import sys
import types
from datetime import timedelta
from itertools import accumulate
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fake_nccl import FakeNccl, FakeNcclError, FakeRuntime, run_ranks
from helpers import (
    LOSS,
    LOSS_AND_GRAD,
    SCHEDULE_IDS,
    SCHEDULES,
    assert_close,
    free_port,
    pairs,
    run_captured,
    to_numpy,
)
from portable_siglip.backends.nccl import CupyRuntime, NCCLComm, SharedDeviceError, _nccl_dtype
from test_distributed import BIAS, SCALE, SHARDS, concat, expected_bytes

from portable_siglip.cli import _doctor
from portable_siglip.comm import Communicator, check_communicator

WORLDS = [1, 2, 3, 4]


def on_fake(size: int, fn: Any, **options: Any) -> list[Any]:
    """Run ``fn(comm)`` on ``size`` ranks, each with an NCCLComm over the fake NCCL."""
    nccl = FakeNccl(**options)
    runtime = FakeRuntime(nccl)
    unique_id = nccl.get_unique_id()

    def rank_call(rank: int) -> Any:
        comm = NCCLComm(nccl.NcclCommunicator(size, unique_id, rank), runtime=runtime)
        return fn(comm)

    return run_ranks(size, rank_call, nccl)


# --- the primitives ---


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("direction", [1, -1])
def test_ring_exchange(world: int, direction: int) -> None:
    def call(comm: NCCLComm) -> np.ndarray:
        send = np.arange(6.0).reshape(2, 3) + 100 * comm.rank
        dest, source = (comm.rank + direction) % world, (comm.rank - direction) % world
        return comm.sendrecv(send, dest, source, (2, 3))

    for rank, got in enumerate(on_fake(world, call)):
        source = (rank - direction) % world
        np.testing.assert_array_equal(got, np.arange(6.0).reshape(2, 3) + 100 * source)


def test_several_outstanding_exchanges_match_in_posting_order() -> None:
    world = 3

    def call(comm: NCCLComm) -> list[np.ndarray]:
        right, left = (comm.rank + 1) % world, (comm.rank - 1) % world
        requests = [
            comm.isendrecv(np.full((k + 1,), 10.0 * comm.rank + k), right, left, (k + 1,), tag=k)
            for k in range(4)
        ]
        requests.append(comm.isendrecv(np.array([comm.rank], dtype=np.int64), left, right, (1,)))
        return [request.wait() for request in reversed(requests)]

    for rank, got in enumerate(on_fake(world, call)):
        got = got[::-1]
        left, right = (rank - 1) % world, (rank + 1) % world
        for k in range(4):
            np.testing.assert_array_equal(got[k], np.full((k + 1,), 10.0 * left + k))
        assert got[4].tolist() == [right]
        assert got[4].dtype == np.int64


@pytest.mark.parametrize("world", WORLDS)
def test_collectives(world: int) -> None:
    def call(comm: NCCLComm) -> tuple[Any, ...]:
        rows = comm.rank + 1  # uneven leading dims
        x = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2) + comm.rank
        total = comm.allreduce(np.full((2, 2), comm.rank + 1.0))
        gathered = comm.allgather(x)
        scalars = comm.allgather(np.asarray(float(comm.rank)))
        roots = [
            comm.bcast(np.full(3, 7 * comm.rank, dtype=np.int32), root) for root in range(world)
        ]
        objects = comm.allgather_object({"rank": comm.rank, "pad": "x" * comm.rank * 50})
        return total, gathered, scalars, roots, objects

    for total, gathered, scalars, roots, objects in on_fake(world, call):
        np.testing.assert_array_equal(total, np.full((2, 2), world * (world + 1) / 2))
        for r, part in enumerate(gathered):
            want = np.arange((r + 1) * 2, dtype=np.float32).reshape(r + 1, 2) + r
            np.testing.assert_array_equal(part, want)
            assert part.dtype == np.float32
        assert [float(s) for s in scalars] == [float(r) for r in range(world)]
        assert all(s.shape == () for s in scalars)
        for root, got in enumerate(roots):
            np.testing.assert_array_equal(got, np.full(3, 7 * root, dtype=np.int32))
        assert objects == [{"rank": r, "pad": "x" * r * 50} for r in range(world)]


def test_results_do_not_alias_the_inputs() -> None:
    def call(comm: NCCLComm) -> list[bool]:
        x = np.ones(3)
        outs = [comm.allreduce(x), comm.bcast(x, 0), comm.allgather(x)[comm.rank]]
        return [np.shares_memory(out, x) for out in outs]

    assert on_fake(2, call) == [[False] * 3] * 2


def test_is_a_communicator_and_counts_bytes() -> None:
    def call(comm: NCCLComm) -> int:
        assert isinstance(comm, Communicator)
        check_communicator(comm)
        comm.sendrecv(np.ones((2, 3)), (comm.rank + 1) % 2, (comm.rank + 1) % 2, (2, 3))
        comm.allreduce(np.ones(4, dtype=np.float32))
        comm.allgather(np.ones((comm.rank + 1, 2)))
        comm.bcast(np.ones(5), root=1)
        comm.allgather_object("not counted")
        return comm.bytes_sent

    assert on_fake(2, call) == [48 + 16 + 16, 48 + 16 + 32 + 40]


def test_results_are_synchronised_before_they_are_returned() -> None:
    nccl = FakeNccl()
    runtime = FakeRuntime(nccl)
    comm = NCCLComm(nccl.NcclCommunicator(1, nccl.get_unique_id(), 0), runtime=runtime)
    request = comm.isendrecv(np.ones(2), 0, 0, (2,))
    assert runtime.synchronized == 0  # posted, not waited for
    request.wait()
    assert runtime.synchronized == 1
    request.wait()  # a second wait returns the same array without more work
    assert runtime.synchronized == 1
    for operation, syncs in (
        (lambda: comm.allreduce(np.ones(2)), 1),
        (lambda: comm.bcast(np.ones(2)), 1),
        (lambda: comm.allgather_object(1), 2),  # lengths, then the padded pickles
        (lambda: comm.allgather(np.ones(2)), 3),  # shapes as objects, then the data
    ):
        before = runtime.synchronized
        operation()
        assert runtime.synchronized - before == syncs


@pytest.mark.parametrize(("loss", "strategy"), SCHEDULES, ids=SCHEDULE_IDS)
def test_bytes_sent_per_rank_match_the_schedule(loss: str, strategy: str) -> None:
    world, n, d = 4, 5, 3
    img, txt = pairs(np.random.default_rng(5), world * n, d)

    def call(comm: NCCLComm) -> int:
        rows = slice(n * comm.rank, n * (comm.rank + 1))
        LOSS_AND_GRAD[loss](img[rows], txt[rows], SCALE, BIAS, comm=comm, strategy=strategy)
        return comm.bytes_sent

    assert on_fake(world, call) == [expected_bytes(loss, strategy, world, n, d, 8)] * world


# --- every schedule of both losses against one process ---


def sharded(sizes: list[int], function: Any, img: Any, txt: Any, **kwargs: Any) -> list[Any]:
    edges = [0, *accumulate(sizes)]

    def call(comm: NCCLComm) -> Any:
        rows = slice(edges[comm.rank], edges[comm.rank + 1])
        return function(img[rows, :], txt[rows, :], SCALE, BIAS, comm=comm, **kwargs)

    return on_fake(len(sizes), call)


@pytest.mark.parametrize("block_size", [2, None])
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize(("loss", "strategy"), SCHEDULES, ids=SCHEDULE_IDS)
def test_schedules_match_one_process(
    loss: str, strategy: str, world: int, block_size: int | None
) -> None:
    img, txt = pairs(np.random.default_rng(world), 13, 4)
    function = LOSS_AND_GRAD[loss]
    want_loss, want = function(img, txt, SCALE, BIAS, block_size=block_size)
    results = sharded(SHARDS[world], function, img, txt, strategy=strategy, block_size=block_size)
    for rank, (got_loss, grads) in enumerate(results):
        assert to_numpy(got_loss) == to_numpy(results[0][0]), f"rank {rank} differs"
        assert_close(grads.scale, want.scale, 1e-12, f"grads.scale on rank {rank}")
        assert_close(grads.bias, want.bias, 1e-12, f"grads.bias on rank {rank}")
        assert grads.img.shape == (SHARDS[world][rank], 4)
    assert_close(results[0][0], want_loss, 1e-12, "loss")
    assert_close(concat([r[1].img for r in results]), want.img, 1e-12, "grads.img")
    assert_close(concat([r[1].txt for r in results]), want.txt, 1e-12, "grads.txt")


@pytest.mark.parametrize(("loss", "strategy"), SCHEDULES, ids=SCHEDULE_IDS)
def test_loss_alone_and_float32(loss: str, strategy: str) -> None:
    img, txt = pairs(np.random.default_rng(3), 11, 6)
    img, txt = img.astype(np.float32), txt.astype(np.float32)
    want = LOSS[loss](img, txt, SCALE, BIAS, block_size=3)
    for got in sharded([4, 2, 5], LOSS[loss], img, txt, strategy=strategy, block_size=3):
        assert got.dtype == np.float32
        assert_close(got, to_numpy(want), 1e-5, "loss")


# --- bootstrap over MPI ---


class FakeMPI:
    """The part of an mpi4py communicator that ``from_mpi`` uses, for ranks as threads.

    Each collective call of a rank is matched with the same-numbered call of the others.
    """

    def __init__(self, shared: dict[str, Any], rank: int, size: int) -> None:
        self.shared, self.rank, self.size = shared, rank, size
        self.calls = 0

    def _slot(self) -> dict[Any, Any]:
        self.calls += 1
        slot: dict[Any, Any] = self.shared.setdefault(("call", self.calls), {})
        return slot

    def bcast(self, obj: Any, root: int = 0) -> Any:
        box = self.shared
        with box["cond"]:
            slot = self._slot()
            if self.rank == root:
                slot["value"] = obj
                box["value"] = obj
                box["cond"].notify_all()
            assert box["cond"].wait_for(lambda: "value" in slot, timeout=10)
            return slot["value"]

    def allgather(self, obj: Any) -> list[Any]:
        box = self.shared
        with box["cond"]:
            slot = self._slot()
            slot[self.rank] = obj
            box["cond"].notify_all()
            assert box["cond"].wait_for(lambda: len(slot) == self.size, timeout=10)
            return [slot[r] for r in range(self.size)]


@pytest.mark.parametrize("id_form", ["bytes", "tuple"])
@pytest.mark.parametrize("world", [1, 3])
def test_from_mpi_bootstrap(id_form: str, world: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    for name in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    nccl = FakeNccl(id_form=id_form)
    runtime = FakeRuntime(nccl, devices=4)
    shared: dict[str, Any] = {"cond": threading.Condition()}

    def call(rank: int) -> tuple[Any, ...]:
        comm = NCCLComm.from_mpi(FakeMPI(shared, rank, world), runtime=runtime)
        total = comm.allreduce(np.ones(2))
        return (
            comm.rank,
            comm.size,
            comm.device,
            comm.nccl_comm.comm_id,
            total,
            comm.allgather_object(rank),
        )

    results = run_ranks(world, call, nccl)
    assert nccl.unique_ids_made == 1  # rank 0 only
    sent = shared["value"]
    assert isinstance(sent, bytes if id_form == "bytes" else tuple)
    for rank, (got_rank, size, device, comm_id, total, objects) in enumerate(results):
        assert (got_rank, size, device) == (rank, world, rank)
        assert comm_id is sent or comm_id == sent  # unchanged
        assert type(comm_id) is type(sent)
        np.testing.assert_array_equal(total, np.full(2, float(world)))
        assert objects == list(range(world))
    assert runtime.used_devices == {f"fake-rank-{r}": r for r in range(world)}


def test_from_mpi_device_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    nccl = FakeNccl()
    runtime = FakeRuntime(nccl, devices=4)
    monkeypatch.setenv("LOCAL_RANK", "6")
    shared: dict[str, Any] = {"cond": threading.Condition()}
    comm = NCCLComm.from_mpi(FakeMPI(shared, 0, 1), runtime=runtime)
    assert comm.device == 2  # local rank 6 modulo 4 GPUs
    comm = NCCLComm.from_mpi(
        FakeMPI({"cond": threading.Condition()}, 0, 1), device=3, runtime=runtime
    )
    assert comm.device == 3
    with pytest.raises(ValueError, match=r"`device` must be a GPU index in 0\.\.3, got 4"):
        NCCLComm.from_mpi(FakeMPI(shared, 0, 1), device=4, runtime=runtime)


def test_fake_rejects_the_other_id_form() -> None:
    with pytest.raises(ValueError, match=r"commId length 10 != 128\."):
        FakeNccl(id_form="tuple").NcclCommunicator(1, tuple(range(10)), 0)
    with pytest.raises(TypeError, match="commId must be bytes"):
        FakeNccl(id_form="bytes").NcclCommunicator(1, tuple(range(128)), 0)


# --- bootstrap without MPI: one process, a store, torchrun's environment ---


def outcomes(size: int, fn: Any, nccl: FakeNccl) -> list[Any]:
    """Call ``fn(rank)`` on ``size`` threads; return each rank's result or exception."""

    def caught(rank: int) -> Any:
        try:
            return fn(rank)
        except Exception as error:
            return error

    return run_ranks(size, caught, nccl)


def test_single_needs_no_mpi(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # any import of mpi4py raises
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", None)
    nccl = FakeNccl()
    runtime = FakeRuntime(nccl, devices=2)
    comm = NCCLComm.single(runtime=runtime)
    assert (comm.rank, comm.size, comm.device, comm.mpi_comm) == (0, 1, 0, None)
    assert nccl.unique_ids_made == 1
    detail, data = _doctor.exercise(comm, np.asarray)
    assert data["schedules"] == 6, detail
    assert NCCLComm.single(1, runtime=runtime).device == 1
    with pytest.raises(ValueError, match=r"`device` must be a GPU index in 0\.\.1, got 2"):
        NCCLComm.single(2, runtime=runtime)


def tcp_stores(world: int) -> list[Any]:
    """A TCPStore server (rank 0) and its clients (the other ranks), as torchrun has them."""
    dist = pytest.importorskip("torch.distributed")
    timeout = timedelta(seconds=20)
    server = dist.TCPStore("127.0.0.1", 0, world, True, timeout, wait_for_workers=False)
    clients = [
        dist.TCPStore("127.0.0.1", server.port, world, False, timeout) for _ in range(world - 1)
    ]
    return [server, *clients]


def file_stores(world: int, path: Path) -> list[Any]:
    dist = pytest.importorskip("torch.distributed")
    return [dist.FileStore(str(path), world) for _ in range(world)]


@pytest.mark.parametrize("kind", ["tcp", "file"])
@pytest.mark.parametrize("id_form", ["bytes", "tuple"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_from_store_bootstrap(kind: str, id_form: str, world: int, tmp_path: Path) -> None:
    stores = tcp_stores(world) if kind == "tcp" else file_stores(world, tmp_path / "store")
    nccl = FakeNccl(id_form=id_form)
    runtime = FakeRuntime(nccl, devices=4)

    def call(rank: int) -> tuple[Any, ...]:
        # Two communicators through one store, made in the same order on every rank.
        first = NCCLComm.from_store(stores[rank], rank, world, local_rank=rank, runtime=runtime)
        second = NCCLComm.from_store(stores[rank], rank, world, device=3 - rank, runtime=runtime)
        return first, second, first.allreduce(np.ones(2)), second.allgather_object(rank)

    results = run_ranks(world, call, nccl)
    assert nccl.unique_ids_made == 2  # rank 0, once per communicator
    for rank, (first, second, total, objects) in enumerate(results):
        assert (first.rank, first.size, first.device) == (rank, world, rank)
        assert (second.rank, second.size, second.device) == (rank, world, 3 - rank)
        assert first.store is stores[rank]
        assert first.mpi_comm is None
        assert first.nccl_comm.comm_id != second.nccl_comm.comm_id
        assert type(first.nccl_comm.comm_id) is (bytes if id_form == "bytes" else tuple)
        np.testing.assert_array_equal(total, np.full(2, float(world)))
        assert objects == list(range(world))


def test_from_store_runs_every_schedule() -> None:
    world = 3
    stores = tcp_stores(world)
    nccl = FakeNccl()
    runtime = FakeRuntime(nccl, devices=world)

    def call(rank: int) -> tuple[str, dict[str, Any]]:
        comm = NCCLComm.from_store(stores[rank], rank, world, runtime=runtime)
        return _doctor.exercise(comm, np.asarray)

    for _, data in run_ranks(world, call, nccl):
        assert (data["ranks"], data["schedules"]) == (world, 6)


def torchrun_environ(rank: int, world: int, port: int, **extra: str) -> dict[str, str]:
    return {
        "TORCHELASTIC_RUN_ID": "test",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(rank),
        **extra,
    }


@pytest.mark.parametrize("agent_store", [True, False])
def test_from_torch_bootstrap_from_the_environment(agent_store: bool) -> None:
    """torchrun's agent hosts the store (all ranks clients), or rank 0 hosts it."""
    dist = pytest.importorskip("torch.distributed")
    world = 3
    agent = None
    if agent_store:  # what torchrun's agent runs, and says so to its workers
        agent = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=20))
        port, extra = agent.port, {"TORCHELASTIC_USE_AGENT_STORE": "True"}
    else:
        port, extra = free_port(), {}
    nccl = FakeNccl()
    runtime = FakeRuntime(nccl, devices=world)

    def call(rank: int) -> tuple[int, int, int | None, Any]:
        environ = torchrun_environ(rank, world, port, **extra)
        comm = NCCLComm.from_torch(runtime=runtime, environ=environ, timeout=20)
        return comm.rank, comm.size, comm.device, comm.allreduce(np.ones(1))

    for rank, (got_rank, size, device, total) in enumerate(run_ranks(world, call, nccl)):
        assert (got_rank, size, device) == (rank, world, rank)
        assert total.tolist() == [float(world)]
    if agent is not None:
        assert agent.get("portable_siglip/nccl/attempt_0/calls/0") == b"1"


def test_from_torch_uses_the_default_process_group() -> None:
    dist = pytest.importorskip("torch.distributed")
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        comm = NCCLComm.from_torch(runtime=FakeRuntime(FakeNccl()))
        assert (comm.rank, comm.size, comm.device) == (0, 1, 0)
        assert comm.store.add("portable_siglip/nccl/attempt_0/calls/0", 0) == 1
    finally:
        dist.destroy_process_group()


def test_from_torch_names_the_missing_variables() -> None:
    pytest.importorskip("torch.distributed")
    with pytest.raises(ValueError, match=r"missing: MASTER_ADDR, MASTER_PORT$"):
        NCCLComm.from_torch(
            runtime=FakeRuntime(FakeNccl()), environ={"RANK": "0", "WORLD_SIZE": "1"}
        )
    environ = torchrun_environ(0, 1, 1234, RANK="x")
    with pytest.raises(ValueError, match=r"must be integers, got 'x'"):
        NCCLComm.from_torch(runtime=FakeRuntime(FakeNccl()), environ=environ)


TORCHRUN_SCRIPT = """
import json, os, sys
from portable_siglip.backends.nccl import NCCLComm

class Communicator:  # what NCCL would join: it keeps the id it was given
    def __init__(self, size, unique_id, rank):
        self.unique_id, self._size, self._rank = unique_id, size, rank
    def rank_id(self):
        return self._rank
    def size(self):
        return self._size

class Nccl:
    NcclCommunicator = Communicator
    def get_unique_id(self):
        return os.urandom(128)

class Runtime:  # a node with argv[1] GPUs
    nccl = Nccl()
    def device_count(self):
        return int(sys.argv[1])
    def use_device(self, device):
        pass
    def device_identity(self, device):
        return f"gpu-{device}"

try:
    comm = NCCLComm.from_torch(runtime=Runtime())
    out = {"rank": comm.rank, "device": comm.device, "id": comm.nccl_comm.unique_id.hex()}
except ValueError as error:
    out = {"error": f"{type(error).__name__}: {error}"}
# A file per rank: torchrun interleaves its workers' output, long lines included.
with open(os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.json"), "w") as file:
    json.dump(out, file)
"""


@pytest.mark.slow
@pytest.mark.parametrize("gpus", [3, 1])
def test_from_torch_under_a_real_torchrun(gpus: int, tmp_path: Path) -> None:
    """Three processes started by torchrun agree on rank 0's id through torchrun's store."""
    pytest.importorskip("torch.distributed")
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this Python")
    script = tmp_path / "bootstrap.py"
    script.write_text(TORCHRUN_SCRIPT)
    out = tmp_path / "results"
    out.mkdir()
    command = [str(torchrun), "--standalone", "--nproc-per-node", "3", str(script), str(gpus)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "OMPI_"))}
    result = run_captured([*command, str(out)], timeout=180, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    files = sorted(out.glob("rank*.json"))
    assert len(files) == 3, result.stdout + result.stderr
    results = [json.loads(file.read_text()) for file in files]
    if gpus == 3:
        assert [(r["rank"], r["device"]) for r in results] == [(0, 0), (1, 1), (2, 2)]
        assert len({r["id"] for r in results}) == 1  # rank 0's random id reached every rank
    else:
        for r in results:
            assert r["error"].startswith("SharedDeviceError: 3 ranks share GPU 0 (ranks 0, 1, 2")


def test_from_store_rejects_a_bad_rank() -> None:
    with pytest.raises(ValueError, match=r"`rank` must be in 0\.\.1 for `size` 2, got 2"):
        NCCLComm.from_store(object(), 2, 2, runtime=FakeRuntime(FakeNccl()))
    with pytest.raises(TypeError, match=r"`size` must be an int, got str '2'"):
        NCCLComm.from_store(object(), 0, "2", runtime=FakeRuntime(FakeNccl()))  # type: ignore[arg-type]


# --- ranks that share a GPU, or cannot choose one: one error on every rank, before NCCL ---


def mpi_bootstrap(world: int, devices: int, **options: Any) -> tuple[FakeNccl, Any]:
    import threading

    nccl = FakeNccl()
    runtime = FakeRuntime(nccl, devices=devices)
    shared: dict[str, Any] = {"cond": threading.Condition()}

    def call(rank: int) -> Any:
        device = options.get("device")
        device = device(rank) if callable(device) else device
        return NCCLComm.from_mpi(FakeMPI(shared, rank, world), device=device, runtime=runtime)

    return nccl, call


@pytest.mark.parametrize("how", ["mpi", "store"])
def test_ranks_sharing_a_gpu_fail_alike_before_nccl(
    how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two ranks on a one-GPU machine: NCCL would fail in ncclCommInitRank ("Duplicate GPU")."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    world = 2
    if how == "mpi":
        nccl, call = mpi_bootstrap(world, devices=1)
    else:
        stores = tcp_stores(world)
        nccl = FakeNccl()
        runtime = FakeRuntime(nccl, devices=1)

        def call(rank: int) -> Any:
            return NCCLComm.from_store(stores[rank], rank, world, runtime=runtime)

    errors = outcomes(world, call, nccl)
    for error in errors:
        assert isinstance(error, ValueError)
        assert isinstance(error, SharedDeviceError), error
        assert str(error).startswith("2 ranks share GPU 0 (ranks 0, 1 on ")
        assert "NCCL needs one GPU per rank" in str(error)
        assert (error.device, error.ranks) == (0, [0, 1])
    assert nccl.unique_ids_made == 0  # nobody went on to NCCL


def test_ranks_may_share_a_gpu_where_nccl_is_told_it_may(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """NCCL >= 2.30 runs several ranks on one GPU with NCCL_MULTI_RANK_GPU_ENABLE=1."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("NCCL_MULTI_RANK_GPU_ENABLE", "1")
    nccl, call = mpi_bootstrap(2, devices=1)
    assert [comm.device for comm in run_ranks(2, call, nccl)] == [0, 0]
    monkeypatch.setenv("NCCL_MULTI_RANK_GPU_ENABLE", "0")
    nccl, call = mpi_bootstrap(2, devices=1)
    errors = outcomes(2, call, nccl)
    assert all(isinstance(error, SharedDeviceError) for error in errors), errors
    assert "NCCL_MULTI_RANK_GPU_ENABLE=1 on every rank" in str(errors[0])


def test_ranks_on_distinct_gpus_of_a_shared_machine_pass() -> None:
    nccl, call = mpi_bootstrap(3, devices=4, device=lambda rank: 3 - rank)
    assert [comm.device for comm in run_ranks(3, call, nccl)] == [3, 2, 1]
    nccl, call = mpi_bootstrap(3, devices=4, device=lambda rank: [0, 2, 0][rank])
    errors = outcomes(3, call, nccl)
    assert all(isinstance(e, SharedDeviceError) and e.ranks == [0, 2] for e in errors), errors


def test_a_rank_without_its_gpu_fails_every_rank() -> None:
    nccl, call = mpi_bootstrap(3, devices=2, device=lambda rank: [0, 1, 5][rank])
    errors = outcomes(3, call, nccl)
    assert [type(e) for e in errors] == [ValueError] * 3, errors
    assert str(errors[2]) == "`device` must be a GPU index in 0..1, got 5"
    for error in errors[:2]:
        assert (
            str(error)
            == "rank 2 could not choose its GPU: `device` must be a GPU index in 0..1, got 5"
        )
    assert nccl.unique_ids_made == 0


def test_missing_libnccl_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """``cupy.cuda.nccl`` imports without libnccl; it only sets ``available = False``."""
    cupy, cuda, binding = (
        types.ModuleType(name) for name in ("cupy", "cupy.cuda", "cupy.cuda.nccl")
    )
    binding.available = False  # type: ignore[attr-defined]
    cuda.nccl = binding  # type: ignore[attr-defined]
    cupy.cuda = cuda  # type: ignore[attr-defined]
    for module in (cupy, cuda, binding):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    with pytest.raises(ImportError, match=r"cannot load libnccl, the NCCL library"):
        CupyRuntime()
    with pytest.raises(ImportError, match=r"nvidia-nccl-cu12 or nvidia-nccl-cu13"):
        NCCLComm.single()
    binding.available = True  # type: ignore[attr-defined]
    assert CupyRuntime().nccl is binding


# --- dtypes and layouts ---


@pytest.mark.parametrize("dtype", ["complex128", "bool", "int16"])
def test_unsupported_dtypes_raise(dtype: str) -> None:
    def call(comm: NCCLComm) -> None:
        x = np.zeros(3, dtype=dtype)
        for operation in (
            lambda: comm.sendrecv(x, 0, 0, (3,)),
            lambda: comm.allreduce(x),
            lambda: comm.allgather(x),
            lambda: comm.bcast(x),
        ):
            with pytest.raises(TypeError, match=rf"cannot send arrays of dtype {dtype}"):
                operation()

    on_fake(1, call)


@pytest.mark.parametrize("has_bfloat16", [True, False])
def test_bfloat16(has_bfloat16: bool) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")

    def call(comm: NCCLComm) -> list[Any]:
        x = (np.arange(4.0) + comm.rank).astype(ml_dtypes.bfloat16)
        out = [comm.sendrecv(x, (comm.rank + 1) % 2, (comm.rank + 1) % 2, (4,))]
        out += [*comm.allgather(x), comm.bcast(x, 1)]
        if has_bfloat16:
            out.append(comm.allreduce(x))
        else:
            with pytest.raises(TypeError, match=r"allreduce of bfloat16 needs NCCL_BFLOAT16"):
                comm.allreduce(x)
        return out

    for rank, out in enumerate(on_fake(2, call, bfloat16=has_bfloat16)):
        want = [np.arange(4.0) + (1 - rank), np.arange(4.0), np.arange(4.0) + 1, np.arange(4.0) + 1]
        if has_bfloat16:
            want.append(2 * np.arange(4.0) + 1)
        for got, expected in zip(out, want, strict=True):
            assert got.dtype == ml_dtypes.bfloat16
            np.testing.assert_array_equal(got.astype(np.float64), expected)


def test_bfloat16_travels_as_bytes_without_the_constant() -> None:
    nccl = FakeNccl(bfloat16=False)
    assert _nccl_dtype(nccl, "bfloat16", reduce=False) == (nccl.NCCL_UINT8, 2)
    assert _nccl_dtype(FakeNccl(), "bfloat16", reduce=True) == (9, 1)
    assert _nccl_dtype(nccl, "float64", reduce=True) == (nccl.NCCL_FLOAT64, 1)


def test_non_contiguous_arrays_raise() -> None:
    def call(comm: NCCLComm) -> None:
        x = np.zeros((4, 6))[:, ::2]
        for operation in (
            lambda: comm.sendrecv(x, 0, 0, (4, 3)),
            lambda: comm.allreduce(x),
            lambda: comm.allgather(x.T),
            lambda: comm.bcast(x),
        ):
            with pytest.raises(ValueError, match=r"C-contiguous arrays; got shape \(.*strides"):
                operation()

    on_fake(1, call)


def test_bad_peers_and_shapes_raise() -> None:
    def call(comm: NCCLComm) -> None:
        with pytest.raises(ValueError, match=r"`dest` must be a rank in 0\.\.1, got 2"):
            comm.isendrecv(np.ones(2), 2, 0, (2,))
        with pytest.raises(ValueError, match=r"`root` must be a rank in 0\.\.1, got -1"):
            comm.bcast(np.ones(2), -1)
        with pytest.raises(ValueError, match="differ beyond the first axis"):
            comm.allgather(np.ones((2, 2 + comm.rank)))

    on_fake(2, call)


def test_count_mismatch_is_caught() -> None:
    def call(comm: NCCLComm) -> None:
        peer = 1 - comm.rank
        comm.sendrecv(np.ones(3), peer, peer, (4,))

    with pytest.raises(FakeNcclError, match=r"receives 4 x dtype 8 from rank \d, which sent 3"):
        on_fake(2, call)


# --- the fake keeps NCCL's rules (so the tests above can fail) ---


def test_fake_send_to_self_needs_a_recv_in_its_group() -> None:
    nccl = FakeNccl()
    runtime = FakeRuntime(nccl)
    comm = nccl.NcclCommunicator(1, nccl.get_unique_id(), 0)
    x = np.ones(2)
    with pytest.raises(FakeNcclError, match="send to self outside a group"):
        comm.send(runtime.pointer(x), 2, nccl.NCCL_FLOAT64, 0, 0)
    nccl.groupStart()
    comm.send(runtime.pointer(x), 2, nccl.NCCL_FLOAT64, 0, 0)
    with pytest.raises(FakeNcclError, match="send to self without the matching recv"):
        nccl.groupEnd()


def test_fake_matches_a_plain_send_with_a_grouped_recv_and_times_out() -> None:
    def call(rank: int, comm_id: Any, nccl: FakeNccl, runtime: FakeRuntime) -> Any:
        comm = nccl.NcclCommunicator(2, comm_id, rank)
        x = np.full(2, float(rank))
        if rank == 0:
            comm.send(runtime.pointer(x), 2, nccl.NCCL_FLOAT64, 1, 0)
            return None
        nccl.groupStart()
        comm.recv(runtime.pointer(x), 2, nccl.NCCL_FLOAT64, 0, 0)
        nccl.groupEnd()
        return x

    nccl = FakeNccl()
    runtime = FakeRuntime(nccl)
    comm_id = nccl.get_unique_id()
    got = run_ranks(2, lambda r: call(r, comm_id, nccl, runtime), nccl)
    np.testing.assert_array_equal(got[1], np.zeros(2))

    nccl = FakeNccl(timeout=0.3)
    comm = nccl.NcclCommunicator(1, nccl.get_unique_id(), 0)
    two = nccl.NcclCommunicator  # a rank that never joins: the join times out
    with pytest.raises(TimeoutError, match="every rank to join"):
        two(2, nccl.get_unique_id(), 0)
    assert comm.size() == 1


def test_schedules_fail_when_the_exchange_is_broken(monkeypatch: pytest.MonkeyPatch) -> None:
    """A check of the tests: swapping dest and source is caught (mismatch or wrong values)."""
    original = NCCLComm.isendrecv

    def swapped(self: NCCLComm, send: Any, dest: int, source: int, shape: Any, **kw: Any) -> Any:
        return original(self, send, source, dest, shape, **kw)

    monkeypatch.setattr(NCCLComm, "isendrecv", swapped)
    with pytest.raises((AssertionError, FakeNcclError)):
        test_schedules_match_one_process("sigmoid", "shift", 3, 2)
    with pytest.raises((AssertionError, FakeNcclError)):
        test_schedules_match_one_process("softmax", "ring", 4, None)


# --- host arrays on the real runtime; the real GPU ---


def test_real_runtime_rejects_host_arrays() -> None:
    cupy = pytest.importorskip("cupy")
    from portable_siglip.backends.nccl import CupyRuntime

    runtime = CupyRuntime()
    with pytest.raises(TypeError, match="NCCLComm needs device arrays"):
        runtime.as_device_array(np.ones(2), None)
    assert cupy is not None
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"got a torch\.Tensor in host memory"):
        runtime.as_device_array(torch.ones(2), None)


def _gpu() -> Any:
    cupy = pytest.importorskip("cupy", reason="needs CuPy and a GPU")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no driver
        count = 0
    if count < 1:
        pytest.skip("needs a GPU")
    return cupy


def _one_rank_gpu_comm() -> NCCLComm:
    cupy = _gpu()
    from cupy.cuda import nccl

    cupy.cuda.Device(0).use()
    return NCCLComm(nccl.NcclCommunicator(1, nccl.get_unique_id(), 0))


def test_gpu_primitives() -> None:
    """GPU: the primitives on real CuPy/NCCL with one rank; torch CUDA tensors round-trip."""
    comm = _one_rank_gpu_comm()
    import cupy

    x = cupy.arange(6.0).reshape(2, 3)
    cupy.testing.assert_array_equal(comm.sendrecv(x, 0, 0, (2, 3)), x)
    cupy.testing.assert_array_equal(comm.allreduce(x), x)
    cupy.testing.assert_array_equal(comm.allgather(x)[0], x)
    cupy.testing.assert_array_equal(comm.bcast(x, 0), x)
    assert comm.allgather_object({"a": 1}) == [{"a": 1}]
    with pytest.raises(TypeError, match="NCCLComm needs device arrays"):
        comm.allreduce(np.ones(2))
    torch = pytest.importorskip("torch")
    t = torch.arange(4.0, device="cuda").to(torch.bfloat16)
    out = comm.sendrecv(t, 0, 0, (4,))
    assert isinstance(out, torch.Tensor)
    assert out.dtype == torch.bfloat16
    assert out.is_cuda
    assert torch.equal(out, t)


@pytest.mark.parametrize(("loss", "strategy"), SCHEDULES, ids=SCHEDULE_IDS)
def test_gpu_schedules(loss: str, strategy: str) -> None:
    """GPU: every schedule with a one-rank NCCL communicator equals no communicator."""
    comm = _one_rank_gpu_comm()
    import cupy

    img_np, txt_np = pairs(np.random.default_rng(1), 9, 4)
    img, txt = cupy.asarray(img_np), cupy.asarray(txt_np)
    want_loss, want = LOSS_AND_GRAD[loss](img, txt, SCALE, BIAS, block_size=4)
    got_loss, got = LOSS_AND_GRAD[loss](
        img, txt, SCALE, BIAS, block_size=4, comm=comm, strategy=strategy
    )
    assert_close(got_loss, to_numpy(want_loss), 1e-12, "loss")
    for name in got._fields:
        assert_close(getattr(got, name), to_numpy(getattr(want, name)), 1e-12, name)
