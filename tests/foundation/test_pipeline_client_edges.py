"""Review of KV.Pipeline's client (caplab.pipeline_client): hangs and outcome
classification. Each test states the contract it checks; a failing test is a finding.

A caller that waits longer than HANG_S for something that should be immediate is taken as
hung (asyncio.wait with a timeout bounds the test; it is not a wait for a condition)."""

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
from caplab.server import NodeServer
from caplab.store import Header, NodeConfig
from caplab.v1 import kv_pb2
from caplab.validation import RequestId
from tests.foundation.conftest import start_mem_node
from tests.foundation.memstore import MemBackend
from tests.polling import eventually

HANG_S = 3.0


class HoldBackend(MemBackend):
    """Puts to keys starting with "hold" wait at ``gate``: before they are applied
    (``apply_first`` False) or after (True: applied, but not yet answered)."""

    def __init__(self, config: NodeConfig, clock: SkewableClock) -> None:
        super().__init__(config, clock)
        self.gate = asyncio.Event()
        self.waiting = 0
        self.apply_first = False

    async def put(
        self, key: str, value: bytes, rid: RequestId | None, timeout: float | None
    ) -> Header:
        if not key.startswith("hold"):
            return await super().put(key, value, rid, timeout)
        if self.apply_first:
            h = await super().put(key, value, rid, timeout)
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        if self.apply_first:
            return h
        return await super().put(key, value, rid, timeout)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[NodeServer]:
    n = await start_mem_node(tmp_path, backend=HoldBackend, grace_s=0.5)
    yield n
    _b(n).gate.set()
    await n.stop()


def _b(node: NodeServer) -> HoldBackend:
    assert isinstance(node.backend, HoldBackend)
    return node.backend


def _ep(node: NodeServer) -> str:
    return node.config.listen


async def _settles(fut: asyncio.Future[Any]) -> bool:
    done, _ = await asyncio.wait([fut], timeout=HANG_S)
    return bool(done)


async def test_close_with_a_sent_operation_in_flight_answers_its_caller(
    node: NodeServer,
) -> None:
    """Pipeline.close() (and so KVClient.close()) with an operation sent and unanswered:
    its caller must get an outcome-unknown error, not wait forever. (A caller without a
    deadline, Pipeline.call(..., None), is allowed by the API.)"""
    async with grpc.aio.insecure_channel(_ep(node)) as ch:
        pipe = Pipeline(ch)
        held = asyncio.ensure_future(pipe.call("put", kv_pb2.PutRequest(key="hold1"), None))
        await eventually(lambda: _b(node).waiting == 1, 5)
        await asyncio.wait_for(pipe.close(), HANG_S)
        settled = await _settles(held)
        if not settled:
            held.cancel()
        assert settled, "the caller still waits for its result after Pipeline.close()"
        err = held.exception()
        assert isinstance(err, errors.StoreError) and not err.definite, err


async def test_kvclient_close_with_a_sent_operation_in_flight_answers_its_caller(
    node: NodeServer,
) -> None:
    """The same through KVClient (its own deadline is long: close must not wait for it)."""
    c = KVClient([_ep(node)], pipeline=True, timeout=60.0)
    held = asyncio.ensure_future(c.put("hold2", b"x"))
    await eventually(lambda: _b(node).waiting == 1, 5)
    await asyncio.wait_for(c.close(), HANG_S)
    settled = await _settles(held)
    if not settled:
        held.cancel()
    assert settled, "a KVClient caller still waits after KVClient.close()"
    err = held.exception()
    assert isinstance(err, errors.StoreError) and not err.definite, err


async def test_a_caller_waiting_for_room_keeps_its_deadline(node: NodeServer) -> None:
    """Pipeline.call(timeout=0.2) while the client's in-flight room is full: the deadline
    covers the whole call (the unary RPC's does), so it fails within ~0.2 s, definitely
    not applied (never sent)."""
    async with grpc.aio.insecure_channel(_ep(node)) as ch:
        pipe = Pipeline(ch, max_in_flight=1)
        held = asyncio.ensure_future(pipe.call("put", kv_pb2.PutRequest(key="hold3"), None))
        await eventually(lambda: _b(node).waiting == 1, 5)
        late = asyncio.ensure_future(pipe.call("put", kv_pb2.PutRequest(key="x"), 0.2))
        settled = await _settles(late)
        if not settled:
            late.cancel()
        _b(node).gate.set()
        await held
        await pipe.close()
        assert settled, "the 0.2 s deadline did not cover the wait for room"
        err = late.exception()
        assert isinstance(err, errors.StoreError) and err.definite, err


