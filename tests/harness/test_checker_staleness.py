"""Stale reads and LWW losers on known histories."""

from __future__ import annotations

import dataclasses
import math
import random

from harness.checker.bench_lin import simulate_register_history
from harness.checker.staleness import lww_losers, stale_reads
from harness.history import Json, Operation, pair_operations


def op(
    f: str,
    start: int,
    end: int | None,
    value: Json = None,
    result: Json = None,
    *,
    type: str = "ok",
    key: str = "k",
    index: int = 0,
) -> Operation:
    return Operation(
        process=0,
        node=None,
        f=f,
        key=key,
        value=value,
        result=result,
        type="info" if end is None else type,  # type: ignore[arg-type]
        invoke_time=start,
        complete_time=math.inf if end is None else end,
        index=index,
    )


def w(s: int, e: int | None, v: str, **kw: object) -> Operation:
    return op("write", s, e, v, v, **kw)  # type: ignore[arg-type]


def r(s: int, e: int, v: str | None, **kw: object) -> Operation:
    return op("read", s, e, None, v, **kw)  # type: ignore[arg-type]


def test_stale_read_detected_with_lag() -> None:
    ops = [w(0, 10, "a"), w(20, 30, "b"), r(50, 60, "a"), r(50, 60, "b"), r(25, 35, "a")]
    res = stale_reads(ops)
    assert res.reads_checked == 3
    assert res.stale_count == 1 and res.per_key == {"k": 1}
    s = res.stale[0]
    assert s.read.invoke_time == 50 and s.superseded_by.value == "b" and s.lag_ns == 20
    assert res.max_lag_ns == 20 and res.examples(1) == (s,)


def test_overlapping_writes_are_not_ordered() -> None:
    # b was invoked before a completed: either may be last, reading a is not stale.
    ops = [w(0, 10, "a"), w(5, 30, "b"), r(50, 60, "a")]
    assert stale_reads(ops).stale_count == 0


def test_absent_reads() -> None:
    ops = [w(0, 10, "a"), r(20, 30, None)]
    assert stale_reads(ops).stale_count == 1
    ops = [w(0, 10, "a"), op("delete", 5, 15), r(20, 30, None)]
    assert stale_reads(ops).stale_count == 0  # the delete may be last
    ops = [op("delete", 0, 1), w(5, 10, "a"), r(20, 30, None)]
    assert stale_reads(ops).stale_count == 1


def test_info_writer_is_never_superseded() -> None:
    ops = [w(0, None, "a"), w(20, 30, "b"), r(50, 60, "a")]
    assert stale_reads(ops).stale_count == 0


def test_unexplained_and_local_reads() -> None:
    ops = [w(0, 10, "a"), r(20, 30, "zzz"), r(0, 1, "later"), w(5, 6, "later")]
    res = stale_reads(ops)
    assert [o.result for o in res.unexplained] == ["zzz", "later"]
    local = [w(0, 10, "a"), w(20, 30, "b"), op("read-local", 40, 41, None, "a")]
    assert stale_reads(local).reads_checked == 0
    assert stale_reads(local, read_fs=("read-local",)).stale_count == 1


def test_generated_linearizable_history_has_no_stale_reads() -> None:
    for seed in range(10):
        ops = pair_operations(simulate_register_history(random.Random(seed), 500, 3, 8, 0.05))
        res = stale_reads(ops)
        assert res.stale_count == 0, f"seed {seed}"
        assert res.unexplained == (), f"seed {seed}"
        # and a read made to return a superseded value is caught
        oks = [o for o in ops if o.f == "write" and o.type == "ok"]
        for i, rd in enumerate(ops):
            if rd.f != "read" or rd.type != "ok":
                continue
            before = [x for x in oks if x.key == rd.key and x.complete_time < rd.invoke_time]
            old = [a for a in before if any(a.complete_time < b.invoke_time for b in before)]
            if old:
                bad = list(ops)
                bad[i] = dataclasses.replace(rd, result=old[0].value)
                assert stale_reads(bad).stale_count == 1, f"seed {seed}"
                break


def test_lww_losers() -> None:
    ops = [
        w(0, 10, "old", index=1),  # precedes the winner: superseded
        w(20, 40, "win", index=2),
        w(30, 50, "conc", index=3),  # concurrent with the winner: LWW loser
        w(60, 70, "late", index=4),  # after the winner, yet lost
        r(55, 56, "conc"),
        w(80, 90, "failed", type="fail", index=5),
    ]
    res = lww_losers(ops, {"k": "win"})
    assert res.acknowledged == 4
    assert [o.value for o in res.losers] == ["conc"]
    assert [o.value for o in res.lost] == ["late"]
    assert res.superseded == 1
    assert res.per_key == {"k": 2}
    assert res.observed == frozenset({3})


def test_lww_final_absent_and_unexplained() -> None:
    ops = [w(0, 10, "a", index=1), op("delete", 5, 20, index=2), w(30, 40, "b", index=3)]
    res = lww_losers(ops, {"k": None})
    assert [o.value for o in res.losers] == ["a"] and [o.value for o in res.lost] == ["b"]
    res = lww_losers([w(0, 10, "a")], {"k": "ghost"})
    assert res.unexplained_finals == ("k",)
    res = lww_losers([w(0, 10, "a")], {"k": None})  # no delete: initial state "won"
    assert len(res.lost) == 1
