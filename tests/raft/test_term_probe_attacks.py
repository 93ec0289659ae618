"""Attacks on the TermProbe fence of a recovering node (raft/core.py, "Recovering nodes").

Each test drives the synchronous ``Net`` of tests/raft/test_core.py message by message.
The first two were the reviewer's attacks that broke it: a vote the fenced node recorded
blank in the fence's term became a real vote once the node restarted with its disk
(``_blank_through`` lived in memory only), and a duplicate of the vote request then
elected a second leader in the term its forgotten vote elected one. Now the node's
marker stays on disk until its term moves past that one, so such a restart starts it
recovering again, its answer blank. The others document guarantees.
"""

from __future__ import annotations

import random
from typing import TypeVar

from raft.core import RaftConfig, RaftCore, Role
from raft.messages import (
    Append,
    EntryKind,
    HardState,
    Message,
    PreVote,
    PreVoteResp,
    TermProbe,
    TermProbeResp,
    Vote,
    VoteResp,
)
from tests.raft.test_core import Net, restart, role_of, wipe
from tests.raft.test_recovering_attacks import block, deliver, unblock

M = TypeVar("M")

NO_PRE_VOTE = RaftConfig(election_ticks=10, heartbeat_ticks=1, pre_vote=False)


def tick(net: Net, nid: str, k: int = 1) -> None:
    """``nid`` alone ticks ``k`` times; what it sends stays queued."""
    for _ in range(k):
        net.cores[nid].tick()
        net.process(nid)


def take(net: Net, kind: type[M], **match: str) -> list[M]:
    """Remove from the queue (and return) the messages of type ``kind`` matching ``match``."""
    out = [
        m
        for m in net.queue
        if isinstance(m, kind) and all(getattr(m, k) == v for k, v in match.items())
    ]
    net.queue = [m for m in net.queue if m not in out]
    return out


def probe_round(net: Net, nid: str, peers: tuple[str, ...]) -> None:
    """``nid`` ticks; its TermProbes to ``peers`` arrive and are answered; nothing else moves."""
    tick(net, nid)
    probes = take(net, TermProbe, frm=nid)
    net.queue = []
    for p in probes:
        if p.to in peers:
            net.cores[p.to].step(p)
            net.process(p.to)
    answers = take(net, TermProbeResp, to=nid)
    net.queue = []
    for a in answers:
        net.cores[nid].step(a)
    net.process(nid)
    net.queue = [m for m in net.queue if isinstance(m, TermProbe | TermProbeResp)]


def leaders_of(net: Net, term: int) -> list[str]:
    return sorted(i for i, c in net.cores.items() if role_of(c) is Role.LEADER and c.term == term)


# --------------------------------------------------------------------------- attacks


