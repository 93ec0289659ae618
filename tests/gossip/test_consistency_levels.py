"""The gossip store's read levels beyond LOCAL, end to end (real nodes, proxies, raw gRPC
so the test holds the session token): SESSION and its parts wait for the session's
version or refuse after the deadline (sticky availability), BOUNDED_STALENESS serves only
a node that synced with every peer within the bound, CONSISTENT_PREFIX is refused, and a
token-carrying write is ordered after what the session saw."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from caplab.v1 import kv_pb2, kv_pb2_grpc
from gossip.hlc import Timestamp
from gossip.node import (
    SESSION_KEYS,
    _session_note,
    decode_session_token,
    encode_session_token,
)
from tests.gossip.test_integration import Net, running_net
from tests.polling import eventually

pytestmark = [
    pytest.mark.integration,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.harness_loop,  # (its proxies)
]

C = kv_pb2


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def net(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Net]:
    async with running_net(tmp_path_factory.mktemp("gossip-levels")) as n:
        yield n


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stubs(net: Net) -> AsyncIterator[dict[str, kv_pb2_grpc.KVAsyncStub]]:
    channels = {n: grpc.aio.insecure_channel(ep) for n, ep in net.cluster.endpoints.items()}
    yield {n: kv_pb2_grpc.KVStub(ch) for n, ch in channels.items()}
    for ch in channels.values():
        await ch.close()


@pytest_asyncio.fixture(loop_scope="module")
async def healed(net: Net) -> AsyncIterator[Net]:
    net.proxies.heal()
    yield net
    net.proxies.heal()
    for c in net.clients.values():
        await c.set_clock_skew(0)


def _ts(h: kv_pb2.ResponseHeader) -> tuple[int, int, str]:
    return (h.hlc.wall_ms, h.hlc.logical, h.hlc.node_id)


async def _get(
    stub: kv_pb2_grpc.KVAsyncStub,
    key: str,
    level: kv_pb2.Consistency.ValueType,
    token: bytes = b"",
    timeout: float = 3.0,
    staleness: int = 0,
) -> kv_pb2.GetResponse:
    resp: kv_pb2.GetResponse = await stub.Get(
        C.GetRequest(key=key, consistency=level, session_token=token, max_staleness_ms=staleness),
        timeout=timeout,
    )
    return resp


async def test_the_first_token_of_a_session_is_the_general_encoding() -> None:
    """A request without a token gets its first one from a direct encoding: the same
    bytes as the general encoder's, for any key, timestamp and node id."""
    rng = random.Random(7)
    for _ in range(2000):
        key = "".join(rng.choice("ab/é\x7f") for _ in range(rng.randint(1, 500)))
        ts = Timestamp(rng.randint(0, 2**50), rng.randint(0, 70_000), "n" * rng.randint(1, 100))
        token = _session_note({}, key, ts)
        assert token == encode_session_token({key: ts})
        assert decode_session_token(token) == {key: ts}


async def test_token_round_trip_bounded_and_malformed() -> None:
    keys = {f"k{i}": Timestamp(1000 + i, i % 3, f"n{i % 3}") for i in range(SESSION_KEYS + 50)}
    tok = encode_session_token(dict(keys))
    back = decode_session_token(tok)
    assert len(back) == SESSION_KEYS  # the least recently used dropped out
    assert list(back) == list(keys)[-SESSION_KEYS:]
    assert all(back[k] == keys[k] for k in back)
    big = {("x" * 1000) + str(i): Timestamp(1, 0, "n1") for i in range(100)}
    assert len(encode_session_token(big)) <= 16 * 1024
    assert decode_session_token(b"") == {}
    from caplab import errors

    for bad in (b"\x02", b"\x01", tok + b"\x00", tok[:-1], b"\x01\x00\x01\x01k\x01\x01\x00"):
        with pytest.raises(errors.InvalidArgument):
            decode_session_token(bad)


