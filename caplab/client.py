"""The caplab client: one API for both stores, used by the CLI, the harness and tests.

- one or more endpoints; requests go to the current endpoint and move to the
  next one only after a *definite* failure (nothing was applied);
- a deadline on every call;
- retries (tenacity) only where they cannot duplicate an effect: definite
  refusals (UNAVAILABLE marked not-applied, RESOURCE_EXHAUSTED, connection
  never established), and outcome-unknown failures of mutations that carry a
  client_id/sequence (the store deduplicates them); never INVALID_ARGUMENT or
  FAILED_PRECONDITION, which a retry cannot fix;
- errors are :class:`caplab.errors.StoreError` subclasses with `.definite`.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from caplab import errors
from caplab.pipeline_client import Pipeline
from caplab.v1 import kv_pb2, kv_pb2_grpc
from caplab.validation import MAX_MESSAGE_BYTES

T = TypeVar("T")

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Reconnect quickly after a node restarts (the default backoff grows to 2 minutes).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_retries", 0),
]


# kv.proto's Operation field of each KV operation -> its unary method
_UNARY = {
    "put": "Put",
    "get": "Get",
    "delete": "Delete",
    "compare_and_swap": "CompareAndSwap",
    "increment": "Increment",
}


@dataclass(frozen=True, slots=True)
class GetResult:
    found: bool
    value: bytes | int | None  # bytes: register; int: counter; None: absent
    header: kv_pb2.ResponseHeader


def is_retryable(exc: BaseException, idempotent: bool) -> bool:
    """The retry policy: which failures may be retried without risking a double effect."""
    if not isinstance(exc, errors.StoreError):
        return False
    if isinstance(exc, errors.Unavailable | errors.Overloaded | errors.TransportError):
        return True
    return isinstance(exc, errors.OutcomeUnknown) and idempotent


class _BearerToken(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call (over plaintext too: a call
    credential would need TLS, and nodes accept tokens on loopback)."""

    def __init__(self, token: str) -> None:
        self._md = ("authorization", f"Bearer {token}")

    def _with_token(self, details: Any) -> Any:
        md = [*(details.metadata or ()), self._md]
        return details._replace(metadata=grpc.aio.Metadata(*md))

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_token(details), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_token(details), request)


