"""Sequential specifications ("models") for the linearizability search, after Porcupine.

Theory of operation
-------------------
A linearizability checker needs two things: a search over the orders of a concurrent
history that respect real time (:mod:`harness.checker.linearizable`), and a *sequential
specification* of the object saying which operation is legal in which state and what state
it leaves. This module holds the second part. A :class:`Model` is Porcupine's
``Model{Partition, Init, Step, Equal, DescribeOperation, DescribeState}``:

``partition(ops)``
    Splits a history into independent sub-histories, usually one per key. Linearizability
    is *local* (P-compositionality, Herlihy & Wing): a history is linearizable iff each
    per-object sub-history is, so each part is searched on its own. The default keeps the
    operations whose ``f`` is in :attr:`Model.functions` and whose type is not ``fail`` (a
    failed operation did not happen), grouped by ``key``.
``init()``
    The state before any operation.
``encode(op)`` and ``step(state, input)``
    ``encode`` turns an :class:`~harness.history.Operation` (its call *and* its outcome,
    Porcupine's input and output) into a compact value once per operation, so that
    ``step``, which the search calls many times, does not parse JSON. ``step`` returns
    ``(legal, next_state)``: whether the operation, with the outcome it reported, is legal
    in ``state``, and the state it leaves (only meaningful if legal).
``describe_state(state)`` / ``describe_op(op)`` / ``state_json(state)``
    Text for counterexamples, and the state as JSON for :class:`Counterexample.state`.

States must be hashable and compare equal exactly when they are the same abstract state:
the search memoises ``(set of linearized operations, state)`` pairs (Lowe's memoisation),
so ``==``/``hash`` are the model's ``Equal``.

Determinism and indeterminate operations
    ``step`` is deterministic: one next state per (state, operation). Indeterminacy of an
    ``info`` operation (it may or may not have taken effect) is not the model's business:
    the search gives an ``info`` operation no return point, so it may be linearized anywhere
    after its call, or never. A genuinely nondeterministic object can be made deterministic
    by the subset construction (a state is the frozenset of possible states; an operation is
    legal if it is legal in one of them), as Porcupine's ``NondeterministicModel`` does.

Hints that make the search faster (all optional, all sound by contract):

``read_only(op)``
    True if the operation never changes the state, whatever the state (a read). The search
    tries legal read-only operations first and never backtracks into alternatives to them
    (a legal read-only operation at the frontier can always be linearized right away without
    losing a linearization), and drops ``info`` read-only operations (they constrain
    nothing).
``observers(ops)``
    For each ``info`` operation ``w``, the indices (into ``ops``) of the operations whose
    legality placing ``w`` can enable, or None if unknown. Contract: once every observer of
    ``w`` is linearized or itself left out, ``w`` can be left out of every linearization of
    the remaining operations. ``info`` operations with no observer are dropped before the
    search, and an ``info`` operation whose observers are all placed stops distinguishing
    memo entries. For a register, ``w`` writing ``v`` is observed by the reads of ``v`` and
    the cas operations expecting ``v``.
``quick_violation(ops)``
    An operation that cannot be linearized whatever the order, found without searching
    (e.g. a read of a value never written), or None.
``explain(...)``
    The counterexample's reason in plain words.

Models here: :class:`RegisterModel` (read / write / cas / delete; ``read-local`` is not a
linearizable read and is not part of it) and :class:`CounterModel` (incr / read-counter).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeAlias, TypeVar

from harness.history import HistoryError, Json, Operation

S = TypeVar("S", bound=Hashable)  # a model's state
In = TypeVar("In")  # a model's encoded operation (call and outcome)

REGISTER_FUNCTIONS: frozenset[str] = frozenset({"read", "write", "cas", "delete"})
COUNTER_FUNCTIONS: frozenset[str] = frozenset({"incr", "read-counter"})


class Model(ABC, Generic[S, In]):
    """A sequential specification; see the module docstring for the contract of each hook."""

    #: the functions (``Operation.f``) this model checks; other operations are ignored
    functions: frozenset[str]
    #: what the object is called in messages ("register", "counter", ...)
    name: str

    def partition(self, ops: Sequence[Operation]) -> dict[str, list[Operation]]:
        """Independent sub-histories by key: this model's non-``fail`` operations."""
        by_key: dict[str, list[Operation]] = {}
        for op in ops:
            if op.f in self.functions and op.key is not None and op.type != "fail":
                by_key.setdefault(op.key, []).append(op)
        return by_key

    @abstractmethod
    def init(self) -> S:
        """The initial state."""

    @abstractmethod
    def encode(self, op: Operation) -> In:
        """The operation's call and outcome in the form :meth:`step` takes."""

    @abstractmethod
    def step(self, state: S, op: In) -> tuple[bool, S]:
        """Whether ``op`` is legal in ``state``, and the state after it (if legal)."""

    @abstractmethod
    def describe_state(self, state: S) -> str:
        """A state for humans."""

    @abstractmethod
    def describe_op(self, op: Operation) -> str:
        """An operation for humans, e.g. ``write 'v3'``."""

    def state_json(self, state: S) -> Json:
        """The state as JSON (:attr:`Counterexample.state`); default: its description."""
        return self.describe_state(state)

    def read_only(self, op: Operation) -> bool:
        """True if ``op`` never changes the state. Default: False (always safe)."""
        return False

    def observers(self, ops: Sequence[Operation]) -> Sequence[Collection[int] | None]:
        """Per operation, who can observe it if it is ``info``. Default: unknown (None)."""
        return [None] * len(ops)

    def quick_violation(self, ops: Sequence[Operation]) -> Operation | None:
        """An operation of one key that no order can make legal. Default: None."""
        return None

    def explain(
        self, key: str, ops: Sequence[Operation], stuck: Operation, state: S, n_concurrent: int
    ) -> str:
        """Why ``stuck`` could not be placed after the longest linearizable prefix, which
        left ``state``; ``ops`` are all of the key's operations."""
        end = "it" if math.isinf(stuck.complete_time) else fmt_time(stuck.complete_time)
        return (
            f"no linearization of key {key!r} extends past the completion of "
            f"{self.describe_op(stuck)} by process {stuck.process} at {end}: after the "
            f"longest linearizable prefix the {self.name} held {self.describe_state(state)}, "
            f"and no order of the {n_concurrent} operations concurrent with it makes every "
            "completed operation legal"
        )


