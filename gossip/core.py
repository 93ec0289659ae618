"""Sans-IO core of the AP key-value store: CRDT replica + delta gossip + anti-entropy + SWIM.

Theory of operation
-------------------
Every node holds a full replica (``State``: key -> LWW ``Register`` | PN-``Counter``) and
answers reads and writes from it at any time (AP). Writes are delta-mutations stamped by a
hybrid logical clock; replicas converge because every exchange is a CRDT join.

Client writes. ``put``/``delete``/``increment`` apply a one-key delta to the replica and
return a ``Write`` whose ``delta`` the shell must persist (fsync) BEFORE acknowledging the
client. The shell must do that before its next call into the core.

Outputs and persistence. ``tick`` and ``step`` queue outputs; ``take_outputs`` returns
them. ``Outputs.to_persist`` (remote state merged into the replica) and
``Outputs.collected`` (tombstones to remove) must be applied durably BEFORE sending
``Outputs.messages``: a DeltasAck or an anti-entropy reply asserts the data is durable.

Delta gossip. Every change (local or merged from a peer) appends its key to a delta log
with a sequence number (a key appears once, at its latest sequence number). Per peer the
node keeps ``acked``: the peer durably holds the current value of every key logged at or
below it. Every ``gossip_interval_ms`` the node picks ``fanout`` random live peers and
streams to each the current values of the keys logged after what it already sent (at most
``delta_batch_max`` keys per ``Deltas``, at most ``deltas_window`` unacknowledged
``Deltas`` per peer, each continuing where the previous one ended); the ``DeltasAck`` of
a batch that left more of the log behind releases the next batch at once (ack-clocked, so
a backlog streams at the speed of the peer rather than of the timer), while a steady load
travels once per interval, in few large batches. A batch unacknowledged for
``deltas_resend_ms`` makes the node go back and re-send from ``acked``. A key is not sent
to a peer known to hold its current value: the peer it was merged from, or any peer that
sent us that same value (its Deltas or anti-entropy items are evidence it holds them). An
anti-entropy round that finds the two roots equal acknowledges the whole log up to the
round's start. The log is pruned once every peer acked an entry and capped at
``delta_log_max`` keys; a peer whose unacked entries were dropped is "behind": it gets
anti-entropy rounds (which repair everything) at once and then once per round timeout
until one completes.

Anti-entropy. Every ``anti_entropy_interval_ms`` the node runs a push-pull round with one
random live peer (a "behind" peer first, then a peer under repair, see below): the two
sides descend the Merkle tree (root, then the 16 children of each differing node,
alternating ``AeRequest``/``AeResponse``) and then swap the entries of the differing leaves
(``AeItems``), so both end with the join. Bulk shortcut: once the differing nodes of a
level hold at most ``ae_bulk_keys`` keys each (estimated from the local key count), the
side that found them ships the items of those whole subtrees instead of descending
further (``AeItems.leaves`` then names subtrees, see ``MerkleTree.cover_code``), in chunks
of about ``ae_chunk_items`` so the peer merges, persists and answers (and forwards) each
while the next is on its way. Identical replicas exchange one root hash. At most
``ae_max_nodes`` differing nodes are followed per level, bounding the cost of one round;
later rounds finish the job. The reply to an ``AeItems(reply=True)`` (sent once the peer
persisted it) proves the peer holds what was shipped: those keys are skipped in the delta
stream to it (not used for tombstone GC).

Repair mode. A peer coming back from dead (its membership changes from dead, or a message
arrives from it while dead) gets no delta stream: its backlog is repaired by anti-entropy
instead, which costs each key about once instead of once per (sender, receiver) pair. One
node starts a round with it at once (the smaller id of the pair, if no healthy member with
a still smaller id exists, and only for the first peer coming back in two round timeouts: one
bulk repair, whose result the two sides then spread by delta gossip); it repeats rounds
back to back until one finds equal roots (the ack of the whole log up to the round's
start, which ends repair mode on both sides), at most ``repair_max_rounds`` rounds or
``repair_max_ms``, then delta streaming resumes. Other nodes leave a peer under repair to
that node for two round timeouts; after that their timer picks it first (one repair round
at a time). A round unanswered for ``ae_round_timeout_ms`` (at most the interval) is
presumed lost.

Membership (SWIM with incarnation-number suspicion, as in Lifeguard/memberlist). Every
``ping_interval_ms`` the node probes the next member of a shuffled round-robin: ``Ping``;
no ``Ack`` within ``ping_timeout_ms`` -> ``PingReq`` through ``indirect_k`` other live
members; still nothing by the end of the interval -> the member is suspected with its
current incarnation. A suspect not refuted within ``suspicion_timeout_ms`` is dead. A node
hearing it is suspect/dead refutes by bumping its incarnation (alive(i+1) overrides).
Updates are piggybacked on pings/acks, each sent ``retransmit_mult * ceil(log2(n+1))``
times. The static member list defines the cluster: dead members are still probed, once
every ``dead_ping_every`` turns, and a probe to a suspect/dead member carries that verdict
so the member (back after a crash or partition) refutes and rejoins on its own.
Lifeguard's local-health multiplier and dogpile suspicion timeouts are not implemented.

Tombstones. A delete writes a tombstone ``Register(ts, None)``. The node tracks which
members hold each tombstone (a DeltasAck for a batch containing it, an entry equal to it
received from a peer, or an equal Merkle root). A tombstone is collected when (a) every
member holds it and it is older than ``tombstone_min_age_ms`` (in-flight messages older
than that could resurrect data: the network delay bound assumed), or (b) it is older than
``tombstone_grace_ms`` regardless. Rule (b) can resurrect a deleted value: a member that
missed the tombstone for longer than the grace period (e.g. a long-dead node returning)
still holds the old value and will spread it again. Collection runs every ``gc_interval_ms``. After
collecting, the node remembers the tombstone in memory for ``collected_memory_ms`` (at
least ``max(2 * tombstone_min_age_ms, 4 * anti_entropy_interval_ms)``: slower peers may
learn who holds it only by anti-entropy) and drops incoming entries it dominates while
still acknowledging them, so slower peers, and a member restarted with tombstones the
others collected while it was down, do not re-insert it everywhere (each replica would
then collect it again, at its own time, and the replicas' states would differ until the
last one did). A member down for longer than that re-inserts them once.

LWW accounting. ``stats.lww_overwrites`` counts, on the node that issued it, every own
register write (put or delete, which is acknowledged once persisted) that is replaced in
this replica by a merge of a write issued by another node. Timestamps cannot tell a
concurrent overwrite from a causally later one, so this is an upper bound on writes lost
to concurrency; a write replaced before it was persisted or after the node crashed is not
counted. ``stats.type_conflict_overwrites`` counts own register writes replaced by a
counter (type conflict; the counter wins).
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from gossip.crdt import (
    COMPONENT_MAX,
    INT64_MAX,
    INT64_MIN,
    Applied,
    Counter,
    Register,
    State,
    Value,
    WrongTypeError,
    applied_key,
    apply_delta,
    delete_delta,
    increment_delta,
    is_reserved,
    parse_applied_key,
    put_delta,
)
from gossip.hlc import HLC, ClockDriftError, Timestamp
from gossip.merkle import MerkleTree
from gossip.messages import (
    ALIVE,
    DEAD,
    SUSPECT,
    Ack,
    AeItems,
    AeRequest,
    AeResponse,
    Deltas,
    DeltasAck,
    Entry,
    Member,
    Message,
    Ping,
    PingReq,
    entry_size,
    wire_size,
)

__all__ = [
    "GossipConfig",
    "GossipCore",
    "MemberInfo",
    "Outputs",
    "RequestTooOldError",
    "Stats",
    "ValueOutOfRangeError",
    "Write",
    "WrongTypeError",
]


@dataclass(frozen=True, slots=True)
class GossipConfig:
    """Timing and size parameters. All durations in milliseconds."""

    gossip_interval_ms: int = 100
    fanout: int = 3
    anti_entropy_interval_ms: int = 1000
    ping_interval_ms: int = 200  # must exceed ping_timeout_ms
    ping_timeout_ms: int = 100
    indirect_k: int = 3
    suspicion_timeout_ms: int = 1000
    dead_ping_every: int = 5  # a dead member is probed once per this many of its turns
    retransmit_mult: int = 3
    max_piggyback: int = 8  # membership updates per ping/ack
    tombstone_min_age_ms: int = 10_000  # also the assumed bound on message delay
    # How long a collected tombstone is remembered (entries it dominates are dropped, and
    # a member that still holds it is told it may collect it too): long enough for a
    # restarted member to come back with tombstones the others collected meanwhile,
    # without re-inserting them everywhere (each then collected again, at different times).
    collected_memory_ms: int = 300_000
    gc_interval_ms: int = 1000  # tombstone collection runs this often
    tombstone_grace_ms: int = 7 * 24 * 3600 * 1000  # forced GC: may resurrect (see module doc)
    # Exactly once (Applied records): per client, the records of its last ``dedup_window``
    # sequences are kept (older ones: a retry is answered "too old"); a client's records
    # are all dropped ``dedup_ttl_ms`` after its latest one (a retry later than that is a
    # new request). Records are collected like tombstones: once every member holds them.
    dedup_window: int = 128
    dedup_ttl_ms: int = 3_600_000
    delta_log_max: int = 10_000  # keys
    delta_batch_max: int = 1_000  # keys per Deltas message
    # Flow control of delta gossip, per peer: at most this many unacknowledged Deltas
    # (each continues where the previous one ended: pipelining) ...
    deltas_window: int = 4
    # ... and when the oldest is unacknowledged for this long, the window is re-sent from
    # the peer's last acknowledged position (go-back-N).
    deltas_resend_ms: int = 1000
    # How long an anti-entropy round may take before it is presumed lost (the repair-mode
    # windows below count in these too); never more than the interval.
    ae_round_timeout_ms: int = 1000
    ae_max_nodes: int = 4096  # differing tree nodes followed per level per round
    # Bulk anti-entropy: instead of descending further, ship the items under the differing
    # nodes once they hold at most this many keys each (estimated from the local key count).
    ae_bulk_keys: int = 8
    ae_chunk_items: int = 2_000  # items per AeItems(reply=True) message (about)
    # Repair mode: a peer that comes back (suspect/dead -> alive) gets no delta stream; it is
    # repaired by back-to-back anti-entropy rounds until one finds equal roots (the ack of
    # the whole log), at most this many rounds or for this long.
    repair_max_rounds: int = 4
    repair_max_ms: int = 5000
    merkle_depth: int = 4
    # A remote timestamp further ahead of the local physical clock than this is still
    # followed (the HLC moves to it, so later local writes order after it: read-your-writes
    # holds on every node), but counted and logged as a clock jump: some node's clock is
    # wrong, and every clock now runs ahead of physical time by the jump.
    max_drift_ms: int = 60_000
    # Estimated bytes (messages.wire_size) of the entries one Deltas or AeItems carries:
    # at least one entry, so any legal value (up to 1 MiB) travels; the shell's receivers
    # accept a few times this.
    max_message_bytes: int = 1 << 20


class ValueOutOfRangeError(Exception):
    """An increment would take a counter outside the int64 range."""


class RequestTooOldError(Exception):
    """A request's sequence is older than its client's window and its record is gone:
    it may have been applied long ago (its answer is forgotten)."""


@dataclass(frozen=True, slots=True)
class Write:
    """Result of a client write: persist ``delta`` durably before acknowledging."""

    key: str
    ts: Timestamp  # HLC timestamp of the write (a counter increment also gets one)
    delta: dict[str, Value]  # one-key state fragment to join into the durable state


@dataclass(frozen=True, slots=True)
class Outputs:
    """Everything the shell must do; durably apply ``to_persist``/``collected`` first."""

    messages: tuple[Message, ...]
    to_persist: dict[str, Value]  # join each entry into the durable state
    # Tombstones garbage-collected: remove key from the durable state if it still holds
    # exactly ``Register(ts, None)``.
    collected: tuple[tuple[str, Timestamp], ...]


@dataclass(slots=True)
class MemberInfo:
    """This node's view of one member."""

    state: str  # alive | suspect | dead
    incarnation: int
    since_ms: int  # when the state was last changed


