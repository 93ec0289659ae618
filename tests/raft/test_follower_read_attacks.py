"""Attacks on the one-round-trip follower read (raft/core.py, "Reads served by
followers": a leader of a three-node cluster answers a follower's ReadIndex at once): a
late ReadIndex at a deposed leader, after an election or a leadership transfer, and a
duplicated one. Each must leave every read linearizable."""

from __future__ import annotations

from collections.abc import Sequence

from raft.core import RaftConfig, Role
from raft.messages import Message, ReadIndex, ReadIndexResp
from tests.raft.test_core import Net


def _held_read_index(net: Net, asker: str, rid: int) -> ReadIndex:
    """``asker`` queues a read; its ReadIndex is taken off the network (delayed)."""
    assert net.cores[asker].read_index(rid)
    net.process(asker)
    held = [m for m in net.queue if isinstance(m, ReadIndex)]
    assert len(held) == 1
    net.queue = [m for m in net.queue if not isinstance(m, ReadIndex)]
    ask = held[0]
    assert isinstance(ask, ReadIndex)
    return ask


def _deliver_only(net: Net, msgs: Sequence[Message]) -> None:
    net.queue = list(msgs)
    net.flush()


def _depose_n1_then_ask_it_late(transfer: bool) -> tuple[Net, int]:
    # (without check-quorum nothing ever ends n1's reign but a message of a later term)
    net = Net(3, RaftConfig(election_ticks=10, heartbeat_ticks=1, check_quorum=False))
    net.elect("n1")
    net.tick(2)
    n1, n2, n3 = (net.cores[i] for i in ("n1", "n2", "n3"))
    assert n1.propose(b"a") is not None
    net.flush()
    ask = _held_read_index(net, "n2", 5)  # the read began here, at n1's term
    # n1 hears nothing more; n3 becomes leader of a later term with n2's vote.
    net.blocked |= {("n1", "n2"), ("n2", "n1"), ("n3", "n1")}
    if transfer:
        assert n1.transfer_leadership("n3")
        net.flush()
        net.blocked.add(("n1", "n3"))
    else:
        net.blocked.add(("n1", "n3"))
        for _ in range(2 * net.cfg.election_ticks):  # n3 times out first, n2 votes for it
            if n3.role is Role.LEADER:
                break
            n3.tick()
            net.flush()
    assert n3.role is Role.LEADER and n3.term > n1.term
    assert n1.role is Role.LEADER  # deposed, and has not heard
    assert n3.propose(b"W") is not None
    net.flush()
    w = n3.commit_index  # W is committed (and could be acknowledged) after the read began
    # The late ReadIndex reaches the deposed leader, which answers at once...
    net.blocked.clear()
    n1.step(ask)
    net.process("n1")
    answers = [m for m in net.queue if isinstance(m, ReadIndexResp)]
    assert len(answers) == 1 and answers[0].term < n2.term
    assert answers[0].index < w  # ...with a read point that misses W
    _deliver_only(net, answers)
    return net, w


def test_a_deposed_leaders_one_round_trip_answer_is_not_taken() -> None:
    """The asker voted in the later term after sending: it has moved on and drops the
    batch, and the deposed leader's stale read point is never served."""
    net, w = _depose_n1_then_ask_it_late(transfer=False)
    assert net.reads["n2"] == []
    assert net.dropped["n2"] == [5]
    _a_read_after_w_sees_it(net, w)


def test_after_a_leadership_transfer_the_old_leaders_answer_is_not_taken() -> None:
    """TimeoutNow lets the target win past the lease; the old leader, not yet aware,
    answers a late ReadIndex at once: the asker (who voted for the target) drops it."""
    net, w = _depose_n1_then_ask_it_late(transfer=True)
    assert net.reads["n2"] == []
    assert net.dropped["n2"] == [5]
    _a_read_after_w_sees_it(net, w)


def _a_read_after_w_sees_it(net: Net, w: int) -> None:
    """A read that begins on n2 now (W acknowledged) goes to the new leader, and its read
    point covers W; the deposed n1 still believes it leads and cannot be asked."""
    n2 = net.cores["n2"]
    net.tick(1)
    assert net.cores["n1"].role is not Role.LEADER or n2.leader_id == "n3"
    assert n2.leader_id == "n3"
    assert n2.read_index(6)
    net.flush()
    assert [r.request_id for r in net.reads["n2"]] == [6]
    assert net.reads["n2"][0].index >= w


def test_a_duplicated_read_index_releases_its_batch_once() -> None:
    net = Net(3)
    net.elect("n1")
    net.tick(2)
    n1 = net.cores["n1"]
    assert n1.propose(b"a") is not None
    net.flush()
    ask = _held_read_index(net, "n2", 5)
    n1.step(ask)
    n1.step(ask)  # the network duplicated it
    net.process("n1")
    answers = [m for m in net.queue if isinstance(m, ReadIndexResp)]
    assert len(answers) == 2
    net.flush()
    assert len(net.reads["n2"]) == 1
    # A later read on n2 is not released by a replay of the old answers.
    ask2 = _held_read_index(net, "n2", 6)
    _deliver_only(net, list(answers))
    assert [r.request_id for r in net.reads["n2"]] == [5]
    n1.step(ask2)
    net.flush()
    assert [r.request_id for r in net.reads["n2"]] == [5, 6]
