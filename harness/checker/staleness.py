"""What an AP store gives up, measured rather than failed: stale reads and LWW losers.

Theory of operation
-------------------
Both measures rely only on real-time order: op ``a`` *precedes* op ``b`` when ``a``
completed before ``b`` was invoked (``info`` ops never complete, so they precede nothing).
Written values are assumed unique per key (the workloads write ``v<n>``); ``absent`` is the
value of the initial state and of every delete.

Stale read. An ``ok`` read ``r`` of key ``k`` returned value ``x``. Its *sources* are the
ops that wrote ``x`` (writes, cas ok/info with new value ``x``; for ``absent``: every delete
and the initial state, which precedes everything). ``r`` is stale when every source ``s``
is *superseded before r*: some ``ok`` write-like op ``w`` (write, cas or delete, writing a
value other than ``x``) with ``s`` preceding ``w`` and ``w`` preceding ``r``. Then in real
time ``x`` was certainly overwritten before ``r`` began, whatever the store did with
concurrent ops. The *lag* is ``r.invoke - w.complete`` for the latest-invoked such ``w``.
Reads of values nobody wrote, or written only after the read returned, are listed as
``unexplained`` (not stale: impossible). Works for any read function (``read_fs``), e.g.
the CP store's LOCAL reads.

LWW loser. Given the final value of each key (read from the converged replicas), the
*winners* are the sources of that value. An acknowledged write-like op ``w`` (write, cas ok)
whose value differs from the final one is:

* ``superseded`` if ``w`` precedes some winner (overwritten by a later write: expected);
* an ``LWW loser`` otherwise if ``w`` is concurrent with some winner (neither precedes the
  other, e.g. both sides of a partition): last-writer-wins discarded an acknowledged write;
* ``lost`` otherwise (some winner precedes ``w``): an acknowledged write, strictly later in
  real time than the winning one, that did not survive (e.g. LWW under clock skew).

``observed`` tells whether any ok read ever returned the write's value.

Real-time precedence alone calls a partition's losing side "superseded" as soon as the
winning write began after it, although the winner's side never saw it;
:func:`harness.divergence.lww_discards` also takes the partition sides into account and
counts those writes as discarded.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass

from harness.checker.linearizable import _cas_args, written_value
from harness.history import Json, Operation

_WRITE_FS = ("write", "cas", "delete")


def _freeze(v: Json) -> Hashable:
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    return v


@dataclass(frozen=True, slots=True)
class StaleRead:
    """A read that returned a value already overwritten in real time before it began."""

    read: Operation
    superseded_by: Operation  # an ok write that followed the value's writer and preceded r
    lag_ns: int  # read.invoke_time - superseded_by.complete_time


@dataclass(frozen=True, slots=True)
class StaleReadResult:
    """Result of :func:`stale_reads`."""

    reads_checked: int
    stale_count: int
    per_key: Mapping[str, int]  # stale reads per key (keys with at least one read)
    stale: tuple[StaleRead, ...]  # all of them, in read completion order
    unexplained: tuple[Operation, ...]  # values never written, or written after the read
    max_lag_ns: int

    def examples(self, n: int = 5) -> tuple[StaleRead, ...]:
        """The ``n`` stalest reads."""
        return tuple(sorted(self.stale, key=lambda s: -s.lag_ns)[:n])


@dataclass(frozen=True, slots=True)
class LwwResult:
    """Result of :func:`lww_losers` (see the module docstring for the definitions)."""

    acknowledged: int  # acknowledged write-like ops on keys with a known final value
    losers: tuple[Operation, ...]
    lost: tuple[Operation, ...]
    superseded: int
    per_key: Mapping[str, int]  # losers + lost per key
    observed: frozenset[int]  # invoke indexes of losers/lost whose value some read returned
    unexplained_finals: tuple[str, ...]  # keys whose final value no operation wrote


def _precedes(a: Operation, b: Operation) -> bool:
    return a.complete_time < b.invoke_time


def stale_reads(
    ops: Sequence[Operation], *, read_fs: Collection[str] = ("read",)
) -> StaleReadResult:
    """Count and list stale reads per key (definition in the module docstring)."""
    by_key: dict[str, list[Operation]] = {}
    for op in ops:
        if op.key is not None and op.type != "fail" and (op.f in read_fs or op.f in _WRITE_FS):
            by_key.setdefault(op.key, []).append(op)
    stale: list[StaleRead] = []
    unexplained: list[Operation] = []
    per_key: dict[str, int] = {}
    checked = 0
    for key, kops in sorted(by_key.items()):
        writes = [o for o in kops if o.f in _WRITE_FS]
        # Latest completion time of the sources of each value (initial state for absent).
        src_complete: dict[Hashable, float] = {None: -math.inf}
        src_invoke: dict[Hashable, float] = {None: -math.inf}
        for w in writes:
            v = _freeze(written_value(w))
            src_complete[v] = max(src_complete.get(v, -math.inf), w.complete_time)
            src_invoke[v] = min(src_invoke.get(v, math.inf), w.invoke_time)
        # ok writes by completion time with prefix best-two invoke times of distinct values.
        oks = sorted((w for w in writes if w.type == "ok"), key=lambda w: w.complete_time)
        completes = [w.complete_time for w in oks]
        top1: list[Operation | None] = []
        top2: list[Operation | None] = []
        a: Operation | None = None
        b: Operation | None = None
        for w in oks:
            wv = _freeze(written_value(w))
            if a is None or w.invoke_time > a.invoke_time:
                if a is not None and _freeze(written_value(a)) != wv:
                    b = a
                elif b is not None and _freeze(written_value(b)) == wv:
                    b = None
                a = w
            elif _freeze(written_value(a)) != wv and (b is None or w.invoke_time > b.invoke_time):
                b = w
            top1.append(a)
            top2.append(b)
        per_key[key] = 0
        for r in kops:
            if r.f not in read_fs or r.type != "ok":
                continue
            checked += 1
            x = _freeze(r.result)
            if x not in src_complete or src_invoke[x] > r.complete_time:
                unexplained.append(r)
                continue
            pos = bisect.bisect_left(completes, r.invoke_time) - 1
            if pos < 0:
                continue
            cand = top1[pos]
            if cand is not None and _freeze(written_value(cand)) == x:
                cand = top2[pos]
            if cand is not None and cand.invoke_time > src_complete[x]:
                stale.append(StaleRead(r, cand, int(r.invoke_time - cand.complete_time)))
                per_key[key] += 1
    stale.sort(key=lambda s: s.read.complete_time)
    return StaleReadResult(
        reads_checked=checked,
        stale_count=len(stale),
        per_key=per_key,
        stale=tuple(stale),
        unexplained=tuple(unexplained),
        max_lag_ns=max((s.lag_ns for s in stale), default=0),
    )


def lww_losers(ops: Sequence[Operation], final_values: Mapping[str, Json]) -> LwwResult:
    """Classify acknowledged writes against each key's final (converged) value."""
    by_key: dict[str, list[Operation]] = {}
    for op in ops:
        if op.key is not None and op.type != "fail" and op.f in (*_WRITE_FS, "read"):
            by_key.setdefault(op.key, []).append(op)
    losers: list[Operation] = []
    lost: list[Operation] = []
    observed: set[int] = set()
    per_key: dict[str, int] = {}
    unexplained: list[str] = []
    superseded = acknowledged = 0
    for key in sorted(final_values):
        kops = by_key.get(key, [])
        final = _freeze(final_values[key])
        writes = [o for o in kops if o.f in _WRITE_FS]
        winners = [w for w in writes if _freeze(written_value(w)) == final]
        initial_wins = final is None
        if not winners and not initial_wins:
            unexplained.append(key)
            continue
        read_values = {_freeze(o.result) for o in kops if o.f == "read" and o.type == "ok"}
        per_key[key] = 0
        for w in writes:
            if w.type != "ok":
                continue
            if w.f == "cas":
                _cas_args(w)  # validates the shape
            acknowledged += 1
            v = _freeze(written_value(w))
            if v == final:
                continue
            if any(_precedes(w, s) for s in winners):
                superseded += 1
                continue
            if any(not _precedes(s, w) for s in winners):
                losers.append(w)
            else:  # every winner (or only the initial state) precedes w
                lost.append(w)
            per_key[key] += 1
            if v in read_values:
                observed.add(w.index)
    return LwwResult(
        acknowledged=acknowledged,
        losers=tuple(losers),
        lost=tuple(lost),
        superseded=superseded,
        per_key=per_key,
        observed=frozenset(observed),
        unexplained_finals=tuple(unexplained),
    )
