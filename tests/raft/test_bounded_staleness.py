"""raft's BOUNDED_STALENESS decision (``raft.node.bounded_staleness_refusal``) on real core
states from the deterministic test network: a new leader whose commit index still lies
below a write its predecessor acknowledged must not vouch for its state, nor may its
followers, until it has committed an entry of its own term (review of issue 16)."""

from __future__ import annotations

from raft.core import Role
from raft.messages import Append
from raft.node import bounded_staleness_refusal
from tests.raft.test_core import CFG, Net

NOW = 1000.0  # the monotonic clock of the checks (s)


def _new_leader_below_an_acknowledged_write() -> tuple[Net, str, str, int]:
    """n1 commits W with n2, n3 and crashes before telling them; n4, n5 lag. n2 or n3 is
    elected; its no-op cannot commit while n4, n5 only answer heartbeats."""
    net = Net(5)
    net.elect("n1")
    n1 = net.cores["n1"]
    for lagging in ("n4", "n5"):
        net.isolate(lagging)
    for i in range(3):
        n1.propose(b"x%d" % i)
        net.flush()
    w = n1.propose(b"W")
    assert w is not None
    net.process("n1")
    net.flush(lambda m: isinstance(m, Append) and m.frm == "n1")  # n2, n3 store W
    net.flush(lambda m: m.to == "n1")  # n1 commits W: the client's ok
    assert n1.commit_index >= w
    net.isolate("n1")
    net.queue.clear()  # n1 crashes before any message carries commit >= W
    assert net.cores["n2"].commit_index < w and net.cores["n3"].commit_index < w
    net.blocked = {p for p in net.blocked if "n1" in p}  # n4, n5 vote again

    def no_catch_up(m: object) -> bool:
        return not (isinstance(m, Append) and m.entries and m.to in ("n4", "n5"))

    for _ in range(8 * CFG.election_ticks):
        for nid in ("n2", "n3", "n4", "n5"):
            net.cores[nid].tick()
        net.flush(no_catch_up)
        net.queue = [m for m in net.queue if no_catch_up(m)]
        if any(net.cores[i].role is Role.LEADER for i in ("n2", "n3")):
            break
    leader = next(i for i in ("n2", "n3") if net.cores[i].role is Role.LEADER)
    follower = "n3" if leader == "n2" else "n2"
    for _ in range(3 * CFG.election_ticks):  # heartbeats answered, catch-up never arrives
        for nid in ("n2", "n3", "n4", "n5"):
            net.cores[nid].tick()
        net.flush(no_catch_up)
        net.queue = [m for m in net.queue if no_catch_up(m)]
    return net, leader, follower, w


def test_a_new_leader_and_its_followers_wait_for_a_commit_of_its_term() -> None:
    net, leader, follower, w = _new_leader_below_an_acknowledged_write()
    lc, fc = net.cores[leader], net.cores[follower]
    assert lc.role is Role.LEADER and lc.has_quorum_contact()
    assert lc.commit_index < w, "the setup must leave W uncommitted on the new leader"
    why = bounded_staleness_refusal(lc, lc.applied_index, None, 0.001, NOW)
    assert why is not None and "has not yet committed an entry of its term" in why
    beat = [m for m in net.sent if isinstance(m, Append) and m.frm == leader and m.to == follower]
    heard = (fc.term, leader, NOW, beat[-1].commit)
    why = bounded_staleness_refusal(fc, fc.applied_index, heard, 0.001, NOW)
    assert why is not None and "had not yet committed an entry of its term" in why

    # Once n4, n5 catch up, the no-op commits (with W below it): both may serve.
    net.heal()
    net.isolate("n1")
    net.tick(3 * CFG.election_ticks)
    assert lc.role is Role.LEADER and lc.commit_index > w
    assert bounded_staleness_refusal(lc, lc.applied_index, None, 0.001, NOW) is None
    beat = [m for m in net.sent if isinstance(m, Append) and m.frm == leader and m.to == follower]
    heard = (fc.term, leader, NOW, beat[-1].commit)
    assert bounded_staleness_refusal(fc, fc.applied_index, heard, 0.001, NOW) is None
    # ... within the bound only, and only once applied up to the leader's commit
    why = bounded_staleness_refusal(fc, fc.applied_index, heard, 0.001, NOW + 0.5)
    assert why is not None and "last heard from leader" in why
    why = bounded_staleness_refusal(fc, beat[-1].commit - 1, heard, 0.001, NOW)
    assert why is not None and "it has applied up to index" in why
