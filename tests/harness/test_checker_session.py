"""Session guarantees, bounded staleness and eventual convergence on hand-made histories."""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import pytest

from harness.checker.bench_lin import simulate_register_history
from harness.checker.session import (
    GUARANTEES,
    GuaranteeResult,
    bounded_staleness,
    check_sessions,
    consistent_prefix,
    eventual,
    monotonic_reads,
    monotonic_writes,
    read_my_writes,
    writes_follow_reads,
)
from harness.history import HistoryWriter, Hlc, Json, Operation, pair_operations, read_history

_index = itertools.count()
MS = 1_000_000


def op(
    process: int,
    f: str,
    start: int,
    end: int | None,
    value: Json = None,
    result: Json = None,
    *,
    key: str = "k",
    type: str = "ok",
    log: int | None = None,
    hlc: Hlc | None = None,
    node: str = "n1",
    client: int | None = None,
) -> Operation:
    return Operation(
        process=process,
        node=node,
        f=f,
        key=key,
        value=value,
        result=result,
        type="info" if end is None else type,  # type: ignore[arg-type]
        invoke_time=start,
        complete_time=math.inf if end is None else end,
        index=next(_index),
        log_index=log,
        hlc=hlc,
        client=client,
    )


def w(p: int, s: int, e: int | None, v: str, **kw: object) -> Operation:
    return op(p, "write", s, e, v, v, **kw)  # type: ignore[arg-type]


def r(p: int, s: int, e: int, v: str | None, **kw: object) -> Operation:
    return op(p, "read", s, e, None, v, **kw)  # type: ignore[arg-type]


def delete(p: int, s: int, e: int | None, **kw: object) -> Operation:
    return op(p, "delete", s, e, **kw)  # type: ignore[arg-type]


def h(ms: int, logical: int = 0, node: str = "n1") -> Hlc:
    return (ms, logical, node)


def verdicts(ops: list[Operation], bound_ms: float = 0.0) -> dict[str, bool]:
    return {g: res.valid for g, res in check_sessions(ops, bound_ms=bound_ms).items()}


ALL_VALID = {g: True for g in GUARANTEES if g != "eventual"}


def expect(ops: list[Operation], *invalid: str, bound_ms: float = 0.0) -> None:
    assert verdicts(ops, bound_ms) == {**ALL_VALID, **dict.fromkeys(invalid, False)}


# --------------------------------------------------------------------------- valid histories


def _valid(order: str) -> list[Operation]:
    def stamp(i: int, node: str = "n1") -> dict[str, object]:
        return {"log": i} if order == "log" else {"hlc": h(100 * i, 0, node)}

    return [
        w(0, 0, 10, "a1", key="a", **stamp(1)),
        r(1, 20, 30, "a1", key="a", node="n2"),
        w(1, 40, 50, "b1", key="b", node="n2", **stamp(2, "n2")),
        r(1, 60, 70, "b1", key="b", node="n2"),
        r(0, 60, 70, None, key="b"),  # b1 completed at 50: a stale read (10 ns)
        r(0, 80, 90, "b1", key="b"),
        w(0, 100, 110, "a2", key="a", **stamp(3)),
        delete(0, 120, 130, key="b", **stamp(4)),
        r(0, 140, 150, None, key="b"),
        r(0, 140 + 20, 170, "a2", key="a"),
    ]


@pytest.mark.parametrize("order", ["log", "hlc"])
def test_valid_histories_pass_every_guarantee(order: str) -> None:
    ops = _valid(order)
    expect(ops, "bounded_staleness", bound_ms=0.0)
    expect(ops, bound_ms=1.0)
    res = check_sessions(ops, bound_ms=1.0)
    assert {x.order for x in res.values()} == {"log_index" if order == "log" else "hlc"}
    assert res["read_my_writes"].checked == 6 and res["monotonic_writes"].checked == 4
    assert all(not x.unexplained and x.violation_count == 0 for x in res.values())


def test_same_shape_for_all_results() -> None:
    ops = _valid("log")
    res = check_sessions(ops, bound_ms=0.0, final_values={"n1": {"a": "a2"}, "n2": {"a": "a2"}})
    assert list(res) == list(GUARANTEES)
    assert all(isinstance(x, GuaranteeResult) for x in res.values())
    for x in res.values():
        line = x.summary()
        assert line.startswith(x.guarantee + ": ") and "\n" not in line
    (v,) = res["bounded_staleness"].violations
    assert "\n" not in v.describe() and v.describe().startswith("bounded_staleness: process 0")
    with pytest.raises(TypeError):
        GuaranteeResult(  # keyword-only
            "x",
            True,
            (),
            0,
            (),
            0,
            "none",  # type: ignore[misc]
        )


