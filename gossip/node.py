"""The gossip store's node: a thin asyncio/gRPC shell around the sans-IO GossipCore.

Theory of operation
-------------------
The core is only ever called from the event loop: client writes (``put``/``delete``/
``increment``), a *ticker* (``core.tick`` every ``tick_ms``) and the peer servicer. Each
call passes two clocks: a monotonic one for the core's timers and the physical clock
(with the skew injected through Admin) for its timestamps and the peer servicer
(``core.step`` for every incoming message). After each call the node moves the core's
outputs into the *open batch*: the latest value of every key to persist (client writes,
merged remote state, collected tombstones and records as removals), and the messages
to send.

One *flusher* task closes the open batch and commits it on a single disk thread (one
append, one fsync) while the loop keeps serving; everything that arrives meanwhile forms
the next batch (group commit), taken the moment the commit before it ends: writes
that waited for the disk never wait for anything else. Only when nothing arrived
during a commit that carried several client writes (concurrent clients in lockstep)
does the next batch wait until as many have arrived (those clients' next writes), or
for at most ``commit_gap_us``, so that commits stay few and large; a lone write is
committed at once. A full disk is retried (new writes are refused meanwhile, health
NOT_SERVING); any other storage error stops the node. Only after a batch is durable
does the flusher acknowledge its client writes and send its messages, so an ack to a
client, a DeltasAck or an anti-entropy reply always covers durable data, and every
message is sent after everything produced before it is durable.

Reads answer from the local replica (AP): every response is ``stale_possible``. LOCAL
(DEFAULT) reads answer at once. SESSION, MONOTONIC_READS and READ_MY_WRITES reads wait
until the replica holds the version of the key the session's token names (see "session
tokens" below), and BOUNDED_STALENESS reads until this node has synced with every peer
within the bound (``_fresh_within``); both refuse with UNAVAILABLE just before the deadline
(sticky availability). Every response carries the session's updated token, and a write
carrying one is timestamped after everything the token names. CompareAndSwap,
LINEARIZABLE and CONSISTENT_PREFIX reads are refused with FAILED_PRECONDITION. Durable
before visible: the core applies a change to its replica at once, so a key whose latest
change is still in a batch not yet durable is read from that batch once it is durable
(the value it committed), never before: a crash cannot erase a value a client has read.
The open batch, the keys not yet durable and the commit itself are ``gossip.pipeline``'s
(the simulator drives the same code on a simulated disk).

Exactly once, across nodes: a write with a request id also writes an Applied record of
it into the replicated state (``gossip/core.py``, "Exactly once"), persisted in the same
commit. A request whose record this replica holds, from any node, is answered from the
record (once the record is durable here), never applied again; one older than its
client's window is answered OUTCOME UNKNOWN (``errors.OutcomeUnknown``); the same request
applied on two nodes before either heard of the other is merged as one.

Peer messages travel on one long-lived ``Stream`` per peer (caplab.peer); a cut link
drops messages rather than blocking the sender.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import grpc

from caplab import errors
from caplab.auth import authenticated_member
from caplab.clock import SkewableClock
from caplab.disk_thread import DiskThread
from caplab.gossip.v1 import gossip_pb2 as pb
from caplab.gossip.v1 import gossip_pb2_grpc as pb_grpc
from caplab.logs import get_logger
from caplab.peer import InboundStreams, StreamSender, peer_channel
from caplab.store import (
    MAX_SESSION_TOKEN_BYTES,
    CasResult,
    Consistency,
    DeleteResult,
    Header,
    Hlc,
    IncrementResult,
    NodeConfig,
    ReadResult,
    parse_int_options,
    session_token,
)
from caplab.v1 import kv_pb2
from caplab.validation import MAX_KEY_BYTES, RequestId
from gossip.codec import CodecError, from_pb, to_pb
from gossip.core import (
    GossipConfig,
    GossipCore,
    RequestTooOldError,
    ValueOutOfRangeError,
    Write,
    WrongTypeError,
)
from gossip.crdt import (
    Applied,
    Counter,
    Register,
    Value,
    applied_key,
    is_reserved,
    payload_digest,
    saturate,
)
from gossip.hlc import DEFAULT_MAX_LOGICAL, MAX_NODE_ID_BYTES, MAX_WALL_MS, Timestamp
from gossip.messages import ALIVE, DEAD, SUSPECT, Message
from gossip.pipeline import Batch, Pipeline
from gossip.storage import DiskFullError, GossipStorage, StorageError

log = get_logger("gossip.node")


def _monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


T = TypeVar("T")
# An incoming message with at least half this many entries is big: the servicer lets the
# flusher start on its outputs before merging the next one.
BATCH_ENTRIES = 2_000
# Bytes per outgoing Batch (at least one message). The core keeps each message's entries
# within GossipConfig.max_message_bytes (1 MiB), so a Batch stays under the receiving
# server's limit (caplab.validation.MAX_MESSAGE_BYTES, 2 MiB + 64 KiB) whatever it holds.
BATCH_BYTES = 1 << 20

MEMBER_STATES = {
    ALIVE: kv_pb2.MEMBER_STATE_ALIVE,
    SUSPECT: kv_pb2.MEMBER_STATE_SUSPECT,
    DEAD: kv_pb2.MEMBER_STATE_DEAD,
}
CAS_REFUSAL = (
    "The gossip store is an AP (always-available) store: replicas accept writes "
    "independently while partitioned, so there is no single up-to-date value to compare "
    "against; compare-and-swap needs a CP store such as raft"
)
LINEARIZABLE_REFUSAL = (
    "The gossip store is an AP (always-available) store: it answers every read from the "
    "local replica, which may not have seen the latest writes yet, so it cannot offer "
    "LINEARIZABLE reads; use LOCAL (or DEFAULT), or a CP store such as raft"
)


# -- session tokens ----------------------------------------------------------------------
# A gossip session token (kv.proto ``session_token``) maps each register key the session
# wrote or read to the HLC timestamp of the version it wrote or saw. Version 1:
#
#   0x01                                  format version
#   uvarint N, then N node ids            each: uvarint length, UTF-8 (1..128 bytes)
#   uvarint K, then K entries             least recently used first, each:
#       uvarint key length, UTF-8 key     (1..1024 bytes, no repeats)
#       uvarint wall_ms, uvarint logical, uvarint node index (into the node ids)
#
# At most SESSION_KEYS (256) keys and MAX_SESSION_TOKEN_BYTES (16 KiB): the keys this
# session used least recently drop out first, and with them the guarantees on those keys
# (a read of a dropped key is served as if the session had never touched it). Counters
# carry no single write timestamp (their per-node totals would not fit), so the session
# guarantees cover registers only: counter operations leave the token as it came (an
# increment still orders the node's clock after the token, see ``_session_begin``).
SESSION_TOKEN_VERSION = 1
SESSION_KEYS = 256
SESSION_POLL_S = 0.02  # how often a sticky read looks again at the replica
_ONE_NODE_HEAD = bytes((SESSION_TOKEN_VERSION, 1))  # (version, one node id follows)


def _uvarint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL_VARINTS[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL_VARINTS = [bytes((i,)) for i in range(0x80)]


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def uvarint(self, limit: int) -> int:
        n = shift = 0
        while True:
            if self.pos >= len(self.data) or shift > 63:
                raise ValueError("truncated or overlong varint")
            b = self.data[self.pos]
            self.pos += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        if n > limit:
            raise ValueError(f"value {n} above {limit}")
        return n

    def text(self, max_bytes: int) -> str:
        size = self.uvarint(max_bytes)
        if size == 0 or self.pos + size > len(self.data):
            raise ValueError("empty or truncated string")
        raw = self.data[self.pos : self.pos + size]
        self.pos += size
        return raw.decode("utf-8")


def decode_session_token(token: bytes) -> dict[str, Timestamp]:
    """The keys of a session token (least recently used first); a malformed token is
    INVALID_ARGUMENT (the runtime already refused one above 16 KiB). Empty: no session."""
    if not token:
        return {}
    try:
        r = _Reader(token)
        if r.uvarint(0xFF) != SESSION_TOKEN_VERSION:
            raise ValueError(f"unknown version {token[0]} (this node reads version 1)")
        nodes = [r.text(MAX_NODE_ID_BYTES) for _ in range(r.uvarint(SESSION_KEYS))]
        out: dict[str, Timestamp] = {}
        for _ in range(r.uvarint(SESSION_KEYS)):
            key = r.text(MAX_KEY_BYTES)
            wall = r.uvarint(MAX_WALL_MS - 1)
            logical = r.uvarint(DEFAULT_MAX_LOGICAL)
            node = r.uvarint(len(nodes) - 1) if nodes else -1
            if node < 0 or key in out:
                raise ValueError(f"bad entry for key {key!r}")
            out[key] = Timestamp(wall, logical, nodes[node])
        if r.pos != len(token):
            raise ValueError(f"{len(token) - r.pos} trailing bytes")
    except (ValueError, UnicodeDecodeError) as e:
        raise errors.InvalidArgument(
            f"malformed gossip session_token ({e}); pass back the latest "
            "ResponseHeader.session_token this session received, or none"
        ) from None
    return out


def encode_session_token(keys: dict[str, Timestamp]) -> bytes:
    """``keys`` (least recently used first) as a token: the most recent SESSION_KEYS
    that fit in MAX_SESSION_TOKEN_BYTES."""
    items = list(keys.items())[-SESSION_KEYS:]
    while True:
        nodes = sorted({ts.node for _, ts in items})
        index = {n: i for i, n in enumerate(nodes)}
        parts = [_uvarint(SESSION_TOKEN_VERSION), _uvarint(len(nodes))]
        for n in nodes:
            raw = n.encode()
            parts += [_uvarint(len(raw)), raw]
        parts.append(_uvarint(len(items)))
        for key, ts in items:
            raw = key.encode()
            parts += [
                _uvarint(len(raw)),
                raw,
                _uvarint(ts.wall_ms),
                _uvarint(ts.logical),
                _uvarint(index[ts.node]),
            ]
        out = b"".join(parts)
        if len(out) <= MAX_SESSION_TOKEN_BYTES:
            return out
        items = items[max(1, len(items) // 8) :]  # drop the least recently used


def _session_note(keys: dict[str, Timestamp], key: str, ts: Timestamp | None) -> bytes:
    """The token after this answer: ``key`` saw ``ts`` (None: untouched), now the most
    recently used; a key never goes back to an older timestamp."""
    if ts is not None:
        if not keys:  # (a request without a token: the usual case, encoded directly)
            node, raw = ts.node.encode(), key.encode()
            out = b"".join(
                (
                    _ONE_NODE_HEAD,
                    _uvarint(len(node)),
                    node,
                    b"\x01",
                    _uvarint(len(raw)),
                    raw,
                    _uvarint(ts.wall_ms),
                    _uvarint(ts.logical),
                    b"\x00",
                )
            )
            if len(out) <= MAX_SESSION_TOKEN_BYTES:
                return out
        old = keys.pop(key, None)
        keys[key] = ts if old is None or ts > old else old
    return encode_session_token(keys)


CONSISTENT_PREFIX_REFUSAL = (
    "The gossip store cannot offer CONSISTENT_PREFIX reads: each key's latest version "
    "spreads on its own (delta gossip and anti-entropy carry keys independently, in no "
    "global order), so a replica may hold a later write without an earlier one and there "
    "is no single order whose prefix it has applied; use SESSION (causal per key for your "
    "session) or a CP store such as raft"
)
GOSSIP_LEVELS: frozenset[Consistency] = frozenset(Consistency)
SESSION_LEVELS = frozenset(
    {Consistency.SESSION, Consistency.MONOTONIC_READS, Consistency.READ_MY_WRITES}
)
DEFAULT_WAIT_S = 5.0  # how long a sticky read waits when the call has no deadline


_MAY_BE_ZERO = frozenset({"commit_gap_us"})


@dataclass(frozen=True)
class GossipOptions:
    """Tuning, from `caplab node --set NAME=VALUE` (all integers; durations in ms).

    Names shared with ``gossip.core.GossipConfig`` are passed to the core.
    """

    tick_ms: int = 20  # core.tick period; must be <= ping_timeout_ms / 2
    gossip_interval_ms: int = 100
    fanout: int = 3
    # The periodic anti-entropy round is a backstop: delta gossip carries every write, and
    # a peer that comes back or falls behind gets rounds at once (repair mode). Under a
    # steady write load a round mostly races gossip for keys still in flight; at 1 s it
    # cost 5-10% of the write throughput at concurrency 64, at 5 s about 1-2%.
    anti_entropy_interval_ms: int = 5000
    ae_round_timeout_ms: int = 1000
    ping_interval_ms: int = 200
    ping_timeout_ms: int = 100
    indirect_k: int = 3
    suspicion_timeout_ms: int = 1000
    dead_ping_every: int = 5
    retransmit_mult: int = 3
    max_piggyback: int = 8
    tombstone_min_age_ms: int = 10_000
    collected_memory_ms: int = 300_000
    gc_interval_ms: int = 1000
    tombstone_grace_ms: int = 7 * 24 * 3600 * 1000
    delta_log_max: int = 100_000  # keys
    delta_batch_max: int = 2_000  # keys per Deltas message
    # Delta flow control (in the core): unacknowledged Deltas per peer, and how long the
    # oldest may stay unacknowledged before the window is re-sent.
    deltas_window: int = 4
    deltas_resend_ms: int = 1000
    ae_max_nodes: int = 4096
    ae_bulk_keys: int = 8  # ship items instead of descending when a node holds <= this many
    ae_chunk_items: int = 2_000  # items per bulk anti-entropy message
    repair_max_rounds: int = 4  # a returning peer: anti-entropy rounds before deltas resume
    repair_max_ms: int = 5000
    max_drift_ms: int = 60_000
    peer_timeout_ms: int = 2000  # a write to a peer's stream stuck this long drops the stream
    peer_queue: int = 4096  # messages queued per peer before the oldest are dropped
    # Exactly once: records kept per client (its max requests in flight), and how long
    # after its latest request a client's records are dropped.
    dedup_window: int = 128
    dedup_ttl_ms: int = 3_600_000
    max_pending: int = 20_000  # writes waiting for the disk before RESOURCE_EXHAUSTED
    # Group commit in lockstep: once a commit carried several client writes (concurrent
    # clients) and none arrived while it ran, the next one waits until as many have
    # arrived (the answered clients' next writes), for at most this long (0: never
    # waits). Fewer, larger commits cost less fsync, disk-thread and message overhead
    # per write. A lone write never waits, nor do writes that arrived during a commit:
    # they are committed as soon as it ends.
    commit_gap_us: int = 10_000

    @classmethod
    def parse(cls, options: dict[str, str]) -> GossipOptions:
        values = parse_int_options("gossip", cls.__dataclass_fields__, options, _MAY_BE_ZERO)
        opts = cls(**values)
        if opts.ping_interval_ms <= opts.ping_timeout_ms:
            raise errors.InvalidArgument(
                "gossip option ping_interval_ms must exceed ping_timeout_ms"
            )
        return opts

    def core_config(self) -> GossipConfig:
        names = {f.name for f in dataclasses.fields(GossipConfig)}
        return GossipConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


class PeerLink:
    """Outbound messages to one peer, batched on one long-lived stream."""

    def __init__(self, node: GossipBackend, peer_id: str, address: str) -> None:
        self.peer_id = peer_id
        self.address = address
        self.channel = peer_channel(address, peer_id, node.config.tls)
        self.stub = pb_grpc.GossipPeerStub(self.channel)
        # at most BATCH_BYTES per batch, so the peer can work on the first part
        # while the rest is on its way
        self.sender: StreamSender[pb.GossipMessage, pb.Batch] = StreamSender(
            self.stub.Stream,
            lambda messages: pb.Batch(messages=messages),
            timeout=node.opts.peer_timeout_ms / 1000,
            max_queue=node.opts.peer_queue,
            counters=node.counters,
            weight=lambda m: m.ByteSize(),
            max_weight=BATCH_BYTES,
        )

    def send(self, m: Message) -> None:
        self.sender.push(to_pb(m))

    async def close(self) -> None:
        await self.sender.close()
        await self.channel.close()


class GossipPeerServicer(pb_grpc.GossipPeerServicer):
    def __init__(self, node: GossipBackend) -> None:
        self.node = node

    async def Stream(
        self, request_iterator: AsyncIterator[pb.Batch], context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.BatchAck:
        member = await authenticated_member(self.node.config, context)
        await self.node.inbound.serve(request_iterator, partial(self._deliver, member=member))
        return pb.BatchAck()

    async def _deliver(self, request: pb.Batch, member: str | None = None) -> None:
        """``member``: the member the stream was authenticated as (None: plaintext); a
        message claiming another sender is forged and dropped."""
        node = self.node
        core = node.core
        now, wall = _monotonic_ms(), node.clock.wall_ms()
        for raw in request.messages:
            if member is not None and raw.sender != member:
                node.counters["messages_forged"] += 1
                log.warning("forged_peer_message", member=member, claimed_sender=raw.sender)
                continue
            try:
                msg = from_pb(raw)
            except CodecError as e:
                node.counters["messages_malformed"] += 1
                log.warning("malformed_peer_message", sender=raw.sender, error=str(e))
                continue
            core.step(msg, now, wall_ms=wall)
            if len(raw.deltas.entries) + len(raw.ae_items.items) >= BATCH_ENTRIES // 2:
                # a big message: let the flusher start persisting (and then sending) its
                # outputs while the next one is merged
                node.collect()
                await asyncio.sleep(0)
                now, wall = _monotonic_ms(), node.clock.wall_ms()
        node.counters["messages_received"] += len(request.messages)
        stats = core.stats
        refused = stats.entries_quarantined, stats.membership_updates_refused
        if refused != node.refused_seen:  # (peer input the core refused: say so)
            node.refused_seen = refused
            log.warning(
                "peer_input_refused",
                entries_quarantined=refused[0],
                max_quarantined_lead_ms=stats.max_quarantined_lead_ms,
                membership_updates_refused=refused[1],
            )
        node.collect()


class GossipBackend:
    """The AP store as the shared runtime sees it (caplab.store.StoreBackend)."""

    # every level: served, waited for, or refused with the gossip store's own reason
    consistency_levels = GOSSIP_LEVELS

    kind: int = kv_pb2.STORE_KIND_GOSSIP

    def __init__(self, config: NodeConfig, clock: SkewableClock) -> None:
        self.config = config
        self.clock = clock
        self.id = config.node_id
        self.peers = dict(config.peers)
        self.opts = GossipOptions.parse(config.options)
        self.storage: GossipStorage | None = None
        self._core: GossipCore | None = None
        self.links: dict[str, PeerLink] = {}
        self.inbound = InboundStreams()
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "messages_sent",
                "messages_received",
                "messages_dropped",
                "messages_malformed",
                "messages_forged",
                "wire_bytes_sent",
                "fsyncs",
                "writes_committed",
                "dedup_hits",
                "commit_retries",
            ),
            0,
        )
        self._pipe: Pipeline | None = None
        self._batch_grew = asyncio.Event()  # a client write joined the open batch
        self.failed: str | None = None  # why the node stopped for good
        self.failed_event = asyncio.Event()
        self.disk_full: str | None = None  # set while commits fail for lack of space
        self._flush_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._ticker_task: asyncio.Task[None] | None = None
        self._disk = DiskThread(f"gossip-disk-{self.id}")
        self._stopping = False
        # (entries quarantined, membership updates refused) last logged
        self.refused_seen = (0, 0)

    @property
    def core(self) -> GossipCore:
        assert self._core is not None, "node not started"
        return self._core

    @property
    def pipe(self) -> Pipeline:
        assert self._pipe is not None, "node not started"
        return self._pipe

    async def _disk_call(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._disk.call(fn, *args)

    # -- lifecycle -------------------------------------------------------------------
    async def start(self, server: grpc.aio.Server) -> None:
        self.storage = GossipStorage(self.config.data_dir)
        try:
            loaded = await self._disk_call(self.storage.load)
        except StorageError as e:
            # one line naming the file and what to do; the process exits with it
            log.critical("node_cannot_start", reason=str(e))
            raise errors.Unavailable(f"node {self.id} cannot start: {e}") from None
        legacy: dict[str, Value] = {}
        for d in loaded.dedup:
            # a per-node exactly-once table of an older version: kept as records (they
            # answer retries; without the key and delta they cannot settle a duplicate)
            legacy[applied_key(d.client_id, d.seq)] = Applied(d.ts, self.id, d.op, "", 0, d.num)
        loaded.state.update(legacy)
        for line in loaded.corrupt:
            log.error("corrupt_record_refused", file=str(self.storage.dir), record=line)
        self._core = GossipCore(
            self.id,
            [self.id, *self.peers],
            self.opts.core_config(),
            random.Random(),
            state=loaded.state,
            now_ms=_monotonic_ms(),
            wall_ms=self.clock.wall_ms(),
            hlc_floor=loaded.hlc,
            # a node that lost data counts in a new component (see gossip/storage.py)
            component=f"{self.id}/{loaded.epoch}" if loaded.epoch else self.id,
        )
        self._pipe = Pipeline(self._core, self.storage)
        if legacy:
            self.pipe.add_state(legacy)
            self.pipe.batch.commit.evict.update(d.client_id for d in loaded.dedup)
        self.counters["corrupt_records_refused"] = len(loaded.corrupt)
        log.info(
            "gossip_restored",
            keys=len(loaded.state),
            dedup_entries=len(loaded.dedup),
            hlc=str(loaded.hlc),
        )
        pb_grpc.add_GossipPeerServicer_to_server(GossipPeerServicer(self), server)
        for peer_id, addr in self.peers.items():
            link = PeerLink(self, peer_id, addr)
            link.sender.start()
            self.links[peer_id] = link
        self._ticker_task = asyncio.create_task(self._ticker())
        self._tasks = [self._ticker_task, asyncio.create_task(self._flusher())]

    async def before_shutdown(self) -> None:
        """Stop gossiping and refuse new writes; in-flight writes still complete."""
        self._stopping = True
        if self._ticker_task is not None:
            self._ticker_task.cancel()

    def stop_peer_streams(self) -> None:
        self.inbound.close()

    async def close(self) -> None:
        self._stopping = True
        deadline = time.monotonic() + 5.0
        pipe = self._pipe
        while (
            pipe is not None
            and self.failed is None
            and (pipe.batch.commit or pipe.pending_writes)
            and time.monotonic() < deadline
        ):
            self._flush_wake.set()
            await asyncio.sleep(0.01)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for link in self.links.values():
            await link.close()
        self._disk.shutdown()
        if self.storage is not None:
            self.storage.close()
        log.info("gossip_closed", fsyncs=self.counters["fsyncs"])

    # -- the loop ----------------------------------------------------------------------
    async def _ticker(self) -> None:
        interval = self.opts.tick_ms / 1000
        next_at = time.monotonic()
        while True:
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            self.core.tick(_monotonic_ms(), wall_ms=self.clock.wall_ms())
            self.collect()

    def collect(self) -> None:
        """Move the core's outputs into the open batch (persisted, then sent)."""
        if self.pipe.collect():
            self._flush_wake.set()

    async def _flusher(self) -> None:
        gap = self.opts.commit_gap_us / 1e6
        # Client writes the next batch waits for (see _gather): those of the previous
        # batch if it carried several and none arrived while it was being committed.
        want = 0
        while True:
            await self._flush_wake.wait()
            self._flush_wake.clear()
            pipe = self.pipe
            while pipe.batch:
                if want > 1:
                    await self._gather(want, gap)
                else:
                    # Writes that arrived during the last commit (or a lone write) go
                    # now, with the requests already runnable: no linger while writes
                    # wait for the disk (raft's rule).
                    await asyncio.sleep(0)
                b = pipe.take()
                if b.commit and not await self._commit(b):
                    return  # the node failed (see fail)
                # (checked before any of its clients can send their next write)
                want = 0 if pipe.batch.writes else b.writes
                messages = pipe.finish(b)
                if b.tag is not None and not b.tag.done():
                    b.tag.set_result(None)
                self._send_all(messages)

    async def _gather(self, want: int, gap: float) -> None:
        """Concurrent writers in lockstep (nothing arrived while the previous batch was
        committed): let the open batch grow to ``want`` client writes (those of the
        previous batch, whose clients were just answered and are sending their next
        ones), for at most ``gap`` seconds. Never while writes that arrived during a
        commit wait: they go as soon as it ends."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + gap
        while self.pipe.batch.writes < want and (left := deadline - loop.time()) > 0:
            self._batch_grew.clear()
            try:
                await asyncio.wait_for(self._batch_grew.wait(), left)
            except TimeoutError:
                return

    async def _commit(self, b: Batch) -> bool:
        """Make ``b`` durable. A full disk is retried (new writes are refused meanwhile);
        any other storage error is fatal: the state in memory may then differ from the
        disk, so the node stops (``fail``) rather than acknowledge or serve it."""
        delay = 0.05
        while True:
            try:
                await self._disk.call(self.pipe.commit, b)
                break
            except DiskFullError as e:
                if self.disk_full is None:
                    log.warning("disk_full", error=str(e))
                self.disk_full = str(e)
                self.counters["commit_retries"] += 1
                await asyncio.sleep(delay)  # a retry timer, not a wait for a condition
                delay = min(2 * delay, 2.0)
            except Exception as e:
                self.fail(f"storage failed: {e}")
                if b.tag is not None and not b.tag.done():
                    b.tag.set_exception(
                        errors.OutcomeUnknown(
                            f"node {self.id} failed while making the write durable ({e}); "
                            "outcome unknown"
                        )
                    )
                return False
        if self.disk_full is not None:
            log.info("disk_space_back")
            self.disk_full = None
        self.counters["fsyncs"] += 1
        self.counters["writes_committed"] += b.writes
        return True

    def fail(self, reason: str) -> None:
        """Fatal: log why, refuse everything from now on, and let the server stop the
        process (it exits non-zero with the reason)."""
        if self.failed is not None:
            return
        self.failed = reason
        log.critical("node_failed", reason=reason)
        self._stopping = True
        self.failed_event.set()

    def health(self) -> tuple[bool, str]:
        """(serving, why not): SERVING while the node runs (AP: it answers without any
        quorum); NOT_SERVING once it stops for good, while its disk is full (writes are
        refused), and while it shuts down."""
        if self.failed is not None:
            return False, f"failed: {self.failed}"
        if self._stopping:
            return False, "shutting down"
        if self.disk_full is not None:
            return False, f"disk full: {self.disk_full}"
        return True, ""

    def _send_all(self, messages: list[Message]) -> None:
        for m in messages:
            link = self.links.get(m.to)
            if link is not None:
                link.send(m)

    # -- writes ------------------------------------------------------------------------
    def _check_writable(self) -> None:
        if self.failed is not None:
            raise errors.Unavailable(f"node {self.id} failed ({self.failed}); not applied")
        if self._stopping:
            raise errors.Unavailable("this node is shutting down; not applied (retry elsewhere)")
        if self.disk_full is not None:
            raise errors.Unavailable(
                f"the disk of node {self.id} is full ({self.disk_full}); not applied (retry "
                "elsewhere, or free space)"
            )
        if self.pipe.pending_writes >= self.opts.max_pending:
            raise errors.Overloaded(
                f"{self.opts.max_pending} writes already waiting for the disk on node {self.id}; "
                "not applied (retry with backoff)"
            )

    async def _applied(
        self, rid: RequestId | None, op: str, key: str, value: bytes = b"", delta: int = 0
    ) -> Applied | None:
        """The durable record answering a retry of ``rid`` (applied by any node), or None
        if it is a new request. A request id used before for another operation or key, or
        for this operation and key with another payload (``value`` of a put, ``delta`` of
        an increment; compared by ``crdt.payload_digest``, when the record has one), is
        refused (raft refuses it the same way)."""
        if rid is None:
            return None
        try:
            rec = self.core.lookup(rid.client_id, rid.sequence)
        except RequestTooOldError:
            raise errors.OutcomeUnknown(
                f"request {rid.client_id}/{rid.sequence} is too old to tell whether it was "
                f"applied (this client has had more than {self.opts.dedup_window} newer "
                "requests since); an earlier copy may have been applied, this retry was not "
                "(outcome unknown)"
            ) from None
        if rec is None:
            return None
        # (a record of an older version's per-node table has no key: it answers any
        # retry of its operation; one without a digest, any retry of its operation and key)
        refused: str | None = None
        if rec.op != op or (rec.key and rec.key != key):
            refused = ""
        elif rec.digest and rec.digest != payload_digest(op, value, delta):
            refused = " with another value" if op == "put" else " with another delta"
        if refused is not None:
            raise errors.FailedPrecondition(
                f"request sequence {rid.sequence} of client {rid.client_id!r} was already used "
                f"for {'an' if rec.op[0] in 'aeiou' else 'a'} {rec.op} of key {rec.key!r}"
                f"{refused}; not applied"
            )
        self.counters["dedup_hits"] += 1
        durable = await self._visible(applied_key(rid.client_id, rid.sequence))
        if not isinstance(durable, Applied):
            raise errors.OutcomeUnknown(
                f"request {rid.client_id}/{rid.sequence}: its record is gone (outcome unknown)"
            )
        return durable

    def _clocks(self) -> tuple[int, int]:
        """(monotonic ms for the core's timers, physical ms with the injected skew)."""
        return _monotonic_ms(), self.clock.wall_ms()

    @staticmethod
    def _rid(rid: RequestId | None) -> tuple[str, int] | None:
        return None if rid is None else (rid.client_id, rid.sequence)

    def _enqueue_write(self, w: Write) -> asyncio.Future[None]:
        """Add a client write (its key, and its Applied record if any) to the open batch."""
        b = self.pipe.add_write(w)
        self._flush_wake.set()
        self._batch_grew.set()
        return self._durable(b)

    @staticmethod
    def _durable(b: Batch) -> asyncio.Future[None]:
        """Resolved once ``b`` is durable (created on demand)."""
        if b.tag is None:
            b.tag = asyncio.get_running_loop().create_future()
        fut: asyncio.Future[None] = b.tag
        return fut

    async def _visible(self, key: str) -> Value | None:
        """The value of ``key`` a read may see: the latest durable one."""
        b = self.pipe.unsynced.get(key)
        if b is None:
            return self.core.get(key)
        try:
            await asyncio.shield(self._durable(b))
        except errors.StoreError as e:
            raise errors.Unavailable(
                f"the latest change of {key!r} on node {self.id} could not be made durable "
                f"({e}); not served (retry elsewhere)"
            ) from None
        return Pipeline.durable_value(b, key)

    def _header(self, ts: Timestamp | None, token: bytes = b"") -> Header:
        return Header(
            node_id=self.id,
            hlc=None if ts is None else Hlc(ts.wall_ms, ts.logical, ts.node),
            stale_possible=True,
            session_token=token,
        )

    def _session_begin(self) -> dict[str, Timestamp]:
        """The request's session (its token, decoded). Before a write: the clock moves
        past everything the session saw, so the write is ordered after it (monotonic
        writes, writes-follow-reads per key), even on a node that has not seen it yet."""
        keys = decode_session_token(session_token.get())
        if keys:
            self.core.witness(max(keys.values()), self.clock.wall_ms())
        return keys

    @staticmethod
    def _type_error(e: WrongTypeError) -> errors.FailedPrecondition:
        return errors.FailedPrecondition(
            f"key {e.key!r} holds a {e.actual}; {e.op} is not allowed on it (a key's type is "
            "fixed by its first write until it is deleted); not applied"
        )

    async def put(
        self, key: str, value: bytes, rid: RequestId | None, timeout: float | None
    ) -> Header:
        sess = self._session_begin()
        rec = await self._applied(rid, "put", key, value=value)
        if rec is not None:
            return self._header(rec.ts, _session_note(sess, key, rec.ts))
        self._check_writable()
        try:
            now, wall = self._clocks()
            w = self.core.put(key, value, now, self._rid(rid), wall_ms=wall)
        except WrongTypeError as e:
            raise self._type_error(e) from None
        await asyncio.shield(self._enqueue_write(w))
        return self._header(w.ts, _session_note(sess, key, w.ts))

    async def delete(self, key: str, rid: RequestId | None, timeout: float | None) -> DeleteResult:
        sess = self._session_begin()
        rec = await self._applied(rid, "delete", key)
        if rec is not None:
            return DeleteResult(
                self._header(rec.ts, _session_note(sess, key, rec.ts)), bool(rec.num)
            )
        self._check_writable()
        cur = self.core.get(key)
        existed = isinstance(cur, Register) and cur.value is not None
        try:
            now, wall = self._clocks()
            w = self.core.delete(key, now, self._rid(rid), wall_ms=wall)
        except WrongTypeError as e:
            raise self._type_error(e) from None
        await asyncio.shield(self._enqueue_write(w))
        return DeleteResult(self._header(w.ts, _session_note(sess, key, w.ts)), existed)

    async def increment(
        self, key: str, delta: int, rid: RequestId | None, timeout: float | None
    ) -> IncrementResult:
        sess = self._session_begin()  # (counters: the token passes through unchanged)
        token = _session_note(sess, key, None)
        rec = await self._applied(rid, "increment", key, delta=delta)
        if rec is not None:
            return IncrementResult(self._header(rec.ts, token), rec.num)
        self._check_writable()
        try:
            now, wall = self._clocks()
            w = self.core.increment(key, delta, now, self._rid(rid), wall_ms=wall)
        except WrongTypeError as e:
            raise self._type_error(e) from None
        except ValueOutOfRangeError:
            cur = self.core.get(key)
            now = cur.value if isinstance(cur, Counter) else 0
            raise errors.OutOfRange(
                f"incrementing counter {key!r} (now {now} on node {self.id}) by {delta} would "
                "overflow a signed 64-bit integer; nothing was applied"
            ) from None
        v = self.core.get(key)
        value = v.value if isinstance(v, Counter) else 0
        await asyncio.shield(self._enqueue_write(w))
        return IncrementResult(self._header(w.ts, token), value)

    async def compare_and_swap(
        self,
        key: str,
        expected: bytes | None,
        new: bytes,
        rid: RequestId | None,
        timeout: float | None,
    ) -> CasResult:
        raise errors.FailedPrecondition(CAS_REFUSAL)

    # -- reads -------------------------------------------------------------------------
    async def get(
        self,
        key: str,
        consistency: Consistency,
        timeout: float | None,
        *,
        max_staleness_ms: int = 0,
    ) -> ReadResult:
        if consistency is Consistency.LINEARIZABLE:
            raise errors.FailedPrecondition(LINEARIZABLE_REFUSAL)
        if consistency is Consistency.CONSISTENT_PREFIX:
            raise errors.FailedPrecondition(CONSISTENT_PREFIX_REFUSAL)
        sess = decode_session_token(session_token.get())
        # refuse a little before the call's deadline, so the client gets the reason
        wait = DEFAULT_WAIT_S if timeout is None else max(0.0, timeout - min(0.1, timeout / 10))
        if consistency in SESSION_LEVELS:
            v = await self._sticky_read(key, sess.get(key), wait)
        else:
            if consistency is Consistency.BOUNDED_STALENESS:
                await self._fresh_within(max_staleness_ms, wait)
            v = await self._visible(key)
        if isinstance(v, Register):
            return ReadResult(self._header(v.ts, _session_note(sess, key, v.ts)), v.value)
        token = _session_note(sess, key, None)
        if isinstance(v, Counter):
            # A counter has no single write timestamp: the clock now bounds every increment.
            # Outside int64 (concurrent increments merged): saturated, see kv.proto.
            return ReadResult(self._header(self.core.hlc_now, token), saturate(v.value))
        return ReadResult(self._header(None, token), None)

    async def _sticky_read(self, key: str, need: Timestamp | None, wait: float) -> Value | None:
        """SESSION, MONOTONIC_READS, READ_MY_WRITES: the local value of ``key`` once this
        replica holds the version the session wrote or saw (``need``; None: at once). A
        later version is as good (LWW: it superseded the session's). Waits up to ``wait``
        seconds for gossip to bring it, then refuses: sticky availability. (A counter, or
        a key the token dropped, carries no session guarantee: served at once.)"""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            v = await self._visible(key)
            if need is None or isinstance(v, Counter):
                return v
            if isinstance(v, Register) and v.ts >= need:
                return v
            if v is None and self._gone(key, need):
                return v
            left = deadline - loop.time()
            if left <= 0:
                raise errors.Unavailable(
                    f"sticky availability: this node ({self.id}) has not yet seen the "
                    f"session's write/read of {key!r} at {need.wall_ms}.{need.logical}@"
                    f"{need.node} (it may be on the other side of a partition); not served "
                    "(retry, or read from the node the session used)"
                )
            await asyncio.sleep(min(SESSION_POLL_S, left))  # polls the replica

    def _gone(self, key: str, need: Timestamp) -> bool:
        """``key`` is absent here because its tombstone, at or after ``need``, was
        collected: known while the node remembers the collection; after that memory
        (``collected_memory_ms``) lapsed, presumed when ``need`` is older than it and this
        node synced with every peer since (a version any of them held would be here).
        The presumption is the guarantee's one weak spot: documented, not proven."""
        core = self.core
        ts = core.collected_ts(key)
        if ts is not None:
            return ts >= need
        horizon = core.hlc_now.wall_ms - self.opts.collected_memory_ms
        return need.wall_ms < horizon and not self._stale_peers(self.opts.collected_memory_ms)

    def _stale_peers(self, bound_ms: int) -> list[tuple[str, int | None]]:
        """The peers this node has not synced with in the last ``bound_ms`` ms (by its
        monotonic clock), with how long ago it last did (None: never)."""
        core = self.core
        now = _monotonic_ms()
        out: list[tuple[str, int | None]] = []
        for p in sorted(core.member_states()):
            if p == self.id:
                continue
            t = core.last_sync_ms.get(p)
            if t is None or now - t > bound_ms:
                out.append((p, None if t is None else now - t))
        return out

    async def _fresh_within(self, bound_ms: int, wait: float) -> None:
        """BOUNDED_STALENESS: return once this node has synced with every peer it knows
        (alive or not: a peer it cannot reach may hold writes it lacks) within the last
        ``bound_ms`` ms; meanwhile it starts an anti-entropy round with each stale peer.
        After ``wait`` seconds: UNAVAILABLE naming the peer and how long ago.

        The claim: a sync with peer p at time t (an anti-entropy round with p completed,
        or a *complete* Deltas batch from p: one that starts where this node's acks end
        and reaches p's log head, ``messages.Deltas.complete``; ``GossipCore.last_sync_ms``;
        an ack of our own Deltas does not count, nor does a batch of a backlog) means this
        replica then held every write p held when it sent, so the value read misses at
        most the writes made (or reaching any peer) in the last ``bound_ms`` ms plus one
        message delay. Times are this node's monotonic clock only: no assumption on the
        other nodes' clocks or on skew. Not covered: a write that reached no peer but a
        node this one does not know. The spectrum's bounded-staleness checker measures
        what was served."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        kicked: dict[str, float] = {}
        retry = self.opts.ae_round_timeout_ms / 1000
        while True:
            stale = self._stale_peers(bound_ms)
            if not stale:
                return
            left = deadline - loop.time()
            if left <= 0:
                peer, ago = stale[0]
                since = "never" if ago is None else f"{ago} ms ago"
                raise errors.Unavailable(
                    f"bounded staleness: node {self.id} last synced with peer {peer} {since}, "
                    f"more than the {bound_ms} ms bound (it may be partitioned away or down); "
                    "not served (retry, or read from another node or with LOCAL)"
                )
            now = loop.time()
            for peer, _ in stale:
                if now - kicked.get(peer, -retry) >= retry:
                    kicked[peer] = now
                    self.core.start_anti_entropy(_monotonic_ms(), peer)
            self.collect()
            await asyncio.sleep(min(SESSION_POLL_S, left))  # polls the sync times

    # -- introspection -------------------------------------------------------------------
    async def status(self) -> kv_pb2.StatusResponse:
        core = self.core
        hlc = core.hlc_now
        st = kv_pb2.StatusResponse(
            node_id=self.id,
            address=self.config.advertise or self.config.listen,
            role="replica",
            keys=core.key_count(),
            state_digest=core.digest(),
            hlc=kv_pb2.HlcTimestamp(wall_ms=hlc.wall_ms, logical=hlc.logical, node_id=hlc.node),
        )
        # the core times syncs on the monotonic clock: shown as wall-clock times
        mono_to_wall = self.clock.wall_ms() - _monotonic_ms()
        sync = {p: t + mono_to_wall for p, t in core.last_sync_ms.items()}
        for peer_id, info in sorted(core.member_states().items()):
            st.members.add(
                node_id=peer_id,
                address=self.peers.get(peer_id, ""),
                state=MEMBER_STATES.get(info.state, kv_pb2.MEMBER_STATE_UNSPECIFIED),
                incarnation=info.incarnation,
                last_sync_unix_ms=sync.get(peer_id, 0),
            )
        stats = core.stats
        for f in dataclasses.fields(stats):
            st.counters[f.name] = getattr(stats, f.name)
        st.counters["anti_entropy_rounds"] = stats.ae_rounds_completed
        st.counters["tombstones"] = core.tombstone_count()
        st.counters["incarnation"] = core.incarnation
        st.counters["pending_writes"] = self.pipe.pending_writes
        st.counters["dedup_clients"] = core.client_count()
        st.counters["dedup_records"] = core.record_count()
        for k, v in self.counters.items():
            st.counters[k] = v
        return st

    async def dump(self, start_after: str, limit: int) -> AsyncIterator[kv_pb2.DumpEntry]:
        state = self.core.state()
        keys = sorted(k for k in state if k > start_after and not is_reserved(k))
        if limit:
            keys = keys[:limit]
        for key in keys:
            v = await self._visible(key)
            if isinstance(v, Register):
                yield kv_pb2.DumpEntry(
                    key=key,
                    type=kv_pb2.VALUE_TYPE_REGISTER,
                    value=v.value or b"",
                    tombstone=v.value is None,
                    hlc=kv_pb2.HlcTimestamp(
                        wall_ms=v.ts.wall_ms, logical=v.ts.logical, node_id=v.ts.node
                    ),
                )
            elif isinstance(v, Counter):
                yield kv_pb2.DumpEntry(
                    key=key,
                    type=kv_pb2.VALUE_TYPE_COUNTER,
                    counter=saturate(v.value),
                    counter_increments={c: saturate(a) for c, a in v.p.items()},
                    counter_decrements={c: saturate(a) for c, a in v.n.items()},
                    counter_exact=str(v.value),
                    counter_increments_exact={c: str(a) for c, a in v.p.items()},
                    counter_decrements_exact={c: str(a) for c, a in v.n.items()},
                )


def build_backend(config: NodeConfig, clock: SkewableClock) -> GossipBackend:
    return GossipBackend(config, clock)
