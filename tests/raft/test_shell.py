"""The Raft node's shell (raft/node.py around raft/pipeline.py), in process: the failure
modes of issue 12 that live outside the core.

A node here is a real `RaftBackend` (driver, ticker, fast path, pipeline, storage), its
peers being addresses nobody listens on; peer messages are fed to `receive` directly.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from caplab import errors
from caplab.clock import SkewableClock
from caplab.disk import SimDisk
from caplab.store import Consistency, NodeConfig
from raft import node as raft_node
from raft.core import RaftConfig, RaftCore, Role
from raft.messages import (
    Append,
    AppendResp,
    Entry,
    EntryKind,
    HardState,
    InstallSnapshot,
    Message,
    ReadIndex,
    ReadIndexResp,
    Snapshot,
    SnapshotMeta,
    VoteResp,
)
from raft.pipeline import ReadyPipeline
from raft.statemachine import KvStateMachine
from raft.storage import RaftStorage
from tests.polling import eventually

FAST = {"tick_ms": "10", "election_ticks": "5"}


@pytest.fixture
async def sim_disk(monkeypatch: pytest.MonkeyPatch) -> SimDisk:
    """Nodes started in this test store their data on one simulated disk."""
    disk = SimDisk(random.Random(1))
    monkeypatch.setattr(raft_node, "RaftStorage", lambda path: RaftStorage(path, disk=disk))
    return disk


async def start_node(
    tmp: Path, node_id: str = "n1", peers: dict[str, str] | None = None
) -> raft_node.RaftBackend:
    cfg = NodeConfig(
        store="raft",
        node_id=node_id,
        listen="127.0.0.1:1",
        peers=peers or {},
        data_dir=str(tmp / node_id),
        options=dict(FAST),
    )
    backend = raft_node.RaftBackend(cfg, SkewableClock())
    await backend.start(grpc.aio.server())
    return backend


@pytest.fixture
async def single(tmp_path: Path, sim_disk: SimDisk) -> AsyncIterator[raft_node.RaftBackend]:
    backend = await start_node(tmp_path)
    await eventually(lambda: backend.core.role is Role.LEADER, 5)
    yield backend
    await backend.close()


async def test_a_full_disk_refuses_writes_then_resumes_when_space_returns(
    single: raft_node.RaftBackend, sim_disk: SimDisk
) -> None:
    """Issue 12.6: ENOSPC killed the driver; writes hung until their deadline, health stayed
    SERVING, and freeing space did not help."""
    b = single
    await b.put("a", b"1", None, None)
    sim_disk.full = True
    with pytest.raises(errors.StoreError) as first:
        await asyncio.wait_for(b.put("b", b"2", None, None), 5)
    assert "disk" in first.value.message
    assert b.health()[0] is False and "disk" in b.health()[1]
    with pytest.raises(errors.Unavailable) as refused:  # definite: not applied
        await asyncio.wait_for(b.put("c", b"3", None, None), 5)
    assert "cannot write to its disk" in refused.value.message
    with pytest.raises(errors.Unavailable):
        await asyncio.wait_for(b.get("a", Consistency.LINEARIZABLE, None), 5)
    sim_disk.full = False
    await eventually(lambda: b.health()[0], 10)
    await asyncio.wait_for(b.put("d", b"4", None, None), 5)
    assert (await b.get("a", Consistency.LINEARIZABLE, None)).value == b"1"
    assert (await b.get("d", Consistency.LINEARIZABLE, None)).value == b"4"
    assert (await b.get("c", Consistency.LINEARIZABLE, None)).value is None
    assert b.failed is None and b.counters["disk_errors"] >= 1


async def test_a_failing_ticker_stops_the_node_with_the_reason(
    single: raft_node.RaftBackend,
) -> None:
    """Issue 12.7: a failure in the ticker task was silent (no log, no exit)."""
    b = single

    def broken() -> None:
        raise RuntimeError("boom")

    b.core.tick = broken  # type: ignore[method-assign]
    await asyncio.wait_for(b.failed_event.wait(), 5)
    assert b.failed is not None and "ticker" in b.failed and "boom" in b.failed
    assert b.health() == (False, f"failed: {b.failed}")
    with pytest.raises(errors.Unavailable, match="failed"):
        await b.put("a", b"1", None, None)


async def test_a_failing_fsync_stops_the_node(
    single: raft_node.RaftBackend, sim_disk: SimDisk
) -> None:
    """A failed fsync leaves the page cache in an unknown state: fatal (fail-stop), never a
    node that goes on answering."""
    b = single
    sim_disk.fail_next("fsync", 5)
    with pytest.raises(errors.StoreError):
        await asyncio.wait_for(b.put("a", b"1", None, None), 5)
    await asyncio.wait_for(b.failed_event.wait(), 5)
    assert b.failed is not None and "driver" in b.failed


async def test_a_node_without_its_disk_keeps_out_before_it_takes_part(
    tmp_path: Path, sim_disk: SimDisk, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reviewer's attack: a heartbeat the leader built for a node's previous life, sent
    after the node was back at once with an empty directory, set its recovery target
    too low (tests/raft/test_recovery_target_attacks.py, the limit). A blank node now
    waits two of the longest election timeouts before its core and links exist; a node
    with its disk does not wait."""
    gate = asyncio.Event()
    waits: list[float] = []

    async def stay_out(self: raft_node.RaftBackend) -> None:
        waits.append(4 * self.opts.election_timeout_s)
        await gate.wait()

    monkeypatch.setattr(raft_node.RaftBackend, "_stay_out", stay_out)
    starting = asyncio.create_task(start_node(tmp_path))
    await eventually(lambda: bool(waits), 5)
    assert not starting.done() and waits == [0.2]  # 4 x 5 ticks x 10 ms
    gate.set()
    b = await starting
    storage = b.storage
    assert storage is not None
    await eventually(lambda: b.core.role is Role.LEADER and not storage.recovering, 5)
    await b.close()
    b = await start_node(tmp_path)  # its disk kept: no wait
    assert waits == [0.2]
    await b.close()