@dataclass(slots=True)
class Stats:
    """Monotone counters for the shell's Status."""

    deltas_sent: int = 0  # Deltas messages
    delta_entries_sent: int = 0
    deltas_received: int = 0
    delta_entries_received: int = 0
    bytes_sent: int = 0  # wire_size estimate over every message
    bytes_received: int = 0
    ae_rounds_started: int = 0
    ae_rounds_completed: int = 0
    ae_items_sent: int = 0
    ae_items_received: int = 0
    lww_overwrites: int = 0
    type_conflict_overwrites: int = 0
    tombstones_collected: int = 0
    tombstones_force_collected: int = 0  # by grace period (subset of the above)
    records_collected: int = 0  # Applied records (exactly once) collected
    # the same request met here applied on two nodes (each detection; the later
    # application is settled, see "Exactly once")
    duplicates_merged: int = 0
    # remote timestamps more than max_drift_ms ahead of the local physical clock, which
    # the HLC followed all the same (see GossipConfig.max_drift_ms)
    clock_jumps: int = 0
    max_clock_jump_ms: int = 0  # the largest such lead seen
    peers_fell_behind: int = 0
    register_conflicts: int = 0  # equal timestamps, different values: corrupt or forged


@dataclass(slots=True)
class _Probe:
    target: str
    seq: int
    start_ms: int
    indirect_sent: bool = False
    acked: bool = False


@dataclass(slots=True)
class _Relay:
    requester: str
    seq: int
    target: str
    expire_ms: int


@dataclass(slots=True)
class _Round:
    peer: str
    start_ms: int
    log_seq: int  # the initiator's delta-log sequence number when the round started
    waiting: int = 0  # AeItems(reply=True) chunks we sent whose reply has not come yet


@dataclass(slots=True)
class _Batch:
    """A Deltas in flight: covers the sender's log range (start, end], end = Deltas.seq."""

    start: int
    # Tombstones it carries: the peer holds them once this exact batch is acknowledged.
    tombs: tuple[tuple[str, Timestamp], ...]
    sent_ms: int
    # More of the log was left for the next batch: its ack sends that at once (a backlog
    # streams ack-clocked); otherwise the next batch waits for the gossip timer, so that
    # a steady load travels in few, large batches.
    more: bool = False


@dataclass(slots=True)
class _Flow:
    """Delta-gossip state towards one peer."""

    # Invariant: the peer durably holds the current value of every key whose delta-log
    # sequence number is <= acked (acknowledged, or known from the peer's own messages).
    acked: int
    sent: int  # batches were sent up to this sequence number (>= acked)
    inflight: dict[int, _Batch] = field(default_factory=dict)  # end seq -> batch
    # Batches given up on by a go-back: a late ack still counts, but they no longer
    # occupy the window.
    late: dict[int, _Batch] = field(default_factory=dict)
    # Congestion control: batches allowed in flight (1 after a go-back, +1 per ack, at most
    # ``deltas_window``) and the smoothed ack delay (the go-back timeout is at least 3x it).
    cwnd: int = 1
    srtt_ms: float = 0.0
    # Acknowledged ranges (start, end] above ``acked`` not yet contiguous with it.
    done: list[tuple[int, int]] = field(default_factory=list)


@dataclass(slots=True)
class _Collected:
    ts: Timestamp
    expire_ms: int
    value: Value  # what was collected (a tombstone or an Applied record)


