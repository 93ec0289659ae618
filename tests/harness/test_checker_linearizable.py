"""Linearizability checker on hand-written and generated register histories."""

from __future__ import annotations

import dataclasses
import math
import os
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from harness.checker.bench_lin import simulate_register_history
from harness.checker.linearizable import check_register
from harness.history import Json, Operation, pair_operations

MS = 1_000_000


def op(
    f: str,
    start: float,
    end: float | None,
    value: Json = None,
    result: Json = None,
    *,
    type: str = "ok",
    key: str = "k",
    process: int = 0,
) -> Operation:
    """An operation from start to end (in ms); end None = info."""
    t = "info" if end is None else type
    return Operation(
        process=process,
        node=None,
        f=f,
        key=key,
        value=value,
        result=result,
        type=t,  # type: ignore[arg-type]
        invoke_time=int(start * MS),
        complete_time=math.inf if end is None else int(end * MS),
    )


def w(start: float, end: float | None, v: str, **kw: object) -> Operation:
    return op("write", start, end, v, v, **kw)  # type: ignore[arg-type]


def r(start: float, end: float, v: str | None, **kw: object) -> Operation:
    return op("read", start, end, None, v, **kw)  # type: ignore[arg-type]


def cas(start: float, end: float | None, e: str | None, n: str, **kw: object) -> Operation:
    return op("cas", start, end, [e, n], [e, n], **kw)  # type: ignore[arg-type]


def test_empty_and_simple() -> None:
    assert check_register([]).valid is True
    assert check_register([w(0, 1, "a"), r(2, 3, "a")]).valid is True
    assert check_register([r(0, 1, None)]).valid is True  # absent key


def test_concurrent_write_read_either_value() -> None:
    h = [w(0, 1, "a"), w(2, 5, "b", process=1), r(3, 4, "a", process=2)]
    assert check_register(h).valid is True
    h = [w(0, 1, "a"), w(2, 5, "b", process=1), r(3, 4, "b", process=2)]
    assert check_register(h).valid is True


def test_stale_read_after_completed_write() -> None:
    h = [w(1000, 1001, "v17"), w(1050, 1100, "v19", process=1), r(1234, 1240, "v17", process=2)]
    res = check_register(h)
    assert res.valid is False
    cex = res.counterexample
    assert cex is not None
    assert cex.op.f == "read" and cex.op.result == "v17"
    assert cex.reason == (
        "read of key 'k' at 1.234s returned 'v17' but the last completed write before it "
        "was 'v19' (finished at 1.100s)"
    )
    assert [o.value for o in cex.prefix] == ["v17", "v19"]
    assert cex.state == "v19"
    assert res.per_key["k"].valid is False
    assert "not linearizable: keys k" in res.summary()


def test_read_of_never_written_value() -> None:
    res = check_register([w(0, 1, "a"), r(2, 3, "zzz")])
    assert res.valid is False
    assert res.counterexample is not None
    assert "no operation ever wrote" in res.counterexample.reason


def test_read_from_the_future() -> None:
    res = check_register([r(0, 1, "a"), w(2, 3, "a", process=1)])
    assert res.valid is False
    assert res.counterexample is not None
    assert "after the read had returned" in res.counterexample.reason


def test_info_write_seen_later_is_linearizable() -> None:
    h = [w(0, 1, "a"), w(2, None, "b", process=1), r(10, 11, "b"), r(12, 13, "b")]
    assert check_register(h).valid is True


def test_info_write_never_seen_is_linearizable() -> None:
    h = [w(0, 1, "a"), w(2, None, "b", process=1), r(10, 11, "a"), r(12, 13, "a")]
    assert check_register(h).valid is True


def test_info_write_cannot_take_effect_before_its_invoke() -> None:
    h = [r(0, 1, "b"), w(2, None, "b", process=1)]
    assert check_register(h).valid is False


def test_info_write_seen_then_unseen_is_not_linearizable() -> None:
    # Once a read saw b, a later read cannot see a again (no other write of a).
    h = [w(0, 1, "a"), w(2, None, "b", process=1), r(10, 11, "b"), r(12, 13, "a")]
    assert check_register(h).valid is False


def test_failed_ops_are_excluded() -> None:
    h = [w(0, 1, "a"), op("write", 2, 3, "b", type="fail"), r(4, 5, "a")]
    assert check_register(h).valid is True


