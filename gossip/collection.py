"""Collection of tombstones and Applied records (exactly once): who holds them, when
they go, what is remembered after.

Theory of operation
-------------------
A delete writes a tombstone ``Register(ts, None)``. The node tracks which members hold
each tombstone (a DeltasAck for a batch containing it, an entry equal to it received from
a peer, or an equal Merkle root). A tombstone is collected when (a) every member holds it
and it is older than ``tombstone_min_age_ms`` (its age: by its timestamp on this node's wall clock,
or on this node's monotonic clock since it first held it, whichever is more, so that a
clock stepped back by a day, or an HLC that followed one an hour ahead, does not keep it
for as long) (in-flight messages older than that could
resurrect data: the network delay bound assumed), or (b) it is older than
``tombstone_grace_ms`` regardless. Rule (b) can resurrect a deleted value: a member that
missed the tombstone for longer than the grace period (e.g. a long-dead node returning)
still holds the old value and will spread it again. Collection runs every
``gc_interval_ms``. After collecting, the node remembers the tombstone in memory for
``collected_memory_ms`` (at least ``max(2 * tombstone_min_age_ms, 4 *
anti_entropy_interval_ms)``: slower peers may learn who holds it only by anti-entropy)
and drops incoming entries it dominates while still acknowledging them, so slower peers,
and a member restarted with tombstones the others collected while it was down, do not
re-insert it everywhere (each replica would then collect it again, at its own time, and
the replicas' states would differ until the last one did). A member down for longer
than that re-inserts them once. A tombstone old enough whose holders stay unknown is
pushed again (logged, so the acks tell who holds it) every ``tombstone_min_age_ms``: two
members holding one the others collected would otherwise never learn it of each other
(their Merkle leaves agree, so anti-entropy never ships it between them).

Applied records (see "Exactly once" in ``gossip.core``) are collected the same way, but
only once their client's window (its last ``dedup_window`` sequences) moved past them or
they are older than ``dedup_ttl_ms``: until then a retry of the request may still come.
Records are not relayed (their writer streams them to every peer itself), so only their
writer learns who holds them: each node publishes a *stable mark* (``stable_mark``, a
replicated register under ``crdt.stable_key(node)``, max-join) below the timestamp of
every record it wrote that some member may still lack, and every replica collects a
record (its own too) only below its writer's mark. Safety needs only the writer's
copy (it reaches every member, so whoever applied the same request meanwhile meets it
and settles the duplicate); the mark makes all replicas drop a record at about the same
time, so that their states agree (during a partition too).
Per client the node counts the records it holds and the highest sequence seen: a request
older than the window is too old (``too_old``), whether or not its record is still held,
and a record arriving from a peer is dropped if it is out of the window and its writer's
mark covers it (out of the window alone, the others still hold it: see ``settled``).

Interface. ``Collection`` owns ``holders`` (key -> members known to hold it or a newer
value, for every tombstone and record in the replica: the core, delta flow and
anti-entropy add holders; wherever the core gives a record holders it calls
``note_own``) and ``collected`` (the memory of what was collected, as ``Collected``
tuples read with ``collected_ts``/``collected_value``: the core and anti-entropy consult
it). ``tick(now)`` collects when due and returns what to remove from the durable state;
it removes it from the replica, the Merkle tree and the delta log itself.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

from gossip.common import GossipConfig, Stats
from gossip.crdt import (
    Applied,
    Register,
    Value,
    decode_value,
    encode_value,
    parse_applied_key,
    stable_key,
)
from gossip.deltaflow import DeltaLog
from gossip.hlc import Timestamp
from gossip.merkle import MerkleTree

__all__ = [
    "Collected",
    "Collection",
    "collected_ts",
    "collected_value",
    "is_collectable",
    "remember",
]


def is_collectable(v: Value | None) -> bool:
    """Tombstones and Applied records: kept until every member holds them."""
    return isinstance(v, Applied) or (isinstance(v, Register) and v.value is None)


# A collected tombstone or record, as remembered (``Collection.collected``): its
# timestamp (wall_ms, logical, node), when it is forgotten (expire_ms, monotonic) and its
# canonical encoding (``crdt.encode_value``). A plain tuple of atomic values, which the
# garbage collector stops tracking, rather than objects: five minutes of collected
# records (hundreds of thousands under load) were each a record, a timestamp and an
# entry object, every one scanned by each full collection of the Python heap (seconds
# of stalls in a minute, and most of the memory).
Collected = tuple[int, int, str, int, bytes]


def remember(value: Register | Applied, expire_ms: int) -> Collected:
    """The memory of collected ``value``, until ``expire_ms``."""
    ts = value.ts
    return (ts.wall_ms, ts.logical, ts.node, expire_ms, encode_value(value))


def collected_ts(c: Collected) -> Timestamp:
    """The timestamp of what was collected."""
    return Timestamp(c[0], c[1], c[2])


def collected_value(c: Collected) -> Value:
    """What was collected (a tombstone or an Applied record)."""
    return decode_value(c[4])


@dataclass(slots=True)
class _Client:
    """Applied records held for one client."""

    max_seq: int  # the highest sequence seen (its window ends there)
    records: int  # how many are held


class Collection:
    """Tombstone and Applied-record bookkeeping and collection for one replica."""

    def __init__(
        self,
        config: GossipConfig,
        node_id: str,
        members: frozenset[str],
        state: dict[str, Value],
        merkle: MerkleTree,
        log: DeltaLog,
        stats: Stats,
        *,
        first_gc_ms: int,
    ) -> None:
        self.config = config
        self._all = members  # every member, this node included
        self._state = state
        self._merkle = merkle
        self._log = log
        self._node_id = node_id
        self.stats = stats
        # tombstones and Applied records: key -> members known to hold it (or a newer value)
        self.holders: dict[str, set[str]] = {}
        self._clients: dict[str, _Client] = {}
        self._records = 0
        self._repush: dict[str, int] = {}  # tombstone -> when it may be pushed again
        self._since: dict[str, int] = {}  # tombstone or record -> first seen by a GC pass
        self._rid: dict[str, tuple[str, int]] = {}  # record key -> (client id, sequence)
        # Records become collectable only once their client's window moved past them or
        # their TTL passed; a pass looks at those alone (``_due``), found through a heap
        # of sequences per client and the records in arrival order: a pass over every
        # record held (tens of thousands under load) stalled the event loop for ~80 ms.
        self._heaps: dict[str, list[tuple[int, str]]] = {}
        self._moved: set[str] = set()  # clients whose window moved since the last pass
        self._arrivals: deque[tuple[int, str]] = deque()  # (when added, key)
        self._due: set[str] = set()
        # This node's own records (``stable_mark``'s candidates): every key in ``holders``
        # whose value is a record this node wrote (``note_own``, where the core gives a key
        # its holders), and some that no longer are (dropped by the next ``stable_mark``),
        # so a pass looks at the records its mark does not cover yet, not at every record
        # held (tens of thousands under load, every second).
        self._own: dict[str, None] = {}
        for k, v in state.items():
            if is_collectable(v):
                self.holders[k] = {node_id}
                log.log_key(k)  # push restored tombstones to learn who holds them
                if isinstance(v, Applied):
                    self.note_own(k, v)
                    self.record_added(k, first_gc_ms)
        self.collected: dict[str, Collected] = {}
        # (expiry, key) of ``collected``, in the order collected: expiries never decrease
        # (the monotonic clock plus a fixed memory), so the expired ones are at the front
        # (a pass scanned the whole memory: every record collected in the last 5 minutes)
        self._expiry: deque[tuple[int, str]] = deque()
        self._next_gc = first_gc_ms

    # ------------------------------------------------------------------ counts

    def tombstone_count(self) -> int:
        return len(self.holders) - self._records

    def record_count(self) -> int:
        return self._records

    def client_count(self) -> int:
        return len(self._clients)

    # ------------------------------------------------------------------ records

    def too_old(self, client_id: str, seq: int) -> bool:
        """Request (client_id, seq) is older than its client's window (even while its
        record is still held: the answer must not depend on when collection runs)."""
        cl = self._clients.get(client_id)
        return cl is not None and seq <= cl.max_seq - self.config.dedup_window

    def record_added(self, key: str, now: int, parsed: tuple[str, int] | None = None) -> None:
        """An Applied record entered the replica (at ``now``, monotonic); ``parsed``: its
        request (client id, sequence), if the caller knows it (else parsed from ``key``)."""
        if parsed is None:
            parsed = parse_applied_key(key)
        if parsed is None:
            return
        self._rid[key] = parsed
        client, seq = parsed
        self._records += 1
        self._since.setdefault(key, now)
        self._arrivals.append((now, key))
        heapq.heappush(self._heaps.setdefault(client, []), (seq, key))
        self._moved.add(client)  # (a record may arrive already out of the window)
        cl = self._clients.get(client)
        if cl is None:
            self._clients[client] = _Client(seq, 1)
        else:
            cl.records += 1
            cl.max_seq = max(cl.max_seq, seq)

    def _record_removed(self, key: str) -> None:
        parsed = self._rid.pop(key, None)
        if parsed is None:
            return
        self._records -= 1
        self._due.discard(key)
        cl = self._clients.get(parsed[0])
        if cl is not None:
            cl.records -= 1
            if cl.records <= 0:
                del self._clients[parsed[0]]
                self._heaps.pop(parsed[0], None)
                self._moved.discard(parsed[0])

    def note_own(self, key: str, v: Applied) -> None:
        """``key`` got holders, with record ``v``: a candidate of ``stable_mark`` if this
        node wrote it. The core calls it wherever it sets the holders of a record."""
        if v.ts.node == self._node_id:
            self._own[key] = None

    def settled(self, key: str, v: Applied) -> bool:
        """A record arriving from a peer that every replica may drop at once: its
        client's window moved past it and its writer's stable mark covers it. (Out of
        the window alone is not enough: the other replicas keep it until the mark covers
        it, and a replica that dropped it would differ from them until then: after a
        partition the digests stayed unequal, and the repair rounds never found equal
        roots, until the writer's mark moved, ~9 s instead of ~1 s.)"""
        return self.out_of_window(key) and self._stable(v)

    def out_of_window(self, key: str) -> bool:
        """An Applied record's sequence is older than its client's window."""
        parsed = self._rid.get(key) or parse_applied_key(key)
        if parsed is None:
            return False
        cl = self._clients.get(parsed[0])
        return cl is not None and parsed[1] <= cl.max_seq - self.config.dedup_window

    # ------------------------------------------------------------------ stable marks

    def _stable(self, v: Applied) -> bool:
        """Every member holds ``v`` (by its writer's stable mark)."""
        mark = self._state.get(stable_key(v.ts.node))
        return isinstance(mark, Register) and v.ts <= mark.ts

    def stable_mark(self, now: int) -> Register | None:
        """This node's stable mark, if it can move: the newest record it wrote that every
        member holds, older than every record it wrote that some member may lack. (It
        moves only while records become held everywhere: an idle node changes nothing.)
        A record of its own that some member still lacks, old enough, is pushed again
        (the acks tell), whether or not it is due: the mark waits for it."""
        me, everyone = self._node_id, self._all
        min_age = self.config.tombstone_min_age_ms
        cur = self._state.get(stable_key(me))
        mark = cur.ts if isinstance(cur, Register) else None
        lacking: Timestamp | None = None
        held: list[Timestamp] = []
        done: list[str] = []
        state, holders_of = self._state, self.holders
        # Only the candidates (``_own``): every own record in ``holders`` is one. A record
        # held everywhere at or below the mark stays so (holders only grow while the value
        # stays; a new value gets holders anew, and ``note_own``) and cannot move the mark
        # (which only grows): it is no candidate any more.
        for k in self._own:
            holders = holders_of.get(k)
            v = state.get(k)
            if holders is None or not isinstance(v, Applied) or v.ts.node != me:
                done.append(k)
                continue
            if holders >= everyone:
                if mark is not None and v.ts <= mark:
                    done.append(k)
                else:
                    held.append(v.ts)
                continue
            if lacking is None or v.ts < lacking:
                lacking = v.ts
            if now - self._since.get(k, now) >= min_age and k not in self._log.seqs:
                self._push_again(k, now)
        for k in done:
            del self._own[k]
        best = max((t for t in held if lacking is None or t < lacking), default=None)
        if best is None or (mark is not None and best <= mark):
            return None
        return Register(best, b"")

    def _push_again(self, key: str, now: int) -> None:
        """Log ``key`` again (at most every ``tombstone_min_age_ms``): the acks of its
        delivery tell who holds it."""
        if now >= self._repush.get(key, 0):
            self._repush[key] = now + self.config.tombstone_min_age_ms
            self._log.log_key(key)

    # ------------------------------------------------------------------ collection

    def tick(self, now: int, wall: int | None = None) -> list[tuple[str, Timestamp]] | None:
        """Collect when due; returns the (key, ts) pairs collected (to be removed from
        the durable state if it still holds exactly that tombstone or record), or None
        if it was not due."""
        if now < self._next_gc:
            return None
        self._next_gc = now + self.config.gc_interval_ms
        return self.gc(now, wall)

    def gc(self, now: int, wall: int | None = None) -> list[tuple[str, Timestamp]]:
        cfg = self.config
        out: list[tuple[str, Timestamp]] = []
        expiry, collected = self._expiry, self.collected
        while expiry and expiry[0][0] <= now:
            k = expiry.popleft()[1]
            c = collected.get(k)
            if c is not None and c[3] <= now:
                del collected[k]
        for k in [k for k in self._repush if k not in self.holders]:
            del self._repush[k]
        since = self._since
        for k in [k for k in since if k not in self.holders]:
            del since[k]
        # long enough for slower peers to collect it too: they learn who holds it by
        # anti-entropy at the latest (a few intervals)
        memory = max(
            cfg.collected_memory_ms, 2 * cfg.tombstone_min_age_ms, 4 * cfg.anti_entropy_interval_ms
        )
        state = self._state
        log = self._log
        rid, due = self._rid, self._due
        window = cfg.dedup_window
        for client in self._moved:
            heap, cl = self._heaps.get(client), self._clients.get(client)
            while heap and cl is not None and heap[0][0] <= cl.max_seq - window:
                due.add(heapq.heappop(heap)[1])
        self._moved.clear()
        arrivals = self._arrivals
        while arrivals and (arrivals[0][1] not in rid or arrivals[0][0] + cfg.dedup_ttl_ms <= now):
            due.add(arrivals.popleft()[1])
        due.intersection_update(rid)
        candidates = [k for k in self.holders if k not in rid]  # tombstones
        # records whose window moved on or whose TTL passed (sorted: the order reaches the
        # log and the disk, and set order changes with the hash seed: a seed must replay)
        candidates += sorted(due)
        for k in candidates:
            holders = self.holders.get(k)
            if holders is None:
                continue
            v = state[k]
            assert isinstance(v, Register | Applied)
            # Age: by its timestamp on this node's wall clock, or on this node's own
            # monotonic clock since it first held it, whichever is more: a clock set back
            # a day (or the HLC of a cluster that followed a clock an hour ahead) does not
            # hold it for a day, and a tombstone restored after a restart, collected
            # everywhere else long ago, goes at once.
            held = now - since.setdefault(k, now)
            age = held if wall is None else max(held, wall - v.ts.wall_ms)
            forced = age >= cfg.tombstone_grace_ms
            if (
                isinstance(v, Applied)
                and not forced
                and held < cfg.dedup_ttl_ms  # (held here: a wall clock an hour ahead
                and not self.out_of_window(k)  # would make every replica differ for one)
            ):
                continue  # a retry of it may still come
            # Records are not relayed, so only their writer learns who holds them: every
            # replica, the writer included, follows its stable mark (below which every
            # member holds its records), so none drops one the mark does not cover yet.
            everyone = self._stable(v) if isinstance(v, Applied) else holders >= self._all
            # (no minimum age for a record: it guards against nothing a record needs)
            old = age >= cfg.tombstone_min_age_ms or isinstance(v, Applied)
            if not forced and not (old and everyone):
                if age >= cfg.tombstone_min_age_ms and k not in log.seqs:
                    # Old enough, but who holds it is unknown: push it again (the acks
                    # tell). Two members holding a tombstone the others collected may
                    # otherwise never learn it of each other: their Merkle leaves for it
                    # agree, so anti-entropy never ships it between them.
                    self._push_again(k, now)
                continue
            self._repush.pop(k, None)
            del state[k]
            del self.holders[k]
            log.unlog(k)
            self._merkle.update(k, None)
            self.collected[k] = remember(v, now + memory)
            self._expiry.append((now + memory, k))
            out.append((k, v.ts))
            if isinstance(v, Applied):
                self._record_removed(k)
                self.stats.records_collected += 1
                continue
            self.stats.tombstones_collected += 1
            if forced:
                self.stats.tombstones_force_collected += 1
        return out
