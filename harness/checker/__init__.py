"""Checkers for harness histories: linearizability, counters, staleness, convergence, the
final state of an AP store's registers and its tombstone collection."""

from harness.checker.convergence import ConvergenceResult, Sample, check_convergence
from harness.checker.counter import CounterBounds, CounterResult, CounterViolation, check_counter
from harness.checker.final_state import FinalStateResult, KeyFinal, check_final_registers
from harness.checker.linearizable import Counterexample, KeyResult, LinResult, check_register
from harness.checker.staleness import (
    LwwResult,
    StaleRead,
    StaleReadResult,
    lww_losers,
    stale_reads,
)
from harness.checker.tombstones import TombstoneResult, check_tombstones

__all__ = [
    "ConvergenceResult",
    "CounterBounds",
    "CounterResult",
    "CounterViolation",
    "Counterexample",
    "FinalStateResult",
    "KeyFinal",
    "KeyResult",
    "LinResult",
    "LwwResult",
    "Sample",
    "StaleRead",
    "StaleReadResult",
    "TombstoneResult",
    "check_convergence",
    "check_counter",
    "check_final_registers",
    "check_register",
    "check_tombstones",
    "lww_losers",
    "stale_reads",
]
