"""Merkle anti-entropy of the gossip store: push-pull rounds and repair mode.

Theory of operation
-------------------
Every ``anti_entropy_interval_ms`` the node runs a push-pull round with one random live
peer (a "behind" peer first, then a peer under repair, see below): the two sides descend
the Merkle tree (root, then the 16 children of each differing node, alternating
``AeRequest``/``AeResponse``) and then swap the entries of the differing leaves
(``AeItems``), so both end with the join. Bulk shortcut: once the differing nodes of a
level hold at most ``ae_bulk_keys`` keys each (estimated from the local key count), the
side that found them ships the items of those whole subtrees instead of descending
further (``AeItems.leaves`` then names subtrees, see ``MerkleTree.cover_code``), in chunks
of about ``ae_chunk_items`` so the peer merges, persists and answers (and forwards) each
while the next is on its way. Identical replicas exchange one root hash. At most
``ae_max_nodes`` differing nodes are followed per level, bounding the cost of one round;
later rounds finish the job. The reply to an ``AeItems(reply=True)`` (sent once the peer
persisted it) proves the peer holds what was shipped: those keys are skipped in the delta
stream to it (not used for tombstone GC). A round that finds the two roots equal
acknowledges the whole delta log up to the round's start (and makes the peer a holder of
every tombstone and record logged until then).

Repair mode. A peer coming back from dead (its membership changes from dead, or a message
arrives from it while dead) gets no delta stream: its backlog is repaired by anti-entropy
instead, which costs each key about once instead of once per (sender, receiver) pair. One
node starts a round with it at once (the smaller id of the pair, if no healthy member with
a still smaller id exists, and only for the first peer coming back in two round timeouts:
one bulk repair, whose result the two sides then spread by delta gossip); it repeats
rounds back to back until one finds equal roots (the ack of the whole log up to the
round's start, which ends repair mode on both sides), at most ``repair_max_rounds`` rounds
or ``repair_max_ms``, then delta streaming resumes. Other nodes leave a peer under repair
to that node for two round timeouts; after that their timer picks it first (one repair
round at a time). A round unanswered for ``ae_round_timeout_ms`` (at most the interval) is
presumed lost.

Interface. ``AntiEntropy`` is given the replica (``state``, ``merkle``), the delta log and
flow (it acks ranges of the log and resumes streams: ``note_done``, ``send_deltas``, and
repairs ``behind`` peers), the collection (``holders``, ``collected``), the membership view,
and ``merge``: the core's join of received entries into the replica. It owns ``repair``
(peers under repair: the core streams no deltas to them), ``enter_repair(peer, now)``
(called by the core for a member back from dead), ``start_round``, ``on_hashes``,
``on_items`` and ``tick``. Messages go out through the ``send`` callback.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gossip.collection import Collection, collected_ts, collected_value
from gossip.common import GossipConfig, Send, Stats
from gossip.crdt import Applied, Register, Value
from gossip.deltaflow import DeltaFlow, DeltaLog
from gossip.membership import Membership
from gossip.merkle import MerkleTree
from gossip.messages import ALIVE, DEAD, AeItems, AeRequest, AeResponse, Entry, entry_size

__all__ = ["AntiEntropy", "split_items"]

Merge = Callable[[Iterable[Entry], str], None]


@dataclass(slots=True)
class _Round:
    peer: str
    start_ms: int
    log_seq: int  # the initiator's delta-log sequence number when the round started
    waiting: int = 0  # AeItems(reply=True) chunks we sent whose reply has not come yet


def split_items(items: list[Entry], budget: int) -> list[tuple[Entry, ...]]:
    """``items`` cut into messages of at most ``budget`` bytes (at least one entry
    each); one (possibly empty) part if they fit in one."""
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


class AntiEntropy:
    """Anti-entropy rounds and repair mode of one node."""

    def __init__(
        self,
        config: GossipConfig,
        node_id: str,
        state: dict[str, Value],
        merkle: MerkleTree,
        log: DeltaLog,
        flow: DeltaFlow,
        collection: Collection,
        membership: Membership,
        rng: random.Random,
        send: Send,
        merge: Merge,
        stats: Stats,
        last_sync_ms: dict[str, int],
        *,
        now_ms: int,
        first_round_ms: int,
    ) -> None:
        self.config = config
        self.node_id = node_id
        self._state = state
        self._merkle = merkle
        self._log = log
        self._flow = flow
        self._collection = collection
        self._membership = membership
        self._members = membership.members
        self._peers = membership.peers
        self._rng = rng
        self._send = send
        self._merge = merge
        self.stats = stats
        self._last_sync = last_sync_ms
        self._next_round = first_round_ms
        self._behind_retry = now_ms  # next time a behind peer may get a round of its own
        # repair mode: peer -> [rounds completed, since_ms]; ``_ae_now``: start a round now
        self.repair: dict[str, list[int]] = {}
        self._ae_now: set[str] = set()
        self._repair_started = now_ms - 10 * config.anti_entropy_interval_ms
        # (peer, round) -> entries we sent in AeItems(reply=True): its reply (sent once they
        # are durable) proves the peer holds them (bounded; oldest dropped)
        self._shipped: dict[tuple[str, int, int], tuple[Entry, ...]] = {}
        self._rounds: dict[int, _Round] = {}

    # ------------------------------------------------------------------ timers

    def tick(self, now: int) -> None:
        """Repair timeouts, repair rounds, the periodic round, rounds for behind peers."""
        cfg = self.config
        if self.repair:
            for p in [
                p for p, (_, since) in self.repair.items() if now - since > cfg.repair_max_ms
            ]:
                self._exit_repair(p, now)
        # one repair round at a time: a later peer may be in sync by then (cheap round)
        if self._ae_now and not self._repair_busy(now):
            cand = sorted(self._ae_now)  # peers that were heard from: even if "dead"
            self._ae_now.clear()
            if cand:
                p = self._rng.choice(cand)
                self._ae_now.update(q for q in cand if q != p)
                self.start_round(now, p)
        behind = self._flow.behind
        if now >= self._next_round:
            self._next_round = now + cfg.anti_entropy_interval_ms
            self.start_round(now)
        elif behind and now >= self._behind_retry:
            # a peer that fell behind is repaired now, not at the next periodic round
            self._behind_retry = now + self._timeout()
            busy = {r.peer for r in self._rounds.values() if now - r.start_ms < self._timeout()}
            cand = sorted(p for p in behind - busy if self._members[p].state != DEAD)
            if cand:
                self.start_round(now, self._rng.choice(cand))

    def start_round(self, now: int, peer: str | None = None) -> None:
        """Start a round with ``peer``, or with the peer the timer would pick."""
        for r in [r for r, x in self._rounds.items() if now - x.start_ms > 5 * self._timeout()]:
            del self._rounds[r]
        if peer is None:
            behind = self._flow.behind
            behind_live = [p for p in self._peers if p in behind and self._members[p].state != DEAD]
            # a peer under repair for less than two round timeouts is left to the node that
            # started its repair at once (see enter_repair); later it goes first
            young = now - 2 * self._timeout()
            repair = [
                p
                for p, (_, since) in self.repair.items()
                if since <= young and self._members[p].state != DEAD
            ]
            if repair and self._repair_busy(now):
                repair = []
            live = (
                behind_live
                or sorted(repair)
                or [p for p in self._membership.live_peers() if p not in self.repair]
            )
            if not live:
                return
            peer = self._rng.choice(live)
        elif peer not in self._members:
            raise ValueError(f"unknown peer {peer!r}")
        rnd = self._rng.getrandbits(62)
        self._rounds[rnd] = _Round(peer, now, self._log.seq)
        self.stats.ae_rounds_started += 1
        self._send(AeRequest(self.node_id, peer, rnd, 0, (0,), (self._merkle.root(),)))

    def _repair_busy(self, now: int) -> bool:
        """A repair round of ours is in flight (and not yet presumed lost)."""
        fresh = now - 3 * self._timeout()
        return any(r.peer in self.repair and r.start_ms > fresh for r in self._rounds.values())

    def _timeout(self) -> int:
        return min(self.config.anti_entropy_interval_ms, self.config.ae_round_timeout_ms)

    def _round_done(self, rnd: int, peer: str, now: int) -> None:
        r = self._rounds.get(rnd)
        if r is not None and r.peer == peer:
            del self._rounds[rnd]
            self.stats.ae_rounds_completed += 1
            self._last_sync[peer] = now
            self._flow.behind.discard(peer)
            rep = self.repair.get(peer)
            if rep is not None:
                rep[0] += 1
                if rep[0] >= self.config.repair_max_rounds:
                    self._exit_repair(peer, now)
                else:
                    self._ae_now.add(peer)  # until a round finds equal roots

    # ------------------------------------------------------------------ repair mode

    def enter_repair(self, peer: str, now: int) -> None:
        """``peer`` came back: repair it by anti-entropy instead of streaming the backlog."""
        if peer in self.repair:
            return
        first = not self.repair and now - self._repair_started >= 2 * self._timeout()
        self.repair[peer] = [0, now]
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
                q < me and q not in self.repair and self._members[q].state == ALIVE
                for q in self._peers
            )
        ):
            self._ae_now.add(peer)
            self._repair_started = now

    def _exit_repair(self, peer: str, now: int) -> None:
        if self.repair.pop(peer, None) is not None:
            self._ae_now.discard(peer)
            if self._members[peer].state != DEAD:
                self._flow.send_deltas(peer, now)

    # ------------------------------------------------------------------ handlers

    def on_hashes(self, msg: AeRequest | AeResponse, now: int) -> None:
        reply_cls = AeResponse if isinstance(msg, AeRequest) else AeRequest
        tomb = self._collection.holders
        if not msg.indices:
            r = self._rounds.get(msg.round)
            if msg.level == 0 and r is not None and r.peer == msg.frm:
                # The peer held exactly our state of the round's start: it has every entry
                # logged until then, tombstones included (record that before the log is
                # pruned: the log is what would otherwise carry them to it).
                log = self._log.seqs
                for k, holders in tomb.items():
                    sq = log.get(k)
                    if sq is None:
                        # unchanged since, or changed and acked by every peer; unless the
                        # log cap dropped entries logged after the round started
                        if self._log.floor <= r.log_seq:
                            holders.add(msg.frm)
                    elif sq <= r.log_seq:
                        holders.add(msg.frm)
                self._flow.note_done(msg.frm, 0, r.log_seq)
                self.repair.pop(msg.frm, None)  # in sync at the round's start
                self._ae_now.discard(msg.frm)
            self._round_done(msg.round, msg.frm, now)
            if msg.level == 0 and msg.frm not in self.repair:
                self._flow.send_deltas(msg.frm, now)
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
                for holders in tomb.values():  # peer holds exactly what we hold
                    holders.add(msg.frm)
                self._flow.note_done(msg.frm, 0, self._log.seq)
                self.repair.pop(msg.frm, None)
                self._ae_now.discard(msg.frm)
            self._round_done(msg.round, msg.frm, now)
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
            for part in split_items(mine, budget)[:-1]:
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

    def _leaf_entries(self, leaves: Iterable[int]) -> list[Entry]:
        out: list[Entry] = []
        state = self._state
        for keys in self._merkle.keys_of_leaves(leaves):
            out.extend((k, state[k]) for k in sorted(keys))
        return out

    def on_items(self, msg: AeItems, now: int) -> None:
        self.stats.ae_items_received += len(msg.items)
        self._merge(msg.items, msg.frm)
        collected = self._collection.collected
        if not msg.reply and msg.leaves and collected:
            # the peer still holds entries of tombstones we collected: tell it we "hold"
            # them, as a request would have (so it can collect them too); a message with
            # no ``leaves`` (such as this one) is never answered this way
            tell: list[Entry] = []
            for k, v in msg.items:
                col = collected.get(k)
                if (
                    col is not None
                    and k not in self._state
                    and isinstance(v, Register | Applied)
                    and v.ts <= collected_ts(col)
                ):
                    tell.append((k, collected_value(col)))
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
                state, log, known = self._state, self._log.seqs, self._log.known
                tomb = self._collection.holders
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
                    self._round_done(msg.round, msg.frm, now)
            return
        if not msg.leaves:
            return  # a leading part of a large shipment: its last part gets the answer
        leaves = self._merkle.cover_leaves(msg.leaves)
        got = dict(msg.items)
        back: list[Entry] = [(k, v) for k, v in self._leaf_entries(leaves) if got.get(k) != v]
        # tell the sender about tombstones we collected that dominate what it sent
        for k, v in got.items():
            col = collected.get(k)
            if k not in self._state and col is not None and isinstance(v, Register | Applied):
                back.append((k, collected_value(col)))
        self.stats.ae_items_sent += len(back)
        self._round_done(msg.round, msg.frm, now)
        parts = split_items(back, self.config.max_message_bytes)
        for part in parts[:-1]:  # leading parts cover nothing: only the last is the answer
            self._send(AeItems(self.node_id, msg.frm, msg.round, (), part, False))
        self._send(AeItems(self.node_id, msg.frm, msg.round, msg.leaves, parts[-1], False))
