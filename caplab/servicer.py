"""gRPC servicers shared by both stores: protobuf <-> StoreBackend calls, nothing more.

Validation (caplab.validation) and the error model (caplab.errors) are applied
here, once, for every store. A request body that does not even decode (corrupt wire
format, or a string field, such as a key, that is not valid UTF-8: the protobuf parser
refuses it) is refused by :class:`MalformedRequests` before any servicer runs.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, TypeVar

import grpc
from google.protobuf.message import DecodeError

from caplab import errors, validation
from caplab.logs import get_logger
from caplab.pipeline_server import Malformed, Streams, serve_pipeline
from caplab.store import (
    BASIC_LEVELS,
    FORWARDED_BY_KEY,
    MAX_SESSION_TOKEN_BYTES,
    Consistency,
    Header,
    StoreBackend,
    forwarded_by,
    session_token,
)
from caplab.v1 import kv_pb2, kv_pb2_grpc

T = TypeVar("T")
log = get_logger("caplab.servicer")

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # (subscriptable in the stubs only)

_CONSISTENCY = {c.value: c for c in Consistency}
_LEVEL_NAMES = ", ".join(c.name for c in Consistency)
PIPELINE_METHOD = "/caplab.v1.KV/Pipeline"
_STORE_NAMES: dict[int, str] = {kv_pb2.STORE_KIND_RAFT: "raft", kv_pb2.STORE_KIND_GOSSIP: "gossip"}


def _session(token: bytes) -> None:
    """Validate the request's session token and make it the backend's (store.session_token)."""
    if len(token) > MAX_SESSION_TOKEN_BYTES:
        raise errors.InvalidArgument(
            f"session_token is {len(token)} bytes; at most {MAX_SESSION_TOKEN_BYTES} "
            "(pass back the latest token a response gave)"
        )
    session_token.set(token)


def header_pb(h: Header, store: int) -> kv_pb2.ResponseHeader:
    out = kv_pb2.ResponseHeader(
        node_id=h.node_id,
        store=store,  # type: ignore[arg-type]
        term=h.term,
        index=h.index,
        stale_possible=h.stale_possible,
        forwarded_by=h.forwarded_by,
        session_token=h.session_token,
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


def error_status(exc: BaseException) -> errors.StoreError:
    """errors.status_of, logging an internal error with its traceback."""
    e = errors.status_of(exc)
    if e.code is grpc.StatusCode.INTERNAL:
        log.error("internal_error", error=repr(exc), exc_info=exc)
    return e


def _note_forwarded(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Set ``forwarded_by`` from the call's metadata (FORWARDED_BY_KEY), if there."""
    for key, value in context.invocation_metadata() or ():
        if key == FORWARDED_BY_KEY:
            forwarded_by.set(value if isinstance(value, str) else value.decode())


async def _call(
    context: grpc.aio.ServicerContext[object, object],
    fn: Callable[[], Awaitable[T]],
    forwarded: bool = False,
) -> T:
    """Run `fn` and map its outcome to a gRPC status (see error_status). ``forwarded``:
    the call may be a request another node forwarded (metadata FORWARDED_BY_KEY)."""
    if forwarded:
        _note_forwarded(context)
    try:
        return await fn()
    except (grpc.aio.AbortError, KeyboardInterrupt, asyncio.CancelledError):
        raise
    except Exception as exc:
        e = error_status(exc)
        await context.abort(e.code, e.message, trailing_metadata=((errors.OUTCOME_KEY, e.outcome),))
        raise AssertionError("unreachable") from None


async def _routed(method: str, request: Any, timeout: float | None, run: Awaitable[T]) -> T:
    """Await ``run``; a backend that raises Redirect gets the original request forwarded
    (``method`` of the KV service) to the node it names, and its answer returned."""
    try:
        return await run
    except errors.Redirect as r:
        result: T = await r.forward(method, request, timeout)
        return result


