"""Divergence measured by what differs: each replica's lag behind the acknowledged writes,
the keys on which the replicas disagree, and the acknowledged writes LWW discarded.

Theory of operation
-------------------
Digest equality says only *whether* two replicas differ; under load an AP store's digests
always differ (some write is always in flight), so it cannot show a partition. Instead,
for every sample of ``digests.jsonl`` that says what each replica holds, :func:`lag_series`
counts, per node, the *acknowledged* writes (``ok`` completions that completed before the
sample began) the node has not seen yet, and the age of the oldest of them. How a node
shows what it has seen depends on the store:

raft     the sample's ``applied`` (``Status.applied_index`` per node): a node has seen an
         ``ok`` mutation (write, cas, delete, incr) iff ``applied >= w.log_index`` (the
         history's ``log_index``: the response header's index). Mutations without a
         ``log_index`` (histories older than that field) are not counted.
gossip   the sample's ``seen`` (taken from ``Cluster.Dump`` of every node, every few
         samples, when the store holds few keys): per node and key, a register's HLC
         timestamp ``[wall_ms, logical, node]`` (tombstones included), or a counter's
         per-component totals ``{"p": {component: total}, "n": {...}}`` (``n`` only when
         not empty). A node has seen a register write/delete/cas ``w`` of key ``k`` iff its
         timestamp for ``k`` is ``>= w.hlc`` (LWW: a newer write dominates an older one,
         whether or not the older one ever arrived). A key the node does not hold counts
         as seen up to the greatest timestamp of an acknowledged delete of it (its
         tombstone may have been collected). Counters: the increments a client made on node
         ``o`` go to component ``o`` (``o/<epoch>`` after ``o`` lost its data; all of
         ``o``'s components are summed); the acknowledged increments of ``o``, in
         completion order, have cumulative totals, and a node has seen those whose
         cumulative total is within its sum of ``o``'s components (positive deltas against
         ``p``, negative ones against ``n``). Indeterminate increments that took effect
         make that count an under-estimate.

``differing_keys`` is recorded by the sampler (:func:`differing_keys`): the keys whose
content (type and value; a tombstone is absent) is not the same on every node whose Dump
answered. Samples without those fields (Status only, or an old file) give no point
(gossip) or a point with ``differing_keys`` None (raft).

:func:`time_to_converge` is the one definition of convergence time the report uses: from
the heal to the first sample at which every node has seen every write acknowledged before
the heal (the oldest write a node misses, if any, completed at or after the heal).

LWW discards (:func:`lww_discards`). Given each register's converged value, an ``ok``
write-like operation ``w`` whose value is not the final one is *superseded* when some
``ok`` or ``info`` (it may have taken effect) write-like operation ``w2`` of the key
followed it in real time (``w`` completed before ``w2`` began) and could have seen it:
both were made on the same side of a
partition, or either was made while no partition was in force. Otherwise ``w`` was
*discarded*: nobody who could have read it overwrote it; last-writer-wins merged it away
(the losing side's last writes in a partition, or a write concurrent with the winner).
The *winner* is the operation that wrote the final value with the greatest timestamp.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from caplab.v1 import kv_pb2
from harness.checker.linearizable import written_value
from harness.history import Hlc, Json, Operation

REGISTER_FUNCTIONS = ("write", "cas", "delete")
RAFT_MUTATIONS = ("write", "cas", "delete", "incr")
DEFAULT_FINAL_READ_PROCESS = 1_000_000  # harness.runner: final (LOCAL) reads from here on


@dataclass(frozen=True, kw_only=True)
class LagPoint:
    """One sample's lag: per node, acknowledged writes not seen yet and the oldest one's age."""

    t_s: float  # sample time, seconds since t0 (the history's zero)
    missing: Mapping[str, int]  # node -> acknowledged writes it has not seen (answering nodes)
    oldest_ms: Mapping[str, float]  # node -> age (ms, at the sample) of the oldest; 0.0: none
    differing_keys: int | None  # keys on which the answering replicas disagree (None: unknown)

    @property
    def max_missing(self) -> int:
        return max(self.missing.values(), default=0)

    @property
    def max_oldest_ms(self) -> float:
        return max(self.oldest_ms.values(), default=0.0)


# -- sampler side: what a Dump shows -------------------------------------------------------
def _totals(exact: Mapping[str, str], saturated: Mapping[str, int]) -> dict[str, Json]:
    if exact:
        return {c: int(v) for c, v in sorted(exact.items())}
    return {c: int(v) for c, v in sorted(saturated.items())}


def entry_view(entry: kv_pb2.DumpEntry) -> Json:
    """What a gossip Dump entry tells about the writes its node has seen (module docstring):
    ``[wall_ms, logical, node]`` for a register, ``{"p": {...}[, "n": {...}]}`` for a
    counter."""
    if entry.type == kv_pb2.VALUE_TYPE_COUNTER:
        view: dict[str, Json] = {
            "p": _totals(entry.counter_increments_exact, entry.counter_increments)
        }
        n = _totals(entry.counter_decrements_exact, entry.counter_decrements)
        if n:
            view["n"] = n
        return view
    return [entry.hlc.wall_ms, entry.hlc.logical, entry.hlc.node_id]


def dump_views(entries: Iterable[kv_pb2.DumpEntry]) -> dict[str, Json]:
    """key -> :func:`entry_view` of one gossip node's Dump."""
    return {e.key: entry_view(e) for e in entries}


