"""The Raft store's node: a thin asyncio/gRPC shell around the sans-IO RaftCore.

Theory of operation
-------------------
Three kinds of entry point feed the core, and each is a few lines: client requests
(queued, then handed to the core as one batch by the driver: group commit), peer messages
(`RaftPeerServicer`: step them, then try the fast path), and the ticker. Everything the
core then wants done goes through one `ReadyPipeline` (raft.pipeline: persist, send,
apply, answer, advance, in the order the core's contract states), run by:

* the *driver* task, which takes each Ready, persists it inline or on the single disk
  thread (`SyncPolicy`), finishes it, and compacts the log when it grew; and
* the *fast path* (`answer_now`), right after peer messages were stepped, for a Ready
  that needs no disk thread: a follower answers a lone Append in the turn it arrives
  (its apply follows in a loop callback, after the answer left), a leader applies and
  answers an acknowledgement that commits a write at once. It runs the same pipeline
  calls; a Ready it cannot finish is handed to the driver as it stands.

A client write is acknowledged only after its entry is committed (durable on a majority,
including the leader) and applied. Followers forward writes to the leader (the backend
raises `Redirect`, the servicer forwards the original request over one KV.Pipeline to
the leader that all forwarded requests share; never twice) and serve
linearizable reads themselves through ReadIndex (thesis §6.4). A node that knows no
leader, or a leader without a majority within an election timeout, refuses at once.
The weaker read levels (get) are served from this node's own applied state: at once
(LOCAL, CONSISTENT_PREFIX), or once it has applied the session token's index (SESSION,
MONOTONIC_READS, READ_MY_WRITES) or can vouch for a staleness bound (BOUNDED_STALENESS),
waiting up to the deadline and then refusing with the reason.

Failure: a full disk (RetryableStorageError) makes the node refuse writes and reads
with the reason, fail what was in flight as outcome unknown, report NOT_SERVING, and
retry the same save until space returns. Anything else that kills the driver, the
ticker or the pipeline (a failing fsync, a bug) is fatal: the node logs the reason and
stops (`failed` is set; the server exits non-zero). Never a zombie.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import grpc

from caplab import errors
from caplab.auth import authenticated_member
from caplab.clock import SkewableClock
from caplab.disk_thread import DiskThread
from caplab.logs import get_logger
from caplab.peer import InboundStreams, StreamSender, peer_channel
from caplab.pipeline_client import Pipeline
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
    session_token,
)
from caplab.v1 import kv_pb2
from caplab.validation import RequestId
from raft.batching import BatchGate
from raft.codec import MAX_ENTRIES_PER_APPEND, CodecError, from_pb, snapshot_from_pb, to_pb
from raft.core import RaftConfig, RaftCore, Ready, Role
from raft.messages import Append, InstallSnapshot, Message
from raft.pipeline import ReadyPipeline, Save, SyncPolicy
from raft.statemachine import (
    OVERFLOW,
    REUSED,
    STALE,
    TYPE_CONFLICT,
    KvStateMachine,
    check_snapshot,
)
from raft.storage import RaftStorage, RetryableStorageError

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

# The KV method a request was sent to -> its KV.Pipeline operation (forwarding).
_OPERATIONS = {
    "Put": "put",
    "Get": "get",
    "Delete": "delete",
    "CompareAndSwap": "compare_and_swap",
    "Increment": "increment",
}

# Session tokens (kv.proto GetRequest.session_token, ResponseHeader.session_token): on
# raft, 8 bytes big-endian, the highest log index the session has seen (a write's index,
# or the index a read was served at). A replica that has applied that index holds every
# write the session made or read: read-my-writes, monotonic reads. Monotonic writes need
# nothing: a new entry goes after every committed one.
SESSION_TOKEN_BYTES = 8
_SESSION_LEVELS = frozenset(
    {Consistency.SESSION, Consistency.MONOTONIC_READS, Consistency.READ_MY_WRITES}
)


def _session_index() -> int:
    """The log index the request's session token names (0: none); INVALID_ARGUMENT if
    the token is not a raft token."""
    token = session_token.get()
    if not token:
        return 0
    if len(token) != SESSION_TOKEN_BYTES:
        raise errors.InvalidArgument(
            f"malformed session_token: {len(token)} bytes, a raft session token is "
            f"{SESSION_TOKEN_BYTES} (pass back the latest ResponseHeader.session_token a raft "
            "node gave; a token from another store does not apply)"
        )
    return int.from_bytes(token, "big")


def bounded_staleness_refusal(
    core: RaftCore,
    applied: int,
    heard: tuple[int, str, float, int] | None,
    bound_s: float,
    now: float,
) -> str | None:
    """None if this node's applied state is at most ``bound_s`` stale now, else why not.

    Leader: with a majority heard from within an election timeout (and no transfer
    under way) it is the leader, and every acknowledged write was applied here before
    it was acknowledged: stale by 0 (as far as check-quorum's lease holds).

    Follower: it heard from the leader of its current term at local time ``t`` (an
    Append or heartbeat) that the leader's commit index was then ``c``, and has
    applied up to ``c``. Every write acknowledged before the leader sent that message
    has an index <= c, so this state is current as of the send time. Clock
    assumption: only this node's local monotonic clock is used (no cross-node clock
    comparison, immune to wall-clock skew); the message was sent before it was
    received, so the true staleness is (now - t) PLUS the one-way network delay of
    that message (and the leader's time between reading its commit index and
    sending), which this node cannot measure; the bound is checked against now - t
    only. Rate drift of monotonic clocks over a bound's span is negligible.

    Both: the leader's commit index vouches for every acknowledged write only once the
    leader has committed an entry of its own term (a new leader's commit may lie below
    writes its predecessor acknowledged, Raft section 6.4); until then the read waits.

    The claim, then: staleness <= bound + one election timeout + that delay. A leader
    cut off from its majority keeps believing it leads (and keeps its followers'
    clocks fresh) until check-quorum makes it step down, within an election timeout;
    meanwhile a new majority may commit writes it never sees. A bound below the
    election timeout therefore promises less than it says: the spectrum's bounded
    staleness checker measures what was actually served.
    """
    if core.role is Role.LEADER:
        if core.transferring_to is not None:
            return f"leadership is being transferred to {core.transferring_to}"
        if not core.has_quorum_contact():
            return "it leads but heard from no majority within an election timeout"
        # A new leader's commit index may lie below writes its predecessor acknowledged
        # until it commits an entry of its own term (ReadIndex waits for the same).
        if core.log_term(core.commit_index) != core.term:
            return (
                f"it was elected leader (term {core.term}) but has not yet committed an "
                "entry of its term: writes acknowledged before may be missing"
            )
        if applied < core.commit_index:
            return f"it has applied up to index {applied}, its commit index is {core.commit_index}"
        return None
    leader = core.leader_id
    if (
        core.role is not Role.FOLLOWER
        or heard is None
        or leader is None
        or heard[:2] != (core.term, leader)
    ):
        last = ""
        if heard is not None:
            ago = (now - heard[2]) * 1000
            last = f"; last heard from leader {heard[1]} (term {heard[0]}) {ago:.0f} ms ago"
        return (
            f"it knows no current leader ({ROLE_NAMES[core.role]}, term {core.term}){last}; "
            "it may be cut off from the leader"
        )
    _, _, at, commit = heard
    ago = now - at
    if ago > bound_s:
        return (
            f"last heard from leader {leader} {ago * 1000:.0f} ms ago, bound "
            f"{bound_s * 1000:.0f} ms; it may be cut off from the leader"
        )
    if applied < commit:
        return (
            f"it has applied up to index {applied}, the leader's commit index "
            f"was {commit} when last heard from {ago * 1000:.0f} ms ago"
        )
    # The leader's commit vouches for every acknowledged write only once the leader
    # committed an entry of its term: the entry at that index is then of its term.
    if core.log_term(commit) != heard[0]:
        return (
            f"leader {leader} (term {heard[0]}) had not yet committed an entry of its term "
            f"when last heard from (commit index {commit}): writes acknowledged before "
            "may be missing"
        )
    return None


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
        if values.get("max_entries_per_msg", 0) > MAX_ENTRIES_PER_APPEND:
            raise errors.InvalidArgument(
                f"raft option max_entries_per_msg must be <= {MAX_ENTRIES_PER_APPEND} "
                "(peers refuse larger appends)"
            )
        return cls(**values)

    @property
    def election_timeout_s(self) -> float:
        return self.election_ticks * self.tick_ms / 1000


class PeerLink:
    """Everything this node sends to one peer: batched Raft messages, chunked snapshots,
    and forwarded client requests (over the same channel)."""

    def __init__(self, node: RaftBackend, peer_id: str, address: str) -> None:
        self.node = node
        self.peer_id = peer_id
        self.address = address
        self.channel = peer_channel(address, peer_id, node.config.tls)
        self.stub = pb_grpc.RaftPeerStub(self.channel)
        self.snapshot_task: asyncio.Task[None] | None = None
        # Client requests forwarded to this peer while it leads: one KV.Pipeline, opened
        # on the first (every concurrent forwarded request shares its messages).
        self._forwarder: Pipeline | None = None
        self.sender: StreamSender[pb.RaftMessage, pb.Batch] = StreamSender(
            self.stub.Stream,
            lambda messages: pb.Batch(messages=messages),
            timeout=max(0.2, node.opts.election_timeout_s),
            max_queue=node.opts.peer_queue,
            counters=node.counters,
        )

    @property
    def forwarding(self) -> bool:
        return self._forwarder is not None

    def forwarder(self) -> Pipeline:
        if self._forwarder is None:
            self._forwarder = Pipeline(self.channel, metadata=((FORWARDED_BY_KEY, self.node.id),))
        return self._forwarder

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
        if self._forwarder is not None:
            await self._forwarder.close()
        await self.sender.close()
        await self.channel.close()


class RaftPeerServicer(pb_grpc.RaftPeerServicer):
    def __init__(self, node: RaftBackend) -> None:
        self.node = node

    async def Stream(
        self, request_iterator: AsyncIterator[pb.Batch], context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.BatchAck:
        member = await authenticated_member(self.node.config, context)
        await self.node.inbound.serve(request_iterator, partial(self._deliver, member=member))
        return pb.BatchAck()

    def _deliver(self, batch: pb.Batch, member: str | None = None) -> Awaitable[None] | None:
        """``member``: the member the stream was authenticated as (None: plaintext); a
        message claiming another sender is forged and dropped."""
        node = self.node
        counters = node.counters
        messages = batch.messages
        counters["messages_received"] += len(messages)
        me, peers = node.id, node.peers
        msgs: list[Message] = []
        forged = 0
        for m in messages:
            sender = m.sender
            if member is not None and sender != member:
                forged += 1
                continue
            if m.to != me or sender not in peers:
                continue
            try:
                msgs.append(from_pb(m))
            except CodecError as e:  # refused alone: the rest of the batch still counts
                counters["messages_malformed"] += 1
                log.warning("malformed_peer_message", sender=sender, error=str(e))
        if forged:
            counters["messages_forged"] += forged
            log.warning("forged_peer_messages", member=member, count=forged)
        return node.receive(msgs)

    async def InstallSnapshot(
        self,
        request_iterator: AsyncIterator[pb.SnapshotChunk],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.SnapshotAck:
        member = await authenticated_member(self.node.config, context)
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
        if member is not None and first.sender != member:
            self.node.counters["messages_forged"] += 1
            log.warning("forged_snapshot", member=member, claimed_sender=first.sender)
            return pb.SnapshotAck(
                accepted=False, reason=f"sender {first.sender!r} is not the caller ({member})"
            )
        node = self.node
        try:
            msg = snapshot_from_pb(first, data)
        except CodecError as e:
            node.counters["messages_malformed"] += 1
            log.warning("malformed_snapshot", sender=first.sender, error=str(e))
            return pb.SnapshotAck(accepted=False, reason=f"malformed snapshot: {e}")
        stats = node.core.stats
        refused = stats.refused_snapshot_content + stats.refused_rival_leader
        node.receive([msg])
        if stats.refused_snapshot_content + stats.refused_rival_leader > refused:
            return pb.SnapshotAck(accepted=False, reason=node.core.last_refusal)
        node.counters["snapshots_received"] += 1
        return pb.SnapshotAck(accepted=True)


class RaftBackend:
    """The CP store as the shared runtime sees it (caplab.store.StoreBackend), and the
    pipeline's Sink: tokens are futures, resolved on the event loop."""

    # Every level (see get): LINEARIZABLE through ReadIndex, the others from local state.
    consistency_levels = frozenset(Consistency)

    kind: int = kv_pb2.STORE_KIND_RAFT

    def __init__(self, config: NodeConfig, clock: SkewableClock) -> None:
        self.config = config
        self.clock = clock
        self.id = config.node_id
        self.peers = dict(config.peers)
        self.opts = RaftOptions.parse(config.options)
        self.policy = SyncPolicy(inline_max=self.opts.inline_sync_max)
        self.sm = KvStateMachine()
        self.storage: RaftStorage | None = None
        self._core: RaftCore | None = None
        self._pipe: ReadyPipeline[asyncio.Future[Any]] | None = None
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
                "disk_errors",
                "messages_forged",
                "messages_malformed",
            )
        }
        self._queued: list[tuple[bytes, asyncio.Future[Any]]] = []
        self._queued_reads: list[asyncio.Future[Any]] = []
        self._read_gate = BatchGate(self.opts.read_batch_us, self.opts.read_batch_max, self.wake)
        self._write_gate = BatchGate(self.opts.write_batch_us, self.opts.write_batch_max, self.wake)
        # a Ready the fast path began but could not finish, for the driver
        self._handoff: tuple[Ready, Save | None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._disk = DiskThread(f"raft-disk-{self.id}")
        self._disk_busy = 0  # storage calls under way on the disk thread
        self._stopping = False
        self._view: tuple[Role, int, str | None] | None = None
        self._compaction_failed_at = 0  # applied index of the last failed compaction
        #: why the disk refuses writes (full), while it does; cleared once a save succeeds
        self.disk_error: str | None = None
        #: why the node stopped working (fatal); the server exits non-zero on it
        self.failed: str | None = None
        self.failed_event = asyncio.Event()
        # Set (and replaced) whenever this node may have made progress: applied entries,
        # heard from its leader, ticked. Reads that wait for local state to catch up
        # (session tokens, bounded staleness) wait on it; no busy loop.
        self._progress = asyncio.Event()
        # What this follower last heard from the leader of its current term, by the local
        # monotonic clock (see _bounded_ok): (term, leader, when received, leader's commit).
        self._heard: tuple[int, str, float, int] | None = None

    @property
    def core(self) -> RaftCore:
        assert self._core is not None, "node not started"
        return self._core

    @property
    def pipe(self) -> ReadyPipeline[asyncio.Future[Any]]:
        assert self._pipe is not None, "node not started"
        return self._pipe

    # -- Sink: the pipeline's answers ------------------------------------------------
    def proposal_done(
        self, token: asyncio.Future[Any], result: pb.CommandResult, index: int
    ) -> None:
        if not token.done():
            token.set_result((result, index))

    def proposal_failed(self, token: asyncio.Future[Any], definite: bool, reason: str) -> None:
        if not token.done():
            msg = f"node {self.id}: {reason}"
            token.set_exception(errors.Unavailable(msg) if definite else errors.OutcomeUnknown(msg))

    def read_ready(self, token: asyncio.Future[Any], index: int) -> None:
        if not token.done():
            token.set_result(index)

    def read_failed(self, token: asyncio.Future[Any], reason: str) -> None:
        if not token.done():
            token.set_exception(errors.Unavailable(f"node {self.id}: {reason}"))

    # -- lifecycle -------------------------------------------------------------------
    async def start(self, server: grpc.aio.Server) -> None:
        self.storage = RaftStorage(self.config.data_dir)
        hs, snap, entries = await self._disk_call(self.storage.load)
        if self.storage.recovering:
            await self._stay_out()
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
            recovering=self.storage.recovering,
            snapshot_check=check_snapshot,
        )
        self._pipe = ReadyPipeline(
            self._core,
            self.storage,
            self.sm,
            self._send,
            self,
            durable_hs=hs,
            snapshot_entries=self.opts.snapshot_entries,
        )
        log.info(
            "raft_restored",
            term=hs.term,
            commit=hs.commit,
            snapshot_index=snap.meta.index if snap else 0,
            entries=len(entries),
            recovering=self.storage.recovering,
        )
        pb_grpc.add_RaftPeerServicer_to_server(RaftPeerServicer(self), server)
        for peer_id, addr in self.peers.items():
            link = PeerLink(self, peer_id, addr)
            link.sender.start()
            self.links[peer_id] = link
        self._tasks = [
            self._watched(self._ticker(), "ticker"),
            self._watched(self._driver(), "driver"),
        ]

    async def _stay_out(self) -> None:
        """A node without its durable state keeps out of the cluster for two of the
        longest election timeouts before it says anything. Its recovery (raft/core.py,
        "Recovering nodes") assumes that no Append a leader built for its previous life
        arrives after it is back: by then what peers queued for it has been dropped (their
        senders drop a write stalled for an election timeout), and a leader stalled in its
        own fsync has been deposed. A node restarted at once with an empty directory (a
        container on ephemeral storage) would otherwise meet such a message."""
        wait = 4 * self.opts.election_timeout_s
        log.warning(
            "recovering_wait",
            seconds=wait,
            reason="this node starts without durable state: it keeps out of the cluster "
            "until messages of its previous life have died",
        )
        await asyncio.sleep(wait)

    def _watched(self, coro: Awaitable[None], name: str) -> asyncio.Task[None]:
        """A task whose failure is fatal (fail-stop: never a zombie)."""
        task: asyncio.Task[None] = asyncio.ensure_future(coro)

        def done(t: asyncio.Task[None]) -> None:
            if t.cancelled() or self._stopping:
                return
            exc = t.exception()
            self.fail(f"the {name} task ended: {exc!r}" if exc else f"the {name} task ended")

        task.add_done_callback(done)
        return task

    def fail(self, reason: str) -> None:
        """Fatal: this node cannot go on. Log why, answer everything in flight, and let the
        server stop the process (it exits non-zero)."""
        if self.failed is not None:
            return
        self.failed = reason
        log.critical("node_failed", reason=reason)
        self._stopping = True
        self._give_up(f"node {self.id} failed ({reason})")
        self.failed_event.set()

    def health(self) -> tuple[bool, str]:
        """(serving, why not): SERVING iff this node can serve linearizable requests now
        (itself, or by forwarding to its leader): it runs, its disk takes writes, and it
        is in contact with a quorum: as leader, a majority (itself included) answered
        within the last election timeout; as follower, it heard from its leader within
        an election timeout. Cheap (no I/O): the server asks every 100 ms."""
        if self.failed is not None:
            return False, f"failed: {self.failed}"
        if self._stopping:
            return False, "shutting down"
        if self.disk_error is not None:
            return False, f"disk: {self.disk_error}"
        core = self.core
        if core.has_quorum_contact():
            return True, ""
        if core.role is Role.LEADER:
            return False, "leader without a majority heard from within an election timeout"
        return False, "no leader heard from within an election timeout (no quorum reachable?)"

    async def before_shutdown(self) -> None:
        """Hand leadership to the most up-to-date follower so a restart costs no election."""
        self._stopping = True
        core = self.core
        if core.role is not Role.LEADER or not self.peers or self.failed is not None:
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
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for link in self.links.values():
            await link.close()
        self._give_up(f"node {self.id} is shutting down")
        lazy = self._pipe.lazy_hs if self._pipe is not None else None
        if self.storage is not None and lazy is not None and self.failed is None:
            with contextlib.suppress(Exception):
                await self._disk_call(self.storage.save, lazy)
        self._disk.shutdown()
        if self.storage is not None:
            with contextlib.suppress(Exception):
                self.storage.close()

    def _give_up(self, reason: str) -> None:
        """Answer everything in flight (outcome unknown) and refuse what is still queued
        (not applied): the node stops, or its disk refuses writes."""
        if self._pipe is not None:
            self.pipe.fail_all(reason)
        refusal = errors.Unavailable(f"{reason}; not applied")
        queued, self._queued = self._queued, []
        reads, self._queued_reads = self._queued_reads, []
        for f in [*(f for _, f in queued), *reads]:
            if not f.done():
                f.set_exception(refusal)

    # -- entry points: ticks, peer messages ------------------------------------------
    async def _ticker(self) -> None:
        interval = self.opts.tick_ms / 1000
        next_at = time.monotonic()
        while True:
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            self.core.tick()
            self.wake.set()
            self._notify_progress()

    def receive(self, msgs: list[Message]) -> Awaitable[None] | None:
        """Step peer messages, then answer at once if the fast path can (see answer_now)."""
        core = self.core
        refusal = core.last_refusal
        for m in msgs:
            core.step(m)
            if core.last_refusal is not refusal:  # a message correct Raft cannot send
                refusal = core.last_refusal
                log.warning("peer_message_refused", sender=m.frm, reason=refusal)
            elif (
                isinstance(m, Append)
                and m.term == core.term
                and core.role is Role.FOLLOWER
                and core.leader_id == m.frm
            ):
                self._heard_from_leader(m)
        try:
            rest = self.answer_now()
        except Exception as e:
            log.exception("fast_path_failed")
            self.fail(f"the fast path failed: {e!r}")
            rest = None
        self.wake.set()  # (after the answer's sender was woken: it goes first)
        self._notify_progress()
        return rest

    def _heard_from_leader(self, m: Append) -> None:
        """An Append (or heartbeat) from the leader of the current term arrived: note when
        (local monotonic clock) and the commit index it carried (BOUNDED_STALENESS)."""
        commit = m.commit
        if self._heard is not None and self._heard[:2] == (m.term, m.frm):
            commit = max(commit, self._heard[3])  # (a leader's commit only grows in its term)
        self._heard = (m.term, m.frm, time.monotonic(), commit)

    def _notify_progress(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    def _send(self, m: Message) -> None:
        link = self.links.get(m.to)
        if link is not None:
            link.send(m)

    # -- the driver --------------------------------------------------------------------
    async def _driver(self) -> None:
        core = self.core
        while True:
            await self.wake.wait()
            # Let every client request that is already runnable join this batch first (a
            # follower has none to wait for: it answers the leader at once; nor has a
            # leader with one write and nothing else in flight: it goes at once).
            if core.role is Role.LEADER and (
                self.pipe.in_flight or self._queued_reads or len(self._queued) != 1
            ):
                await asyncio.sleep(0)
            self.wake.clear()
            self._hand_over_queued()
            if self._handoff is not None:
                (rd, save), self._handoff = self._handoff, None
                await self._run(rd, save, begun=True)
            elif (rd2 := core.ready()) is not None:
                await self._run(rd2, None, begun=False)
            self._notify_progress()
            await self._maybe_compact()
            self._log_role()
            if (
                core.has_ready()
                or self._handoff is not None
                or (self._queued and not self._write_gate.waiting)
                or (self._queued_reads and not self._read_gate.waiting)
            ):
                self.wake.set()

    async def _run(self, rd: Ready, save: Save | None, *, begun: bool) -> None:
        """One Ready through the pipeline: begin, persist (inline or on the disk thread,
        retried while the disk is full), finish."""
        pipe = self.pipe
        if not begun:
            save = pipe.begin(rd)
        if save is not None:
            inline = self.policy.inline(
                save,
                in_flight=pipe.in_flight,
                queued=len(self._queued),
                disk_busy=bool(self._disk_busy),
            )
            if inline and not begun and any(isinstance(m, Append) for m in rd.messages):
                await asyncio.sleep(0)  # let the Appends leave before the disk blocks
            await self._persist(save, inline)
        pipe.finish(rd, save)

    async def _persist(self, save: Save, inline: bool) -> None:
        backoff = 0.05
        while True:
            try:
                if inline:
                    self.pipe.persist(save)
                    self.counters["fsyncs_inline"] += 1
                else:
                    await self._disk_call(self.pipe.persist, save)
                self.counters["fsyncs"] += 1
                if self.disk_error is not None:
                    log.warning("disk_writable_again", after=self.disk_error)
                    self.disk_error = None
                return
            except RetryableStorageError as e:
                self.counters["disk_errors"] += 1
                if self.disk_error is None:
                    self.disk_error = str(e)
                    log.error("disk_write_failed", reason=str(e), retry="until it succeeds")
                    self._give_up(f"node {self.id} cannot write to its disk ({e})")
                inline = False
                await asyncio.sleep(backoff)
                backoff = min(1.0, backoff * 2)

    async def _disk_call(self, fn: Callable[..., T], *args: Any) -> T:
        self._disk_busy += 1
        try:
            return await self._disk.call(fn, *args)
        finally:
            self._disk_busy -= 1

    def _hand_over_queued(self) -> None:
        pipe = self.pipe
        if self._queued and self._write_gate.open(len(self._queued)):
            queued, self._queued = self._queued, []
            live = [(d, f) for d, f in queued if not f.done()]
            if live and not pipe.propose([d for d, _ in live], [f for _, f in live]):
                reason = self._refusal()
                for _, f in live:
                    f.set_exception(reason)
            elif live:
                self.counters["proposals"] += len(live)
                self.counters["batches"] += 1
        if self._queued_reads and self._read_gate.open(len(self._queued_reads)):
            reads, self._queued_reads = self._queued_reads, []
            for rf in reads:
                if not rf.done() and not pipe.read(rf):
                    rf.set_exception(self._refusal())

    async def _maybe_compact(self) -> None:
        if self.pipe.applied <= self._compaction_failed_at:
            return  # (not again before the log grew: the snapshot costs the whole state)
        snap = self.pipe.compaction_due()
        if snap is None:
            return
        assert self.storage is not None
        try:
            await self._disk_call(self.storage.compact, snap)
        except RetryableStorageError as e:
            self._compaction_failed_at = snap.meta.index
            log.warning("compaction_failed", reason=str(e), retry="when the log grows again")
            return
        self.pipe.compacted(snap)
        log.info("log_compacted", index=snap.meta.index, snapshot_bytes=len(snap.data))

    def _log_role(self) -> None:
        core = self.core
        view = (core.role, core.term, core.leader_id)
        if view != self._view:
            log.info(
                "raft_role",
                role=ROLE_NAMES[core.role],
                term=core.term,
                leader=core.leader_id,
                commit=core.commit_index,
                recovering=core.recovering,
            )
            self._view = view

    # -- the fast path -----------------------------------------------------------------
    def answer_now(self) -> Awaitable[None] | None:
        """Fast path, right after incoming messages were stepped: process the resulting
        Ready now if it needs no disk thread, sparing a hop through the driver task. On a
        follower that includes a lone Append (fsynced on the loop thread); on a leader,
        acknowledgements that commit entries (applied and answered at once) and heartbeat
        answers that confirm reads. Anything else goes to the driver, and so does
        everything on a leader under load. Returns what the caller (the stream reader)
        should await before reading on (the answer leaves first), or None."""
        core = self.core
        if (
            self._handoff is not None
            or self.disk_error is not None
            or self._stopping
            or core.role not in (Role.FOLLOWER, Role.LEADER)
        ):
            return None
        pipe = self.pipe
        leader = core.role is Role.LEADER
        if leader and (pipe.in_flight > self.opts.inline_sync_max or self._queued):
            return None  # under load the driver gathers acknowledgements into one Ready
        rd = core.ready()  # None while the driver is processing one (it is outstanding)
        if rd is None:
            return None
        save = pipe.begin(rd)
        if save is not None and (
            leader or not self.policy.follower_inline(save, disk_busy=bool(self._disk_busy))
        ):
            self._handoff = (rd, save)  # (a leader's own fsync must not hold up its Appends)
            return None
        if save is not None:
            try:
                self.pipe.persist(save)
            except RetryableStorageError:
                self._handoff = (rd, save)  # the driver retries it
                return None
            self.counters["fsyncs"] += 1
            self.counters["fsyncs_inline"] += 1
        if not leader and rd.committed_entries:
            # Answer first; apply in a loop callback once the answer left: a callback, not
            # the reader task, so that cancelling the reader cannot strand the Ready.
            pipe.send_promises(rd)
            asyncio.get_running_loop().call_soon(self._finish_later, rd, save)
            return asyncio.sleep(0)
        pipe.finish(rd, save)
        return asyncio.sleep(0)  # the answer leaves before the reader reads on

    def _finish_later(self, rd: Ready, save: Save | None) -> None:
        try:
            self.pipe.finish(rd, save, send=False)
        except Exception as e:
            log.exception("pipeline_failed")
            self.fail(f"applying committed entries failed: {e!r}")
            return
        self._notify_progress()
        if self.core.has_ready():
            self.wake.set()

    # -- leadership and forwarding -----------------------------------------------------
    def _leader_address(self, leader: str | None) -> str | None:
        if leader is None:
            return None
        if leader == self.id:
            return self.config.advertise or self.config.listen
        return self.peers.get(leader)

    def _refusal(self) -> errors.Unavailable:
        """Why this node cannot serve a write or a linearizable read now (not applied)."""
        core = self.core
        leader = core.leader_id
        if self.failed is not None:
            return errors.Unavailable(f"node {self.id} failed ({self.failed}); not applied")
        if self._stopping:
            return errors.Unavailable("this node is shutting down; not applied (retry elsewhere)")
        if self.disk_error is not None:
            return errors.Unavailable(
                f"node {self.id} cannot write to its disk ({self.disk_error}); not applied "
                "(retry elsewhere)"
            )
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

    def _can_serve(self) -> bool:
        return self.failed is None and not self._stopping and self.disk_error is None

    def _route_write(self) -> None:
        """Return if this node (the leader) takes the write; raise Redirect to the leader,
        or the reason for refusing."""
        core = self.core
        if not self._can_serve():
            raise self._refusal()
        if core.role is Role.LEADER:
            if core.transferring_to is not None or not core.has_quorum_contact():
                raise self._refusal()
            return
        leader = core.leader_id
        if leader is None or forwarded_by.get() or leader not in self.links:
            raise self._refusal()
        raise errors.Redirect(
            lambda method, request, timeout: self._forward(leader, method, request, timeout)
        )

    async def _forward(self, leader: str, method: str, request: Any, timeout: float | None) -> Any:
        self.counters["forwarded"] += 1
        cap = self.opts.forward_timeout_ms / 1000
        t = cap if timeout is None else max(0.01, min(timeout, cap))
        try:
            resp = await self.links[leader].forwarder().call(_OPERATIONS[method], request, t)
        except errors.StoreError as e:
            e.message = f"forwarded to leader {leader}: {e.message}"
            raise
        resp.header.forwarded_by = self.id
        return resp

    def _header(self, index: int, stale: bool = False, token_index: int | None = None) -> Header:
        """The response header; its session token is what the session has now seen: the
        highest of the request's token (``token_index``: already read) and this
        response's index."""
        seen = max(_session_index() if token_index is None else token_index, index)
        return Header(
            node_id=self.id,
            term=self.core.term,
            index=index,
            stale_possible=stale,
            session_token=seen.to_bytes(8, "big"),
        )

    # -- client requests ---------------------------------------------------------------
    async def _propose(
        self, key: str, rid: RequestId | None, **op: Any
    ) -> tuple[pb.CommandResult, Header]:
        seen = _session_index()  # a malformed token is refused here, before forwarding too
        self._route_write()
        queued = self._queued
        if self.pipe.in_flight + len(queued) >= self.opts.max_pending:
            raise errors.Overloaded(
                f"{self.opts.max_pending} requests already in flight on leader {self.id}; "
                "not applied (retry with backoff)"
            )
        if rid is not None:
            cmd = pb.Command(key=key, client_id=rid.client_id, sequence=rid.sequence, **op)
        else:
            cmd = pb.Command(key=key, **op)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        queued.append((cmd.SerializeToString(), fut))
        self.wake.set()
        result, index = await fut
        if result.status in (TYPE_CONFLICT, REUSED):
            raise errors.FailedPrecondition(result.message)
        if result.status == OVERFLOW:
            raise errors.OutOfRange(result.message)
        if result.status == STALE:
            # An earlier copy may have been applied (its result is forgotten): unknown.
            raise errors.OutcomeUnknown(result.message)
        return result, self._header(index, token_index=seen)

    async def put(
        self, key: str, value: bytes, rid: RequestId | None, timeout: float | None
    ) -> Header:
        return (await self._propose(key, rid, put=value))[1]

    async def delete(self, key: str, rid: RequestId | None, timeout: float | None) -> DeleteResult:
        result, header = await self._propose(key, rid, delete=True)
        return DeleteResult(header, result.flag)

    async def compare_and_swap(
        self,
        key: str,
        expected: bytes | None,
        new: bytes,
        rid: RequestId | None,
        timeout: float | None,
    ) -> CasResult:
        cas = pb.CompareAndSwap(
            expected=expected or b"", expected_absent=expected is None, new_value=new
        )
        result, header = await self._propose(key, rid, cas=cas)
        return CasResult(header, result.flag, result.current if result.found else None)

    async def increment(
        self, key: str, delta: int, rid: RequestId | None, timeout: float | None
    ) -> IncrementResult:
        result, header = await self._propose(key, rid, increment=delta)
        return IncrementResult(header, result.counter)

    async def get(
        self,
        key: str,
        consistency: Consistency,
        timeout: float | None,
        *,
        max_staleness_ms: int = 0,
    ) -> ReadResult:
        seen = _session_index()  # (validates the token for every level)
        if consistency in (Consistency.LOCAL, Consistency.CONSISTENT_PREFIX):
            # A replica's applied state is always a prefix of the one log: consistent prefix.
            return self._local_read(key)
        if consistency in _SESSION_LEVELS:
            await self._wait_local(
                lambda: self.pipe.applied >= seen,
                timeout,
                lambda: (
                    f"node {self.id} has applied up to index {self.pipe.applied}, the session "
                    f"has seen index {seen}; it may be cut off from the leader (partitioned) "
                    f"or lagging; {consistency.name} read not served (retry, or on another node)"
                ),
            )
            return self._local_read(key)
        if consistency is Consistency.BOUNDED_STALENESS:
            bound = max_staleness_ms / 1000
            await self._wait_local(
                lambda: self._bounded_ok(bound) is None,
                timeout,
                lambda: (
                    f"node {self.id} cannot vouch that its state is at most "
                    f"{max_staleness_ms} ms stale: {self._bounded_ok(bound)}; "
                    "BOUNDED_STALENESS read not served (retry, or on another node)"
                ),
            )
            return self._local_read(key)
        # Linearizable reads are served here, on the leader or on a follower that knows
        # it (which asks it for a read point, ReadIndex): no forwarding, and reads spread
        # over every node. The pipeline answers once this state machine reached the point.
        core = self.core
        if not self._can_serve() or not core.has_quorum_contact():
            raise self._refusal()
        if core.role is Role.LEADER and core.transferring_to is not None:
            raise self._refusal()
        if len(self.pipe.reads) + len(self._queued_reads) >= self.opts.max_pending:
            raise errors.Overloaded(f"too many reads in flight on node {self.id}; retry")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queued_reads.append(fut)
        self.counters["reads"] += 1
        self.wake.set()
        index = await fut
        return ReadResult(self._header(index), self.sm.get(key))

    def _local_read(self, key: str) -> ReadResult:
        return ReadResult(self._header(self.pipe.applied, stale=True), self.sm.get(key))

    async def _wait_local(
        self, ready: Callable[[], bool], timeout: float | None, why: Callable[[], str]
    ) -> None:
        """Return once ``ready()`` holds, re-checked whenever the node made progress (see
        _progress), up to just before the request's deadline (without one, up to
        forward_timeout_ms); then raise Unavailable(why()) ("sticky availability": the
        answer arrives before the client's deadline does)."""
        if ready():
            return
        budget = self.opts.forward_timeout_ms / 1000 if timeout is None else timeout
        budget -= min(0.1, budget / 10)  # margin: answer before the client gives up
        deadline = time.monotonic() + budget
        while not ready():
            left = deadline - time.monotonic()
            if left <= 0 or self.failed is not None:
                raise errors.Unavailable(why())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), left)

    def _bounded_ok(self, bound_s: float) -> str | None:
        """None if this node's applied state is at most ``bound_s`` stale now, else why not
        (:func:`bounded_staleness_refusal`)."""
        return bounded_staleness_refusal(
            self.core, self.pipe.applied, self._heard, bound_s, time.monotonic()
        )

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
            applied_index=self.pipe.applied,
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
        stats = self.core.stats
        for f in dataclasses.fields(stats):  # messages correct Raft cannot send, refused
            st.counters[f.name] = getattr(stats, f.name)
        st.counters["pending_proposals"] = self.pipe.in_flight
        # (requests forwarded to a leader, and the KV.Pipeline messages that carried them)
        st.counters["forward_messages"] = sum(
            link.forwarder().messages_sent for link in self.links.values() if link.forwarding
        )
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
