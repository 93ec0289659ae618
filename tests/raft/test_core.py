"""Targeted tests of raft.core.RaftCore, each exercising one feature."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from raft.core import RaftConfig, RaftCore, ReadState, Role
from raft.messages import (
    Append,
    AppendResp,
    Entry,
    EntryKind,
    HardState,
    InstallSnapshot,
    Message,
    PreVote,
    PreVoteResp,
    ReadIndex,
    ReadIndexResp,
    Snapshot,
    SnapshotMeta,
    TermProbe,
    TermProbeResp,
    TimeoutNow,
    Vote,
    VoteResp,
)


@dataclass(slots=True)
class Durable:
    """What a node has fsynced."""

    hs: HardState = field(default_factory=lambda: HardState(0, None, 0))
    snapshot: Snapshot | None = None
    entries: list[Entry] = field(default_factory=list)
    recovering: bool = False  #: the marker file (raft/storage.py): restarts recovering


CFG = RaftConfig(election_ticks=10, heartbeat_ticks=1)


def ents(*terms: int, start: int = 1) -> list[Entry]:
    return [
        Entry(t, start + i, EntryKind.COMMAND, b"x%d" % (start + i)) for i, t in enumerate(terms)
    ]


def role_of(c: RaftCore) -> Role:
    return c.role


class Net:
    """A tiny synchronous cluster: explicit message delivery with link filters."""

    def __init__(
        self,
        n: int = 3,
        cfg: RaftConfig = CFG,
        logs: dict[str, list[Entry]] | None = None,
        hs: dict[str, HardState] | None = None,
    ) -> None:
        self.ids = [f"n{i + 1}" for i in range(n)]
        self.cfg = cfg
        self.durable = {i: Durable() for i in self.ids}
        self.cores: dict[str, RaftCore] = {}
        self.queue: list[Message] = []
        self.blocked: set[tuple[str, str]] = set()
        self.applied: dict[str, list[Entry]] = {i: [] for i in self.ids}
        self.reads: dict[str, list[ReadState]] = {i: [] for i in self.ids}
        self.dropped: dict[str, list[int]] = {i: [] for i in self.ids}
        self.sent: list[Message] = []
        self.snapshots_received: dict[str, int] = {i: 0 for i in self.ids}
        for k, i in enumerate(self.ids):
            d = self.durable[i]
            d.entries = list((logs or {}).get(i, []))
            d.hs = (hs or {}).get(i, HardState(0, None, 0))
            self.cores[i] = RaftCore(
                i,
                self.ids,
                cfg,
                random.Random(k),
                hard_state=d.hs,
                snapshot=None,
                entries=d.entries,
            )

    def process(self, nid: str) -> None:
        c = self.cores[nid]
        while (rd := c.ready()) is not None:
            d = self.durable[nid]
            if rd.snapshot:
                d.snapshot, d.entries = rd.snapshot, []
                self.snapshots_received[nid] += 1
            if rd.entries:
                first = rd.entries[0].index
                d.entries = [e for e in d.entries if e.index < first] + list(rd.entries)
            if rd.hard_state:
                d.hs = rd.hard_state
            if rd.recovered:  # (after the rest is durable)
                d.recovering = False
            for m in rd.messages:
                # Ordering contract: nothing leaves before the state it carries is durable.
                if not isinstance(m, PreVote | PreVoteResp):
                    assert m.term <= d.hs.term, (m, d.hs)
                if isinstance(m, VoteResp) and not m.reject:
                    assert d.hs.vote == m.to
                self.queue.append(m)
                self.sent.append(m)
            self.applied[nid].extend(rd.committed_entries)
            self.reads[nid].extend(rd.read_states)
            self.dropped[nid].extend(rd.dropped_reads)
            c.advance(rd)

    def flush(self, pred: Callable[[Message], bool] = lambda m: True, limit: int = 10_000) -> None:
        """Deliver (and process) messages matching ``pred`` until none is left."""
        for i in self.ids:
            self.process(i)
        for _ in range(limit):
            pick = [m for m in self.queue if pred(m)]
            if not pick:
                return
            self.queue = [m for m in self.queue if not pred(m)]
            for m in pick:
                if (m.frm, m.to) not in self.blocked:
                    self.cores[m.to].step(m)
            for i in self.ids:
                self.process(i)
        raise AssertionError("message storm")

    def tick(self, n: int = 1, only: Sequence[str] | None = None) -> None:
        for _ in range(n):
            for i in only or self.ids:
                self.cores[i].tick()
            self.flush()

    def isolate(self, nid: str) -> None:
        for o in self.ids:
            if o != nid:
                self.blocked |= {(nid, o), (o, nid)}

    def heal(self) -> None:
        self.blocked.clear()

    def elect(self, nid: str) -> None:
        for _ in range(4 * self.cfg.election_ticks):
            self.cores[nid].tick()
            self.flush()
            if self.cores[nid].role is Role.LEADER:
                return
        raise AssertionError(f"{nid} was not elected")

    def leader(self) -> str | None:
        ls = [i for i, c in self.cores.items() if c.role is Role.LEADER]
        return max(ls, key=lambda i: self.cores[i].term) if ls else None


def test_election_and_noop_commit() -> None:
    net = Net(3)
    net.tick(40)
    ldr = net.leader()
    assert ldr is not None
    term = net.cores[ldr].term
    for i, c in net.cores.items():
        assert c.term == term
        assert c.leader_id == ldr
        assert c.commit_index == 1
        assert [e.kind for e in net.applied[i]] == [EntryKind.NOOP]
    assert sum(c.role is Role.LEADER for c in net.cores.values()) == 1


def test_term_and_vote_only_sent_after_in_hard_state() -> None:
    c = RaftCore(
        "n2", ["n1", "n2", "n3"], CFG, random.Random(1), hard_state=HardState(4, None, 0),
        snapshot=None, entries=[],
    )  # fmt: skip
    assert c.ready() is None
    c.step(Vote("n1", "n2", 5, 0, 0, False))
    rd = c.ready()
    assert rd is not None
    assert rd.hard_state == HardState(5, "n1", 0)
    assert rd.messages == (VoteResp("n2", "n1", 5, False),)
    c.advance(rd)
    # Candidate side: Vote requests go out together with the HardState(term+1, vote=self).
    for _ in range(2 * CFG.election_ticks):
        c.tick()
    rd = c.ready()
    assert rd is not None
    votes = [m for m in rd.messages if isinstance(m, Vote | PreVote)]
    assert votes and all(isinstance(m, PreVote) and m.term == 6 for m in votes)
    assert rd.hard_state is None  # pre-vote: nothing to persist, the term is unchanged
    c.advance(rd)


def test_candidate_persists_term_before_vote_requests() -> None:
    cfg = RaftConfig(election_ticks=10, pre_vote=False)
    c = RaftCore(
        "n1", ["n1", "n2", "n3"], cfg, random.Random(1), hard_state=HardState(2, None, 0),
        snapshot=None, entries=[],
    )  # fmt: skip
    for _ in range(2 * cfg.election_ticks):
        c.tick()
    rd = c.ready()
    assert rd is not None
    assert rd.hard_state == HardState(3, "n1", 0)
    assert {m.to for m in rd.messages if isinstance(m, Vote) and m.term == 3} == {"n2", "n3"}


def test_pre_vote_isolated_node_does_not_disrupt() -> None:
    net = Net(3)
    net.elect("n1")
    term = net.cores["n1"].term
    net.isolate("n3")
    net.tick(200)
    assert net.cores["n3"].term == term  # pre-vote never bumps the term
    assert net.cores["n3"].role is Role.PRE_CANDIDATE or net.cores["n3"].leader_id is None
    net.heal()
    net.tick(50)
    assert net.leader() == "n1"
    assert all(c.term == term for c in net.cores.values())
    assert net.cores["n3"].leader_id == "n1"


def test_without_pre_vote_isolated_node_disrupts() -> None:
    """Control for the test above: the scenario does disrupt without pre-vote."""
    net = Net(3, RaftConfig(election_ticks=10, pre_vote=False, check_quorum=False))
    net.elect("n1")
    term = net.cores["n1"].term
    net.isolate("n3")
    net.tick(200)
    assert net.cores["n3"].term > term


def test_check_quorum_isolated_leader_steps_down() -> None:
    net = Net(3)
    net.elect("n1")
    net.isolate("n1")
    net.tick(2 * CFG.election_ticks, only=["n1"])
    assert net.cores["n1"].role is Role.FOLLOWER
    assert net.cores["n1"].leader_id is None
    assert not net.cores["n1"].has_quorum_contact()


def test_lease_rejects_disruptive_vote() -> None:
    net = Net(3)
    net.elect("n1")
    term = net.cores["n1"].term
    # n3 (with a current leader) receives a Vote at a higher term: ignored under the lease.
    net.cores["n3"].step(Vote("n2", "n3", term + 5, 100, term, False))
    assert net.cores["n3"].term == term
    net.cores["n3"].step(Vote("n2", "n3", term + 5, 100, term, True))  # transfer: honoured
    assert net.cores["n3"].term == term + 5


def test_figure8_old_term_entry_not_committed_by_counting() -> None:
    cfg = RaftConfig(election_ticks=10, max_entries_per_msg=1, pre_vote=False)
    logs = {"n1": ents(1, 2), "n2": ents(1), "n3": ents(1)}
    hs = {i: HardState(3, None, 1) for i in logs}
    net = Net(3, cfg, logs, hs)
    for _ in range(2 * cfg.election_ticks):
        net.cores["n1"].tick()
    net.flush(lambda m: not isinstance(m, Append | AppendResp))
    assert net.cores["n1"].role is Role.LEADER
    ldr = net.cores["n1"]
    assert ldr.term == 4 and ldr.last_index == 3  # 1:t1, 2:t2, 3:noop t4
    # Only n2 takes part; let it catch up entry 2 (term 2) but not the term-4 no-op.

    def only_n2(m: Message) -> bool:
        return m.to in ("n1", "n2") and m.frm in ("n1", "n2")

    def old_terms_only(m: Message) -> bool:
        if not isinstance(m, Append):
            return True
        return m.prev_index > net.cores[m.to].last_index or all(e.term < 4 for e in m.entries)

    net.flush(lambda m: only_n2(m) and old_terms_only(m))
    d2 = net.durable["n2"].entries
    assert [e.term for e in d2] == [1, 2], d2
    # Index 2 is now on a majority (n1, n2) but from an old term: not committed.
    assert ldr.commit_index == 1
    net.flush(only_n2)
    assert ldr.commit_index == 3  # committing the no-op commits index 2 indirectly


def test_fast_backtracking() -> None:
    cfg = RaftConfig(election_ticks=10, pre_vote=False)
    logs = {"n1": ents(1, *[3] * 10), "n2": ents(1, *[2] * 50), "n3": ents(1, *[3] * 10)}
    hs = {i: HardState(3, None, 1) for i in logs}
    net = Net(3, cfg, logs, hs)
    net.elect("n1")
    net.tick(5)
    rejects = [m for m in net.sent if isinstance(m, AppendResp) and m.reject and m.frm == "n2"]
    assert len(rejects) <= 2, rejects
    assert [e.term for e in net.durable["n2"].entries] == [1, *[3] * 10, 4]
    assert net.cores["n2"].commit_index == 12


def test_read_index_waits_for_current_term_commit() -> None:
    net = Net(3)
    net.elect("n1")
    net.tick(3)
    net.isolate("n1")
    # New leader n2; its no-op cannot commit while n3's appends are held back.
    for _ in range(4 * CFG.election_ticks):
        net.cores["n2"].tick()
        net.cores["n3"].tick()
        net.flush(lambda m: not isinstance(m, Append | AppendResp))
        if any(net.cores[i].role is Role.LEADER for i in ("n2", "n3")):
            break
    new = "n2" if net.cores["n2"].role is Role.LEADER else "n3"
    ldr = net.cores[new]
    assert ldr.role is Role.LEADER
    assert ldr.log_term(ldr.commit_index) != ldr.term
    assert ldr.read_index(42)

    # Heartbeats (empty appends) get through and are acknowledged; the no-op does not.
    def hb_only(m: Message) -> bool:
        return not isinstance(m, Append) or not m.entries

    for _ in range(3):
        ldr.tick()
        net.flush(hb_only)
    assert any(isinstance(m, AppendResp) and m.frm != "n1" and m.to == new for m in net.sent)
    assert net.reads[new] == []
    assert ldr.log_term(ldr.commit_index) != ldr.term
    net.flush()
    assert [r.request_id for r in net.reads[new]] == [42]
    assert net.reads[new][0].index == ldr.commit_index


def test_read_index_needs_heartbeat_quorum() -> None:
    net = Net(3)
    net.elect("n1")
    net.tick(2)
    n1 = net.cores["n1"]
    assert n1.read_index(7)
    net.process("n1")
    assert net.reads["n1"] == []
    ctxs = {m.ctx for m in net.queue if isinstance(m, Append)}
    assert max(ctxs) > 0
    net.flush()
    assert net.reads["n1"] == [ReadState(7, n1.commit_index)]


def test_follower_read_in_a_three_node_cluster_takes_one_round_trip() -> None:
    """The asker and the leader are a majority of three: the leader answers the ReadIndex
    at once, without a heartbeat round (see raft/core.py, "Reads served by followers")."""
    net = Net(3)
    net.elect("n1")
    net.tick(2)
    n1, n2 = net.cores["n1"], net.cores["n2"]
    assert n1.propose(b"x") is not None
    net.flush()
    for rid in (8, 9):  # two reads, one ReadIndex
        assert n2.read_index(rid)
    net.process("n2")
    asks = [m for m in net.queue if isinstance(m, ReadIndex)]
    assert len(asks) == 1 and asks[0].to == "n1"
    net.queue = []  # (nothing else is in flight)
    sent_before = len(net.sent)
    n1.step(asks[0])
    net.process("n1")
    replies = net.queue
    assert [type(m) for m in replies] == [ReadIndexResp], replies  # no heartbeat round
    reply = replies[0]
    assert isinstance(reply, ReadIndexResp) and reply.index == n1.commit_index
    net.flush()
    assert net.reads["n2"] == [ReadState(8, n1.commit_index), ReadState(9, n1.commit_index)]
    assert net.reads["n1"] == []  # the leader's own reads are not mixed up with them
    assert not any(isinstance(m, Append) for m in net.sent[sent_before:])


def test_follower_read_in_a_larger_cluster_waits_for_the_leaders_heartbeat_round() -> None:
    net = Net(5)
    net.elect("n1")
    net.tick(2)
    n1, n2 = net.cores["n1"], net.cores["n2"]
    assert n1.propose(b"x") is not None
    net.flush()
    for rid in (8, 9):
        assert n2.read_index(rid)
    net.process("n2")
    asks = [m for m in net.queue if isinstance(m, ReadIndex)]
    assert len(asks) == 1 and asks[0].to == "n1"
    # The leader answers only after a heartbeat round confirms its leadership.
    net.flush(lambda m: isinstance(m, ReadIndex))
    assert not any(isinstance(m, ReadIndexResp) for m in net.queue)
    assert any(isinstance(m, Append) and m.ctx > 0 for m in net.queue)
    net.flush()
    answers = [m for m in net.sent if isinstance(m, ReadIndexResp)]
    assert len(answers) == 1 and answers[0].index == n1.commit_index
    assert net.reads["n2"] == [ReadState(8, n1.commit_index), ReadState(9, n1.commit_index)]


def test_follower_read_in_a_three_node_cluster_waits_for_a_current_term_commit() -> None:
    """The one-round-trip answer still needs the leader to have committed an entry of its
    term (its commit index may lag what earlier leaders committed before)."""
    net = Net(3)
    net.elect("n1")
    net.tick(2)
    n1, n2 = net.cores["n1"], net.cores["n2"]
    assert n1.transfer_leadership("n2")
    # n2 wins but its no-op is held back: its commit is still of the previous term.
    net.flush(lambda m: not (isinstance(m, Append) and m.entries))
    assert n2.role is Role.LEADER
    assert n2.log_term(n2.commit_index) != n2.term
    n3 = net.cores["n3"]
    for _ in range(net.cfg.heartbeat_ticks):  # a heartbeat tells n3 who leads
        n2.tick()
    net.flush(lambda m: not (isinstance(m, Append) and m.entries))
    assert n3.leader_id == "n2"
    assert n3.read_index(5)
    net.flush(lambda m: not (isinstance(m, Append) and m.entries))
    assert not any(isinstance(m, ReadIndexResp) for m in net.sent)
    assert net.reads["n3"] == []
    net.flush()
    assert n2.log_term(n2.commit_index) == n2.term
    answers = [m for m in net.sent if isinstance(m, ReadIndexResp)]
    assert len(answers) == 1 and answers[0].index == n2.commit_index
    assert net.reads["n3"] == [ReadState(5, n2.commit_index)]


def test_follower_read_is_dropped_when_the_leader_cannot_answer() -> None:
    net = Net(3, RaftConfig(election_ticks=10, check_quorum=False, pre_vote=False))
    net.elect("n1")
    net.tick(2)
    net.blocked |= {("n2", "n1"), ("n1", "n2")}  # n2 still believes in n1
    n2 = net.cores["n2"]
    assert n2.read_index(5)
    net.tick(3)
    assert net.dropped["n2"] == []
    net.tick(net.cfg.election_ticks)
    assert net.dropped["n2"] == [5] and net.reads["n2"] == []


def test_follower_read_is_dropped_on_a_new_term() -> None:
    net = Net(3)
    net.elect("n1")
    net.tick(2)
    n3 = net.cores["n3"]
    assert n3.read_index(4)
    net.process("n3")
    net.queue = [m for m in net.queue if not isinstance(m, ReadIndex)]  # lost
    assert net.cores["n1"].transfer_leadership("n2")
    net.flush()
    assert net.leader() == "n2" and n3.term > 1
    assert net.dropped["n3"] == [4] and net.reads["n3"] == []
    assert not any(isinstance(m, ReadIndexResp) for m in net.sent)


def test_follower_without_a_leader_refuses_reads() -> None:
    net = Net(3)
    assert not net.cores["n2"].read_index(1)  # no leader known yet


def test_read_index_single_node_immediate() -> None:
    net = Net(1)
    assert not net.cores["n1"].read_index(1)
    net.tick(25)
    assert net.cores["n1"].role is Role.LEADER
    assert net.cores["n1"].read_index(2)
    net.process("n1")
    assert net.reads["n1"] == [ReadState(2, 1)]


def test_deposed_leader_never_releases_read() -> None:
    cfg = RaftConfig(election_ticks=10, check_quorum=False)
    net = Net(3, cfg)
    net.elect("n1")
    net.tick(2)
    net.isolate("n1")
    assert net.cores["n1"].read_index(9)
    net.tick(60)
    assert net.cores["n1"].role is Role.LEADER  # still believes it (no check-quorum)
    assert net.leader() in ("n2", "n3")
    assert net.reads["n1"] == []
    net.heal()
    net.tick(5)
    assert role_of(net.cores["n1"]) is Role.FOLLOWER
    assert net.reads["n1"] == []
    assert net.dropped["n1"] == [9]


def test_snapshot_catch_up_of_far_behind_follower() -> None:
    net = Net(3)
    net.elect("n1")
    net.isolate("n3")
    n1 = net.cores["n1"]
    for i in range(60):
        assert n1.propose(b"v%d" % i) is not None
        net.flush()
    assert n1.commit_index == 61
    for nid in ("n1", "n2"):
        c = net.cores[nid]
        c.compact(c.applied_index, b"state@%d" % c.applied_index)
    assert n1.first_index == 62
    net.heal()
    net.tick(5)
    n3 = net.cores["n3"]
    assert net.snapshots_received["n3"] == 1
    assert any(isinstance(m, InstallSnapshot) for m in net.sent)
    assert n3.commit_index == 61 and n3.applied_index == 61
    assert net.durable["n3"].snapshot == Snapshot(SnapshotMeta(61, n1.term), b"state@61")
    assert n1.propose(b"after") == 62
    net.flush()
    assert n3.commit_index == 61  # commit is announced lazily, by the next heartbeat
    net.tick(1)
    assert n3.commit_index == 62 and net.applied["n3"][-1].data == b"after"


def test_heartbeats_carry_the_leaders_commit_index_to_a_lagging_follower() -> None:
    """BOUNDED_STALENESS (raft/node.py ``_bounded_ok``) serves a follower that applied the
    commit index the leader's last message carried. A heartbeat to a follower that lags
    must carry the leader's commit, not the follower's match: with the match, a follower
    back from a partition took its old state for current and served a read 13 s stale
    (found by ``caplab spectrum``). The follower still commits only what its log holds."""
    net = Net(3)
    net.elect("n1")
    net.isolate("n3")
    n1, n3 = net.cores["n1"], net.cores["n3"]
    for i in range(5):
        assert n1.propose(b"v%d" % i) is not None
        net.flush()
    commit = n1.commit_index
    assert commit > n3.commit_index
    net.heal()
    net.sent.clear()
    # Deliver only the heartbeats: the append that repairs n3's log stays queued.
    beats: list[Append] = []
    for _ in range(4 * CFG.heartbeat_ticks):
        n1.tick()
        net.process("n1")
        beats = [m for m in net.queue if isinstance(m, Append) and m.to == "n3" and not m.entries]
        if beats:
            break
    assert beats, "no heartbeat to n3"
    assert all(m.commit == commit for m in beats), [m.commit for m in beats]
    before = n3.last_index
    net.flush(lambda m: isinstance(m, Append) and m.to == "n3" and not m.entries)
    assert n3.commit_index <= before  # nothing beyond its own log was committed
    net.tick(2 * CFG.election_ticks)  # the leader's probe repairs n3's log
    assert n3.commit_index >= commit


def test_leader_transfer_via_timeout_now() -> None:
    net = Net(3)
    net.elect("n1")
    term = net.cores["n1"].term
    net.isolate("n3")
    for i in range(5):
        net.cores["n1"].propose(b"%d" % i)
    net.flush()
    net.heal()
    assert net.cores["n1"].transfer_leadership("n3")
    assert net.cores["n1"].propose(b"no") is None  # refused while transferring
    net.flush()
    assert any(isinstance(m, TimeoutNow) and m.to == "n3" for m in net.sent)
    assert net.leader() == "n3"
    assert net.cores["n3"].term == term + 1
    assert net.cores["n1"].role is Role.FOLLOWER


def test_leader_transfer_aborts_after_election_timeout() -> None:
    net = Net(3)
    net.elect("n1")
    net.isolate("n3")
    n1 = net.cores["n1"]
    n1.propose(b"a")
    net.flush()
    assert n1.transfer_leadership("n3")
    assert n1.propose(b"b") is None
    net.tick(CFG.election_ticks, only=["n1"])
    assert n1.role is Role.LEADER and n1.transferring_to is None
    assert n1.propose(b"c") is not None


def test_restart_from_snapshot_and_log() -> None:
    snap = Snapshot(SnapshotMeta(10, 2), b"sm@10")
    log = [Entry(2, i, EntryKind.COMMAND, b"%d" % i) for i in range(11, 16)]
    c = RaftCore(
        "n1", ["n1"], CFG, random.Random(0), hard_state=HardState(2, "n1", 13),
        snapshot=snap, entries=log,
    )  # fmt: skip
    assert (c.applied_index, c.commit_index, c.last_index, c.first_index) == (10, 13, 15, 11)
    assert c.log_term(10) == 2 and c.log_term(9) is None
    rd = c.ready()
    assert rd is not None
    assert [e.index for e in rd.committed_entries] == [11, 12, 13]
    assert rd.entries == () and rd.hard_state is None
    c.advance(rd)
    assert c.applied_index == 13
    for _ in range(2 * CFG.election_ticks):
        c.tick()
    assert c.role is Role.LEADER and c.term == 3
    rd = c.ready()
    assert rd is not None
    assert rd.entries[-1] == Entry(3, 16, EntryKind.NOOP, b"")
    # The leader's own copy counts towards commitment only once it is durable.
    assert rd.committed_entries == ()
    c.advance(rd)
    rd = c.ready()
    assert rd is not None
    assert [e.index for e in rd.committed_entries] == [14, 15, 16]


def test_pipelining_respects_max_inflight_and_batches() -> None:
    cfg = RaftConfig(election_ticks=10, max_inflight=2, max_entries_per_msg=3)
    net = Net(3, cfg)
    net.elect("n1")
    net.flush()
    n1 = net.cores["n1"]
    before = len(net.sent)
    n1.propose_batch([b"%d" % i for i in range(20)])
    net.process("n1")
    apps = [m for m in net.sent[before:] if isinstance(m, Append) and m.to == "n2"]
    assert len(apps) == 2 and all(len(m.entries) == 3 for m in apps)
    net.flush()
    assert n1.commit_index == 21
    net.tick(1)  # the heartbeat announces the commit index
    assert all(c.commit_index == 21 for c in net.cores.values())


def test_stale_leader_learns_new_term_from_append_response() -> None:
    net = Net(3)
    net.elect("n1")
    c = net.cores["n2"]
    c.step(Append("n3", "n2", c.term + 3, 0, 0, (), 0, 0))
    assert c.term == net.cores["n1"].term + 3 and c.leader_id == "n3"
    c.step(Append("n1", "n2", c.term - 3, 0, 0, (), 0, 0))
    net.process("n2")
    resp = [m for m in net.queue if isinstance(m, AppendResp) and m.to == "n1"]
    assert resp and resp[-1].term == c.term


def wipe(net: Net, nid: str, *, probed: bool = True) -> RaftCore:
    """Replace ``nid`` by a node that lost its disk (restarts blank, recovering). With
    ``probed``, its first TermProbes reach every peer and the answers come back at once,
    whatever the links (they carry only terms): it is fenced from the start."""
    net.durable[nid] = Durable(recovering=True)
    core = restart(net, nid, seed=99)
    if probed:
        answer_probes(net, nid)
    return core


def answer_probes(net: Net, nid: str) -> None:
    """``nid`` ticks once (sending its TermProbes), they reach every peer and the answers
    come back at once, whatever the links (they carry only terms)."""
    core = net.cores[nid]
    core.tick()
    net.process(nid)
    probes = [m for m in net.queue if isinstance(m, TermProbe) and m.frm == nid]
    net.queue = [m for m in net.queue if m not in probes]
    for probe in probes:
        net.cores[probe.to].step(probe)
        net.process(probe.to)
    answers = [m for m in net.queue if isinstance(m, TermProbeResp) and m.to == nid]
    net.queue = [m for m in net.queue if m not in answers]
    for answer in answers:
        core.step(answer)
    net.process(nid)


def leading(net: Net, *writes: bytes) -> RaftCore:
    """n1 elected, then each of ``writes`` proposed and delivered in turn: n1's core."""
    net.elect("n1")
    n1 = net.cores["n1"]
    for v in writes:
        n1.propose(v)
        net.flush()
    return n1