# -- value helpers (shared with the staleness and final-state checkers) --------------------
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
    """Short description of a register operation, e.g. ``write 'v3'`` or ``cas 'a'->'b'``."""
    if op.f == "read":
        return "read" if op.type != "ok" else f"read -> {fmt_value(op.result)}"
    if op.f == "write":
        return f"write {fmt_value(op.value)}"
    if op.f == "cas":
        e, n = _cas_args(op)
        return f"cas {fmt_value(e)}->{fmt_value(n)}"
    return f"a {op.f}"


# -- the register ---------------------------------------------------------------------------
_READ, _WRITE, _CAS, _DELETE = 0, 1, 2, 3
RegisterInput: TypeAlias = tuple[int, Hashable, Hashable]  # (kind, arg1, arg2), frozen values


@dataclass(frozen=True, kw_only=True, slots=True)
class RegisterModel(Model[Hashable, RegisterInput]):
    """One register per key, initially absent (``None``)::

        read   -> result r     legal iff state == r
        write(v)               state := v
        cas(e, n)              legal iff state == e (e None = absent); state := n
        delete                 state := None

    Only ``ok`` and ``info`` operations reach :meth:`step` (``fail`` ones did not happen:
    a cas whose compare did not match is a ``fail``); ``info`` reads are dropped by the
    search (read-only) and an ``info`` write / cas / delete is dropped when no read and no
    cas ever expects the value it leaves (:meth:`observers`). ``read-local`` is not part of
    the model (a local read may be stale by design).
    """

    functions: frozenset[str] = REGISTER_FUNCTIONS
    name: str = "register"

    def init(self) -> Hashable:
        return None

    def encode(self, op: Operation) -> RegisterInput:
        if op.f == "read":
            return (_READ, _freeze(op.result), None)
        if op.f == "write":
            return (_WRITE, _freeze(op.value), None)
        if op.f == "cas":
            e, n = _cas_args(op)
            return (_CAS, _freeze(e), _freeze(n))
        return (_DELETE, None, None)

    def step(self, state: Hashable, op: RegisterInput) -> tuple[bool, Hashable]:
        k, a, b = op
        if k == _READ:
            return state == a, state
        if k == _WRITE:
            return True, a
        if k == _CAS:
            return state == a, b
        return True, None

    def describe_state(self, state: Hashable) -> str:
        return fmt_value(_thaw(state))

    def describe_op(self, op: Operation) -> str:
        return describe(op)

    def state_json(self, state: Hashable) -> Json:
        return _thaw(state)

    def read_only(self, op: Operation) -> bool:
        return op.f == "read"

    def observers(self, ops: Sequence[Operation]) -> Sequence[Collection[int] | None]:
        if not any(op.type == "info" for op in ops):
            return [None] * len(ops)
        # The value each op compares the state against: ok reads and every cas.
        comparing: dict[Hashable, list[int]] = {}
        for j, op in enumerate(ops):
            if op.f == "read" and op.type == "ok":
                comparing.setdefault(_freeze(op.result), []).append(j)
            elif op.f == "cas":
                comparing.setdefault(_freeze(_cas_args(op)[0]), []).append(j)
        out: list[Collection[int] | None] = []
        for w, op in enumerate(ops):
            if op.type != "info" or op.f == "read":
                out.append(None)
                continue
            out.append([j for j in comparing.get(_freeze(written_value(op)), ()) if j != w])
        return out

    def quick_violation(self, ops: Sequence[Operation]) -> Operation | None:
        """The earliest-returning ok read (or ok cas) expecting a value that no operation
        wrote before it returned."""
        first_write: dict[Hashable, float] = {}
        for op in ops:
            if op.f != "read":
                v = _freeze(written_value(op))
                first_write[v] = min(first_write.get(v, math.inf), op.invoke_time)
        bad: Operation | None = None
        for op in ops:
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

    def explain(
        self,
        key: str,
        ops: Sequence[Operation],
        stuck: Operation,
        state: Hashable,
        n_concurrent: int,
    ) -> str:
        x = stuck
        sv = _thaw(state)
        held = f"after the longest linearizable prefix the register held {fmt_value(sv)}"
        writes = [op for op in ops if op.f != "read"]
        if x.f == "read":
            v = x.result
            at = f"read of key {key!r} at {fmt_time(x.invoke_time)}"
            writers = [w for w in writes if written_value(w) == v]
            if v is not None and not writers:
                return f"{at} returned {fmt_value(v)}, a value no operation ever wrote to {key!r}"
            if v is not None and all(w.invoke_time > x.complete_time for w in writers):
                first = min(w.invoke_time for w in writers)
                return (
                    f"{at} returned {fmt_value(v)}, but the write of that value was only "
                    f"invoked at {fmt_time(first)}, after the read had returned at "
                    f"{fmt_time(x.complete_time)}"
                )
            before = [w for w in writes if w.type == "ok" and w.complete_time < x.invoke_time]
            if before:
                last = max(before, key=lambda w: w.complete_time)
                lv = written_value(last)
                if lv != v:
                    what = fmt_value(lv) if last.f == "write" else f"{describe(last)}"
                    return (
                        f"{at} returned {fmt_value(v)} but the last completed write before it "
                        f"was {what} (finished at {fmt_time(last.complete_time)})"
                    )
            return (
                f"{at} returned {fmt_value(v)}, which no order of the {n_concurrent} "
                f"operations concurrent with it allows; {held}"
            )
        if x.f == "cas":
            e, nv = _cas_args(x)
            rivals = [
                o
                for o in ops
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
                f"cas of key {key!r} from {fmt_value(e)} to {fmt_value(nv)} by process "
                f"{x.process} (invoked at {fmt_time(x.invoke_time)}) succeeded, but the "
                f"register cannot hold {fmt_value(e)} at any point where it could take effect; "
                f"{held}{extra}"
            )
        return (
            f"no linearization of key {key!r} extends past the completion of {describe(x)} by "
            f"process {x.process} at {fmt_time(x.complete_time)}: {held}, and no order of the "
            f"{n_concurrent} operations concurrent with it makes every completed operation legal"
        )


