"""The Raft store's node: a thin asyncio/gRPC shell around the sans-IO RaftCore.

Theory of operation
-------------------
One *driver* task owns the core's Ready loop. Client requests never touch the
log directly: proposals and read requests are queued, and on each iteration the
driver hands every queued proposal to the core at once (`propose_batch`: one
log append and one Append per follower for the whole batch), then takes the
Ready and processes it in the order the core demands:

1. persist snapshot/entries/hard state in one SQLite transaction (fsync), on a
   single storage thread so the event loop keeps serving while the disk works
   (requests arriving meanwhile form the next batch: group commit);
2. send the messages (batched per peer on its stream);
3. restore a received snapshot, apply committed entries to the KV state
   machine and resolve the futures of the proposals they answer;
4. release linearizable reads whose ReadIndex point has been applied, fail
   dropped ones;
5. `advance()`, then compact the log when it grew past the threshold.

A client write is therefore acknowledged only after its entry is committed
(durable on a majority, including the leader) and applied. A proposal whose
index gets committed with a different term was definitely overwritten
(UNAVAILABLE, not applied); proposals still pending when this node stops being
leader get UNKNOWN (a new leader may still commit them).

Followers forward client writes to the leader (one hop: a forwarded request is never
forwarded again) and serve linearizable reads themselves: they ask the leader for a
read point (ReadIndex, batched like the leader's own reads) and answer from their
own state machine once it has applied that point. A node that knows no leader, or a
leader that has not heard from a majority within an election timeout, refuses at
once with UNAVAILABLE and the reason; since followers forget the leader after one
election timeout of silence and leaders step down after one without a quorum (check-
quorum), a client on the minority side of a partition gets a definite refusal within
about one election timeout.

Peer messages travel on one long-lived `Stream` per peer (caplab.peer); a cut link
drops messages instead of blocking a sender (Raft tolerates loss); snapshots travel
chunked on `InstallSnapshot`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from caplab import errors
from caplab.clock import SkewableClock
from caplab.logs import get_logger
from caplab.peer import InboundStreams, StreamSender, peer_channel
from caplab.raft.v1 import raft_pb2 as pb
from caplab.raft.v1 import raft_pb2_grpc as pb_grpc
from caplab.store import (
    FORWARDED_BY_KEY,
    CasResult,
    Consistency,
    DeleteResult,
    Header,
    IncrementResult,
    NodeConfig,
    ReadResult,
    forwarded_by,
    parse_int_options,
)
from caplab.v1 import kv_pb2, kv_pb2_grpc
from caplab.validation import RequestId
from raft.codec import from_pb, to_pb
from raft.core import RaftConfig, RaftCore, Ready, Role
from raft.messages import (
    Append,
    EntryKind,
    HardState,
    InstallSnapshot,
    Message,
    Snapshot,
    SnapshotMeta,
)
from raft.statemachine import OVERFLOW, STALE, TYPE_CONFLICT, KvStateMachine
from raft.storage import RaftStorage

log = get_logger("raft.node")
T = TypeVar("T")

SNAPSHOT_CHUNK = 512 * 1024
ROLE_NAMES = {
    Role.LEADER: "leader",
    Role.FOLLOWER: "follower",
    Role.CANDIDATE: "candidate",
    Role.PRE_CANDIDATE: "pre-candidate",
}


_MAY_BE_ZERO = frozenset({"inline_sync_max"})


@contextlib.contextmanager
def _logged(event: str) -> Iterator[None]:
    """Log an exception escaping the block (with its traceback), then let it go on."""
    try:
        yield
    except Exception:
        log.exception(event)
        raise


@dataclass(frozen=True)
class RaftOptions:
    """Tuning, from `caplab node --set NAME=VALUE` (defaults suit a local demo)."""

    tick_ms: int = 50  # one core tick; heartbeat = heartbeat_ticks * tick_ms
    heartbeat_ticks: int = 1  # 50 ms
    election_ticks: int = 6  # election timeout randomized in [300, 600) ms
    snapshot_entries: int = 10_000  # compact the log once it holds this many applied entries
    max_inflight: int = 2  # unacknowledged Appends per follower (few, large batches: CPU-bound)
    max_entries_per_msg: int = 512
    max_pending: int = 20_000  # proposals + reads in flight before RESOURCE_EXHAUSTED
    peer_queue: int = 4096  # messages queued per peer before dropping
    forward_timeout_ms: int = 2000  # cap on a forwarded request's deadline
    # Batching under load: while requests arrive concurrently, a new batch goes to the
    # core at most every *_batch_us, or once *_batch_max are waiting (see _BatchGate). A
    # lone request goes at once. A batch of reads costs one heartbeat round; of writes,
    # one log append, one fsync per node and one Append per follower.
    read_batch_us: int = 4000
    read_batch_max: int = 64
    write_batch_us: int = 5000
    write_batch_max: int = 256
    # A Ready with at most this many entries, while at most this many writes are in
    # flight and none waits behind them, is made durable on the loop thread (0: never):
    # a lone write then skips two thread hand-offs (~0.4 ms at concurrency 1). Under
    # load the disk thread does it, so that the loop keeps serving and batches stay
    # large (inline fsyncs there halve throughput).
    inline_sync_max: int = 1

    @classmethod
    def parse(cls, options: dict[str, str]) -> RaftOptions:
        values = parse_int_options("raft", cls.__dataclass_fields__, options, _MAY_BE_ZERO)
        return cls(**values)

    @property
    def election_timeout_s(self) -> float:
        return self.election_ticks * self.tick_ms / 1000


@dataclass
class _Pending:
    term: int
    future: asyncio.Future[pb.CommandResult]


class _BatchGate:
    """When queued requests may go to the core as one batch (see RaftOptions *_batch_us).

    Every batch has a fixed cost (messages, an fsync) that under load exceeds the cost of
    the requests in it. So once requests arrive concurrently (the previous batch had
    several), a new batch gathers for up to `interval_us` after the previous one went,
    unless `max_batch` are waiting. A request with no company goes at once, so light
    load sees no added latency."""

    def __init__(self, interval_us: int, max_batch: int, wake: asyncio.Event) -> None:
        self.interval = interval_us / 1e6
        self.max_batch = max_batch
        self.wake = wake
        self.last_at = 0.0  # loop time the previous batch went
        self.last_size = 0  # requests in it
        self.timer: asyncio.TimerHandle | None = None

    @property
    def waiting(self) -> bool:
        """A batch is being held; the timer will wake the driver."""
        return self.timer is not None

    def open(self, queued: int) -> bool:
        loop = asyncio.get_running_loop()
        now = loop.time()
        opens_at = self.last_at + self.interval
        if self.last_size > 1 and now < opens_at and queued < self.max_batch:
            if self.timer is None:
                self.timer = loop.call_at(opens_at, self._fire)
            return False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.last_at, self.last_size = now, queued
        return True

    def _fire(self) -> None:
        self.timer = None
        self.wake.set()


class PeerLink:
    """Everything this node sends to one peer: batched Raft messages, chunked snapshots,
    and forwarded client requests (over the same channel)."""

    def __init__(self, node: RaftBackend, peer_id: str, address: str) -> None:
        self.node = node
        self.peer_id = peer_id
        self.address = address
        self.channel = peer_channel(address)
        self.stub = pb_grpc.RaftPeerStub(self.channel)
        self.kv = kv_pb2_grpc.KVStub(self.channel)
        self.snapshot_task: asyncio.Task[None] | None = None
        self.sender: StreamSender[pb.RaftMessage, pb.Batch] = StreamSender(
            self.stub.Stream,
            lambda messages: pb.Batch(messages=messages),
            timeout=max(0.2, node.opts.election_timeout_s),
            max_queue=node.opts.peer_queue,
            counters=node.counters,
        )

    def send(self, m: Message) -> None:
        if isinstance(m, InstallSnapshot):
            if self.snapshot_task is None or self.snapshot_task.done():
                self.snapshot_task = asyncio.create_task(self._send_snapshot(m))
            return
        self.sender.push(to_pb(m))

    async def _send_snapshot(self, m: InstallSnapshot) -> None:
        snap = m.snapshot
        data = snap.data
        crc = zlib.crc32(data)

        def chunks() -> list[pb.SnapshotChunk]:
            out = []
            for off in range(0, max(len(data), 1), SNAPSHOT_CHUNK):
                out.append(
                    pb.SnapshotChunk(
                        sender=m.frm,
                        to=m.to,
                        term=m.term,
                        index=snap.meta.index,
                        snapshot_term=snap.meta.term,
                        total_size=len(data),
                        offset=off,
                        data=data[off : off + SNAPSHOT_CHUNK],
                        crc32=crc if off + SNAPSHOT_CHUNK >= len(data) else 0,
                    )
                )
            return out

        async def gen() -> AsyncIterator[pb.SnapshotChunk]:
            for c in chunks():
                yield c

        try:
            ack = await self.stub.InstallSnapshot(gen(), timeout=30 + len(data) / 1e6)
            self.node.counters["snapshots_sent"] += 1
            if not ack.accepted:
                log.warning("snapshot_refused", peer=self.peer_id, reason=ack.reason)
        except grpc.aio.AioRpcError as e:
            # The core re-probes a follower stuck in SNAPSHOT state after an election timeout.
            log.info("snapshot_send_failed", peer=self.peer_id, code=e.code().name)

    async def close(self) -> None:
        if self.snapshot_task is not None:
            self.snapshot_task.cancel()
        await self.sender.close()
        await self.channel.close()


class RaftPeerServicer(pb_grpc.RaftPeerServicer):
    def __init__(self, node: RaftBackend) -> None:
        self.node = node

    async def Stream(
        self, request_iterator: AsyncIterator[pb.Batch], context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.BatchAck:
        await self.node.inbound.serve(request_iterator, self._deliver)
        return pb.BatchAck()

    def _deliver(self, batch: pb.Batch) -> Awaitable[None] | None:
        node = self.node
        for raw in batch.messages:
            if raw.to != node.id or raw.sender not in node.peers:
                continue
            node.core.step(from_pb(raw))
        node.counters["messages_received"] += len(batch.messages)
        rest = node.answer_now()
        node.wake.set()  # (after the answer's sender was woken: it goes first)
        return rest

    async def InstallSnapshot(
        self,
        request_iterator: AsyncIterator[pb.SnapshotChunk],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.SnapshotAck:
        parts: list[bytes] = []
        first: pb.SnapshotChunk | None = None
        size = 0
        last_crc = 0
        async for chunk in request_iterator:
            if first is None:
                first = chunk
            if chunk.offset != size:
                return pb.SnapshotAck(accepted=False, reason="chunks out of order")
            parts.append(chunk.data)
            size += len(chunk.data)
            last_crc = chunk.crc32
        if first is None:
            return pb.SnapshotAck(accepted=False, reason="empty snapshot stream")
        data = b"".join(parts)
        if len(data) != first.total_size or zlib.crc32(data) != last_crc:
            return pb.SnapshotAck(accepted=False, reason="snapshot size or CRC mismatch")
        if first.to != self.node.id or first.sender not in self.node.peers:
            return pb.SnapshotAck(accepted=False, reason="snapshot not addressed to this node")
        snap = Snapshot(SnapshotMeta(first.index, first.snapshot_term), data)
        self.node.core.step(InstallSnapshot(first.sender, first.to, first.term, snap))
        self.node.counters["snapshots_received"] += 1
        self.node.wake.set()
        return pb.SnapshotAck(accepted=True)


class RaftBackend:
    """The CP store as the shared runtime sees it (caplab.store.StoreBackend)."""

    kind: int = kv_pb2.STORE_KIND_RAFT

    def __init__(self, config: NodeConfig, clock: SkewableClock) -> None:
        self.config = config
        self.clock = clock
        self.id = config.node_id
        self.peers = dict(config.peers)
        self.opts = RaftOptions.parse(config.options)
        self.sm = KvStateMachine()
        self.storage: RaftStorage | None = None
        self._core: RaftCore | None = None
        self.wake = asyncio.Event()
        self.links: dict[str, PeerLink] = {}
        self.inbound = InboundStreams()
        self.counters: dict[str, int] = {
            k: 0
            for k in (
                "messages_sent",
                "messages_received",
                "messages_dropped",
                "snapshots_sent",
                "snapshots_received",
                "proposals",
                "batches",
                "reads",
                "forwarded",
                "fsyncs",
                "fsyncs_inline",
            )
        }
        self._queued: list[tuple[bytes, asyncio.Future[pb.CommandResult]]] = []
        self._handoff: Ready | None = None  # taken by answer_now(), for the driver
        self._pending: dict[int, _Pending] = {}
        self._queued_reads: list[tuple[int, asyncio.Future[int]]] = []
        self._read_gate = _BatchGate(self.opts.read_batch_us, self.opts.read_batch_max, self.wake)
        self._write_gate = _BatchGate(
            self.opts.write_batch_us, self.opts.write_batch_max, self.wake
        )
        self._reads: dict[int, asyncio.Future[int]] = {}
        self._apply_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._read_ids = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self._disk = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"raft-disk-{self.id}")
        self._stopping = False
        self._was_leader = False
        self._view: tuple[Role, int, str | None] | None = None
        self._compacting = False
        # storage calls under way on the disk thread: while any is (a compaction, say),
        # saves go there too, behind it, instead of inline (see `_inline_ok`)
        self._disk_busy = 0
        self._durable_hs = HardState(0, None, 0)
        self._lazy_hs: HardState | None = None

    @property
    def core(self) -> RaftCore:
        assert self._core is not None, "node not started"
        return self._core

    async def _disk_call(self, fn: Callable[..., T], *args: Any) -> T:
        self._disk_busy += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._disk, fn, *args)
        finally:
            self._disk_busy -= 1

    # -- lifecycle -------------------------------------------------------------------
    async def start(self, server: grpc.aio.Server) -> None:
        self.storage = RaftStorage(self.config.data_dir)
        hs, snap, entries = await self._disk_call(self.storage.load)
        self._durable_hs = hs
        if snap is not None:
            self.sm.restore(snap.data)
        cfg = RaftConfig(
            election_ticks=self.opts.election_ticks,
            heartbeat_ticks=self.opts.heartbeat_ticks,
            max_inflight=self.opts.max_inflight,
            max_entries_per_msg=self.opts.max_entries_per_msg,
        )
        self._core = RaftCore(
            self.id,
            [self.id, *self.peers],
            cfg,
            random.Random(),
            hard_state=hs,
            snapshot=snap,
            entries=entries,
        )
        log.info(
            "raft_restored",
            term=hs.term,
            commit=hs.commit,
            snapshot_index=snap.meta.index if snap else 0,
            entries=len(entries),
        )
        pb_grpc.add_RaftPeerServicer_to_server(RaftPeerServicer(self), server)
        for peer_id, addr in self.peers.items():
            link = PeerLink(self, peer_id, addr)
            link.sender.start()
            self.links[peer_id] = link
        self._tasks = [
            asyncio.create_task(self._ticker()),
            asyncio.create_task(self._driver()),
        ]

    async def before_shutdown(self) -> None:
        """Hand leadership to the most up-to-date follower so a restart costs no election."""
        self._stopping = True
        core = self.core
        if core.role is not Role.LEADER or not self.peers:
            return
        progress = core.progress()
        target = max(progress, key=lambda p: (progress[p], p))
        if not core.transfer_leadership(target):
            return
        self.wake.set()
        log.info("leader_transfer", to=target)
        deadline = time.monotonic() + 2 * self.opts.election_timeout_s
        while time.monotonic() < deadline and core.leader_id in (self.id, None):  # noqa: ASYNC110
            await asyncio.sleep(self.opts.tick_ms / 1000)
        log.info("leader_transfer_done", leader=core.leader_id)

    def stop_peer_streams(self) -> None:
        self.inbound.close()

    async def close(self) -> None:
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for link in self.links.values():
            await link.close()
        self._fail_all(errors.Unavailable("node is shutting down; not applied"))
        if self.storage is not None and self._lazy_hs is not None:
            await self._disk_call(self.storage.save, self._lazy_hs)
        self._disk.shutdown(wait=True)
        if self.storage is not None:
            self.storage.close()

    # -- the loop ----------------------------------------------------------------------
    async def _ticker(self) -> None:
        interval = self.opts.tick_ms / 1000
        next_at = time.monotonic()
        while True:
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            self.core.tick()
            self.wake.set()

    async def _driver(self) -> None:
        core = self.core
        while True:
            await self.wake.wait()
            # Let every client request that is already runnable join this batch first (a
            # follower has none to wait for: it answers the leader at once; nor has a
            # leader with one write and nothing else in flight: it goes at once).
            if core.role is Role.LEADER and (
                self._pending or self._queued_reads or len(self._queued) != 1
            ):
                await asyncio.sleep(0)
            self.wake.clear()
            with _logged("driver_failed"):
                self._hand_over_queued()
                rd, self._handoff = self._handoff or core.ready(), None
                if rd is not None:
                    await self._process(rd)
                    core.advance(rd)
                await self._maybe_compact()
                self._check_leadership()
            if (
                core.has_ready()
                or self._handoff is not None
                or (self._queued and not self._write_gate.waiting)
                or (self._queued_reads and not self._read_gate.waiting)
            ):
                self.wake.set()

    def _hand_over_queued(self) -> None:
        core = self.core
        if self._queued and self._write_gate.open(len(self._queued)):
            queued, self._queued = self._queued, []
            live = [(d, f) for d, f in queued if not f.done()]
            idxs = core.propose_batch([d for d, _ in live]) if live else []
            if idxs is None:
                reason = self._not_leader_reason()
                for _, f in live:
                    f.set_exception(reason)
            else:
                for idx, (_, f) in zip(idxs, live, strict=True):
                    self._pending[idx] = _Pending(core.term, f)
                self.counters["proposals"] += len(idxs)
                self.counters["batches"] += 1
        if self._queued_reads and self._read_gate.open(len(self._queued_reads)):
            reads, self._queued_reads = self._queued_reads, []
            for rid, rf in reads:
                if rf.done():
                    continue
                if core.read_index(rid):
                    self._reads[rid] = rf
                else:
                    rf.set_exception(self._not_leader_reason())

    async def _process(self, rd: Ready) -> None:
        # A leader's Appends promise nothing about its own disk: they leave now, in
        # parallel with its fsync (the core counts its own copy only once durable).
        sent_early = self._send_appends(rd)
        hs = self._hard_state_to_save(rd)
        if rd.snapshot is not None or rd.entries or hs is not None:
            if self._inline_ok(rd):
                if sent_early:
                    await asyncio.sleep(0)  # let the Appends leave before the disk blocks
                self._save_inline(hs, rd)
            else:
                assert self.storage is not None
                await self._disk_call(self.storage.save, hs, rd.entries, rd.snapshot)
                self._saved(hs)
        self._after_persist(rd)

    def _send_appends(self, rd: Ready) -> bool:
        """Send the Ready's Appends (and say whether there were any)."""
        sent = False
        for m in rd.messages:
            if isinstance(m, Append) and (link := self.links.get(m.to)) is not None:
                link.send(m)
                sent = True
        return sent

    def _hard_state_to_save(self, rd: Ready) -> HardState | None:
        """The hard state `rd` must persist; a commit-only change is parked in `_lazy_hs`
        instead (idempotent: asking twice for one Ready gives the same answer)."""
        hs = rd.hard_state
        durable = self._durable_hs
        if (
            hs is not None
            and not rd.entries
            and rd.snapshot is None
            and (hs.term, hs.vote) == (durable.term, durable.vote)
        ):
            # Only the commit index moved: it need not be durable before anything (a
            # restarted node learns it again from the leader), so it rides along with
            # the next write instead of costing an fsync on the commit path.
            self._lazy_hs = hs
            return None
        if hs is None and (rd.entries or rd.snapshot is not None):
            return self._lazy_hs
        return hs

    def _lone(self) -> bool:
        """Few writes in flight and none waiting (see RaftOptions.inline_sync_max)."""
        return len(self._pending) <= self.opts.inline_sync_max and not self._queued

    def _inline_ok(self, rd: Ready) -> bool:
        return (
            rd.snapshot is None
            and len(rd.entries) <= self.opts.inline_sync_max
            and self._lone()
            and not self._disk_busy  # the storage lock would block the loop meanwhile
        )

    def _save_inline(self, hs: HardState | None, rd: Ready) -> None:
        assert self.storage is not None
        self.storage.save(hs, rd.entries)
        self.counters["fsyncs_inline"] += 1
        self._saved(hs)

    def _saved(self, hs: HardState | None) -> None:
        self.counters["fsyncs"] += 1
        if hs is not None:
            self._durable_hs, self._lazy_hs = hs, None

    def _finish(self, rd: Ready, send: bool = True) -> None:
        with _logged("driver_failed"):
            self._after_persist(rd, send=send)
            self.core.advance(rd)
            self._check_leadership()

    def answer_now(self) -> Awaitable[None] | None:
        """Fast path, called right after incoming messages were stepped: process the
        resulting Ready to the end now if it needs no disk thread, sparing a hop through
        the driver task. On a follower that includes a lone Append (fsynced on the loop
        thread); on a leader, acknowledgements that commit entries (applied and answered
        at once) and heartbeat answers that confirm reads. Anything else is handed to the
        driver, and so is everything on a leader under load. Returns None if it left the
        Ready to the driver, else what the caller (the stream reader) must await before
        reading on: a follower's answer leaves first, then it applies committed entries.
        """
        core = self.core
        if self._handoff is not None or core.role not in (Role.FOLLOWER, Role.LEADER):
            return None
        if core.role is Role.LEADER and not self._lone():
            # under load the driver gathers many acknowledgements into one Ready: cheaper
            return None
        rd = core.ready()  # None while the driver is processing one (it is outstanding)
        if rd is None:
            return None
        hs = self._hard_state_to_save(rd)
        persist = bool(rd.entries) or hs is not None or rd.snapshot is not None
        # (a leader's entries must go to its followers before its own disk blocks)
        if persist and (core.role is Role.LEADER or not self._inline_ok(rd)):
            self._handoff = rd
            return None
        # As in the driver, a failure leaves the Ready outstanding: nothing more is
        # acknowledged.
        with _logged("driver_failed"):
            self._send_appends(rd)  # heartbeats, or entries already durable here
            if persist:
                self._save_inline(hs, rd)
            if core.role is Role.FOLLOWER and rd.committed_entries:
                self._send_after_persist(rd)
                return self._apply_later(rd)
        self._finish(rd)
        return asyncio.sleep(0)  # the answer leaves before the reader reads on

    async def _apply_later(self, rd: Ready) -> None:
        await asyncio.sleep(0)  # the answer leaves first (the Ready stays outstanding)
        self._finish(rd, send=False)
        if self.core.has_ready():
            self.wake.set()

    def _send_after_persist(self, rd: Ready) -> None:
        for m in rd.messages:
            if isinstance(m, Append):
                continue
            link = self.links.get(m.to)
            if link is not None:
                link.send(m)

    def _after_persist(self, rd: Ready, send: bool = True) -> None:
        if send:
            self._send_after_persist(rd)
        if rd.snapshot is not None:
            self.sm.restore(rd.snapshot.data)
            for idx in [i for i in self._pending if i <= rd.snapshot.meta.index]:
                p = self._pending.pop(idx)
                if not p.future.done():
                    p.future.set_exception(
                        errors.OutcomeUnknown(
                            "this node installed a snapshot past the write; its outcome is unknown"
                        )
                    )
        for e in rd.committed_entries:
            result = self.sm.apply(e.index, e.data) if e.kind is EntryKind.COMMAND else None
            pend = self._pending.pop(e.index, None)
            if pend is None or pend.future.done():
                continue
            if pend.term != e.term:
                pend.future.set_exception(
                    errors.Unavailable(
                        "the write was overwritten by a new leader before it committed; "
                        "not applied (retry)"
                    )
                )
            elif result is not None:
                pend.future.set_result(result)
        applied = self.applied_index(rd)
        for rs in rd.read_states:
            f = self._reads.pop(rs.request_id, None)
            if f is not None and not f.done():
                f.set_result(rs.index)
        for rid in rd.dropped_reads:
            f = self._reads.pop(rid, None)
            if f is not None and not f.done():
                f.set_exception(
                    errors.Unavailable(
                        f"node {self.id}: no leader confirmed the read point (leadership "
                        "changed, or the leader is unreachable); read not served, retry"
                    )
                )
        if self._apply_waiters:
            still = []
            for idx, w in self._apply_waiters:
                if idx <= applied:
                    if not w.done():
                        w.set_result(None)
                else:
                    still.append((idx, w))
            self._apply_waiters = still

    def applied_index(self, rd: Ready | None = None) -> int:
        idx = self.core.applied_index
        if rd is not None:
            if rd.committed_entries:
                idx = max(idx, rd.committed_entries[-1].index)
            if rd.snapshot is not None:
                idx = max(idx, rd.snapshot.meta.index)
        return idx

    def _check_leadership(self) -> None:
        core = self.core
        view = (core.role, core.term, core.leader_id)
        if view != self._view:
            log.info(
                "raft_role",
                role=ROLE_NAMES[core.role],
                term=core.term,
                leader=core.leader_id,
                commit=core.commit_index,
            )
            self._view = view
        is_leader = self.core.role is Role.LEADER
        if self._was_leader and not is_leader and (self._pending or self._reads):
            err = errors.OutcomeUnknown(
                "this node lost leadership while the write was in flight; a new leader may "
                "still commit it (outcome unknown)"
            )
            for p in self._pending.values():
                if not p.future.done():
                    p.future.set_exception(err)
            for f in self._reads.values():
                if not f.done():
                    f.set_exception(errors.Unavailable("leadership lost; read not served; retry"))
            self._pending.clear()
            self._reads.clear()
        self._was_leader = is_leader

    async def _maybe_compact(self) -> None:
        core = self.core
        applied = core.applied_index
        if self._compacting or applied - core.first_index < self.opts.snapshot_entries:
            return
        term = core.log_term(applied)
        if term is None:
            return
        self._compacting = True
        try:
            snap = Snapshot(SnapshotMeta(applied, term), self.sm.snapshot())
            assert self.storage is not None
            await self._disk_call(self.storage.compact, snap)
            core.compact(applied, snap.data)
            log.info("log_compacted", index=applied, snapshot_bytes=len(snap.data))
        finally:
            self._compacting = False

    def _fail_all(self, err: errors.StoreError) -> None:
        for _, f in self._queued:
            if not f.done():
                f.set_exception(err)
        for p in self._pending.values():
            if not p.future.done():
                p.future.set_exception(
                    errors.OutcomeUnknown("node shut down with the write in flight")
                )
        for rf in [*self._reads.values(), *(f for _, f in self._queued_reads)]:
            if not rf.done():
                rf.set_exception(err)
        self._queued.clear()
        self._pending.clear()
        self._reads.clear()
        self._queued_reads.clear()

    # -- leadership and forwarding -----------------------------------------------------
    def _leader_address(self, leader: str | None) -> str | None:
        if leader is None:
            return None
        if leader == self.id:
            return self.config.advertise or self.config.listen
        return self.peers.get(leader)

    def _not_leader_reason(self) -> errors.Unavailable:
        core = self.core
        leader = core.leader_id
        if self._stopping:
            return errors.Unavailable("this node is shutting down; not applied (retry elsewhere)")
        if leader is None:
            return errors.Unavailable(
                f"no leader: node {self.id} ({ROLE_NAMES[core.role]}, term {core.term}) cannot "
                "reach a majority of the cluster (election in progress or network partition); "
                "not applied"
            )
        if leader == self.id:
            if core.transferring_to is not None:
                return errors.Unavailable(
                    f"leadership is being transferred to {core.transferring_to}; not applied "
                    "(retry)"
                )
            return errors.Unavailable(
                f"leader {self.id} has not heard from a majority within an election timeout "
                "(it may be partitioned away); not applied"
            )
        return errors.Unavailable(
            f"not the leader; the leader is {leader} at {self._leader_address(leader)}; "
            "not applied",
            leader_id=leader,
            leader_address=self._leader_address(leader),
        )

    def _route(self, forwarded: bool) -> str | None:
        """None: serve here as leader. Else the peer id to forward to. Raises if neither."""
        core = self.core
        if self._stopping:
            raise self._not_leader_reason()
        if core.role is Role.LEADER:
            if core.transferring_to is not None or not core.has_quorum_contact():
                raise self._not_leader_reason()
            return None
        leader = core.leader_id
        if leader is None or forwarded or leader not in self.links:
            raise self._not_leader_reason()
        return leader

    async def _forward(
        self,
        leader: str,
        call: Callable[[kv_pb2_grpc.KVStub, float, tuple[tuple[str, str], ...]], Any],
        timeout: float | None,
    ) -> Any:
        self.counters["forwarded"] += 1
        cap = self.opts.forward_timeout_ms / 1000
        t = cap if timeout is None else max(0.01, min(timeout, cap))
        try:
            return await call(self.links[leader].kv, t, ((FORWARDED_BY_KEY, self.id),))
        except grpc.aio.AioRpcError as e:
            err = errors.classify(e.code(), e.details() or "", tuple(e.trailing_metadata() or ()))
            err.message = f"forwarded to leader {leader}: {err.message}"
            raise err from None

    def _header(self, index: int, stale: bool = False, forwarded_by: str = "") -> Header:
        return Header(
            node_id=self.id,
            term=self.core.term,
            index=index,
            stale_possible=stale,
            forwarded_by=forwarded_by,
        )

    # -- proposals ---------------------------------------------------------------------
    async def _propose(self, cmd: pb.Command) -> tuple[pb.CommandResult, int]:
        if len(self._pending) + len(self._queued) >= self.opts.max_pending:
            raise errors.Overloaded(
                f"{self.opts.max_pending} requests already in flight on leader {self.id}; "
                "not applied (retry with backoff)"
            )
        fut: asyncio.Future[pb.CommandResult] = asyncio.get_running_loop().create_future()
        self._queued.append((cmd.SerializeToString(), fut))
        self.wake.set()
        result = await fut
        if result.status == TYPE_CONFLICT:
            raise errors.FailedPrecondition(result.message)
        if result.status == OVERFLOW:
            raise errors.OutOfRange(result.message)
        if result.status == STALE:
            # An earlier copy may have been applied (its result is forgotten): unknown.
            raise errors.OutcomeUnknown(result.message)
        return result, self.core.applied_index

    @staticmethod
    def _command(key: str, rid: RequestId | None) -> pb.Command:
        c = pb.Command(key=key)
        if rid is not None:
            c.client_id, c.sequence = rid.client_id, rid.sequence
        return c

    @staticmethod
    def _rid_pb(rid: RequestId | None) -> kv_pb2.RequestId | None:
        return (
            None
            if rid is None
            else kv_pb2.RequestId(client_id=rid.client_id, sequence=rid.sequence)
        )

    def _fwd_header(self, h: kv_pb2.ResponseHeader) -> Header:
        return Header(
            node_id=h.node_id,
            term=h.term,
            index=h.index,
            stale_possible=h.stale_possible,
            forwarded_by=self.id,
        )

    async def put(
        self, key: str, value: bytes, rid: RequestId | None, timeout: float | None
    ) -> Header:
        leader = self._route(bool(forwarded_by.get()))
        if leader is not None:
            req = kv_pb2.PutRequest(key=key, value=value, request_id=self._rid_pb(rid))
            resp: kv_pb2.PutResponse = await self._forward(
                leader, lambda s, t, md: s.Put(req, timeout=t, metadata=md), timeout
            )
            return self._fwd_header(resp.header)
        cmd = self._command(key, rid)
        cmd.put = value
        _, index = await self._propose(cmd)
        return self._header(index)

    async def delete(self, key: str, rid: RequestId | None, timeout: float | None) -> DeleteResult:
        leader = self._route(bool(forwarded_by.get()))
        if leader is not None:
            req = kv_pb2.DeleteRequest(key=key, request_id=self._rid_pb(rid))
            resp: kv_pb2.DeleteResponse = await self._forward(
                leader, lambda s, t, md: s.Delete(req, timeout=t, metadata=md), timeout
            )
            return DeleteResult(self._fwd_header(resp.header), resp.existed)
        cmd = self._command(key, rid)
        cmd.delete = True
        result, index = await self._propose(cmd)
        return DeleteResult(self._header(index), result.flag)

    async def compare_and_swap(
        self,
        key: str,
        expected: bytes | None,
        new: bytes,
        rid: RequestId | None,
        timeout: float | None,
    ) -> CasResult:
        leader = self._route(bool(forwarded_by.get()))
        if leader is not None:
            req = kv_pb2.CompareAndSwapRequest(
                key=key,
                expected=expected or b"",
                expected_absent=expected is None,
                new_value=new,
                request_id=self._rid_pb(rid),
            )
            resp: kv_pb2.CompareAndSwapResponse = await self._forward(
                leader, lambda s, t, md: s.CompareAndSwap(req, timeout=t, metadata=md), timeout
            )
            return CasResult(
                self._fwd_header(resp.header), resp.swapped, resp.current if resp.found else None
            )
        cmd = self._command(key, rid)
        cmd.cas.CopyFrom(
            pb.CompareAndSwap(
                expected=expected or b"", expected_absent=expected is None, new_value=new
            )
        )
        result, index = await self._propose(cmd)
        return CasResult(self._header(index), result.flag, result.current if result.found else None)

    async def increment(
        self, key: str, delta: int, rid: RequestId | None, timeout: float | None
    ) -> IncrementResult:
        leader = self._route(bool(forwarded_by.get()))
        if leader is not None:
            req = kv_pb2.IncrementRequest(key=key, delta=delta, request_id=self._rid_pb(rid))
            resp: kv_pb2.IncrementResponse = await self._forward(
                leader, lambda s, t, md: s.Increment(req, timeout=t, metadata=md), timeout
            )
            return IncrementResult(self._fwd_header(resp.header), resp.value)
        cmd = self._command(key, rid)
        cmd.increment = delta
        result, index = await self._propose(cmd)
        return IncrementResult(self._header(index), result.counter)

    async def get(self, key: str, consistency: Consistency, timeout: float | None) -> ReadResult:
        if consistency is Consistency.LOCAL:
            return ReadResult(self._header(self.core.applied_index, stale=True), self.sm.get(key))
        # Linearizable reads are served here, on the leader or on a follower that knows
        # it (which asks it for a read point, ReadIndex, and serves it from its own state
        # machine once applied): no forwarding, and reads spread over every node.
        self._route(forwarded=False)
        if len(self._reads) + len(self._queued_reads) >= self.opts.max_pending:
            raise errors.Overloaded(f"too many reads in flight on node {self.id}; retry")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        self._queued_reads.append((next(self._read_ids), fut))
        self.counters["reads"] += 1
        self.wake.set()
        index = await fut
        if self.core.applied_index < index:
            w: asyncio.Future[None] = loop.create_future()
            self._apply_waiters.append((index, w))
            await w
        return ReadResult(self._header(index), self.sm.get(key))

    # -- introspection -------------------------------------------------------------------
    async def status(self) -> kv_pb2.StatusResponse:
        core = self.core
        leader = core.leader_id
        st = kv_pb2.StatusResponse(
            node_id=self.id,
            address=self.config.advertise or self.config.listen,
            role=ROLE_NAMES[core.role],
            term=core.term,
            leader_id=leader or "",
            leader_address=self._leader_address(leader) or "",
            commit_index=core.commit_index,
            applied_index=core.applied_index,
            first_index=core.first_index,
            keys=len(self.sm),
            state_digest=self.sm.digest(),
        )
        progress = core.progress()
        for peer_id, addr in sorted(self.peers.items()):
            st.members.add(
                node_id=peer_id,
                address=addr,
                match_index=progress.get(peer_id, 0),
                state=kv_pb2.MEMBER_STATE_UNSPECIFIED,
            )
        for k, v in self.counters.items():
            st.counters[k] = v
        st.counters["pending_proposals"] = len(self._pending)
        return st

    async def dump(self, start_after: str, limit: int) -> AsyncIterator[kv_pb2.DumpEntry]:
        keys = sorted(k for k in self.sm.data if k > start_after)
        if limit:
            keys = keys[:limit]
        for key in keys:
            slot = self.sm.data.get(key)
            if slot is None:
                continue
            if isinstance(slot.value, bytes):
                yield kv_pb2.DumpEntry(
                    key=key, type=kv_pb2.VALUE_TYPE_REGISTER, value=slot.value, index=slot.index
                )
            else:
                yield kv_pb2.DumpEntry(
                    key=key, type=kv_pb2.VALUE_TYPE_COUNTER, counter=slot.value, index=slot.index
                )


def build_backend(config: NodeConfig, clock: SkewableClock) -> RaftBackend:
    return RaftBackend(config, clock)