def _acked_then_wiped(net: Net) -> tuple[RaftCore, RaftCore]:
    """n1 leads and commits b"acked" with n3 alone (n2 lags, cut off); then n3 loses its
    disk: (n1, the new n3)."""
    net.elect("n1")
    net.isolate("n2")  # n2 lags: it misses the write
    n1 = net.cores["n1"]
    n1.propose(b"acked")
    net.flush()
    assert n1.commit_index == 2  # committed on n1 and n3
    return n1, wipe(net, "n3")


def test_leader_catches_up_a_follower_that_lost_its_disk() -> None:
    """Issue 12.5: the leader kept its old match index for a wiped follower and ignored
    its rejections at or below it, so the follower never caught up."""
    net = Net(3)
    net.elect("n1")
    n1 = net.cores["n1"]
    for i in range(5):
        n1.propose(b"v%d" % i)
        net.flush()
    assert n1.progress()["n3"] == 6
    n3 = wipe(net, "n3")
    net.tick(3)
    assert n1.progress()["n3"] == 6 == n3.last_index
    assert [e.data for e in net.durable["n3"].entries][1:] == [b"v%d" % i for i in range(5)]
    assert not n3.recovering  # it holds the leader's committed entries of its term


def test_a_recovering_node_votes_only_for_an_empty_log() -> None:
    """Issue 12.5: a wiped node forgot what it acknowledged; its vote must not elect a
    candidate that lacks a committed write."""
    net = Net(3)
    _, n3 = _acked_then_wiped(net)
    net.isolate("n1")  # the only other copy is now out of reach
    net.blocked -= {("n2", "n3"), ("n3", "n2")}
    n2 = net.cores["n2"]
    for _ in range(6 * net.cfg.election_ticks):
        n2.tick()
        net.flush()
    assert n2.role is not Role.LEADER and n3.role is not Role.LEADER
    assert n3.recovering
    # An empty-log candidate (a new cluster's first election) still gets its vote.
    fresh = RaftCore(
        "n1",
        net.ids,
        CFG,
        random.Random(1),
        hard_state=HardState(0, None, 0),
        snapshot=None,
        entries=[],
        recovering=True,
    )
    fresh.step(Vote("n2", "n1", 1, 0, 0, False))
    rd = fresh.ready()
    assert rd is not None and any(isinstance(m, VoteResp) and not m.reject for m in rd.messages)