def test_a_blank_vote_in_the_fence_term_stays_blank_after_a_restart_with_disk() -> None:
    """Was two leaders in term 2 (pre_vote off, check_quorum on; 3 nodes). No message of
    the wiped life arrives late; what is needed is one duplicated Vote request. Steps 5
    and 6 as they were; now n3's marker stays on disk (its term is still 2), so the
    restart starts it recovering and the duplicate is answered blank.

    1. n1 leads term 1 (entry 1). n1 is cut off. n2 stands for term 2: n3 (out of lease)
       votes n2 (durable), n2 leads term 2 and commits "c" at index 3 with n3.
    2. n3 loses its disk and is back (recovering). n2<->n3 cut; n1<->n3 up. n1 (still
       leader of term 1, not ticked past its check-quorum) catches n3 up at term 1: n3
       holds n1's committed NOOP of term 1 (data recovered; not fenced: n2 unanswered).
    3. n1<->n3 cut; n1 steps down (check-quorum) and stands for term 2:
       Vote(n1->n3, term 2, last (1, 1)). n3 ticks out of n1's lease and gets it: n3 moves
       to term 2 and records vote n1, answering blank (that answer is lost).
    4. n3's TermProbe reaches n2, which answers 2: highest = 2 = n3's term, its vote is n1
       -> ``_blank_through = 2``; data recovered too: n3 leaves recovering.
    5. n3 crashes and restarts with its disk: HardState(2, n1), not recovering,
       ``_blank_through = 0``.
    6. A duplicate of Vote(n1->n3, term 2) arrives: vote == n1, n1's log is as up to date
       -> a REAL grant. n1 leads term 2 with {n1, n3}; n2 leads term 2 with {n2, old n3}.
    n1 then commits "a" at index 3 with n3; n2 had applied "c" at index 3.
    """
    net = Net(3, NO_PRE_VOTE)
    net.elect("n1")
    n1, n2 = net.cores["n1"], net.cores["n2"]
    net.isolate("n1")
    for _ in range(40):
        for nid in ("n2", "n3"):
            net.cores[nid].tick()
        deliver(net)
        if role_of(n2) is Role.LEADER:
            break
    assert role_of(n2) is Role.LEADER and n2.term == 2
    assert net.durable["n3"].hs.vote == "n2"
    n2.propose(b"c")
    deliver(net)
    assert (3, b"c") in [(e.index, e.data) for e in net.applied["n2"]]
    assert role_of(n1) is Role.LEADER and n1.term == 1

    n3 = wipe(net, "n3", probed=False)
    unblock(net, "n1", "n3")
    block(net, "n2", "n3")
    for _ in range(3):
        tick(net, "n1")
        tick(net, "n3")
        deliver(net)
    assert n3.recovering and n3.term == 1 and n3.last_index == 1  # n2 has not answered

    block(net, "n1", "n3")
    votes: list[Message] = []
    for _ in range(60):
        tick(net, "n1")
        votes += take(net, Vote, frm="n1", to="n3")
        net.queue = [m for m in net.queue if m.frm != "n1"]
        if role_of(n1) is Role.CANDIDATE:
            break
    assert role_of(n1) is Role.CANDIDATE and n1.term == 2 and len(votes) == 1
    tick(net, "n3", net.cfg.election_ticks)  # out of n1's lease (its timer has not fired)
    net.queue = []
    assert role_of(n3) is Role.FOLLOWER and n3.term == 1
    n3.step(votes[0])
    net.process("n3")
    assert [(m.reject, m.blank) for m in take(net, VoteResp)] == [(True, True)]  # lost
    assert net.durable["n3"].hs.vote == "n1" and n3.term == 2

    unblock(net, "n2", "n3")
    probe_round(net, "n3", ("n2",))
    assert not n3.recovering and n3.term == 2  # fenced at 2; the vote for n1 kept blank
    net.queue = []

    n3 = restart(net, "n3")  # a crash that kept the disk
    assert n3.recovering and n3.term == 2  # its marker stayed: the vote for n1 is blank
    n3.step(votes[0])  # the duplicate
    net.process("n3")
    for m in take(net, VoteResp, frm="n3"):
        n1.step(m)
    net.process("n1")
    net.queue = [m for m in net.queue if not isinstance(m, Append) or m.to == "n3"]
    if role_of(n1) is Role.LEADER:  # go on to show the damage
        n1.propose(b"a")
        block(net, "n1", "n2")
        block(net, "n2", "n3")
        unblock(net, "n1", "n3")
        deliver(net)
    assert leaders_of(net, 2) == ["n2"], (
        f"two leaders in term 2: {leaders_of(net, 2)}; applied at index 3: "
        f"n1 {[e.data for e in net.applied['n1'] if e.index == 3]}, "
        f"n2 {[e.data for e in net.applied['n2'] if e.index == 3]}"
    )


