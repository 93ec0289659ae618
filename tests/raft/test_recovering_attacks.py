"""Attacks on the lost-disk recovery of raft/core.py ("Recovering nodes", commit 673924e).

Each test drives the synchronous ``Net`` of tests/raft/test_core.py message by message.
The first two are the reviewer's attacks that broke it, both fixed: the recovery target
comes from the first Append that fits the log, and a recovering node's votes count only
once every peer has told it its term (TermProbe). The others document guarantees.
"""

from __future__ import annotations

from collections.abc import Callable

from raft.core import RaftConfig, Role
from raft.messages import (
    Append,
    AppendResp,
    EntryKind,
    Message,
    PreVote,
    PreVoteResp,
    Vote,
    VoteResp,
)
from tests.raft.test_core import Net, _elect_among, leading, restart, role_of, wipe

#: one entry per Append: a wiped node's catch-up takes several messages (as a large
#: backlog does with ``max_bytes_per_msg``)
ONE_PER_MSG = RaftConfig(election_ticks=10, heartbeat_ticks=1, max_entries_per_msg=1)


def commands(net: Net, nid: str) -> list[bytes]:
    return [e.data for e in net.durable[nid].entries if e.kind is EntryKind.COMMAND]


def applied_commands(net: Net, nid: str) -> list[tuple[int, bytes]]:
    return [(e.index, e.data) for e in net.applied[nid] if e.kind is EntryKind.COMMAND]


def deliver(net: Net, keep: Callable[[Message], bool] = lambda m: False) -> list[Message]:
    """Deliver everything queued (repeatedly) except what ``keep`` holds back: returned."""
    held: list[Message] = []
    for i in net.ids:
        net.process(i)
    while net.queue:
        batch, net.queue = net.queue, []
        for m in batch:
            if (m.frm, m.to) in net.blocked:
                continue
            if keep(m):
                held.append(m)
                continue
            net.cores[m.to].step(m)
        for i in net.ids:
            net.process(i)
    return held


def deliver_until(net: Net, done: Callable[[], bool], limit: int = 1000) -> None:
    """Deliver queued messages one at a time, oldest first, until ``done()``."""
    for _ in range(limit):
        for i in net.ids:
            net.process(i)
        if done() or not net.queue:
            return
        m = net.queue.pop(0)
        if (m.frm, m.to) not in net.blocked:
            net.cores[m.to].step(m)
    raise AssertionError("message storm")


def unblock(net: Net, a: str, b: str) -> None:
    net.blocked -= {(a, b), (b, a)}


def block(net: Net, a: str, b: str) -> None:
    net.blocked |= {(a, b), (b, a)}


# --------------------------------------------------------------------------- bugs


def test_recovers_holding_an_entry_it_acked_while_the_leader_fsynced() -> None:
    """Was a lost committed write (no message delayed or reordered), with the recovery
    target taken from the first Append heard in the term rather than the first that fits.

    Three nodes, n2 lagging (cut off). The leader n1 proposes "acked" (index 2): its Ready
    sends the Append to n3 before n1's own fsync (allowed, module docstring step 2). n3
    persists and acknowledges index 2; n1 steps the ack (match[n3] = 2) but cannot commit
    before its own fsync completes. n3 loses its disk and restarts at once. n1 ticks
    during its fsync: the heartbeat it queues carries commit 1. n1's fsync completes:
    ``advance`` commits index 2 counting n3's ack, and the client is answered. The queued
    heartbeat (commit 1) is the first Append the new n3 hears in term 1: ``_recover_to`` is
    (1, 1). n3 rejects it at index 2 (lost disk); n1 forgets n3's match and resends from
    index 1, one entry per message: Append(prev 0, [e1 (term 1)], commit 2). n3 now holds
    a committed entry of the leader's term and everything up to 1: it leaves
    ``recovering`` without index 2, whose only other copy is n1. n1 is cut off; n2 and n3
    (logs [e1], real votes) elect a leader that overwrites index 2: "acked" is lost.
    The commit index of the first Append heard is not a bound on what the leader counted
    of this node's acks: an ack the leader counts after it built that Append is missed.
    """
    net = Net(3, ONE_PER_MSG)
    net.elect("n1")
    n1 = net.cores["n1"]
    assert n1.commit_index == 1 and n1.progress() == {"n2": 1, "n3": 1}
    net.isolate("n2")  # n2 lags: it will miss "acked"
    assert n1.propose(b"acked") == 2
    rd = n1.ready()  # the leader's fsync of index 2 starts; its Appends leave meanwhile
    assert rd is not None and [e.index for e in rd.entries] == [2]
    append = [m for m in rd.messages if isinstance(m, Append) and m.to == "n3"]
    assert append and append[0].entries[0].data == b"acked"
    net.cores["n3"].step(append[0])
    net.process("n3")  # n3 persists index 2 and acknowledges it
    ack = [m for m in net.queue if isinstance(m, AppendResp) and m.frm == "n3"]
    assert ack and ack[0].index == 2 and not ack[0].reject
    net.queue = []
    n1.step(ack[0])  # (between ready and advance: allowed)
    assert n1.commit_index == 1  # its own copy is not durable yet
    n3 = wipe(net, "n3")  # n3 lost its disk and is back at once
    n1.tick()  # the fsync is still under way: the heartbeat carries commit 1
    # the fsync completes
    net.durable["n1"].entries += list(rd.entries)
    if rd.hard_state:
        net.durable["n1"].hs = rd.hard_state
    n1.advance(rd)
    assert n1.commit_index == 2  # "acked" is committed (n1 and n3's acknowledgement)
    net.process("n1")
    assert ("n1", b"acked") in [("n1", e.data) for e in net.applied["n1"]]  # client answered
    deliver_until(net, lambda: not n3.recovering)  # n1 and the new n3 talk
    held_when_recovered = n3.last_index  # (1: it had acknowledged index 2)
    net.isolate("n1")
    unblock(net, "n2", "n3")
    _elect_among(net, ["n2", "n3"])
    for nid in ("n2", "n3"):
        c = net.cores[nid]
        assert c.log_term(2) == 1 or c.commit_index < 2, f"{nid} committed over 'acked'"
    assert held_when_recovered >= 2