# --------------------------------------------------------------------------- one guarantee each


@pytest.mark.parametrize("order", ["log", "hlc"])
def test_monotonic_reads_violation_with_read_my_writes_intact(order: str) -> None:
    s1, s2 = ({"log": 1}, {"log": 2}) if order == "log" else ({"hlc": h(1)}, {"hlc": h(2)})
    ops = [
        w(0, 0, 10, "v1", **s1),
        w(2, 5, 100, "v2", **s2),  # ordered after v1, acknowledged late
        r(1, 20, 30, "v2"),
        r(1, 40, 50, "v1"),  # older than what p1 read before; not stale in real time
    ]
    # consistent_prefix includes monotonic reads of one key (module docstring).
    expect(ops, "monotonic_reads", "consistent_prefix")
    (v,) = monotonic_reads(ops).violations
    assert v.process == 1 and v.key == "k" and [o.result for o in v.ops] == ["v2", "v1"]
    assert "read -> 'v1'" in v.describe() and "read -> 'v2'" in v.describe()
    (c,) = consistent_prefix(ops).violations
    assert [o.value if o.f == "write" else o.result for o in c.ops] == ["v2", "v2", "v1"]


def test_a_client_is_one_session_across_its_process_ids() -> None:
    """After an ``info`` the workload's client goes on under a new process id, with the same
    session token: the session checkers follow the client, not the process (review)."""
    ops = [
        w(0, 0, 10, "v1", log=10, client=0),
        w(0, 20, None, "v2", client=0),  # info: the client moves on as process 35
        r(35, 5_000, 5_010, None, client=0),  # its own ok write v1 is missing
    ]
    (v,) = read_my_writes(ops).violations
    assert [o.process for o in v.ops] == [0, 35]
    anonymous = [w(0, 0, 10, "v1", log=10), w(0, 20, None, "v2"), r(35, 5_000, 5_010, None)]
    assert read_my_writes(anonymous).valid  # without the client: two sessions


def test_monotonic_reads_is_per_session() -> None:
    ops = [w(0, 0, 10, "v1", log=1), w(2, 5, 100, "v2", log=2), r(1, 20, 30, "v2")]
    ops.append(r(3, 40, 50, "v1"))  # another process: no session guarantee broken
    expect(ops)


@pytest.mark.parametrize("order", ["log", "hlc"])
def test_read_my_writes_violation_with_monotonic_reads_intact(order: str) -> None:
    s1, s2 = ({"log": 1}, {"log": 2}) if order == "log" else ({"hlc": h(1)}, {"hlc": h(2)})
    ops = [
        w(0, 0, 5, "v1", **s1),
        w(1, 0, 10, "v2", **s2),  # concurrent with v1 in real time, ordered after it
        r(1, 20, 30, "v1"),  # p1 does not see its own write
    ]
    # (10 ns stale: the store ordered v2 after v1 and v2 completed before the read)
    expect(ops, "read_my_writes", bound_ms=1.0)
    assert not bounded_staleness(ops, 0.0).valid
    (v,) = read_my_writes(ops).violations
    assert v.process == 1 and [o.f for o in v.ops] == ["write", "read"]
    assert "older than its own earlier write 'v2'" in v.reason


def test_read_my_writes_absent_after_own_write_and_own_delete() -> None:
    ops = [w(1, 0, 10, "v1", hlc=h(5)), r(1, 20, 30, None)]
    assert not read_my_writes(ops).valid
    ops = [w(1, 0, 10, "v1", hlc=h(5)), delete(1, 15, 18, hlc=h(6)), r(1, 20, 30, None)]
    assert read_my_writes(ops).valid
    # an ok delete ordered before the write does not explain the absent read
    ops = [delete(0, 0, 3, hlc=h(1)), w(1, 5, 10, "v1", hlc=h(5)), r(1, 20, 30, None)]
    assert not read_my_writes(ops).valid


