"""The consistency levels of kv.proto at the runtime (issue 16): which levels reach a
backend, what the runtime refuses itself, and the session token's round trip."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from caplab import errors
from caplab.client import KVClient
from caplab.clock import SkewableClock
from caplab.server import NodeServer
from caplab.store import (
    BASIC_LEVELS,
    MAX_SESSION_TOKEN_BYTES,
    Consistency,
    Header,
    NodeConfig,
    ReadResult,
    session_token,
)
from caplab.v1 import kv_pb2, kv_pb2_grpc
from caplab.validation import RequestId
from harness.cluster import free_ports
from tests.foundation.memstore import MemBackend


class SessionMem(MemBackend):
    """Serves BOUNDED_STALENESS and SESSION; the token it answers is the one it was given
    plus one byte per answer, and it remembers what it saw."""

    consistency_levels = BASIC_LEVELS | {Consistency.BOUNDED_STALENESS, Consistency.SESSION}

    def __init__(self, config: NodeConfig, clock: SkewableClock) -> None:
        super().__init__(config, clock)
        self.calls: list[tuple[str, bytes, int]] = []

    async def get(
        self,
        key: str,
        consistency: Consistency,
        timeout: float | None,
        *,
        max_staleness_ms: int = 0,
    ) -> ReadResult:
        token = session_token.get()
        self.calls.append((consistency.name, token, max_staleness_ms))
        r = await super().get(key, consistency, timeout)
        return ReadResult(replace(r.header, session_token=token + b"r"), r.value)

    async def put(
        self, key: str, value: bytes, rid: RequestId | None, timeout: float | None
    ) -> Header:
        token = session_token.get()
        self.calls.append(("put", token, 0))
        h = await super().put(key, value, rid, timeout)
        return replace(h, session_token=token + b"w")


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[tuple[NodeServer, SessionMem]]:
    port = free_ports(1)[0]
    config = NodeConfig(
        store="mem", node_id="m1", listen=f"127.0.0.1:{port}", peers={}, data_dir=str(tmp_path)
    )
    backend = SessionMem(config, SkewableClock())
    server = NodeServer(config, backend, grace_s=1.0)
    await server.start()
    yield server, backend
    await server.stop()


async def test_levels_a_backend_does_not_handle_are_refused_by_the_runtime(
    node: tuple[NodeServer, SessionMem],
) -> None:
    server, backend = node
    async with KVClient([server.config.listen]) as c:
        for level in (kv_pb2.CONSISTENCY_CONSISTENT_PREFIX, kv_pb2.CONSISTENCY_MONOTONIC_READS):
            with pytest.raises(errors.FailedPrecondition, match="does not offer"):
                await c.get("k", level)
        assert not [s for s in backend.calls if s[0] in ("CONSISTENT_PREFIX", "MONOTONIC_READS")]
        # aliases: STRONG is LINEARIZABLE, EVENTUAL is LOCAL
        assert kv_pb2.CONSISTENCY_STRONG == kv_pb2.CONSISTENCY_LINEARIZABLE
        assert kv_pb2.CONSISTENCY_EVENTUAL == kv_pb2.CONSISTENCY_LOCAL


async def test_bounded_staleness_needs_its_bound(node: tuple[NodeServer, SessionMem]) -> None:
    server, backend = node
    async with KVClient([server.config.listen]) as c:
        with pytest.raises(errors.InvalidArgument, match="max_staleness_ms > 0"):
            await c.get("k", kv_pb2.CONSISTENCY_BOUNDED_STALENESS)
        await c.get("k", kv_pb2.CONSISTENCY_BOUNDED_STALENESS, max_staleness_ms=250)
    assert backend.calls[-1] == ("BOUNDED_STALENESS", b"", 250)


async def test_a_session_client_passes_back_the_latest_token(
    node: tuple[NodeServer, SessionMem],
) -> None:
    server, backend = node
    async with KVClient([server.config.listen], session=True) as c:
        await c.put("k", b"v")
        assert c.session_token == b"w"
        got = await c.get("k", kv_pb2.CONSISTENCY_SESSION)
        assert got.value == b"v" and got.header.session_token == b"wr"
        await c.put("k", b"v2")
    assert [(f, t) for f, t, _ in backend.calls] == [
        ("put", b""),
        ("SESSION", b"w"),
        ("put", b"wr"),
    ]
    async with KVClient([server.config.listen]) as plain:  # no session: no token sent
        await plain.put("k", b"v3")
    assert backend.calls[-1] == ("put", b"", 0)


async def test_an_oversized_session_token_is_invalid(node: tuple[NodeServer, SessionMem]) -> None:
    server, _ = node
    async with grpc.aio.insecure_channel(server.config.listen) as ch:
        stub = kv_pb2_grpc.KVStub(ch)
        big = b"x" * (MAX_SESSION_TOKEN_BYTES + 1)
        for call in (
            stub.Get(kv_pb2.GetRequest(key="k", session_token=big)),
            stub.Put(kv_pb2.PutRequest(key="k", value=b"v", session_token=big)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "session_token" in (e.value.details() or "")