# -- the counter ----------------------------------------------------------------------------
CounterInput: TypeAlias = tuple[bool, int]  # (is a read, delta or value read)


def _int(op: Operation, v: Json, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise HistoryError(f"event {op.index}: {what} must be an integer, got {v!r}")
    return v


@dataclass(frozen=True, kw_only=True, slots=True)
class CounterModel(Model[int, CounterInput]):
    """One integer counter per key, initially 0::

        incr(d)                   state := state + d
        read-counter -> result r  legal iff state == r

    The same semantics as :func:`harness.checker.counter.check_counter` (``ok`` increments
    took effect once, ``fail`` ones never, ``info`` ones maybe), but checked for
    linearizability (each read sees exactly the increments linearized before it) rather
    than against the weaker interval bounds that checker uses for any store, CP or AP. An
    ``info`` increment is observed by every ``ok`` read (:meth:`observers`).
    """

    functions: frozenset[str] = COUNTER_FUNCTIONS
    name: str = "counter"

    def init(self) -> int:
        return 0

    def encode(self, op: Operation) -> CounterInput:
        if op.f == "read-counter":
            return (True, _int(op, op.result, "read-counter result"))
        return (False, _int(op, op.value, "incr delta"))

    def step(self, state: int, op: CounterInput) -> tuple[bool, int]:
        is_read, x = op
        if is_read:
            return state == x, state
        return True, state + x

    def describe_state(self, state: int) -> str:
        return str(state)

    def describe_op(self, op: Operation) -> str:
        if op.f == "read-counter":
            return "read-counter" if op.type != "ok" else f"read-counter -> {op.result!r}"
        return f"incr {op.value!r}"

    def state_json(self, state: int) -> Json:
        return state

    def read_only(self, op: Operation) -> bool:
        return op.f == "read-counter"

    def observers(self, ops: Sequence[Operation]) -> Sequence[Collection[int] | None]:
        reads = [j for j, op in enumerate(ops) if op.f == "read-counter" and op.type == "ok"]
        return [reads if op.type == "info" and op.f == "incr" else None for op in ops]


REGISTER = RegisterModel()
COUNTER = CounterModel()
