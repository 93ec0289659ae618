"""KV.Pipeline on the client: concurrent callers' operations share one stream.

Theory of operation
-------------------
A caller hands one operation to :meth:`Pipeline.call` and awaits its result. Operations
wait in a queue; one **writer** task sends everything queued as one message as soon as
the previous message has been written (no timer: batches form while a write is under
way, so a lone caller pays one message, 64 callers share a few). One **reader** task
matches each OperationResult to its caller by id. Both belong to the current stream;
a stream that ends is replaced on the next operation.

Outcomes (kv.proto's error model, per operation):

* a result: the response, or the OperationError the unary RPC would have ended with
  (a StoreError with the same definite/unknown meaning);
* the stream ended before the result came: the stream's status decides for every
  operation sent on it (classified like a unary status: a connection never made is
  definite, a broken stream unknown); an operation not yet sent stays queued for the
  next stream: it was never sent, so it cannot have been applied;
* the deadline passed (the operation carries it, the node gives up at the same time):
  unknown if the operation was sent, definitely not applied if it was still queued.

Back-pressure: at most ``max_in_flight`` operations and ``max_bytes`` of requests are
queued or unanswered at once; further callers wait for room (bounded memory, and the
node's own limit of 1,024 per stream is never what stops a stream).
"""

from __future__ import annotations

import asyncio
import copy
import itertools
from collections import deque
from collections.abc import Sequence
from typing import Any

import grpc

from caplab import errors
from caplab.v1 import kv_pb2, kv_pb2_grpc
from caplab.validation import MAX_MESSAGE_BYTES

# A request message stays below the node's message limit with room for framing.
_MESSAGE_BUDGET = MAX_MESSAGE_BYTES - 64 * 1024


class _Op:
    __slots__ = ("future", "op", "sent", "size")

    def __init__(self, op: kv_pb2.Operation, future: asyncio.Future[Any]) -> None:
        self.op = op
        self.future = future
        self.size = op.ByteSize() + 8
        self.sent = False


class _Room:
    """Room for operations in flight: a count and a byte budget (one operation larger
    than the whole budget still goes, alone)."""

    def __init__(self, ops: int, size: int) -> None:
        self.ops, self.size = ops, size
        self.used_ops = self.used_size = 0
        self._freed = asyncio.Event()

    async def take(self, size: int) -> None:
        while self.used_ops and (self.used_ops >= self.ops or self.used_size + size > self.size):
            self._freed.clear()
            await self._freed.wait()
        self.used_ops += 1
        self.used_size += size

    def give(self, size: int) -> None:
        self.used_ops -= 1
        self.used_size -= size
        self._freed.set()


class _Stream:
    """One KV.Pipeline call and the two tasks that drive it."""

    def __init__(self, owner: Pipeline) -> None:
        self.owner = owner
        self.call: Any = kv_pb2_grpc.KVStub(owner.channel).Pipeline(metadata=owner.metadata)
        self.pending: dict[int, _Op] = {}  # sent, unanswered
        self.wake = asyncio.Event()
        self.over = False
        self.status: errors.StoreError | None = None  # why it ended
        self.writer = asyncio.create_task(self._write())
        self.reader = asyncio.create_task(self._read())

    async def _write(self) -> None:
        owner = self.owner
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                while owner.queue:
                    batch: list[_Op] = []
                    size = 0
                    while owner.queue and (
                        not batch or size + owner.queue[0].size <= _MESSAGE_BUDGET
                    ):
                        item = owner.queue.popleft()
                        if item.future.done():
                            continue  # (cancelled, or timed out while queued)
                        batch.append(item)
                        size += item.size
                    if not batch:
                        continue
                    for item in batch:
                        item.sent = True
                        self.pending[item.op.id] = item
                    owner.messages_sent += 1
                    try:
                        await self.call.write(
                            kv_pb2.PipelineRequest(operations=[item.op for item in batch])
                        )
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        # The call is over: this message never left. Back to the queue;
                        # whoever ends the stream fails them as not sent.
                        for item in reversed(batch):
                            item.sent = False
                            self.pending.pop(item.op.id, None)
                            owner.queue.appendleft(item)
                        if self.over:
                            owner.fail_queued(self.status)
                        return
        except asyncio.CancelledError:
            raise

    async def _read(self) -> None:
        try:
            while True:
                response = await self.call.read()
                if response is grpc.aio.EOF:
                    break
                for result in response.results:
                    item = self.pending.pop(result.id, None)
                    if item is not None and not item.future.done():
                        item.future.set_result(result)
        except asyncio.CancelledError:
            raise
        except Exception:
            pass
        await self._end()

    async def _end(self) -> None:
        """The stream is over: fail what it carried, by the stream's status."""
        self.over = True
        self.writer.cancel()
        if self.owner.stream is self:
            self.owner.stream = None
        try:
            code = await self.call.code()
            details = await self.call.details()
            trailers = tuple(await self.call.trailing_metadata() or ())
        except Exception:  # (cancelled locally)
            code, details, trailers = grpc.StatusCode.CANCELLED, "stream closed", ()
        if code is grpc.StatusCode.OK:
            code, details = grpc.StatusCode.UNKNOWN, "the stream ended without this result"
        self.status = errors.classify(code, f"pipeline stream: {details}", trailers)
        for item in self.pending.values():
            if not item.future.done():
                item.future.set_exception(
                    errors.classify(code, f"pipeline stream: {details}", trailers)
                )
        self.pending.clear()
        self.owner.fail_queued(self.status)

    async def close(self) -> None:
        if not self.over:
            self.call.cancel()
            self.writer.cancel()
        await asyncio.gather(self.reader, self.writer, return_exceptions=True)


