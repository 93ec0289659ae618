"""SWIM membership of the gossip store: who is alive, suspect or dead.

Theory of operation
-------------------
SWIM with incarnation-number suspicion, as in Lifeguard/memberlist. Every
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

Interface. ``Membership`` knows nothing of the other protocols: it sends its messages
through the ``send`` callback and reports every change of a member's state as a
``MemberChanged`` event to the ``on_change`` callback, at the moment it happens (the core
enters repair mode for a member coming back from dead, see ``gossip.antientropy``). The
others read ``members`` (this node's view) and ``live_peers()``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from gossip.common import GossipConfig, Send
from gossip.messages import ALIVE, DEAD, SUSPECT, Ack, Member, Ping, PingReq

__all__ = ["MemberChanged", "MemberInfo", "Membership"]


@dataclass(slots=True)
class MemberInfo:
    """This node's view of one member."""

    state: str  # alive | suspect | dead
    incarnation: int
    since_ms: int  # when the state was last changed


@dataclass(frozen=True, slots=True)
class MemberChanged:
    """A member's state changed in this node's view (``old`` != ``new``)."""

    node: str
    old: str
    new: str


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
class _Pending:
    member: Member
    left: int


class Membership:
    """SWIM failure detector and membership view of one node."""

    def __init__(
        self,
        node_id: str,
        peers: Sequence[str],
        config: GossipConfig,
        rng: random.Random,
        send: Send,
        on_change: Callable[[MemberChanged], None],
        *,
        now_ms: int,
        first_ping_ms: int,
    ) -> None:
        self.node_id = node_id
        self.peers = list(peers)
        self.config = config
        self._rng = rng
        self._send = send
        self._on_change = on_change
        self._cluster_size = len(self.peers) + 1
        self.incarnation = 0
        self.members: dict[str, MemberInfo] = {p: MemberInfo(ALIVE, 0, now_ms) for p in self.peers}
        self._pending: dict[str, _Pending] = {}
        self._probe_order: list[str] = []
        self._dead_skips: dict[str, int] = dict.fromkeys(self.peers, 0)
        self._probe_seq = 0
        self._probe: _Probe | None = None
        self._relays: dict[int, _Relay] = {}
        self._next_ping = first_ping_ms

    def live_peers(self) -> list[str]:
        """Peers not considered dead (alive or suspect), in id order."""
        return [p for p in self.peers if self.members[p].state != DEAD]

    def member_states(self) -> dict[str, MemberInfo]:
        """This node's view of every other member (copies)."""
        return {p: MemberInfo(m.state, m.incarnation, m.since_ms) for p, m in self.members.items()}

    # ------------------------------------------------------------------ updates

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
        n = self._cluster_size
        self._pending[m.node] = _Pending(
            m, self.config.retransmit_mult * math.ceil(math.log2(n + 1))
        )

    def _verdict(self, node: str) -> Member | None:
        """The member's own suspect/dead status, sent to it so it can refute."""
        info = self.members.get(node)
        if info is None or info.state == ALIVE:
            return None
        return Member(node, info.state, info.incarnation)

    def _apply_member(self, m: Member, now: int) -> None:
        if m.node == self.node_id:
            if m.state != ALIVE and m.incarnation >= self.incarnation:
                self.incarnation = m.incarnation + 1
                self._enqueue(Member(self.node_id, ALIVE, self.incarnation))
            return
        info = self.members.get(m.node)
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
        old = info.state
        if old != m.state:
            info.since_ms = now
        info.state, info.incarnation = m.state, i
        self._enqueue(m)
        if old != m.state:
            self._on_change(MemberChanged(m.node, old, m.state))

    def _apply_updates(self, updates: Iterable[Member], now: int) -> None:
        for m in updates:
            self._apply_member(m, now)

    # ------------------------------------------------------------------ probing

    def _next_target(self) -> str | None:
        for _ in range(2 * len(self.peers) + 1):
            if not self._probe_order:
                self._probe_order = list(self.peers)
                self._rng.shuffle(self._probe_order)
                if not self._probe_order:
                    return None
            p = self._probe_order.pop()
            if self.members[p].state == DEAD:
                self._dead_skips[p] += 1
                if self._dead_skips[p] < self.config.dead_ping_every:
                    continue
                self._dead_skips[p] = 0
            return p
        return None

    def tick(self, now: int) -> None:
        """Probe timeouts, suspicion timeouts, the next probe when due."""
        cfg = self.config
        pr = self._probe
        if pr is not None and not pr.acked:
            target = self.members[pr.target]
            if not pr.indirect_sent and now >= pr.start_ms + cfg.ping_timeout_ms:
                pr.indirect_sent = True
                if target.state != DEAD:
                    helpers = [p for p in self.live_peers() if p != pr.target]
                    for h in self._rng.sample(helpers, min(cfg.indirect_k, len(helpers))):
                        self._send(
                            PingReq(self.node_id, h, pr.seq, pr.target, self._gossip_updates())
                        )
            if now >= pr.start_ms + cfg.ping_interval_ms:
                self._probe = None
                if target.state == ALIVE:
                    self._apply_member(Member(pr.target, SUSPECT, target.incarnation), now)
        for p, info in self.members.items():
            if info.state == SUSPECT and now - info.since_ms >= cfg.suspicion_timeout_ms:
                self._apply_member(Member(p, DEAD, info.incarnation), now)
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
                        self.incarnation,
                        self._gossip_updates(self._verdict(target_id)),
                    )
                )

    # ------------------------------------------------------------------ handlers

    def on_ping(self, msg: Ping, now: int) -> None:
        self._apply_updates(msg.gossip_updates, now)
        self._apply_member(Member(msg.frm, ALIVE, msg.incarnation), now)
        self._send(
            Ack(
                self.node_id,
                msg.frm,
                msg.seq,
                self.node_id,
                self.incarnation,
                self._gossip_updates(self._verdict(msg.frm)),
            )
        )

    def on_ping_req(self, msg: PingReq, now: int) -> None:
        self._apply_updates(msg.gossip_updates, now)
        if msg.target not in self.members:
            return
        self._probe_seq += 1
        self._relays[self._probe_seq] = _Relay(
            msg.frm, msg.seq, msg.target, now + self.config.ping_interval_ms
        )
        self._send(
            Ping(
                self.node_id,
                msg.target,
                self._probe_seq,
                self.incarnation,
                self._gossip_updates(self._verdict(msg.target)),
            )
        )

    def on_ack(self, msg: Ack, now: int) -> None:
        self._apply_updates(msg.gossip_updates, now)
        if msg.node in self.members:
            self._apply_member(Member(msg.node, ALIVE, msg.incarnation), now)
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
