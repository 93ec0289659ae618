"""Layer 2 of the spectrum report: Terry's Table 2, measured, from a run folder.

Theory of operation
-------------------
A spectrum run (:mod:`harness.spectrum.run`) is one ordinary run folder per store in which
every client reads at one level (``consistency`` on its invokes, :data:`LEVELS`), some of
them roaming between nodes. A *cell* is one level on one store, computed from the history
alone:

* **offered**: the store answered some read of this level other than with
  ``FAILED_PRECONDITION`` (a level it refuses outright, with the reason it gave);
* **anomalies**: every checker of :mod:`harness.checker.session` run over the level's
  sessions (its clients' reads and writes, with every client's writes as the versions they
  may read), plus ``linearizable``: reads that returned a value certainly overwritten in
  real time before they began (each one a linearizability violation, whatever order the
  store chose; the ``strong`` level also carries the verdict of the full linearizability
  checker of the run). A cell with no answered read (or, for ``strong``, without the full
  checker's verdict) is *not measured*, never "kept". Each checker's
  count comes with one example. The checkers a level *promises* (:data:`PROMISES`) must
  find nothing; the others measure what the level permits;
* **bounded staleness** is judged against what the store claims for a bound ``B``
  (:func:`claimed_bound_ms`), not ``B`` itself;
* **latency** of the ``ok`` reads, p50 / p99;
* **availability** during the partition: the share of the level's reads answered ``ok``,
  on each side, for clients that stay with their node (*sticky*) and for *roaming* ones;
* **staleness** of the ``ok`` reads: how long before the read its value had been
  overwritten (ms) and by how many writes (versions behind): median, p99, max.

Eventual consistency is a property of the store's end state, not of a read: it comes from
the run's convergence checker, once per store.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.checker.session import (
    WRITE_FUNCTIONS,
    GuaranteeResult,
    SessionViolation,
    StalenessStats,
    bounded_staleness,
    check_sessions,
)
from harness.report.load import StoreData
from harness.workload import LEVELS
from raft.node import RaftOptions

# The checkers of the matrix's columns, strongest first.
CHECKERS: tuple[str, ...] = (
    "linearizable",
    "bounded_staleness",
    "read_my_writes",
    "monotonic_reads",
    "monotonic_writes",
    "writes_follow_reads",
    "consistent_prefix",
)
CHECKER_NAMES: dict[str, str] = {
    "linearizable": "linearizable",
    "bounded_staleness": "bounded staleness",
    "read_my_writes": "read my writes",
    "monotonic_reads": "monotonic reads",
    "monotonic_writes": "monotonic writes",
    "writes_follow_reads": "writes follow reads",
    "consistent_prefix": "consistent prefix",
}
# What each level promises (kv.proto): these checkers must find nothing where it is served.
PROMISES: dict[str, frozenset[str]] = {
    "strong": frozenset(CHECKERS),
    "bounded_staleness": frozenset({"bounded_staleness"}),
    "session": frozenset({"read_my_writes", "monotonic_reads", "monotonic_writes"}),
    "read_my_writes": frozenset({"read_my_writes"}),
    "monotonic_reads": frozenset({"monotonic_reads"}),
    "consistent_prefix": frozenset({"consistent_prefix"}),
    "eventual": frozenset(),
}
assert set(PROMISES) == set(LEVELS)
GOSSIP_SYNC_SLACK_MS = 100  # one anti-entropy round trip, plus scheduling


def claimed_bound_ms(store: str, bound_ms: float) -> float:
    """What a store promises for ``max_staleness_ms = bound_ms`` (README, kv.proto).

    raft: the bound plus one election timeout (randomized below twice its base: at most
    600 ms with the default options) plus one message delay, for which
    :data:`GOSSIP_SYNC_SLACK_MS` is allowed (a leader cut off from its majority serves until
    check-quorum deposes it; raft.node.bounded_staleness_refusal). gossip: the bound plus
    one message delay (a node synced with every peer within the bound has every write
    they held when they sent).
    """
    if store == "raft":
        opts = RaftOptions()
        return bound_ms + 2 * opts.election_ticks * opts.tick_ms + GOSSIP_SYNC_SLACK_MS
    return bound_ms + GOSSIP_SYNC_SLACK_MS


@dataclass(frozen=True, kw_only=True)
class Anomalies:
    """What one checker found among one level's operations."""

    count: int
    checked: int  # operations it judged
    example: str | None  # the first violation, in words
    promised: bool  # the level promises this guarantee: count must be 0


