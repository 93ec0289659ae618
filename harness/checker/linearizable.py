"""Linearizability checker, generic over a sequential specification (a
:class:`~harness.checker.model.Model`); :func:`check_register` checks the register model.

Theory of operation
-------------------
This is the Wing-Gong search with Lowe's memoization, laid out as Porcupine does:

* P-compositionality: linearizability is local, so each part of the history the model's
  ``partition`` makes (one key each) is checked on its own.
* For one key, every operation becomes a *call* entry at its invoke time and (if it
  completed ``ok``) a *return* entry at its completion time; entries are sorted by time
  (calls before returns on ties, so touching intervals count as concurrent) and threaded on
  a doubly linked list (Python lists of prev/next indices, with head and tail sentinels).
* The search walks the list from the head. At a call entry it tries to *linearize* the
  operation: if the model's ``step`` allows it from the current state and the pair
  (set of linearized operations, new state) has not been seen before, the call and its
  return entry are *lifted* out of the list, the previous state is pushed on an explicit
  stack (no recursion) and the walk restarts at the head. Reaching a return entry means its
  operation had to be linearized by now but was not: pop the stack, *unlift* that entry
  (dancing links) and continue after it. The history is linearizable when every ``ok``
  operation has been linearized; it is not when the stack is empty at a return entry.
* The memo is a set of ``(bitset, state)`` with the bitset a Python int; equal
  configurations are explored once, which bounds the search.
* Read-only operations (``Model.read_only``) are forced moves: each walk first tries only
  them, and only when none is legal the state-changing ones; a legal read-only operation
  whose configuration was already explored, or that is undone on backtracking, means the
  configuration below it fails too.

``fail`` operations did not happen and are dropped. ``info`` operations may or may not have
taken effect: they have a call entry but no return entry (return time +inf), so the search
may linearize them anywhere after their call, or never (the search succeeds once all ``ok``
operations are placed). ``info`` read-only operations constrain nothing and are dropped, as
are ``info`` operations that no kept operation observes (``Model.observers``: for the
register, writes/cas/deletes whose new value no ``ok`` read and no cas ever expects); an
``info`` operation whose observers are all placed is *dead* and masked out of the memo key.

On failure the counterexample is taken at the furthest point the search reached: the return
entry (in time order) past which no linearization could be extended. It reports the
longest linearizable prefix found there, the operation that could not be placed, the
operations concurrent with it and a reason in plain words (``Model.explain``); a violation
the model finds without searching (``Model.quick_violation``) has an empty prefix.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from harness.checker.model import (
    COUNTER,
    REGISTER,
    REGISTER_FUNCTIONS,
    In,
    Model,
    S,
    _cas_args,
    _freeze,
    _thaw,
    describe,
    fmt_time,
    fmt_value,
    written_value,
)
from harness.history import Json, Operation

Validity: TypeAlias = bool | Literal["unknown"]

# The register helpers moved to harness.checker.model; they stay importable from here.
__all__ = [
    "COUNTER",
    "REGISTER",
    "REGISTER_FUNCTIONS",
    "Counterexample",
    "KeyResult",
    "LinResult",
    "Validity",
    "_cas_args",
    "_freeze",
    "_thaw",
    "check_linearizable",
    "check_register",
    "describe",
    "fmt_time",
    "fmt_value",
    "written_value",
]

_CHECK_EVERY = 0x3FF  # check the clock every 1024 search steps
_MEMO_BYTES = 400_000_000  # rough memory budget of one key's memo


@dataclass(frozen=True, slots=True)
class Counterexample:
    """Why one key's history is not linearizable."""

    key: str
    op: Operation  # the operation that could not be placed
    prefix: tuple[Operation, ...]  # longest linearizable prefix, in linearization order
    state: Json  # model state after ``prefix`` as JSON (register: value, None = absent)
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


def check_register(ops: Sequence[Operation], timeout_s: float = 10.0) -> LinResult:
    """Check that the register operations in ``ops`` are linearizable, key by key.

    ``ops`` may contain other functions (counters, nemesis): they are ignored. The time
    budget ``timeout_s`` covers the whole check; keys not decided in time are ``"unknown"``.
    """
    return check_linearizable(ops, REGISTER, timeout_s)


def check_linearizable(
    ops: Sequence[Operation], model: Model[S, Any], timeout_s: float = 10.0
) -> LinResult:
    """Check that ``ops`` are linearizable with respect to ``model``, part by part
    (:meth:`Model.partition`, one key each by default).

    Operations the model does not partition into a part are ignored. The time budget
    ``timeout_s`` covers the whole check; parts not decided in time are ``"unknown"``.
    """
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    by_key = model.partition(ops)
    per_key: dict[str, KeyResult] = {}
    for key in sorted(by_key):
        per_key[key] = _check_key(model, key, by_key[key], deadline)
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


