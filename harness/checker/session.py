"""Session guarantees, bounded staleness and eventual convergence, measured on histories.

Theory of operation
-------------------
Every checker here returns a :class:`GuaranteeResult` of the same shape (``valid``, the
``violations`` as :class:`SessionViolation` records, counts), so a report can tabulate
them side by side. None of them fails a run on its own: they measure where a store sits on
the consistency spectrum.

Sessions. A *session* is one workload client (``op.client``; without it, one process:
``op.process``; the nemesis is not one), taken in program order (invoke order). After an
``info`` a client goes on under a new process id, but with the same connection and
session token: its session goes on too. Its indeterminate operation never sets a floor
(only ``ok`` ones do) and is never blamed (module docstring, "Versions"), so its
possible overlap with the next operation cannot cause a false violation. Only
register operations on a key count: reads (``read_fs``, by default ``read`` and
``read-local``) and write-like operations (``write``, ``cas``, ``delete``). ``fail``
operations did not happen and are dropped.

Versions. Written values are unique per key (the workloads write ``v<n>``), so the value an
``ok`` read returned names the operation(s) that wrote it, its *sources*: the non-failed
write-like operations of that key writing that value and invoked no later than the read
completed (a write invoked after the read returned cannot be what it read). For ``absent``
(``None``) the sources are the initial state and every such delete. A read whose value has
no source (nobody wrote it, or only after the read returned) is *unexplained*: it is listed
in ``unexplained`` and judged by none of the guarantees (it is a correctness failure,
not a session-guarantee one).

Versions of a key are ordered by the store's own order when every ``ok`` write-like
operation of the key carries it:

* ``log_index`` (raft): the log index, a single total order over all keys that every
  replica applies in;
* ``hlc`` (gossip): the hybrid-logical-clock timestamp, the order last-writer-wins settles
  a key on (``(wall_ms, logical, node)``).

An ``info`` write carries no position: it may have taken effect anywhere, or never, so its
version is *unordered* (it could be older or newer than anything). The initial state is
before everything.

Fallback (``real-time``), for keys whose ``ok`` writes lack the store's order (histories
recorded before the fields existed): a write's position is only known to lie within its
interval ``[invoke, complete]`` (``complete`` = +inf for ``info``), so version ``a`` is
before version ``b`` iff ``a``'s write completed before ``b``'s was invoked. Overlapping
writes are unordered. This assumes the store orders writes that do not overlap in real
time in real-time order (true of a linearizable store, not of last-writer-wins under clock
skew), and it is weaker than ordering by completion time: it only reports what *every*
order consistent with real time would call a violation.

Every comparison is conservative: a read's version is the *range* of positions of its
sources (``lo`` .. ``hi``), and ``a`` is *older* than ``b`` only when ``hi(a) < lo(b)``
(certainly ordered before). A read of a value an ``info`` write wrote, or of ``absent``
while an ``info`` delete exists, is therefore never older than anything: an
indeterminate write can never be blamed for a violation.

The guarantees (Terry et al., 1994, restated for single-key reads and writes):

``read_my_writes``     after a session's ``ok`` write ``w`` of key ``k``, none of its later
                       ``ok`` reads of ``k`` returns a version older than ``w``.
``monotonic_reads``    a session's ``ok`` read of ``k`` never returns a version older than
                       an earlier ``ok`` read of ``k`` by the same session returned.
``monotonic_writes``   a session's ``ok`` writes of ``k`` are ordered as it issued them: a
                       later write is never older than an earlier one. Across keys too
                       when both writes carry a ``log_index``: raft's log is one order that
                       every replica applies in, so a later write placed before an earlier
                       one is propagated out of order. Across keys is *not* checked with
                       ``hlc`` (a timestamp orders one key's writes for last-writer-wins;
                       gossip propagates keys independently, in no timestamp order) nor in
                       the real-time fallback (a session's writes never overlap, so the
                       fallback can never see them out of order: vacuous).
``writes_follow_reads`` a session's ``ok`` write of ``k`` is never older than a version of
                       ``k`` it read earlier (the write must be placed after what it
                       followed). Across keys too when both carry a ``log_index``.
``consistent_prefix``  with one global order of all writes (``log_index``, else ``hlc``),
                       each replica a session reads from shows it a growing prefix of that
                       order with no gaps: once it read a version at position ``P`` from
                       node ``n``, each of its later ``ok`` reads of any key ``k`` from
                       ``n`` returns a version no older than ``W``, the last ``ok`` write
                       of ``k`` at a position ``<= P``. Single-key reads cannot show a gap
                       within one read, so the check is over the session's sequence of
                       reads *per node*: Terry's consistent prefix promises each read a
                       prefix, not a growing one, so a session that moves to a replica
                       further behind may go back (that is monotonic reads' business).
                       Only the session's reads set ``P``: its own writes are the business
                       of read-your-writes. Keys without a store order are skipped (counted
                       in ``skipped``): real time is not a global order a store promises
                       prefixes of. For gossip the order is the HLC order: the store does
                       not promise prefixes of it, the check measures how often a node's
                       view is not one. (It assumes a node's state never moves back: a
                       node restarted from an older snapshot, or wiped, would be blamed.)
``bounded_staleness``  an ``ok`` read's value was *current* at some instant ``t`` in
                       ``[invoke - bound, complete]``: one of its sources ``s`` had been
                       invoked by ``t`` and was not yet certainly overwritten. For keys
                       with a store order and an ``ok`` source: no ``ok`` write of another
                       value that the store ordered after ``s`` had completed before ``t``
                       (however the two overlapped in real time; and last-writer-wins keeps
                       ``s`` over a later write stamped older). Otherwise real time: no
                       ``ok`` write of another value invoked after ``s`` completed had
                       completed before ``t`` (as :func:`harness.checker.staleness.
                       stale_reads`, which is the case ``bound = 0`` without store
                       orders). The read's *staleness* is how far before its invoke the
                       value was last possibly current (0 if it still was), its
                       *versions behind* the fewest (over its sources) ``ok`` writes of
                       other values invoked after the source completed and completed
                       before the read was invoked.
``eventual``           after quiescence every node holds the same value for every key (a key
                       missing from a node's mapping is absent); when the history is given,
                       that value must also be one some operation wrote (or absent).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from harness.checker.model import describe, written_value
from harness.history import NEMESIS, Json, Operation, Process

READ_FUNCTIONS: tuple[str, ...] = ("read", "read-local")
WRITE_FUNCTIONS: tuple[str, ...] = ("write", "cas", "delete")
GUARANTEES: tuple[str, ...] = (
    "read_my_writes",
    "monotonic_reads",
    "monotonic_writes",
    "writes_follow_reads",
    "consistent_prefix",
    "bounded_staleness",
    "eventual",
)

# A position in a version order: (0,) is before everything, (2,) after everything,
# (1, ...) a log index, an HLC timestamp or a time in ns.
Rank = tuple[float | str, ...]
_NEG: Rank = (0,)
_POS: Rank = (2,)


def _freeze(v: Json) -> Hashable:
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    return v


def _fmt_value(v: object) -> str:
    if v is None:
        return "absent"
    return f"'{v}'" if isinstance(v, str) else repr(v)


def _fmt_time(ns: float) -> str:
    return "never" if math.isinf(ns) else f"{ns / 1e9:.3f}s"


def describe_op(op: Operation) -> str:
    """e.g. ``read-local -> 'v3' by process 2 on n1 at 1.234s``."""
    if op.f in WRITE_FUNCTIONS:
        what = describe(op)
        if op.log_index is not None:
            what += f" (log index {op.log_index})"
        elif op.hlc is not None:
            what += f" (hlc {op.hlc[0]}.{op.hlc[1]}@{op.hlc[2]})"
        if op.type == "info":
            what += " (indeterminate)"
    elif op.type == "ok":
        what = f"{op.f} -> {_fmt_value(op.result)}"
    else:
        what = op.f
    return f"{what} by process {op.process} on {op.node} at {_fmt_time(op.invoke_time)}"


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionViolation:
    """One violation: the offending operations (earliest first) and why."""

    guarantee: str
    process: Process | None  # the session (None for ``eventual``)
    key: str | None  # the key read or written last in ``ops``
    ops: tuple[Operation, ...]
    reason: str  # one line, without the guarantee's name

    def describe(self) -> str:
        """One line, e.g. ``monotonic_reads: process 3, key 'k': ...``."""
        who = "" if self.process is None else f"process {self.process}, "
        return f"{self.guarantee}: {who}key '{self.key}': {self.reason}"


@dataclass(frozen=True, slots=True, kw_only=True)
class StalenessStats:
    """The distribution :func:`bounded_staleness` observed (over all judged reads)."""

    bound_ms: float
    reads: int
    stale: int  # reads with staleness > 0
    over_bound: int
    median_ms: float
    p99_ms: float
    max_ms: float
    versions_behind_median: float
    versions_behind_p99: float
    versions_behind_max: int
    staleness_ms: tuple[float, ...] = field(repr=False)  # per judged read, history order
    versions_behind: tuple[int, ...] = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class GuaranteeResult:
    """The verdict on one guarantee; the same shape for all of them."""

    guarantee: str
    valid: bool
    violations: tuple[SessionViolation, ...]
    checked: int  # operations judged: reads (writes for monotonic_writes and
    # writes_follow_reads, keys for eventual)
    unexplained: tuple[Operation, ...]  # ok reads no write explains: not judged
    skipped: int  # reads/writes that could not be judged (no usable order)
    order: str  # version order used: log_index | hlc | real-time | mixed | none
    staleness: StalenessStats | None = None  # bounded_staleness only

    @property
    def violation_count(self) -> int:
        return len(self.violations)

    def summary(self) -> str:
        """One line for a report."""
        verdict = "ok" if self.valid else f"{self.violation_count} violation(s)"
        extra = ""
        if self.unexplained:
            extra += f", {len(self.unexplained)} unexplained read(s)"
        if self.skipped:
            extra += f", {self.skipped} skipped"
        if self.staleness is not None:
            s = self.staleness
            extra += (
                f", staleness median {s.median_ms:.1f} ms, p99 {s.p99_ms:.1f} ms, "
                f"max {s.max_ms:.1f} ms, versions behind max {s.versions_behind_max}"
            )
        return f"{self.guarantee}: {verdict} ({self.checked} checked, order {self.order}{extra})"


# --------------------------------------------------------------------------- versions


@dataclass(frozen=True, slots=True)
class _Version:
    lo: Rank
    hi: Rank
    kind: str  # log_index | hlc | real-time


def _percentile(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (0 for no samples)."""
    if not xs:
        return 0.0
    s = sorted(xs)
    return float(s[max(0, math.ceil(q * len(s)) - 1)])


