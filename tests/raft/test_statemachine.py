from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from caplab.raft.v1 import raft_pb2
from raft.statemachine import OK, OVERFLOW, STALE, TYPE_CONFLICT, KvStateMachine


def cmd(key: str, client: str = "", seq: int = 0, **op: Any) -> bytes:
    c = raft_pb2.Command(client_id=client, sequence=seq, key=key)
    if "put" in op:
        c.put = op["put"]
    if "incr" in op:
        c.increment = op["incr"]
    if "delete" in op:
        c.delete = True
    if "cas" in op:
        expected, new = op["cas"]
        c.cas.CopyFrom(
            raft_pb2.CompareAndSwap(
                expected=expected or b"", expected_absent=expected is None, new_value=new
            )
        )
    return c.SerializeToString()


def test_retried_command_applies_once_and_returns_the_first_result() -> None:
    sm = KvStateMachine()
    r1 = sm.apply(1, cmd("c", "cl", 1, incr=5))
    r2 = sm.apply(2, cmd("c", "cl", 1, incr=5))
    assert r1.counter == r2.counter == 5
    assert sm.get("c") == 5
    r3 = sm.apply(3, cmd("c", "cl", 2, incr=1))
    assert r3.counter == 6
    late = sm.apply(4, cmd("c", "cl", 1, incr=5))
    assert late.counter == 5 and sm.get("c") == 6  # still in the window: the cached result


def test_out_of_order_requests_of_one_client_all_apply_once() -> None:
    sm = KvStateMachine(window=4)
    for i, seq in enumerate([3, 1, 2, 4]):
        sm.apply(i + 1, cmd("c", "cl", seq, incr=1))
    assert sm.get("c") == 4
    for i, seq in enumerate([5, 6, 7, 8, 9]):
        sm.apply(10 + i, cmd("c", "cl", seq, incr=1))
    assert sm.get("c") == 9
    assert sm.apply(20, cmd("c", "cl", 9, incr=1)).counter == 9  # duplicate: cached
    old = sm.apply(21, cmd("c", "cl", 2, incr=1))  # evicted from the window
    assert old.status == STALE and "too old" in old.message and sm.get("c") == 9


def test_dedup_survives_snapshot_restore() -> None:
    sm = KvStateMachine()
    sm.apply(1, cmd("c", "cl", 7, incr=1))
    other = KvStateMachine()
    other.restore(sm.snapshot())
    assert other.apply(2, cmd("c", "cl", 7, incr=1)).counter == 1
    assert other.get("c") == 1
    assert other.digest() == sm.digest()


def test_types_and_overflow() -> None:
    sm = KvStateMachine()
    sm.apply(1, cmd("c", incr=2**63 - 1))
    assert sm.apply(2, cmd("c", incr=1)).status == OVERFLOW
    assert sm.apply(3, cmd("c", put=b"x")).status == TYPE_CONFLICT
    assert "counter" in sm.apply(4, cmd("c", cas=(None, b"x"))).message
    sm.apply(5, cmd("r", put=b"x"))
    assert "register" in sm.apply(6, cmd("r", incr=1)).message
    assert sm.get("c") == 2**63 - 1 and sm.get("r") == b"x"


def test_cas() -> None:
    sm = KvStateMachine()
    assert sm.apply(1, cmd("k", cas=(None, b"a"))).flag
    r = sm.apply(2, cmd("k", cas=(None, b"b")))
    assert not r.flag and r.found and r.current == b"a"
    assert sm.apply(3, cmd("k", cas=(b"a", b"b"))).flag
    assert sm.get("k") == b"b"


def test_session_eviction_is_deterministic() -> None:
    a, b = KvStateMachine(max_sessions=3), KvStateMachine(max_sessions=3)
    for sm in (a, b):
        for i in range(10):
            sm.apply(i + 1, cmd("k", f"c{i % 5}", i + 1, put=b"v"))
    assert a.sessions.keys() == b.sessions.keys() and len(a.sessions) == 3


ops = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c"]),
        st.one_of(
            st.binary(max_size=3).map(lambda v: {"put": v}),
            st.integers(-5, 5).map(lambda d: {"incr": d}),
            st.just({"delete": True}),
        ),
    ),
    max_size=30,
)


@settings(max_examples=200)
@given(ops)
def test_digest_equals_iff_state_equals(seq: list[tuple[str, dict[str, Any]]]) -> None:
    sm = KvStateMachine()
    for i, (key, op) in enumerate(seq):
        assert sm.apply(i + 1, cmd(key, **op)).status in (OK, TYPE_CONFLICT)
    fresh = KvStateMachine()
    fresh.restore(sm.snapshot())
    assert fresh.digest() == sm.digest()
    assert {k: s.value for k, s in fresh.data.items()} == {k: s.value for k, s in sm.data.items()}
    empty = KvStateMachine()
    assert (empty.digest() == sm.digest()) == (len(sm) == 0)
