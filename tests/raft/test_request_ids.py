"""A request id reused for a different request is refused, not answered with the other
request's cached result (issue 15): in the state machine, and through a real node."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from caplab import errors
from caplab.client import KVClient
from caplab.raft.v1 import raft_pb2
from caplab.v1 import kv_pb2, kv_pb2_grpc
from raft.statemachine import OK, REUSED, KvStateMachine, check_snapshot
from tests.raft.test_integration import Net, start_net
from tests.raft.test_statemachine import cmd

pytestmark = pytest.mark.harness_loop  # (its proxies)


@pytest.mark.parametrize(
    "second, used_for",
    [
        (cmd("n", "cl", 1, incr=1), "a put of key 'k'"),  # another operation, another key
        (cmd("k", "cl", 1, incr=1), "a put of key 'k'"),  # another operation, same key
        (cmd("k", "cl", 1, delete=True), "a put of key 'k'"),
        (cmd("k", "cl", 1, cas=(None, b"x")), "a put of key 'k'"),
        (cmd("other", "cl", 1, put=b"v"), "a put of key 'k' (not 'other')"),  # another key
    ],
    ids=["increment-other-key", "increment-same-key", "delete", "cas", "put-other-key"],
)
def test_reused_request_id_is_refused_and_applies_nothing(second: bytes, used_for: str) -> None:
    sm = KvStateMachine()
    assert sm.apply(1, cmd("k", "cl", 1, put=b"v")).status == OK
    before = sm.digest()
    r = sm.apply(2, second)
    assert r.status == REUSED
    assert r.message == (
        f"request sequence 1 of client 'cl' was already used for {used_for}; not applied "
        "(use a new sequence for a new request)"
    )
    assert sm.digest() == before and sm.get("n") is None and sm.get("other") is None
    # a true retry is still answered from the cache, and the refusal cached nothing
    assert sm.apply(3, cmd("k", "cl", 1, put=b"v")).status == OK
    assert sm.apply(4, second).status == REUSED


@pytest.mark.parametrize(
    "first, second, used_for",
    [
        (cmd("k", "cl", 1, put=b"first"), cmd("k", "cl", 1, put=b"second"), "a put"),
        (cmd("k", "cl", 1, put=b"first"), cmd("k", "cl", 1, put=b""), "a put"),
        (cmd("c", "cl", 1, incr=1), cmd("c", "cl", 1, incr=100), "an increment"),
        (cmd("c", "cl", 1, incr=1), cmd("c", "cl", 1, incr=-1), "an increment"),
        (cmd("k", "cl", 1, cas=(None, b"a")), cmd("k", "cl", 1, cas=(None, b"b")), "a com"),
        (cmd("k", "cl", 1, cas=(None, b"a")), cmd("k", "cl", 1, cas=(b"", b"a")), "a com"),
        (cmd("k", "cl", 1, cas=(b"x", b"a")), cmd("k", "cl", 1, cas=(b"y", b"a")), "a com"),
    ],
    ids=["put", "put-empty", "increment", "increment-sign", "cas-new", "cas-absent", "cas-exp"],
)
def test_reused_request_id_with_another_payload_is_refused(
    first: bytes, second: bytes, used_for: str
) -> None:
    """Same operation and key, another payload: was answered with the first request's
    result and never applied (put 'second' acknowledged, 'first' kept)."""
    sm = KvStateMachine()
    r1 = sm.apply(1, first)
    before = (sm.digest(), sm.get("k"), sm.get("c"))
    r = sm.apply(2, second)
    assert r.status == REUSED, r
    assert r.message.startswith(
        f"request sequence 1 of client 'cl' was already used for {used_for}"
    ) and r.message.endswith("; not applied (use a new sequence for a new request)")
    assert " with an" in r.message or " with other" in r.message
    assert (sm.digest(), sm.get("k"), sm.get("c")) == before
    assert sm.apply(3, first) == r1  # the true retry is still answered from the cache


def test_the_reviewers_repro_on_the_state_machine() -> None:
    sm = KvStateMachine()
    assert sm.apply(1, cmd("c", "cl", 1, incr=1)).counter == 1
    r = sm.apply(2, cmd("c", "cl", 1, incr=100))
    assert (r.status, r.message) == (
        REUSED,
        "request sequence 1 of client 'cl' was already used for an increment of key 'c' "
        "with another delta; not applied (use a new sequence for a new request)",
    )
    assert sm.apply(3, cmd("k", "cl", 2, put=b"first")).status == OK
    r = sm.apply(4, cmd("k", "cl", 2, put=b"second"))
    assert (r.status, r.message) == (
        REUSED,
        "request sequence 2 of client 'cl' was already used for a put of key 'k' "
        "with another value; not applied (use a new sequence for a new request)",
    )
    assert sm.get("k") == b"first" and sm.get("c") == 1
    # deletes carry no payload: a retry is a retry
    assert sm.apply(5, cmd("k", "cl", 3, delete=True)).flag
    assert sm.apply(6, cmd("k", "cl", 3, delete=True)).flag


def test_payload_digests_survive_a_snapshot_and_are_bounded() -> None:
    sm = KvStateMachine()
    sm.apply(1, cmd("k", "cl", 1, put=b"first"))
    data = sm.snapshot()
    check_snapshot(data)
    snap = raft_pb2.StateSnapshot.FromString(data)
    assert len(snap.sessions[0].results[0].digest) == 8
    other = KvStateMachine()
    other.restore(data)
    assert other.snapshot() == data
    assert other.apply(2, cmd("k", "cl", 1, put=b"second")).status == REUSED
    assert other.get("k") == b"first"
    snap.sessions[0].results[0].digest = b"\x00" * 33
    with pytest.raises(ValueError, match="digest is longer than 32 bytes"):
        check_snapshot(snap.SerializeToString())


def test_snapshot_without_payload_digests_still_answers_retries() -> None:
    """A snapshot taken before results kept their payload's digest (op and key, no
    digest): a retry of the same operation and key is answered from the cache, whatever
    its payload, as it was then (there is nothing to tell it by)."""
    sm = KvStateMachine()
    sm.apply(1, cmd("c", "cl", 1, incr=5))
    snap = raft_pb2.StateSnapshot.FromString(sm.snapshot())
    snap.sessions[0].results[0].ClearField("digest")
    data = snap.SerializeToString()
    check_snapshot(data)
    old = KvStateMachine()
    old.restore(data)
    assert old.apply(2, cmd("c", "cl", 1, incr=5)).counter == 5
    assert old.apply(3, cmd("c", "cl", 1, incr=7)).counter == 5  # unknown payload
    assert old.apply(4, cmd("x", "cl", 1, incr=7)).status == REUSED  # the key is known
    assert old.get("c") == 5 and old.get("x") is None


def test_reuse_is_refused_alike_after_a_snapshot_restore() -> None:
    """Every replica decides alike, also one that installed a snapshot: the operation and
    key of each cached result are part of the snapshot."""
    sm = KvStateMachine()
    sm.apply(1, cmd("c", "cl", 7, incr=3))
    data = sm.snapshot()
    check_snapshot(data)
    other = KvStateMachine()
    other.restore(data)
    assert other.snapshot() == data
    for m in (sm, other):
        r = m.apply(2, cmd("c", "cl", 7, put=b"x"))
        assert (r.status, r.message) == (
            REUSED,
            "request sequence 7 of client 'cl' was already used for an increment of key 'c'; "
            "not applied (use a new sequence for a new request)",
        )
        assert m.apply(3, cmd("c", "cl", 7, incr=3)).counter == 3
    assert sm.digest() == other.digest()


def test_snapshot_without_operations_still_answers_retries() -> None:
    """A snapshot taken before results kept their operation answers any retry from the
    cache, as it did then (no refusal it cannot justify)."""
    snap = raft_pb2.StateSnapshot()
    snap.data["c"].counter = 5
    snap.sessions.add(
        client_id="cl",
        results=[raft_pb2.SessionResult(sequence=1, result=raft_pb2.CommandResult(counter=5))],
        last_index=1,
    )
    sm = KvStateMachine()
    sm.restore(snap.SerializeToString())
    assert sm.apply(2, cmd("c", "cl", 1, incr=5)).counter == 5
    assert sm.get("c") == 5


def test_snapshot_check_refuses_bad_session_results() -> None:
    snap = raft_pb2.StateSnapshot()
    s = snap.sessions.add(client_id="cl", last_index=1)
    s.results.add(sequence=1, op="rename", key="k")
    with pytest.raises(ValueError, match="unknown operation"):
        check_snapshot(snap.SerializeToString())
    s.results[0].op, s.results[0].key = "put", ""
    with pytest.raises(ValueError, match="empty"):
        check_snapshot(snap.SerializeToString())


@pytest.fixture
async def net3(tmp_path: Path) -> AsyncIterator[Net]:
    net = await start_net(tmp_path, 3)
    yield net
    net.cluster.close()
    await net.proxies.close()


@pytest.mark.integration
async def test_raft_node_refuses_reused_request_id_like_gossip(net3: Net) -> None:
    """Put with request id R, then Increment with R: was answered 0 (the Put's cached
    result) and no counter created. Now FAILED_PRECONDITION, as gossip answers, on the
    leader and through a follower (forwarded)."""
    leader = await net3.leader()
    follower = next(n for n in net3.eps if n != leader)
    rid = kv_pb2.RequestId(client_id="reuser", sequence=1)
    async with grpc.aio.insecure_channel(net3.eps[leader]) as ch:
        await kv_pb2_grpc.KVStub(ch).Put(
            kv_pb2.PutRequest(key="k", value=b"v", request_id=rid), timeout=5
        )
    for node in (leader, follower):
        async with grpc.aio.insecure_channel(net3.eps[node]) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await kv_pb2_grpc.KVStub(ch).Increment(
                    kv_pb2.IncrementRequest(key="n", delta=1, request_id=rid), timeout=5
                )
        e = info.value
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, (node, e.code(), e.details())
        assert "request sequence 1 of client 'reuser' was already used for a put" in (
            e.details() or ""
        )
        err = errors.classify(e.code(), e.details() or "", e.trailing_metadata())
        assert err.definite
    async with KVClient([net3.eps[leader]]) as c:
        assert not (await c.get("n")).found  # nothing was applied
        assert (await c.get("k")).value == b"v"


@pytest.mark.integration
async def test_raft_node_refuses_a_reused_request_id_with_another_payload(net3: Net) -> None:
    """The reviewer's repro: incr k delta=1 rid R -> 1; incr k delta=100 rid R -> 1;
    put k 'first' rid R2 -> ok; put k 'second' rid R2 -> ok (never written): get 'first'.
    Now the second of each pair is refused (FAILED_PRECONDITION), on the leader and
    through a follower, and a true retry is still answered."""
    leader = await net3.leader()
    follower = next(n for n in net3.eps if n != leader)
    r1 = kv_pb2.RequestId(client_id="payload", sequence=1)
    r2 = kv_pb2.RequestId(client_id="payload", sequence=2)
    async with grpc.aio.insecure_channel(net3.eps[leader]) as ch:
        stub = kv_pb2_grpc.KVStub(ch)
        inc = kv_pb2.IncrementRequest(key="n", delta=1, request_id=r1)
        assert (await stub.Increment(inc, timeout=5)).value == 1
        await stub.Put(kv_pb2.PutRequest(key="k", value=b"first", request_id=r2), timeout=5)
    for node in (leader, follower):
        async with grpc.aio.insecure_channel(net3.eps[node]) as ch:
            stub = kv_pb2_grpc.KVStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Increment(
                    kv_pb2.IncrementRequest(key="n", delta=100, request_id=r1), timeout=5
                )
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert (
                "request sequence 1 of client 'payload' was already used for an increment of "
                "key 'n' with another delta; not applied"
            ) in (info.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Put(
                    kv_pb2.PutRequest(key="k", value=b"second", request_id=r2), timeout=5
                )
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert (
                "request sequence 2 of client 'payload' was already used for a put of key 'k' "
                "with another value; not applied"
            ) in (info.value.details() or "")
            retry = kv_pb2.IncrementRequest(key="n", delta=1, request_id=r1)
            assert (await stub.Increment(retry, timeout=5)).value == 1
    async with KVClient([net3.eps[leader]]) as c:
        assert (await c.get("n")).value == 1
        assert (await c.get("k")).value == b"first"