def test_monotonic_writes_violation_per_key_gossip() -> None:
    ops = [
        w(1, 0, 10, "v1", hlc=h(100, 0, "n1"), node="n1"),
        w(1, 20, 30, "v2", hlc=h(90, 0, "n2"), node="n2"),  # n2's clock is behind: v2 loses
    ]
    expect(ops, "monotonic_writes")
    (v,) = monotonic_writes(ops).violations
    assert [o.value for o in v.ops] == ["v1", "v2"] and "ordered before the earlier" in v.reason


def test_monotonic_writes_across_keys_only_with_log_index() -> None:
    ops = [w(1, 0, 10, "a1", key="a", log=5), w(1, 20, 30, "b1", key="b", log=3)]
    expect(ops, "monotonic_writes")
    ops = [
        w(1, 0, 10, "a1", key="a", hlc=h(100, 0, "n1")),
        w(1, 20, 30, "b1", key="b", hlc=h(90, 0, "n2")),
    ]
    expect(ops)  # HLCs of different keys are not a propagation order


def test_monotonic_writes_vacuous_in_real_time_fallback() -> None:
    ops = [w(1, 0, 10, "v1"), w(1, 20, 30, "v2"), w(1, 40, None, "v3")]
    res = monotonic_writes(ops)
    assert res.valid and res.order == "real-time" and res.checked == 2


def test_writes_follow_reads_violation_gossip() -> None:
    ops = [
        w(0, 0, 10, "v1", hlc=h(100, 0, "n1")),
        r(1, 20, 30, "v1", node="n1"),
        w(1, 40, 50, "v2", hlc=h(90, 0, "n2"), node="n2"),  # placed before what it followed
    ]
    expect(ops, "writes_follow_reads")
    (v,) = writes_follow_reads(ops).violations
    assert [o.f for o in v.ops] == ["read", "write"]


def test_writes_follow_reads_across_keys_only_with_log_index() -> None:
    ops = [w(0, 0, 10, "a1", key="a", log=7), r(1, 20, 30, "a1", key="a")]
    ops.append(w(1, 40, 50, "b1", key="b", log=4))
    expect(ops, "writes_follow_reads")
    ops = [w(0, 0, 10, "a1", key="a", hlc=h(100)), r(1, 20, 30, "a1", key="a")]
    ops.append(w(1, 40, 50, "b1", key="b", hlc=h(90, 0, "n2")))
    expect(ops)


@pytest.mark.parametrize("order", ["log", "hlc"])
def test_consistent_prefix_violation_with_monotonic_reads_intact(order: str) -> None:
    sx, sy = ({"log": 1}, {"log": 2}) if order == "log" else ({"hlc": h(1)}, {"hlc": h(2)})
    ops = [
        w(0, 0, 100, "x1", key="x", **sx),  # ordered first, acknowledged late
        w(2, 5, 30, "y1", key="y", **sy),
        r(1, 40, 50, "y1", key="y"),
        r(1, 60, 70, None, key="x"),  # sees y1 but not x1, ordered before it: a gap
    ]
    expect(ops, "consistent_prefix")
    res = consistent_prefix(ops)
    (v,) = res.violations
    assert [o.key for o in v.ops] == ["y", "x", "x"] and v.ops[1].value == "x1"
    assert res.checked == 2 and res.skipped == 0


@pytest.mark.parametrize("order", ["log", "hlc"])
def test_consistent_prefix_is_judged_per_replica(order: str) -> None:
    """Terry's consistent prefix promises each read some prefix, not a growing one: a
    session that moves to a replica further behind may see less (a monotonic-reads
    anomaly), but one replica must never show a gap."""
    sx, sy = ({"log": 1}, {"log": 2}) if order == "log" else ({"hlc": h(1)}, {"hlc": h(2)})
    ops = [
        w(0, 0, 10, "x1", key="x", **sx),
        w(2, 15, 30, "y1", key="y", **sy),
        r(1, 40, 50, "y1", key="y", node="n1"),
        r(1, 60, 70, None, key="x", node="n2"),  # n2 is further behind: a prefix still
    ]
    assert consistent_prefix(ops).valid and consistent_prefix(ops).checked == 2
    ops.append(r(1, 80, 90, "y1", key="y", node="n2"))  # n2 has y1 now ...
    ops.append(r(1, 100, 110, None, key="x", node="n2"))  # ... but not x1 before it: a gap
    (v,) = consistent_prefix(ops).violations
    assert [o.index for o in v.ops] == [ops[4].index, ops[0].index, ops[5].index]