def restart(net: Net, nid: str, seed: int = 7) -> RaftCore:
    """Restart ``nid`` from its durable state (a crash that kept the disk; recovering if
    its marker is still there)."""
    d = net.durable[nid]
    net.queue = [m for m in net.queue if m.to != nid and m.frm != nid]
    core = RaftCore(
        nid,
        net.ids,
        net.cfg,
        random.Random(seed),
        hard_state=d.hs,
        snapshot=None,
        entries=d.entries,
        recovering=d.recovering,
    )
    net.cores[nid] = core
    return core


def _partial_catch_up(net: Net, nid: str, upto: int, commit: int) -> None:
    """The leader's first Append to a wiped ``nid`` got through with entries 1..``upto``
    only (a multi-MiB backlog goes in several), reporting commit index ``commit``."""
    leader = net.cores["n1"]
    ents = tuple(e for e in net.durable["n1"].entries if e.index <= upto)
    net.cores[nid].step(Append("n1", nid, leader.term, 0, 0, ents, commit, 0))
    net.process(nid)
    net.queue = [m for m in net.queue if m.frm != nid]  # its answer is lost


def _elect_among(net: Net, ids: Sequence[str]) -> None:
    for _ in range(6 * net.cfg.election_ticks):
        net.tick(only=ids)


