"""A raw grpc.aio server of the caplab KV service that does no work at all.

It is the ceiling for any Python gRPC server on this machine: `caplab bench`
measures it in the same run, with the same client, beside the real stores, over
unary calls and over KV.Pipeline (served by the stores' own stream code).

    python -m harness.noop_server --listen 127.0.0.1:50099
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc

from caplab import loop as caplab_loop
from caplab.pipeline_server import serve_pipeline
from caplab.v1 import kv_pb2, kv_pb2_grpc

_PUT = kv_pb2.PutResponse(header=kv_pb2.ResponseHeader(node_id="noop"))
_GET = kv_pb2.GetResponse(
    header=kv_pb2.ResponseHeader(node_id="noop"), found=True, value=b"x" * 100
)


class NoopOperations:
    """Every pipelined operation answered at once (caplab.pipeline_server.Operations)."""

    async def put(self, request: Any, timeout: float | None) -> kv_pb2.PutResponse:
        return _PUT

    async def get(self, request: Any, timeout: float | None) -> kv_pb2.GetResponse:
        return _GET

    async def delete(self, request: Any, timeout: float | None) -> Any:
        raise NotImplementedError("the no-op server answers Put and Get only")

    compare_and_swap = increment = delete


class NoopKV(kv_pb2_grpc.KVServicer):
    async def Put(
        self, request: kv_pb2.PutRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> kv_pb2.PutResponse:
        return _PUT

    async def Get(
        self, request: kv_pb2.GetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> kv_pb2.GetResponse:
        return _GET

    async def Pipeline(
        self,
        request_iterator: AsyncIterator[kv_pb2.PipelineRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[kv_pb2.PipelineResponse]:
        """The same stream code as the stores' (the ceiling of the pipelined path)."""
        async for response in serve_pipeline(NoopOperations(), request_iterator, context):
            yield response


async def serve(listen: str) -> None:
    server = grpc.aio.server()
    kv_pb2_grpc.add_KVServicer_to_server(NoopKV(), server)  # type: ignore[abstract]
    server.add_insecure_port(listen)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--listen", required=True)
    caplab_loop.run(serve(p.parse_args().listen))


if __name__ == "__main__":
    main()