def test_cas_race_both_succeed_not_linearizable() -> None:
    h = [w(0, 1, "a"), cas(2, 5, "a", "b", process=1), cas(2, 5, "a", "c", process=2)]
    res = check_register(h)
    assert res.valid is False
    assert res.counterexample is not None
    assert res.counterexample.op.f == "cas"
    assert "another successful cas from the same value" in res.counterexample.reason


def test_cas_race_one_succeeds_one_fails() -> None:
    h = [
        w(0, 1, "a"),
        cas(2, 5, "a", "b", process=1),
        cas(2, 5, "a", "c", process=2, type="fail"),
        r(6, 7, "b"),
    ]
    assert check_register(h).valid is True


def test_cas_from_absent_and_info_cas() -> None:
    assert check_register([cas(0, 1, None, "a"), r(2, 3, "a")]).valid is True
    assert check_register([w(0, 1, "x"), cas(2, 3, None, "a")]).valid is False
    h = [w(0, 1, "a"), cas(2, None, "a", "b", process=1), r(5, 6, "b")]
    assert check_register(h).valid is True
    # an info cas whose precondition never holds cannot explain the read
    h = [w(0, 1, "a"), cas(2, None, "z", "b", process=1), r(5, 6, "b")]
    assert check_register(h).valid is False


def test_deletes() -> None:
    d = op("delete", 2, 3)
    assert check_register([w(0, 1, "a"), d, r(4, 5, None)]).valid is True
    assert check_register([w(0, 1, "a"), d, r(4, 5, "a")]).valid is False
    absent_after_write = [w(0, 1, "a"), r(2, 3, None)]
    res = check_register(absent_after_write)
    assert res.valid is False
    assert res.counterexample is not None
    assert "returned absent but the last completed write before it was 'a'" in (
        res.counterexample.reason
    )


def test_keys_are_independent() -> None:
    h = [w(0, 1, "a", key="x"), w(0, 1, "b", key="y"), r(2, 3, "a", key="x"), r(2, 3, "b", key="y")]
    res = check_register(h)
    assert res.valid is True
    assert set(res.per_key) == {"x", "y"}
    h.append(r(4, 5, "b", key="x"))
    res = check_register(h)
    assert res.valid is False
    assert res.per_key["y"].valid is True
    assert res.counterexample is not None and res.counterexample.key == "x"


def test_timeout_answers_unknown() -> None:
    rng = random.Random(3)
    ops = pair_operations(simulate_register_history(rng, 3000, 1, 32, 0.05))
    res = check_register(ops, timeout_s=0.0)
    assert res.valid == "unknown"
    assert res.unknown_keys == ("k0",)


def _seeds(default: int) -> list[int]:
    env = os.environ.get("CAPLAB_SEED")
    return [int(env)] if env else list(range(default))


def _replay(seed: int, name: str) -> str:
    return (
        f"seed {seed}; replay: CAPLAB_SEED={seed} .venv/bin/pytest "
        f"tests/harness/test_checker_linearizable.py -k {name}"
    )


def _generated(seed: int) -> list[Operation]:
    rng = random.Random(seed)
    n_keys = rng.randint(1, 3)
    return pair_operations(
        simulate_register_history(rng, rng.randint(20, 300), n_keys, rng.randint(1, 8), 0.1)
    )


def test_generated_histories_accepted_and_corruptions_rejected() -> None:
    for seed in _seeds(40):
        ops = _generated(seed)
        res = check_register(ops)
        assert res.valid is True, _replay(seed, "generated")
        rng = random.Random(seed)
        reads = [i for i, o in enumerate(ops) if o.f == "read" and o.type == "ok"]
        if not reads:
            continue
        i = rng.choice(reads)
        bad = list(ops)
        bad[i] = dataclasses.replace(ops[i], result="never-written")
        res = check_register(bad)
        assert res.valid is False, _replay(seed, "generated")
        assert res.counterexample is not None and res.counterexample.op is bad[i]


def test_generated_stale_read_rejected() -> None:
    """Make a read return a value known to be overwritten before it began."""
    found = 0
    for seed in _seeds(40):
        ops = _generated(seed)
        rng = random.Random(seed)
        cands = []
        oks = [o for o in ops if o.f == "write" and o.type == "ok"]
        for i, rd in enumerate(ops):
            if rd.f != "read" or rd.type != "ok":
                continue
            before = [x for x in oks if x.key == rd.key and x.complete_time < rd.invoke_time]
            for w1 in before:
                if any(w1.complete_time < w2.invoke_time and w2.value != w1.value for w2 in before):
                    cands.append((i, w1))
        if not cands:
            continue
        found += 1
        i, w1 = rng.choice(cands)
        bad = list(ops)
        bad[i] = dataclasses.replace(ops[i], result=w1.value)
        assert check_register(bad).valid is False, _replay(seed, "stale")
    assert found > 0 or os.environ.get("CAPLAB_SEED")


