"""gRPC servicers shared by both stores: protobuf <-> StoreBackend calls, nothing more.

Validation (caplab.validation) and the error model (caplab.errors) are applied
here, once, for every store.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from caplab import errors, validation
from caplab.logs import get_logger
from caplab.store import FORWARDED_BY_KEY, Consistency, Header, StoreBackend, forwarded_by
from caplab.v1 import kv_pb2, kv_pb2_grpc

T = TypeVar("T")
log = get_logger("caplab.servicer")

_CONSISTENCY = {
    kv_pb2.CONSISTENCY_DEFAULT: Consistency.DEFAULT,
    kv_pb2.CONSISTENCY_LINEARIZABLE: Consistency.LINEARIZABLE,
    kv_pb2.CONSISTENCY_LOCAL: Consistency.LOCAL,
}


def header_pb(h: Header, store: int) -> kv_pb2.ResponseHeader:
    out = kv_pb2.ResponseHeader(
        node_id=h.node_id,
        store=store,  # type: ignore[arg-type]
        term=h.term,
        index=h.index,
        stale_possible=h.stale_possible,
        forwarded_by=h.forwarded_by,
    )
    if h.hlc is not None:
        out.hlc.CopyFrom(
            kv_pb2.HlcTimestamp(wall_ms=h.hlc.wall_ms, logical=h.hlc.logical, node_id=h.hlc.node_id)
        )
    return out


def _rid(r: kv_pb2.RequestId) -> validation.RequestId | None:
    return validation.check_request_id(r.client_id, r.sequence)


def _timeout(context: grpc.aio.ServicerContext[object, object]) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e9 else max(0.0, remaining)


async def _call(
    context: grpc.aio.ServicerContext[object, object],
    fn: Callable[[], Awaitable[T]],
    method: str = "",
    request: object = None,
) -> T:
    """Run `fn` and map its outcome to a gRPC status. A backend that raises Redirect gets
    the original request forwarded (`method` of the KV service) to the node it names."""
    for key, value in context.invocation_metadata() or ():
        if key == FORWARDED_BY_KEY:
            forwarded_by.set(value if isinstance(value, str) else value.decode())
    try:
        try:
            return await fn()
        except errors.Redirect as r:
            if not method:
                raise errors.Unavailable("this node cannot serve the request") from None
            result: T = await r.forward(method, request, _timeout(context))
            return result
    except errors.StoreError as e:
        await context.abort(e.code, e.message, trailing_metadata=((errors.OUTCOME_KEY, e.outcome),))
        raise AssertionError("unreachable") from None
    except NotImplementedError as e:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, str(e) or "not implemented")
        raise AssertionError("unreachable") from None
    except (grpc.aio.AbortError, KeyboardInterrupt):
        raise
    except Exception as e:
        log.exception("internal_error", error=repr(e))
        await context.abort(
            grpc.StatusCode.INTERNAL,
            f"internal error ({type(e).__name__}); the outcome is unknown",
            trailing_metadata=((errors.OUTCOME_KEY, errors.UNKNOWN),),
        )
        raise AssertionError("unreachable") from None


class KVServicer(kv_pb2_grpc.KVServicer):
    def __init__(self, backend: StoreBackend) -> None:
        self.b = backend

    async def Put(
        self, request: kv_pb2.PutRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> kv_pb2.PutResponse:
        async def run() -> kv_pb2.PutResponse:
            key = validation.check_key(request.key)
            value = validation.check_value(request.value)
            h = await self.b.put(key, value, _rid(request.request_id), _timeout(context))
            return kv_pb2.PutResponse(header=header_pb(h, self.b.kind))

        return await _call(context, run, "Put", request)

    async def Get(
        self, request: kv_pb2.GetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> kv_pb2.GetResponse:
        async def run() -> kv_pb2.GetResponse:
            key = validation.check_key(request.key)
            consistency = _CONSISTENCY.get(request.consistency)
            if consistency is None:
                raise errors.InvalidArgument(
                    f"unknown consistency level {request.consistency}; "
                    "use DEFAULT, LINEARIZABLE or LOCAL"
                )
            r = await self.b.get(key, consistency, _timeout(context))
            out = kv_pb2.GetResponse(header=header_pb(r.header, self.b.kind))
            if isinstance(r.value, bytes):
                out.found, out.type, out.value = True, kv_pb2.VALUE_TYPE_REGISTER, r.value
            elif isinstance(r.value, int):
                out.found, out.type, out.counter = True, kv_pb2.VALUE_TYPE_COUNTER, r.value
            return out

        return await _call(context, run)

    async def Delete(
        self, request: kv_pb2.DeleteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> kv_pb2.DeleteResponse:
        async def run() -> kv_pb2.DeleteResponse:
            key = validation.check_key(request.key)
            r = await self.b.delete(key, _rid(request.request_id), _timeout(context))
            return kv_pb2.DeleteResponse(header=header_pb(r.header, self.b.kind), existed=r.existed)

        return await _call(context, run, "Delete", request)

    async def CompareAndSwap(
        self, request: kv_pb2.CompareAndSwapRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> kv_pb2.CompareAndSwapResponse:
        async def run() -> kv_pb2.CompareAndSwapResponse:
            key = validation.check_key(request.key)
            if request.expected_absent and request.expected:
                raise errors.InvalidArgument(
                    "expected_absent is set, so expected must be empty (it cannot both be absent "
                    "and hold a value)"
                )
            expected = (
                None
                if request.expected_absent
                else validation.check_value(request.expected, "expected")
            )
            new = validation.check_value(request.new_value, "new_value")
            r = await self.b.compare_and_swap(
                key, expected, new, _rid(request.request_id), _timeout(context)
            )
            return kv_pb2.CompareAndSwapResponse(
                header=header_pb(r.header, self.b.kind),
                swapped=r.swapped,
                found=r.current is not None,
                current=r.current or b"",
            )

        return await _call(context, run, "CompareAndSwap", request)

    async def Increment(
        self, request: kv_pb2.IncrementRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> kv_pb2.IncrementResponse:
        async def run() -> kv_pb2.IncrementResponse:
            key = validation.check_key(request.key)
            delta = validation.check_delta(request.delta)
            r = await self.b.increment(key, delta, _rid(request.request_id), _timeout(context))
            return kv_pb2.IncrementResponse(header=header_pb(r.header, self.b.kind), value=r.value)

        return await _call(context, run, "Increment", request)


class ClusterServicer(kv_pb2_grpc.ClusterServicer):
    def __init__(self, backend: StoreBackend, version: str) -> None:
        self.b = backend
        self.version = version

    async def Status(
        self, request: kv_pb2.StatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> kv_pb2.StatusResponse:
        async def run() -> kv_pb2.StatusResponse:
            st = await self.b.status()
            st.store = self.b.kind  # type: ignore[assignment]
            st.clock_skew_ms = self.b.clock.skew_ms
            st.version = self.version
            return st

        return await _call(context, run)

    async def Dump(
        self, request: kv_pb2.DumpRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[kv_pb2.DumpEntry]:
        async for entry in self.b.dump(request.start_after, request.limit):
            yield entry


class AdminServicer(kv_pb2_grpc.AdminServicer):
    """Fault injection; only registered when the node runs with --enable-admin."""

    def __init__(self, backend: StoreBackend) -> None:
        self.b = backend

    async def SetClockSkew(
        self, request: kv_pb2.SetClockSkewRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> kv_pb2.SetClockSkewResponse:
        async def run() -> kv_pb2.SetClockSkewResponse:
            self.b.clock.skew_ms = validation.check_skew(request.skew_ms)
            log.warning("clock_skew_set", skew_ms=self.b.clock.skew_ms)
            return kv_pb2.SetClockSkewResponse(skew_ms=self.b.clock.skew_ms)

        return await _call(context, run)
