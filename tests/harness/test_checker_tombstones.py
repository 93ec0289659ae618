"""Tombstone collection figures from the runner's Status samples."""

from __future__ import annotations

from typing import Any

from harness.checker.tombstones import check_tombstones

S = 1_000_000_000


def sample(t_s: float, held: dict[str, int | None], collected: int = 0) -> dict[str, Any]:
    return {
        "time_ns": int(t_s * S),
        "digests": dict.fromkeys(held, "d"),
        "tombstones": held,
        "tombstones_collected": {n: None if v is None else collected for n, v in held.items()},
    }


def test_collected_after_the_run() -> None:
    samples = [
        sample(1, {"n1": 0, "n2": 0}),
        sample(5, {"n1": 4, "n2": 3}),
        sample(10, {"n1": 2, "n2": 2}, collected=1),  # the workload ends at 10 s
        sample(15, {"n1": 0, "n2": 2}, collected=3),
        sample(16, {"n1": 0, "n2": 0}, collected=3),
        sample(17, {"n1": 0, "n2": 0}, collected=3),
    ]
    res = check_tombstones(samples, 10 * S, timeout_s=30)
    assert res.valid is True
    assert res.all_collected_at_ns == 16 * S
    assert res.max_held == 4
    assert res.held_at_end == {"n1": 2, "n2": 2}
    assert res.collected == {"n1": 3, "n2": 3} and res.collected_total == 6
    assert "every node held none from 16.000s on" in res.summary()


def test_tombstones_left_fail_only_when_the_run_waited() -> None:
    samples = [sample(10, {"n1": 2, "n2": 2}), sample(40, {"n1": 0, "n2": 1})]
    res = check_tombstones(samples, 10 * S, timeout_s=30)
    assert res.valid is False and res.all_collected_at_ns is None
    assert "tombstones were still held 30s after the run" in res.summary()
    assert check_tombstones(samples, 10 * S).valid is None  # measured only


def test_a_node_that_does_not_answer_holds_unknown_tombstones() -> None:
    samples = [sample(10, {"n1": 0, "n2": 0}), sample(11, {"n1": 0, "n2": None})]
    res = check_tombstones(samples, 10 * S, timeout_s=5)
    assert res.valid is False


def test_zero_after_a_relapse_counts_from_the_last_zero_stretch() -> None:
    samples = [
        sample(10, {"n1": 0}),
        sample(11, {"n1": 1}),  # e.g. a restarted node loaded a tombstone again
        sample(12, {"n1": 0}),
    ]
    assert check_tombstones(samples, 10 * S, timeout_s=5).all_collected_at_ns == 12 * S


def test_samples_without_counters() -> None:
    raft_like = [{"time_ns": S, "digests": {"n1": "d"}}]
    res = check_tombstones(raft_like, 0, timeout_s=5)
    assert res.valid == "unknown" and res.samples == 0
    assert check_tombstones(raft_like, 0).valid is None
