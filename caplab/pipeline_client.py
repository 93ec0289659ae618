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
import contextlib
import copy
import itertools
from collections import deque
from collections.abc import Sequence
from typing import Any

import grpc

from caplab import errors
from caplab.deadlines import Deadlines
from caplab.v1 import kv_pb2, kv_pb2_grpc
from caplab.validation import MAX_MESSAGE_BYTES

# A request message stays below the node's message limit with room for framing; one
# operation alone may fill all of it but its framing (a compare-and-swap of two 1 MiB
# values does).
_MESSAGE_BUDGET = MAX_MESSAGE_BYTES - 64 * 1024
_MAX_OPERATION = MAX_MESSAGE_BYTES - 64


# Operation.timeout_ms is a uint32: a longer deadline (over about 49.7 days) goes as the
# longest it can say; the caller's own deadline still holds here.
_MAX_TIMEOUT_MS = 2**32 - 1


def _timeout_ms(seconds: float) -> int:
    return min(_MAX_TIMEOUT_MS, max(1, round(seconds * 1000)))


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

    def fits(self, size: int) -> bool:
        return not self.used_ops or (
            self.used_ops < self.ops and self.used_size + size <= self.size
        )

    async def wait_for(self, size: int) -> None:
        while not self.fits(size):
            self._freed.clear()
            await self._freed.wait()

    def take(self, size: int) -> None:
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
        self.answered = False  # a response arrived on it
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
                        if self.over and self.status is not None:
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
                self.answered = True
                for result in response.results:
                    item = self.pending.pop(result.id, None)
                    if item is not None and not item.future.done():
                        item.future.set_result(result)
        except asyncio.CancelledError:  # (closed: the call was cancelled here)
            self._end(
                errors.OutcomeUnknown(
                    "the pipeline was closed with the operation in flight; the outcome is unknown",
                    grpc.StatusCode.CANCELLED,
                )
            )
            raise
        except Exception:
            pass
        try:
            code = await self.call.code()
            details = await self.call.details()
            trailers = tuple(await self.call.trailing_metadata() or ())
        except Exception:
            code, details, trailers = grpc.StatusCode.UNKNOWN, "the stream broke", ()
        if code is grpc.StatusCode.OK:
            code, details = grpc.StatusCode.UNKNOWN, "the stream ended without this result"
        self._end(stream_outcome(code, f"pipeline stream: {details}", trailers))

    def _end(self, status: errors.StoreError) -> None:
        """The stream is over: fail what it carried by its status (a copy each). What it
        never sent goes on a new stream if this one worked for a while; if it never
        answered anything (no connection, refused), that fails too: not applied."""
        self.over = True
        self.status = status
        self.writer.cancel()
        if self.owner.stream is self:
            self.owner.stream = None
        for item in self.pending.values():
            if not item.future.done():
                item.future.set_exception(copy.copy(status))
        self.pending.clear()
        if self.answered and not self.owner.closed:
            if self.owner.queue:
                self.owner.kick()
        else:
            self.owner.fail_queued(status)

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
        self._deadlines: Deadlines[_Op] = Deadlines(
            self._expire, lambda item: not item.future.done(), limit=4 * max_in_flight
        )
        self._ids = itertools.count(1)
        self.closed = False
        self.messages_sent = 0  # request messages written, over every stream

    @property
    def in_flight(self) -> int:
        """Operations queued or sent and not yet answered."""
        return self._room.used_ops

    def fail_queued(self, why: errors.StoreError) -> None:
        """Fail the operations never sent (the stream they waited for ended): definitely
        not applied, with the stream's status when that was definite too."""
        queued, self.queue = self.queue, deque()
        for item in queued:
            if item.future.done():
                continue
            if why.definite:
                err: errors.StoreError = copy.copy(why)
            else:
                err = errors.TransportError(
                    f"{why.message}; the operation was never sent: not applied"
                )
            item.future.set_exception(err)

    def kick(self) -> None:
        if self.closed:
            return
        if self.stream is None:
            self.stream = _Stream(self)
        self.stream.wake.set()

    async def call(self, kind: str, request: Any, timeout: float | None) -> Any:
        """Run one operation (``kind``: put, get, delete, compare_and_swap, increment)
        and return its response message, or raise its StoreError (see the module doc)."""
        if self.closed:
            raise errors.TransportError("the pipeline is closed; not sent")
        op = kv_pb2.Operation(id=next(self._ids), **{kind: request})
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        if timeout is not None:
            op.timeout_ms = _timeout_ms(timeout)
        item = _Op(op, loop.create_future())
        if item.size > _MAX_OPERATION:
            raise errors.InvalidArgument(
                f"the operation is {item.size} bytes encoded; a message to a node carries at "
                f"most {_MAX_OPERATION} (values up to 1 MiB fit); not sent"
            )
        room = self._room
        if not room.fits(item.size):
            try:
                await asyncio.wait_for(room.wait_for(item.size), timeout)
            except TimeoutError:
                err = errors.StoreError(
                    f"deadline of {timeout} s exceeded while waiting for room in the "
                    "pipeline; not sent, not applied"
                )
                err.code, err.definite = grpc.StatusCode.DEADLINE_EXCEEDED, True
                raise err from None
            if self.closed:
                raise errors.TransportError("the pipeline is closed; not sent")
            if deadline is not None:  # (what is left of it goes with the operation)
                op.timeout_ms = _timeout_ms(deadline - loop.time())
        room.take(item.size)
        try:
            self.queue.append(item)
            self.kick()
            if deadline is not None:
                self._deadlines.add(deadline, item)
            result: kv_pb2.OperationResult = await item.future
        finally:
            room.give(item.size)
            if not item.future.done():  # (the caller was cancelled)
                item.future.cancel()
            if not item.sent:
                with contextlib.suppress(ValueError):
                    self.queue.remove(item)
            elif self.stream is not None:
                self.stream.pending.pop(op.id, None)
        which = result.WhichOneof("result")
        if which == "error":
            e = result.error
            return _raise(e.code, e.message, e.outcome)
        if which != kind:
            raise errors.OutcomeUnknown(
                f"the node answered operation {op.id} ({kind}) with {which}; outcome unknown"
            )
        return getattr(result, kind)

    def _expire(self, item: _Op) -> None:
        """``item``'s deadline passed (caplab.deadlines: one timer for all operations)."""
        ms = item.op.timeout_ms
        if item.sent:
            err: errors.StoreError = errors.OutcomeUnknown(
                f"deadline of {ms} ms exceeded; the outcome is unknown",
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
        else:
            err = errors.StoreError(
                f"deadline of {ms} ms exceeded before the operation was sent; not applied"
            )
            err.code, err.definite = grpc.StatusCode.DEADLINE_EXCEEDED, True
        item.future.set_exception(err)

    async def close(self) -> None:
        """Close the pipeline: an operation in flight ends with an unknown outcome (it was
        sent), one still queued definitely not applied."""
        self.closed = True
        self._deadlines.close()
        stream, self.stream = self.stream, None
        if stream is not None:
            await stream.close()
        self.fail_queued(errors.TransportError("the pipeline was closed"))


# Statuses a node gives a stream before it ran any operation of it (the method is not
# served, the caller not allowed): definite for whatever the stream carried.
_REFUSED_STREAM = frozenset(
    {
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)


def stream_outcome(
    code: grpc.StatusCode, details: str, trailers: tuple[tuple[str, str | bytes], ...]
) -> errors.StoreError:
    """What the end of a stream means for an operation sent on it without a result: the
    stream's status says nothing about one operation unless the node said so
    (``caplab-outcome: not-applied``: a malformed message, a node shutting down), no
    connection was made, or the node refused the stream itself (_REFUSED_STREAM). Any
    other status is unknown for it, even one that is definite for a unary call (a
    message over the limit ends the stream with RESOURCE_EXHAUSTED while other
    operations of it may have been applied)."""
    err = errors.classify(code, details, trailers)
    if not err.definite or code in _REFUSED_STREAM or isinstance(err, errors.TransportError):
        return err
    if any(
        k == errors.OUTCOME_KEY and v in (errors.NOT_APPLIED, b"not-applied") for k, v in trailers
    ):
        return err
    return errors.OutcomeUnknown(f"{details}; the outcome is unknown", code)


def _raise(code: int, message: str, outcome: str) -> Any:
    try:
        status = _CODES[code]
    except KeyError:
        status = grpc.StatusCode.UNKNOWN
    raise errors.classify(status, message, ((errors.OUTCOME_KEY, outcome),) if outcome else ())


_CODES = {c.value[0]: c for c in grpc.StatusCode}