def test_generated_delete_heavy_histories() -> None:
    """Histories with 15% deletes (the workloads' default) are accepted; a read that returns
    a value deleted before it began (resurrection) is rejected."""
    found = 0
    for seed in _seeds(40):
        rng = random.Random(seed)
        events = simulate_register_history(rng, rng.randint(50, 300), 2, 4, 0.05, delete_rate=0.15)
        ops = pair_operations(events)
        assert sum(1 for o in ops if o.f == "delete") > 0, _replay(seed, "delete_heavy")
        assert check_register(ops).valid is True, _replay(seed, "delete_heavy")
        oks = [o for o in ops if o.type == "ok"]
        cands = [
            (i, w1)
            for i, rd in enumerate(ops)
            if rd.f == "read" and rd.type == "ok"
            for d in oks
            if d.f == "delete" and d.key == rd.key and d.complete_time < rd.invoke_time
            for w1 in oks
            if w1.f == "write" and w1.key == rd.key and w1.complete_time < d.invoke_time
        ]
        if not cands:
            continue
        found += 1
        i, w1 = rng.choice(cands)
        bad = list(ops)
        bad[i] = dataclasses.replace(ops[i], result=w1.value)
        assert check_register(bad).valid is False, _replay(seed, "delete_heavy")
    assert found > 0 or os.environ.get("CAPLAB_SEED")


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=2**32))
def test_hypothesis_sequential_with_overlaps_accepted(seed: int) -> None:
    assert check_register(_generated(seed)).valid is True


def test_benchmark_size_is_fast() -> None:
    ops = pair_operations(simulate_register_history(random.Random(1), 10_000, 10, 16, 0.02))
    res = check_register(ops, timeout_s=30)
    assert res.valid is True
    assert res.operations > 8_000  # fail ops are excluded
    assert res.elapsed_s < 10


def test_info_chain_pruning() -> None:
    """An info write observed only by an info cas, itself observed by a read: both are kept
    and each may be used once; an info cas nobody observes, or one of a value onto itself,
    is dropped without changing the verdict."""
    base = [w(0, 1, "x"), w(2, None, "a", process=1), cas(3, None, "a", "b", process=2)]
    assert check_register([*base, r(10, 11, "x")]).valid is True
    assert check_register([*base, r(10, 11, "a")]).valid is True
    assert check_register([*base, r(10, 11, "b")]).valid is True
    assert check_register([*base, r(10, 11, "b"), r(12, 13, "a")]).valid is False
    assert check_register([*base, r(10, 11, "b"), r(12, 13, "x")]).valid is False
    res = check_register([w(0, 1, "x"), cas(2, None, "x", "y", process=1), r(3, 4, "x")])
    assert res.valid is True and res.operations == 2  # the unobserved info cas is dropped
    h = [w(0, 1, "x"), cas(2, None, "x", "x", process=1), r(3, 4, "x")]
    assert check_register(h).valid is True


def test_generated_info_heavy_histories_accepted() -> None:
    """A third of the operations indeterminate: many info ops are pruned or become dead
    during the search; every simulated history is still accepted, and a corrupted read is
    still rejected."""
    for seed in _seeds(20):
        rng = random.Random(seed)
        events = simulate_register_history(rng, rng.randint(20, 120), 1, rng.randint(2, 6), 0.3)
        ops = pair_operations(events)
        assert check_register(ops).valid is True, _replay(seed, "info_heavy")
        reads = [i for i, o in enumerate(ops) if o.f == "read" and o.type == "ok"]
        if reads:
            i = rng.choice(reads)
            bad = list(ops)
            bad[i] = dataclasses.replace(ops[i], result="never-written")
            assert check_register(bad).valid is False, _replay(seed, "info_heavy")


def test_register_helpers_still_importable_from_linearizable() -> None:
    """harness.checker.staleness / final_state / checks and the CLI import these from here."""
    from harness.checker import linearizable as lin
    from harness.checker import model

    for name in ("_cas_args", "_freeze", "describe", "fmt_time", "fmt_value", "written_value"):
        assert getattr(lin, name) is getattr(model, name)
    assert frozenset({"read", "write", "cas", "delete"}) == lin.REGISTER_FUNCTIONS