def test_bounded_staleness_follows_the_store_order() -> None:
    """Last-writer-wins keeps a value over a later write stamped older (a skewed clock):
    reading it is not stale, however late the other write completed."""
    ops = [
        w(0, 0, 10, "v1", hlc=h(1000)),
        w(2, 20, 30, "v2", hlc=h(500, 0, "n5")),  # later in real time, older stamp: loses
        r(1, 5_000, 5_010, "v1"),
    ]
    res = bounded_staleness(ops, 0.0)
    assert res.valid and res.staleness is not None and res.staleness.max_ms == 0.0
    real_time = [w(0, 0, 10, "v1"), w(2, 20, 30, "v2"), r(1, 5_000, 5_010, "v1")]
    assert not bounded_staleness(
        real_time, 0.0
    ).valid  # without stamps: certainly overwritten before the read


def test_bounded_staleness_counts_a_write_ordered_after_the_source_though_they_overlapped() -> None:
    """The log placed b after a although b was invoked before a completed: once b completed,
    a read of a is stale (review: the real-time rule alone said 0 ms)."""
    ops = [
        w(0, 0, 50 * MS, "a", log=1),
        w(2, 10 * MS, 20 * MS, "b", log=2),
        r(1, 1000 * MS, 1001 * MS, "a"),
    ]
    res = bounded_staleness(ops, 0.0)
    assert not res.valid and res.staleness is not None
    assert res.staleness.max_ms == pytest.approx(980.0)
    assert res.staleness.versions_behind_max == 1


def test_real_time_staleness_ignores_last_writer_wins() -> None:
    """A later write stamped older (a skewed clock) loses under LWW, so reading the earlier
    value is no staleness by the store's order, but it is not linearizable."""
    ops = [
        w(0, 0, 1 * MS, "a", hlc=h(10_000)),
        w(2, 10 * MS, 11 * MS, "b", hlc=h(8_010, 0, "n5")),
        r(1, 500 * MS, 501 * MS, "a"),
    ]
    assert bounded_staleness(ops, 0.0).valid
    res = bounded_staleness(ops, 0.0, store_order=False)
    assert not res.valid and res.staleness is not None
    assert res.staleness.max_ms == pytest.approx(489.0)


def test_consistent_prefix_skips_keys_without_store_order() -> None:
    ops = [w(0, 0, 10, "x1", key="x"), w(0, 20, 30, "y1", key="y")]
    ops += [r(1, 40, 50, "y1", key="y"), r(1, 60, 70, None, key="x")]
    res = consistent_prefix(ops)
    assert res.valid and res.checked == 0 and res.skipped == 2 and res.order == "real-time"


def test_bounded_staleness_and_its_distribution() -> None:
    ops = [
        w(0, 0, 10 * MS, "v1"),
        w(0, 20 * MS, 30 * MS, "v2"),
        w(0, 40 * MS, 50 * MS, "v3"),
        r(1, 35 * MS, 36 * MS, "v1"),  # v2 completed at 30: 5 ms stale, 1 behind
        r(1, 60 * MS, 61 * MS, "v1"),  # 30 ms stale, 2 behind
        r(2, 60 * MS, 61 * MS, "v2"),  # 10 ms stale, 1 behind
        r(3, 45 * MS, 61 * MS, "v2"),  # v3 not complete before the read began: fresh
        r(3, 70 * MS, 71 * MS, "v3"),
    ]
    res = bounded_staleness(ops, 8.0)
    assert not res.valid and res.checked == 5
    assert sorted(round(v.ops[-1].invoke_time / MS) for v in res.violations) == [60, 60]
    s = res.staleness
    assert s is not None
    assert s.staleness_ms == (5.0, 0.0, 30.0, 10.0, 0.0)  # history (invoke) order
    assert s.versions_behind == (1, 0, 2, 1, 0)
    assert (s.reads, s.stale, s.over_bound) == (5, 3, 2)
    assert (s.median_ms, s.p99_ms, s.max_ms) == (5.0, 30.0, 30.0)
    assert (s.versions_behind_median, s.versions_behind_max) == (1.0, 2)
    assert bounded_staleness(ops, 30.0).valid
    # monotonic reads etc. of these sessions are fine: p1 reads v1 twice, p3 v2 then v3
    assert monotonic_reads(ops).valid
    assert "30.000 ms stale" in " ".join(v.reason for v in res.violations)