@dataclass(frozen=True, kw_only=True)
class Availability:
    """Reads of a level invoked during the partition on one side: answered / asked."""

    ok: int
    total: int

    @property
    def share(self) -> float | None:
        return self.ok / self.total if self.total else None


@dataclass(frozen=True, kw_only=True)
class Cell:
    """One level on one store (module docstring)."""

    store: str
    level: str
    offered: bool
    refusal: str | None  # the FAILED_PRECONDITION message when not offered
    reads: int  # every read of the level (ok, fail, info)
    reads_ok: int
    refused_reasons: dict[str, int]  # first words of the errors of failed reads -> count
    anomalies: dict[str, Anomalies]  # CHECKERS order
    unexplained: int  # ok reads of a value nobody wrote (a correctness failure)
    latency_ms: tuple[float, float] | None  # ok reads: p50, p99
    # side ("majority"/"minority") -> "sticky"/"roaming" -> reads during the partition
    availability: dict[str, dict[str, Availability]]
    staleness: StalenessStats | None
    bound_ms: float  # the bounded-staleness checker's bound (the store's claim)
    unchecked: tuple[str, ...] = ()  # promised guarantees no checker could judge

    @property
    def measured(self) -> bool:
        """Offered and some read answered: there was something to check."""
        return self.offered and self.reads_ok > 0 and not self.unchecked

    @property
    def kept(self) -> bool | None:
        """The level's promise held (None: not offered, or nothing to judge)."""
        if not self.measured:
            return None
        return not self.broken and not self.unexplained

    @property
    def broken(self) -> list[str]:
        """Promised guarantees the checkers found violated (must be empty)."""
        return [c for c, a in self.anomalies.items() if a.promised and a.count]

    @property
    def permitted(self) -> list[str]:
        """Guarantees not promised that the checkers found violated."""
        return [c for c, a in self.anomalies.items() if not a.promised and a.count]


@dataclass(frozen=True, kw_only=True)
class Matrix:
    """Every cell of a run, plus each store's end state."""

    levels: tuple[str, ...]
    stores: tuple[str, ...]
    cells: dict[str, dict[str, Cell]]  # store -> level -> cell
    converged: dict[str, bool | None]  # store -> convergence checker (None: not run)
    converge_s: dict[str, float | None]  # store -> replicas agreed this long after the stop
    linearizable: dict[str, bool | None]  # store -> full checker over strong reads
    partition_s: tuple[float, float] | None
    bound_ms: float  # the bound the bounded_staleness clients asked for
    extra: dict[str, Any] = field(default_factory=dict)


def _percentile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return float(s[max(0, math.ceil(q * len(s)) - 1)])


def _partition(sd: StoreData) -> tuple[float, float] | None:
    for ep in sd.episodes:
        if ep.action == "partition":
            return ep.start_s, ep.end_s if ep.end_s is not None else sd.end_s
    return None


def _first_words(error: str | None) -> str:
    text = (error or "no answer").split(":")[0].strip()
    return text or "error"


def _example(v: SessionViolation) -> str:
    return v.describe()


def levels_of(sd: StoreData) -> list[str]:
    """The levels whose clients appear in the history, in :data:`LEVELS` order."""
    seen = {op.consistency for op in sd.ops if op.consistency is not None}
    return [lv for lv in LEVELS if lv in seen]