def _prune(model: Model[S, Any], key_ops: list[Operation]) -> tuple[list[int], list[list[int]]]:
    """Which operations the search needs (indices into ``key_ops``) and, per kept operation,
    the kept positions of the operations observing it (empty unless it is an ``info``
    operation with known observers; see :meth:`Model.observers`).

    ``info`` read-only operations are dropped (they constrain nothing), then, until nothing
    changes, ``info`` operations none of whose observers is kept.
    """
    n = len(key_ops)
    observers = model.observers(key_ops)
    alive = [not (op.type == "info" and model.read_only(op)) for op in key_ops]
    info = [i for i, op in enumerate(key_ops) if op.type == "info" and observers[i] is not None]
    # Worklist: live observers per info op; an op that is dropped is no longer one.
    live: dict[int, int] = {}
    watching: dict[int, list[int]] = {}  # observer -> info ops it observes
    for i in info:
        js = {j for j in observers[i] or () if j != i}
        live[i] = sum(1 for j in js if alive[j])
        for j in js:
            watching.setdefault(j, []).append(i)
    todo = [i for i in info if alive[i] and not live[i]]
    while todo:
        i = todo.pop()
        if not alive[i]:
            continue
        alive[i] = False
        for w in watching.get(i, ()):
            live[w] -= 1
            if not live[w] and alive[w]:
                todo.append(w)
    kept = [i for i in range(n) if alive[i]]
    pos = {i: p for p, i in enumerate(kept)}
    obs: list[list[int]] = [[] for _ in kept]
    for i in info:
        o = observers[i]
        if alive[i] and o is not None:
            obs[pos[i]] = [pos[j] for j in o if j != i and j in pos]
    return kept, obs


def _check_key(
    model: Model[S, In], key: str, key_ops: list[Operation], deadline: float
) -> KeyResult:
    t0 = time.monotonic()
    impossible = model.quick_violation(key_ops)
    if impossible is not None:
        cex = _counterexample(model, key, key_ops, impossible, (), model.init())
        return KeyResult(key, False, len(key_ops), time.monotonic() - t0, cex)
    kept_idx, observed_by = _prune(model, key_ops)
    kept = [key_ops[i] for i in kept_idx]

    n = len(kept)
    step = model.step
    inp: list[In] = [model.encode(op) for op in kept]
    pure = [model.read_only(op) for op in kept]

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
    # An info op is *dead* once every op observing it is linearized (or dead): from then on
    # placing it can help nothing, so configurations that differ only in dead info ops are
    # equivalent and their bits are masked out of the memo key.
    obs = [0] * n
    watchers: list[list[int]] = [[] for _ in range(n)]
    for w, js in enumerate(observed_by):
        for j in js:
            obs[w] |= bit[j]
            watchers[j].append(w)
    dead = 0
    # Memory budget for the memo (each entry holds an n-bit int): give up as "unknown".
    max_cache = _MEMO_BYTES // (n // 8 + 120)

    remaining = sum(1 for op in kept if op.type == "ok")
    lin = 0
    state: S = model.init()
    calls: list[tuple[int, S, int]] = []
    cache: set[tuple[int, S]] = set()
    best = -1
    best_prefix: list[int] = []
    best_state: S = state
    steps = 0
    entry = nxt[head]
    # Phase 0 scans only read-only ops (forced moves, see below), phase 1 only the others.
    phase = 0
    failed = False
    while remaining:
        steps += 1
        if not steps & _CHECK_EVERY and (time.monotonic() > deadline or len(cache) > max_cache):
            return KeyResult(key, "unknown", n, time.monotonic() - t0)
        if ent_call[entry]:
            i = ent_op[entry]
            r = pure[i]
            if r != (phase == 0) or dead & bit[i]:
                entry = nxt[entry]
                continue
            ok, new = step(state, inp[i])
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
            if not (ok and r):
                entry = nxt[entry]
                continue
            # A legal read-only candidate can always be linearized right now (it changes no
            # state and every operation that must precede it is already placed), so if
            # the configuration with it was already explored and failed, so does this one.
        elif phase == 0:
            # No legal read-only op here: now try the operations that change the state.
            phase = 1
            entry = nxt[head]
            continue
        elif entry != tail and entry > best:
            # A return entry whose operation should have been linearized by now.
            best = entry
            best_prefix = [ent_op[c[0]] for c in calls]
            best_state = state
        # Backtrack: undo the last linearized operation. Undoing a read-only op means the
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
            if not pure[i]:
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
    cex = _counterexample(model, key, key_ops, stuck, prefix, best_state)
    return KeyResult(key, False, n, elapsed, cex)


def _overlaps(a: Operation, b: Operation) -> bool:
    return a.invoke_time <= b.complete_time and b.invoke_time <= a.complete_time


def _counterexample(
    model: Model[S, Any],
    key: str,
    key_ops: list[Operation],
    stuck: Operation,
    prefix: tuple[Operation, ...],
    state: S,
) -> Counterexample:
    concurrent = tuple(op for op in key_ops if op is not stuck and _overlaps(op, stuck))
    setter = next((op for op in reversed(prefix) if not model.read_only(op)), None)
    win = {id(op): op for op in (*concurrent, stuck)}
    if setter is not None:
        win[id(setter)] = setter
    window = tuple(sorted(win.values(), key=lambda o: (o.invoke_time, o.index)))
    return Counterexample(
        key=key,
        op=stuck,
        prefix=prefix,
        state=model.state_json(state),
        concurrent=concurrent,
        window=window,
        reason=model.explain(key, key_ops, stuck, state, len(concurrent)),
    )