@dataclass(slots=True)
class _Client:
    """Applied records held for one client."""

    max_seq: int  # the highest sequence seen (its window ends there)
    records: int  # how many are held


@dataclass(slots=True)
class _Pending:
    member: Member
    left: int


@dataclass(slots=True)
class _Out:
    messages: list[Message] = field(default_factory=list)
    persist: dict[str, Value] = field(default_factory=dict)
    collected: list[tuple[str, Timestamp]] = field(default_factory=list)


def _is_tombstone(v: Value | None) -> bool:
    return isinstance(v, Register) and v.value is None


def _is_collectable(v: Value | None) -> bool:
    """Tombstones and Applied records: kept until every member holds them."""
    return isinstance(v, Applied) or (isinstance(v, Register) and v.value is None)


class GossipCore:
    """One replica of the AP store. Pure and synchronous; see the module docstring."""

    def __init__(
        self,
        node_id: str,
        members: Sequence[str],
        config: GossipConfig,
        rng: random.Random,
        *,
        state: State | None = None,
        now_ms: int = 0,
        hlc_floor: Timestamp | None = None,
        component: str | None = None,
    ) -> None:
        if config.ping_interval_ms <= config.ping_timeout_ms:
            raise ValueError("ping_interval_ms must exceed ping_timeout_ms")
        self.node_id = node_id
        # this node's counter component: its id, or ``id/epoch`` once it lost its data
        self.component = component or node_id
        self.config = config
        self._rng = rng
        self._all = frozenset(members) | {node_id}
        self._peers = sorted(self._all - {node_id})
        self._state: dict[str, Value] = dict(state or {})
        self._merkle = MerkleTree(config.merkle_depth)
        self._merkle.update_many(self._state.items())
        self._hlc = HLC(node_id, max_drift_ms=config.max_drift_ms)
        regs = [v.ts for v in self._state.values() if isinstance(v, Register | Applied)]
        if regs:
            # Never reissue a timestamp below one already persisted (restart after crash).
            self._hlc.observe(max(regs), now_ms)
        if hlc_floor is not None:
            # The persisted high-water mark covers timestamps that no register keeps
            # (increments, overwritten writes): never reissue one after a restart.
            self._hlc.observe(hlc_floor, now_ms)
        self.stats = Stats()
        # Delta log. ``_log``: key -> seq of its latest change. ``_log_order``: (seq, key)
        # in increasing seq order, with stale pairs (key re-logged since) skipped when read;
        # live pairs start at ``_log_head``. Sequence numbers start at a random point so
        # acks addressed to an earlier incarnation of this node never match new batches.
        self._log: dict[str, int] = {}
        self._log_order: list[tuple[int, str]] = []
        self._log_head = 0
        self._seq = rng.getrandbits(60)
        self._log_floor = self._seq  # entries with seq <= floor were dropped without every ack
        # key (in the log) -> peers known to hold its current value (they sent it to us)
        self._known: dict[str, set[str]] = {}
        self._flow: dict[str, _Flow] = {p: _Flow(self._seq, self._seq) for p in self._peers}
        self._behind: set[str] = set()
        self._behind_retry = now_ms  # next time a behind peer may get a round of its own
        # repair mode: peer -> [rounds completed, since_ms]; ``_ae_now``: start a round now
        self._repair: dict[str, list[int]] = {}
        self._ae_now: set[str] = set()
        self._repair_started = now_ms - 10 * config.anti_entropy_interval_ms
        # (peer, round) -> entries we sent in AeItems(reply=True): its reply (sent once they
        # are durable) proves the peer holds them (bounded; oldest dropped)
        self._shipped: dict[tuple[str, int, int], tuple[Entry, ...]] = {}
        # tombstones and Applied records: key -> members known to hold it (or a newer value)
        self._tomb: dict[str, set[str]] = {}
        self._clients: dict[str, _Client] = {}
        self._records = 0
        self._repush: dict[str, int] = {}  # tombstone -> when it may be pushed again
        for k, v in self._state.items():
            if _is_collectable(v):
                self._tomb[k] = {node_id}
                self._log_key(k)  # push restored tombstones to learn who holds them
                if isinstance(v, Applied):
                    self._record_added(k)
        self._collected: dict[str, _Collected] = {}
        # membership
        self._incarnation = 0
        self._members: dict[str, MemberInfo] = {
            p: MemberInfo(ALIVE, 0, now_ms) for p in self._peers
        }
        self._pending: dict[str, _Pending] = {}
        self._probe_order: list[str] = []
        self._dead_skips: dict[str, int] = dict.fromkeys(self._peers, 0)
        self._probe_seq = 0
        self._probe: _Probe | None = None
        self._relays: dict[int, _Relay] = {}
        self._rounds: dict[int, _Round] = {}
        self.last_sync_ms: dict[str, int] = {}
        # timers (jittered start so nodes do not run in lock-step)
        self._next_gossip = now_ms + rng.randrange(config.gossip_interval_ms)
        self._next_ae = now_ms + rng.randrange(config.anti_entropy_interval_ms)
        self._next_ping = now_ms + rng.randrange(config.ping_interval_ms)
        self._next_gc = now_ms + rng.randrange(config.gc_interval_ms)
        self._now = now_ms
        self._out = _Out()

    # ------------------------------------------------------------------ observability

    def digest(self) -> bytes:
        """Hash of the whole replica (Merkle root): equal iff states are equal."""
        return self._merkle.root()

    @property
    def hlc_now(self) -> Timestamp:
        """Latest HLC timestamp issued or observed (does not advance the clock)."""
        return self._hlc.peek()

    @property
    def incarnation(self) -> int:
        """This node's SWIM incarnation number."""
        return self._incarnation

    def member_states(self) -> dict[str, MemberInfo]:
        """This node's view of every other member (copies)."""
        return {p: MemberInfo(m.state, m.incarnation, m.since_ms) for p, m in self._members.items()}

    def state(self) -> Mapping[str, Value]:
        """Read-only view of the replica (do not mutate)."""
        return self._state

    def tombstone_count(self) -> int:
        """Number of tombstones currently held."""
        return len(self._tomb) - self._records

    def record_count(self) -> int:
        """Number of Applied records (exactly once) currently held."""
        return self._records

    def client_count(self) -> int:
        """Clients with Applied records held."""
        return len(self._clients)

    def lookup(self, client_id: str, seq: int) -> Applied | None:
        """The record of request (client_id, seq) if some node applied it (as far as this
        replica knows); None if it is new. Raises ``RequestTooOldError`` if its record is
        gone because the client's window moved past it."""
        cl = self._clients.get(client_id)
        if cl is not None and seq <= cl.max_seq - self.config.dedup_window:
            # (even while its record is still held: the answer must not depend on when
            # collection runs)
            raise RequestTooOldError(f"request {client_id}/{seq} is too old")
        rec = self._state.get(applied_key(client_id, seq))
        return rec if isinstance(rec, Applied) else None

    def _record_added(self, key: str) -> None:
        parsed = parse_applied_key(key)
        if parsed is None:
            return
        client, seq = parsed
        self._records += 1
        cl = self._clients.get(client)
        if cl is None:
            self._clients[client] = _Client(seq, 1)
        else:
            cl.records += 1
            cl.max_seq = max(cl.max_seq, seq)

    def _record_removed(self, key: str) -> None:
        parsed = parse_applied_key(key)
        if parsed is None:
            return
        self._records -= 1
        cl = self._clients.get(parsed[0])
        if cl is not None:
            cl.records -= 1
            if cl.records <= 0:
                del self._clients[parsed[0]]

    def _out_of_window(self, key: str) -> bool:
        """An Applied record's sequence is older than its client's window."""
        parsed = parse_applied_key(key)
        if parsed is None:
            return False
        cl = self._clients.get(parsed[0])
        return cl is not None and parsed[1] <= cl.max_seq - self.config.dedup_window

    def get(self, key: str) -> Value | None:
        """The local value of ``key``: None if never written (or its tombstone collected);
        a ``Register`` with ``value is None`` if deleted."""
        return self._state.get(key)

    # ------------------------------------------------------------------ client writes

    # ``rid`` (client_id, sequence): the write also records its application (an Applied
    # record in the delta, persisted with it). The caller checks ``lookup`` first: a
    # request already applied must be answered from its record, not applied again.

    def put(self, key: str, value: bytes, now_ms: int, rid: tuple[str, int] | None = None) -> Write:
        """LWW write. Raises ``WrongTypeError`` if ``key`` holds a counter."""
        self._check_key(key, rid)
        ts = self._hlc.now(now_ms)
        delta = put_delta(self._state, key, value, ts)
        self._record(delta, rid, Applied(ts, self.component, "put", key, 0, 0))
        self._apply_local(delta, now_ms)
        return Write(key, ts, delta)

    def delete(self, key: str, now_ms: int, rid: tuple[str, int] | None = None) -> Write:
        """Tombstone write. Raises ``WrongTypeError`` if ``key`` holds a counter."""
        self._check_key(key, rid)
        ts = self._hlc.now(now_ms)
        cur = self._state.get(key)
        existed = isinstance(cur, Register) and cur.value is not None
        delta = delete_delta(self._state, key, ts)
        self._record(delta, rid, Applied(ts, self.component, "delete", key, 0, int(existed)))
        self._apply_local(delta, now_ms)
        return Write(key, ts, delta)

    def _check_key(self, key: str, rid: tuple[str, int] | None) -> None:
        if is_reserved(key):
            raise ValueError(f"key {key!r} is reserved")
        if rid is not None and applied_key(*rid) in self._state:
            raise ValueError(f"request {rid} was applied already: answer it from lookup()")

    @staticmethod
    def _record(delta: dict[str, Value], rid: tuple[str, int] | None, rec: Applied) -> None:
        if rid is not None:
            delta[applied_key(*rid)] = rec

    def increment(
        self, key: str, delta: int, now_ms: int, rid: tuple[str, int] | None = None
    ) -> Write:
        """Counter add (``delta`` may be negative). Raises ``WrongTypeError`` if ``key``
        holds a register (also a tombstone) and ``ValueOutOfRangeError`` if the value would
        leave int64."""
        self._check_key(key, rid)
        d = increment_delta(self._state, key, self.component, delta)
        cur = self._state.get(key)
        value = (cur.value if isinstance(cur, Counter) else 0) + delta
        if not INT64_MIN <= value <= INT64_MAX:
            raise ValueOutOfRangeError(f"counter {key!r} would become {value}")
        part = d[key]
        assert isinstance(part, Counter)
        if max(*part.p.values(), *part.n.values(), 0) > COMPONENT_MAX:
            # 2**64 increments of the largest size would be needed; refuse all the same
            raise ValueOutOfRangeError(f"counter {key!r}: this node's total would pass 2**127")
        ts = self._hlc.now(now_ms)
        self._record(d, rid, Applied(ts, self.component, "increment", key, delta, value))
        self._apply_local(d, now_ms)
        return Write(key, ts, d)

    def _apply_local(self, delta: dict[str, Value], now_ms: int) -> None:
        self._now = max(self._now, now_ms)
        res = apply_delta(self._state, delta.items())
        for k, v in res.changed.items():
            self._merkle.update(k, v)
            self._log_key(k)
            self._collected.pop(k, None)
            if _is_collectable(v):
                self._tomb[k] = {self.node_id}
                if res.old.get(k) is None and isinstance(v, Applied):
                    self._record_added(k)
            else:
                self._tomb.pop(k, None)

    # ------------------------------------------------------------------ outputs

    def take_outputs(self) -> Outputs:
        """Outputs queued since the last call. Persist, then send."""
        out, self._out = self._out, _Out()
        return Outputs(tuple(out.messages), out.persist, tuple(out.collected))

    def _send(self, msg: Message) -> None:
        self.stats.bytes_sent += wire_size(msg)
        self._out.messages.append(msg)

    # ------------------------------------------------------------------ delta log

    def _log_key(self, key: str, holder: str | None = None) -> None:
        """Log a change of ``key``; ``holder``: a peer known to hold the new value."""
        self._seq += 1
        self._log.pop(key, None)
        self._log[key] = self._seq
        self._log_order.append((self._seq, key))
        if holder is None:
            self._known.pop(key, None)
        else:
            self._known[key] = {holder}
        if len(self._log) > self.config.delta_log_max:
            k0 = next(iter(self._log))
            self._log_floor = max(self._log_floor, self._log.pop(k0))
            self._known.pop(k0, None)
        self._compact_log()

    def _log_many(self, keys: list[tuple[str, str | None]]) -> None:
        """``_log_key`` for each (key, holder) pair."""
        log, order, known = self._log, self._log_order, self._known
        cap = self.config.delta_log_max
        seq = self._seq
        for key, holder in keys:
            seq += 1
            log.pop(key, None)
            log[key] = seq
            order.append((seq, key))
            if holder is None:
                known.pop(key, None)
            else:
                known[key] = {holder}
            if len(log) > cap:
                k0 = next(iter(log))
                self._log_floor = max(self._log_floor, log.pop(k0))
                known.pop(k0, None)
        self._seq = seq
        self._compact_log()

    def _unlog(self, key: str) -> None:
        if self._log.pop(key, None) is not None:
            self._known.pop(key, None)
            self._compact_log()

    def _compact_log(self) -> None:
        order = self._log_order
        live = len(self._log)
        if len(order) - self._log_head > 2 * live + 1024:
            self._log_order = [(s, k) for s, k in order[self._log_head :] if self._log.get(k) == s]
            self._log_head = 0
        elif self._log_head > 1024 and self._log_head * 2 > len(order):
            del order[: self._log_head]
            self._log_head = 0

    def _prune_log(self) -> None:
        if not self._peers:
            self._log.clear()
            self._known.clear()
            self._log_order.clear()
            self._log_head = 0
            return
        low = min(f.acked for f in self._flow.values())
        while self._log:
            k0 = next(iter(self._log))
            if self._log[k0] > low:
                break
            del self._log[k0]
            self._known.pop(k0, None)
        order, head = self._log_order, self._log_head
        while head < len(order) and order[head][0] <= low:
            head += 1
        self._log_head = head
        self._compact_log()

    def _note_done(self, peer: str, start: int, end: int) -> None:
        """The peer holds the current values of the keys logged in (start, end]."""
        fl = self._flow[peer]
        if end <= fl.acked:
            return
        fl.done.append((start, end))
        if start > fl.acked:
            return
        fl.done.sort()
        keep: list[tuple[int, int]] = []
        for a, b in fl.done:
            if a <= fl.acked:
                fl.acked = max(fl.acked, b)
            else:
                keep.append((a, b))
        fl.done = [(a, b) for a, b in keep if b > fl.acked]
        fl.sent = max(fl.sent, fl.acked)
        for e in [e for e in fl.inflight if e <= fl.acked]:
            del fl.inflight[e]  # superseded: its range is covered
        for e in [e for e in fl.late if e <= fl.acked]:
            del fl.late[e]
        self._prune_log()

    def _send_deltas(self, peer: str) -> None:
        """Send ``peer`` the logged entries it lacks, pipelining up to ``deltas_window``."""
        cfg = self.config
        fl = self._flow[peer]
        now = self._now
        if peer in self._repair:
            return  # anti-entropy repairs it (and acks the log when it finds equal roots)
        if fl.acked < self._log_floor:
            # entries this peer never acked were dropped: anti-entropy will repair it
            fl.acked = fl.sent = self._log_floor
            fl.inflight.clear()  # never acknowledged: do not count the peer as a holder
            fl.late.clear()
            fl.done = [(a, b) for a, b in fl.done if b > fl.acked]
            if peer not in self._behind:
                self._behind.add(peer)
                self.stats.peers_fell_behind += 1
        if fl.inflight:
            oldest = min(b.sent_ms for b in fl.inflight.values())
            if now - oldest >= max(cfg.deltas_resend_ms, 3 * fl.srtt_ms):
                fl.sent = fl.acked  # go back: re-send the unacknowledged window
                fl.cwnd = 1
                fl.late.update(fl.inflight)
                fl.inflight.clear()
                while len(fl.late) > 64:
                    del fl.late[min(fl.late)]
        order = self._log_order
        while True:
            start = max(fl.sent, fl.acked)
            for lo, hi in sorted(fl.done):
                if lo <= start < hi:
                    start = hi
            if start >= self._seq or len(fl.inflight) >= min(fl.cwnd, cfg.deltas_window):
                return
            i = max(bisect_right(order, (start, "\U0010ffff")), self._log_head)
            known = self._known
            state = self._state
            log = self._log
            entries: list[Entry] = []
            tombs: list[tuple[str, Timestamp]] = []
            end = start
            scan_max = 8 * cfg.delta_batch_max
            n = len(order)
            scanned = 0
            budget = cfg.max_message_bytes
            size = 0
            while i < n and len(entries) < cfg.delta_batch_max and scanned < scan_max:
                sq, k = order[i]
                if log.get(k) != sq:
                    i += 1
                    continue  # stale: the key was re-logged later (or dropped)
                holders = known.get(k)
                if holders is None or peer not in holders:  # else the peer sent it to us
                    v = state[k]
                    es = entry_size(k, v)
                    if entries and size + es > budget:
                        break  # the next batch starts with it
                    size += es
                    entries.append((k, v))
                    if isinstance(v, Applied) or (isinstance(v, Register) and v.value is None):
                        tombs.append((k, v.ts))
                i += 1
                scanned += 1
                end = sq
            if i >= n:
                end = self._seq  # everything logged so far is covered
            if end <= start:
                return
            fl.sent = end
            if not entries:
                self._note_done(peer, start, end)
                continue
            old = fl.inflight.get(end) or fl.late.pop(end, None)
            if old is not None:
                # same end re-sent: an ack proves only what both copies carried
                start = max(start, old.start)
                had = set(old.tombs)
                tombs = [t for t in tombs if t in had]
            fl.inflight[end] = _Batch(start, tuple(tombs), now, i < n)
            if len(fl.inflight) > 64:
                del fl.inflight[min(fl.inflight)]
            self.stats.deltas_sent += 1
            self.stats.delta_entries_sent += len(entries)
            self._send(Deltas(self.node_id, peer, tuple(entries), end))

    # ------------------------------------------------------------------ merging

    def _merge_remote(self, entries: Iterable[Entry], src: str, direct: bool = False) -> None:
        """Join ``entries`` received from ``src`` (``direct``: in src's own delta stream).

        A register value ``src`` itself wrote, received in its delta stream, is not
        relayed: its writer streams it to every peer itself (and anti-entropy repairs
        whatever a cut link kept from one), so relaying would only double the work of
        every write. Everything else is relayed to peers not known to hold it, tombstones
        included (their DeltasAcks tell who holds them, which tombstone GC waits for)."""
        now = self._now
        accepted: list[Entry] = []
        max_ts: Timestamp | None = None
        settle: list[tuple[str, Applied]] = []
        state = self._state
        for k, v in entries:
            if isinstance(v, Register | Applied):
                col = self._collected.get(k)
                if col is not None and v.ts <= col.ts and k not in state:
                    continue  # dominated by a collected tombstone or record
                cur = state.get(k)
                if isinstance(v, Applied):
                    if cur is None and self._out_of_window(k):
                        continue  # its client moved on: settled everywhere it mattered
                    if isinstance(cur, Applied) and cur != v:
                        # one request applied on two nodes: the later application is
                        # settled (see "Exactly once")
                        settle.append((k, v if cur.ts < v.ts else cur))
                elif isinstance(cur, Register) and cur.ts == v.ts and cur.value != v.value:
                    self.stats.register_conflicts += 1
                if max_ts is None or v.ts > max_ts:
                    max_ts = v.ts
            accepted.append((k, v))
        if max_ts is not None:
            try:
                self._hlc.update(max_ts, now)
            except ClockDriftError:
                # Follow it all the same: a value merged into the replica with a timestamp
                # the clock has not reached would beat the later local writes (their
                # acknowledgement would then be a lie on this very node).
                self.stats.clock_jumps += 1
                lead = max_ts.wall_ms - now
                self.stats.max_clock_jump_ms = max(self.stats.max_clock_jump_ms, lead)
                self._hlc.observe(max_ts, now)
        res = apply_delta(self._state, accepted)
        changed = res.changed
        if changed:
            got = dict(accepted)
            self._merkle.update_many(changed.items())
            # src holds exactly this value when it is what src sent (not a join of both)
            self._log_many([(k, src if got.get(k) == new else None) for k, new in changed.items()])
            if direct:
                everyone = self._peers
                known = self._known
                for k, new in changed.items():
                    if (
                        isinstance(new, Register)
                        and new.value is not None  # tombstones spread: GC needs holders
                        and new.ts.node == src
                        and got.get(k) == new
                    ):
                        known[k] = set(everyone)
            self._out.persist.update(changed)
            collected, tomb = self._collected, self._tomb
            for k, new in changed.items():
                if collected:
                    collected.pop(k, None)
                if _is_collectable(new):
                    tomb[k] = {self.node_id, src}  # a register join is one of its inputs
                    if isinstance(new, Applied) and res.old.get(k) is None:
                        self._record_added(k)
                elif tomb:
                    tomb.pop(k, None)
        for k, old in res.overwritten:
            new = self._state[k]
            if (
                old.ts.node == self.node_id
                and isinstance(new, Register)
                and new.ts.node != self.node_id
                and res.old.get(k) == old
            ):
                self.stats.lww_overwrites += 1
        for _k, old in res.type_lost:
            if old.ts.node == self.node_id:
                self.stats.type_conflict_overwrites += 1
        for k, loser in settle:
            self._settle(k, loser)
        tomb, state, known = self._tomb, self._state, self._known
        for k, v in accepted:
            if k in res.changed:
                continue
            if state.get(k) == v:  # src holds our current value
                holders = tomb.get(k)
                if holders is not None:
                    holders.add(src)
                kn = known.get(k)
                if kn is not None:
                    kn.add(src)
                elif k in self._log:
                    known[k] = {src}

    # ------------------------------------------------------------------ step / tick

    def step(self, msg: Message, now_ms: int) -> None:
        """Handle one incoming message (duplicates and stale messages are harmless)."""
        self._now = max(self._now, now_ms)
        self.stats.bytes_received += wire_size(msg)
        if msg.to != self.node_id or msg.frm not in self._all or msg.frm == self.node_id:
            return
        if self._members[msg.frm].state == DEAD:
            # reachable again (before the membership says so): repair it from now on
            self._enter_repair(msg.frm)
        if isinstance(msg, Deltas):
            self._on_deltas(msg)
        elif isinstance(msg, DeltasAck):
            self._on_deltas_ack(msg)
        elif isinstance(msg, AeRequest | AeResponse):
            self._on_ae_hashes(msg)
        elif isinstance(msg, AeItems):
            self._on_ae_items(msg)
        elif isinstance(msg, Ping):
            self._on_ping(msg)
        elif isinstance(msg, PingReq):
            self._on_ping_req(msg)
        else:
            self._on_ack(msg)

    def tick(self, now_ms: int) -> None:
        """Advance timers to ``now_ms`` (call at least every ``ping_timeout_ms / 2``)."""
        self._now = now = max(self._now, now_ms)
        cfg = self.config
        self._swim_tick(now)
        if now >= self._next_gc:
            self._next_gc = now + cfg.gc_interval_ms
            self._gc_tombstones(now)
        if now >= self._next_gossip:
            self._next_gossip = now + cfg.gossip_interval_ms
            live = self._live_peers()
            for p in self._rng.sample(live, min(cfg.fanout, len(live))):
                self._send_deltas(p)
        if self._repair:
            for p in [
                p for p, (_, since) in self._repair.items() if now - since > cfg.repair_max_ms
            ]:
                self._exit_repair(p)
        # one repair round at a time: a later peer may be in sync by then (cheap round)
        if self._ae_now and not self._repair_busy(now):
            cand = sorted(self._ae_now)  # peers that were heard from: even if "dead"
            self._ae_now.clear()
            if cand:
                p = self._rng.choice(cand)
                self._ae_now.update(q for q in cand if q != p)
                self._start_ae(now, p)
        if now >= self._next_ae:
            self._next_ae = now + cfg.anti_entropy_interval_ms
            self._start_ae(now)
        elif self._behind and now >= self._behind_retry:
            # a peer that fell behind is repaired now, not at the next periodic round
            self._behind_retry = now + self._ae_timeout()
            busy = {r.peer for r in self._rounds.values() if now - r.start_ms < self._ae_timeout()}
            cand = sorted(p for p in self._behind - busy if self._members[p].state != DEAD)
            if cand:
                self._start_ae(now, self._rng.choice(cand))

    def _live_peers(self) -> list[str]:
        return [p for p in self._peers if self._members[p].state != DEAD]

    # ------------------------------------------------------------------ delta handlers

    def _on_deltas(self, msg: Deltas) -> None:
        self.stats.deltas_received += 1
        self.stats.delta_entries_received += len(msg.entries)
        self._merge_remote(msg.entries, msg.frm, direct=True)
        self.last_sync_ms[msg.frm] = self._now
        self._send(DeltasAck(self.node_id, msg.frm, msg.seq))

    def _on_deltas_ack(self, msg: DeltasAck) -> None:
        p = msg.frm
        self.last_sync_ms[p] = self._now
        fl = self._flow[p]
        # Acks are matched to the exact batch (pipelined batches may be lost or reordered;
        # an ack addressed to an earlier incarnation of this node matches nothing).
        b = fl.inflight.pop(msg.seq, None) or fl.late.pop(msg.seq, None)
        if b is None:
            return
        rtt = self._now - b.sent_ms
        fl.srtt_ms = rtt if fl.srtt_ms == 0 else 0.8 * fl.srtt_ms + 0.2 * rtt
        fl.cwnd = min(fl.cwnd + 1, self.config.deltas_window)
        for k, ts in b.tombs:
            holders = self._tomb.get(k)
            v = self._state.get(k)
            if holders is not None and isinstance(v, Register | Applied) and v.ts == ts:
                holders.add(p)
        self._note_done(p, b.start, msg.seq)
        if b.more and self._members[p].state != DEAD:
            self._send_deltas(p)  # ack-clocked: keep streaming a backlog

    # ------------------------------------------------------------------ anti-entropy

    def start_anti_entropy(self, now_ms: int, peer: str | None = None) -> None:
        """Start an anti-entropy round now (with ``peer``, or as the timer would)."""
        self._now = max(self._now, now_ms)
        self._start_ae(self._now, peer)

    def _start_ae(self, now: int, peer: str | None = None) -> None:
        for r in [r for r, x in self._rounds.items() if now - x.start_ms > 5 * self._ae_timeout()]:
            del self._rounds[r]
        if peer is None:
            behind = [
                p for p in self._peers if p in self._behind and self._members[p].state != DEAD
            ]
            # a peer under repair for less than two round timeouts is left to the node that
            # started its repair at once (see _enter_repair); later it goes first
            young = now - 2 * self._ae_timeout()
            repair = [
                p
                for p, (_, since) in self._repair.items()
                if since <= young and self._members[p].state != DEAD
            ]
            if repair and self._repair_busy(now):
                repair = []
            live = (
                behind or sorted(repair) or [p for p in self._live_peers() if p not in self._repair]
            )
            if not live:
                return
            peer = self._rng.choice(live)
        elif peer not in self._members:
            raise ValueError(f"unknown peer {peer!r}")
        rnd = self._rng.getrandbits(62)
        self._rounds[rnd] = _Round(peer, now, self._seq)
        self.stats.ae_rounds_started += 1
        self._send(AeRequest(self.node_id, peer, rnd, 0, (0,), (self._merkle.root(),)))

    def _repair_busy(self, now: int) -> bool:
        """A repair round of ours is in flight (and not yet presumed lost)."""
        fresh = now - 3 * self._ae_timeout()
        return any(r.peer in self._repair and r.start_ms > fresh for r in self._rounds.values())

    def _ae_timeout(self) -> int:
        return min(self.config.anti_entropy_interval_ms, self.config.ae_round_timeout_ms)

    def _round_done(self, rnd: int, peer: str) -> None:
        r = self._rounds.get(rnd)
        if r is not None and r.peer == peer:
            del self._rounds[rnd]
            self.stats.ae_rounds_completed += 1
            self.last_sync_ms[peer] = self._now
            self._behind.discard(peer)
            rep = self._repair.get(peer)
            if rep is not None:
                rep[0] += 1
                if rep[0] >= self.config.repair_max_rounds:
                    self._exit_repair(peer)
                else:
                    self._ae_now.add(peer)  # until a round finds equal roots

    def _enter_repair(self, peer: str) -> None:
        """``peer`` came back: repair it by anti-entropy instead of streaming the backlog."""
        if peer in self._repair:
            return
        first = not self._repair and self._now - self._repair_started >= 2 * self._ae_timeout()
        self._repair[peer] = [0, self._now]
        # One bulk repair at once, started by one node: the smaller id of the pair, unless
        # a healthy peer with a still smaller id (likely in the same situation) will; and
        # only towards the first peer coming back (within two round timeouts). The repaired
        # state then reaches the others by delta gossip (on both sides), so their own
        # repair rounds (at the anti-entropy timer a little later, which then prefers peers
        # under repair) find little or nothing left to do.
        me = self.node_id
        if (
            first
            and me < peer
            and not any(
                q < me and q not in self._repair and self._members[q].state == ALIVE
                for q in self._peers
            )
        ):
            self._ae_now.add(peer)
            self._repair_started = self._now

    def _exit_repair(self, peer: str) -> None:
        if self._repair.pop(peer, None) is not None:
            self._ae_now.discard(peer)
            if self._members[peer].state != DEAD:
                self._send_deltas(peer)

    def _on_ae_hashes(self, msg: AeRequest | AeResponse) -> None:
        reply_cls = AeResponse if isinstance(msg, AeRequest) else AeRequest
        if not msg.indices:
            r = self._rounds.get(msg.round)
            if msg.level == 0 and r is not None and r.peer == msg.frm:
                # The peer held exactly our state of the round's start: it has every entry
                # logged until then, tombstones included (record that before the log is
                # pruned: the log is what would otherwise carry them to it).
                for k, holders in self._tomb.items():
                    sq = self._log.get(k)
                    if sq is None:
                        # unchanged since, or changed and acked by every peer; unless the
                        # log cap dropped entries logged after the round started
                        if self._log_floor <= r.log_seq:
                            holders.add(msg.frm)
                    elif sq <= r.log_seq:
                        holders.add(msg.frm)
                self._note_done(msg.frm, 0, r.log_seq)
                self._repair.pop(msg.frm, None)  # in sync at the round's start
                self._ae_now.discard(msg.frm)
            self._round_done(msg.round, msg.frm)
            if msg.level == 0 and msg.frm not in self._repair:
                self._send_deltas(msg.frm)
            return
        depth = self._merkle.depth
        if not 0 <= msg.level <= depth or len(msg.indices) != len(msg.hashes):
            return
        limit = 16**msg.level
        diff = [
            i
            for i, h in zip(msg.indices, msg.hashes, strict=True)
            if 0 <= i < limit and self._merkle.node_hash(msg.level, i) != h
        ][: self.config.ae_max_nodes]
        if not diff:
            if msg.level == 0:
                for holders in self._tomb.values():  # peer holds exactly what we hold
                    holders.add(msg.frm)
                self._note_done(msg.frm, 0, self._seq)
                self._repair.pop(msg.frm, None)
                self._ae_now.discard(msg.frm)
            self._round_done(msg.round, msg.frm)
            self._send(reply_cls(self.node_id, msg.frm, msg.round, msg.level, (), ()))
            return
        bulk = len(self._state) <= self.config.ae_bulk_keys * 16**msg.level
        if msg.level == depth or bulk:
            # at the leaves, or few keys under each differing node: ship the items (of whole
            # subtrees) rather than descend further
            self._ship(msg.frm, msg.round, msg.level, diff)
            return
        idx: list[int] = []
        hashes: list[bytes] = []
        for i in diff:
            for c, h in self._merkle.children_hashes(msg.level, i):
                idx.append(c)
                hashes.append(h)
        self._send(
            reply_cls(self.node_id, msg.frm, msg.round, msg.level + 1, tuple(idx), tuple(hashes))
        )

    def _ship(self, peer: str, rnd: int, level: int, nodes: list[int]) -> None:
        """Send the items under ``nodes`` (of ``level``) as AeItems(reply=True), in chunks
        of about ``ae_chunk_items`` (the receiver merges, persists and answers each while
        the next is on its way, and forwards what it learnt sooner)."""
        m = self._merkle
        chunk_max = self.config.ae_chunk_items
        budget = self.config.max_message_bytes
        cover: list[int] = []
        items: list[Entry] = []
        size = 0
        chunks: list[tuple[tuple[int, ...], tuple[Entry, ...]]] = []
        for i in nodes:
            code = m.cover_code(level, i)
            # a covered node's items travel in one message (its reply names it), unless
            # they alone exceed the budget: then the leading messages cover nothing
            # (``leaves=()``: merged, never answered) and the last one covers the node
            mine = self._leaf_entries(m.cover_leaves((code,)))
            mine_size = sum(entry_size(k, v) for k, v in mine)
            if items and (len(items) >= chunk_max or size + mine_size > budget):
                chunks.append((tuple(cover), tuple(items)))
                cover, items, size = [], [], 0
            for part in self._split_items(mine)[:-1]:
                chunks.append(((), part))
                mine_size -= sum(entry_size(k, v) for k, v in part)
                mine = mine[len(part) :]
            cover.append(code)
            items.extend(mine)
            size += mine_size
        if cover:
            chunks.append((tuple(cover), tuple(items)))
        r = self._rounds.get(rnd)
        if r is not None and r.peer == peer:
            r.waiting += sum(1 for cov, _ in chunks if cov)
        for cov, its in chunks:
            self.stats.ae_items_sent += len(its)
            if cov:
                self._shipped[(peer, rnd, cov[0])] = its
            while len(self._shipped) > 64:
                del self._shipped[next(iter(self._shipped))]
            self._send(AeItems(self.node_id, peer, rnd, cov, its, True))

    def _split_items(self, items: list[Entry]) -> list[tuple[Entry, ...]]:
        """``items`` cut into messages of at most ``max_message_bytes`` (at least one
        entry each); one (possibly empty) part if they fit in one."""
        budget = self.config.max_message_bytes
        parts: list[tuple[Entry, ...]] = []
        cur: list[Entry] = []
        size = 0
        for k, v in items:
            es = entry_size(k, v)
            if cur and size + es > budget:
                parts.append(tuple(cur))
                cur, size = [], 0
            cur.append((k, v))
            size += es
        parts.append(tuple(cur))
        return parts

    def _leaf_entries(self, leaves: Iterable[int]) -> list[Entry]:
        out: list[Entry] = []
        state = self._state
        for keys in self._merkle.keys_of_leaves(leaves):
            out.extend((k, state[k]) for k in sorted(keys))
        return out

    def _on_ae_items(self, msg: AeItems) -> None:
        self.stats.ae_items_received += len(msg.items)
        self._merge_remote(msg.items, msg.frm)
        if not msg.reply and msg.leaves and self._collected:
            # the peer still holds entries of tombstones we collected: tell it we "hold"
            # them, as a request would have (so it can collect them too); a message with
            # no ``leaves`` (such as this one) is never answered this way
            tell: list[Entry] = []
            for k, v in msg.items:
                col = self._collected.get(k)
                if (
                    col is not None
                    and k not in self._state
                    and isinstance(v, Register | Applied)
                    and v.ts <= col.ts
                ):
                    tell.append((k, col.value))
            if tell:
                self._send(AeItems(self.node_id, msg.frm, msg.round, (), tuple(tell), False))
        if not msg.reply:
            shipped = (
                self._shipped.pop((msg.frm, msg.round, msg.leaves[0]), None) if msg.leaves else None
            )
            if shipped:
                # the peer joined (and persisted) what we shipped: it holds those values or
                # newer ones (so it skips them in its delta stream, and it holds the
                # tombstones and records among them: without this, two members holding
                # the same tombstone, whose leaves compare equal, never learnt it of each
                # other, and neither ever collected it)
                state, log, known, tomb = self._state, self._log, self._known, self._tomb
                for k, v in shipped:
                    holders = tomb.get(k)
                    if holders is not None and state.get(k) is v:
                        holders.add(msg.frm)
                    if k in log and state.get(k) is v:
                        kn = known.get(k)
                        if kn is None:
                            known[k] = {msg.frm}
                        else:
                            kn.add(msg.frm)
            r = self._rounds.get(msg.round)
            if r is not None and r.peer == msg.frm and msg.leaves:
                r.waiting -= 1
                if r.waiting <= 0:
                    self._round_done(msg.round, msg.frm)
            return
        if not msg.leaves:
            return  # a leading part of a large shipment: its last part gets the answer
        leaves = self._merkle.cover_leaves(msg.leaves)
        got = dict(msg.items)
        back: list[Entry] = [(k, v) for k, v in self._leaf_entries(leaves) if got.get(k) != v]
        # tell the sender about tombstones we collected that dominate what it sent
        for k, v in got.items():
            col = self._collected.get(k)
            if k not in self._state and col is not None and isinstance(v, Register | Applied):
                back.append((k, col.value))
        self.stats.ae_items_sent += len(back)
        self._round_done(msg.round, msg.frm)
        parts = self._split_items(back)
        for part in parts[:-1]:  # leading parts cover nothing: only the last is the answer
            self._send(AeItems(self.node_id, msg.frm, msg.round, (), part, False))
        self._send(AeItems(self.node_id, msg.frm, msg.round, msg.leaves, parts[-1], False))

    # ------------------------------------------------------------------ exactly once

    def _settle(self, key: str, loser: Applied) -> None:
        """Undo the later of two applications of one request, in a component of its own.

        Every replica that sees both applications writes the same settlement (the same
        component, the same amount), so settling is idempotent across replicas and needs
        no coordination; a put or delete applied twice wrote the same value twice and
        needs nothing."""
        self.stats.duplicates_merged += 1
        parsed = parse_applied_key(key)
        if loser.op != "increment" or loser.delta == 0 or parsed is None:
            return
        comp = f"{loser.component}!{parsed[0]}/{parsed[1]}"
        d = loser.delta
        part = Counter({}, {comp: d}) if d > 0 else Counter({comp: -d}, {})
        cur = self._state.get(loser.key)
        if isinstance(cur, Counter) and (cur.p.get(comp, 0), cur.n.get(comp, 0)) == (
            part.p.get(comp, 0),
            part.n.get(comp, 0),
        ):
            return  # settled already
        res = apply_delta(self._state, [(loser.key, part)])
        for k, v in res.changed.items():
            self._merkle.update(k, v)
            self._log_key(k)
            self._tomb.pop(k, None)
            self._out.persist[k] = v

    # ------------------------------------------------------------------ tombstone GC

    def _gc_tombstones(self, now: int) -> None:
        cfg = self.config
        for k in [k for k, c in self._collected.items() if c.expire_ms <= now]:
            del self._collected[k]
        for k in [k for k in self._repush if k not in self._tomb]:
            del self._repush[k]
        clock = max(now, self._hlc.peek().wall_ms)
        # long enough for slower peers to collect it too: they learn who holds it by
        # anti-entropy at the latest (a few intervals)
        memory = max(
            cfg.collected_memory_ms, 2 * cfg.tombstone_min_age_ms, 4 * cfg.anti_entropy_interval_ms
        )
        for k, holders in list(self._tomb.items()):
            v = self._state[k]
            assert isinstance(v, Register | Applied)
            age = clock - v.ts.wall_ms
            forced = age >= cfg.tombstone_grace_ms
            if (
                isinstance(v, Applied)
                and not forced
                and age < cfg.dedup_ttl_ms
                and not self._out_of_window(k)
            ):
                continue  # a retry of it may still come
            if not forced and not (age >= cfg.tombstone_min_age_ms and holders >= self._all):
                if age >= cfg.tombstone_min_age_ms and k not in self._log:
                    # Old enough, but who holds it is unknown: push it again (the acks
                    # tell). Two members holding a tombstone the others collected may
                    # otherwise never learn it of each other: their Merkle leaves for it
                    # agree, so anti-entropy never ships it between them.
                    due = self._repush.get(k, 0)
                    if now >= due:
                        self._repush[k] = now + cfg.tombstone_min_age_ms
                        self._log_key(k)
                continue
            self._repush.pop(k, None)
            del self._state[k]
            del self._tomb[k]
            self._unlog(k)
            self._merkle.update(k, None)
            self._collected[k] = _Collected(v.ts, now + memory, v)
            self._out.collected.append((k, v.ts))
            if isinstance(v, Applied):
                self._record_removed(k)
                self.stats.records_collected += 1
                continue
            self.stats.tombstones_collected += 1
            if forced:
                self.stats.tombstones_force_collected += 1

    # ------------------------------------------------------------------ SWIM

    def _gossip_updates(self, extra: Member | None = None) -> tuple[Member, ...]:
        chosen = sorted(self._pending.values(), key=lambda p: -p.left)[: self.config.max_piggyback]
        out = []
        for p in chosen:
            out.append(p.member)
            p.left -= 1
            if p.left <= 0:
                del self._pending[p.member.node]
        if extra is not None and all(m.node != extra.node for m in out):
            out.append(extra)
        return tuple(out)

    def _enqueue(self, m: Member) -> None:
        n = len(self._all)
        self._pending[m.node] = _Pending(
            m, self.config.retransmit_mult * math.ceil(math.log2(n + 1))
        )

    def _verdict(self, node: str) -> Member | None:
        """The member's own suspect/dead status, sent to it so it can refute."""
        info = self._members.get(node)
        if info is None or info.state == ALIVE:
            return None
        return Member(node, info.state, info.incarnation)

    def _apply_member(self, m: Member) -> None:
        if m.node == self.node_id:
            if m.state != ALIVE and m.incarnation >= self._incarnation:
                self._incarnation = m.incarnation + 1
                self._enqueue(Member(self.node_id, ALIVE, self._incarnation))
            return
        info = self._members.get(m.node)
        if info is None:
            return
        i, j = m.incarnation, info.incarnation
        if m.state == ALIVE:
            wins = i > j
        elif m.state == SUSPECT:
            wins = (info.state == ALIVE and i >= j) or (info.state != ALIVE and i > j)
        elif m.state == DEAD:
            wins = (info.state != DEAD and i >= j) or (info.state == DEAD and i > j)
        else:
            return
        if not wins:
            return
        if info.state != m.state:
            info.since_ms = self._now
            if info.state == DEAD:
                self._enter_repair(m.node)  # back from the dead (a suspect still got deltas)
        info.state, info.incarnation = m.state, i
        self._enqueue(m)

    def _apply_updates(self, updates: Iterable[Member]) -> None:
        for m in updates:
            self._apply_member(m)

    def _next_target(self) -> str | None:
        for _ in range(2 * len(self._peers) + 1):
            if not self._probe_order:
                self._probe_order = list(self._peers)
                self._rng.shuffle(self._probe_order)
                if not self._probe_order:
                    return None
            p = self._probe_order.pop()
            if self._members[p].state == DEAD:
                self._dead_skips[p] += 1
                if self._dead_skips[p] < self.config.dead_ping_every:
                    continue
                self._dead_skips[p] = 0
            return p
        return None

    def _swim_tick(self, now: int) -> None:
        cfg = self.config
        pr = self._probe
        if pr is not None and not pr.acked:
            target = self._members[pr.target]
            if not pr.indirect_sent and now >= pr.start_ms + cfg.ping_timeout_ms:
                pr.indirect_sent = True
                if target.state != DEAD:
                    helpers = [p for p in self._live_peers() if p != pr.target]
                    for h in self._rng.sample(helpers, min(cfg.indirect_k, len(helpers))):
                        self._send(
                            PingReq(self.node_id, h, pr.seq, pr.target, self._gossip_updates())
                        )
            if now >= pr.start_ms + cfg.ping_interval_ms:
                self._probe = None
                if target.state == ALIVE:
                    self._apply_member(Member(pr.target, SUSPECT, target.incarnation))
        for p, info in self._members.items():
            if info.state == SUSPECT and now - info.since_ms >= cfg.suspicion_timeout_ms:
                self._apply_member(Member(p, DEAD, info.incarnation))
        for s in [s for s, r in self._relays.items() if r.expire_ms <= now]:
            del self._relays[s]
        if now >= self._next_ping:
            self._next_ping = now + cfg.ping_interval_ms
            target_id = self._next_target()
            if target_id is not None:
                self._probe_seq += 1
                self._probe = _Probe(target_id, self._probe_seq, now)
                self._send(
                    Ping(
                        self.node_id,
                        target_id,
                        self._probe_seq,
                        self._incarnation,
                        self._gossip_updates(self._verdict(target_id)),
                    )
                )

    def _on_ping(self, msg: Ping) -> None:
        self._apply_updates(msg.gossip_updates)
        self._apply_member(Member(msg.frm, ALIVE, msg.incarnation))
        self._send(
            Ack(
                self.node_id,
                msg.frm,
                msg.seq,
                self.node_id,
                self._incarnation,
                self._gossip_updates(self._verdict(msg.frm)),
            )
        )

    def _on_ping_req(self, msg: PingReq) -> None:
        self._apply_updates(msg.gossip_updates)
        if msg.target not in self._members:
            return
        self._probe_seq += 1
        self._relays[self._probe_seq] = _Relay(
            msg.frm, msg.seq, msg.target, self._now + self.config.ping_interval_ms
        )
        self._send(
            Ping(
                self.node_id,
                msg.target,
                self._probe_seq,
                self._incarnation,
                self._gossip_updates(self._verdict(msg.target)),
            )
        )

    def _on_ack(self, msg: Ack) -> None:
        self._apply_updates(msg.gossip_updates)
        if msg.node in self._members:
            self._apply_member(Member(msg.node, ALIVE, msg.incarnation))
        relay = self._relays.pop(msg.seq, None)
        if relay is not None and relay.target == msg.node:
            self._send(
                Ack(
                    self.node_id,
                    relay.requester,
                    relay.seq,
                    msg.node,
                    msg.incarnation,
                    self._gossip_updates(),
                )
            )
            return
        pr = self._probe
        if pr is not None and pr.seq == msg.seq and pr.target == msg.node:
            pr.acked = True