def test_a_vote_delivered_after_the_node_is_back_elects_no_second_leader() -> None:
    """A reviewer's attack, once two leaders in one term (then two different entries
    applied at one index): a vote of the node's previous life arriving after it is back.

    n1 leads term 1. n1 is cut off from n2 and n3 (it keeps its lease: it heard n3 in
    its last check-quorum window). n2 pre-votes and stands for term 2; n3 grants (vote
    n2 in term 2, durable); n3's VoteResp is in flight when n3 loses its disk and is back
    at once. n1 is not deposed: nobody leads term 2 yet. The new n3 heard n1 (term 1),
    caught up and left ``recovering`` at term 1, having forgotten term 2; the VoteResp
    arrived, n2 led term 2, and n3, with a real vote again, led term 2 too with n1's.
    Now n3's votes count only once every peer has told it its term after it started
    (TermProbe): n2, cut off from it, has not, so n3 stays recovering (its votes blank)
    and no one but n2 leads term 2. (With n2's answer, term 2, n3 would have moved to
    term 2 and voted for itself there.)
    """
    net = Net(3)
    net.elect("n1")
    n1, n2 = net.cores["n1"], net.cores["n2"]
    assert n1.term == 1
    net.isolate("n1")

    def vote_grant(m: Message) -> bool:
        return isinstance(m, VoteResp) and not m.reject and m.term == 2

    held: list[Message] = []
    for _ in range(30):
        for c in net.cores.values():
            c.tick()
        held += deliver(net, keep=vote_grant)
        if n2.role is Role.CANDIDATE:
            break
    # (deterministic: n2's election timer fires first; n3, out of lease, votes for it)
    assert n2.role is Role.CANDIDATE and n2.term == 2
    assert [(m.frm, m.to) for m in held] == [("n3", "n2")]
    assert net.durable["n3"].hs.vote == "n2" and net.durable["n3"].hs.term == 2
    assert n1.role is Role.LEADER  # it heard n3 in its last window
    n3 = wipe(net, "n3", probed=False)  # its probes go over the links
    unblock(net, "n1", "n3")
    block(net, "n2", "n3")
    net.tick(3)
    assert n3.recovering and n3.term == 1 and n1.role is Role.LEADER  # n2 has not answered
    for m in held:  # n3's vote from before the wipe arrives
        n2.step(m)
    net.process("n2")
    assert role_of(n2) is Role.LEADER and n2.term == 2
    n2.propose(b"c")
    net.flush()
    leaders: dict[int, set[str]] = {2: {"n2"}}
    block(net, "n1", "n3")  # n1 loses quorum and steps down; then n3 can campaign
    for _ in range(80):
        net.tick()
        for i, c in net.cores.items():
            if c.role is Role.LEADER:
                leaders.setdefault(c.term, set()).add(i)
        if n1.role is not Role.LEADER:
            unblock(net, "n1", "n3")
        if any(c.role is Role.LEADER and c.term == 2 for i, c in net.cores.items() if i != "n2"):
            break
    second = [i for i, c in net.cores.items() if i != "n2" and c.role is Role.LEADER]
    if second:  # go on to show the damage
        net.cores[second[0]].propose(b"a")
        net.flush()
        net.heal()
        net.isolate("n3")
        for _ in range(80):
            net.tick(only=["n1", "n2"])
            if Role.LEADER in (n1.role, n2.role):
                break
        net.tick(3, only=["n1", "n2"])
    applied = {i: applied_commands(net, i) for i in net.ids}
    assert leaders[2] == {"n2"}, f"term 2 had leaders {sorted(leaders[2])}; applied {applied}"
    assert applied["n1"][:1] == applied["n2"][:1], applied