def test_a_blank_vote_stays_blank_after_a_restart_five_nodes_default_config() -> None:
    """Was the same hole with pre-vote and check-quorum on (the defaults), 5 nodes.

    n1 leads term 1; n1 cut off (not ticked: it keeps leading term 1). n2, n4, n5 tick
    out of n1's lease. n3 pre-campaigns for term 2: n2 and n4 grant (the grants are
    delayed). n2 (cut from n3) pre-campaigns and stands for term 2: n4 and n5 vote n2,
    n2 leads term 2 and commits "c" at 3. n5 loses its disk; n1 catches it up at term 1
    (n5 hears no one else). n5 ticks out of n1's lease. The delayed pre-vote grants reach
    n3: it wins the pre-vote ({n3, n2, n4}) and sends Vote(term 2, last (1, 1)); n5
    records vote n3 blank (answer lost). n5's probes reach n2, n3, n4 (all at 2): fenced
    at 2 with ``_blank_through = 2``, recovered. n5 restarts with its disk; a duplicate of
    n3's Vote -> real grant. n1 loses check-quorum, steps down (no leader: no lease), and
    n3's (delayed) Vote reaches it -> grant. n3 leads term 2 with {n3, n5, n1}; n2 leads
    term 2 with {n2, n4, old n5}.
    """
    net = Net(5)
    net.elect("n1")
    c = net.cores
    n1, n3 = c["n1"], c["n3"]
    net.isolate("n1")
    for nid in ("n2", "n4", "n5"):
        tick(net, nid, net.cfg.election_ticks)
    net.queue = []
    assert all(c[i].role is Role.FOLLOWER for i in ("n2", "n4", "n5"))
    for _ in range(30):
        tick(net, "n3")
        if role_of(n3) is Role.PRE_CANDIDATE:
            break
    assert role_of(n3) is Role.PRE_CANDIDATE
    for pv in take(net, PreVote, frm="n3"):
        if pv.to in ("n2", "n4"):
            c[pv.to].step(pv)
            net.process(pv.to)
    held = take(net, PreVoteResp, to="n3")
    net.queue = []
    assert [(m.frm, m.reject) for m in held] == [("n2", False), ("n4", False)]

    block(net, "n2", "n3")
    block(net, "n3", "n4")
    block(net, "n3", "n5")
    for _ in range(30):
        tick(net, "n2")
        deliver(net)
        if role_of(c["n2"]) is Role.LEADER:
            break
    assert role_of(c["n2"]) is Role.LEADER and c["n2"].term == 2
    assert net.durable["n5"].hs.vote == "n2"
    c["n2"].propose(b"c")
    deliver(net)
    assert (3, b"c") in [(e.index, e.data) for e in net.applied["n2"]]

    n5 = wipe(net, "n5", probed=False)
    block(net, "n5", "n2")
    block(net, "n5", "n4")
    unblock(net, "n1", "n5")
    for _ in range(3):
        tick(net, "n1")
        tick(net, "n5")
        deliver(net)
    assert n5.recovering and n5.term == 1 and n5.last_index == 1 and role_of(n1) is Role.LEADER
    block(net, "n1", "n5")
    tick(net, "n5", net.cfg.election_ticks)
    net.queue = []
    assert role_of(n5) is Role.FOLLOWER and n5.term == 1

    for m in held:
        n3.step(m)
    net.process("n3")
    assert role_of(n3) is Role.CANDIDATE and n3.term == 2
    votes = {m.to: m for m in take(net, Vote, frm="n3")}
    net.queue = []
    n5.step(votes["n5"])
    net.process("n5")
    assert [(m.reject, m.blank) for m in take(net, VoteResp)] == [(True, True)]  # lost

    unblock(net, "n5", "n2")
    unblock(net, "n5", "n4")
    unblock(net, "n3", "n5")
    probe_round(net, "n5", ("n2", "n3", "n4"))
    assert not n5.recovering and n5.term == 2 and net.durable["n5"].hs.vote == "n3"
    net.queue = []

    n5 = restart(net, "n5")
    n5.step(votes["n5"])  # the duplicate
    net.process("n5")
    for m in take(net, VoteResp, frm="n5"):
        n3.step(m)
    for _ in range(30):
        tick(net, "n1")
        net.queue = []
        if role_of(n1) is not Role.LEADER:
            break
    assert role_of(n1) is Role.FOLLOWER and n1.term == 1
    n1.step(votes["n1"])  # delayed
    net.process("n1")
    for m in take(net, VoteResp, frm="n1"):
        n3.step(m)
    net.process("n3")
    assert leaders_of(net, 2) == ["n2"], f"two leaders in term 2: {leaders_of(net, 2)}"


