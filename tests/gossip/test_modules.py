"""The protocol modules of the gossip core on their own: layering, membership events,
the delta log."""

from __future__ import annotations

import ast
import random
from pathlib import Path

from gossip.common import GossipConfig, Stats
from gossip.deltaflow import DeltaLog
from gossip.membership import MemberChanged, Membership
from gossip.messages import ALIVE, DEAD, Ack, Member, Message, Ping

GOSSIP = Path(__file__).resolve().parents[2] / "gossip"
# each module may import only the ones before it (no circles; the core coordinates)
LAYERS = ["common", "membership", "deltaflow", "collection", "antientropy", "core"]


def _gossip_imports(module: str) -> set[str]:
    tree = ast.parse((GOSSIP / f"{module}.py").read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m.split(".")[1] for m in out if m.startswith("gossip.")} | {
        "harness" for m in out if m.split(".")[0] == "harness"
    }


def test_protocol_modules_are_layered() -> None:
    for i, module in enumerate(LAYERS):
        imported = _gossip_imports(module)
        assert "harness" not in imported
        later = imported & set(LAYERS[i:])
        assert not later, f"gossip.{module} imports {later}"


def _membership(events: list[MemberChanged], sent: list[Message]) -> Membership:
    return Membership(
        "a",
        ["b", "c"],
        GossipConfig(),
        random.Random(1),
        sent.append,
        events.append,
        now_ms=0,
        first_ping_ms=10**9,
    )


def test_membership_reports_changes_as_events() -> None:
    events: list[MemberChanged] = []
    sent: list[Message] = []
    m = _membership(events, sent)
    # c says b is dead
    m.on_ping(Ping("c", "a", 1, 0, (Member("b", DEAD, 0),)), 100)
    assert events == [MemberChanged("b", ALIVE, DEAD)]
    assert m.live_peers() == ["c"] and m.members["b"].since_ms == 100
    assert isinstance(sent[-1], Ack) and sent[-1].to == "c"
    # b refutes (alive with a higher incarnation): back from dead
    m.on_ack(Ack("b", "a", 7, "b", 1, ()), 200)
    assert events[-1] == MemberChanged("b", DEAD, ALIVE)
    assert m.member_states()["b"].incarnation == 1
    # no change, no event
    m.on_ack(Ack("b", "a", 8, "b", 1, ()), 300)
    assert len(events) == 2


def test_delta_log_cap_prune_and_relog() -> None:
    log = DeltaLog(1000, max_keys=3)
    for k in "wxyz":
        log.log_key(k)
    assert list(log.seqs) == ["x", "y", "z"] and log.floor == 1001  # w dropped by the cap
    log.log_key("x", holder="b")  # re-logged: moves to the end, b holds it
    assert log.seqs == {"y": 1003, "z": 1004, "x": 1005} and log.known == {"x": {"b"}}
    log.prune(1004)  # every peer acked up to 1004
    assert log.seqs == {"x": 1005} and log.seq == 1005
    log.unlog("x")
    assert not log.seqs and not log.known


def test_a_range_whose_given_up_batch_was_never_acknowledged_is_sent_again() -> None:
    """Soak seed 1026696: a flow had sent past ``acked`` with nothing in flight (the
    batch covering the gap had been given up by a go-back, and its late ack was lost;
    the range after it had been acknowledged). The go-back waits for a batch in flight,
    so the gap was never sent again: a tombstone in it never learnt its last holder and
    was never collected, and the replicas never agreed."""
    from gossip.crdt import Register, Value
    from gossip.deltaflow import Batch, DeltaFlow
    from gossip.hlc import Timestamp
    from gossip.messages import Deltas

    cfg = GossipConfig(deltas_resend_ms=1000)
    log = DeltaLog(1000, max_keys=100)
    tomb = Register(Timestamp(5, 0, "a"), None)
    state: dict[str, Value] = {"t": tomb, "k": Register(Timestamp(6, 0, "a"), b"v")}
    log.log_key("t")  # 1001: the tombstone, in the batch that was given up
    log.log_key("k")  # 1002: acknowledged
    sent: list[Message] = []
    holders = {"t": {"a"}}
    flow = DeltaFlow(cfg, "a", ["b"], state, log, holders, sent.append, Stats())
    fl = flow.flows["b"]
    fl.acked, fl.sent, fl.done = 1000, 1002, [(1001, 1002)]
    fl.late = {1001: Batch(1000, (("t", tomb.ts),), sent_ms=0)}  # its ack was lost
    flow.send_deltas("b", 500)
    assert not sent, "re-sent before the resend timeout"
    flow.send_deltas("b", 1500)
    deltas = [m for m in sent if isinstance(m, Deltas)]
    assert deltas and ("t", tomb) in deltas[0].entries
    # its ack makes b a holder of the tombstone and closes the gap
    flow.on_ack("b", deltas[0].seq, 1600)
    assert fl.acked == 1002 and holders["t"] == {"a", "b"}