def entry_content(entry: kv_pb2.DumpEntry) -> tuple[str, str | bytes] | None:
    """What a reader sees in an entry (None: absent, e.g. a tombstone)."""
    if entry.type == kv_pb2.VALUE_TYPE_COUNTER:
        return ("counter", entry.counter_exact or str(entry.counter))
    if entry.tombstone:
        return None
    return ("register", entry.value)


def differing_keys(dumps: Mapping[str, Sequence[kv_pb2.DumpEntry]]) -> int:
    """Keys whose content is not the same on every dumped node (absent on some counts)."""
    contents = [{e.key: entry_content(e) for e in entries} for entries in dumps.values()]
    keys = set().union(*contents) if contents else set()
    return sum(1 for k in keys if len({repr(c.get(k)) for c in contents}) > 1)


# -- analysis side ---------------------------------------------------------------------------
def _is_client(op: Operation, final_process: int) -> bool:
    return isinstance(op.process, int) and op.process < final_process


@dataclass(frozen=True, kw_only=True)
class _Ack:
    done_s: float  # completion time, seconds since t0
    rank: tuple[Any, ...]  # raft: (log_index,), registers: hlc, counters: (cumulative,)


class _Prefix:
    """Acknowledged writes of one group (one key, one counter origin, ...), taken in
    completion order; ``missing(seen)`` = those ranked above ``seen``."""

    def __init__(self, acks: list[_Ack], *, sorted_by_rank: bool) -> None:
        self._acks = sorted(acks, key=lambda a: a.done_s)
        self._next = 0
        self._sorted_by_rank = sorted_by_rank  # ranks grow with completion order already
        self._ranks: list[tuple[Any, ...]] = []
        self._done: list[float] = []

    def advance(self, t_s: float) -> None:
        """Take in the writes completed before ``t_s``."""
        while self._next < len(self._acks) and self._acks[self._next].done_s < t_s:
            a = self._acks[self._next]
            self._next += 1
            if self._sorted_by_rank:
                self._ranks.append(a.rank)
                self._done.append(a.done_s)
            else:
                pos = bisect.bisect_right(self._ranks, a.rank)
                self._ranks.insert(pos, a.rank)
                self._done.insert(pos, a.done_s)

    def missing(self, seen: tuple[Any, ...] | None) -> tuple[int, float]:
        """(count, completion time of the oldest) of the writes ranked above ``seen``."""
        pos = 0 if seen is None else bisect.bisect_right(self._ranks, seen)
        n = len(self._ranks) - pos
        if n <= 0:
            return 0, math.inf
        if self._sorted_by_rank:
            return n, self._done[pos]  # completion order: the first is the oldest
        return n, min(self._done[pos:])


