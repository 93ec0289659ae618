"""Review of KV.Pipeline's node side (caplab.pipeline_server) through raw streams: memory
held for a client that does not read, shutdown, deadlines. A failing test is a finding."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from caplab import errors, pipeline_server
from caplab.pipeline_client import Pipeline
from caplab.server import NodeServer
from caplab.v1 import kv_pb2
from caplab.validation import MAX_MESSAGE_BYTES
from tests.foundation.conftest import start_mem_node
from tests.foundation.test_pipeline_client_edges import HoldBackend
from tests.polling import eventually


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[NodeServer]:
    n = await start_mem_node(tmp_path, backend=HoldBackend, grace_s=0.5)
    yield n
    assert isinstance(n.backend, HoldBackend)
    n.backend.gate.set()
    await n.stop()


def _raw(ch: grpc.aio.Channel) -> Any:
    return ch.stream_stream(
        "/caplab.v1.KV/Pipeline",
        request_serializer=kv_pb2.PipelineRequest.SerializeToString,
        response_deserializer=kv_pb2.PipelineResponse.FromString,
    )()


async def test_a_client_that_does_not_read_stops_the_node_reading(
    node: NodeServer,
) -> None:
    """Bounded memory: once MAX_UNSENT_BYTES of results wait for a client that reads
    nothing, the node reads no further operation of the stream (a put sent after them is
    not applied); once the client reads, every operation is answered."""
    backend = node.backend
    assert isinstance(backend, HoldBackend)
    value = b"v" * (256 * 1024)
    n = pipeline_server.MAX_UNSENT_BYTES // len(value) + 160  # (well beyond the budget)
    async with grpc.aio.insecure_channel(node.config.listen) as ch:
        await kv_pb2_grpc_stub(ch).Put(kv_pb2.PutRequest(key="big", value=value), timeout=5)
        call = _raw(ch)
        gets = [kv_pb2.Operation(id=i + 1, get=kv_pb2.GetRequest(key="big")) for i in range(n)]
        await call.write(kv_pb2.PipelineRequest(operations=gets))
        late = kv_pb2.Operation(id=n + 1, put=kv_pb2.PutRequest(key="late", value=b"1"))
        await call.write(kv_pb2.PipelineRequest(operations=[late]))
        streams = node.kv_servicers[0].pipelines

        def held_back() -> bool:
            return any(c.unsent >= pipeline_server.MAX_UNSENT_BYTES for c in streams.calls)

        await eventually(held_back, 10)
        for _ in range(50):
            await asyncio.sleep(0)  # (the node would read on now if it were going to)
        assert "late" not in backend.data, "the node read on past its byte budget"
        await call.done_writing()
        got = []
        while (msg := await call.read()) is not grpc.aio.EOF:
            got.extend(msg.results)
        assert sorted(r.id for r in got) == list(range(1, n + 2))
    assert backend.data["late"] == b"1"


def kv_pb2_grpc_stub(ch: grpc.aio.Channel) -> Any:
    from caplab.v1 import kv_pb2_grpc

    return kv_pb2_grpc.KVStub(ch)


async def test_in_flight_operations_at_shutdown_end_unknown(node: NodeServer) -> None:
    """NodeServer.stop with a write sent and held: the caller's outcome is unknown (not
    "definitely not applied"), and an operation sent during the grace period is either
    answered or unknown."""
    backend = node.backend
    assert isinstance(backend, HoldBackend)
    backend.apply_first = True
    async with grpc.aio.insecure_channel(node.config.listen) as ch:
        pipe = Pipeline(ch)
        await pipe.call("put", kv_pb2.PutRequest(key="warm"), 5)
        held = asyncio.ensure_future(pipe.call("put", kv_pb2.PutRequest(key="hold1"), 30))
        await eventually(lambda: backend.waiting == 1, 5)
        stop = asyncio.ensure_future(node.stop())
        await eventually(lambda: node._stopped.is_set(), 5)
        during = asyncio.ensure_future(pipe.call("put", kv_pb2.PutRequest(key="during"), 30))
        results = await asyncio.gather(held, during, return_exceptions=True)
        await stop
        await pipe.close()
    assert backend.data.get("hold1") is not None  # (applied before the stop)
    for key, r in zip(("hold1", "during"), results, strict=True):
        if isinstance(r, errors.StoreError) and r.definite:
            assert key not in backend.data, f"{key} applied but reported not applied: {r!r}"


async def test_duplicate_operation_ids_in_flight(node: NodeServer) -> None:
    """Two operations with the same id in flight (a buggy client): each gets a result
    (the node does not drop or merge them)."""
    async with grpc.aio.insecure_channel(node.config.listen) as ch:
        call = _raw(ch)
        ops = [
            kv_pb2.Operation(id=0, put=kv_pb2.PutRequest(key="d1", value=b"1")),
            kv_pb2.Operation(id=0, put=kv_pb2.PutRequest(key="d2", value=b"2")),
        ]
        await call.write(kv_pb2.PipelineRequest(operations=ops))
        await call.done_writing()
        got = []
        async for resp in call:
            got.extend(resp.results)
        assert await call.code() == grpc.StatusCode.OK
        assert [r.id for r in got] == [0, 0] and all(r.HasField("put") for r in got)


async def test_a_huge_operation_timeout_is_served(node: NodeServer) -> None:
    """timeout_ms at its maximum (about 49 days) must not break the deadline timer."""
    async with grpc.aio.insecure_channel(node.config.listen) as ch:
        call = _raw(ch)
        op = kv_pb2.Operation(
            id=1, timeout_ms=2**32 - 1, put=kv_pb2.PutRequest(key="h", value=b"1")
        )
        await call.write(kv_pb2.PipelineRequest(operations=[op]))
        await call.done_writing()
        resp = await asyncio.wait_for(call.read(), 5)
        assert resp.results[0].HasField("put")


async def test_an_expired_stream_deadline_answers_deadline_exceeded(
    node: NodeServer,
) -> None:
    """timeout_ms = 0 inherits the stream's deadline; a write held past it is answered
    DEADLINE_EXCEEDED/unknown (or the stream ends DEADLINE_EXCEEDED), never not-applied."""
    backend = node.backend
    assert isinstance(backend, HoldBackend)
    async with grpc.aio.insecure_channel(node.config.listen) as ch:
        call = ch.stream_stream(
            "/caplab.v1.KV/Pipeline",
            request_serializer=kv_pb2.PipelineRequest.SerializeToString,
            response_deserializer=kv_pb2.PipelineResponse.FromString,
        )(timeout=0.5)
        op = kv_pb2.Operation(id=1, put=kv_pb2.PutRequest(key="hold-d", value=b"1"))
        await call.write(kv_pb2.PipelineRequest(operations=[op]))
        try:
            resp = await call.read()
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            return
        if resp is not grpc.aio.EOF:
            assert isinstance(resp, kv_pb2.PipelineResponse)
            e2 = resp.results[0].error
            assert e2.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
            assert e2.outcome != errors.NOT_APPLIED


async def test_four_1mib_reads_in_one_batch_fit_the_message_limit(
    node: NodeServer,
) -> None:
    """Four Gets of a 1 MiB value answered together: the node splits the results so that
    each response message fits the client's limit (MAX_MESSAGE_BYTES)."""
    value = b"v" * (1024 * 1024)
    async with grpc.aio.insecure_channel(
        node.config.listen,
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)],
    ) as ch:
        await kv_pb2_grpc_stub(ch).Put(kv_pb2.PutRequest(key="m", value=value), timeout=5)
        call = _raw(ch)
        ops = [kv_pb2.Operation(id=i, get=kv_pb2.GetRequest(key="m")) for i in range(1, 5)]
        await call.write(kv_pb2.PipelineRequest(operations=ops))
        await call.done_writing()
        got = [r for resp in [m async for m in call] for r in resp.results]
        assert await call.code() == grpc.StatusCode.OK
        assert sorted(r.id for r in got) == [1, 2, 3, 4]
        assert all(r.get.value == value for r in got)


