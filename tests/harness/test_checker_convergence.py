"""Convergence checker on known digest samples."""

from __future__ import annotations

from harness.checker.convergence import Sample, check_convergence


def test_converges_after_heal() -> None:
    samples = [
        (0, {"a": "x", "b": "x", "c": "x"}),
        (10, {"a": "x", "b": "y", "c": "z"}),
        (20, {"a": "w", "b": "w", "c": "z"}),
        (30, {"a": "w", "b": "w", "c": "w"}),
        (40, {"a": "w", "b": "w", "c": "w"}),
    ]
    res = check_convergence(samples, heal_time_ns=15)
    assert [d for _, d in res.divergence] == [1, 3, 2, 1, 1]
    assert res.max_divergence == 3
    assert res.converged and res.converged_at_ns == 30 and res.time_to_converge_ns == 15


def test_agreement_must_last_and_be_after_heal() -> None:
    samples = [
        (0, {"a": "x", "b": "x"}),
        (10, {"a": "x", "b": "y"}),
        (20, {"a": "y", "b": "y"}),
        (30, {"a": "y", "b": "z"}),
    ]
    res = check_convergence(samples, heal_time_ns=5)
    assert not res.converged and res.converged_at_ns is None
    # agreement before the heal does not count
    res = check_convergence(samples[:1], heal_time_ns=5)
    assert not res.converged


def test_missing_or_unknown_node_is_not_converged() -> None:
    samples: list[Sample] = [(10, {"a": "x", "b": None}), (20, {"a": "x"})]
    res = check_convergence(samples, heal_time_ns=0, expected_nodes=["a", "b"])
    assert not res.converged
    assert [d for _, d in res.divergence] == [1, 1]
    res = check_convergence([*samples, (30, {"a": "x", "b": "x"})], heal_time_ns=0)
    assert res.converged and res.converged_at_ns == 30
    assert res.final_digests == {"a": "x", "b": "x"}


def test_unsorted_samples_and_empty() -> None:
    res = check_convergence([(20, {"a": "x"}), (10, {"a": "y"})], heal_time_ns=0)
    assert res.divergence == ((10, 1), (20, 1)) and res.converged_at_ns == 10
    empty = check_convergence([], heal_time_ns=0)
    assert not empty.converged and empty.max_divergence == 0