class KVClient:
    """Async client of one caplab cluster (either store)."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout: float = 5.0,
        retries: int = 0,
        retry_budget_s: float | None = None,
        client_id: str | None = None,
        max_inflight_mutations: int = 128,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        session: bool = False,
        pipeline: bool = False,
    ) -> None:
        """``credentials``: TLS to the nodes (``caplab.security.channel_credentials``);
        ``token``: a bearer token sent with every call (nodes with ``--client-auth``);
        ``session``: this client is one session (kv.proto SESSION, READ_MY_WRITES,
        MONOTONIC_READS): every request carries the latest ``session_token`` a response
        gave (the stores merge it with what they answer), one operation at a time;
        ``pipeline``: KV operations go over KV.Pipeline (caplab.pipeline_client): the
        operations of concurrent callers share one stream per node, many per message;
        the same results, errors and retries as the unary RPCs."""
        if not endpoints:
            raise ValueError("at least one endpoint is needed")
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self.retries = retries
        self.retry_budget_s = retry_budget_s if retry_budget_s is not None else timeout * 3
        self.client_id = client_id if client_id is not None else uuid.uuid4().hex
        self._seq = itertools.count(1)
        # Stores remember the results of a client's last 128 mutations to deduplicate
        # retries; keeping at most that many in flight keeps every retry recognisable.
        self._window = asyncio.Semaphore(max_inflight_mutations)
        self._current = 0
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._credentials = credentials
        self._interceptors = [] if token is None else [_BearerToken(token)]
        self._token_md = None if token is None else (("authorization", f"Bearer {token}"),)
        self.pipeline = pipeline
        self._pipes: dict[str, Pipeline] = {}
        self.session = session
        self.session_token = b""  # the latest ResponseHeader.session_token (session only)

    # -- plumbing -----------------------------------------------------------
    def _channel(self, endpoint: str) -> grpc.aio.Channel:
        ch = self._channels.get(endpoint)
        if ch is None:
            if self._credentials is None:
                ch = grpc.aio.insecure_channel(
                    endpoint, options=CHANNEL_OPTIONS, interceptors=self._interceptors
                )
            else:
                ch = grpc.aio.secure_channel(
                    endpoint,
                    self._credentials,
                    options=CHANNEL_OPTIONS,
                    interceptors=self._interceptors,
                )
            self._channels[endpoint] = ch
        return ch

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._current % len(self.endpoints)]

    def move_to(self, endpoint: str) -> None:
        """Send the next requests to ``endpoint`` (one of ``endpoints``): a client that
        roams between nodes keeps one session (token, request ids, channels)."""
        self._current = self.endpoints.index(endpoint)

    def kv(self, endpoint: str | None = None) -> kv_pb2_grpc.KVAsyncStub:
        return kv_pb2_grpc.KVStub(self._channel(endpoint or self.endpoint))

    def cluster(self, endpoint: str | None = None) -> kv_pb2_grpc.ClusterAsyncStub:
        return kv_pb2_grpc.ClusterStub(self._channel(endpoint or self.endpoint))

    def admin(self, endpoint: str | None = None) -> kv_pb2_grpc.AdminAsyncStub:
        return kv_pb2_grpc.AdminStub(self._channel(endpoint or self.endpoint))

    def _pipe(self, endpoint: str) -> Pipeline:
        pipe = self._pipes.get(endpoint)
        if pipe is None:
            pipe = Pipeline(self._channel(endpoint), metadata=self._token_md)
            self._pipes[endpoint] = pipe
        return pipe

    def _op(self, kind: str, request: Any) -> Callable[[str], Awaitable[Any]]:
        """One KV operation at an endpoint, over the unary RPC or the pipeline."""
        if self.pipeline:
            return lambda ep: self._pipe(ep).call(kind, request, self.timeout)
        method = _UNARY[kind]
        return lambda ep: getattr(self.kv(ep), method)(request, timeout=self.timeout)

    def next_request_id(self) -> kv_pb2.RequestId | None:
        """The next request id; None when this client opted out (empty client_id)."""
        if not self.client_id:
            return None
        return kv_pb2.RequestId(client_id=self.client_id, sequence=next(self._seq))

    async def _once(self, call: Callable[[str], Awaitable[T]]) -> T:
        endpoint = self.endpoint
        try:
            return await call(endpoint)
        except grpc.aio.AioRpcError as e:
            err = errors.classify(e.code(), e.details() or "", tuple(e.trailing_metadata() or ()))
        except errors.StoreError as e:  # (the pipeline raises them itself)
            err = e
        if err.definite and err.code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ):
            self._current += 1  # try another node next time
        raise err from None

    async def _run(
        self, call: Callable[[str], Awaitable[T]], *, idempotent: bool, mutation: bool = True
    ) -> T:
        """``call`` with the retry policy. The outcome reported is that of every attempt,
        not only the last one's: once one attempt of a mutation may have been applied
        (its outcome unknown), a later definite refusal does not make the mutation
        "definitely not applied" (tenacity re-raises the last error only: "timed out"
        and then "connection refused" was reported as "not applied")."""
        if self.retries <= 0:
            return await self._once(call)
        retrying = AsyncRetrying(
            retry=retry_if_exception(lambda e: is_retryable(e, idempotent)),
            stop=stop_after_attempt(self.retries + 1) | stop_after_delay(self.retry_budget_s),
            wait=wait_exponential_jitter(multiplier=0.05, max=1.0),
            reraise=True,
        )
        unknown: errors.StoreError | None = None  # the first attempt that may have applied
        try:
            async for attempt in retrying:
                with attempt:
                    try:
                        return await self._once(call)
                    except errors.StoreError as e:
                        if unknown is None and not e.definite:
                            unknown = e
                        raise
        except errors.StoreError as e:
            if mutation and e.definite and unknown is not None:
                raise errors.OutcomeUnknown(
                    f"{e.message}; an earlier attempt's outcome is unknown "
                    f"({unknown.message}): it may have been applied",
                    unknown.code,
                ) from e
            raise
        raise AssertionError("unreachable")

    # -- sessions -----------------------------------------------------------
    def _token(self) -> bytes:
        return self.session_token if self.session else b""

    def _saw(self, header: kv_pb2.ResponseHeader) -> None:
        if self.session and header.session_token:
            self.session_token = header.session_token

    # -- KV -----------------------------------------------------------------
    async def put(self, key: str, value: bytes) -> kv_pb2.PutResponse:
        async with self._window:
            req = kv_pb2.PutRequest(
                key=key,
                value=value,
                request_id=self.next_request_id(),
                session_token=self._token(),
            )
            resp: kv_pb2.PutResponse = await self._run(self._op("put", req), idempotent=True)
            self._saw(resp.header)
            return resp

    async def get(
        self,
        key: str,
        consistency: int = kv_pb2.CONSISTENCY_DEFAULT,
        *,
        max_staleness_ms: int = 0,
    ) -> GetResult:
        req = kv_pb2.GetRequest(
            key=key,
            consistency=consistency,  # type: ignore[arg-type]
            max_staleness_ms=max_staleness_ms,
            session_token=self._token(),
        )
        resp: kv_pb2.GetResponse = await self._run(
            self._op("get", req), idempotent=True, mutation=False
        )
        self._saw(resp.header)
        value: bytes | int | None = None
        if resp.found:
            value = resp.counter if resp.type == kv_pb2.VALUE_TYPE_COUNTER else resp.value
        return GetResult(resp.found, value, resp.header)

    async def delete(self, key: str) -> kv_pb2.DeleteResponse:
        async with self._window:
            req = kv_pb2.DeleteRequest(
                key=key, request_id=self.next_request_id(), session_token=self._token()
            )
            resp: kv_pb2.DeleteResponse = await self._run(self._op("delete", req), idempotent=True)
            self._saw(resp.header)
            return resp

    async def cas(
        self, key: str, expected: bytes | None, new: bytes
    ) -> kv_pb2.CompareAndSwapResponse:
        async with self._window:
            req = kv_pb2.CompareAndSwapRequest(
                key=key,
                expected=expected or b"",
                expected_absent=expected is None,
                new_value=new,
                request_id=self.next_request_id(),
                session_token=self._token(),
            )
            resp: kv_pb2.CompareAndSwapResponse = await self._run(
                self._op("compare_and_swap", req), idempotent=True
            )
            self._saw(resp.header)
            return resp

    async def increment(self, key: str, delta: int = 1) -> kv_pb2.IncrementResponse:
        async with self._window:
            req = kv_pb2.IncrementRequest(
                key=key,
                delta=delta,
                request_id=self.next_request_id(),
                session_token=self._token(),
            )
            resp: kv_pb2.IncrementResponse = await self._run(
                self._op("increment", req), idempotent=True
            )
            self._saw(resp.header)
            return resp

    # -- Cluster / Admin ----------------------------------------------------
    async def status(self, endpoint: str | None = None) -> kv_pb2.StatusResponse:
        req = kv_pb2.StatusRequest()
        if endpoint is not None:
            return await self._once(
                lambda _ep: self.cluster(endpoint).Status(req, timeout=self.timeout)
            )
        return await self._run(
            lambda ep: self.cluster(ep).Status(req, timeout=self.timeout),
            idempotent=True,
            mutation=False,
        )

    async def dump(self, endpoint: str | None = None) -> list[kv_pb2.DumpEntry]:
        ep = endpoint or self.endpoint
        out: list[kv_pb2.DumpEntry] = []
        try:
            call: Any = self.cluster(ep).Dump(kv_pb2.DumpRequest(), timeout=self.timeout * 10)
            async for entry in call:
                out.append(entry)
        except grpc.aio.AioRpcError as e:
            raise errors.classify(
                e.code(), e.details() or "", tuple(e.trailing_metadata() or ())
            ) from None
        return out

    async def set_clock_skew(self, skew_ms: int, endpoint: str | None = None) -> int:
        req = kv_pb2.SetClockSkewRequest(skew_ms=skew_ms)
        resp: kv_pb2.SetClockSkewResponse = await self._once(
            lambda ep: self.admin(endpoint or ep).SetClockSkew(req, timeout=self.timeout)
        )
        return resp.skew_ms

    async def close(self) -> None:
        for pipe in self._pipes.values():
            await pipe.close()
        self._pipes.clear()
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()

    async def __aenter__(self) -> KVClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
