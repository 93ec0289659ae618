"""Linearizability checker for register histories (read / write / cas / delete per key).

Theory of operation
-------------------
This is the Wing-Gong search with Lowe's memoization, laid out as Porcupine does:

* P-compositionality: linearizability is local, so each key is checked on its own.
* For one key, every operation becomes a *call* entry at its invoke time and (if it
  completed ``ok``) a *return* entry at its completion time; entries are sorted by time
  (calls before returns on ties, so touching intervals count as concurrent) and threaded on
  a doubly linked list (Python lists of prev/next indices, with head and tail sentinels).
* The search walks the list from the head. At a call entry it tries to *linearize* the
  operation: if the register model allows it from the current state and the pair
  (set of linearized operations, new state) has not been seen before, the call and its
  return entry are *lifted* out of the list, the previous state is pushed on an explicit
  stack (no recursion) and the walk restarts at the head. Reaching a return entry means its
  operation had to be linearized by now but was not: pop the stack, *unlift* that entry
  (dancing links) and continue after it. The history is linearizable when every ``ok``
  operation has been linearized; it is not when the stack is empty at a return entry.
* The memo is a set of ``(bitset, state)`` with the bitset a Python int; equal
  configurations are explored once, which bounds the search.

Model (one register per key, initially absent = ``None``)::

    read   -> result r     legal iff state == r
    write(v)               state := v
    cas(e, n)  (ok)        legal iff state == e (e None = absent); state := n
    delete                 state := None

``fail`` operations did not happen and are dropped. ``info`` operations may or may not have
taken effect: they have a call entry but no return entry (return time +inf), so the search
may linearize them anywhere after their call, or never (the search succeeds once all ``ok``
operations are placed). ``info`` reads constrain nothing and are dropped, as are ``info``
writes/cas/deletes whose new value no ``ok`` read and no cas ever expects (placing such an
operation can never make a later operation legal, so skipping it loses no linearization).

On failure the counterexample is taken at the furthest point the search reached: the return
entry (in time order) past which no linearization could be extended. It reports the
longest linearizable prefix found there, the operation that could not be placed, the
operations concurrent with it and a reason in plain words.
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from harness.history import HistoryError, Json, Operation

Validity: TypeAlias = bool | Literal["unknown"]
REGISTER_FUNCTIONS: frozenset[str] = frozenset({"read", "write", "cas", "delete"})

_READ, _WRITE, _CAS, _DELETE = 0, 1, 2, 3
_CHECK_EVERY = 0x3FF  # check the clock every 1024 search steps
_MEMO_BYTES = 400_000_000  # rough memory budget of one key's memo


@dataclass(frozen=True, slots=True)
class Counterexample:
    """Why one key's history is not linearizable."""

    key: str
    op: Operation  # the operation that could not be placed
    prefix: tuple[Operation, ...]  # longest linearizable prefix, in linearization order
    state: Json  # register value after ``prefix`` (None = absent)
    concurrent: tuple[Operation, ...]  # operations on the key overlapping ``op``
    window: tuple[Operation, ...]  # last state-setting op of the prefix, op, concurrent ops
    reason: str


@dataclass(frozen=True, slots=True)
class KeyResult:
    """Result for one key."""

    key: str
    valid: Validity
    operations: int  # operations the search considered
    elapsed_s: float
    counterexample: Counterexample | None = None


@dataclass(frozen=True, slots=True)
class LinResult:
    """Result of :func:`check_register`.

    ``valid`` is False if any key is not linearizable, else ``"unknown"`` if the time budget
    ran out for some key, else True. ``counterexample`` is the first failing key's.
    """

    valid: Validity
    per_key: Mapping[str, KeyResult]
    counterexample: Counterexample | None
    elapsed_s: float
    operations: int = 0
    unknown_keys: tuple[str, ...] = field(default_factory=tuple)

    def summary(self) -> str:
        """A few lines for a report or CLI."""
        bad = [k for k, r in self.per_key.items() if r.valid is False]
        head = (
            f"linearizable: {self.valid} ({self.operations} operations, "
            f"{len(self.per_key)} keys, {self.elapsed_s:.2f}s)"
        )
        lines = [head]
        if bad:
            lines.append(f"not linearizable: keys {', '.join(bad)}")
        if self.unknown_keys:
            lines.append(f"unknown (time budget exhausted): {', '.join(self.unknown_keys)}")
        if self.counterexample is not None:
            lines.append(self.counterexample.reason)
        return "\n".join(lines)


def _freeze(v: Json) -> Hashable:
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    return v


def _thaw(v: Hashable) -> Json:
    if isinstance(v, tuple):
        return [_thaw(x) for x in v]
    if v is None or isinstance(v, bool | int | float | str):
        return v
    raise TypeError(f"not a register value: {v!r}")