def test_a_recovering_candidate_does_not_count_its_own_vote() -> None:
    """A wiped node counted its own vote as a real grant: with a prefix of the leader's log
    (as up to date as a lagging node's) it won with that lagging node's vote, and the write
    the two of them lacked, committed on the leader and on the wiped node's lost disk, was
    gone."""
    net = Net(3)
    _, n3 = _acked_then_wiped(net)
    _partial_catch_up(net, "n3", upto=1, commit=0)
    assert n3.recovering and n3.last_index == 1 == net.cores["n2"].last_index
    net.isolate("n1")  # the only other copy is now out of reach
    net.blocked -= {("n2", "n3"), ("n3", "n2")}
    _elect_among(net, ["n2", "n3"])
    assert Role.LEADER not in (net.cores["n2"].role, n3.role)
    assert n3.recovering


def test_a_recovering_node_leaves_only_holding_all_the_leader_reports_committed() -> None:
    """A wiped node left ``recovering`` holding one committed entry of the leader's term,
    though later entries of that term, which it had acknowledged before it lost its disk,
    were committed too: then it and a lagging node elected a leader without them."""
    net = Net(3)
    net.elect("n1")
    net.isolate("n2")
    n1 = net.cores["n1"]
    n1.propose(b"a")
    n1.propose(b"acked")
    net.flush()
    assert n1.commit_index == 3
    n3 = wipe(net, "n3")
    _partial_catch_up(net, "n3", upto=1, commit=3)
    assert n3.recovering  # it holds entry 1 of the leader's term, not 2 and 3
    net.isolate("n1")
    net.blocked -= {("n2", "n3"), ("n3", "n2")}
    _elect_among(net, ["n2", "n3"])
    assert Role.LEADER not in (net.cores["n2"].role, n3.role)
    # once it holds everything the leader reports committed, it has recovered
    net.blocked.clear()
    net.tick(3 * net.cfg.election_ticks)
    leader = net.leader()
    assert leader is not None and net.cores[leader].commit_index >= 3
    assert not n3.recovering and [e.data for e in net.durable["n3"].entries][1:3] == [
        b"a",
        b"acked",
    ]