async def test_session_read_follows_the_write_to_another_node(
    healed: Net, stubs: dict[str, kv_pb2_grpc.KVAsyncStub]
) -> None:
    put = await stubs["n1"].Put(C.PutRequest(key="s/a", value=b"v1"), timeout=3.0)
    token = put.header.session_token
    assert decode_session_token(token)["s/a"] == Timestamp(*_ts(put.header))
    # on another node at once: it waits for gossip to bring the write, never answers older
    for level in (C.CONSISTENCY_SESSION, C.CONSISTENCY_READ_MY_WRITES):
        r = await _get(stubs["n2"], "s/a", level, token)
        assert r.found and r.value == b"v1"
        assert r.header.stale_possible
        assert decode_session_token(r.header.session_token)["s/a"] == Timestamp(*_ts(put.header))
    # the token also carries reads: monotonic reads on the third node
    r = await _get(stubs["n3"], "s/a", C.CONSISTENCY_MONOTONIC_READS, r.header.session_token)
    assert r.value == b"v1"
    # read-my-deletes: the tombstone's timestamp is in the token
    d = await stubs["n3"].Delete(
        C.DeleteRequest(key="s/a", session_token=r.header.session_token), timeout=3.0
    )
    assert _ts(d.header) > _ts(put.header)
    r = await _get(stubs["n1"], "s/a", C.CONSISTENCY_SESSION, d.header.session_token)
    assert not r.found


async def test_partitioned_session_read_is_refused_then_served_after_heal(
    healed: Net, stubs: dict[str, kv_pb2_grpc.KVAsyncStub]
) -> None:
    net = healed
    await stubs["n1"].Put(C.PutRequest(key="s/p", value=b"old"), timeout=3.0)

    async def n3_has_old() -> bool:
        r = await _get(stubs["n3"], "s/p", C.CONSISTENCY_LOCAL)
        return r.value == b"old"

    await eventually(n3_has_old, 20.0)
    net.partition(["n1"], ["n2", "n3"])
    put = await stubs["n1"].Put(
        C.PutRequest(key="s/p", value=b"new", session_token=b""), timeout=3.0
    )
    token = put.header.session_token
    # LOCAL answers at once, stale
    t0 = time.monotonic()
    r = await _get(stubs["n3"], "s/p", C.CONSISTENCY_LOCAL, token)
    assert r.value == b"old" and r.header.stale_possible
    assert time.monotonic() - t0 < 1.0
    # SESSION waits up to its deadline, then UNAVAILABLE saying why
    t0 = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _get(stubs["n3"], "s/p", C.CONSISTENCY_SESSION, token, timeout=1.0)
    assert e.value.code() is grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - t0 >= 0.5
    assert "sticky availability" in (e.value.details() or "")
    net.proxies.heal()

    async def served() -> bool:
        try:
            r = await _get(stubs["n3"], "s/p", C.CONSISTENCY_SESSION, token, timeout=2.0)
        except grpc.aio.AioRpcError:
            return False
        return r.value == b"new"

    await eventually(served, 20.0)