def _raft_groups(ops: Sequence[Operation], final_process: int) -> list[_Ack]:
    return [
        _Ack(done_s=op.complete_time / 1e9, rank=(op.log_index,))
        for op in ops
        if op.type == "ok"
        and op.f in RAFT_MUTATIONS
        and op.log_index is not None
        and _is_client(op, final_process)
    ]


def _hlc_rank(h: Sequence[Any]) -> tuple[Any, ...]:
    return (int(h[0]), int(h[1]), str(h[2]))


def _component_sum(totals: Json, origin: str) -> int:
    if not isinstance(totals, dict):
        return 0
    return sum(
        v
        for c, v in totals.items()
        if isinstance(v, int) and (c == origin or c.startswith(origin + "/"))
    )


def lag_series(
    store: str,
    ops: Sequence[Operation],
    samples: Sequence[Mapping[str, Any]],
    *,
    final_process: int = DEFAULT_FINAL_READ_PROCESS,
) -> list[LagPoint]:
    """Per sample that shows what the nodes have seen: each node's missing acknowledged
    writes, the age of the oldest, and the differing keys (module docstring)."""
    ordered = sorted(samples, key=lambda s: int(s["time_ns"]))
    points: list[LagPoint] = []
    if store == "raft":
        prefix = _Prefix(_raft_groups(ops, final_process), sorted_by_rank=False)
        for s in ordered:
            applied = s.get("applied")
            if not isinstance(applied, Mapping):
                continue
            t_s = int(s["time_ns"]) / 1e9
            prefix.advance(t_s)
            missing: dict[str, int] = {}
            oldest: dict[str, float] = {}
            for node, a in applied.items():
                if not isinstance(a, int):
                    continue
                n, done = prefix.missing((a,))
                missing[node] = n
                oldest[node] = 0.0 if n == 0 else max(0.0, (t_s - done) * 1000)
            points.append(_point(t_s, missing, oldest, s.get("differing_keys")))
        return points
    registers: dict[str, list[_Ack]] = {}
    deletes: dict[str, list[tuple[float, tuple[Any, ...]]]] = {}
    origins: dict[tuple[str, str, str], list[Operation]] = {}  # (key, origin, p|n)
    for op in ops:
        if op.type != "ok" or op.key is None or not _is_client(op, final_process):
            continue
        if op.f in REGISTER_FUNCTIONS and op.hlc is not None:
            ack = _Ack(done_s=op.complete_time / 1e9, rank=_hlc_rank(op.hlc))
            registers.setdefault(op.key, []).append(ack)
            if op.f == "delete":
                deletes.setdefault(op.key, []).append((ack.done_s, ack.rank))
        elif op.f == "incr" and op.node is not None and isinstance(op.value, int) and op.value:
            sign = "p" if op.value > 0 else "n"
            origins.setdefault((op.key, op.node, sign), []).append(op)
    reg_prefix = {k: _Prefix(v, sorted_by_rank=False) for k, v in registers.items()}
    ctr_prefix: dict[tuple[str, str, str], _Prefix] = {}
    for group, incrs in origins.items():
        incrs.sort(key=lambda o: o.complete_time)
        acks: list[_Ack] = []
        total = 0
        for o in incrs:
            assert isinstance(o.value, int)
            total += abs(o.value)
            acks.append(_Ack(done_s=o.complete_time / 1e9, rank=(total,)))
        ctr_prefix[group] = _Prefix(acks, sorted_by_rank=True)
    for dl in deletes.values():
        dl.sort()
    for s in ordered:
        seen_all = s.get("seen")
        if not isinstance(seen_all, Mapping):
            continue
        t_s = int(s["time_ns"]) / 1e9
        for p in (*reg_prefix.values(), *ctr_prefix.values()):
            p.advance(t_s)
        missing = {}
        oldest = {}
        for node, views in seen_all.items():
            if not isinstance(views, Mapping):
                continue
            count, first = 0, math.inf
            for key, prefix in reg_prefix.items():
                view = views.get(key)
                seen: tuple[Any, ...] | None
                if isinstance(view, list) and len(view) == 3:
                    seen = _hlc_rank(view)
                else:  # absent: seen up to its latest acknowledged delete (collected)
                    ranks = [r for done, r in deletes.get(key, []) if done < t_s]
                    seen = max(ranks) if ranks else None
                n, done = prefix.missing(seen)
                count += n
                first = min(first, done)
            for (key, origin, sign), prefix in ctr_prefix.items():
                view = views.get(key)
                got = _component_sum(view.get(sign), origin) if isinstance(view, dict) else 0
                n, done = prefix.missing((got,))
                count += n
                first = min(first, done)
            missing[node] = count
            oldest[node] = 0.0 if count == 0 else max(0.0, (t_s - first) * 1000)
        points.append(_point(t_s, missing, oldest, s.get("differing_keys")))
    return points


