"""Counter checker: are the counter values read consistent with the increments made?

Theory of operation
-------------------
An ``incr`` with delta ``d`` that completed ``ok`` took effect exactly once; a ``fail`` did
not take effect; an ``info`` one may or may not have. After the cluster healed and converged,
every replica's final value must therefore be ``acked + s`` where ``acked`` is the sum of
acknowledged deltas and ``s`` the sum of some subset of the indeterminate deltas. The subset
sums span ``[sum of negative info deltas, sum of positive info deltas]``, so::

    lower = acked + sum(d for info d < 0)        upper = acked + sum(d for info d > 0)

(an interval check: every value in it is not necessarily a subset sum, but every subset sum
is in it). Reads taken during the run (``read-counter`` ok) are checked against the weaker
bound that holds for any store, CP or AP: a read can only reflect increments invoked before
it returned, in any subset, so it must lie between the sum of the negative and the sum of
the positive deltas (ok or info) invoked before its completion.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from harness.history import Operation


@dataclass(frozen=True, slots=True)
class CounterBounds:
    """What the final value of a counter may be."""

    lower: int
    upper: int
    acknowledged: int  # sum of ok deltas
    ok_count: int
    info_count: int
    fail_count: int


@dataclass(frozen=True, slots=True)
class CounterViolation:
    """A read outside its bounds."""

    node: str | None
    value: int
    lower: int
    upper: int
    op: Operation | None  # the read-counter op, None for a final read
    reason: str


@dataclass(frozen=True, slots=True)
class CounterResult:
    """Result of :func:`check_counter`. ``valid`` iff there is no violation at all."""

    valid: bool
    key: str | None
    bounds: CounterBounds
    final_reads: Mapping[str, int]
    violations: tuple[CounterViolation, ...]  # final reads out of bounds
    read_violations: tuple[CounterViolation, ...]  # run-time reads out of bounds
    reads_checked: int


def _delta(op: Operation) -> int:
    v = op.value
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"event {op.index}: incr delta must be an integer, got {v!r}")
    return v


def check_counter(
    ops: Sequence[Operation], final_reads: Mapping[str, int], *, key: str | None = None
) -> CounterResult:
    """Check a counter history and the final value read on each node after the heal.

    ``ops`` may contain other functions; only ``incr`` and ``read-counter`` are used. With
    ``key`` given only that key's operations count; otherwise all counter operations must be
    on one key (ValueError if not).
    """
    cops = [o for o in ops if o.f in ("incr", "read-counter") and (key is None or o.key == key)]
    keys = {o.key for o in cops}
    if key is None and len(keys) > 1:
        raise ValueError(f"counter operations on several keys {sorted(map(str, keys))}: pass key")
    the_key = key if key is not None else next(iter(keys), None)
    incrs = [o for o in cops if o.f == "incr"]
    acked = sum(_delta(o) for o in incrs if o.type == "ok")
    info = [_delta(o) for o in incrs if o.type == "info"]
    bounds = CounterBounds(
        lower=acked + sum(d for d in info if d < 0),
        upper=acked + sum(d for d in info if d > 0),
        acknowledged=acked,
        ok_count=sum(1 for o in incrs if o.type == "ok"),
        info_count=len(info),
        fail_count=sum(1 for o in incrs if o.type == "fail"),
    )
    violations = []
    for node in sorted(final_reads):
        v = final_reads[node]
        if not bounds.lower <= v <= bounds.upper:
            violations.append(
                CounterViolation(
                    node,
                    v,
                    bounds.lower,
                    bounds.upper,
                    None,
                    f"final read on {node} is {v}, outside [{bounds.lower}, {bounds.upper}] "
                    f"({bounds.acknowledged} acknowledged, {bounds.info_count} indeterminate "
                    "increments)",
                )
            )
    # Run-time reads: prefix sums of deltas by invoke time, queried at each read's completion.
    incr_sorted = sorted((o for o in incrs if o.type != "fail"), key=lambda o: o.invoke_time)
    reads = sorted(
        (o for o in cops if o.f == "read-counter" and o.type == "ok"),
        key=lambda o: o.complete_time,
    )
    read_violations = []
    neg = pos = 0
    j = 0
    for r in reads:
        while j < len(incr_sorted) and incr_sorted[j].invoke_time <= r.complete_time:
            d = _delta(incr_sorted[j])
            if d < 0:
                neg += d
            else:
                pos += d
            j += 1
        if not isinstance(r.result, int) or isinstance(r.result, bool):
            raise ValueError(f"event {r.index}: read-counter result must be an integer")
        if not neg <= r.result <= pos:
            read_violations.append(
                CounterViolation(
                    r.node,
                    r.result,
                    neg,
                    pos,
                    r,
                    f"read-counter by process {r.process} returned {r.result}, but the "
                    f"increments invoked before it returned only allow [{neg}, {pos}]",
                )
            )
    return CounterResult(
        valid=not violations and not read_violations,
        key=the_key,
        bounds=bounds,
        final_reads=dict(final_reads),
        violations=tuple(violations),
        read_violations=tuple(read_violations),
        reads_checked=len(reads) + len(final_reads),
    )