# --------------------------------------------------------------------------- guarantees


def _recovering_core(nid: str, ids: list[str], seed: int, cfg: RaftConfig) -> RaftCore:
    return RaftCore(
        nid,
        ids,
        cfg,
        random.Random(seed),
        hard_state=HardState(0, None, 0),
        snapshot=None,
        entries=[],
        recovering=True,
    )


def test_an_answer_to_a_previous_start_does_not_fence() -> None:
    """The previous life (recovering too) probed n2 when n2 was at term 1; n2 then moved
    to term 2. The old answer (term 1), delivered after the restart, does not
    count (other nonce): only n2's answer to this start's probe (term 2) fences."""
    net = Net(3)
    net.elect("n1")
    old = _recovering_core("n3", net.ids, 1, net.cfg)
    net.cores["n3"] = old
    old.tick()
    net.process("n3")
    for p in take(net, TermProbe, frm="n3"):
        net.cores[p.to].step(p)
        net.process(p.to)
    probe_round_msgs = take(net, TermProbeResp, to="n3")
    assert sorted((m.frm, m.term) for m in probe_round_msgs) == [("n1", 1), ("n2", 1)]
    net.queue = []
    net.cores["n2"].step(Vote("n1", "n2", 2, 9, 1, True))  # n2 now at term 2
    net.process("n2")
    net.queue = []
    new = _recovering_core("n3", net.ids, 2, net.cfg)
    net.cores["n3"] = new
    for m in probe_round_msgs:
        new.step(m)
    assert new.term == 0 and new.recovering
    tick(net, "n3")
    for p in take(net, TermProbe, frm="n3"):
        net.cores[p.to].step(p)
        net.process(p.to)
    answers = take(net, TermProbeResp, to="n3")
    for m in reversed(answers + answers):  # duplicated, reordered
        new.step(m)
    net.process("n3")
    assert new.term == 2 and net.durable["n3"].hs == HardState(2, "n3", 0)


def test_a_fence_below_its_own_term_changes_neither_term_nor_vote() -> None:
    """The recovering node granted an empty-log candidate a real vote at term 5; its
    peers report term 1: the fence (F = 1 < 5) changes neither its term nor its vote."""
    net = Net(3)
    net.elect("n1")
    n3 = wipe(net, "n3", probed=False)
    n3.step(Vote("n2", "n3", 5, 0, 0, False))  # empty-log candidate: a real grant at 5
    net.process("n3")
    net.queue = []
    assert net.durable["n3"].hs == HardState(5, "n2", 0)
    tick(net, "n3")
    probes = take(net, TermProbe, frm="n3")
    net.queue = []
    nonce = probes[0].nonce
    n3.step(TermProbeResp("n1", "n3", 1, nonce))
    n3.step(TermProbeResp("n2", "n3", 1, nonce))
    net.process("n3")
    assert n3.term == 5 and net.durable["n3"].hs.vote == "n2"  # F = 1 < 5: unchanged


