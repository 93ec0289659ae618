"""Divergence by what differs: lag per node, differing keys, time to converge, LWW discards."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from caplab.v1 import kv_pb2
from harness.divergence import (
    LagPoint,
    differing_keys,
    dump_views,
    final_register_values,
    lag_series,
    lww_discards,
    time_to_converge,
)
from harness.history import Hlc, Json, Operation, pair_operations, read_history

S = 1_000_000_000  # ns per second


def op(
    f: str,
    start_s: float,
    end_s: float | None,
    value: Json = None,
    *,
    key: str = "k",
    node: str = "n1",
    process: int = 0,
    type: str = "ok",
    result: Json = None,
    hlc: Hlc | None = None,
    log_index: int | None = None,
    side: str | None = None,
) -> Operation:
    return Operation(
        process=process,
        node=node,
        f=f,
        key=key,
        value=value,
        result=result,
        type=type,  # type: ignore[arg-type]
        invoke_time=int(start_s * S),
        complete_time=math.inf if end_s is None or type == "info" else int(end_s * S),
        hlc=hlc,
        log_index=log_index,
        side=side,
    )


def sample(t_s: float, **fields: Any) -> dict[str, Any]:
    return {"time_ns": int(t_s * S), "digests": {}, **fields}


# -- raft: applied_index against the writes' log indexes -------------------------------------
RAFT_OPS = [
    op("write", i - 0.1, float(i), f"v{i}", log_index=i, node="n1" if i % 2 else "n2")
    for i in range(1, 7)
] + [
    op("read", 0.2, 0.3, result=None),  # reads are not writes
    op("write", 1.0, None, "lost", type="info"),  # indeterminate: not acknowledged
    op("incr", 6.1, 6.2, 3, key="c", log_index=7),
]


def test_raft_lag_rises_while_a_node_is_cut_off_and_falls_after() -> None:
    samples = [
        sample(0.5, applied={"n1": 0, "n2": 0}, differing_keys=0),
        sample(3.5, applied={"n1": 3, "n2": 1, "n3": None}),
        sample(6.5, applied={"n1": 7, "n2": 1}, differing_keys=2),
        sample(8.0, applied={"n1": 7, "n2": 7}, differing_keys=0),
        sample(8.1),  # a sample without applied indexes gives no point
    ]
    points = lag_series("raft", RAFT_OPS, samples)
    assert [p.t_s for p in points] == [0.5, 3.5, 6.5, 8.0]
    assert [dict(p.missing) for p in points] == [
        {"n1": 0, "n2": 0},
        {"n1": 0, "n2": 2},  # writes 2 and 3 (n3 did not answer: absent)
        {"n1": 0, "n2": 6},  # writes 2..6 and the increment
        {"n1": 0, "n2": 0},
    ]
    # the oldest write n2 misses is write 2, completed at 2.0 s
    assert points[1].oldest_ms == {"n1": 0.0, "n2": pytest.approx(1500.0)}
    assert points[2].oldest_ms["n2"] == pytest.approx(4500.0)
    assert [p.differing_keys for p in points] == [0, None, 2, 0]
    assert points[2].max_missing == 6 and points[0].max_oldest_ms == 0.0


def test_time_to_converge_counts_only_writes_acknowledged_before_the_heal() -> None:
    samples = [
        sample(5.5, applied={"n1": 5, "n2": 1}),
        # n2 misses only write 6 (completed at 6.0 s, after the heal at 5.2 s): converged
        sample(6.5, applied={"n1": 7, "n2": 5}),
        sample(7.0, applied={"n1": 7, "n2": 7}),
    ]
    points = lag_series("raft", RAFT_OPS, samples)
    assert points[1].missing["n2"] == 2
    assert time_to_converge(points, 5.2) == pytest.approx(1.3)
    # ... while with the heal after write 6, n2 has seen everything only at 7.0 s
    assert time_to_converge(points, 6.05) == pytest.approx(0.95)
    # a sample some node did not answer cannot show convergence; never converged: None
    partial = [
        LagPoint(t_s=9.0, missing={"n1": 0}, oldest_ms={"n1": 0.0}, differing_keys=None),
        LagPoint(
            t_s=9.5,
            missing={"n1": 0, "n2": 4},
            oldest_ms={"n1": 0.0, "n2": 4000.0},
            differing_keys=1,
        ),
    ]
    assert time_to_converge(partial, 8.0) is None
    assert time_to_converge([], 8.0) is None


def test_old_raft_histories_without_log_index_count_nothing() -> None:
    ops = [op("write", 0.0, 1.0, "v")]
    points = lag_series("raft", ops, [sample(2.0, applied={"n1": 0})])
    assert points[0].missing == {"n1": 0}


# -- gossip: the Dump's timestamps and counter components ---------------------------------
def test_gossip_register_seen_through_a_dominating_timestamp() -> None:
    ops = [
        op("write", 0.9, 1.0, "a", hlc=(100, 0, "n1")),
        op("write", 1.9, 2.0, "b", hlc=(200, 0, "n2"), node="n2"),
        op("write", 2.5, 4.0, "c", hlc=(300, 0, "n1")),  # completes after the sample
        op("delete", 0.5, 0.6, key="gone", hlc=(50, 1, "n3"), node="n3"),
    ]
    seen = {
        "n1": {"k": [100, 0, "n1"]},  # misses b; "gone" absent: tombstone collected
        "n2": {"k": [200, 0, "n2"], "gone": [50, 1, "n3"]},  # has b, which dominates a
        "n3": {"k": [250, 7, "n3"]},  # a later (unacknowledged) write dominates both
        "n4": {},  # has nothing of k
    }
    points = lag_series("gossip", ops, [sample(3.0, seen=seen, differing_keys=1)])
    (p,) = points
    assert p.missing == {"n1": 1, "n2": 0, "n3": 0, "n4": 2}
    assert p.oldest_ms["n1"] == pytest.approx(1000.0)  # b, completed at 2.0 s
    assert p.oldest_ms["n4"] == pytest.approx(2000.0)  # a, completed at 1.0 s
    assert p.oldest_ms["n2"] == 0.0 and p.differing_keys == 1


def test_gossip_counters_per_origin_component() -> None:
    ops = [
        op("incr", 0.8, 1.0, 2, key="c", node="n1"),
        op("incr", 1.8, 2.0, 3, key="c", node="n1", process=1),
        op("incr", 1.4, 1.5, 5, key="c", node="n2", process=2),
        op("incr", 1.6, 1.7, -4, key="c", node="n2", process=3),
        op("incr", 1.0, None, 9, key="c", node="n3", type="info"),  # not acknowledged
    ]
    seen = {
        "n1": {"c": {"p": {"n1": 5}}},  # misses both of n2's increments
        # n2's components after it lost its data ("n2/1") count as n2's
        "n3": {"c": {"p": {"n1": 2, "n2": 1, "n2/1": 4}, "n": {"n2": 4}}},
        "n4": {"c": {"p": {"n1": 5, "n2/1": 5}, "n": {"n2/1": 4}}},
    }
    (p,) = lag_series("gossip", ops, [sample(2.5, seen=seen)])
    # n3 has n1's first increment (2 <= 2) but not the second (5 > 2); n2's +5 and -4 yes
    assert p.missing == {"n1": 2, "n3": 1, "n4": 0}
    assert p.oldest_ms["n1"] == pytest.approx(1000.0)  # n2's +5 completed at 1.5 s
    assert p.oldest_ms["n3"] == pytest.approx(500.0)  # n1's +3 completed at 2.0 s


def test_gossip_lag_rises_during_a_partition_and_falls_after() -> None:
    writes = [
        op("write", t - 0.05, t, f"v{i}", node=node, hlc=(int(t * 1000), 0, node), process=i)
        for i, (t, node) in enumerate([(1.0, "n1"), (12.0, "n1"), (14.0, "n2"), (27.0, "n1")])
    ]
    both: dict[str, Json] = {"k": [1000, 0, "n1"]}
    samples = [
        sample(2.0, seen={"n1": both, "n2": both}, differing_keys=0),
        sample(15.0, seen={"n1": {"k": [12000, 0, "n1"]}, "n2": {"k": [14000, 0, "n2"]}}),
        sample(28.0, seen={"n1": {"k": [27000, 0, "n1"]}, "n2": {"k": [27000, 0, "n1"]}}),
    ]
    points = lag_series("gossip", writes, samples)
    assert [dict(p.missing) for p in points] == [
        {"n1": 0, "n2": 0},
        {"n1": 1, "n2": 0},  # n1 has not seen n2's write at 14 s; n2's 14000 dominates 12000
        {"n1": 0, "n2": 0},
    ]
    assert points[1].oldest_ms["n1"] == pytest.approx(1000.0)
    assert time_to_converge(points, 25.0) == pytest.approx(3.0)


def _register(key: str, value: bytes, hlc: Hlc, tombstone: bool = False) -> kv_pb2.DumpEntry:
    return kv_pb2.DumpEntry(
        key=key,
        type=kv_pb2.VALUE_TYPE_REGISTER,
        value=value,
        tombstone=tombstone,
        hlc=kv_pb2.HlcTimestamp(wall_ms=hlc[0], logical=hlc[1], node_id=hlc[2]),
    )


def _counter(key: str, p: dict[str, int], n: dict[str, int] | None = None) -> kv_pb2.DumpEntry:
    n = n or {}
    return kv_pb2.DumpEntry(
        key=key,
        type=kv_pb2.VALUE_TYPE_COUNTER,
        counter=sum(p.values()) - sum(n.values()),
        counter_exact=str(sum(p.values()) - sum(n.values())),
        counter_increments=p,
        counter_increments_exact={c: str(v) for c, v in p.items()},
        counter_decrements=n,
        counter_decrements_exact={c: str(v) for c, v in n.items()},
    )


def test_dumps_give_the_views_and_the_differing_keys() -> None:
    n1 = [
        _register("a", b"x", (5, 0, "n1")),
        _register("d", b"", (6, 0, "n1"), tombstone=True),
        _counter("c", {"n1": 3}),
    ]
    n2 = [_register("a", b"x", (5, 0, "n1")), _counter("c", {"n1": 3, "n2": 1}, {"n2": 1})]
    n3 = [_register("a", b"y", (7, 0, "n3")), _counter("c", {"n1": 3})]
    # a: y on n3; c: value 3 everywhere (components differ, the content does not);
    # d: a tombstone on n1 is as absent as on n2 and n3
    assert differing_keys({"n1": n1, "n2": n2, "n3": n3}) == 1
    assert differing_keys({"n1": n1, "n2": n2}) == 0
    assert differing_keys({"n1": n1, "n2": n2[:1]}) == 1  # c missing on n2
    views = {"n1": dump_views(n1), "n2": dump_views(n2)}
    assert views["n1"] == {"a": [5, 0, "n1"], "d": [6, 0, "n1"], "c": {"p": {"n1": 3}}}
    assert views["n2"]["c"] == {"p": {"n1": 3, "n2": 1}, "n": {"n2": 1}}
    ops = [
        op("write", 0.1, 0.2, "x", key="a", hlc=(5, 0, "n1")),
        op("delete", 0.1, 0.2, key="d", hlc=(6, 0, "n1")),
        op("incr", 0.1, 0.2, 1, key="c", node="n2", process=1),
    ]
    (p,) = lag_series("gossip", ops, [sample(1.0, seen=views)])
    assert p.missing == {"n1": 1, "n2": 0}  # n1: the increment on n2; n2: d was collected


# -- LWW discards -----------------------------------------------------------------------
def _partition_history(*, heal_write: bool) -> list[Operation]:
    ops = [
        op("write", 10.2, 10.3, "b0", key="lww0", node="n4", side="minority", hlc=(10300, 0, "n4")),
        op("write", 11.0, 11.1, "a1", key="lww0", node="n1", side="majority", hlc=(11100, 0, "n1")),
        op("write", 12.0, 12.1, "b1", key="lww0", node="n4", side="minority", hlc=(12100, 0, "n4")),
        op("write", 13.0, 13.1, "a2", key="lww0", node="n2", side="majority", hlc=(13100, 0, "n2")),
        op("write", 12.05, None, "b2", key="lww0", node="n5", side="minority", type="info"),
        op("write", 14.0, 14.1, "z", key="lww1", node="n1", side="majority", hlc=(14100, 0, "n1")),
    ]
    if heal_write:  # after the heal (no side): supersedes every write before it
        ops.append(op("write", 30.0, 30.1, "h", key="lww0", node="n3", hlc=(30100, 0, "n3")))
    return ops


def test_lww_discards_the_losing_sides_last_write() -> None:
    ops = _partition_history(heal_write=False)
    (d,) = lww_discards(ops, {"lww0": "a2", "lww1": "z"})
    assert (d.key, d.lost_value, d.lost_hlc, d.lost_node, d.lost_side) == (
        "lww0",
        "b1",
        (12100, 0, "n4"),
        "n4",
        "minority",
    )
    assert (d.winner_value, d.winner_hlc, d.winner_node, d.winner_side) == (
        "a2",
        (13100, 0, "n2"),
        "n2",
        "majority",
    )
    assert d.lost_at_s == pytest.approx(12.1) and d.winner_at_s == pytest.approx(13.1)
    text = d.describe()
    assert "lww0" in text and "'b1'" in text and "'a2'" in text and "12100.0@n4" in text
    js = d.to_json()
    assert js["lost_hlc"] == [12100, 0, "n4"] and js["winner_value"] == "a2"
    assert js["description"] == text


def test_lww_discards_the_majoritys_write_when_the_minority_wins() -> None:
    ops = _partition_history(heal_write=False)
    ops.append(
        op("write", 13.6, 13.7, "b3", key="lww0", node="n5", side="minority", hlc=(13700, 0, "n5"))
    )
    (d,) = lww_discards(ops, {"lww0": "b3"})
    assert (d.lost_value, d.lost_side, d.winner_value, d.winner_side) == (
        "a2",
        "majority",
        "b3",
        "minority",
    )


def test_no_discard_when_a_later_write_could_see_them() -> None:
    assert lww_discards(_partition_history(heal_write=True), {"lww0": "h", "lww1": "z"}) == []
    # no partition: a plain sequence of writes, each superseded by the next
    seq = [op("write", i, i + 0.5, f"v{i}", hlc=(i * 1000, 0, "n1")) for i in range(3)]
    assert lww_discards(seq, {"k": "v2"}) == []
    # an unknown final value (nobody wrote it) or a key without writes: nothing to say
    assert lww_discards(seq, {"k": "other", "nokey": None}) == []


def test_concurrent_writes_without_partition_lose_to_the_later_timestamp() -> None:
    ops = [
        op("write", 1.0, 2.0, "x", node="n1", hlc=(1500, 0, "n1")),
        op("write", 1.1, 2.1, "y", node="n2", hlc=(1600, 0, "n2"), process=1),
    ]
    (d,) = lww_discards(ops, {"k": "y"})
    assert (d.lost_value, d.winner_value, d.lost_side) == ("x", "y", None)


def test_final_register_values_take_the_most_common_final_read() -> None:
    final = 1_001_000
    ops = [
        op("read", 40.0, 40.1, key="lww0", process=final, result="a2"),
        op("read", 40.0, 40.1, key="lww0", process=final + 1, result="a2"),
        op("read", 40.0, 40.1, key="lww0", process=final + 2, result="b1"),
        op("read", 40.0, 40.1, key="lww1", process=final, result=None),
        op("read", 20.0, 20.1, key="lww2", process=3, result="client read: ignored"),
    ]
    assert final_register_values(ops) == {"lww0": "a2", "lww1": None}


# -- a real run: the sampler's fields feed the series ---------------------------------------
@pytest.mark.integration
@pytest.mark.timeout(180)
async def test_a_partitioned_run_shows_lag_and_discards(tmp_path: Path) -> None:
    from harness.runner import read_digests, run_async
    from harness.scenario import Fault, Scenario

    scenario = Scenario(
        name="lag",
        duration=6,
        nodes=3,
        workload="both",
        rate=60,
        conflict_keys=2,
        seed=3,
        faults=(Fault(1.5, "partition", shape="majority-minority"), Fault(4.5, "heal")),
    )
    result = await run_async(scenario, ("raft", "gossip"), tmp_path, secure=False)
    for store, res in result.stores.items():
        samples = read_digests(tmp_path / store / "digests.jsonl")
        ops = pair_operations(read_history(tmp_path / store / "history.jsonl"))
        points = lag_series(store, ops, samples)
        heal = next(f for f in res["timings"]["faults"] if f["action"] == "heal")["done_s"]
        during = [p for p in points if 2.5 <= p.t_s < heal]
        assert during and max(p.max_missing for p in during) > 0, store
        assert any(p.differing_keys for p in during), store
        converged = time_to_converge(points, heal)
        assert converged is not None and converged < 10, (store, converged)
        assert res["valid"] is True, (store, res["checkers"])
        if store == "gossip":
            assert all("seen" in s for s in samples if "dump_ms" in s)
            finals = final_register_values(ops)
            assert {"lww0", "lww1"} <= set(finals)
            discards = lww_discards(ops, finals)
            # each conflict key written on both sides: one side's last writes were discarded
            sides = {
                k: {o.side for o in ops if o.key == k and o.f == "write" and o.type == "ok"}
                for k in ("lww0", "lww1")
            }
            both_sides = {k for k, s in sides.items() if s == {"majority", "minority"}}
            assert both_sides, sides
            assert both_sides <= {d.key for d in discards}
        else:
            assert all("applied" in s for s in samples)


def test_a_later_write_of_unknown_outcome_on_the_same_side_is_no_discard() -> None:
    """b2 (same side, invoked after b1 completed, timed out) won: b1 was overwritten in
    order, not discarded by LWW (it was reported as discarded 'for' b2)."""
    ops = [
        op("write", 12.0, 12.1, "b1", node="n4", side="minority", hlc=(12100, 0, "n4")),
        op("write", 13.5, None, "b2", node="n4", side="minority", type="info"),
    ]
    assert lww_discards(ops, {"k": "b2"}) == []
    # a concurrent write of unknown outcome that won, from the other side: a discard,
    # described without a timestamp it does not have
    other = [ops[0], op("write", 12.05, None, "a1", node="n1", side="majority", type="info")]
    (d,) = lww_discards(other, {"k": "a1"})
    assert d.lost_value == "b1" and d.winner_hlc is None
    assert "no timestamp" not in d.describe() and "outcome was unknown" in d.describe()