async def test_an_operation_sent_after_shutdown_began_is_refused_not_applied(
    node: NodeServer,
) -> None:
    """kv.proto: a node that is shutting down refuses with UNAVAILABLE, not applied (a new
    unary call is refused by grpc once the server stops). An operation that arrives on an
    existing stream after NodeServer.stop began should be refused the same way, not
    applied during the grace period (where a busy stream never drains and every
    operation still running at its end becomes "unknown")."""
    backend = node.backend
    assert isinstance(backend, HoldBackend)
    async with grpc.aio.insecure_channel(node.config.listen) as ch:
        pipe = Pipeline(ch)
        await pipe.call("put", kv_pb2.PutRequest(key="warm"), 5)
        held = asyncio.ensure_future(pipe.call("put", kv_pb2.PutRequest(key="hold1"), 30))
        await eventually(lambda: backend.waiting == 1, 5)
        stop = asyncio.ensure_future(node.stop())
        await eventually(lambda: node._stopped.is_set(), 5)
        try:
            await pipe.call("put", kv_pb2.PutRequest(key="during"), 30)
        except errors.StoreError as e:
            assert e.definite, e
        else:
            raise AssertionError("a write sent after the node began to shut down was applied")
        finally:
            backend.gate.set()
            await asyncio.gather(held, stop, return_exceptions=True)
            await pipe.close()


async def test_an_over_limit_message_does_not_make_applied_writes_not_applied(
    node: NodeServer,
) -> None:
    """A client (any language) sends a message over the node's limit while one of its
    writes is applied and unanswered. The node ends the stream with RESOURCE_EXHAUSTED,
    which kv.proto's error model reads as "not applied"; caplab's own Pipeline client
    classifies every unanswered operation by that status. The applied write must not be
    reported definitely not applied."""
    backend = node.backend
    assert isinstance(backend, HoldBackend)
    backend.apply_first = True
    async with grpc.aio.insecure_channel(
        node.config.listen, options=[("grpc.max_send_message_length", 16 * 2**20)]
    ) as ch:
        pipe = Pipeline(ch)
        held = asyncio.ensure_future(pipe.call("put", kv_pb2.PutRequest(key="hold1"), 30))
        await eventually(lambda: backend.waiting == 1, 5)
        stream = pipe.stream
        assert stream is not None
        # (a message over the node's limit on the same stream, as another client would)
        big = kv_pb2.PipelineRequest(
            operations=[
                kv_pb2.Operation(id=999, put=kv_pb2.PutRequest(key="x", value=b"x" * 3 * 2**20))
            ]
        )
        await stream.call.write(big)
        r = (await asyncio.gather(held, return_exceptions=True))[0]
        await pipe.close()
    assert backend.data["hold1"] is not None
    assert not (isinstance(r, errors.StoreError) and r.definite), (
        f"an applied write reported definitely not applied: {r!r}"
    )