async def test_sticky_refusal_comes_before_the_call_deadline(
    healed: Net, stubs: dict[str, kv_pb2_grpc.KVAsyncStub]
) -> None:
    net = healed
    net.partition(["n1"], ["n2", "n3"])
    put = await stubs["n1"].Put(C.PutRequest(key="s/q", value=b"x"), timeout=3.0)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _get(
            stubs["n2"], "s/q", C.CONSISTENCY_READ_MY_WRITES, put.header.session_token, timeout=2.0
        )
    # the backend refuses just before the deadline, so the client gets the reason
    assert "s/q" in (e.value.details() or "")
    assert e.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_consistent_prefix_is_refused(stubs: dict[str, kv_pb2_grpc.KVAsyncStub]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _get(stubs["n1"], "s/a", C.CONSISTENCY_CONSISTENT_PREFIX)
    assert e.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "CONSISTENT_PREFIX" in (e.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _get(stubs["n1"], "s/a", C.CONSISTENCY_LINEARIZABLE)
    assert e.value.code() is grpc.StatusCode.FAILED_PRECONDITION


async def test_malformed_token_is_invalid_argument(
    stubs: dict[str, kv_pb2_grpc.KVAsyncStub],
) -> None:
    for call in (
        lambda: _get(stubs["n1"], "s/a", C.CONSISTENCY_SESSION, b"\x07garbage"),
        lambda: _get(stubs["n1"], "s/a", C.CONSISTENCY_LOCAL, b"\x01\x05"),
        lambda: stubs["n1"].Put(
            C.PutRequest(key="s/m", value=b"v", session_token=b"\xff\xff"), timeout=3.0
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call()
        assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_bounded_staleness_served_connected_refused_partitioned(
    healed: Net, stubs: dict[str, kv_pb2_grpc.KVAsyncStub]
) -> None:
    net = healed
    await stubs["n1"].Put(C.PutRequest(key="s/b", value=b"b"), timeout=3.0)

    async def bounded_ok() -> bool:
        try:
            await _get(stubs["n1"], "s/b", C.CONSISTENCY_BOUNDED_STALENESS, staleness=2000)
        except grpc.aio.AioRpcError:
            return False
        return True

    await eventually(bounded_ok, 20.0)
    net.partition(["n1"], ["n2", "n3"])
    refusal: list[grpc.aio.AioRpcError] = []

    async def refused() -> bool:
        # served while the last syncs are within the bound; once they are not (and no
        # sync can come), the read waits for its deadline and is refused, naming a peer
        t0 = time.monotonic()
        try:
            await _get(
                stubs["n1"], "s/b", C.CONSISTENCY_BOUNDED_STALENESS, staleness=300, timeout=1.0
            )
        except grpc.aio.AioRpcError as e:
            assert time.monotonic() - t0 >= 0.5
            refusal.append(e)
            return True
        return False

    await eventually(refused, 20.0)
    e = refusal[0]
    assert e.code() is grpc.StatusCode.UNAVAILABLE, e.details()
    assert "bounded staleness" in (e.details() or "")
    assert "n2" in (e.details() or "") or "n3" in (e.details() or "")
    r = await _get(stubs["n1"], "s/b", C.CONSISTENCY_LOCAL)
    assert r.value == b"b"
    net.proxies.heal()
    await eventually(bounded_ok, 20.0)


async def test_token_write_is_ordered_after_a_far_ahead_read(
    healed: Net, stubs: dict[str, kv_pb2_grpc.KVAsyncStub]
) -> None:
    net = healed
    net.partition(["n3"], ["n1", "n2"])  # n1 must not learn n3's clock by gossip
    await net.clients["n3"].set_clock_skew(120_000)
    ahead = await stubs["n3"].Put(C.PutRequest(key="s/far", value=b"ahead"), timeout=3.0)
    await net.clients["n3"].set_clock_skew(0)
    read = await _get(stubs["n3"], "s/far", C.CONSISTENCY_LOCAL)
    assert read.value == b"ahead"
    token = read.header.session_token
    plain = await stubs["n1"].Put(C.PutRequest(key="s/other", value=b"x"), timeout=3.0)
    assert _ts(plain.header) < _ts(ahead.header)  # without the token: behind it
    w = await stubs["n1"].Put(
        C.PutRequest(key="s/far", value=b"after", session_token=token), timeout=3.0
    )
    assert _ts(w.header) > _ts(ahead.header)
    net.proxies.heal()

    async def everyone_after() -> bool:
        for s in stubs.values():
            if (await _get(s, "s/far", C.CONSISTENCY_LOCAL)).value != b"after":
                return False
        return True

    await eventually(everyone_after, 20.0)
