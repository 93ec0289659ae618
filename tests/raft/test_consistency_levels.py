"""Raft's read levels beyond LINEARIZABLE and LOCAL, on a real 3-node cluster over raw gRPC
stubs (so the test controls the session token): session tokens, session reads on a
follower, consistent prefix, bounded staleness, and what a cut-off follower answers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest

from caplab.v1 import kv_pb2, kv_pb2_grpc
from tests.polling import eventually
from tests.raft.test_integration import Net, net3  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.integration, pytest.mark.harness_loop]  # (its proxies)


@asynccontextmanager
async def stub(net: Net, node: str) -> AsyncIterator[kv_pb2_grpc.KVAsyncStub]:
    async with grpc.aio.insecure_channel(net.eps[node]) as ch:
        yield kv_pb2_grpc.KVStub(ch)


def index_of(token: bytes) -> int:
    assert len(token) == 8
    return int.from_bytes(token, "big")


async def put(net: Net, node: str, key: str, value: bytes, token: bytes = b"") -> bytes:
    """Put (retried until a leader takes it); the response's session token."""
    out: list[bytes] = []

    async def ok() -> bool:
        async with stub(net, node) as kv:
            try:
                r = await kv.Put(
                    kv_pb2.PutRequest(key=key, value=value, session_token=token), timeout=2.0
                )
            except grpc.aio.AioRpcError:
                return False
        out.append(r.header.session_token)
        return True

    await eventually(ok, 15)
    return out[0]


async def get(
    net: Net,
    node: str,
    key: str,
    level: int,
    token: bytes = b"",
    timeout: float = 2.0,
    max_staleness_ms: int = 0,
) -> kv_pb2.GetResponse:
    async with stub(net, node) as kv:
        return await kv.Get(
            kv_pb2.GetRequest(
                key=key,
                consistency=level,  # type: ignore[arg-type]
                session_token=token,
                max_staleness_ms=max_staleness_ms,
            ),
            timeout=timeout,
        )


async def test_session_tokens_and_levels_on_connected_followers(net3: Net) -> None:  # noqa: F811
    leader = await net3.leader()
    f1, f2 = (n for n in net3.eps if n != leader)
    token = await put(net3, leader, "k", b"v1")
    written = index_of(token)
    assert written > 0

    # A session read on a follower with that token sees the write (waiting for it if the
    # follower has not applied it yet), and carries the token on.
    for level in (
        kv_pb2.CONSISTENCY_SESSION,
        kv_pb2.CONSISTENCY_READ_MY_WRITES,
        kv_pb2.CONSISTENCY_MONOTONIC_READS,
    ):
        r = await get(net3, f1, "k", level, token)
        assert r.found and r.value == b"v1"
        assert r.header.stale_possible and r.header.node_id == f1
        assert index_of(r.header.session_token) == max(written, r.header.index)
        assert r.header.index >= written

    # A write through a follower (forwarded) gives a newer token; monotonic: never lower.
    token2 = await put(net3, f2, "k", b"v2", token)
    assert index_of(token2) > written
    r = await get(net3, f2, "k", kv_pb2.CONSISTENCY_SESSION, token2)
    assert r.value == b"v2"

    # A token higher than anything applied: the read waits, then UNAVAILABLE (before the
    # client's deadline), saying why.
    future = (index_of(token2) + 1_000_000).to_bytes(8, "big")
    t0 = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await get(net3, f1, "k", kv_pb2.CONSISTENCY_SESSION, future, timeout=1.0)
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "the session has seen" in (ei.value.details() or "")
    assert 0.5 < time.monotonic() - t0 < 1.0

    # Linearizable reads carry the token too.
    r = await get(net3, f1, "k", kv_pb2.CONSISTENCY_LINEARIZABLE, token2)
    assert r.value == b"v2" and index_of(r.header.session_token) >= index_of(token2)

    # Bounded staleness: served by a connected follower and by the leader.
    for node in (f1, leader):
        r = await get(net3, node, "k", kv_pb2.CONSISTENCY_BOUNDED_STALENESS, max_staleness_ms=1000)
        assert r.found

    # A malformed token: INVALID_ARGUMENT, on reads and writes.
    for call in (
        get(net3, f1, "k", kv_pb2.CONSISTENCY_SESSION, b"\x01\x02\x03"),
        get(net3, f1, "k", kv_pb2.CONSISTENCY_LOCAL, b"x" * 9),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await call
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "session_token" in (ei.value.details() or "")
    async with stub(net3, f2) as kv:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await kv.Put(kv_pb2.PutRequest(key="k", value=b"x", session_token=b"bad"), timeout=2)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_cut_off_follower(net3: Net) -> None:  # noqa: F811
    leader = await net3.leader()
    f1, cut = (n for n in net3.eps if n != leader)
    await put(net3, leader, "k", b"old")

    async def cut_has_old() -> bool:
        r = await get(net3, cut, "k", kv_pb2.CONSISTENCY_LOCAL)
        return r.value == b"old"

    await eventually(cut_has_old, 10)
    net3.partition([cut], [leader, f1])
    token = await put(net3, leader, "k", b"new")

    # The majority side's follower serves the session read.
    r = await get(net3, f1, "k", kv_pb2.CONSISTENCY_SESSION, token)
    assert r.value == b"new"

    # The cut-off follower cannot catch up: UNAVAILABLE once the deadline nears.
    t0 = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await get(net3, cut, "k", kv_pb2.CONSISTENCY_SESSION, token, timeout=1.0)
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE, ei.value.details()
    details = ei.value.details() or ""
    assert "cut off from the leader" in details and "not served" in details
    assert 0.5 < time.monotonic() - t0 < 1.0

    # ... but CONSISTENT_PREFIX and LOCAL answer at once, from its (older) prefix.
    for level in (kv_pb2.CONSISTENCY_CONSISTENT_PREFIX, kv_pb2.CONSISTENCY_LOCAL):
        t0 = time.monotonic()
        r = await get(net3, cut, "k", level, token)
        assert time.monotonic() - t0 < 0.5
        assert r.value == b"old" and r.header.stale_possible
        assert index_of(r.header.session_token) == index_of(token)  # (max of the two)

    # Bounded staleness: refused on the cut-off follower once the bound has passed ...
    async def refused() -> bool:
        try:
            await get(
                net3,
                cut,
                "k",
                kv_pb2.CONSISTENCY_BOUNDED_STALENESS,
                max_staleness_ms=200,
                timeout=0.5,
            )
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e.details()
            assert "BOUNDED_STALENESS read not served" in (e.details() or "")
            return True
        return False

    await eventually(refused, 10)
    # ... and served on the connected follower.
    r = await get(net3, f1, "k", kv_pb2.CONSISTENCY_BOUNDED_STALENESS, max_staleness_ms=1000)
    assert r.found