def fmt_value(v: object) -> str:
    """A register value for humans: ``'v17'`` or ``absent``."""
    if v is None:
        return "absent"
    if isinstance(v, str):
        return f"'{v}'"
    return repr(v)


def fmt_time(t: float) -> str:
    """Nanoseconds since run start as seconds."""
    if math.isinf(t):
        return "never (indeterminate)"
    return f"{t / 1e9:.3f}s"


def _cas_args(op: Operation) -> tuple[Json, Json]:
    v = op.value
    if not isinstance(v, list) or len(v) != 2:
        raise HistoryError(f"event {op.index}: cas value must be [expected, new], got {v!r}")
    return v[0], v[1]


def written_value(op: Operation) -> Json:
    """The value a write-like operation (write / cas / delete) leaves in the register."""
    if op.f == "write":
        return op.value
    if op.f == "cas":
        return _cas_args(op)[1]
    return None


def describe(op: Operation) -> str:
    """Short description of an operation, e.g. ``write 'v3'`` or ``cas 'a'->'b'``."""
    if op.f == "read":
        return "read" if op.type != "ok" else f"read -> {fmt_value(op.result)}"
    if op.f == "write":
        return f"write {fmt_value(op.value)}"
    if op.f == "cas":
        e, n = _cas_args(op)
        return f"cas {fmt_value(e)}->{fmt_value(n)}"
    return f"a {op.f}"


def check_register(ops: Sequence[Operation], timeout_s: float = 10.0) -> LinResult:
    """Check that the register operations in ``ops`` are linearizable, key by key.

    ``ops`` may contain other functions (counters, nemesis): they are ignored. The time
    budget ``timeout_s`` covers the whole check; keys not decided in time are ``"unknown"``.
    """
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    by_key: dict[str, list[Operation]] = {}
    for op in ops:
        if op.f in REGISTER_FUNCTIONS and op.key is not None and op.type != "fail":
            by_key.setdefault(op.key, []).append(op)
    per_key: dict[str, KeyResult] = {}
    for key in sorted(by_key):
        per_key[key] = _check_key(key, by_key[key], deadline)
    valid: Validity = True
    if any(r.valid is False for r in per_key.values()):
        valid = False
    elif any(r.valid == "unknown" for r in per_key.values()):
        valid = "unknown"
    cex = next((r.counterexample for r in per_key.values() if r.counterexample), None)
    return LinResult(
        valid=valid,
        per_key=per_key,
        counterexample=cex,
        elapsed_s=time.monotonic() - t0,
        operations=sum(r.operations for r in per_key.values()),
        unknown_keys=tuple(k for k, r in per_key.items() if r.valid == "unknown"),
    )