class KVOperations:
    """The KV operations on protobuf requests, each a coroutine that returns the response
    or raises (StoreError: the answer); shared by the unary RPCs and KV.Pipeline.
    ``timeout``: seconds left to answer (None: no deadline)."""

    def __init__(self, backend: StoreBackend) -> None:
        self.b = backend

    async def put(self, request: kv_pb2.PutRequest, timeout: float | None) -> kv_pb2.PutResponse:
        key = validation.check_key(request.key)
        _session(request.session_token)
        value = validation.check_value(request.value)
        h = await _routed(
            "Put", request, timeout, self.b.put(key, value, _rid(request.request_id), timeout)
        )
        if isinstance(h, kv_pb2.PutResponse):  # (forwarded: the leader's answer)
            return h
        return kv_pb2.PutResponse(header=header_pb(h, self.b.kind))

    async def get(self, request: kv_pb2.GetRequest, timeout: float | None) -> kv_pb2.GetResponse:
        key = validation.check_key(request.key)
        _session(request.session_token)
        consistency = _CONSISTENCY.get(request.consistency)
        if consistency is None:
            raise errors.InvalidArgument(
                f"unknown consistency level {request.consistency}; use one of {_LEVEL_NAMES}"
            )
        levels = getattr(self.b, "consistency_levels", BASIC_LEVELS)
        if consistency not in levels:
            store = _STORE_NAMES.get(self.b.kind, "this store")
            raise errors.FailedPrecondition(
                f"{store} does not offer {consistency.name} reads (it serves "
                f"{', '.join(sorted(c.name for c in levels if c.value))}); not served"
            )
        if consistency is Consistency.BOUNDED_STALENESS:
            if request.max_staleness_ms == 0:
                raise errors.InvalidArgument(
                    "BOUNDED_STALENESS needs max_staleness_ms > 0 (the bound)"
                )
            r = await self.b.get(
                key, consistency, timeout, max_staleness_ms=request.max_staleness_ms
            )
        else:
            r = await self.b.get(key, consistency, timeout)
        out = kv_pb2.GetResponse(header=header_pb(r.header, self.b.kind))
        if isinstance(r.value, bytes):
            out.found, out.type, out.value = True, kv_pb2.VALUE_TYPE_REGISTER, r.value
        elif isinstance(r.value, int):
            out.found, out.type, out.counter = True, kv_pb2.VALUE_TYPE_COUNTER, r.value
        return out

    async def delete(
        self, request: kv_pb2.DeleteRequest, timeout: float | None
    ) -> kv_pb2.DeleteResponse:
        key = validation.check_key(request.key)
        _session(request.session_token)
        r = await _routed(
            "Delete", request, timeout, self.b.delete(key, _rid(request.request_id), timeout)
        )
        if isinstance(r, kv_pb2.DeleteResponse):
            return r
        return kv_pb2.DeleteResponse(header=header_pb(r.header, self.b.kind), existed=r.existed)

    async def compare_and_swap(
        self, request: kv_pb2.CompareAndSwapRequest, timeout: float | None
    ) -> kv_pb2.CompareAndSwapResponse:
        key = validation.check_key(request.key)
        _session(request.session_token)
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
        r = await _routed(
            "CompareAndSwap",
            request,
            timeout,
            self.b.compare_and_swap(key, expected, new, _rid(request.request_id), timeout),
        )
        if isinstance(r, kv_pb2.CompareAndSwapResponse):
            return r
        return kv_pb2.CompareAndSwapResponse(
            header=header_pb(r.header, self.b.kind),
            swapped=r.swapped,
            found=r.current is not None,
            current=r.current or b"",
        )

    async def increment(
        self, request: kv_pb2.IncrementRequest, timeout: float | None
    ) -> kv_pb2.IncrementResponse:
        key = validation.check_key(request.key)
        _session(request.session_token)
        delta = validation.check_delta(request.delta)
        r = await _routed(
            "Increment",
            request,
            timeout,
            self.b.increment(key, delta, _rid(request.request_id), timeout),
        )
        if isinstance(r, kv_pb2.IncrementResponse):
            return r
        return kv_pb2.IncrementResponse(header=header_pb(r.header, self.b.kind), value=r.value)