class Pipeline:
    """Operations of any number of concurrent callers over KV.Pipeline on ``channel``."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        max_in_flight: int = 1024,
        max_bytes: int = 64 * 1024 * 1024,
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> None:
        self.channel = channel
        self.metadata = tuple(metadata) if metadata else None
        self.queue: deque[_Op] = deque()  # not yet sent, in order
        self.stream: _Stream | None = None
        self._room = _Room(max_in_flight, max_bytes)
        self._ids = itertools.count(1)
        self._closed = False
        self.messages_sent = 0  # request messages written, over every stream

    @property
    def in_flight(self) -> int:
        """Operations queued or sent and not yet answered."""
        return self._room.used_ops

    def fail_queued(self, why: errors.StoreError | None) -> None:
        """Fail the operations never sent (the stream they waited for ended): definitely
        not applied, with the stream's status when that was definite too."""
        queued, self.queue = self.queue, deque()
        for item in queued:
            if item.future.done():
                continue
            if why is not None and why.definite:
                err: errors.StoreError = copy.copy(why)
            else:
                reason = why.message if why is not None else "the stream ended"
                err = errors.TransportError(f"{reason}; the operation was never sent: not applied")
            item.future.set_exception(err)

    def kick(self) -> None:
        if self._closed:
            return
        if self.stream is None:
            self.stream = _Stream(self)
        self.stream.wake.set()

    async def call(self, kind: str, request: Any, timeout: float | None) -> Any:
        """Run one operation (``kind``: put, get, delete, compare_and_swap, increment)
        and return its response message, or raise its StoreError (see the module doc)."""
        if self._closed:
            raise errors.TransportError("the pipeline is closed; not sent")
        op = kv_pb2.Operation(id=next(self._ids), **{kind: request})
        if timeout is not None:
            op.timeout_ms = max(1, round(timeout * 1000))
        item = _Op(op, asyncio.get_running_loop().create_future())
        await self._room.take(item.size)
        try:
            self.queue.append(item)
            self.kick()
            try:
                async with asyncio.timeout(timeout):
                    result: kv_pb2.OperationResult = await item.future
            except TimeoutError:
                item.future.cancel()
                if not item.sent:
                    err = errors.StoreError(
                        f"deadline of {timeout} s exceeded before the operation was sent; "
                        "not applied"
                    )
                    err.code, err.definite = grpc.StatusCode.DEADLINE_EXCEEDED, True
                    raise err from None
                raise errors.OutcomeUnknown(
                    f"deadline of {timeout} s exceeded; the outcome is unknown",
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ) from None
            finally:
                if not item.sent and item in self.queue:
                    self.queue.remove(item)
                if self.stream is not None and item.sent:
                    self.stream.pending.pop(op.id, None)
        finally:
            self._room.give(item.size)
        which = result.WhichOneof("result")
        if which == "error":
            e = result.error
            return _raise(e.code, e.message, e.outcome)
        if which != kind:
            raise errors.OutcomeUnknown(
                f"the node answered operation {op.id} ({kind}) with {which}; outcome unknown"
            )
        return getattr(result, kind)

    async def close(self) -> None:
        self._closed = True
        stream, self.stream = self.stream, None
        if stream is not None:
            await stream.close()


def _raise(code: int, message: str, outcome: str) -> Any:
    try:
        status = _CODES[code]
    except KeyError:
        status = grpc.StatusCode.UNKNOWN
    raise errors.classify(status, message, ((errors.OUTCOME_KEY, outcome),) if outcome else ())


_CODES = {c.value[0]: c for c in grpc.StatusCode}
