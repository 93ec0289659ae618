"""A burst of concurrent unary calls on one connection is served, not cancelled."""

from __future__ import annotations

import asyncio
import collections

import grpc

from caplab.server import NodeServer
from caplab.v1 import kv_pb2, kv_pb2_grpc


async def test_a_burst_of_3000_concurrent_calls_is_served(mem_node: NodeServer) -> None:
    """grpc's server cancels calls that wait, not yet taken by the application, beyond
    1,000 (3,000 for sure): a burst of 3,000 concurrent Puts on one channel came back a
    fifth CANCELLED, an outcome the client must take as unknown, though none was ever
    applied. The nodes let them wait (the stores' own admission limit answers
    RESOURCE_EXHAUSTED, not applied, with the reason)."""
    codes: collections.Counter[str] = collections.Counter()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{mem_node.port}") as ch:
        stub = kv_pb2_grpc.KVStub(ch)

        async def put(i: int) -> None:
            req = kv_pb2.PutRequest(
                key=f"k{i}",
                value=b"v",
                request_id=kv_pb2.RequestId(client_id=f"burst-{i}", sequence=1),
            )
            try:
                await stub.Put(req, timeout=60)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as e:
                codes[e.code().name] += 1

        await asyncio.gather(*(put(i) for i in range(3000)))
    assert codes == {"OK": 3000}, codes