class KVServicer(kv_pb2_grpc.KVServicer):
    """``forwarded``: this listener receives the requests followers forward to their
    leader (the peer listener, or the only one): only there is the forwarding metadata
    read (a client on a separate client listener cannot claim to be a node)."""

    def __init__(self, backend: StoreBackend, forwarded: bool = True) -> None:
        self.ops = KVOperations(backend)
        self.forwarded = forwarded
        self.pipelines = Streams()  # (drained when the node stops: caplab.server)

    async def Put(
        self, request: kv_pb2.PutRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> kv_pb2.PutResponse:
        return await _call(
            context, lambda: self.ops.put(request, _timeout(context)), self.forwarded
        )

    async def Get(
        self, request: kv_pb2.GetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> kv_pb2.GetResponse:
        return await _call(
            context, lambda: self.ops.get(request, _timeout(context)), self.forwarded
        )

    async def Delete(
        self, request: kv_pb2.DeleteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> kv_pb2.DeleteResponse:
        return await _call(
            context, lambda: self.ops.delete(request, _timeout(context)), self.forwarded
        )

    async def CompareAndSwap(
        self, request: kv_pb2.CompareAndSwapRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> kv_pb2.CompareAndSwapResponse:
        return await _call(
            context, lambda: self.ops.compare_and_swap(request, _timeout(context)), self.forwarded
        )

    async def Increment(
        self, request: kv_pb2.IncrementRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> kv_pb2.IncrementResponse:
        return await _call(
            context, lambda: self.ops.increment(request, _timeout(context)), self.forwarded
        )

    async def Pipeline(
        self,
        request_iterator: AsyncIterator[kv_pb2.PipelineRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[kv_pb2.PipelineResponse]:
        if self.forwarded:  # (a follower forwards over a pipeline too: never twice)
            _note_forwarded(context)
        async for response in serve_pipeline(
            self.ops, request_iterator, context, error_status, self.pipelines
        ):
            yield response


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


class MalformedRequests(grpc.aio.ServerInterceptor):
    """Refuse a request body that does not decode with INVALID_ARGUMENT (not applied).

    grpc.aio deserializes a request outside the servicer, so a ``DecodeError`` (corrupt
    wire format; a proto3 string field, such as a key, that is not valid UTF-8) became
    status UNKNOWN, which clients read as "outcome unknown", with a traceback logged per
    request. This interceptor gives every handler with a unary request (KV, Cluster,
    Admin, health, on both listeners) a deserializer that returns a marker instead of
    raising, and a behavior that answers the marker with INVALID_ARGUMENT and one warning
    line. Of the streamed requests, KV.Pipeline's messages get the same deserializer (the
    call answers a marker by ending once every earlier operation was answered:
    caplab.pipeline_server); the others (the stores' peer streams, reflection) are left
    alone: the peer services validate their own input.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int], Handler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method: str = handler_call_details.method
        if handler.request_streaming and method != PIPELINE_METHOD:
            return handler
        key = (method, id(handler))
        wrapped = self._cache.get(key)
        if wrapped is None:
            wrapped = _guard(method, handler)
            if len(self._cache) < 1024:
                self._cache[key] = wrapped
        return wrapped


def _guard(method: str, h: Any) -> Handler:
    # (h: an aio handler with a unary request, or KV.Pipeline's; the grpc stubs type
    # handlers as synchronous)
    parse = h.request_deserializer
    resp = h.response_serializer

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as e:
            return Malformed(str(e) or "undecodable")

    if h.stream_stream is not None:  # KV.Pipeline: the call sees the marker in its stream
        return grpc.stream_stream_rpc_method_handler(h.stream_stream, deserialize, resp)

    async def refuse(request: Malformed, context: Context) -> None:
        log.warning("malformed_request", method=method, reason=request.reason)
        hint = ""
        if "utf-8" in request.reason.lower():
            hint = " (a string field, such as the key or the client id, is not valid UTF-8)"
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"malformed request to {method}: the body does not decode{hint}: "
            f"{request.reason}; not applied",
            trailing_metadata=((errors.OUTCOME_KEY, errors.NOT_APPLIED),),
        )

    if h.unary_unary is not None:
        inner_uu = h.unary_unary

        async def uu(request: Any, context: Context) -> Any:
            if isinstance(request, Malformed):
                await refuse(request, context)
            return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(uu, deserialize, resp)
    inner_us = h.unary_stream
    assert inner_us is not None
    if inspect.isasyncgenfunction(inner_us):  # a servicer that yields its responses (Dump)

        async def us_gen(request: Any, context: Context) -> AsyncIterator[Any]:
            if isinstance(request, Malformed):
                await refuse(request, context)
            async for item in inner_us(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(us_gen, deserialize, resp)

    async def us_write(request: Any, context: Context) -> None:
        # one that writes its responses itself (the health service's Watch)
        if isinstance(request, Malformed):
            await refuse(request, context)
        await inner_us(request, context)

    return grpc.unary_stream_rpc_method_handler(us_write, deserialize, resp)
