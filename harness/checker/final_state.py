"""No resurrection, no lost last write: an AP store's converged registers against the
timestamps of the acknowledged writes.

Theory of operation
-------------------
A last-writer-wins register keeps, of all the writes (puts and deletes) it merged, the one
with the greatest timestamp. The gossip store answers every put and delete with the hybrid
logical clock timestamp it gave the write (recorded as ``hlc`` on the ``ok`` event). Once
the replicas have converged, every register must hold, on every replica, either

* the outcome of the *last acknowledged write*, the ``ok`` write/delete/cas with the
  greatest timestamp: absent if it was a delete (a tombstone, or nothing once the
  tombstone is collected), its value if it was a put; or
* the outcome of an *indeterminate* write (``info``: it may have been applied, with any
  timestamp, possibly a greater one): its value, or absent for a delete.

Anything else is a violation, named after what it means for a user:

``resurrection``  the last acknowledged write was a delete, but a replica holds the value of
                  an older acknowledged put: the delete was undone (e.g. its tombstone was
                  collected while a replica still held the older value, which came back);
``lost``          the last acknowledged write was a put, but a replica holds the outcome of
                  an older write (another value, or absent after an older delete);
``unexplained``   a value that no write (acknowledged or indeterminate) wrote;
``disagreement``  the replicas hold different outcomes (each one explained on its own).

A key whose final read failed on some node cannot be judged there, nor can a key with an
acknowledged write that carries no timestamp: the verdict is then ``"unknown"`` unless a
violation was found. The order is the store's own (HLC), not real time: a write that lost
to a concurrent one, or to a clock running ahead, is not a violation here (the staleness
checker counts those as LWW losers).
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass

from harness.checker.linearizable import Validity, _freeze, fmt_value, written_value
from harness.history import Hlc, Json, Operation

WRITE_FUNCTIONS = ("write", "delete", "cas")
OK, INDETERMINATE, UNKNOWN = "ok", "indeterminate", "unknown"
VIOLATIONS = ("resurrection", "lost", "unexplained", "disagreement")


def fmt_hlc(ts: Hlc | None) -> str:
    """``wall_ms.logical@node`` (as ``caplab kv`` prints it), or ``no timestamp``."""
    return "no timestamp" if ts is None else f"{ts[0]}.{ts[1]}@{ts[2]}"


def describe_write(op: Operation) -> str:
    """e.g. ``delete at 1712.3@n2 by process 4 on n2``."""
    what = "delete" if op.f == "delete" else f"{op.f} {fmt_value(written_value(op))}"
    return f"{what} at {fmt_hlc(op.hlc)} by process {op.process} on {op.node}"


@dataclass(frozen=True, slots=True)
class KeyFinal:
    """The verdict on one register."""

    key: str
    verdict: str  # ok | indeterminate | unknown | one of VIOLATIONS
    last: Operation | None  # the last acknowledged write (greatest timestamp), if any
    expected: Json  # its outcome: the value, None = absent
    finals: Mapping[str, Json]  # node -> value it holds (None = absent); failed reads left out
    reason: str


@dataclass(frozen=True, slots=True)
class FinalStateResult:
    """Result of :func:`check_final_registers`."""

    valid: Validity
    keys: Mapping[str, KeyFinal]
    acknowledged: int  # acknowledged writes (puts, deletes, cas) on the judged keys
    deletes_acknowledged: int
    deleted_keys: tuple[str, ...]  # keys whose last acknowledged write is a delete

    @property
    def violations(self) -> tuple[KeyFinal, ...]:
        return tuple(k for k in self.keys.values() if k.verdict in VIOLATIONS)

    def summary(self) -> str:
        """A few lines for a report or CLI."""
        bad = self.violations
        head = (
            f"final state: {self.valid} ({len(self.keys)} keys, {self.acknowledged} "
            f"acknowledged writes of which {self.deletes_acknowledged} deletes; "
            f"{len(self.deleted_keys)} keys deleted at the end"
        )
        counts = {v: sum(1 for k in bad if k.verdict == v) for v in VIOLATIONS}
        head += "".join(f", {n} {v}" for v, n in counts.items() if n) + ")"
        lines = [head]
        lines += [f"{k.key}: {k.verdict.upper()}: {k.reason}" for k in bad]
        unknown = [k for k in self.keys.values() if k.verdict == UNKNOWN]
        lines += [f"{k.key}: unknown: {k.reason}" for k in unknown]
        return "\n".join(lines)


def check_final_registers(
    ops: Sequence[Operation],
    finals: Mapping[str, Mapping[str, Json]],
    nodes: Collection[str] | None = None,
) -> FinalStateResult:
    """Judge the final register values ``finals`` (node -> key -> value, None = absent;
    a key left out = its read failed) against the acknowledged writes in ``ops``.

    ``nodes`` (default: those of ``finals``) must all have been read: a node missing from
    ``finals`` makes every key unknown.
    """
    expected_nodes = sorted(nodes if nodes is not None else finals)
    by_key: dict[str, list[Operation]] = {}
    for op in ops:
        if op.f in WRITE_FUNCTIONS and op.key is not None and op.type != "fail":
            by_key.setdefault(op.key, []).append(op)
    keys = sorted({k for values in finals.values() for k in values} | set(by_key))
    out: dict[str, KeyFinal] = {}
    acknowledged = deletes = 0
    deleted: list[str] = []
    for key in keys:
        writes = by_key.get(key, [])
        acked = [w for w in writes if w.type == "ok"]
        acknowledged += len(acked)
        deletes += sum(1 for w in acked if w.f == "delete")
        held = {n: finals[n][key] for n in expected_nodes if n in finals and key in finals[n]}
        kf = _judge_key(key, writes, acked, held, expected_nodes)
        if kf.last is not None and kf.last.f == "delete":
            deleted.append(key)
        out[key] = kf
    valid: Validity = True
    if any(k.verdict in VIOLATIONS for k in out.values()):
        valid = False
    elif any(k.verdict == UNKNOWN for k in out.values()):
        valid = "unknown"
    return FinalStateResult(valid, out, acknowledged, deletes, tuple(deleted))


def _judge_key(
    key: str,
    writes: list[Operation],
    acked: list[Operation],
    held: Mapping[str, Json],
    nodes: Sequence[str],
) -> KeyFinal:
    untimed = [w for w in acked if w.hlc is None]
    timed = [w for w in acked if w.hlc is not None]
    last = max(timed, key=lambda w: w.hlc or (0, 0, "")) if timed else None
    expected = written_value(last) if last is not None else None
    indeterminate = {_freeze(written_value(w)) for w in writes if w.type == "info"}
    by_value: dict[Hashable, list[Operation]] = {}
    for w in acked:
        by_value.setdefault(_freeze(written_value(w)), []).append(w)

    def result(verdict: str, reason: str) -> KeyFinal:
        return KeyFinal(key, verdict, last, expected, dict(held), reason)

    last_text = "nothing was acknowledged" if last is None else describe_write(last)
    holders: dict[Hashable, list[str]] = {}
    for node, v in held.items():
        holders.setdefault(_freeze(v), []).append(node)
    problems: list[tuple[str, str]] = []
    explained_by_info = False
    for fv, who in holders.items():
        v = held[who[0]]
        nodes_text = f"{', '.join(who)} {'holds' if len(who) == 1 else 'hold'} {fmt_value(v)}"
        if fv == _freeze(expected):
            continue
        if fv in indeterminate:
            explained_by_info = True
            continue
        if untimed:
            if fv not in by_value and v is not None:
                problems.append(("unexplained", f"{nodes_text}, which no write wrote to {key!r}"))
            continue
        older = by_value.get(fv)
        if older:
            w = max(older, key=lambda o: o.hlc or (0, 0, ""))
            if last is not None and last.f == "delete":
                problems.append(
                    (
                        "resurrection",
                        f"{nodes_text} ({describe_write(w)}), but the key was deleted by a "
                        f"later acknowledged write: {last_text}",
                    )
                )
            else:
                problems.append(
                    (
                        "lost",
                        f"{nodes_text} ({describe_write(w)}), older than the last "
                        f"acknowledged write: {last_text}",
                    )
                )
        elif v is None:
            problems.append(
                ("lost", f"{nodes_text}, but the last acknowledged write was {last_text}")
            )
        else:
            problems.append(("unexplained", f"{nodes_text}, which no write wrote to {key!r}"))
    if problems:
        verdict = problems[0][0]
        return result(verdict, "; ".join(text for _, text in problems))
    if len({_freeze(v) for v in held.values()}) > 1:
        values = ", ".join(f"{n}: {fmt_value(v)}" for n, v in sorted(held.items()))
        return result("disagreement", f"the replicas hold different values: {values}")
    missing = [n for n in nodes if n not in held]
    if missing:
        return result(UNKNOWN, f"no final read from {', '.join(missing)}")
    if untimed:
        return result(
            UNKNOWN, f"{len(untimed)} acknowledged writes carry no timestamp to order them by"
        )
    if explained_by_info:
        value = next(iter(held.values())) if held else None
        return result(
            INDETERMINATE,
            f"holds {fmt_value(value)}, written by an operation whose outcome is unknown "
            f"(possibly with a later timestamp than the last acknowledged write: {last_text})",
        )
    return result(OK, f"holds {fmt_value(expected)} as the last acknowledged write: {last_text}")