def _point(
    t_s: float, missing: dict[str, int], oldest: dict[str, float], differing: object
) -> LagPoint:
    return LagPoint(
        t_s=t_s,
        missing=missing,
        oldest_ms={n: round(v, 3) for n, v in oldest.items()},
        differing_keys=differing if isinstance(differing, int) else None,
    )


def time_to_converge(points: Sequence[LagPoint], heal_s: float) -> float | None:
    """Seconds from ``heal_s`` to the first sample (at or after it) at which every node
    has seen every write acknowledged before ``heal_s`` (None: never). "Every node": all
    nodes that appear anywhere in ``points``; a sample some of them did not answer does not
    count."""
    nodes = set().union(*(p.missing for p in points)) if points else set()
    for p in sorted(points, key=lambda p: p.t_s):
        if p.t_s < heal_s or set(p.missing) != nodes:
            continue
        # the oldest write a node misses completed at t_s - oldest_ms (rounded to the us):
        # after the heal is fine
        if all(p.missing[n] == 0 or p.t_s - p.oldest_ms[n] / 1000 >= heal_s - 2e-6 for n in nodes):
            return round(p.t_s - heal_s, 3)
    return None


# -- LWW discards ----------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class LwwDiscard:
    """An acknowledged write that last-writer-wins discarded, and the write that won."""

    key: str
    lost_value: Json
    lost_hlc: Hlc | None
    lost_node: str
    lost_side: str | None
    lost_at_s: float  # completion time, seconds since t0
    winner_value: Json
    winner_hlc: Hlc | None
    winner_node: str
    winner_side: str | None
    winner_at_s: float  # completion time (invoke time if the winner is indeterminate)

    def describe(self) -> str:
        def side(s: str | None) -> str:
            return f"the {s} side" if s else "no partition"

        def ts(h: Hlc) -> str:
            return f"{h[0]}.{h[1]}@{h[2]}"

        def val(v: Json) -> str:
            return "absent (delete)" if v is None else repr(v)

        return (
            f"{self.key}: {val(self.lost_value)} written on {self.lost_node} "
            f"({side(self.lost_side)}) and acknowledged at {self.lost_at_s:.3f}s "
            + ("" if self.lost_hlc is None else f"with timestamp {ts(self.lost_hlc)} ")
            + "was "
            f"discarded for {val(self.winner_value)} written on {self.winner_node} "
            f"({side(self.winner_side)}) at {self.winner_at_s:.3f}s "
            + (
                "(a write whose outcome was unknown to its client; it took effect)."
                if self.winner_hlc is None
                else f"with the later timestamp {ts(self.winner_hlc)}."
            )
        )

    def to_json(self) -> dict[str, Json]:
        return {
            "key": self.key,
            "lost_value": self.lost_value,
            "lost_hlc": None if self.lost_hlc is None else list(self.lost_hlc),
            "lost_node": self.lost_node,
            "lost_side": self.lost_side,
            "lost_at_s": round(self.lost_at_s, 6),
            "winner_value": self.winner_value,
            "winner_hlc": None if self.winner_hlc is None else list(self.winner_hlc),
            "winner_node": self.winner_node,
            "winner_side": self.winner_side,
            "winner_at_s": round(self.winner_at_s, 6),
            "description": self.describe(),
        }