def test_a_two_node_cluster_elects_past_a_wiped_node() -> None:
    """A cluster of two, one node wiped, the other restarted: the blank vote never made a
    majority of two, and the cluster stayed without a leader for good. The node with its
    disk holds every committed entry (each one needed both nodes), so its candidacy is
    safe with the wiped node's blank vote."""
    net = Net(2)
    net.elect("n1")
    net.cores["n1"].propose(b"acked")
    net.flush()
    assert net.cores["n1"].commit_index == 2
    n2 = wipe(net, "n2")
    restart(net, "n1")
    _elect_among(net, ["n1", "n2"])
    assert net.leader() == "n1"
    net.tick(3)
    assert not n2.recovering
    assert [e.data for e in net.durable["n2"].entries if e.kind is EntryKind.COMMAND] == [b"acked"]
    # the wiped node itself, with an empty log, cannot win: n1 refuses it
    assert net.cores["n1"].role is Role.LEADER


def test_term_probes_fence_a_recovering_node_at_the_highest_term_its_peers_report() -> None:
    """A reviewer's attack: a wiped node's vote of its previous life (term 2, for n2)
    arrived after it was back, and the node, recovered at term 1, voted in term 2 again:
    two leaders in term 2 (tests/raft/test_recovering_attacks.py). Its votes now count
    only once every peer has answered its TermProbe: it then moves to the highest term
    they report and votes for itself there (durably), so it grants no one a vote in any
    term it may have voted in before."""
    net = Net(3)
    net.elect("n1")
    net.cores["n2"].step(Vote("n1", "n2", 2, 9, 1, True))  # (n2 now at term 2)
    net.process("n2")
    net.queue.clear()
    n3 = wipe(net, "n3", probed=False)
    assert n3.recovering and n3.term == 0
    # a probe answers with the current term and changes nothing at the answerer
    n3.tick()
    net.process("n3")
    probes = [m for m in net.queue if isinstance(m, TermProbe)]
    assert sorted(m.to for m in probes) == ["n1", "n2"] and all(m.term == 0 for m in probes)
    net.queue.clear()
    before = {i: (net.cores[i].term, net.cores[i].role) for i in ("n1", "n2")}
    for m in probes:
        net.cores[m.to].step(m)
        net.process(m.to)
    assert before == {i: (net.cores[i].term, net.cores[i].role) for i in ("n1", "n2")}
    answers = [m for m in net.queue if isinstance(m, TermProbeResp)]
    assert sorted((m.frm, m.term) for m in answers) == [("n1", 1), ("n2", 2)]
    net.queue.clear()
    # an answer to another start (another nonce) does not count
    n3.step(TermProbeResp("n2", "n3", 1, answers[0].nonce + 1))
    n3.step(next(m for m in answers if m.frm == "n1"))
    assert n3.term == 0 and n3.recovering  # n2 has not answered this start yet
    n3.step(next(m for m in answers if m.frm == "n2"))
    net.process("n3")
    assert n3.term == 2 and net.durable["n3"].hs.vote == "n3"  # durable before it answers
    n3.step(Vote("n1", "n3", 2, 9, 1, False))
    net.process("n3")
    assert [m.reject for m in net.queue if isinstance(m, VoteResp)] == [True]


