"""Sequential models of the linearizability checker: the register and counter models' steps,
and a toy FIFO queue model run through the same generic search."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from harness.checker.linearizable import check_linearizable, check_register
from harness.checker.model import COUNTER, REGISTER, CounterModel, Model, RegisterModel
from harness.history import HistoryError, Json, Operation
from tests.harness.test_checker_linearizable import op

MS = 1_000_000  # the op builder's unit (ms), shared with the linearizability tests


# -- register -------------------------------------------------------------------------------
def test_register_steps() -> None:
    m = RegisterModel()
    s0 = m.init()
    assert s0 is None
    read_none = m.encode(op("read", 0, 1, result=None))
    read_a = m.encode(op("read", 0, 1, result="a"))
    assert m.step(s0, read_none) == (True, None)
    assert m.step(s0, read_a)[0] is False
    assert m.step(s0, m.encode(op("write", 0, 1, "a", "a"))) == (True, "a")
    assert m.step("a", read_a) == (True, "a")
    assert m.step("a", read_none)[0] is False
    cas_ab = m.encode(op("cas", 0, 1, ["a", "b"], ["a", "b"]))
    assert m.step("a", cas_ab) == (True, "b")
    assert m.step("x", cas_ab)[0] is False
    cas_from_absent = m.encode(op("cas", 0, 1, [None, "a"]))
    assert m.step(None, cas_from_absent) == (True, "a")
    assert m.step("a", cas_from_absent)[0] is False
    assert m.step("a", m.encode(op("delete", 0, 1))) == (True, None)
    # JSON lists are frozen into hashable states and thawed back for the counterexample
    lst = m.encode(op("write", 0, 1, [1, [2]]))
    ok, s = m.step(None, lst)
    assert ok and hash(s) is not None and m.state_json(s) == [1, [2]]
    assert m.describe_state(None) == "absent" and m.describe_state("a") == "'a'"
    assert m.describe_op(op("cas", 0, 1, ["a", "b"])) == "cas 'a'->'b'"
    with pytest.raises(HistoryError):
        m.encode(op("cas", 0, 1, "not-a-pair"))


def test_register_hints() -> None:
    m = REGISTER
    assert m.read_only(op("read", 0, 1)) and not m.read_only(op("write", 0, 1, "a"))
    ops = [
        op("write", 0, None, "b"),  # info, observed by the read of b and the cas from b
        op("read", 1, 2, result="b"),
        op("cas", 3, 4, ["b", "c"]),
        op("write", 5, None, "z"),  # info, nobody ever expects z
        op("write", 6, 7, "a"),  # ok: observers do not matter
    ]
    obs = m.observers(ops)
    assert obs[0] is not None and sorted(obs[0]) == [1, 2]
    assert obs[3] == [] and obs[4] is None
    assert m.partition([*ops, op("read-local", 0, 1), op("write", 0, 1, "x", type="fail")]) == {
        "k": ops
    }
    # a read of a value first written after the read returned is found without searching
    bad = op("read", 0, 1, result="late")
    assert m.quick_violation([bad, op("write", 2, 3, "late")]) is bad
    assert m.quick_violation([op("write", 0, 1, "a"), op("read", 2, 3, result="a")]) is None


def test_check_register_is_check_linearizable_with_the_register_model() -> None:
    h = [op("write", 0, 1, "a"), op("write", 2, 5, "b", process=1), op("read", 6, 7, result="a")]
    a, b = check_register(h), check_linearizable(h, REGISTER)
    assert a.valid is b.valid is False
    assert a.counterexample is not None and b.counterexample is not None
    assert a.counterexample.reason == b.counterexample.reason


# -- counter --------------------------------------------------------------------------------
def incr(start: float, end: float | None, d: int, **kw: object) -> Operation:
    return op("incr", start, end, d, d, **kw)  # type: ignore[arg-type]


def rc(start: float, end: float, v: int, **kw: object) -> Operation:
    return op("read-counter", start, end, None, v, **kw)  # type: ignore[arg-type]


def test_counter_steps() -> None:
    m = CounterModel()
    assert m.init() == 0
    assert m.step(0, m.encode(incr(0, 1, 5))) == (True, 5)
    assert m.step(5, m.encode(incr(0, 1, -2))) == (True, 3)
    assert m.step(3, m.encode(rc(0, 1, 3))) == (True, 3)
    assert m.step(3, m.encode(rc(0, 1, 4)))[0] is False
    assert m.read_only(rc(0, 1, 0)) and not m.read_only(incr(0, 1, 1))
    assert m.describe_op(incr(0, 1, 2)) == "incr 2" and m.describe_state(7) == "7"
    with pytest.raises(HistoryError):
        m.encode(incr(0, 1, True))
    ops = [incr(0, None, 1), rc(1, 2, 1), incr(3, 4, 1)]
    assert m.observers(ops) == [[1], None, None]


def test_counter_linearizability() -> None:
    ok = [incr(0, 1, 1), incr(2, None, 2, process=1), rc(5, 6, 3), rc(7, 8, 3)]
    assert check_linearizable(ok, COUNTER).valid is True
    # the info increment took effect or not, but 2 is neither 1 nor 3
    res = check_linearizable([incr(0, 1, 1), incr(2, None, 2, process=1), rc(5, 6, 2)], COUNTER)
    assert res.valid is False
    cex = res.counterexample
    assert cex is not None and cex.op.f == "read-counter" and cex.state in (1, 3)
    assert "counter" in cex.reason
    # concurrent increments: a read overlapping both may see either partial sum
    h = [incr(0, 10, 1), incr(0, 10, 2, process=1), rc(1, 9, 2, process=2), rc(11, 12, 3)]
    assert check_linearizable(h, COUNTER).valid is True
    # a read that saw an increment cannot be followed by one that did not
    h = [incr(0, 10, 1), rc(1, 2, 1, process=1), rc(3, 4, 0, process=1)]
    assert check_linearizable(h, COUNTER).valid is False
    # keys are independent, and register operations are ignored by the counter model
    h = [incr(0, 1, 1, key="a"), incr(0, 1, 5, key="b"), rc(2, 3, 5, key="b")]
    h.append(op("write", 0, 1, "x", key="a"))
    res = check_linearizable(h, COUNTER)
    assert res.valid is True and set(res.per_key) == {"a", "b"}
    # an info increment with no read to observe it is dropped before the search
    assert check_linearizable([incr(0, None, 1)], COUNTER).operations == 0


# -- a toy third model: a FIFO queue ---------------------------------------------------------
QueueState = tuple[Json, ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class QueueModel(Model[QueueState, tuple[bool, Json]]):
    """``enqueue(v)`` appends; ``dequeue -> r`` pops the head (``r`` None: the queue was
    empty). The whole history is one queue: :meth:`partition` ignores keys."""

    functions: frozenset[str] = frozenset({"enqueue", "dequeue"})
    name: str = "queue"

    def partition(self, ops: Sequence[Operation]) -> dict[str, list[Operation]]:
        return {"queue": [o for o in ops if o.f in self.functions and o.type != "fail"]}

    def init(self) -> QueueState:
        return ()

    def encode(self, op: Operation) -> tuple[bool, Json]:
        return (op.f == "dequeue", op.result if op.f == "dequeue" else op.value)

    def step(self, state: QueueState, op: tuple[bool, Json]) -> tuple[bool, QueueState]:
        is_deq, v = op
        if not is_deq:
            return True, (*state, v)
        if not state:
            return v is None, state
        return state[0] == v, state[1:]

    def describe_state(self, state: QueueState) -> str:
        return f"[{', '.join(map(repr, state))}]"

    def describe_op(self, op: Operation) -> str:
        return f"enqueue {op.value!r}" if op.f == "enqueue" else f"dequeue -> {op.result!r}"

    def state_json(self, state: QueueState) -> Json:
        return list(state)


def enq(start: float, end: float | None, v: int, **kw: object) -> Operation:
    return op("enqueue", start, end, v, None, **kw)  # type: ignore[arg-type]


def deq(start: float, end: float, v: int | None, **kw: object) -> Operation:
    return op("dequeue", start, end, None, v, **kw)  # type: ignore[arg-type]


Q = QueueModel()


def test_queue_model_linearizable_histories() -> None:
    seq = [enq(0, 1, 1), enq(2, 3, 2), deq(4, 5, 1), deq(6, 7, 2), deq(8, 9, None)]
    assert check_linearizable(seq, Q).valid is True
    # concurrent enqueues may be ordered either way
    conc = [enq(0, 5, 1), enq(1, 6, 2, process=1), deq(7, 8, 2), deq(9, 10, 1)]
    assert check_linearizable(conc, Q).valid is True
    # a dequeue concurrent with the enqueue may find the queue still empty
    assert check_linearizable([enq(0, 5, 1), deq(1, 2, None, process=1)], Q).valid is True
    # an indeterminate enqueue may have taken effect (or not: the second history)
    assert check_linearizable([enq(0, None, 1), deq(5, 6, 1)], Q).valid is True
    assert check_linearizable([enq(0, None, 1), deq(5, 6, None)], Q).valid is True
    # failed operations did not happen; keys are ignored by this model's partition
    h = [enq(0, 1, 1, key="a"), enq(2, 3, 9, type="fail"), deq(4, 5, 1, key="b")]
    res = check_linearizable(h, Q)
    assert res.valid is True and set(res.per_key) == {"queue"} and res.operations == 2


def test_queue_model_violations() -> None:
    # FIFO order broken: 2 came out before 1 although 1 was enqueued first
    res = check_linearizable([enq(0, 1, 1), enq(2, 3, 2), deq(4, 5, 2)], Q)
    assert res.valid is False
    cex = res.counterexample
    assert cex is not None and cex.key == "queue"
    assert cex.op.f == "dequeue" and cex.op.result == 2
    assert [o.value for o in cex.prefix] == [1, 2]
    assert cex.state == [1, 2]
    assert "queue held [1, 2]" in cex.reason
    assert "not linearizable: keys queue" in res.summary()
    # an element dequeued twice
    h = [enq(0, 1, 1), deq(2, 3, 1), deq(4, 5, 1, process=1)]
    assert check_linearizable(h, Q).valid is False
    # an indeterminate enqueue cannot take effect before it was invoked
    assert check_linearizable([deq(0, 1, 1), enq(2, None, 1)], Q).valid is False
    # "empty" after a completed enqueue and no dequeue
    assert check_linearizable([enq(0, 1, 1), deq(2, 3, None)], Q).valid is False


def test_queue_model_many_concurrent_enqueues() -> None:
    """Six concurrent enqueues dequeued in reverse order: the search has to find the one
    order of the enqueues (of 720) that explains it; a seventh dequeue must find it empty."""
    h = [enq(0, 100, i, process=i) for i in range(6)]
    h += [deq(101 + 2 * i, 102 + 2 * i, 5 - i) for i in range(6)]
    assert check_linearizable(h, Q).valid is True
    assert check_linearizable([*h, deq(200, 201, 0)], Q).valid is False
    assert check_linearizable([*h, deq(200, 201, None)], Q).valid is True