def _check_key(key: str, key_ops: list[Operation], deadline: float) -> KeyResult:
    t0 = time.monotonic()
    # Values some operation compares the state against: only these make an info op useful.
    observed: set[Hashable] = set()
    for op in key_ops:
        if op.f == "read" and op.type == "ok":
            observed.add(_freeze(op.result))
        elif op.f == "cas":
            observed.add(_freeze(_cas_args(op)[0]))
    impossible = _impossible_read(key_ops)
    if impossible is not None:
        cex = _counterexample(key, key_ops, impossible, (), None)
        return KeyResult(key, False, len(key_ops), time.monotonic() - t0, cex)
    kept: list[Operation] = []
    for op in key_ops:
        if op.type == "info":
            if op.f == "read":
                continue
            if _freeze(written_value(op)) not in observed:
                continue
        kept.append(op)

    n = len(kept)
    kind: list[int] = []
    arg1: list[Hashable] = []
    arg2: list[Hashable] = []
    for op in kept:
        if op.f == "read":
            kind.append(_READ)
            arg1.append(_freeze(op.result))
            arg2.append(None)
        elif op.f == "write":
            kind.append(_WRITE)
            arg1.append(_freeze(op.value))
            arg2.append(None)
        elif op.f == "cas":
            e, nv = _cas_args(op)
            kind.append(_CAS)
            arg1.append(_freeze(e))
            arg2.append(_freeze(nv))
        else:
            kind.append(_DELETE)
            arg1.append(None)
            arg2.append(None)

    # Entries: (time, 0=call/1=return, op). Entry index == position in time order.
    raw: list[tuple[float, int, int]] = []
    for i, op in enumerate(kept):
        raw.append((op.invoke_time, 0, i))
        if op.type == "ok":
            raw.append((op.complete_time, 1, i))
    raw.sort()
    n_entries = len(raw)
    head, tail = n_entries, n_entries + 1
    ent_op = [i for _, _, i in raw] + [-1, -1]
    ent_call = [c == 0 for _, c, _ in raw] + [False, False]
    match = [-1] * (n_entries + 2)
    call_entry = [-1] * n
    for e, (_, c, i) in enumerate(raw):
        if c == 0:
            call_entry[i] = e
        else:
            match[call_entry[i]] = e
    # Linked list over entries 0..n_entries-1 in time order, between head and tail.
    nxt = [e + 1 for e in range(n_entries)] + [0 if n_entries else tail, -1]
    prv = [e - 1 for e in range(n_entries)] + [-1, n_entries - 1 if n_entries else head]
    if n_entries:
        nxt[n_entries - 1] = tail
        prv[0] = head
    bit = [1 << i for i in range(n)]
    # An info op is *dead* once every op comparing the state against its new value is
    # linearized (or dead): from then on placing it can help nothing, so configurations that
    # differ only in dead info ops are equivalent and their bits are masked out of the memo key.
    obs = [0] * n
    watchers: list[list[int]] = [[] for _ in range(n)]
    comparing: dict[Hashable, list[int]] = {}
    for j, op in enumerate(kept):
        if (kind[j] == _READ and op.type == "ok") or kind[j] == _CAS:
            comparing.setdefault(arg1[j], []).append(j)
    for w, op in enumerate(kept):
        if op.type == "info":
            for j in comparing.get(arg1[w] if kind[w] != _CAS else arg2[w], ()):
                if j != w:
                    obs[w] |= bit[j]
                    watchers[j].append(w)
    dead = 0
    # Memory budget for the memo (each entry holds an n-bit int): give up as "unknown".
    max_cache = _MEMO_BYTES // (n // 8 + 120)

    remaining = sum(1 for op in kept if op.type == "ok")
    lin = 0
    state: Hashable = None
    calls: list[tuple[int, Hashable, int]] = []
    cache: set[tuple[int, Hashable]] = set()
    best = -1
    best_prefix: list[int] = []
    best_state: Hashable = None
    steps = 0
    entry = nxt[head]
    # Phase 0 scans only reads (forced moves, see below), phase 1 only the other operations.
    phase = 0
    failed = False
    while remaining:
        steps += 1
        if not steps & _CHECK_EVERY and (time.monotonic() > deadline or len(cache) > max_cache):
            return KeyResult(key, "unknown", n, time.monotonic() - t0)
        if ent_call[entry]:
            i = ent_op[entry]
            k = kind[i]
            if (k == _READ) != (phase == 0) or dead & bit[i]:
                entry = nxt[entry]
                continue
            if k == _READ:
                ok = state == arg1[i]
                new = state
            elif k == _WRITE:
                ok = True
                new = arg1[i]
            elif k == _CAS:
                ok = state == arg1[i]
                new = arg2[i]
            else:
                ok = True
                new = None
            if ok:
                nlin = lin | bit[i]
                ndead = dead
                for w in watchers[i]:
                    if not obs[w] & ~(nlin | ndead):
                        ndead |= bit[w]
                ck = (nlin & ~ndead, new)
                if ck not in cache:
                    cache.add(ck)
                    calls.append((entry, state, dead))
                    state = new
                    lin = nlin
                    dead = ndead
                    p, q = prv[entry], nxt[entry]
                    nxt[p] = q
                    prv[q] = p
                    m = match[entry]
                    if m >= 0:
                        p, q = prv[m], nxt[m]
                        nxt[p] = q
                        prv[q] = p
                        remaining -= 1
                    entry = nxt[head]
                    phase = 0
                    continue
            if not (ok and k == _READ):
                entry = nxt[entry]
                continue
            # A legal read candidate can always be linearized right now (it changes no
            # state and every operation that must precede it is already placed), so if
            # the configuration with it was already explored and failed, so does this one.
        elif phase == 0:
            # No legal read here: now try the operations that change the state.
            phase = 1
            entry = nxt[head]
            continue
        elif entry != tail and entry > best:
            # A return entry whose operation should have been linearized by now.
            best = entry
            best_prefix = [c[0] for c in calls]
            best_prefix = [ent_op[c] for c in best_prefix]
            best_state = state
        # Backtrack: undo the last linearized operation. Undoing a read means the
        # configuration below it failed too (same argument as above): keep undoing.
        while calls:
            entry, state, dead = calls.pop()
            i = ent_op[entry]
            lin ^= bit[i]
            m = match[entry]
            if m >= 0:
                nxt[prv[m]] = m
                prv[nxt[m]] = m
                remaining += 1
            nxt[prv[entry]] = entry
            prv[nxt[entry]] = entry
            if kind[i] != _READ:
                break
        else:
            failed = True
            break
        entry = nxt[entry]
        phase = 1  # the undone operation was chosen in phase 1: try the next candidate
    elapsed = time.monotonic() - t0
    if not failed:
        return KeyResult(key, True, n, elapsed)
    stuck = kept[ent_op[best]]
    prefix = tuple(kept[i] for i in best_prefix)
    cex = _counterexample(key, key_ops, stuck, prefix, best_state)
    return KeyResult(key, False, n, elapsed, cex)