def test_a_fenced_node_keeps_a_vote_it_recorded_blank_blank() -> None:
    """The fence ends at a term in which it already recorded a vote (answered blank,
    while recovering): a vote never changes within a term, and a later request of that
    term is answered blank still, so that it cannot count next to one it forgot."""
    net = Net(3)
    net.elect("n1")
    n3 = wipe(net, "n3", probed=False)
    n3.step(Vote("n2", "n3", 1, 9, 1, False))  # recorded, answered blank
    net.process("n3")
    assert net.durable["n3"].hs == HardState(1, "n2", 0)
    net.queue.clear()
    answer_probes(net, "n3")
    assert net.durable["n3"].hs.vote == "n2"
    n3.step(Vote("n2", "n3", 1, 9, 1, False))  # (a duplicate of the request)
    net.process("n3")
    resp = [m for m in net.queue if isinstance(m, VoteResp)]
    assert len(resp) == 1 and resp[0].reject and resp[0].blank


def test_a_recovering_node_with_a_silent_peer_stays_recovering() -> None:
    """Caught up with the leader but one peer never answers (down, or cut off): it stays
    recovering, its votes blank; the answer, whenever it comes, ends it."""
    net = Net(3)
    n1 = leading(net, b"a")
    net.isolate("n2")
    n3 = wipe(net, "n3", probed=False)
    net.tick(3 * net.cfg.election_ticks, only=["n1", "n3"])
    assert n3.last_index == n1.last_index and n3.recovering
    net.blocked -= {("n2", "n3"), ("n3", "n2")}
    net.tick(2, only=["n1", "n3"])
    assert not n3.recovering