async def test_cancelling_the_reader_during_the_deferred_apply_does_not_wedge(
    tmp_path: Path, sim_disk: SimDisk
) -> None:
    """Issue 12.4: a follower's fast path handed the apply of an outstanding Ready to the
    stream reader task; gRPC cancelling that task in the window left the Ready unfinished
    and the core never produced another."""
    b = await start_node(tmp_path, "n2", {"n1": "127.0.0.1:1", "n3": "127.0.0.1:1"})
    try:

        def entry(i: int) -> Entry:
            return Entry(1, i, EntryKind.NOOP, b"")

        async def reader(i: int, commit: int) -> None:
            rest = b.receive(
                [Append("n1", "n2", 1, i - 1, 1 if i > 1 else 0, (entry(i),), commit, 0)]
            )
            if rest is not None:
                await rest

        # entry 1 arrives, then entry 2 committing 1: its apply is deferred...
        await reader(1, 0)
        task = asyncio.create_task(reader(2, 1))
        await asyncio.sleep(0)  # the reader runs up to its await, the apply is pending
        task.cancel()  # ...and gRPC cancels the reader right then
        await asyncio.gather(task, return_exceptions=True)
        await eventually(lambda: b.pipe.applied == 1, 5)
        await reader(3, 3)
        await eventually(lambda: b.pipe.applied == 3, 5)
        assert b.failed is None
    finally:
        await b.close()


