"""Checkers for harness histories: linearizability (generic over a sequential Model),
counters, staleness, convergence, the final state of an AP store's registers and its
tombstone collection."""

from harness.checker.convergence import ConvergenceResult, Sample, check_convergence
from harness.checker.counter import CounterBounds, CounterResult, CounterViolation, check_counter
from harness.checker.final_state import FinalStateResult, KeyFinal, check_final_registers
from harness.checker.linearizable import (
    Counterexample,
    KeyResult,
    LinResult,
    check_linearizable,
    check_register,
)
from harness.checker.model import CounterModel, Model, RegisterModel
from harness.checker.session import GuaranteeResult, SessionViolation, check_sessions
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
    "CounterModel",
    "CounterResult",
    "CounterViolation",
    "Counterexample",
    "FinalStateResult",
    "GuaranteeResult",
    "KeyFinal",
    "KeyResult",
    "LinResult",
    "LwwResult",
    "Model",
    "RegisterModel",
    "Sample",
    "SessionViolation",
    "StaleRead",
    "StaleReadResult",
    "TombstoneResult",
    "check_convergence",
    "check_counter",
    "check_final_registers",
    "check_linearizable",
    "check_register",
    "check_sessions",
    "check_tombstones",
    "lww_losers",
    "stale_reads",
]
