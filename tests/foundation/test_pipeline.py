"""KV.Pipeline end to end on the shared runtime (kv.proto, PIPELINE): a real grpc.aio node
over a dictionary backend whose writes can be held, and the real client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from caplab import errors
from caplab.client import KVClient
from caplab.clock import SkewableClock
from caplab.pipeline_client import Pipeline
from caplab.pipeline_server import MAX_IN_FLIGHT
from caplab.server import NodeServer
from caplab.store import Header, NodeConfig
from caplab.v1 import kv_pb2
from caplab.validation import RequestId
from harness.cluster import free_ports
from tests.foundation.conftest import start_mem_node
from tests.foundation.memstore import MemBackend
from tests.polling import eventually


class GatedBackend(MemBackend):
    """Puts wait at a gate (open by default); counts how many wait at once."""

    def __init__(self, config: NodeConfig, clock: SkewableClock) -> None:
        super().__init__(config, clock)
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = 0
        self.most_waiting = 0

    async def put(
        self, key: str, value: bytes, rid: RequestId | None, timeout: float | None
    ) -> Header:
        self.waiting += 1
        self.most_waiting = max(self.most_waiting, self.waiting)
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        return await super().put(key, value, rid, timeout)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[NodeServer]:
    n = await start_mem_node(tmp_path, backend=GatedBackend, grace_s=1.0)
    yield n
    await n.stop()


def _backend(node: NodeServer) -> GatedBackend:
    assert isinstance(node.backend, GatedBackend)
    return node.backend


def _ep(node: NodeServer) -> str:
    return node.config.listen


async def test_concurrent_callers_share_messages_and_each_gets_its_own_result(
    node: NodeServer,
) -> None:
    async with KVClient([_ep(node)], pipeline=True) as c:
        await c.put("warm", b"")  # (the stream is open)
        pipe = c._pipes[_ep(node)]
        sent = pipe.messages_sent
        await asyncio.gather(*(c.put(f"k{i}", str(i).encode()) for i in range(300)))
        assert pipe.messages_sent - sent < 300 / 4, "operations were not batched"
        got = await asyncio.gather(*(c.get(f"k{i}") for i in range(300)))
        assert [g.value for g in got] == [str(i).encode() for i in range(300)]
        ctr = await asyncio.gather(*(c.increment("ctr", 1) for _ in range(50)))
        assert sorted(r.value for r in ctr) == list(range(1, 51))
        assert (await c.cas("k1", b"1", b"one")).swapped
        assert (await c.delete("k2")).existed


async def test_one_bad_operation_fails_alone_with_the_unary_status(node: NodeServer) -> None:
    async with KVClient([_ep(node)], pipeline=True) as c:
        results = await asyncio.gather(
            c.put("good", b"1"),
            c.put("", b"x"),
            c.increment("good", 1),
            c.put("big", b"x" * (1024 * 1024 + 1)),
            c.put("good2", b"2"),
            return_exceptions=True,
        )
        assert isinstance(results[0], kv_pb2.PutResponse)
        assert isinstance(results[1], errors.InvalidArgument) and results[1].definite
        assert isinstance(results[2], errors.FailedPrecondition)
        assert "register" in results[2].message
        assert isinstance(results[3], errors.InvalidArgument)
        assert isinstance(results[4], kv_pb2.PutResponse)
        assert (await c.get("good2")).value == b"2"


async def test_a_retry_with_the_same_request_id_is_applied_once(node: NodeServer) -> None:
    rid = kv_pb2.RequestId(client_id="retrier", sequence=1)
    inc = kv_pb2.IncrementRequest(key="once", delta=1, request_id=rid)
    async with grpc.aio.insecure_channel(_ep(node)) as ch:
        pipe = Pipeline(ch)
        await pipe.call("increment", inc, 5)
        await pipe.call("increment", inc, 5)  # (the same request id)
        await pipe.close()
    assert _backend(node).data["once"] == 1  # (the stores' own answers: conformance)


async def test_the_node_holds_back_a_stream_beyond_its_in_flight_limit(node: NodeServer) -> None:
    """Bounded memory: with every write held, the node reads no more than MAX_IN_FLIGHT
    operations of one stream; released, every operation is answered (none refused)."""
    backend = _backend(node)
    backend.gate.clear()
    n = MAX_IN_FLIGHT + 300
    async with grpc.aio.insecure_channel(_ep(node)) as ch:
        pipe = Pipeline(ch, max_in_flight=4 * n)
        calls = [
            asyncio.ensure_future(pipe.call("put", kv_pb2.PutRequest(key=f"b{i}"), 30))
            for i in range(n)
        ]
        await eventually(lambda: backend.waiting == MAX_IN_FLIGHT, 10)
        assert backend.most_waiting == MAX_IN_FLIGHT
        backend.gate.set()
        await asyncio.gather(*calls)
        await pipe.close()
    assert backend.most_waiting == MAX_IN_FLIGHT
    assert len([k for k in backend.data if k.startswith("b")]) == n


async def test_the_client_holds_back_callers_beyond_its_own_limit(node: NodeServer) -> None:
    backend = _backend(node)
    backend.gate.clear()
    async with grpc.aio.insecure_channel(_ep(node)) as ch:
        pipe = Pipeline(ch, max_in_flight=10)
        calls = [
            asyncio.ensure_future(pipe.call("put", kv_pb2.PutRequest(key=f"c{i}"), 30))
            for i in range(25)
        ]
        await eventually(lambda: backend.waiting == 10, 10)
        for _ in range(20):
            await asyncio.sleep(0)  # (a caller beyond the limit would be sent by now)
        assert backend.waiting == 10 and len(pipe.queue) == 0
        backend.gate.set()
        await asyncio.gather(*calls)
        await pipe.close()
    assert backend.most_waiting == 10


async def test_a_deadline_gives_an_unknown_outcome_once_sent(node: NodeServer) -> None:
    backend = _backend(node)
    backend.gate.clear()
    async with KVClient([_ep(node)], pipeline=True, timeout=0.3) as c:
        with pytest.raises(errors.OutcomeUnknown) as err:
            await c.put("late", b"x")
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        await eventually(lambda: backend.waiting == 0, 5)  # the node gave up on it too
    backend.gate.set()


async def test_a_malformed_message_ends_the_stream_after_earlier_answers(
    node: NodeServer,
) -> None:
    backend = _backend(node)
    backend.gate.clear()
    good = kv_pb2.PipelineRequest(
        operations=[kv_pb2.Operation(id=7, put=kv_pb2.PutRequest(key="early", value=b"1"))]
    ).SerializeToString()
    async with grpc.aio.insecure_channel(_ep(node)) as ch:
        call: Any = ch.stream_stream("/caplab.v1.KV/Pipeline")()
        await call.write(good)
        await eventually(lambda: backend.waiting == 1, 5)
        await call.write(b"\xff\xff\xff")  # not a protobuf message
        backend.gate.set()
        answer = kv_pb2.PipelineResponse.FromString(await call.read())
        assert [r.id for r in answer.results] == [7] and answer.results[0].HasField("put")
        with pytest.raises(grpc.aio.AioRpcError):
            await call.read()
        assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "message 2 of the stream does not decode" in await call.details()
        trailers = dict(await call.trailing_metadata() or ())
        assert trailers[errors.OUTCOME_KEY] == errors.NOT_APPLIED
    assert backend.data["early"] == b"1"


async def test_an_operation_naming_nothing_is_refused_alone(node: NodeServer) -> None:
    async with grpc.aio.insecure_channel(_ep(node)) as ch:
        with pytest.raises(errors.InvalidArgument, match="names no operation"):
            await _raw_call(ch, kv_pb2.Operation(id=1))


async def _raw_call(ch: grpc.aio.Channel, op: kv_pb2.Operation) -> kv_pb2.PutResponse:
    call: Any = ch.stream_stream(
        "/caplab.v1.KV/Pipeline",
        request_serializer=kv_pb2.PipelineRequest.SerializeToString,
        response_deserializer=kv_pb2.PipelineResponse.FromString,
    )()
    await call.write(kv_pb2.PipelineRequest(operations=[op]))
    await call.done_writing()
    answer = await call.read()
    assert await call.read() is grpc.aio.EOF and await call.code() == grpc.StatusCode.OK
    (result,) = answer.results
    e = result.error
    raise errors.classify(grpc.StatusCode(_code(e.code)), e.message, ())


def _code(number: int) -> tuple[int, str]:
    return next(c.value for c in grpc.StatusCode if c.value[0] == number)


async def test_callers_cancelled_before_and_after_sending_leave_nothing_behind(
    node: NodeServer,
) -> None:
    backend = _backend(node)
    backend.gate.clear()
    async with grpc.aio.insecure_channel(_ep(node)) as ch:
        pipe = Pipeline(ch)
        sent = asyncio.ensure_future(pipe.call("put", kv_pb2.PutRequest(key="s"), 30))
        await eventually(lambda: backend.waiting == 1, 5)
        sent.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sent
        assert pipe.in_flight == 0 and not pipe.queue
        backend.gate.set()
        ok = await pipe.call("put", kv_pb2.PutRequest(key="after", value=b"1"), 5)
        assert ok.header.node_id == "m1"
        await pipe.close()
    assert backend.data["after"] == b"1"


async def test_a_node_that_is_not_there_is_a_definite_failure(tmp_path: Path) -> None:
    port = free_ports(1)[0]
    async with KVClient([f"127.0.0.1:{port}"], pipeline=True, timeout=2.0) as c:
        with pytest.raises(errors.StoreError) as err:
            await c.put("k", b"v")
        assert err.value.definite, err.value


async def test_a_stream_that_breaks_makes_sent_writes_unknown(node: NodeServer) -> None:
    backend = _backend(node)
    backend.gate.clear()
    async with KVClient([_ep(node)], pipeline=True, timeout=10.0) as c:
        held = asyncio.ensure_future(c.put("held", b"x"))
        await eventually(lambda: backend.waiting == 1, 5)
        await node.server.stop(0)  # the node goes away with the write in flight
        with pytest.raises(errors.StoreError) as err:
            await held
        assert not err.value.definite, err.value
    backend.gate.set()


async def test_closing_the_pipeline_settles_every_caller(node: NodeServer) -> None:
    """An operation in flight when the pipeline closes has an unknown outcome (it was
    sent); a call after closing is definitely not sent. Nobody waits forever."""
    backend = _backend(node)
    backend.gate.clear()
    async with grpc.aio.insecure_channel(_ep(node)) as ch:
        pipe = Pipeline(ch)
        held = asyncio.ensure_future(pipe.call("put", kv_pb2.PutRequest(key="h"), None))
        await eventually(lambda: backend.waiting == 1, 5)
        await asyncio.wait_for(pipe.close(), 5)
        with pytest.raises(errors.OutcomeUnknown):
            await asyncio.wait_for(held, 5)  # (it waited forever)
        with pytest.raises(errors.TransportError):
            await pipe.call("put", kv_pb2.PutRequest(key="after"), None)
        assert pipe.in_flight == 0
    backend.gate.set()