def test_a_read_at_a_snapshot_being_installed_waits_for_the_restore(tmp_path: Path) -> None:
    """Issue 12.3: a linearizable read whose read point the snapshot covers was released
    as soon as the snapshot was stepped, and served from the old state."""
    served: list[tuple[str, int, Any]] = []
    sm = KvStateMachine()

    class Sink:
        def proposal_done(self, token: str, result: Any, index: int) -> None: ...

        def proposal_failed(self, token: str, definite: bool, reason: str) -> None: ...

        def read_ready(self, token: str, index: int) -> None:
            served.append((token, index, sm.get("k")))

        def read_failed(self, token: str, reason: str) -> None:
            served.append((token, -1, reason))

    core = RaftCore(
        "n2",
        ["n1", "n2", "n3"],
        RaftConfig(election_ticks=10),
        random.Random(1),
        hard_state=HardState(1, None, 0),
        snapshot=None,
        entries=[],
    )
    storage = RaftStorage(tmp_path)
    storage.load()
    sent: list[Message] = []
    pipe: ReadyPipeline[str] = ReadyPipeline(
        core,
        storage,
        sm,
        sent.append,
        Sink(),
        durable_hs=HardState(1, None, 0),
        snapshot_entries=1000,
    )
    core.step(Append("n1", "n2", 1, 0, 0, (), 0, 0))  # the follower knows its leader
    rd = core.ready()
    assert rd is not None
    pipe.finish(rd, pipe.begin(rd))
    assert pipe.read("r1")
    rd = core.ready()
    assert rd is not None
    pipe.finish(rd, pipe.begin(rd))  # asks the leader (ReadIndex)
    leader_sm = KvStateMachine()
    leader_sm.apply(10, _put("k", b"new"))
    snap = Snapshot(SnapshotMeta(10, 1), leader_sm.snapshot())
    core.step(InstallSnapshot("n1", "n2", 1, snap))
    asked = next(m for m in sent if isinstance(m, ReadIndex))
    core.step(ReadIndexResp("n1", "n2", 1, asked.ctx, 10))
    assert served == []  # nothing is served before the Ready was processed
    rd = core.ready()
    assert rd is not None and rd.snapshot == snap and rd.read_states
    save = pipe.begin(rd)
    assert served == []  # nor while its save is under way
    assert save is not None
    pipe.persist(save)
    pipe.finish(rd, save)
    assert served == [("r1", 10, b"new")]
    assert any(isinstance(m, AppendResp) for m in rd.messages)


def _put(key: str, value: bytes) -> bytes:
    from caplab.raft.v1 import raft_pb2 as pb

    return pb.Command(key=key, put=value).SerializeToString()


def test_a_write_taken_by_a_leader_that_no_ready_saw_leading_is_answered(
    tmp_path: Path,
) -> None:
    """Found by the simulator (soak seed 1015919): a node became leader, took a write and
    lost leadership again between two Readies; the pipeline only failed writes of a node
    it had seen leading, so this one stayed pending forever (its client too)."""
    failed: list[tuple[str, bool]] = []

    class Sink:
        def proposal_done(self, token: str, result: Any, index: int) -> None:
            raise AssertionError("not committed")

        def proposal_failed(self, token: str, definite: bool, reason: str) -> None:
            failed.append((token, definite))

        def read_ready(self, token: str, index: int) -> None: ...

        def read_failed(self, token: str, reason: str) -> None: ...

    core = RaftCore(
        "n1",
        ["n1", "n2", "n3"],
        RaftConfig(election_ticks=10, pre_vote=False),
        random.Random(1),
        hard_state=HardState(1, None, 0),
        snapshot=None,
        entries=[],
    )
    storage = RaftStorage(tmp_path)
    storage.load()
    pipe: ReadyPipeline[str] = ReadyPipeline(
        core,
        storage,
        KvStateMachine(),
        lambda m: None,
        Sink(),
        durable_hs=HardState(1, None, 0),
        snapshot_entries=1000,
    )
    for _ in range(20):  # campaign...
        core.tick()
    core.step(VoteResp("n2", "n1", core.term, False))  # ...and win, between two Readies
    assert core.role is Role.LEADER
    assert pipe.propose([_put("k", b"v")], ["w1"])
    core.step(Append("n3", "n1", core.term + 1, 0, 0, (), 0, 0))  # a newer leader
    rd = core.ready()
    assert rd is not None
    save = pipe.begin(rd)
    if save is not None:
        pipe.persist(save)
    pipe.finish(rd, save)
    assert failed == [("w1", False)]  # outcome unknown, not left pending
    assert pipe.in_flight == 0