# --------------------------------------------------------------------------- guarantees


def test_four_nodes_two_wiped_elect_with_two_real_votes_and_keep_committed_writes() -> None:
    """Rule 2 with n = 4 and two wiped nodes (the README allows two of four): two real
    grants meet every majority of three, so the survivors elect a leader with a blank
    vote, and it holds every committed write (each was on three of the four)."""
    net = Net(4)
    net.elect("n1")
    n1 = net.cores["n1"]
    net.isolate("n2")  # "w" is committed on n1, n3 and n4 only
    n1.propose(b"w")
    net.flush()
    assert n1.commit_index == 2
    net.heal()
    wipe(net, "n3")
    wipe(net, "n4")
    restart(net, "n1")  # the leader crashed too (kept its disk)
    _elect_among(net, ["n1", "n2", "n3", "n4"])
    leader = net.leader()
    assert leader == "n1"  # n2 lacks "w": n1 refuses it, and blanks do not elect n2
    net.tick(5)
    assert all(commands(net, i) == [b"w"] for i in net.ids)
    assert not any(net.cores[i].recovering for i in net.ids)


def test_four_nodes_one_real_vote_and_two_blanks_elect_no_one() -> None:
    """n = 4, two wiped, one survivor cut off: the other survivor's own (real) vote and
    two blank votes make three, a majority, but one real vote does not meet every
    majority (n1 and n2 may hold a write the other lacks): no leader."""
    net = Net(4)
    net.elect("n1")
    net.isolate("n2")
    net.cores["n1"].propose(b"w")  # committed on n1, n3, n4; n2 lacks it
    net.flush()
    wipe(net, "n3")
    wipe(net, "n4")
    restart(net, "n2")
    net.isolate("n1")
    unblock(net, "n2", "n3")
    unblock(net, "n2", "n4")
    unblock(net, "n3", "n4")
    _elect_among(net, ["n2", "n3", "n4"])
    assert net.leader() in (None, "n1")
    assert all(net.cores[i].role is not Role.LEADER for i in ("n2", "n3", "n4"))


def test_two_wiped_of_four_do_not_elect_each_other() -> None:
    """Two blank nodes of four: an empty-log candidate gets the other's real grant, and
    its own blank vote, two of four: no leader (the survivors are out of reach)."""
    net = Net(4)
    net.elect("n1")
    net.cores["n1"].propose(b"w")
    net.flush()
    wipe(net, "n3")
    wipe(net, "n4")
    net.isolate("n1")
    net.isolate("n2")
    unblock(net, "n3", "n4")
    _elect_among(net, ["n3", "n4"])
    assert all(net.cores[i].role is not Role.LEADER for i in ("n3", "n4"))


def test_a_blank_pre_vote_answer_changes_no_term() -> None:
    """A recovering node answers an up-to-date pre-candidate with a blank PreVoteResp at
    the pre-vote's term: it must not move the pre-candidate's term (pre-vote traffic never
    does), and alone it wins no pre-vote in a cluster of three."""
    net = Net(3)
    net.elect("n1")
    n2 = net.cores["n2"]
    term = n2.term
    n3 = wipe(net, "n3", probed=False)
    n3.step(PreVote("n2", "n3", term + 1, n2.last_index, n2.log_term(n2.last_index) or 0))
    net.process("n3")
    resp = [m for m in net.queue if isinstance(m, PreVoteResp) and m.frm == "n3"]
    assert resp and resp[0].blank and resp[0].reject and resp[0].term == term + 1
    assert n3.term == 0 and n3.vote is None  # a pre-vote records nothing
    net.queue = []
    net.isolate("n1")
    unblock(net, "n2", "n3")
    for _ in range(60):
        n2.tick()
        deliver(net)
        assert n2.term == term  # never a real candidacy, never a bumped term
    assert n2.role is not Role.LEADER


