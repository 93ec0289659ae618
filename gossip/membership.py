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

Bounded incarnations. An incarnation is set only by its member, which raises it by
one above a suspect/dead claim about itself at or above its own (``_apply_member``). It
is not persisted and not time-based: a restarted member starts at 0 and is pushed back
above the others' claims by the first verdict it hears (a probe of a suspect/dead member
carries it). So every legitimate incarnation is at most one above some claim, and a
node's view of a member lags its real incarnation only by the refutations it missed. A
forged update (a buggy or compromised member) could declare a member dead at
``2**64 - 1``: its refutation no longer fits the wire, and it stayed dead for good. Hence
``_admit``: an update is refused (``stats.membership_updates_refused``) if its
incarnation is above ``MAX_INCARNATION`` (suspect/dead: at it, since the member must be
able to refute), or more than ``max_incarnation_step`` above the highest incarnation
this node knows for that member (for itself: its own). The view starts at incarnation 0
for every member, the incarnation every node starts with, and this is what the step is
measured from before anything is heard (an exception for "nothing heard yet" would let a
forged update reaching a freshly started node first set its view near the cap). A
legitimate update is refused only after a million refutations one view missed (a
partition of weeks with the member flapping all along, or a cluster whose members were
refuted a million times with this node restarting); and the direct answer of a member to
this node's own probe (its Ack to our Ping: only it sends that, and it holds its current
incarnation) is admitted within the cap whatever the step, so such a view is repaired at
the next probe instead of refusing that member's refutations for good (a forged claim
within the step, refuted by the member while another view never heard the claim, leaves
that view more than a step behind the refutation in the same way). The step also
bounds how fast forged updates can push incarnations toward the cap: 2**62 / 10**6 of
them, one after another, each refuted.

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

from gossip.common import GossipConfig, Send, Stats
from gossip.messages import ALIVE, DEAD, MAX_INCARNATION, SUSPECT, Ack, Member, Ping, PingReq

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
        stats: Stats | None = None,
    ) -> None:
        self.node_id = node_id
        self.stats = stats if stats is not None else Stats()
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

    def _admit(self, m: Member, probe_ack: bool = False) -> bool:
        """Whether an update from a peer has a sane incarnation (see "Bounded
        incarnations"); a refused one is counted. ``probe_ack``: the member's own answer
        to our probe (the step does not apply)."""
        i = m.incarnation
        if m.node == self.node_id:
            known = self.incarnation
        else:
            info = self.members.get(m.node)
            if info is None:
                return True  # not a member: ignored anyway
            known = info.incarnation
        # a suspect/dead claim must leave room for its refutation (claim + 1)
        cap = MAX_INCARNATION if m.state == ALIVE else MAX_INCARNATION - 1
        if i <= cap and (i <= known or probe_ack or i - known <= self.config.max_incarnation_step):
            return True
        self.stats.membership_updates_refused += 1
        return False

    def _apply_updates(self, updates: Iterable[Member], now: int) -> None:
        for m in updates:
            if self._admit(m):
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
        me = Member(msg.frm, ALIVE, msg.incarnation)
        if self._admit(me):
            self._apply_member(me, now)
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
        pr = self._probe
        if msg.node in self.members:
            alive = Member(msg.node, ALIVE, msg.incarnation)
            # the member's own answer to our probe of it (not relayed): authoritative
            own = pr is not None and pr.seq == msg.seq and pr.target == msg.node == msg.frm
            if self._admit(alive, probe_ack=own):
                self._apply_member(alive, now)
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
        if pr is not None and pr.seq == msg.seq and pr.target == msg.node:
            pr.acked = True