async def test_a_caller_admitted_after_close_is_answered(node: NodeServer) -> None:
    """A caller that passed the `closed` check and waited for room gets room only after
    close(); kick() then does nothing (closed) and it must still be answered (not sent:
    definitely not applied), not wait forever on a queue nobody drains."""
    async with grpc.aio.insecure_channel(_ep(node)) as ch:
        pipe = Pipeline(ch, max_in_flight=1)
        first = asyncio.ensure_future(pipe.call("put", kv_pb2.PutRequest(key="hold4"), 0.5))
        await eventually(lambda: _b(node).waiting == 1, 5)
        waiter = asyncio.ensure_future(pipe.call("put", kv_pb2.PutRequest(key="y"), None))
        await eventually(lambda: pipe._room.used_ops == 1 and not pipe.queue, 5)
        close = asyncio.ensure_future(pipe.close())
        await asyncio.wait([first], timeout=HANG_S)  # (its own 0.5 s deadline ends it)
        settled = await _settles(waiter)
        if not settled:
            waiter.cancel()
        close.cancel()
        assert settled, "a caller admitted after close() waits forever"
        err = waiter.exception()
        assert isinstance(err, errors.StoreError) and err.definite, err


async def test_a_deadline_beyond_what_an_operation_can_carry_is_served(
    node: NodeServer,
) -> None:
    """Operation.timeout_ms is a uint32 (about 49.7 days): a longer deadline (a follower's
    forward_timeout_ms has no upper bound) goes as the longest, not as a ValueError that
    left a forwarded write INTERNAL, outcome unknown, though never sent."""
    async with grpc.aio.insecure_channel(_ep(node)) as ch:
        pipe = Pipeline(ch)
        try:
            resp = await pipe.call("put", kv_pb2.PutRequest(key="long", value=b"v"), 5e6)
        finally:
            await pipe.close()
    assert isinstance(resp, kv_pb2.PutResponse)


async def test_an_oversized_operation_is_refused_alone(node: NodeServer) -> None:
    """kv.proto: one bad operation fails alone with the unary status; a put over the
    value limit is INVALID_ARGUMENT ("value: 0..1 MiB"). Concurrent callers on the same
    stream are not failed by it."""
    backend = _b(node)
    async with KVClient([_ep(node)], pipeline=True, timeout=10.0) as c:
        backend.gate.clear()
        a = asyncio.ensure_future(c.put("hold6", b"a"))
        await eventually(lambda: backend.waiting == 1, 5)
        big = asyncio.ensure_future(c.put("big", b"x" * (3 * 1024 * 1024)))
        await asyncio.wait([big], timeout=HANG_S)
        backend.gate.set()
        results = await asyncio.gather(a, big, return_exceptions=True)
        assert isinstance(results[0], kv_pb2.PutResponse), results[0]
        assert isinstance(results[1], errors.InvalidArgument), results[1]


async def test_an_oversized_operation_on_a_warm_stream_settles(node: NodeServer) -> None:
    """On a stream that has answered before, an operation over the message limit (no
    deadline) must settle (refused, not applied), not be re-sent on stream after stream."""
    async with grpc.aio.insecure_channel(_ep(node)) as ch:
        pipe = Pipeline(ch)
        await pipe.call("put", kv_pb2.PutRequest(key="warm"), 5)
        big = asyncio.ensure_future(
            pipe.call("put", kv_pb2.PutRequest(key="big", value=b"x" * 3 * 2**20), None)
        )
        settled = await _settles(big)
        sent = pipe.messages_sent
        if not settled:
            big.cancel()
        await pipe.close()
        assert settled, f"the oversized operation never settled ({sent} messages sent)"
        err = big.exception()
        assert isinstance(err, errors.StoreError) and err.definite, err