def compute_cell(
    sd: StoreData, level: str, bound_ms: float, *, linearizable: bool | None = None
) -> Cell:
    """The cell of ``level`` on ``sd``'s store (module docstring)."""
    spec = LEVELS[level]
    mine = [op for op in sd.ops if op.consistency == level]
    reads = [op for op in mine if op.f == spec.f]
    oks = [op for op in reads if op.type == "ok"]
    refusals = [op for op in reads if (op.error or "").startswith("FAILED_PRECONDITION")]
    # Refused outright: FAILED_PRECONDITION and never an answer (a read that timed out
    # before the store could refuse it does not make the level offered).
    offered = bool(oks) or not refusals
    reasons: dict[str, int] = {}
    for op in reads:
        if op.type != "ok":
            reasons[_first_words(op.error)] = reasons.get(_first_words(op.error), 0) + 1
    claim = claimed_bound_ms(sd.store, bound_ms)
    anomalies: dict[str, Anomalies] = {}
    staleness: StalenessStats | None = None
    unexplained = 0
    unchecked: list[str] = []
    if oks:
        # The level's sessions, and every write (of any client) as a version they may read.
        ops = [op for op in sd.ops if op.consistency == level or op.f in WRITE_FUNCTIONS]
        results = check_sessions(ops, bound_ms=claim, read_fs=(spec.f,))
        # Stale in real time, whatever order the store chose (last-writer-wins may keep an
        # older value over a later write stamped older: still not linearizable).
        zero = bounded_staleness(ops, 0.0, read_fs=(spec.f,), store_order=False)
        staleness = results["bounded_staleness"].staleness
        level_writes = sum(1 for o in mine if o.f in WRITE_FUNCTIONS and o.type == "ok")
        unexplained = sum(
            1 for o in results["read_my_writes"].unexplained if o.consistency == level
        )
        stale = [v for v in zero.violations if v.ops[-1].consistency == level]
        lin_count = len(stale)
        lin_example = _example(stale[0]) if stale else None
        if level == "strong" and linearizable is False and not lin_count:
            lin_count, lin_example = 1, "the linearizability checker found no linearization"
        if level == "strong" and linearizable is None:
            unchecked.append("linearizable (the full checker did not run)")
        anomalies["linearizable"] = Anomalies(
            count=lin_count,
            checked=len(oks),
            example=lin_example,
            promised="linearizable" in PROMISES[level],
        )
        for name in CHECKERS[1:]:
            res: GuaranteeResult = results[name]
            found = [v for v in res.violations if v.ops[-1].consistency == level]
            anomalies[name] = Anomalies(
                count=len(found),
                # the level's operations each checker judged (writes for these two)
                checked=level_writes
                if name in ("monotonic_writes", "writes_follow_reads")
                else len(oks),
                example=_example(found[0]) if found else None,
                promised=name in PROMISES[level],
            )
    availability: dict[str, dict[str, Availability]] = {}
    window = _partition(sd)
    if window is not None:
        start_ns, end_ns = window[0] * 1e9, window[1] * 1e9
        for side in ("majority", "minority"):
            availability[side] = {}
            for kind, roaming in (("sticky", False), ("roaming", True)):
                during = [
                    op
                    for op in reads
                    if op.side == side
                    and op.roaming == roaming
                    and start_ns <= op.invoke_time < end_ns
                ]
                availability[side][kind] = Availability(
                    ok=sum(1 for op in during if op.type == "ok"), total=len(during)
                )
    lat = [(op.complete_time - op.invoke_time) / 1e6 for op in oks]
    return Cell(
        store=sd.store,
        level=level,
        offered=offered,
        refusal=refusals[0].error if refusals and not offered else None,
        reads=len(reads),
        reads_ok=len(oks),
        refused_reasons=dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        anomalies=anomalies,
        unexplained=unexplained,
        latency_ms=(_percentile(lat, 0.5), _percentile(lat, 0.99)) if lat else None,
        availability=availability,
        staleness=staleness,
        bound_ms=claim,
        unchecked=tuple(unchecked),
    )


def compute_matrix(data: Mapping[str, StoreData], bound_ms: float) -> Matrix:
    """Every level found in the histories, on every store of the run."""
    stores = tuple(data)
    levels: list[str] = []
    for sd in data.values():
        levels += [lv for lv in levels_of(sd) if lv not in levels]
    ordered = tuple(lv for lv in LEVELS if lv in levels)
    cells: dict[str, dict[str, Cell]] = {}
    converged: dict[str, bool | None] = {}
    converge_s: dict[str, float | None] = {}
    linearizable: dict[str, bool | None] = {}
    partition: tuple[float, float] | None = None
    for store, sd in data.items():
        checkers = (sd.results or {}).get("checkers") or {}
        lin = checkers.get("linearizable", {}).get("valid")
        linearizable[store] = lin if isinstance(lin, bool) else None
        conv = checkers.get("convergence", {})
        converged[store] = conv.get("valid") if isinstance(conv.get("valid"), bool) else None
        timings = (sd.results or {}).get("timings") or {}
        after = timings.get("convergence_after_stop_s")
        converge_s[store] = float(after) if isinstance(after, int | float) else None
        cells[store] = {
            lv: compute_cell(sd, lv, bound_ms, linearizable=linearizable[store]) for lv in ordered
        }
        partition = partition or _partition(sd)
    return Matrix(
        levels=ordered,
        stores=stores,
        cells=cells,
        converged=converged,
        converge_s=converge_s,
        linearizable=linearizable,
        partition_s=partition,
        bound_ms=bound_ms,
    )