def test_bounded_staleness_absent_and_deletes() -> None:
    ops = [w(0, 0, 10, "a"), r(1, 20, 30, None)]
    assert not bounded_staleness(ops, 0).valid
    ops = [w(0, 0, 10, "a"), delete(0, 5, 15), r(1, 20, 30, None)]
    assert bounded_staleness(ops, 0).valid  # the delete may be last
    ops = [delete(0, 0, 1), w(0, 5, 10, "a"), r(1, 20, 30, None)]
    res = bounded_staleness(ops, 0)
    assert not res.valid and res.staleness is not None and res.staleness.max_ms == 10 / MS


# --------------------------------------------------------------------------- info writes


def test_info_writes_are_never_blamed() -> None:
    # monotonic reads: the first value was written by an indeterminate write
    ops = [w(0, 0, 10, "v1", log=1), w(2, 5, None, "v2"), r(1, 20, 30, "v2"), r(1, 40, 50, "v1")]
    expect(ops)
    # read-my-writes: the older-looking value came from an indeterminate write
    ops = [w(0, 0, None, "v1"), w(1, 0, 10, "v2", log=2), r(1, 20, 30, "v1")]
    expect(ops)
    # absent after one's own write: an indeterminate delete may be what was read
    ops = [w(1, 0, 10, "v1", hlc=h(5)), delete(0, 12, None), r(1, 20, 30, None)]
    expect(ops)
    # consistent prefix: the value read on x may come from an indeterminate write after y1
    ops = [
        w(0, 0, 100, "x1", key="x", log=1),
        w(3, 2, None, "x2", key="x"),
        w(2, 5, 30, "y1", key="y", log=2),
        r(1, 40, 50, "y1", key="y"),
        r(1, 60, 70, "x2", key="x"),
    ]
    expect(ops)
    # staleness: an indeterminate source is never superseded
    ops = [w(0, 0, None, "a"), w(0, 20, 30, "b"), r(1, 50, 60, "a")]
    assert bounded_staleness(ops, 0).valid
    # an indeterminate write of one's own does not oblige later reads
    ops = [w(0, 0, 10, "v1", log=1), w(1, 20, None, "v2"), r(1, 40, 50, "v1")]
    expect(ops)


def test_info_write_in_real_time_fallback() -> None:
    ops = [w(0, 0, 10, "v1"), w(1, 20, 30, "v2"), r(1, 40, 50, "v1")]
    res = read_my_writes(ops)
    assert not res.valid and res.order == "real-time"
    ops = [w(0, 0, None, "v1"), w(1, 20, 30, "v2"), r(1, 40, 50, "v1")]
    assert read_my_writes(ops).valid
    ops = [w(0, 0, 25, "v1"), w(1, 20, 30, "v2"), r(1, 40, 50, "v1")]  # overlapping
    assert read_my_writes(ops).valid


# --------------------------------------------------------------------------- unexplained, misc


def test_unexplained_reads_are_reported_not_judged() -> None:
    ops = [
        w(1, 0, 10, "v1", log=1),
        r(1, 20, 30, "zzz"),  # nobody wrote it
        r(1, 40, 50, "later"),  # written only after the read returned
        w(0, 60, 70, "later", log=2),
        op(2, "write", 0, 5, "failed", "failed", type="fail"),
        r(1, 80, 90, "failed"),  # only a failed write wrote it
    ]
    for res in check_sessions(ops, bound_ms=0).values():
        assert res.valid
        assert [o.result for o in res.unexplained] == ["zzz", "later", "failed"]
    assert read_my_writes(ops).checked == 0


def test_nemesis_and_other_functions_are_ignored() -> None:
    nem = Operation(
        process="nemesis",
        node=None,
        f="partition",
        key=None,
        value=None,
        result=None,
        type="info",
        invoke_time=0,
        complete_time=math.inf,
    )
    ops = [nem, op(1, "incr", 0, 5, 1, 1, key="c"), w(1, 10, 20, "v1", log=1)]
    ops.append(op(1, "read-counter", 25, 30, None, 1, key="c"))
    ops.append(r(1, 40, 50, "v1"))
    expect(ops)
    assert read_my_writes(ops).checked == 1