def test_a_candidate_fenced_at_a_higher_term_steps_down_and_votes_itself() -> None:
    """A recovering candidate (own vote blank) fenced at a term above its own becomes a
    follower there with its own vote recorded; a leader of the fence term is not voted."""
    net = Net(3)
    net.elect("n1")
    net.cores["n2"].step(Vote("n1", "n2", 4, 9, 1, True))
    net.process("n2")
    net.queue = []
    n3 = wipe(net, "n3", probed=False)
    net.isolate("n3")
    for _ in range(60):
        tick(net, "n3")
        if role_of(n3) is not Role.FOLLOWER:
            break
    net.queue = [m for m in net.queue if isinstance(m, TermProbe)]
    assert role_of(n3) in (Role.PRE_CANDIDATE, Role.CANDIDATE) and n3.term < 4
    net.heal()
    probe_round(net, "n3", ("n1", "n2"))
    assert role_of(n3) is Role.FOLLOWER and n3.term == 4
    assert net.durable["n3"].hs == HardState(4, "n3", 0)
    n3.step(Vote("n2", "n3", 4, 9, 1, False))
    net.process("n3")
    assert [m.reject for m in take(net, VoteResp)] == [True]


def test_a_new_cluster_of_recovering_nodes_elects_and_every_node_recovers() -> None:
    """Every node starts without durable state (a new cluster): they all probe each
    other; one leader is elected, at most one per term, and each node leaves
    recovering; then a write commits everywhere."""
    for n in (2, 3, 4, 5):
        net = Net(n)
        for k, nid in enumerate(net.ids):
            net.cores[nid] = _recovering_core(nid, net.ids, 100 + k, net.cfg)
        seen: dict[int, set[str]] = {}
        for _ in range(20 * net.cfg.election_ticks):
            net.tick()
            for i, c in net.cores.items():
                if role_of(c) is Role.LEADER:
                    seen.setdefault(c.term, set()).add(i)
            if net.leader() and not any(c.recovering for c in net.cores.values()):
                break
        assert all(len(v) == 1 for v in seen.values()), seen
        ldr = net.leader()
        assert ldr is not None, n
        assert not any(c.recovering for c in net.cores.values()), n
        net.cores[ldr].propose(b"w")
        net.tick(2)  # (followers learn the commit index with the next heartbeat)
        for nid in net.ids:
            assert [e.data for e in net.applied[nid] if e.kind is EntryKind.COMMAND] == [b"w"]


def test_a_wiped_node_recovers_in_two_to_five_node_clusters() -> None:
    """All peers up and connected: the wiped node fences, catches up and leaves
    recovering; the cluster keeps one leader per term."""
    for n in (2, 3, 4, 5):
        net = Net(n)
        net.elect("n1")
        net.cores["n1"].propose(b"a")
        net.flush()
        last = net.ids[-1]
        core = wipe(net, last, probed=False)
        net.tick(3 * net.cfg.election_ticks)
        assert not core.recovering, n
        assert core.last_index == net.cores["n1"].last_index
        assert leaders_of(net, net.cores["n1"].term) == ["n1"]


def test_a_peer_restarting_between_its_answer_and_the_fence_changes_nothing() -> None:
    """n2 answers (term 2), restarts keeping its disk before n1 answers: its term is
    durable, so the answer still bounds it; the fence ends at 2 with a self vote."""
    net = Net(3)
    net.elect("n1")
    net.cores["n2"].step(Vote("n1", "n2", 2, 9, 1, True))
    net.process("n2")
    net.queue = []
    n3 = wipe(net, "n3", probed=False)
    tick(net, "n3")
    probes = {m.to: m for m in take(net, TermProbe, frm="n3")}
    net.queue = []
    net.cores["n2"].step(probes["n2"])
    net.process("n2")
    ans2 = take(net, TermProbeResp)
    restart(net, "n2")
    assert net.cores["n2"].term == 2
    net.cores["n1"].step(probes["n1"])
    net.process("n1")
    ans1 = take(net, TermProbeResp)
    net.queue = []
    for m in ans1 + ans2:
        n3.step(m)
    net.process("n3")
    assert n3.term == 2 and net.durable["n3"].hs.vote == "n3"