def _impossible_read(key_ops: list[Operation]) -> Operation | None:
    """The earliest-returning ok read (or ok cas) expecting a value that no operation wrote
    before it returned: a violation found without searching (its prefix is left empty)."""
    first_write: dict[Hashable, float] = {}
    for op in key_ops:
        if op.f != "read":
            v = _freeze(written_value(op))
            first_write[v] = min(first_write.get(v, math.inf), op.invoke_time)
    bad: Operation | None = None
    for op in key_ops:
        if op.type != "ok" or op.f not in ("read", "cas"):
            continue
        v = _freeze(op.result if op.f == "read" else _cas_args(op)[0])
        if (
            v is not None
            and first_write.get(v, math.inf) > op.complete_time
            and (bad is None or op.complete_time < bad.complete_time)
        ):
            bad = op
    return bad


def _overlaps(a: Operation, b: Operation) -> bool:
    return a.invoke_time <= b.complete_time and b.invoke_time <= a.complete_time


def _counterexample(
    key: str,
    key_ops: list[Operation],
    stuck: Operation,
    prefix: tuple[Operation, ...],
    state: Hashable,
) -> Counterexample:
    concurrent = tuple(op for op in key_ops if op is not stuck and _overlaps(op, stuck))
    setter = next((op for op in reversed(prefix) if op.f != "read"), None)
    win = {id(op): op for op in (*concurrent, stuck)}
    if setter is not None:
        win[id(setter)] = setter
    window = tuple(sorted(win.values(), key=lambda o: (o.invoke_time, o.index)))
    state_json = _thaw(state)
    return Counterexample(
        key=key,
        op=stuck,
        prefix=prefix,
        state=state_json,
        concurrent=concurrent,
        window=window,
        reason=_reason(key, key_ops, stuck, state_json, len(concurrent)),
    )


def _reason(
    key: str, key_ops: list[Operation], x: Operation, state: Json, n_concurrent: int
) -> str:
    held = f"after the longest linearizable prefix the register held {fmt_value(state)}"
    writes = [op for op in key_ops if op.f != "read"]
    if x.f == "read":
        v = x.result
        at = f"read of key {key!r} at {fmt_time(x.invoke_time)}"
        writers = [w for w in writes if written_value(w) == v]
        if v is not None and not writers:
            return f"{at} returned {fmt_value(v)}, a value no operation ever wrote to {key!r}"
        if v is not None and all(w.invoke_time > x.complete_time for w in writers):
            first = min(w.invoke_time for w in writers)
            return (
                f"{at} returned {fmt_value(v)}, but the write of that value was only invoked "
                f"at {fmt_time(first)}, after the read had returned at "
                f"{fmt_time(x.complete_time)}"
            )
        before = [w for w in writes if w.type == "ok" and w.complete_time < x.invoke_time]
        if before:
            last = max(before, key=lambda w: w.complete_time)
            lv = written_value(last)
            if lv != v:
                what = fmt_value(lv) if last.f == "write" else f"{describe(last)}"
                return (
                    f"{at} returned {fmt_value(v)} but the last completed write before it was "
                    f"{what} (finished at {fmt_time(last.complete_time)})"
                )
        return (
            f"{at} returned {fmt_value(v)}, which no order of the {n_concurrent} "
            f"operations concurrent with it allows; {held}"
        )
    if x.f == "cas":
        e, nv = _cas_args(x)
        rivals = [
            o
            for o in key_ops
            if o is not x and o.f == "cas" and o.type == "ok" and _cas_args(o)[0] == e
        ]
        extra = ""
        if rivals:
            r = rivals[0]
            extra = (
                f"; another successful cas from the same value ({describe(r)}, process "
                f"{r.process}, {fmt_time(r.invoke_time)}-{fmt_time(r.complete_time)}) "
                "consumed it"
            )
        return (
            f"cas of key {key!r} from {fmt_value(e)} to {fmt_value(nv)} by process {x.process} "
            f"(invoked at {fmt_time(x.invoke_time)}) succeeded, but the register cannot hold "
            f"{fmt_value(e)} at any point where it could take effect; {held}{extra}"
        )
    return (
        f"no linearization of key {key!r} extends past the completion of {describe(x)} by "
        f"process {x.process} at {fmt_time(x.complete_time)}: {held}, and no order of the "
        f"{n_concurrent} operations concurrent with it makes every completed operation legal"
    )
