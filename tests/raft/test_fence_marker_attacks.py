"""Attacks on the deferred marker of a fenced node (raft/core.py, "Recovering nodes",
commit e29cabd): ``_blank_through`` and ``_marker_due``.

A recovering node whose TermProbe fence ends at a term F in which it had recorded a vote
for another node answers every request of a term <= F blank, and keeps its on-disk
``recovering`` marker until its term moves past F, so that a restart in F starts it
recovering again. Each test drives the synchronous ``Net`` of tests/raft/test_core.py
message by message (``Durable.recovering`` is the marker).

Safety held in every sequence the reviewer tried (restarts with the disk, a crash
between the hard-state write and the marker's removal, a fence that moves the term, a
leader or candidate at fence time, and a small randomized run). It found one liveness
bug, now fixed: a fresh cluster whose followers fenced after voting for the first
leader kept their markers for the whole first term, so a follower restarted (with its
disk) while the leader was down was recovering again and no leader could be elected.
A vote recorded for the known leader of the fence's term no longer defers anything: no
one else won that term (the two majorities would share a real voter).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

from raft.core import RaftCore, Role
from raft.messages import (
    Entry,
    HardState,
    TermProbe,
    TermProbeResp,
    Vote,
    VoteResp,
)
from raft.storage import RaftStorage
from tests.raft.test_core import Durable, Net, _elect_among, restart, role_of
from tests.raft.test_recovering_attacks import deliver


def fresh_cluster(n: int) -> Net:
    """A brand-new cluster: every node starts without durable state (its marker on disk)."""
    net = Net(n)
    for k, nid in enumerate(net.ids):
        net.durable[nid] = Durable(recovering=True)
        net.cores[nid] = RaftCore(
            nid,
            net.ids,
            net.cfg,
            random.Random(200 + k),
            hard_state=HardState(0, None, 0),
            snapshot=None,
            entries=[],
            recovering=True,
        )
    return net


def staggered_start(n: int = 3) -> Net:
    """A fresh cluster whose n1 starts ticking first (the others' processes come up a
    little later, or their first probes are lost): n1 fences at term 0 (the others
    answer its probes), is elected in term 1 with their votes (empty logs: real grants,
    recorded), and catches them up. Then everyone ticks: the followers' fences end at
    term 1, where they had recorded a vote for n1. n1 leads term 1 (they accepted its
    Appends), so no one else won it: the markers go (they used to wait for term 2)."""
    net = fresh_cluster(n)
    net.elect("n1")
    net.tick(5)
    n1 = net.cores["n1"]
    assert role_of(n1) is Role.LEADER and n1.term == 1 and not net.durable["n1"].recovering
    for nid in net.ids[1:]:
        c = net.cores[nid]
        assert not c.recovering and c.term == 1 and net.durable[nid].hs.vote == "n1"
        assert not net.durable[nid].recovering  # its vote is for the leader of term 1
    return net


def leader_among(net: Net, *ids: str) -> list[str]:
    return [i for i in ids if role_of(net.cores[i]) is Role.LEADER]


def states(net: Net) -> dict[str, tuple[int, str, bool, bool]]:
    return {
        i: (c.term, role_of(c).value, c.recovering, net.durable[i].recovering)
        for i, c in net.cores.items()
    }


# --------------------------------------------------------------------------- bugs


def test_a_follower_restarted_with_its_disk_in_a_new_clusters_first_term_still_elects() -> None:
    """Was a liveness bug (3 nodes, nobody lost a disk, two of three up, every committed
    entry on both, and no leader was ever elected until n1 came back). Now the
    followers' votes in term 1 are for n1, the leader they follow, so their markers go
    and a restarted follower is a full voter. The sequence it was:

    1. A brand-new cluster (every node recovering, markers on disk). n1 ticks first:
       fenced at term 0, elected in term 1; n2 and n3 record their (empty-log, real)
       votes for n1 in term 1 and catch up on n1's NOOP (committed on all three).
    2. n2 and n3 tick: their fences end at term 1 = their term, with vote n1 != self:
       ``_blank_through = 1``; they leave recovering in memory, but ``_marker_due``
       holds the marker on disk until their term passes 1. Nothing moves the term while
       n1 leads, so the markers stay (in a real cluster: for as long as the first
       leader lives).
    3. n1 goes down. n2 crashes and restarts with its disk (HardState(1, n1, 1), its
       log): the marker is there, so it starts recovering (the real node also sits out
       ``_stay_out``, 4 election timeouts).
    4. n2 can never leave recovering: its fence needs n1's answer, its data a leader.
       Its (pre-)votes are blank, its own vote too. n3 (real votes) needs more than
       n - majority = 1 real grant: it has only its own; n2 with n3's real grant has
       one real and one blank; blanks (1) are no majority. Every election is lost.

    Had n2 not restarted, or had n3 restarted too (blank majority), n2 and n3 elect a
    leader (test below). n2's blank votes protect nothing here: its only vote in term 1
    is on disk, and every term it could have voted in before (none: the cluster is new)
    is <= 1. The marker carries one bit for two facts (votes of terms <= F are blank,
    and the data is not caught up), so a restart in F loses that the data was caught up
    and that later terms are safe. Persisting F itself (e.g. in the marker) instead of
    keeping the marker would let n2 restart as a normal voter for terms > F.

    Same with 5 nodes: n2 and n3 restarted, n1 down, four of five up and no leader.
    How a cluster gets here: the followers vote before their fences end, i.e. their
    first probes went unanswered until the first election (nodes started a few seconds
    apart, or probes lost); nodes that tick together fence at term 0 first (test below).
    Also, README tells operators to wipe another node only once the `recovering` file
    is gone: with it stuck for the whole first term, they cannot.
    """
    net = staggered_start(3)
    net.isolate("n1")
    restart(net, "n2")
    assert not net.cores["n2"].recovering  # its marker went: its vote is for n1, the leader
    _elect_among(net, ["n2", "n3"])
    assert leader_among(net, "n2", "n3"), (
        f"no leader among n2, n3 (both hold every committed entry): {states(net)}"
    )


# --------------------------------------------------------------------------- guarantees


def test_without_the_restart_or_with_both_followers_restarted_the_two_elect() -> None:
    """The contrast to the bug: the same cluster, n1 down. (a) No restart: n3's request
    of term 2 is past n2's ``_blank_through`` (1), a real grant, and the winner's term
    change drops its marker. (b) n2 and n3 both restarted: both recovering, blank votes
    form a majority (counted as in a new cluster), a leader is elected."""
    net = staggered_start(3)
    net.isolate("n1")
    _elect_among(net, ["n2", "n3"])
    assert leader_among(net, "n2", "n3")
    assert not net.durable["n2"].recovering and not net.durable["n3"].recovering

    net = staggered_start(3)
    net.isolate("n1")
    restart(net, "n2")
    restart(net, "n3", seed=8)
    _elect_among(net, ["n2", "n3"])
    assert leader_among(net, "n2", "n3")


def test_nodes_that_tick_together_fence_before_the_election_and_drop_their_markers() -> None:
    """The common fresh start: every node probes on its first tick, the fences end at
    term 0 (a vote for itself there), before any election: nobody's ``_blank_through``
    is set and every marker goes as soon as the node caught up in term 1."""
    net = fresh_cluster(3)
    for _ in range(60):
        net.tick()
        if net.leader() and not any(d.recovering for d in net.durable.values()):
            break
    assert net.leader() is not None
    assert all(c._blank_through == 0 for c in net.cores.values())
    assert not any(d.recovering for d in net.durable.values())


def test_a_follower_restarted_while_the_first_leader_lives_rejoins_in_a_few_ticks() -> None:
    """With n1 up, the restarted n2 (its marker gone: its vote in term 1 is for n1, who
    leads term 1) follows at once; a leadership transfer to n3 works."""
    net = staggered_start(3)
    n2 = restart(net, "n2")
    assert not n2.recovering and n2._blank_through == 0
    for _ in range(3):
        net.tick()
    assert net.leader() == "n1" and n2.commit_index == net.cores["n1"].commit_index
    net.cores["n1"].transfer_leadership("n3")
    net.tick(3)
    assert net.leader() == "n3" and net.cores["n3"].term == 2
    assert not any(d.recovering for d in net.durable.values()), states(net)


def _process_crashing_before_marker(net: Net, nid: str) -> bool:
    """Like ``Net.process``, but the Ready that drops the marker crashes the node after
    its hard state and entries are durable and before the marker is removed (and before
    anything is sent): True if that happened."""
    c = net.cores[nid]
    while (rd := c.ready()) is not None:
        d = net.durable[nid]
        if rd.entries:
            first = rd.entries[0].index
            d.entries = [e for e in d.entries if e.index < first] + list(rd.entries)
        if rd.hard_state:
            d.hs = rd.hard_state
        if rd.recovered:
            return True
        net.queue.extend(rd.messages)
        c.advance(rd)
    return False


def test_a_leader_or_candidate_fenced_in_its_own_term_defers_nothing() -> None:
    """A leader of a fresh cluster elected before any probe was answered (blank
    majority), and a candidate in its own term, are fenced with their own vote: no
    ``_blank_through``; the leader's marker goes at once (it committed in its term).
    Its followers, which voted for it before their fences, drop theirs once they follow
    it (their vote is for the leader of that term)."""
    net = fresh_cluster(3)
    for _ in range(60):  # every probe lost until someone leads
        for nid in net.ids:
            net.cores[nid].tick()
            net.process(nid)
        net.queue = [m for m in net.queue if not isinstance(m, TermProbe)]
        deliver(net)
        if net.leader():
            break
    ldr = net.leader()
    assert ldr is not None
    lc = net.cores[ldr]
    assert not lc._fenced and net.durable[ldr].recovering
    net.tick(3)
    assert role_of(lc) is Role.LEADER and lc._blank_through == 0
    assert not net.durable[ldr].recovering
    # its followers, which voted for it before their fences, drop theirs too: their vote
    # is for the leader of the term
    net.tick(3)
    assert not any(net.durable[i].recovering for i in net.ids), states(net)

    net = fresh_cluster(3)
    n3 = net.cores["n3"]
    for _ in range(60):  # pre-votes go through; probes and votes are lost
        n3.tick()
        net.process("n3")
        deliver(net, keep=lambda m: isinstance(m, TermProbe | Vote))  # (held: lost)
        if role_of(n3) is Role.CANDIDATE:
            break
    assert role_of(n3) is Role.CANDIDATE and n3.term == 1
    n3.tick()
    net.process("n3")
    probes = [m for m in net.queue if isinstance(m, TermProbe) and m.frm == "n3"]
    net.queue = []
    for p in probes:
        n3.step(TermProbeResp(p.to, "n3", 1, p.nonce))  # (they saw its Vote)
    net.process("n3")
    assert role_of(n3) is Role.CANDIDATE and n3._blank_through == 0
    assert net.durable["n3"].hs == HardState(1, "n3", 0)


# --------------------------------------------------------------------------- randomized


def _run(seed: int, *, wipes: bool = False) -> Iterator[str]:
    """A fresh cluster of 3 whose nodes come up at random times (messages to a node not
    up yet are lost) and whose first probes may be lost for a while, under random
    delivery (loss, duplication, reordering), random ticks, and restarts with the disk;
    with ``wipes``, some without it, when no other node has its marker (README's
    limit; the messages to the node are lost, as its ``_stay_out`` makes them). Yields
    a violation: two leaders in a term, two candidates granted (blank or not) by one
    voter with one disk in one term, a real grant next to a vote a lost disk held in
    that term, or two different entries committed at one index."""
    rng = random.Random(seed)
    net = fresh_cluster(3)
    leaders: dict[int, str] = {}
    granted: dict[tuple[str, int, int], str] = {}
    lives = dict.fromkeys(net.ids, 0)
    committed: dict[int, Entry] = {}
    up_at = {nid: rng.choice((0, 0, 20, 60)) for nid in net.ids}
    #: a node's probes are lost until then: it may vote before its fence
    probes_at = {nid: rng.choice((0, 60, 150)) for nid in net.ids}
    for step in range(400):
        r = rng.random()
        if r < 0.35:
            nid = rng.choice(net.ids)
            if step >= up_at[nid]:
                net.cores[nid].tick()
        elif r < 0.9:
            for _ in range(3):
                if not net.queue:
                    break
                m = net.queue.pop(rng.randrange(len(net.queue)))
                if rng.random() < 0.1:
                    net.queue.append(m)  # duplicated
                if rng.random() < 0.1 or step < up_at[m.to]:
                    continue  # lost
                if isinstance(m, VoteResp) and (not m.reject or m.blank):
                    # one candidate per voter and term (and disk); a real grant meets
                    # no vote a lost disk held
                    for (v, t, life), cand in granted.items():
                        same = v == m.frm and t == m.term and cand != m.to
                        if same and (life == lives[v] or not m.reject):
                            yield f"seed {seed} step {step}: {v} voted {cand}, {m.to} in {t}"
                    granted[(m.frm, m.term, lives[m.frm])] = m.to
                net.cores[m.to].step(m)
        elif r < 0.93:
            nid = rng.choice(net.ids)
            others_done = not any(net.durable[o].recovering for o in net.ids if o != nid)
            if wipes and others_done and rng.random() < 0.3:  # the disk is lost
                net.durable[nid] = Durable(recovering=True)
                net.queue = [m for m in net.queue if m.to != nid]
                lives[nid] += 1
            d = net.durable[nid]
            net.cores[nid] = RaftCore(
                nid,
                net.ids,
                net.cfg,
                random.Random(seed * 31 + step),
                hard_state=d.hs,
                snapshot=None,
                entries=d.entries,
                recovering=d.recovering,
            )
        elif r < 0.96:
            ldr = net.leader()
            if ldr is not None:
                net.cores[ldr].propose(b"s%d-%d" % (seed, step))
        for nid in net.ids:
            net.process(nid)
        net.queue = [
            m
            for m in net.queue[-60:]  # (a bounded network: the oldest are lost)
            if not (isinstance(m, TermProbe) and step < probes_at[m.frm])
        ]
        for nid, c in net.cores.items():
            if role_of(c) is Role.LEADER and leaders.setdefault(c.term, nid) != nid:
                yield f"seed {seed} step {step}: {leaders[c.term]} and {nid} lead {c.term}"
        for nid in net.ids:
            for e in net.applied[nid]:
                if committed.setdefault(e.index, e) != e:
                    yield f"seed {seed}: two entries committed at {e.index}"
            net.applied[nid] = []


def test_random_fresh_clusters_with_restarts_keep_one_leader_per_term() -> None:
    bad = [v for seed in range(100) for v in _run(seed)]
    assert bad == []


def test_random_fresh_clusters_with_restarts_and_lost_disks_keep_one_leader_per_term() -> None:
    bad = [v for seed in range(100) for v in _run(seed, wipes=True)]
    assert bad == []


# --------------------------------------------------------------------------- the real node


def test_a_real_followers_marker_survives_its_restart_in_the_first_term(tmp_path: Path) -> None:
    """What the real node sees in the bug's step 3: its storage, fed the follower's
    Readys (no Ready carried ``recovered``), reloads with ``recovering`` set, so
    RaftBackend.start sits out ``_stay_out`` (4 election timeouts, 1.2 s by default)
    and then starts the core recovering, though the node never lost a byte."""
    net = staggered_start(3)
    d = net.durable["n2"]
    st = RaftStorage(tmp_path)
    st.load()
    assert st.recovering
    st.save(d.hs, d.entries, None)
    st.close()
    again = RaftStorage(tmp_path)
    hs, _, entries = again.load()
    assert again.recovering and hs == d.hs and entries == d.entries
    again.close()