def _superseded(w: Operation, last_invoke: Mapping[str | None, float]) -> bool:
    """Some ok write followed ``w`` in real time where ``w`` was visible: on its side, or
    with no partition in force (``last_invoke``: side -> latest invoke of an ok write)."""
    if w.side is None:
        latest = max(last_invoke.values(), default=-math.inf)
    else:
        latest = max(last_invoke.get(w.side, -math.inf), last_invoke.get(None, -math.inf))
    return w.complete_time < latest


def _done_s(op: Operation) -> float:
    """Completion time in seconds (the invoke time of an indeterminate operation)."""
    t = op.invoke_time if math.isinf(op.complete_time) else op.complete_time
    return t / 1e9


def _hlc_key(op: Operation) -> tuple[int, int, str]:
    return op.hlc if op.hlc is not None else (-1, 0, "")


def lww_discards(
    ops: Sequence[Operation],
    final_values: Mapping[str, Json],
    *,
    final_process: int = DEFAULT_FINAL_READ_PROCESS,
) -> list[LwwDiscard]:
    """The acknowledged writes last-writer-wins discarded (module docstring), per key of
    ``final_values`` (key -> converged value, None = absent), in completion order."""
    by_key: dict[str, list[Operation]] = {}
    for op in ops:
        if (
            op.key is not None
            and op.key in final_values
            and op.f in REGISTER_FUNCTIONS
            and op.type != "fail"
            and _is_client(op, final_process)
        ):
            by_key.setdefault(op.key, []).append(op)
    out: list[LwwDiscard] = []
    for key in sorted(by_key):
        writes = by_key[key]
        final = final_values[key]
        winners = [w for w in writes if written_value(w) == final]
        if not winners:
            continue  # the initial state, or a value nobody wrote: nothing to compare with
        winner = max(winners, key=lambda w: (w.type == "ok", _hlc_key(w)))
        oks = [w for w in writes if w.type == "ok"]
        # A write whose outcome is unknown (info) may have taken effect: invoked after ``w``
        # completed on w's side, it may have overwritten ``w`` in order, so w is not counted.
        last_invoke: dict[str | None, float] = {}
        for w in writes:
            last_invoke[w.side] = max(last_invoke.get(w.side, -math.inf), w.invoke_time)
        for w in oks:
            if written_value(w) == final or _superseded(w, last_invoke):
                continue
            out.append(
                LwwDiscard(
                    key=key,
                    lost_value=written_value(w),
                    lost_hlc=w.hlc,
                    lost_node=w.node or "?",
                    lost_side=w.side,
                    lost_at_s=w.complete_time / 1e9,
                    winner_value=final,
                    winner_hlc=winner.hlc,
                    winner_node=winner.node or "?",
                    winner_side=winner.side,
                    winner_at_s=_done_s(winner),
                )
            )
    out.sort(key=lambda d: (d.lost_at_s, d.key))
    return out


def final_register_values(
    ops: Sequence[Operation], *, final_process: int = DEFAULT_FINAL_READ_PROCESS
) -> dict[str, Json]:
    """key -> the value most nodes returned in the runner's final register reads (``ok``
    reads of processes from ``final_process`` on), for :func:`lww_discards`."""
    votes: dict[str, dict[str, int]] = {}
    values: dict[str, Json] = {}
    for op in ops:
        if (
            op.f == "read"
            and op.type == "ok"
            and op.key is not None
            and isinstance(op.process, int)
            and op.process >= final_process
        ):
            tag = repr(op.result)
            values[tag] = op.result
            per = votes.setdefault(op.key, {})
            per[tag] = per.get(tag, 0) + 1
    return {k: values[max(per, key=lambda t: per[t])] for k, per in votes.items()}
