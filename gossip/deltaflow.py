"""Delta gossip: the delta log and per-peer flow control.

Theory of operation
-------------------
Every change (local or merged from a peer) appends its key to a delta log with a sequence
number (a key appears once, at its latest sequence number). Per peer the node keeps
``acked``: the peer durably holds the current value of every key logged at or below it.
Every ``gossip_interval_ms`` the node picks ``fanout`` random live peers and streams to
each the current values of the keys logged after what it already sent (at most
``delta_batch_max`` keys per ``Deltas``, at most ``deltas_window`` unacknowledged
``Deltas`` per peer, each continuing where the previous one ended); the ``DeltasAck`` of a
batch that left more of the log behind releases the next batch at once (ack-clocked, so a
backlog streams at the speed of the peer rather than of the timer), while a steady load
travels once per interval, in few large batches. A batch unacknowledged for
``deltas_resend_ms`` makes the node go back and re-send from ``acked``. A key is not sent
to a peer known to hold its current value: the peer it was merged from, or any peer that
sent us that same value (its Deltas or anti-entropy items are evidence it holds them). An
anti-entropy round that finds the two roots equal acknowledges the whole log up to the
round's start. The log is pruned once every peer acked an entry and capped at
``delta_log_max`` keys; a peer whose unacked entries were dropped is "behind": it gets
anti-entropy rounds (which repair everything) at once and then once per round timeout
until one completes.

Interface. ``DeltaLog`` is the log alone, a data structure shared with the core, with
anti-entropy and with collection (they log changes and read it). ``DeltaFlow`` streams it:
``send_deltas(peer, now)`` (the caller leaves out peers under repair: their stream is
paused, see ``gossip.antientropy``), ``on_ack(peer, seq, now)`` (True: stream more now),
``note_done(peer, start, end)`` (the peer holds that range: acks, equal Merkle roots) and
the set ``behind`` (read and cleared by anti-entropy). A batch's ack also makes the peer
a holder of the tombstones and records it carried (``holders``, owned by
``gossip.collection``). Messages go out through the ``send`` callback.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field

from gossip.common import GossipConfig, Send, Stats
from gossip.crdt import Applied, Register, Value
from gossip.hlc import Timestamp
from gossip.messages import Deltas, Entry, entry_size

__all__ = ["DeltaFlow", "DeltaLog"]


class DeltaLog:
    """Every changed key at the sequence number of its latest change.

    ``seqs``: key -> seq of its latest change (in increasing seq order). ``order``: (seq,
    key) in increasing seq order, with stale pairs (key re-logged since) skipped when
    read; live pairs start at ``head``. ``seq``: the last sequence number issued; they
    start at ``origin``, a random point, so acks addressed to an earlier incarnation of
    this node never match new batches. Entries with seq <= ``floor`` were dropped without
    every ack (the ``max_keys`` cap). ``known``: key (in the log) -> peers known to hold
    its current value (they sent it to us)."""

    __slots__ = ("floor", "head", "known", "max_keys", "order", "origin", "seq", "seqs")

    def __init__(self, origin: int, max_keys: int) -> None:
        self.seqs: dict[str, int] = {}
        self.order: list[tuple[int, str]] = []
        self.head = 0
        self.origin = origin
        self.seq = origin
        self.floor = origin
        self.known: dict[str, set[str]] = {}
        self.max_keys = max_keys

    def log_key(self, key: str, holder: str | None = None) -> None:
        """Log a change of ``key``; ``holder``: a peer known to hold the new value."""
        self.seq += 1
        self.seqs.pop(key, None)
        self.seqs[key] = self.seq
        self.order.append((self.seq, key))
        if holder is None:
            self.known.pop(key, None)
        else:
            self.known[key] = {holder}
        if len(self.seqs) > self.max_keys:
            self._drop_oldest()
        self.compact()

    def log_many(self, keys: list[tuple[str, str | None]]) -> None:
        """``log_key`` for each (key, holder) pair."""
        log, order, known = self.seqs, self.order, self.known
        cap = self.max_keys
        seq = self.seq
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
                self._drop_oldest()
        self.seq = seq
        self.compact()

    def _drop_oldest(self) -> None:
        """Drop the oldest live entry (the log is over its cap): its peers that did not
        ack it fall behind the floor. Found through ``order`` from ``head``: taking the
        first key of ``seqs`` (``next(iter(...))``) after many deletions at its front
        costs a scan of every deleted slot, quadratic over a long log."""
        order, seqs = self.order, self.seqs
        head = self.head
        while head < len(order):
            s, k = order[head]
            head += 1
            if seqs.get(k) == s:
                del seqs[k]
                self.known.pop(k, None)
                self.floor = max(self.floor, s)
                break
        self.head = head

    def unlog(self, key: str) -> None:
        """Drop ``key`` from the log (it left the replica)."""
        if self.seqs.pop(key, None) is not None:
            self.known.pop(key, None)
            self.compact()

    def compact(self) -> None:
        order = self.order
        live = len(self.seqs)
        if len(order) - self.head > 2 * live + 1024:
            self.order = [(s, k) for s, k in order[self.head :] if self.seqs.get(k) == s]
            self.head = 0
        elif self.head > 1024 and self.head * 2 > len(order):
            del order[: self.head]
            self.head = 0

    def clear(self) -> None:
        """Drop every entry (no peer needs them)."""
        self.seqs.clear()
        self.known.clear()
        self.order.clear()
        self.head = 0

    def prune(self, low: int) -> None:
        """Drop the entries logged at or below ``low`` (every peer acked them), found
        through ``order`` (see ``_drop_oldest``)."""
        seqs, known = self.seqs, self.known
        order, head = self.order, self.head
        while head < len(order) and order[head][0] <= low:
            s, k = order[head]
            head += 1
            if seqs.get(k) == s:
                del seqs[k]
                known.pop(k, None)
        self.head = head
        self.compact()


@dataclass(slots=True)
class Batch:
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
class Flow:
    """Delta-gossip state towards one peer."""

    # Invariant: the peer durably holds the current value of every key whose delta-log
    # sequence number is <= acked (acknowledged, or known from the peer's own messages).
    acked: int
    sent: int  # batches were sent up to this sequence number (>= acked)
    inflight: dict[int, Batch] = field(default_factory=dict)  # end seq -> batch
    # Batches given up on by a go-back: a late ack still counts, but they no longer
    # occupy the window.
    late: dict[int, Batch] = field(default_factory=dict)
    # Congestion control: batches allowed in flight (1 after a go-back, +1 per ack, at most
    # ``deltas_window``) and the smoothed ack delay (the go-back timeout is at least 3x it).
    cwnd: int = 1
    srtt_ms: float = 0.0
    # Acknowledged ranges (start, end] above ``acked`` not yet contiguous with it.
    done: list[tuple[int, int]] = field(default_factory=list)


class DeltaFlow:
    """Streams the delta log to every peer, with per-peer flow control."""

    def __init__(
        self,
        config: GossipConfig,
        node_id: str,
        peers: Sequence[str],
        state: dict[str, Value],
        log: DeltaLog,
        holders: dict[str, set[str]],
        send: Send,
        stats: Stats,
    ) -> None:
        self.config = config
        self.node_id = node_id
        self._state = state
        self._log = log
        self._holders = holders
        self._send = send
        self.stats = stats
        # a new peer holds nothing of this log: it starts at the log's origin
        self.flows: dict[str, Flow] = {p: Flow(log.origin, log.origin) for p in peers}
        self.behind: set[str] = set()  # peers whose unacked entries the log cap dropped

    def _prune(self) -> None:
        if not self.flows:
            self._log.clear()
            return
        self._log.prune(min(f.acked for f in self.flows.values()))

    def note_done(self, peer: str, start: int, end: int) -> None:
        """The peer holds the current values of the keys logged in (start, end]."""
        fl = self.flows[peer]
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
        self._prune()

    def send_deltas(self, peer: str, now: int) -> None:
        """Send ``peer`` the logged entries it lacks, pipelining up to ``deltas_window``.

        Not for a peer under repair (the caller checks): anti-entropy repairs it, and
        acks the log when it finds equal roots."""
        cfg = self.config
        fl = self.flows[peer]
        lg = self._log
        if fl.acked < lg.floor:
            # entries this peer never acked were dropped: anti-entropy will repair it
            fl.acked = fl.sent = lg.floor
            fl.inflight.clear()  # never acknowledged: do not count the peer as a holder
            fl.late.clear()
            fl.done = [(a, b) for a, b in fl.done if b > fl.acked]
            if peer not in self.behind:
                self.behind.add(peer)
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
        elif fl.sent > fl.acked:
            # Nothing in flight, yet part of (acked, sent] was never acknowledged: its
            # batches were given up (a late ack may still come, but a lost one never will)
            # and the go-back above waits for a batch in flight. Without this the range
            # stayed unsent for good: a tombstone in it never learnt its last holder and
            # was never collected, so the replicas never agreed (soak seed 1026696).
            last = max((b.sent_ms for b in fl.late.values()), default=None)
            if last is None or now - last >= max(cfg.deltas_resend_ms, 3 * fl.srtt_ms):
                fl.sent = fl.acked
        order = lg.order
        while True:
            start = max(fl.sent, fl.acked)
            for lo, hi in sorted(fl.done):
                if lo <= start < hi:
                    start = hi
            # everything before this batch is acknowledged (and the peer is not missing
            # entries the log cap dropped): a batch that reaches the head is a full sync
            contiguous = start <= fl.acked and peer not in self.behind
            if start >= lg.seq or len(fl.inflight) >= min(fl.cwnd, cfg.deltas_window):
                return
            i = max(bisect_right(order, (start, "\U0010ffff")), lg.head)
            known = lg.known
            state = self._state
            log = lg.seqs
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
                end = lg.seq  # everything logged so far is covered
            if end <= start:
                return
            fl.sent = end
            if not entries:
                self.note_done(peer, start, end)
                continue
            old = fl.inflight.get(end) or fl.late.pop(end, None)
            if old is not None:
                # same end re-sent: an ack proves only what both copies carried
                start = max(start, old.start)
                had = set(old.tombs)
                tombs = [t for t in tombs if t in had]
            fl.inflight[end] = Batch(start, tuple(tombs), now, i < n)
            if len(fl.inflight) > 64:
                del fl.inflight[min(fl.inflight)]
            self.stats.deltas_sent += 1
            self.stats.delta_entries_sent += len(entries)
            complete = contiguous and i >= n and end == lg.seq
            self._send(Deltas(self.node_id, peer, tuple(entries), end, complete))

    def on_ack(self, peer: str, seq: int, now: int) -> bool:
        """A DeltasAck for the batch ending at ``seq``; True if it left more of the log
        behind (the caller streams on at once: ack-clocked)."""
        fl = self.flows[peer]
        # Acks are matched to the exact batch (pipelined batches may be lost or reordered;
        # an ack addressed to an earlier incarnation of this node matches nothing).
        b = fl.inflight.pop(seq, None) or fl.late.pop(seq, None)
        if b is None:
            return False
        rtt = now - b.sent_ms
        fl.srtt_ms = rtt if fl.srtt_ms == 0 else 0.8 * fl.srtt_ms + 0.2 * rtt
        fl.cwnd = min(fl.cwnd + 1, self.config.deltas_window)
        tomb, state = self._holders, self._state
        for k, ts in b.tombs:
            holders = tomb.get(k)
            v = state.get(k)
            if holders is not None and isinstance(v, Register | Applied) and v.ts == ts:
                holders.add(peer)
        self.note_done(peer, b.start, seq)
        return b.more
