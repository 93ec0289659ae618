"""The shared runtime over real gRPC: validation, the error model, admin gating, health."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from caplab import errors
from caplab.client import KVClient
from caplab.server import NodeServer
from caplab.v1 import kv_pb2, kv_pb2_grpc
from tests.foundation.memstore import MemBackend


def addr(node: NodeServer) -> str:
    return f"127.0.0.1:{node.port}"


async def test_put_get_roundtrip_and_header(mem_node: NodeServer) -> None:
    async with KVClient([addr(mem_node)]) as c:
        r = await c.put("k", b"v")
        assert r.header.node_id == "m1"
        assert r.header.store == kv_pb2.STORE_KIND_RAFT
        g = await c.get("k")
        assert (g.found, g.value) == (True, b"v")
        assert (await c.increment("n", 5)).value == 5
        assert (await c.get("n")).value == 5
        assert not (await c.get("absent")).found


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda c: c.put("", b"x"), "must not be empty"),
        (lambda c: c.put("a\x00", b"x"), "NUL"),
        (lambda c: c.put("k" * 1025, b"x"), "1024"),
        (lambda c: c.put("k", b"x" * (1024 * 1024 + 1)), "1 MiB"),
        (lambda c: c.get("k" * 2000), "1024"),
        (lambda c: c.cas("k" * 2000, None, b"x"), "1024"),
        (lambda c: c.increment("", 1), "empty"),
        (lambda c: c.delete(""), "empty"),
    ],
)
async def test_bad_input_is_invalid_argument_and_changes_nothing(
    mem_node: NodeServer, call: Callable[[KVClient], Awaitable[object]], fragment: str
) -> None:
    backend = mem_node.backend
    assert isinstance(backend, MemBackend)
    async with KVClient([addr(mem_node)]) as c:
        with pytest.raises(errors.InvalidArgument, match=fragment) as info:
            await call(c)
        assert info.value.definite
    assert backend.applied == 0


async def test_oversized_message_is_refused_by_grpc(mem_node: NodeServer) -> None:
    async with KVClient([addr(mem_node)]) as c:
        with pytest.raises(errors.StoreError) as info:
            await c.put("k", b"x" * (3 * 1024 * 1024))
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_type_conflicts_name_the_type(mem_node: NodeServer) -> None:
    async with KVClient([addr(mem_node)]) as c:
        await c.increment("ctr", 1)
        with pytest.raises(errors.FailedPrecondition, match="counter"):
            await c.put("ctr", b"x")
        await c.put("reg", b"x")
        with pytest.raises(errors.FailedPrecondition, match="register"):
            await c.increment("reg", 1)


async def test_overflow_is_out_of_range(mem_node: NodeServer) -> None:
    async with KVClient([addr(mem_node)]) as c:
        await c.increment("c", 2**63 - 1)
        with pytest.raises(errors.OutOfRange):
            await c.increment("c", 1)
        assert (await c.get("c")).value == 2**63 - 1


async def test_refusal_carries_not_applied_trailer(mem_node: NodeServer) -> None:
    backend = mem_node.backend
    assert isinstance(backend, MemBackend)
    backend.refuse = "no leader known (election in progress)"
    async with grpc.aio.insecure_channel(addr(mem_node)) as ch:
        from caplab.v1 import kv_pb2_grpc

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await kv_pb2_grpc.KVStub(ch).Put(kv_pb2.PutRequest(key="k", value=b"v"))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no leader" in (info.value.details() or "")
        assert ("caplab-outcome", "not-applied") in tuple(info.value.trailing_metadata() or ())


async def test_admin_absent_without_flag(mem_node: NodeServer) -> None:
    async with KVClient([addr(mem_node)]) as c:
        with pytest.raises(errors.StoreError) as info:
            await c.set_clock_skew(100)
        assert info.value.code == grpc.StatusCode.UNIMPLEMENTED
    assert mem_node.backend.clock.skew_ms == 0


async def test_admin_skews_clock_with_flag(admin_node: NodeServer) -> None:
    async with KVClient([addr(admin_node)]) as c:
        assert await c.set_clock_skew(-2500) == -2500
        assert (await c.status()).clock_skew_ms == -2500
        with pytest.raises(errors.InvalidArgument):
            await c.set_clock_skew(10**12)
    assert admin_node.backend.clock.skew_ms == -2500


async def test_reflection_lists_admin_only_when_enabled(
    mem_node: NodeServer, admin_node: NodeServer
) -> None:
    async def services(node: NodeServer) -> set[str]:
        async with grpc.aio.insecure_channel(addr(node)) as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            call = stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            async for resp in call:
                return {s.name for s in resp.list_services_response.service}
        return set()

    plain, admin = await services(mem_node), await services(admin_node)
    assert {"caplab.v1.KV", "caplab.v1.Cluster", "grpc.health.v1.Health"} <= plain
    assert "caplab.v1.Admin" not in plain
    assert "caplab.v1.Admin" in admin


async def test_health_serving_then_not_after_stop(mem_node: NodeServer) -> None:
    async with grpc.aio.insecure_channel(addr(mem_node)) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        r = await stub.Check(health_pb2.HealthCheckRequest())
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    await mem_node.stop()
    async with KVClient([addr(mem_node)], timeout=1.0) as c:
        with pytest.raises(errors.StoreError) as info:
            await c.get("k")
        assert info.value.definite  # nothing listens any more: the request never left


async def test_dump_streams_in_key_order(mem_node: NodeServer) -> None:
    async with KVClient([addr(mem_node)]) as c:
        for k in ["b", "a", "c"]:
            await c.put(k, b"x")
        assert [e.key for e in await c.dump()] == ["a", "b", "c"]


def _bad_utf8_key(request_id: bool = False) -> bytes:
    """A PutRequest whose key (field 1, length-delimited) holds bytes that are not UTF-8
    (or, with request_id, whose request_id.client_id does)."""
    if request_id:
        inner = b"\x0a\x02\xff\xfe\x10\x01"  # RequestId{client_id: ff fe, sequence: 1}
        return b"\x0a\x01k\x1a" + bytes([len(inner)]) + inner
    return b"\x0a\x02\xff\xfe"


@pytest.mark.parametrize(
    "method, body, fragment",
    [
        ("/caplab.v1.KV/Put", b"\xff\xff\xff", "does not decode"),
        ("/caplab.v1.KV/Put", _bad_utf8_key(), "UTF-8"),
        ("/caplab.v1.KV/Put", _bad_utf8_key(request_id=True), "UTF-8"),
        ("/caplab.v1.KV/Get", _bad_utf8_key(), "UTF-8"),
        ("/caplab.v1.KV/Delete", _bad_utf8_key(), "UTF-8"),
        ("/caplab.v1.KV/CompareAndSwap", _bad_utf8_key(), "UTF-8"),
        ("/caplab.v1.KV/Increment", _bad_utf8_key(), "UTF-8"),
        ("/caplab.v1.Cluster/Status", b"\xff\xff\xff", "does not decode"),
        ("/caplab.v1.Cluster/Dump", _bad_utf8_key(), "UTF-8"),  # start_after
        ("/caplab.v1.Admin/SetClockSkew", b"\xff\xff\xff", "does not decode"),
        ("/grpc.health.v1.Health/Check", _bad_utf8_key(), "UTF-8"),  # service
    ],
)
async def test_undecodable_request_is_invalid_argument_without_traceback(
    admin_node: NodeServer,
    caplog: pytest.LogCaptureFixture,
    method: str,
    body: bytes,
    fragment: str,
) -> None:
    """A body the protobuf parser refuses (corrupt, or a string that is not UTF-8) was
    status UNKNOWN ("outcome unknown") with a traceback logged by grpc per request."""
    backend = admin_node.backend
    assert isinstance(backend, MemBackend)
    async with grpc.aio.insecure_channel(addr(admin_node)) as ch:
        call: Any
        if method.endswith("/Dump"):
            call = ch.unary_stream(method, request_serializer=bytes, response_deserializer=bytes)
        else:
            call = ch.unary_unary(method, request_serializer=bytes, response_deserializer=bytes)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            if method.endswith("/Dump"):
                async for _ in call(body, timeout=5):
                    pass
            else:
                await call(body, timeout=5)
    e = info.value
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
    assert fragment in (e.details() or "")
    assert "not applied" in (e.details() or "")
    assert (errors.OUTCOME_KEY, errors.NOT_APPLIED) in tuple(e.trailing_metadata() or ())
    err = errors.classify(e.code(), e.details() or "", e.trailing_metadata())
    assert isinstance(err, errors.InvalidArgument) and err.definite
    assert backend.applied == 0
    tracebacks = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not tracebacks, tracebacks[0].getMessage()


async def test_well_formed_calls_pass_the_decode_guard(mem_node: NodeServer) -> None:
    """The guard hands good requests through, streams included (Dump yields, the health
    service's Watch writes)."""
    async with KVClient([addr(mem_node)]) as c:
        await c.put("a", b"1")
        await c.put("b", b"2")
        assert [e.key for e in await c.dump()] == ["a", "b"]
    async with grpc.aio.insecure_channel(addr(mem_node)) as ch:
        dump = kv_pb2_grpc.ClusterStub(ch).Dump(kv_pb2.DumpRequest(start_after="a"))
        assert [e.key async for e in dump] == ["b"]
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest())
        first = await watch.read()
        assert isinstance(first, health_pb2.HealthCheckResponse)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
