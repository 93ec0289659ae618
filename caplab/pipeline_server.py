"""KV.Pipeline on the node: many operations per message over one bidirectional stream.

Theory of operation
-------------------
One call, three parts (kv.proto, PIPELINE, is the contract):

* the **reader** (a task) reads request messages and starts one task per operation; it
  stops reading while ``MAX_IN_FLIGHT`` operations of the stream are unanswered or
  ``MAX_UNSENT_BYTES`` of results wait to be sent, so the client is held back by HTTP/2
  flow control and the node's memory stays bounded (by the operations in flight: a
  stream of 1,024 reads of 1 MiB values costs what 1,024 unary reads do);
* each **operation** runs the same coroutine as its unary RPC (``Operations``, which
  validates, calls the store and builds the response) and ends as one OperationResult
  in the outbox, whatever happened (an error carries the status the unary RPC would
  have ended with);
* the **writer** (the call's response generator) sends whatever the outbox holds as
  soon as the previous message was written: no timer, no linger; batches form by
  themselves while a write is under way. Results count as in flight until written.

The stream ends OK once the client half-closed and every operation was answered; a
message that does not decode ends it with INVALID_ARGUMENT, after every earlier
operation was answered. When the node begins to shut down (``Streams.drain``) every
operation read from then on is refused (UNAVAILABLE, not applied) and the stream ends
UNAVAILABLE, not applied, once those in flight were answered. When the call is
cancelled, the operations still running are cancelled like the handler of a cancelled
unary call (their outcome is unknown to the client).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import grpc

from caplab import errors
from caplab.auth import may_write
from caplab.deadlines import Deadlines
from caplab.v1 import kv_pb2
from caplab.validation import MAX_MESSAGE_BYTES

MAX_IN_FLIGHT = 1024  # operations of one stream, read but not yet answered
# Results of one stream built but not yet sent (a client that does not read holds them
# up): beyond this the node reads no further operations of the stream until they left.
MAX_UNSENT_BYTES = 64 * 1024 * 1024
# A response message stays below the message limit with room for its framing: results
# are sent in several messages when they would not fit in one.
_RESPONSE_BUDGET = MAX_MESSAGE_BYTES - 64 * 1024

# Pipeline checks each of these against the caller's role (caplab.auth.may_write): a
# read-only caller's writes are refused, its reads served.
WRITES = frozenset({"put", "delete", "compare_and_swap", "increment"})


class Operations(Protocol):
    """The unary operations on protobuf requests (caplab.servicer.KVOperations)."""

    def put(self, request: Any, timeout: float | None) -> Awaitable[Any]: ...
    def get(self, request: Any, timeout: float | None) -> Awaitable[Any]: ...
    def delete(self, request: Any, timeout: float | None) -> Awaitable[Any]: ...
    def compare_and_swap(self, request: Any, timeout: float | None) -> Awaitable[Any]: ...
    def increment(self, request: Any, timeout: float | None) -> Awaitable[Any]: ...


class Malformed:
    """A request message that did not decode (caplab.servicer.MalformedRequests puts
    this in the stream instead of failing the call with UNKNOWN)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


_SHUTTING_DOWN = errors.Unavailable("this node is shutting down; not applied (retry elsewhere)")


def _error(op_id: int, e: errors.StoreError) -> kv_pb2.OperationResult:
    return kv_pb2.OperationResult(
        id=op_id,
        error=kv_pb2.OperationError(code=e.code.value[0], message=e.message, outcome=e.outcome),
    )