def test_read_fs_selects_the_reads_judged() -> None:
    ops = [w(1, 0, 10, "v2", log=2), w(0, 0, 5, "v1", log=1)]
    ops.append(op(1, "read-local", 20, 30, None, "v1"))
    assert not read_my_writes(ops).valid
    assert read_my_writes(ops, read_fs=("read",)).valid


def test_cas_is_a_write() -> None:
    ops = [
        w(0, 0, 5, "v1", log=1),
        op(1, "cas", 10, 20, ["v1", "v2"], ["v1", "v2"], log=2),
        r(1, 30, 40, "v1"),
    ]
    expect(ops, "read_my_writes", "bounded_staleness")
    assert "cas 'v1'->'v2'" in read_my_writes(ops).violations[0].reason


# --------------------------------------------------------------------------- eventual


def test_eventual() -> None:
    ops = [w(0, 0, 10, "v1", key="a"), w(0, 20, 30, "v2", key="b")]
    res = eventual({"n1": {"a": "v1", "b": None}, "n2": {"a": "v1"}}, ops)
    assert res.valid and res.checked == 2
    res = eventual({"n1": {"a": "v1"}, "n2": {"a": "v2"}, "n3": {}})
    assert not res.valid
    (v,) = res.violations
    assert v.key == "a" and v.process is None
    assert (
        v.describe()
        == "eventual: key 'a': nodes disagree after quiescence: n1='v1', n2='v2', n3=absent"
    )
    res = eventual({"n1": {"a": "zzz"}, "n2": {"a": "zzz"}}, ops)
    assert not res.valid and "no operation wrote" in res.violations[0].reason
    assert eventual({"n1": {"a": "zzz"}, "n2": {"a": "zzz"}}).valid  # nothing to compare with
    assert eventual({}).valid


# --------------------------------------------------------------------------- round trip


class FakeClock:
    def __init__(self) -> None:
        self.t = 0

    def __call__(self) -> int:
        return self.t


def test_round_trip_from_a_history_file(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    clock = FakeClock()
    with HistoryWriter(path, clock=clock) as hw:
        hw.invoke(0, "write", "k", "v1", node="n1")
        clock.t += 1 * MS
        hw.invoke(2, "write", "k", "v2", node="n1")
        clock.t += 1 * MS
        hw.complete("ok", 0, "v1", log_index=1)
        hw.invoke(1, "read-local", "k", node="n3")
        clock.t += 1 * MS
        hw.complete("ok", 1, "v2")  # n3 already applied v2 (index 2)
        hw.invoke("nemesis", "partition", None, {"minority": ["n3"]})
        hw.complete("info", "nemesis", "done")
        hw.invoke(1, "read-local", "k", node="n2", side="minority")
        clock.t += 1 * MS
        hw.complete("ok", 1, "v1")  # n2 lags: older than what p1 saw
        hw.invoke(0, "write", "k", "v3", node="n1")
        clock.t += 100 * MS
        hw.complete("ok", 2, "v2", log_index=2)
        hw.complete("info", 0, "v3", error="timeout")
        hw.invoke(1, "read", "k", node="n1")
        clock.t += 1 * MS
        hw.complete("ok", 1, "v3")
    ops = pair_operations(read_history(path))
    res = check_sessions(ops, bound_ms=0.0, final_values={"n1": {"k": "v3"}, "n2": {"k": "v3"}})
    assert {g: x.valid for g, x in res.items()} == {
        **{g: True for g in GUARANTEES},
        # n3 then n2: each replica showed a prefix; going back across them is monotonic
        # reads' business, not consistent prefix's
        "monotonic_reads": False,
    }
    (v,) = res["monotonic_reads"].violations
    assert v.process == 1 and [o.node for o in v.ops] == ["n3", "n2"]
    assert "read-local -> 'v1' by process 1 on n2" in v.describe()
    assert all(x.order == "log_index" for g, x in res.items() if g != "eventual")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_linearizable_histories_satisfy_every_session_guarantee(seed: int) -> None:
    events = simulate_register_history(random.Random(seed), n_ops=2_000)
    res = check_sessions(pair_operations(events), bound_ms=0.0)
    assert all(x.valid and not x.unexplained for x in res.values())
    assert res["read_my_writes"].order == "real-time"
    assert res["consistent_prefix"].checked == 0 and res["consistent_prefix"].skipped > 0
