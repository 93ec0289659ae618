"""Sans-IO core of the AP key-value store: CRDT replica + delta gossip + anti-entropy + SWIM.

Theory of operation
-------------------
Every node holds a full replica (``State``: key -> LWW ``Register`` | PN-``Counter``) and
answers reads and writes from it at any time (AP). Writes are delta-mutations stamped by a
hybrid logical clock; replicas converge because every exchange is a CRDT join.

Client writes. ``put``/``delete``/``increment`` apply a one-key delta to the replica and
return a ``Write`` whose ``delta`` the shell must persist (fsync) BEFORE acknowledging the
client. The shell must do that before its next call into the core.

Clocks. Every entry point takes ``now_ms``, the time of the timers, which the core never
lets go back, and optionally ``wall_ms`` (default: ``now_ms``), the physical clock the
hybrid logical clock and tombstone ages use. A shell passes a monotonic clock as
``now_ms`` and the wall clock (with any injected skew) as ``wall_ms``: a wall clock set
back by a day must not stop every timer for a day (it did, before the two were told
apart), nor one set forward fire them all.

Outputs and persistence. ``tick`` and ``step`` queue outputs; ``take_outputs`` returns
them. ``Outputs.to_persist`` (remote state merged into the replica) and
``Outputs.collected`` (tombstones to remove) must be applied durably BEFORE sending
``Outputs.messages``: a DeltasAck or an anti-entropy reply asserts the data is durable.

The protocols, one module each (each with its own theory of operation):

- ``gossip.deltaflow``: delta gossip. Every change is logged; the log is streamed to
  ``fanout`` random live peers every ``gossip_interval_ms``, with per-peer flow control
  (pipelined batches, ack-clocked, go-back-N); a peer whose unacked entries the log cap
  dropped is "behind".
- ``gossip.antientropy``: Merkle push-pull rounds (and bulk shipping of whole subtrees)
  every ``anti_entropy_interval_ms``, which repair whatever the delta stream missed;
  repair mode for a peer back from dead (no delta stream: back-to-back rounds instead).
- ``gossip.membership``: SWIM with incarnation-number suspicion; dead members are still
  probed, so a member back after a crash or a partition rejoins on its own.
- ``gossip.collection``: who holds each tombstone and Applied record; collection once
  every member holds one (or after a grace period), and the memory of what was collected.

This module is the coordinator: it owns the replica (state, Merkle tree, HLC), applies
client writes and merges remote entries (``_merge_remote``: the CRDT join, the clock, the
accounting, settling duplicates), dispatches messages and timers to the protocols, and
queues outputs. The protocols send through one callback (``_send``: counted and queued)
and share explicit objects built here: the state dict, the Merkle tree, the ``DeltaLog``,
``Collection.holders``/``collected``, the ``Membership`` view. Membership reports every
change of a member's state as a ``MemberChanged`` event; the core enters repair mode
(anti-entropy) for a member back from dead, as it does when a message arrives from a
member it holds dead.

Exactly once. A write with a request id (``rid``: client id, sequence) also writes an
Applied record (``crdt.Applied``: who applied it, what, the answer) into the replicated
state, in the same delta: a retry reaching any replica that holds the record is answered
from it (``lookup``), not applied again. The record keeps the digest of the request's
payload (``crdt.payload_digest``), so the caller can refuse a request id reused for the
same operation and key with another payload (see ``gossip.node``). The same request
applied on two nodes before either heard of the other is merged as one when the two
records meet: every replica that sees both writes the same settlement of the later
application (``_settle``: the opposite amount, in a counter component of its own), so
settling is idempotent and needs no coordination. Records are collected like tombstones
(``gossip.collection``); a request older than its client's window raises
``RequestTooOldError``.

Peer input. Peer messages are validated by ``gossip.codec`` (keys, value sizes,
timestamps, counter totals, record contents, incarnations, anti-entropy hashes: a
malformed message is dropped whole) before they reach the core; the core adds what needs
its state and clock. A remote timestamp more than ``max_drift_ms`` ahead of the local
wall clock is followed (the HLC jumps to it, counted in ``stats.clock_jumps``), so that a
node whose clock was skewed (by up to a day, by the Admin service) loses no writes; one
more than ``max_future_ms`` ahead (two days and an hour, by default: a sender a day ahead
and this node a day behind) cannot be legitimate: that entry is quarantined
(``_merge_remote``): not merged, not relayed, the clock not moved, the message's other
entries merged as usual, and counted (``stats.entries_quarantined``,
``stats.max_quarantined_lead_ms``). Without it, one forged timestamp a century ahead
pinned its key (every later write, stamped by clocks that had not followed it yet, lost
to it) and dragged every clock of the cluster a century ahead. The sender keeps the
entry: anti-entropy with it never finds equal roots for that leaf and ships it again each
round (bounded work, no wedge), and it is taken once it is within the bound. SWIM
updates with absurd incarnations are refused by ``gossip.membership``.

LWW accounting. ``stats.lww_overwrites`` counts, on the node that issued it, every own
register write (put or delete, which is acknowledged once persisted) that is replaced in
this replica by a merge of a write issued by another node. Timestamps cannot tell a
concurrent overwrite from a causally later one, so this is an upper bound on writes lost
to concurrency; a write replaced before it was persisted or after the node crashed is not
counted. ``stats.type_conflict_overwrites`` counts own register writes replaced by a
counter (type conflict; the counter wins).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeGuard

from gossip.antientropy import AntiEntropy
from gossip.collection import Collection, collected_ts, is_collectable
from gossip.common import GossipConfig, Stats
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
    payload_digest,
    put_delta,
    same_application,
    stable_key,
)
from gossip.deltaflow import DeltaFlow, DeltaLog
from gossip.hlc import HLC, ClockDriftError, Timestamp
from gossip.membership import MemberChanged, MemberInfo, Membership
from gossip.merkle import MerkleTree
from gossip.messages import (
    DEAD,
    AeItems,
    AeRequest,
    AeResponse,
    Deltas,
    DeltasAck,
    Entry,
    Message,
    Ping,
    PingReq,
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
class _Out:
    messages: list[Message] = field(default_factory=list)
    persist: dict[str, Value] = field(default_factory=dict)
    collected: list[tuple[str, Timestamp]] = field(default_factory=list)


_STAMPED = (Register, Applied)  # values with a timestamp


def _not_relayed(v: Value) -> TypeGuard[Register | Applied]:
    """Values whose writer streams them to every peer itself: live registers and Applied
    records. Tombstones are relayed: their collection needs every holder known everywhere
    (a record's only at its writer, see gossip.collection)."""
    return isinstance(v, Applied) or (isinstance(v, Register) and v.value is not None)


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
        wall_ms: int | None = None,
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
        # Two clocks (see "Clocks" above): ``_now`` for timers, ``_wall`` for timestamps.
        self._wall = now_ms if wall_ms is None else wall_ms
        regs = [v.ts for v in self._state.values() if isinstance(v, Register | Applied)]
        if regs:
            # Never reissue a timestamp below one already persisted (restart after crash).
            self._hlc.observe(max(regs), self._wall)
        if hlc_floor is not None:
            # The persisted high-water mark covers timestamps that no register keeps
            # (increments, overwritten writes): never reissue one after a restart.
            self._hlc.observe(hlc_floor, self._wall)
        self.stats = Stats()
        self.last_sync_ms: dict[str, int] = {}
        self._now = now_ms
        self._out = _Out()
        # The random draws keep their order (the simulator replays a seed exactly): the
        # log's origin, then the timers (jittered start so nodes do not run in lock-step).
        self._log = DeltaLog(rng.getrandbits(60), config.delta_log_max)
        self._next_gossip = now_ms + rng.randrange(config.gossip_interval_ms)
        first_ae = now_ms + rng.randrange(config.anti_entropy_interval_ms)
        first_ping = now_ms + rng.randrange(config.ping_interval_ms)
        first_gc = now_ms + rng.randrange(config.gc_interval_ms)
        self._members = Membership(
            node_id,
            self._peers,
            config,
            rng,
            self._send,
            self._member_changed,
            now_ms=now_ms,
            first_ping_ms=first_ping,
            stats=self.stats,
        )
        self._collection = Collection(
            config,
            node_id,
            self._all,
            self._state,
            self._merkle,
            self._log,
            self.stats,
            first_gc_ms=first_gc,
        )
        self._flow = DeltaFlow(
            config,
            node_id,
            self._peers,
            self._state,
            self._log,
            self._collection.holders,
            self._send,
            self.stats,
        )
        self._ae = AntiEntropy(
            config,
            node_id,
            self._state,
            self._merkle,
            self._log,
            self._flow,
            self._collection,
            self._members,
            rng,
            self._send,
            self._merge_remote,
            self.stats,
            self.last_sync_ms,
            now_ms=now_ms,
            first_round_ms=first_ae,
        )

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
        return self._members.incarnation

    def member_states(self) -> dict[str, MemberInfo]:
        """This node's view of every other member (copies)."""
        return self._members.member_states()

    def state(self) -> Mapping[str, Value]:
        """Read-only view of the replica (do not mutate)."""
        return self._state

    def tombstone_count(self) -> int:
        """Number of tombstones currently held."""
        return self._collection.tombstone_count()

    def key_count(self) -> int:
        """Live client keys (tombstones, records and stable marks excluded)."""
        marks = sum(stable_key(n) in self._state for n in self._all)
        return len(self._state) - self.tombstone_count() - self.record_count() - marks

    def record_count(self) -> int:
        """Number of Applied records (exactly once) currently held."""
        return self._collection.record_count()

    def client_count(self) -> int:
        """Clients with Applied records held."""
        return self._collection.client_count()

    def lookup(self, client_id: str, seq: int) -> Applied | None:
        """The record of request (client_id, seq) if some node applied it (as far as this
        replica knows); None if it is new. Raises ``RequestTooOldError`` if its record is
        gone because the client's window moved past it."""
        if self._collection.too_old(client_id, seq):
            raise RequestTooOldError(f"request {client_id}/{seq} is too old")
        rec = self._state.get(applied_key(client_id, seq))
        return rec if isinstance(rec, Applied) else None

    def get(self, key: str) -> Value | None:
        """The local value of ``key``: None if never written (or its tombstone collected);
        a ``Register`` with ``value is None`` if deleted."""
        return self._state.get(key)

    def collected_ts(self, key: str) -> Timestamp | None:
        """The timestamp of ``key``'s tombstone if this replica collected it (held by
        every member) within the last ``collected_memory_ms``; else None."""
        c = self._collection.collected.get(key)
        return None if c is None else collected_ts(c)

    # ------------------------------------------------------------------ client writes

    # ``rid`` (client_id, sequence): the write also records its application (an Applied
    # record in the delta, persisted with it). The caller checks ``lookup`` first: a
    # request already applied must be answered from its record, not applied again.

    def put(
        self,
        key: str,
        value: bytes,
        now_ms: int,
        rid: tuple[str, int] | None = None,
        *,
        wall_ms: int | None = None,
    ) -> Write:
        """LWW write. Raises ``WrongTypeError`` if ``key`` holds a counter."""
        rkey = self._check_key(key, rid)
        ts = self._hlc.now(self._clocks(now_ms, wall_ms))
        delta = put_delta(self._state, key, value, ts)
        if rkey is not None:
            digest = payload_digest("put", value)
            delta[rkey] = Applied(ts, self.component, "put", key, 0, 0, digest)
        self._apply_local(delta, now_ms, rkey, rid)
        return Write(key, ts, delta)

    def delete(
        self,
        key: str,
        now_ms: int,
        rid: tuple[str, int] | None = None,
        *,
        wall_ms: int | None = None,
    ) -> Write:
        """Tombstone write. Raises ``WrongTypeError`` if ``key`` holds a counter."""
        rkey = self._check_key(key, rid)
        ts = self._hlc.now(self._clocks(now_ms, wall_ms))
        cur = self._state.get(key)
        existed = isinstance(cur, Register) and cur.value is not None
        delta = delete_delta(self._state, key, ts)
        if rkey is not None:
            delta[rkey] = Applied(ts, self.component, "delete", key, 0, int(existed))
        self._apply_local(delta, now_ms, rkey, rid)
        return Write(key, ts, delta)

    def _check_key(self, key: str, rid: tuple[str, int] | None) -> str | None:
        """Refuse a reserved key or a request applied already; returns the key of the
        request's Applied record (None without a request id)."""
        if is_reserved(key):
            raise ValueError(f"key {key!r} is reserved")
        if rid is None:
            return None
        rkey = applied_key(*rid)
        if rkey in self._state:
            raise ValueError(f"request {rid} was applied already: answer it from lookup()")
        return rkey

    def increment(
        self,
        key: str,
        delta: int,
        now_ms: int,
        rid: tuple[str, int] | None = None,
        *,
        wall_ms: int | None = None,
    ) -> Write:
        """Counter add (``delta`` may be negative). Raises ``WrongTypeError`` if ``key``
        holds a register (also a tombstone) and ``ValueOutOfRangeError`` if the value would
        leave int64."""
        rkey = self._check_key(key, rid)
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
        ts = self._hlc.now(self._clocks(now_ms, wall_ms))
        if rkey is not None:
            digest = payload_digest("increment", delta=delta)
            rec = Applied(ts, self.component, "increment", key, delta, value, digest)
            d[rkey] = rec
        self._apply_local(d, now_ms, rkey, rid)
        return Write(key, ts, d)

    def _clocks(self, now_ms: int, wall_ms: int | None) -> int:
        """Take the time of a call: ``now_ms`` for timers (never goes back), ``wall_ms``
        (default: ``now_ms``) for timestamps and ages. Returns the wall time."""
        self._now = max(self._now, now_ms)
        self._wall = now_ms if wall_ms is None else wall_ms
        return self._wall

    def _apply_local(
        self,
        delta: dict[str, Value],
        now_ms: int,
        rkey: str | None = None,
        rid: tuple[str, int] | None = None,
    ) -> None:
        """Join a client write's ``delta`` (its Applied record, if any, under ``rkey``, the
        key of request ``rid``) into the replica, the Merkle tree and the delta log."""
        self._now = max(self._now, now_ms)
        res = apply_delta(self._state, delta.items())
        changed = res.changed
        if not changed:
            return
        coll = self._collection
        collected, tomb = coll.collected, coll.holders
        self._merkle.update_many(changed.items())
        self._log.log_many([(k, None) for k in changed])
        for k, v in changed.items():
            if collected:
                collected.pop(k, None)
            if is_collectable(v):
                tomb[k] = {self.node_id}
                if isinstance(v, Applied):
                    coll.note_own(k, v)
                    if res.old.get(k) is None:
                        # (the request's own key: its id needs no parsing)
                        own = rid is not None and k == rkey and rid[1] >= 0
                        coll.record_added(k, self._now, rid if own else None)
            elif tomb:
                tomb.pop(k, None)

    # ------------------------------------------------------------------ outputs

    def take_outputs(self) -> Outputs:
        """Outputs queued since the last call. Persist, then send."""
        out, self._out = self._out, _Out()
        return Outputs(tuple(out.messages), out.persist, tuple(out.collected))

    def _send(self, msg: Message) -> None:
        self._out.messages.append(msg)

    # ------------------------------------------------------------------ merging

    def _merge_remote(self, entries: Iterable[Entry], src: str, direct: bool = False) -> None:
        """Join ``entries`` received from ``src`` (``direct``: in src's own delta stream).

        A register value ``src`` itself wrote, received in its delta stream, is not
        relayed: its writer streams it to every peer itself (and anti-entropy repairs
        whatever a cut link kept from one), so relaying would only double the work of
        every write. Everything else is relayed to peers not known to hold it, tombstones
        included (their DeltasAcks tell who holds them, which tombstone GC waits for)."""
        wall = self._wall
        horizon = wall + self.config.max_future_ms  # see "Peer input"
        accepted: list[Entry] = []
        max_ts: Timestamp | None = None
        settle: list[tuple[str, Applied]] = []
        state = self._state
        coll = self._collection
        collected, tomb = coll.collected, coll.holders
        for k, v in entries:
            if isinstance(v, _STAMPED):
                if v.ts.wall_ms > horizon:
                    self._quarantine(v.ts.wall_ms - wall)
                    continue
                col = collected.get(k)
                if col is not None and k not in state and v.ts <= collected_ts(col):
                    continue  # dominated by a collected tombstone or record
                cur = state.get(k)
                if isinstance(v, Applied):
                    if cur is None and coll.settled(k, v):
                        continue  # its client moved on, and every replica may drop it
                    if isinstance(cur, Applied) and cur != v and not same_application(cur, v):
                        # one request applied on two nodes: the later application is
                        # settled (see "Exactly once")
                        settle.append((k, v if cur.ts < v.ts else cur))
                elif isinstance(cur, Register) and cur.ts == v.ts and cur.value != v.value:
                    self.stats.register_conflicts += 1
                if max_ts is None or v.ts > max_ts:
                    max_ts = v.ts
            accepted.append((k, v))
        if max_ts is not None:
            self.witness(max_ts, wall)
        res = apply_delta(state, accepted)
        changed = res.changed
        log = self._log
        known = log.known
        if changed:
            got = dict(accepted)
            self._merkle.update_many(changed.items())
            # src holds exactly this value when it is what src sent (not a join of both)
            relogged: list[tuple[str, str | None]] = []
            for k, new in changed.items():
                g = got.get(k)
                relogged.append((k, src if g is new or g == new else None))
            log.log_many(relogged)
            self._out.persist.update(changed)
            everyone = self._peers
            me = self.node_id
            old_values = res.old
            for (k, holder), new in zip(relogged, changed.values(), strict=True):
                if direct and holder is not None and _not_relayed(new) and new.ts.node == src:
                    known[k] = set(everyone)
                if collected:
                    collected.pop(k, None)
                if is_collectable(new):
                    tomb[k] = {me, src}  # a register join is one of its inputs
                    if isinstance(new, Applied):
                        coll.note_own(k, new)
                        if old_values.get(k) is None:
                            coll.record_added(k, self._now)
                elif tomb:
                    tomb.pop(k, None)
        for k, old in res.overwritten:
            new = state[k]
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
        logged = log.seqs
        for k, v in accepted:
            if k in changed:
                continue
            cur = state.get(k)
            if cur is v or cur == v:  # src holds our current value
                holders = tomb.get(k)
                if holders is not None:
                    holders.add(src)
                kn = known.get(k)
                if kn is not None:
                    kn.add(src)
                elif k in logged:
                    known[k] = {src}

    def _quarantine(self, lead_ms: int) -> None:
        """An entry too far ahead of the local clock is dropped (see "Peer input")."""
        st = self.stats
        st.entries_quarantined += 1
        if lead_ms > st.max_quarantined_lead_ms:
            st.max_quarantined_lead_ms = lead_ms

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
        self._apply_system(loser.key, part)

    def _apply_system(self, key: str, value: Value) -> None:
        """A change the node makes by itself (a settlement, its stable mark): joined,
        logged (to spread) and persisted like a merged one."""
        res = apply_delta(self._state, [(key, value)])
        for k, v in res.changed.items():
            self._merkle.update(k, v)
            self._log.log_key(k)
            self._collection.holders.pop(k, None)
            self._out.persist[k] = v

    # ------------------------------------------------------------------ step / tick

    def step(self, msg: Message, now_ms: int, *, wall_ms: int | None = None) -> None:
        """Handle one incoming message (duplicates and stale messages are harmless)."""
        self._clocks(now_ms, wall_ms)
        now = self._now
        if msg.to != self.node_id or msg.frm not in self._all or msg.frm == self.node_id:
            return
        if self._members.members[msg.frm].state == DEAD:
            # reachable again (before the membership says so): repair it from now on
            self._ae.enter_repair(msg.frm, now)
        if isinstance(msg, Deltas):
            self._on_deltas(msg)
        elif isinstance(msg, DeltasAck):
            self._on_deltas_ack(msg)
        elif isinstance(msg, AeRequest | AeResponse):
            self._ae.on_hashes(msg, now)
        elif isinstance(msg, AeItems):
            self._ae.on_items(msg, now)
        elif isinstance(msg, Ping):
            self._members.on_ping(msg, now)
        elif isinstance(msg, PingReq):
            self._members.on_ping_req(msg, now)
        else:
            self._members.on_ack(msg, now)

    def tick(self, now_ms: int, *, wall_ms: int | None = None) -> None:
        """Advance timers to ``now_ms`` (call at least every ``ping_timeout_ms / 2``)."""
        self._clocks(now_ms, wall_ms)
        now = self._now
        cfg = self.config
        self._members.tick(now)
        collected = self._collection.tick(now, self._wall)
        if collected is not None:  # a collection pass ran
            self._out.collected.extend(collected)
            mark = self._collection.stable_mark(now)
            if mark is not None:
                self._apply_system(stable_key(self.node_id), mark)
        if now >= self._next_gossip:
            self._next_gossip = now + cfg.gossip_interval_ms
            live = self._members.live_peers()
            repair = self._ae.repair
            for p in self._rng.sample(live, min(cfg.fanout, len(live))):
                if p not in repair:  # under repair: anti-entropy repairs it
                    self._flow.send_deltas(p, now)
        self._ae.tick(now)

    def witness(self, ts: Timestamp, wall_ms: int) -> Timestamp:
        """A receive event: the clock moves past ``ts`` (the newest timestamp merged, or
        one a client's session saw, so its next write here is ordered after it).

        One further ahead than ``max_drift_ms`` is followed all the same, counted as a
        clock jump: a value in the replica (or the cluster) with a timestamp the clock has
        not reached would beat later local writes (their acknowledgement would then be a
        lie on this very node)."""
        try:
            return self._hlc.update(ts, wall_ms)
        except ClockDriftError:
            self.stats.clock_jumps += 1
            self.stats.max_clock_jump_ms = max(self.stats.max_clock_jump_ms, ts.wall_ms - wall_ms)
            return self._hlc.observe(ts, wall_ms)

    def start_anti_entropy(self, now_ms: int, peer: str | None = None) -> None:
        """Start an anti-entropy round now (with ``peer``, or as the timer would)."""
        self._now = max(self._now, now_ms)
        self._ae.start_round(self._now, peer)

    def _member_changed(self, ev: MemberChanged) -> None:
        if ev.old == DEAD:
            # back from the dead (a suspect still got deltas): repair it by anti-entropy
            self._ae.enter_repair(ev.node, self._now)

    # ------------------------------------------------------------------ delta handlers

    def _on_deltas(self, msg: Deltas) -> None:
        self.stats.deltas_received += 1
        self.stats.delta_entries_received += len(msg.entries)
        self._merge_remote(msg.entries, msg.frm, direct=True)
        if msg.complete:  # (a batch of a backlog is no sync: more is on its way)
            self.last_sync_ms[msg.frm] = self._now
        self._send(DeltasAck(self.node_id, msg.frm, msg.seq))

    def _on_deltas_ack(self, msg: DeltasAck) -> None:
        # (no last_sync_ms: an ack proves p holds what we sent, not that we hold p's
        # writes; bounded-staleness reads rely on last_sync_ms meaning the latter)
        p = msg.frm
        now = self._now
        if (
            self._flow.on_ack(p, msg.seq, now)
            and self._members.members[p].state != DEAD
            and p not in self._ae.repair
        ):
            self._flow.send_deltas(p, now)  # ack-clocked: keep streaming a backlog