class _Call:
    """The state of one Pipeline call (see the theory of operation)."""

    def __init__(
        self,
        ops: Operations,
        context: grpc.aio.ServicerContext[Any, Any],
        status_of: Callable[[BaseException], errors.StoreError],
    ) -> None:
        self.ops = ops
        self.context = context
        self.status_of = status_of
        self.outbox: list[tuple[kv_pb2.OperationResult, int]] = []  # (result, its size)
        self.results = asyncio.Event()  # the outbox has results, or the reader ended
        self.room = asyncio.Event()  # below MAX_IN_FLIGHT and MAX_UNSENT_BYTES
        self.room.set()
        self.in_flight = 0
        self.unsent = 0  # bytes of results built and not yet sent
        self.draining = False  # the node is shutting down: refuse what is read
        self.tasks: set[asyncio.Task[None]] = set()
        self.reading = True
        self.malformed: str | None = None
        self.read_failed: BaseException | None = None
        # Deadlines of running operations (one timer for all: caplab.deadlines): past its
        # deadline an operation's task is cancelled and answers DEADLINE_EXCEEDED.
        self.loop = asyncio.get_running_loop()
        self.deadlines: Deadlines[asyncio.Task[None]] = Deadlines(
            self.expire, lambda task: not task.done(), limit=4 * MAX_IN_FLIGHT
        )
        self.expired: set[asyncio.Task[None]] = set()

    async def read(self, requests: AsyncIterator[Any]) -> None:
        n = 0
        try:
            async for message in requests:
                n += 1
                if isinstance(message, Malformed):
                    self.malformed = f"message {n} of the stream does not decode: {message.reason}"
                    return
                for op in message.operations:
                    if self.draining:  # (refused at once: it never runs)
                        self.in_flight += 1
                        self.answer(_error(op.id, _SHUTTING_DOWN))
                        continue
                    while self.in_flight >= MAX_IN_FLIGHT or (
                        self.unsent >= MAX_UNSENT_BYTES and self.in_flight
                    ):
                        self.room.clear()
                        await self.room.wait()
                    self.in_flight += 1
                    timeout = (
                        op.timeout_ms / 1000 if op.timeout_ms else _stream_timeout(self.context)
                    )
                    task = asyncio.create_task(self.run(op, timeout))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
                    if timeout is not None:
                        self.deadlines.add(self.loop.time() + timeout, task)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # (the stream broke: the writer ends the call)
            self.read_failed = e
        finally:
            self.reading = False
            self.results.set()

    def expire(self, task: asyncio.Task[None]) -> None:
        self.expired.add(task)
        task.cancel()

    async def run(self, op: kv_pb2.Operation, timeout: float | None) -> None:
        kind = op.WhichOneof("op")
        result: kv_pb2.OperationResult
        try:
            if kind is None:
                raise errors.InvalidArgument(
                    f"operation {op.id} names no operation (put, get, delete, "
                    "compare_and_swap or increment); not applied"
                )
            if kind in WRITES and not may_write.get():
                e = errors.StoreError(f"{kind} needs role read-write; not applied")
                e.code, e.definite = grpc.StatusCode.PERMISSION_DENIED, True
                raise e
            response = await getattr(self.ops, kind)(getattr(op, kind), timeout)
            result = kv_pb2.OperationResult(id=op.id)
            getattr(result, kind).CopyFrom(response)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task not in self.expired:
                raise
            assert task is not None
            self.expired.discard(task)
            task.uncancel()
            result = _error(
                op.id,
                errors.OutcomeUnknown(
                    f"deadline of {timeout * 1000 if timeout else 0:.0f} ms exceeded; the "
                    "outcome is unknown",
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ),
            )
        except Exception as exc:
            result = _error(op.id, self.status_of(exc))
        self.answer(result)

    def answer(self, result: kv_pb2.OperationResult) -> None:
        size = result.ByteSize()
        self.unsent += size
        self.outbox.append((result, size))
        self.results.set()

    def drain(self) -> None:
        """The node is shutting down: refuse every operation read from now on; once those
        in flight are answered, end the stream UNAVAILABLE, not applied (what it did not
        read never ran)."""
        self.draining = True
        self.results.set()

    async def write(self) -> AsyncIterator[kv_pb2.PipelineResponse]:
        while True:
            await self.results.wait()
            self.results.clear()
            ready, self.outbox = self.outbox, []
            if ready:
                for chunk in _chunks(ready):
                    yield kv_pb2.PipelineResponse(results=chunk)
                self.in_flight -= len(ready)
                self.unsent -= sum(size for _, size in ready)
                if self.in_flight < MAX_IN_FLIGHT and self.unsent < MAX_UNSENT_BYTES:
                    self.room.set()
            if (not self.reading or self.draining) and self.in_flight == 0:
                return
            if self.read_failed is not None:
                return  # (the call is over: nobody is left to answer)


def _chunks(
    results: list[tuple[kv_pb2.OperationResult, int]],
) -> list[list[kv_pb2.OperationResult]]:
    """The results in messages under the message limit (one result alone always fits:
    its request did)."""
    out: list[list[kv_pb2.OperationResult]] = [[]]
    size = 0
    for r, n in results:
        n += 8  # (its field tag and length)
        if out[-1] and size + n > _RESPONSE_BUDGET:
            out.append([])
            size = 0
        out[-1].append(r)
        size += n
    return out


def _stream_timeout(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e9 else max(0.0, remaining)


class Streams:
    """The Pipeline calls a servicer is serving, to drain them when the node stops."""

    def __init__(self) -> None:
        self.calls: set[_Call] = set()

    def drain(self) -> None:
        for call in list(self.calls):
            call.drain()


async def serve_pipeline(
    ops: Operations,
    requests: AsyncIterator[Any],
    context: grpc.aio.ServicerContext[Any, Any],
    status_of: Callable[[BaseException], errors.StoreError] = errors.status_of,
    streams: Streams | None = None,
) -> AsyncIterator[kv_pb2.PipelineResponse]:
    """The KV.Pipeline handler: the responses to ``requests`` (see the module doc)."""
    call = _Call(ops, context, status_of)
    reader = asyncio.create_task(call.read(requests))
    if streams is not None:
        streams.calls.add(call)
    try:
        async for response in call.write():
            yield response
    finally:
        if streams is not None:
            streams.calls.discard(call)
        reader.cancel()
        call.deadlines.close()
        for task in list(call.tasks):
            task.cancel()
    if call.draining:
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            "this node is shutting down: it answered every operation it had read; the "
            "rest were not applied (retry elsewhere)",
            trailing_metadata=((errors.OUTCOME_KEY, errors.NOT_APPLIED),),
        )
    if call.malformed is not None:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{call.malformed}; its operations were not applied (every earlier operation "
            "was answered)",
            trailing_metadata=((errors.OUTCOME_KEY, errors.NOT_APPLIED),),
        )
