"""GossipBackend in process (no peers): options, writes, exactly-once, refusals, restart."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest

from caplab import errors
from caplab.clock import SkewableClock
from caplab.store import Consistency, NodeConfig
from caplab.v1 import kv_pb2
from caplab.validation import RequestId
from gossip.crdt import Applied, Register, applied_key
from gossip.hlc import Timestamp
from gossip.node import GossipBackend, GossipOptions, build_backend
from gossip.storage import CommitBatch, DedupEntry, DiskFullError, FatalStorageError, GossipStorage
from tests.polling import eventually


def test_options_parse_and_refuse_unknown() -> None:
    o = GossipOptions.parse({"gossip_interval_ms": "50", "fanout": "2"})
    cfg = o.core_config()
    assert (cfg.gossip_interval_ms, cfg.fanout) == (50, 2)
    with pytest.raises(errors.InvalidArgument, match="unknown gossip option 'fanuot'"):
        GossipOptions.parse({"fanuot": "2"})
    with pytest.raises(errors.InvalidArgument, match="integer"):
        GossipOptions.parse({"fanout": "many"})
    with pytest.raises(errors.InvalidArgument, match="ping_interval_ms"):
        GossipOptions.parse({"ping_interval_ms": "100", "ping_timeout_ms": "100"})
    assert GossipOptions.parse({"commit_gap_us": "0"}).commit_gap_us == 0
    with pytest.raises(errors.InvalidArgument, match="fanout must be >= 1"):
        GossipOptions.parse({"fanout": "0"})


async def _backend(data: Path, **options: str) -> GossipBackend:
    config = NodeConfig("gossip", "n1", "127.0.0.1:0", {}, str(data), options=options)
    b = build_backend(config, SkewableClock())
    await b.start(grpc.aio.server())
    return b


async def test_group_commit_gathers_concurrent_writes_but_never_delays_a_lone_one(
    tmp_path: Path,
) -> None:
    b = await _backend(tmp_path, commit_gap_us="60000000")

    async def fsyncs() -> int:
        return (await b.status()).counters["fsyncs"]

    base = await fsyncs()
    for i in range(3):  # lone writes, one after the other: no gap between their commits
        await asyncio.wait_for(b.put(f"lone{i}", b"v", None, None), timeout=1.0)
    assert await fsyncs() == base + 3
    await asyncio.gather(*(b.put(f"a{i}", b"v", None, None) for i in range(5)))
    assert await fsyncs() == base + 4  # concurrent writers: one commit
    # The next batch waits until as many writes as the last one carried have arrived
    # (those clients' next writes), not for the whole gap (60 s here): a moderate load
    # is not delayed (its p50 was the 10 ms gap at 16 clients).
    wave_b = [asyncio.create_task(b.put(f"b{i}", b"v", None, None)) for i in range(3)]

    async def wave_b_waits_for_its_commit() -> bool:  # (with no gap it would be alone)
        return (await b.status()).counters["pending_writes"] == 3

    await eventually(wave_b_waits_for_its_commit, 5.0, 0.001)  # before wave c exists
    wave_c = [asyncio.create_task(b.put(f"c{i}", b"v", None, None)) for i in range(2)]
    await asyncio.wait_for(asyncio.gather(*wave_b, *wave_c), 10.0)
    assert await fsyncs() == base + 5
    assert (await b.get("c1", Consistency.DEFAULT, None)).value == b"v"
    await b.before_shutdown()
    await b.close()


async def test_writes_arriving_during_a_commit_are_committed_as_soon_as_it_ends(
    tmp_path: Path,
) -> None:
    """Writes that arrive while a commit is under way form the next batch, and it is taken
    the moment that commit ends: they already waited for the disk. They used to wait
    until as many writes as the commit carried had arrived, or for ``commit_gap_us``,
    with the disk idle (16 clients: half of the time, p50 the 10 ms gap)."""
    b = await _backend(tmp_path, commit_gap_us="60000000")  # (the old wait: 60 s)
    assert b.storage is not None
    commit = b.storage.commit
    gate, entered = threading.Event(), threading.Event()
    batches: list[list[str]] = []

    def held_commit(batch: CommitBatch) -> None:
        batches.append(sorted(batch.kv))
        entered.set()
        gate.wait(10)  # the first commit: until the late writes joined the open batch
        commit(batch)

    b.storage.commit = held_commit  # type: ignore[method-assign]
    first = [asyncio.create_task(b.put(f"a{i}", b"v", None, None)) for i in range(5)]
    assert await asyncio.to_thread(entered.wait, 5.0)  # their commit is under way
    late = [asyncio.create_task(b.put(f"b{i}", b"v", None, None)) for i in range(2)]
    await asyncio.sleep(0)  # (one turn of the loop: the late puts run up to their wait)
    assert b.pipe.batch.writes == 2 and b.pipe.pending_writes == 7
    assert batches == [[f"a{i}" for i in range(5)]] and not any(t.done() for t in first + late)
    gate.set()
    # The old node waited for 3 more writes (or 60 s) before committing these two.
    await asyncio.wait_for(asyncio.gather(*first, *late), 10.0)
    assert batches == [[f"a{i}" for i in range(5)], ["b0", "b1"]]
    assert (await b.status()).counters["fsyncs"] >= 2
    assert (await b.get("b1", Consistency.DEFAULT, None)).value == b"v"
    b.storage.commit = commit  # type: ignore[method-assign]
    await b.before_shutdown()
    await b.close()


async def test_writes_dedup_refusals_and_restart(tmp_path: Path) -> None:
    b = await _backend(tmp_path)
    h = await b.put("a", b"1", RequestId("c", 1), None)
    assert h.stale_possible and h.hlc is not None and h.hlc.node_id == "n1"
    r = await b.get("a", Consistency.DEFAULT, None)
    assert r.value == b"1" and r.header.hlc == h.hlc
    inc = await b.increment("ctr", 5, RequestId("c", 2), None)
    again = await b.increment("ctr", 5, RequestId("c", 2), None)  # retried: applied once
    assert inc.value == again.value == 5 and inc.header.hlc == again.header.hlc
    await b.put("w", b"0", RequestId("c", 10), None)  # out of order: still in the window
    assert (await b.increment("ctr", 1, RequestId("c", 9), None)).value == 6
    for seq in range(11, 11 + b.opts.dedup_window):
        await b.put("w", b"%d" % seq, RequestId("c", seq), None)
    with pytest.raises(errors.OutcomeUnknown, match="too old") as unknown:
        await b.increment("ctr", 5, RequestId("c", 9), None)  # fell out of the window
    assert unknown.value.code == grpc.StatusCode.UNKNOWN and not unknown.value.definite
    assert (await b.get("ctr", Consistency.LOCAL, None)).value == 6  # the retry was not applied
    with pytest.raises(errors.FailedPrecondition, match="counter"):
        await b.put("ctr", b"x", None, None)
    with pytest.raises(errors.OutOfRange):
        await b.increment("ctr", 2**63 - 1, None, None)
    with pytest.raises(errors.FailedPrecondition, match="available"):
        await b.compare_and_swap("a", None, b"x", None, None)
    with pytest.raises(errors.FailedPrecondition, match="available"):
        await b.get("a", Consistency.LINEARIZABLE, None)
    d = await b.delete("a", RequestId("c", 500), None)
    assert d.existed
    st = await b.status()
    assert st.keys == 2 and st.counters["tombstones"] == 1 and st.counters["fsyncs"] >= 1
    await b.before_shutdown()
    await b.close()

    b2 = await _backend(tmp_path)  # restart: state, dedup table and HLC survive
    assert (await b2.get("ctr", Consistency.LOCAL, None)).value == 6
    assert (await b2.get("a", Consistency.LOCAL, None)).value is None
    replay = await b2.delete("a", RequestId("c", 500), None)
    with pytest.raises(errors.OutcomeUnknown, match="too old"):
        await b2.increment("ctr", 5, RequestId("c", 9), None)  # the low-water mark survived
    assert replay.existed and replay.header.hlc == d.header.hlc
    assert d.header.hlc is not None
    b2.clock.skew_ms = -3_600_000
    h2 = await b2.put("b", b"2", None, None)
    assert h2.hlc is not None
    assert (h2.hlc.wall_ms, h2.hlc.logical) > (d.header.hlc.wall_ms, d.header.hlc.logical)
    entries = [e async for e in b2.dump("", 0)]
    assert [e.key for e in entries] == ["a", "b", "ctr", "w"]
    assert entries[0].tombstone
    # one component, the node's (named node/epoch: the epoch of this copy of its data)
    ((component, total),) = entries[2].counter_increments.items()
    assert component.startswith("n1/") and total == 6
    await b2.close()


async def test_a_write_is_not_visible_before_it_is_durable(tmp_path: Path) -> None:
    """The core applies a write at once; reads served it before its fsync, so a crash
    could erase a value a client had already read (issue 13)."""
    b = await _backend(tmp_path)
    await b.put("k", b"old", None, None)
    assert b.storage is not None
    gate, entered = threading.Event(), threading.Event()
    commit = b.storage.commit

    def held_commit(batch: Any) -> None:
        entered.set()
        gate.wait(10)
        commit(batch)

    b.storage.commit = held_commit  # type: ignore[method-assign]
    put = asyncio.create_task(b.put("k", b"new", None, None))
    read = asyncio.create_task(b.get("k", Consistency.LOCAL, None))

    async def first_entry() -> kv_pb2.DumpEntry:
        return await anext(aiter(b.dump("", 0)))

    dump = asyncio.create_task(first_entry())
    # The read and the dump ran before the flusher took the batch (tasks run in the order
    # they became ready): once its commit is under way they have answered, or wait for it.
    await eventually(entered.is_set, 5.0, 0.001)
    assert not read.done() and not dump.done() and not put.done()
    assert b.core.get("k") is not None  # applied in memory all the same
    gate.set()
    assert (await read).value == b"new"
    assert (await dump).value == b"new"
    await put
    b.storage.commit = commit  # type: ignore[method-assign]
    await b.before_shutdown()
    await b.close()


async def test_a_full_disk_is_retried_and_refuses_new_writes_meanwhile(tmp_path: Path) -> None:
    """A full disk answered UNKNOWN "cannot rollback - no transaction is active" and
    left the write in memory (issue 13): now the commit is retried until space is back,
    new writes are refused (definitely not applied) with the reason, health says why."""
    b = await _backend(tmp_path)
    assert b.storage is not None
    commit = b.storage.commit
    full = threading.Event()
    full.set()
    calls = 0

    def commit_on_a_full_disk(batch: Any) -> None:
        nonlocal calls
        calls += 1
        if full.is_set():
            raise DiskFullError(f"the disk holding {tmp_path} is full (ENOSPC)")
        commit(batch)

    b.storage.commit = commit_on_a_full_disk  # type: ignore[method-assign]
    first = asyncio.create_task(b.put("k", b"v", None, None))
    await eventually(lambda: b.disk_full is not None, 5.0, 0.001)
    assert not first.done()
    with pytest.raises(errors.Unavailable, match="full") as refused:
        await b.put("other", b"x", None, None)
    assert refused.value.definite
    assert b.health() == (False, f"disk full: the disk holding {tmp_path} is full (ENOSPC)")
    await eventually(lambda: calls >= 3, 10.0, 0.001)  # retried
    full.clear()
    await asyncio.wait_for(first, 10.0)
    assert b.health() == (True, "")
    await b.put("other", b"x", None, None)
    b.storage.commit = commit  # type: ignore[method-assign]
    await b.before_shutdown()
    await b.close()
    b2 = await _backend(tmp_path)
    assert (await b2.get("k", Consistency.LOCAL, None)).value == b"v"
    await b2.close()


async def test_a_storage_failure_stops_the_node_with_the_reason(tmp_path: Path) -> None:
    b = await _backend(tmp_path)
    assert b.storage is not None

    def failing_commit(batch: Any) -> None:
        raise FatalStorageError(f"fsync of {tmp_path}/gossip.0.log failed: EIO")

    b.storage.commit = failing_commit  # type: ignore[method-assign]
    with pytest.raises(errors.OutcomeUnknown, match="EIO"):
        await b.put("k", b"v", None, None)
    assert b.failed_event.is_set() and b.failed is not None and "EIO" in b.failed
    assert b.health()[0] is False
    with pytest.raises(errors.Unavailable, match="failed"):
        await b.put("k2", b"v", None, None)
    await b.close()


async def test_an_unreadable_store_stops_start_up_with_one_line_naming_the_file(
    tmp_path: Path,
) -> None:
    """A truncated database failed start-up with a raw traceback that did not name the
    file (issue 13)."""
    b = await _backend(tmp_path)
    await b.put("k", b"v", None, None)
    await b.before_shutdown()
    await b.close()
    current = tmp_path / "CURRENT"
    current.write_bytes(current.read_bytes()[:7])  # truncated
    config = NodeConfig("gossip", "n1", "127.0.0.1:0", {}, str(tmp_path))
    b2 = build_backend(config, SkewableClock())
    with pytest.raises(errors.Unavailable) as e:
        await b2.start(grpc.aio.server())
    assert str(current) in e.value.message and "\n" not in e.value.message
    assert "cannot start" in e.value.message


async def test_a_request_id_reused_with_another_payload_is_refused(tmp_path: Path) -> None:
    """The reviewer's repro: incr k delta=1 rid R -> 1; incr k delta=100 rid R -> 1;
    put k 'first' rid R2 -> ok; put k 'second' rid R2 -> ok, never written (get: 'first').
    The second of each pair is now refused, also after a restart (the digest is stored
    with the record); true retries are still answered."""
    b = await _backend(tmp_path)
    assert (await b.increment("n", 1, RequestId("c", 1), None)).value == 1
    with pytest.raises(errors.FailedPrecondition) as refused:
        await b.increment("n", 100, RequestId("c", 1), None)
    assert str(refused.value.message) == (
        "request sequence 1 of client 'c' was already used for an increment of key 'n' "
        "with another delta; not applied"
    )
    await b.put("k", b"first", RequestId("c", 2), None)
    with pytest.raises(
        errors.FailedPrecondition,
        match=r"^request sequence 2 of client 'c' was already used for a put of key 'k' "
        r"with another value; not applied$",
    ):
        await b.put("k", b"second", RequestId("c", 2), None)
    assert (await b.increment("n", 1, RequestId("c", 1), None)).value == 1  # a true retry
    await b.put("k", b"first", RequestId("c", 2), None)
    await b.delete("gone", RequestId("c", 3), None)
    await b.before_shutdown()
    await b.close()

    b2 = await _backend(tmp_path)
    with pytest.raises(errors.FailedPrecondition, match="with another delta"):
        await b2.increment("n", 100, RequestId("c", 1), None)
    with pytest.raises(errors.FailedPrecondition, match="with another value"):
        await b2.put("k", b"second", RequestId("c", 2), None)
    assert not (await b2.delete("gone", RequestId("c", 3), None)).existed  # no payload
    assert (await b2.get("n", Consistency.LOCAL, None)).value == 1
    assert (await b2.get("k", Consistency.LOCAL, None)).value == b"first"
    await b2.close()


async def test_records_written_before_payload_digests_still_answer_retries(
    tmp_path: Path,
) -> None:
    """Records without a digest (an earlier version's, stored before it kept one; and the
    per-node exactly-once table of older versions still, which kept no key either) answer
    a retry of their operation (and key) from the record, whatever its payload."""
    s = GossipStorage(tmp_path)
    s.load()
    ts = Timestamp(SkewableClock().wall_ms(), 0, "n1")
    s.commit(
        CommitBatch(
            kv={
                "k": Register(ts, b"first"),
                applied_key("old", 1): Applied(ts, "n1", "put", "k", 0, 0),
            },
            dedup={("legacy", 1): DedupEntry("legacy", 1, "increment", ts, 7)},
            hlc=ts,
        )
    )
    s.close()
    b = await _backend(tmp_path)
    h = await b.put("k", b"second", RequestId("old", 1), None)  # answered from the record
    assert h.hlc is not None and (h.hlc.wall_ms, h.hlc.logical) == (ts.wall_ms, ts.logical)
    with pytest.raises(errors.FailedPrecondition, match="already used for a put of key 'k'"):
        await b.put("other", b"x", RequestId("old", 1), None)  # the key is known
    assert (await b.increment("n", 3, RequestId("legacy", 1), None)).value == 7
    assert (await b.get("k", Consistency.LOCAL, None)).value == b"first"
    assert (await b.get("n", Consistency.LOCAL, None)).value is None
    await b.close()
