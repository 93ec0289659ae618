"""gRPC health and malformed requests on real store nodes, in process (issue 15).

Raft's health without a quorum, and with one again, over a 3-node cluster:
tests/raft/test_health.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from caplab import errors
from caplab.clock import SkewableClock
from caplab.server import NodeServer
from caplab.store import NodeConfig, StoreBackend
from gossip.node import build_backend as gossip_backend
from harness.cluster import free_ports
from raft.node import build_backend as raft_backend
from tests.foundation.memstore import MemBackend
from tests.polling import eventually

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
Factory = Callable[[NodeConfig, SkewableClock], StoreBackend]


async def lone_node(tmp_path: Path, store: str, factory: Factory) -> NodeServer:
    """A node of a 3-node cluster whose peers never come up."""
    port, p2, p3 = free_ports(3)
    config = NodeConfig(
        store=store,
        node_id="n1",
        listen=f"127.0.0.1:{port}",
        peers={"n2": f"127.0.0.1:{p2}", "n3": f"127.0.0.1:{p3}"},
        data_dir=str(tmp_path / "n1"),
    )
    node = NodeServer(config, factory(config, SkewableClock()), grace_s=1.0)
    await node.start()
    return node


@pytest.fixture(params=["raft", "gossip"])
async def node(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[NodeServer]:
    factory: Factory = raft_backend if request.param == "raft" else gossip_backend
    n = await lone_node(tmp_path, request.param, factory)
    yield n
    await n.stop()


async def check(address: str, service: str) -> int:
    async with grpc.aio.insecure_channel(address) as ch:
        r = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
        return int(r.status)


async def test_health_per_service_follows_the_store(node: NodeServer) -> None:
    """Raft without a quorum: NOT_SERVING for "" and caplab.v1.KV (it cannot serve a
    linearizable request); gossip: SERVING (AP: it answers alone). caplab.v1.Cluster
    answers either way: SERVING. caplab.v1.KV was NOT_FOUND."""
    address = f"127.0.0.1:{node.port}"
    expected = NOT_SERVING if node.config.store == "raft" else SERVING
    assert await check(address, "") == expected
    assert await check(address, "caplab.v1.KV") == expected
    assert await check(address, "caplab.v1.Cluster") == SERVING


async def test_gossip_is_not_serving_while_shutting_down(tmp_path: Path) -> None:
    node = await lone_node(tmp_path, "gossip", gossip_backend)
    address = f"127.0.0.1:{node.port}"
    try:
        assert await check(address, "caplab.v1.KV") == SERVING
        await node.backend.before_shutdown()  # shutdown step 1: writes refused from now

        async def not_serving() -> bool:
            return bool(await check(address, "caplab.v1.KV") == NOT_SERVING)

        await eventually(not_serving, 5)
        assert await check(address, "") == NOT_SERVING
    finally:
        await node.stop()


async def test_malformed_requests_are_invalid_argument_on_store_nodes(node: NodeServer) -> None:
    bad_key = b"\x0a\x02\xff\xfe"  # PutRequest.key: not UTF-8
    async with grpc.aio.insecure_channel(f"127.0.0.1:{node.port}") as ch:
        call = ch.unary_unary(
            "/caplab.v1.KV/Put", request_serializer=bytes, response_deserializer=bytes
        )
        for body in (b"\xff\xff\xff", bad_key):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(body, timeout=5)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            md = tuple(info.value.trailing_metadata() or ())
            assert (errors.OUTCOME_KEY, errors.NOT_APPLIED) in md


async def test_health_watch_works_with_client_auth(tmp_path: Path) -> None:
    """With --client-auth, the auth interceptor iterated the health service's Watch (a
    coroutine that writes its responses) with `async for`: status UNKNOWN."""
    config = NodeConfig(
        store="mem",
        node_id="m1",
        listen=f"127.0.0.1:{free_ports(1)[0]}",
        peers={},
        data_dir=str(tmp_path),
        client_tokens={},  # auth on; health needs no credentials
    )
    node = NodeServer(config, MemBackend(config, SkewableClock()), grace_s=1.0)
    await node.start()
    try:
        async with grpc.aio.insecure_channel(config.listen) as ch:
            watch = health_pb2_grpc.HealthStub(ch).Watch(
                health_pb2.HealthCheckRequest(service="caplab.v1.KV")
            )
            first = await asyncio.wait_for(watch.read(), 5)
            assert isinstance(first, health_pb2.HealthCheckResponse)
            assert first.status == SERVING
            watch.cancel()
    finally:
        await node.stop()