def test_a_recovering_node_keeps_the_vote_it_answered_blank() -> None:
    """A blank VoteResp records a real vote: a second candidate of the same term gets a
    plain refusal (so two candidates of one term cannot both count it)."""
    net = Net(3)
    net.elect("n1")
    n3 = wipe(net, "n3")
    t = net.cores["n1"].term + 1
    li = net.cores["n1"].last_index
    n3.step(Vote("n1", "n3", t, li, t - 1, False))
    n3.step(Vote("n2", "n3", t, li, t - 1, False))
    net.process("n3")
    answers = [(m.to, m.reject, m.blank) for m in net.queue if isinstance(m, VoteResp)]
    assert answers == [("n1", True, True), ("n2", True, False)]
    assert net.durable["n3"].hs.vote == "n1"


def test_a_two_node_cluster_after_recovery_keeps_entries_sent_before_the_leaders_fsync() -> None:
    """Two nodes; n2 was wiped twice (one at a time) and recovered each time. n1 then
    sends "b" before its own fsync (allowed) and crashes losing it: n2, which holds
    "b", refuses n1 and wins with n1's real grant; no write moves backwards."""
    net = Net(2)
    net.elect("n1")
    n1 = net.cores["n1"]
    n1.propose(b"a")
    net.flush()
    n2 = wipe(net, "n2")
    net.tick(3)
    assert not n2.recovering and commands(net, "n2") == [b"a"]
    # a second wipe, later (one at a time): n2 catches up, then n1 sends "b" before its
    # own fsync, n2 stores it, and n1 crashes losing "b"
    n2 = wipe(net, "n2")
    net.tick(3)
    assert not n2.recovering
    n1.propose(b"b")
    rd = n1.ready()
    assert rd is not None
    for m in rd.messages:
        n2.step(m)
    net.process("n2")
    net.queue = []
    n1 = restart(net, "n1")  # "b" was never durable on n1
    assert commands(net, "n1") == [b"a"] and commands(net, "n2") == [b"a", b"b"]
    _elect_among(net, ["n1", "n2"])
    assert net.leader() == "n2"  # n2 kept its disk this time: a plain Raft election
    net.tick(3)
    assert commands(net, "n1") == commands(net, "n2") == [b"a", b"b"]


def test_the_recovery_target_follows_a_new_term() -> None:
    """``_recover_to`` belongs to a term: a wiped node that first heard a leader of term
    t (commit c) and then a leader of term t + 1 recovers against the new leader's own
    term entry (which follows every entry committed before), not the old target."""
    net = Net(3, ONE_PER_MSG)
    n1 = leading(net, b"a", b"b", b"c")
    n3 = wipe(net, "n3")
    n1.tick()
    deliver_until(net, lambda: n3.last_index >= 1)  # hears term t, commit 4
    t = n1.term
    assert n3.recovering and n3._recover_to == (t, 4)
    net.queue = []
    net.isolate("n3")
    assert n1.transfer_leadership("n2")
    net.flush()
    n2 = net.cores["n2"]
    assert n2.role is Role.LEADER and n2.term == t + 1
    unblock(net, "n2", "n3")
    n2.tick()
    deliver_until(net, lambda: n3._recover_to[0] == t + 1)
    assert n3.recovering
    net.tick(8)
    assert not n3.recovering and commands(net, "n3") == [b"a", b"b", b"c"]
    assert n3.log_term(n3.commit_index) == t + 1


def test_a_snapshot_does_not_end_recovery_by_itself_and_keeps_every_write() -> None:
    """Snapshots while recovering: the leader compacted its log, so the wiped node gets
    an InstallSnapshot; it leaves ``recovering`` only via an Append of the leader's term
    reporting it committed, and then holds every committed write."""
    net = Net(3)
    n1 = leading(net, b"a", b"b")
    n1.compact(n1.applied_index, b"state-ab")
    n3 = wipe(net, "n3")
    snap = n1.snapshot
    assert snap is not None
    n1.tick()
    net.process("n1")
    # deliver until n3 installed the snapshot, then look before anything else arrives
    deliver_until(net, lambda: n3.snapshot is not None)
    assert n3.commit_index == snap.meta.index and n3.recovering
    net.tick(3)
    assert not n3.recovering and n3.commit_index >= snap.meta.index
    assert net.snapshots_received["n3"] == 1
    net.isolate("n1")
    unblock(net, "n2", "n3")
    _elect_among(net, ["n2", "n3"])
    assert net.leader() in ("n2", "n3")
    assert all(net.cores[i].commit_index >= snap.meta.index for i in ("n2", "n3"))
