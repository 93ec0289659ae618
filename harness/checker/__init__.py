"""Checkers for harness histories: linearizability, counters, staleness, convergence."""

from harness.checker.convergence import ConvergenceResult, Sample, check_convergence
from harness.checker.counter import CounterBounds, CounterResult, CounterViolation, check_counter
from harness.checker.linearizable import Counterexample, KeyResult, LinResult, check_register
from harness.checker.staleness import (
    LwwResult,
    StaleRead,
    StaleReadResult,
    lww_losers,
    stale_reads,
)

__all__ = [
    "ConvergenceResult",
    "CounterBounds",
    "CounterResult",
    "CounterViolation",
    "Counterexample",
    "KeyResult",
    "LinResult",
    "LwwResult",
    "Sample",
    "StaleRead",
    "StaleReadResult",
    "check_convergence",
    "check_counter",
    "check_register",
    "lww_losers",
    "stale_reads",
]