def _median(xs: Sequence[float]) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    n = len(s)
    return float(s[n // 2]) if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


class _Model:
    """Versions of every key of a history, and its sessions."""

    def __init__(
        self, ops: Sequence[Operation], read_fs: Collection[str], *, store_order: bool = True
    ) -> None:
        self.read_fs = frozenset(read_fs)
        relevant = [
            o
            for o in ops
            if o.key is not None
            and o.process != NEMESIS
            and o.type != "fail"
            and (o.f in self.read_fs or o.f in WRITE_FUNCTIONS)
        ]
        relevant.sort(key=lambda o: (o.invoke_time, o.index))
        self.ops = relevant
        has_log = any(o.log_index is not None for o in ops)
        has_hlc = any(o.hlc is not None for o in ops)
        global_kind = "log_index" if has_log else "hlc" if has_hlc else "real-time"
        if not store_order:
            global_kind = "real-time"
        self.writes: dict[str, list[Operation]] = {}
        for o in relevant:
            if o.f in WRITE_FUNCTIONS:
                self.writes.setdefault(o.key, []).append(o)  # type: ignore[arg-type]
        self.kind: dict[str, str] = {}
        for key, ws in self.writes.items():
            oks = [w for w in ws if w.type == "ok"]
            if global_kind == "log_index" and all(w.log_index is not None for w in oks):
                self.kind[key] = "log_index"
            elif global_kind == "hlc" and all(w.hlc is not None for w in oks):
                self.kind[key] = "hlc"
            else:
                self.kind[key] = "real-time"
        self.global_kind = global_kind
        # value -> sources per key
        self.sources: dict[str, dict[Hashable, list[Operation]]] = {}
        for key, ws in self.writes.items():
            by_value: dict[Hashable, list[Operation]] = {}
            for w in ws:
                by_value.setdefault(_freeze(written_value(w)), []).append(w)
            self.sources[key] = by_value
        # ok writes of each key in store order (store-ordered keys only), for prefixes
        self.ok_ranks: dict[str, tuple[list[Rank], list[Operation]]] = {}
        for key, ws in self.writes.items():
            if self.kind[key] == "real-time":
                continue
            oks = sorted((w for w in ws if w.type == "ok"), key=lambda w: self.write_version(w).lo)
            self.ok_ranks[key] = ([self.write_version(w).lo for w in oks], oks)
        # ok writes of each key by invoke time (for staleness)
        self.ok_by_invoke: dict[str, tuple[list[Operation], list[float]]] = {}
        for key, ws in self.writes.items():
            oks = sorted((w for w in ws if w.type == "ok"), key=lambda w: w.invoke_time)
            self.ok_by_invoke[key] = (oks, [float(w.invoke_time) for w in oks])
        self.read_version: dict[int, _Version] = {}
        self.unexplained: list[Operation] = []
        for o in relevant:
            if o.f in self.read_fs and o.type == "ok":
                v = self._read_version(o)
                if v is None:
                    self.unexplained.append(o)
                else:
                    self.read_version[id(o)] = v

    def key_kind(self, key: str) -> str:
        return self.kind.get(key, self.global_kind)

    def order_name(self) -> str:
        kinds = set(self.kind.values())
        if not kinds:
            return "none"
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def write_version(self, w: Operation) -> _Version:
        assert w.key is not None
        kind = self.key_kind(w.key)
        if kind == "real-time":
            hi: Rank = _POS if math.isinf(w.complete_time) else (1, w.complete_time)
            return _Version((1, w.invoke_time), hi, kind)
        if w.type != "ok":
            return _Version(_NEG, _POS, kind)
        if kind == "log_index":
            assert w.log_index is not None
            r: Rank = (1, w.log_index)
        else:
            assert w.hlc is not None
            r = (1, *w.hlc)
        return _Version(r, r, kind)

    def read_sources(self, r: Operation) -> list[Operation | None]:
        """The sources of an ok read's value (None = the initial state)."""
        assert r.key is not None
        value = _freeze(r.result)
        cands: list[Operation | None] = [None] if value is None else []
        for w in self.sources.get(r.key, {}).get(value, []):
            if w.invoke_time <= r.complete_time:
                cands.append(w)
        return cands

    def _read_version(self, r: Operation) -> _Version | None:
        assert r.key is not None
        cands = self.read_sources(r)
        if not cands:
            return None
        kind = self.key_kind(r.key)
        vs = [_Version(_NEG, _NEG, kind) if c is None else self.write_version(c) for c in cands]
        return _Version(min(v.lo for v in vs), max(v.hi for v in vs), kind)

    def sessions(self) -> dict[Process, list[Operation]]:
        """Operations per session, in invoke order: per workload ``client`` when the
        history records it (a client is one session across the process ids an ``info``
        gives it), else per process."""
        out: dict[Process, list[Operation]] = {}
        for o in self.ops:
            out.setdefault(o.client if o.client is not None else o.process, []).append(o)
        return out

    def result(
        self,
        guarantee: str,
        violations: Iterable[SessionViolation],
        checked: int,
        *,
        skipped: int = 0,
        staleness: StalenessStats | None = None,
    ) -> GuaranteeResult:
        vs = tuple(violations)
        return GuaranteeResult(
            guarantee=guarantee,
            valid=not vs,
            violations=vs,
            checked=checked,
            unexplained=tuple(self.unexplained),
            skipped=skipped,
            order=self.order_name(),
            staleness=staleness,
        )


def _older(a: _Version, b: _Version) -> bool:
    """``a`` is certainly ordered before ``b`` (same kind of order)."""
    return a.kind == b.kind and a.hi < b.lo


def _is_read(m: _Model, o: Operation) -> bool:
    return o.f in m.read_fs and o.type == "ok" and id(o) in m.read_version


def _is_ok_write(o: Operation) -> bool:
    return o.f in WRITE_FUNCTIONS and o.type == "ok"


def _per_key(o: Operation) -> Hashable:
    return ("key", o.key)


def _floor_check(
    m: _Model,
    guarantee: str,
    *,
    sets_floor: Callable[[Operation], bool],
    judged: Callable[[Operation], bool],
    scope: Callable[[_Model, Operation], Hashable],
    version: Callable[[Operation], _Version],
    reason: Callable[[Operation, Operation], str],
) -> GuaranteeResult:
    """Generic session check: in program order, each judged op's version must not be
    older than the newest version (greatest ``lo``) set earlier in the same scope."""
    violations: list[SessionViolation] = []
    checked = 0
    for _process, sops in sorted(m.sessions().items(), key=lambda kv: str(kv[0])):
        floor: dict[Hashable, tuple[_Version, Operation]] = {}
        for o in sops:
            s = scope(m, o)
            if judged(o):
                checked += 1
                prev = floor.get(s)
                if prev is not None and _older(version(o), prev[0]):
                    violations.append(
                        SessionViolation(
                            guarantee=guarantee,
                            process=o.process,
                            key=o.key,
                            ops=(prev[1], o),
                            reason=reason(prev[1], o),
                        )
                    )
            if sets_floor(o):
                v = version(o)
                prev = floor.get(s)
                if prev is None or prev[0].lo < v.lo:
                    floor[s] = (v, o)
    return m.result(guarantee, violations, checked)


def _global_if_log(m: _Model, o: Operation) -> Hashable:
    assert o.key is not None
    return ("log",) if m.key_kind(o.key) == "log_index" else ("key", o.key)


def _op_version(m: _Model) -> Callable[[Operation], _Version]:
    def version(o: Operation) -> _Version:
        return m.write_version(o) if o.f in WRITE_FUNCTIONS else m.read_version[id(o)]

    return version


def read_my_writes(
    ops: Sequence[Operation], *, read_fs: Collection[str] = READ_FUNCTIONS
) -> GuaranteeResult:
    """Read your writes (definition in the module docstring)."""
    return _read_my_writes(_Model(ops, read_fs))


def _read_my_writes(m: _Model) -> GuaranteeResult:
    return _floor_check(
        m,
        "read_my_writes",
        sets_floor=_is_ok_write,
        judged=lambda o: _is_read(m, o),
        scope=lambda _m, o: _per_key(o),
        version=_op_version(m),
        reason=lambda w, r: f"{describe_op(r)} is older than its own earlier {describe_op(w)}",
    )


def monotonic_reads(
    ops: Sequence[Operation], *, read_fs: Collection[str] = READ_FUNCTIONS
) -> GuaranteeResult:
    """Monotonic reads, per key (definition in the module docstring)."""
    return _monotonic_reads(_Model(ops, read_fs))


def _monotonic_reads(m: _Model) -> GuaranteeResult:
    return _floor_check(
        m,
        "monotonic_reads",
        sets_floor=lambda o: _is_read(m, o),
        judged=lambda o: _is_read(m, o),
        scope=lambda _m, o: _per_key(o),
        version=_op_version(m),
        reason=lambda a, b: f"{describe_op(b)} is older than the earlier {describe_op(a)}",
    )


def monotonic_writes(
    ops: Sequence[Operation], *, read_fs: Collection[str] = READ_FUNCTIONS
) -> GuaranteeResult:
    """Monotonic writes, per key, and across keys with log indexes (module docstring)."""
    return _monotonic_writes(_Model(ops, read_fs))


def _monotonic_writes(m: _Model) -> GuaranteeResult:
    return _floor_check(
        m,
        "monotonic_writes",
        sets_floor=_is_ok_write,
        judged=_is_ok_write,
        scope=_global_if_log,
        version=_op_version(m),
        reason=lambda a, b: f"{describe_op(b)} is ordered before the earlier {describe_op(a)}",
    )


def writes_follow_reads(
    ops: Sequence[Operation], *, read_fs: Collection[str] = READ_FUNCTIONS
) -> GuaranteeResult:
    """Writes follow reads, per key, and across keys with log indexes (module docstring)."""
    return _writes_follow_reads(_Model(ops, read_fs))


def _writes_follow_reads(m: _Model) -> GuaranteeResult:
    return _floor_check(
        m,
        "writes_follow_reads",
        sets_floor=lambda o: _is_read(m, o),
        judged=_is_ok_write,
        scope=_global_if_log,
        version=_op_version(m),
        reason=lambda r, w: (
            f"{describe_op(w)} is ordered before the version of the earlier {describe_op(r)}"
        ),
    )


def consistent_prefix(
    ops: Sequence[Operation], *, read_fs: Collection[str] = READ_FUNCTIONS
) -> GuaranteeResult:
    """A session's reads see a growing prefix of the store's global write order (module
    docstring). Reads of keys without a store order are skipped."""
    return _consistent_prefix(_Model(ops, read_fs))


def _consistent_prefix(m: _Model) -> GuaranteeResult:
    violations: list[SessionViolation] = []
    checked = skipped = 0
    for _process, sops in sorted(m.sessions().items(), key=lambda kv: str(kv[0])):
        frontier: dict[tuple[str, str | None], tuple[Rank, Operation]] = {}  # (kind, node)
        for r in sops:
            if not _is_read(m, r):
                continue
            assert r.key is not None
            v = m.read_version[id(r)]
            if v.kind == "real-time":
                skipped += 1
                continue
            checked += 1
            f = frontier.get((v.kind, r.node))
            if f is not None and r.key in m.ok_ranks:
                ranks, oks = m.ok_ranks[r.key]
                pos = bisect.bisect_right(ranks, f[0]) - 1
                if pos >= 0 and v.hi < ranks[pos]:
                    w = oks[pos]
                    violations.append(
                        SessionViolation(
                            guarantee="consistent_prefix",
                            process=r.process,
                            key=r.key,
                            ops=(f[1], w, r),
                            reason=f"{describe_op(r)} is older than {describe_op(w)}, "
                            f"which is ordered before what the earlier {describe_op(f[1])} "
                            "saw",
                        )
                    )
            if f is None or f[0] < v.lo:
                frontier[(v.kind, r.node)] = (v.lo, r)
    return m.result("consistent_prefix", violations, checked, skipped=skipped)


def bounded_staleness(
    ops: Sequence[Operation],
    bound_ms: float,
    *,
    read_fs: Collection[str] = READ_FUNCTIONS,
    store_order: bool = True,
) -> GuaranteeResult:
    """Every ``ok`` read's value was current within ``bound_ms`` before the read (module
    docstring); also the distribution of staleness and versions behind over all reads.
    ``store_order=False`` ignores the stores' orders and judges by real time alone: with
    ``bound_ms = 0`` its violations are reads certainly not linearizable (a value read
    after a write of another value that began after it and completed before the read), also
    where last-writer-wins kept the older-stamped value."""
    return _bounded_staleness(_Model(ops, read_fs, store_order=store_order), bound_ms)


def _bounded_staleness(m: _Model, bound_ms: float) -> GuaranteeResult:
    bound_ns = bound_ms * 1e6
    violations: list[SessionViolation] = []
    samples_ms: list[float] = []
    behind: list[int] = []
    for r in m.ops:
        if not _is_read(m, r):
            continue
        assert r.key is not None
        oks, invokes = m.ok_by_invoke.get(r.key, ([], []))
        value = _freeze(r.result)
        best_sup = -math.inf  # latest instant the value was possibly current (capped)
        fewest = math.inf
        best_w: Operation | None = None
        for s in m.read_sources(r):
            s_complete = -math.inf if s is None else s.complete_time
            sup = float(r.invoke_time)
            n = 0
            first: Operation | None = None
            hi = bisect.bisect_left(invokes, r.invoke_time)
            s_version = None if s is None else m.write_version(s)
            if s is not None and s.type == "ok" and m.key_kind(r.key) != "real-time":
                assert s_version is not None
                # The store ordered the writes: every ok write it placed after s replaced
                # s's value when it completed, however the two overlapped in real time.
                cands = [w for w in oks[:hi] if _older(s_version, m.write_version(w))]
            else:
                # Real time: only ok writes invoked in (s_complete, r.invoke) can overwrite
                # s before r; of those, none the store placed before s.
                lo = bisect.bisect_right(invokes, s_complete)
                cands = [
                    w
                    for w in oks[lo:hi]
                    if s_version is None or not _older(m.write_version(w), s_version)
                ]
            for w in cands:
                if _freeze(written_value(w)) == value:
                    continue
                if w.complete_time < sup:
                    sup, first = w.complete_time, w
                if w.complete_time < r.invoke_time:
                    n += 1
            if sup > best_sup:
                best_sup, best_w = sup, first
            fewest = min(fewest, n)
        lag = max(0.0, r.invoke_time - best_sup)
        samples_ms.append(lag / 1e6)
        behind.append(int(fewest))
        if lag > bound_ns:
            assert best_w is not None
            violations.append(
                SessionViolation(
                    guarantee="bounded_staleness",
                    process=r.process,
                    key=r.key,
                    ops=(best_w, r),
                    reason=f"{describe_op(r)} is {lag / 1e6:.3f} ms stale (bound {bound_ms} ms, "
                    f"{int(fewest)} version(s) behind): overwritten by {describe_op(best_w)}",
                )
            )
    stats = StalenessStats(
        bound_ms=bound_ms,
        reads=len(samples_ms),
        stale=sum(1 for x in samples_ms if x > 0),
        over_bound=len(violations),
        median_ms=_median(samples_ms),
        p99_ms=_percentile(samples_ms, 0.99),
        max_ms=max(samples_ms, default=0.0),
        versions_behind_median=_median([float(b) for b in behind]),
        versions_behind_p99=_percentile([float(b) for b in behind], 0.99),
        versions_behind_max=max(behind, default=0),
        staleness_ms=tuple(samples_ms),
        versions_behind=tuple(behind),
    )
    return m.result("bounded_staleness", violations, len(samples_ms), staleness=stats)


def eventual(
    final_values: Mapping[str, Mapping[str, Json]],
    ops: Sequence[Operation] | None = None,
) -> GuaranteeResult:
    """After quiescence all nodes agree on every key (``final_values``: node -> key ->
    value; a key missing on a node is absent). With ``ops``, the agreed value must also be
    one some non-failed write wrote, or absent."""
    return _eventual(_Model(ops or [], READ_FUNCTIONS), final_values, ops is not None)


def _eventual(
    m: _Model, final_values: Mapping[str, Mapping[str, Json]], judge_values: bool
) -> GuaranteeResult:
    keys = sorted({k for vals in final_values.values() for k in vals})
    violations: list[SessionViolation] = []
    for key in keys:
        held = {node: vals.get(key) for node, vals in sorted(final_values.items())}
        distinct = {_freeze(v) for v in held.values()}
        writers = m.sources.get(key, {})
        related = tuple(w for v in distinct for w in writers.get(v, []))
        if len(distinct) > 1:
            shown = ", ".join(f"{n}={_fmt_value(v)}" for n, v in held.items())
            violations.append(
                SessionViolation(
                    guarantee="eventual",
                    process=None,
                    key=key,
                    ops=related,
                    reason=f"nodes disagree after quiescence: {shown}",
                )
            )
        elif judge_values:
            (value,) = distinct
            if value is not None and value not in writers:
                violations.append(
                    SessionViolation(
                        guarantee="eventual",
                        process=None,
                        key=key,
                        ops=(),
                        reason=f"all nodes converged on {_fmt_value(next(iter(held.values())))}, "
                        "which no operation wrote",
                    )
                )
    return m.result("eventual", violations, len(keys))


def check_sessions(
    ops: Sequence[Operation],
    *,
    bound_ms: float | None = None,
    final_values: Mapping[str, Mapping[str, Json]] | None = None,
    read_fs: Collection[str] = READ_FUNCTIONS,
) -> dict[str, GuaranteeResult]:
    """All the guarantees in :data:`GUARANTEES` order (bounded staleness with ``bound_ms``,
    eventual with ``final_values``, when given)."""
    m = _Model(ops, read_fs)
    out = {
        "read_my_writes": _read_my_writes(m),
        "monotonic_reads": _monotonic_reads(m),
        "monotonic_writes": _monotonic_writes(m),
        "writes_follow_reads": _writes_follow_reads(m),
        "consistent_prefix": _consistent_prefix(m),
    }
    if bound_ms is not None:
        out["bounded_staleness"] = _bounded_staleness(m, bound_ms)
    if final_values is not None:
        out["eventual"] = _eventual(m, final_values, True)
    return out
