"""Counter checker on known histories."""

from __future__ import annotations

import math

import pytest

from harness.checker.counter import check_counter
from harness.history import Json, Operation


def op(
    f: str,
    start: int,
    end: int | None,
    value: Json,
    result: Json = None,
    *,
    type: str = "ok",
    key: str = "c",
    node: str | None = "n1",
) -> Operation:
    return Operation(
        process=0,
        node=node,
        f=f,
        key=key,
        value=value,
        result=result,
        type="info" if end is None else type,  # type: ignore[arg-type]
        invoke_time=start,
        complete_time=math.inf if end is None else end,
    )


def test_bounds_with_info_and_fail() -> None:
    ops = [
        op("incr", 0, 1, 5),
        op("incr", 0, 1, 2),
        op("incr", 2, None, 3),  # indeterminate
        op("incr", 2, 3, 100, type="fail"),  # did not happen
    ]
    res = check_counter(ops, {"n1": 7, "n2": 10})
    assert res.valid is True
    assert (res.bounds.lower, res.bounds.upper, res.bounds.acknowledged) == (7, 10, 7)
    assert (res.bounds.ok_count, res.bounds.info_count, res.bounds.fail_count) == (2, 1, 1)
    res = check_counter(ops, {"n1": 6, "n2": 11, "n3": 9})
    assert res.valid is False
    assert [(v.node, v.value) for v in res.violations] == [("n1", 6), ("n2", 11)]
    assert "outside [7, 10]" in res.violations[0].reason


def test_negative_deltas() -> None:
    ops = [op("incr", 0, 1, 10), op("incr", 2, None, -4), op("incr", 2, None, 3)]
    res = check_counter(ops, {"a": 6, "b": 13, "c": 9})
    assert (res.bounds.lower, res.bounds.upper) == (6, 13)
    assert res.valid is True
    assert check_counter(ops, {"a": 5}).valid is False
    assert check_counter(ops, {"a": 14}).valid is False


def test_runtime_reads_bounded_by_invoked_increments() -> None:
    ops = [
        op("incr", 0, 10, 5),
        op("read-counter", 1, 2, None, 5),  # may see the concurrent incr
        op("read-counter", 3, 4, None, 0),  # AP: may not see it yet
        op("read-counter", 11, 12, None, 6),  # impossible: only 5 was ever added
        op("incr", 20, 21, 1),
    ]
    res = check_counter(ops, {"n1": 6})
    assert res.valid is False
    assert res.violations == ()
    assert [v.value for v in res.read_violations] == [6]
    assert res.read_violations[0].upper == 5


def test_multiple_keys_need_key() -> None:
    ops = [op("incr", 0, 1, 1, key="a"), op("incr", 0, 1, 2, key="b")]
    with pytest.raises(ValueError, match="several keys"):
        check_counter(ops, {})
    res = check_counter(ops, {"n1": 2}, key="b")
    assert res.valid is True and res.key == "b"