def test_snapshot_install_moves_applied_only_at_advance() -> None:
    """Issue 12.3: the core reported the snapshot index as applied as soon as the snapshot
    was stepped, before the shell restored its state machine from it."""
    c = RaftCore(
        "n2",
        ["n1", "n2", "n3"],
        CFG,
        random.Random(1),
        hard_state=HardState(1, None, 0),
        snapshot=None,
        entries=[],
    )
    snap = Snapshot(SnapshotMeta(10, 1), b"state@10")
    c.step(InstallSnapshot("n1", "n2", 1, snap))
    assert c.applied_index == 0
    rd = c.ready()
    assert rd is not None and rd.snapshot == snap
    assert c.applied_index == 0
    c.advance(rd)
    assert c.applied_index == 10 == c.commit_index


def test_a_restarted_follower_ignores_the_answer_to_its_previous_incarnation() -> None:
    """Found by the simulator (soak seed 1005343): a follower that restarted within the
    leader's term numbered its ReadIndex batches from 1 again, took the leader's late
    answer to its previous incarnation's batch 1 for its own, and served a read point
    from before a write that had completed: a stale linearizable read."""
    net = Net(3)
    net.elect("n1")
    n2 = net.cores["n2"]
    assert n2.read_index(1)
    rd = n2.ready()
    assert rd is not None
    asked = next(m for m in rd.messages if isinstance(m, ReadIndex))
    n2.advance(rd)
    # n2 crashes and restarts with its durable state, in the same term
    d = net.durable["n2"]
    n2 = RaftCore(
        "n2",
        net.ids,
        CFG,
        random.Random(1234),
        hard_state=d.hs,
        snapshot=None,
        entries=d.entries,
    )
    net.cores["n2"] = n2
    n2.step(Append("n1", "n2", n2.term, 1, n2.log_term(1) or 0, (), 1, 0))
    assert n2.read_index(1)
    rd = n2.ready()
    assert rd is not None
    n2.advance(rd)
    # the leader's answer to the first incarnation arrives now
    n2.step(ReadIndexResp("n1", "n2", n2.term, asked.ctx, 0))
    rd = n2.ready()
    assert rd is None or not rd.read_states
