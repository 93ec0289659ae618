"""Peer messaging shared by both stores.

Both stores speak one-way messages between nodes (Raft's appends and votes, gossip's
deltas, anti-entropy and pings). A :class:`StreamSender` per peer queues them and writes
everything queued as one `Batch` on a single long-lived client stream (`Stream(stream
Batch)`): one HTTP/2 stream carries every message to that peer, in order, so a message
costs a frame write rather than a whole unary call (about a third of the CPU on each
side, and half the latency). While one write is under way, new messages queue and leave
together in the next one (batching under load, no waiting when idle).

A cut link costs dropped messages, never a stuck sender: a write that has not gone out
within `timeout` (flow control blocked by a black-holed link or a paused peer), or that
fails, drops its batch and abandons the stream; the next batch opens a new one. Both
protocols tolerate loss, duplication, delay and reordering. The queue is bounded; when it
is full the oldest message is dropped.

The timeout is kept by one watchdog timer per sender, checking every `timeout / 4` (so a
stalled write ends after 1 to 1.25 timeouts). A timer per write (`asyncio.timeout`) cost
about 0.1 ms per Raft write at concurrency 1 (alternating measurements in one cluster):
two stream writes lie on that path, the Append and its answer. The watchdog cancels both
the stream and the writer task's await, so a write always ends within that bound however
grpc behaves: grpc.aio's `write` waits, without end, for the call's headers to go out, which
never happens if the call is cancelled before grpc's own task for it sent them (issue 12:
a stall of the loop right after a stream opened left a sender stuck for good).

On the receiving side, :class:`InboundStreams` runs the handler for each incoming stream
and ends them all at once when the node stops (`close`), so that a graceful server stop
does not wait its whole grace period for peers' streams that never end by themselves.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any, Generic, Protocol, TypeVar

import grpc

from caplab.security import TlsFiles, channel_credentials
from caplab.validation import MAX_MESSAGE_BYTES

M = TypeVar("M")
B = TypeVar("B")
B_contra = TypeVar("B_contra", contravariant=True)

# Channels between nodes: large messages (batches, snapshots, anti-entropy items), quick
# reconnects after a heal or restart, keepalive pings to notice a cut link within ~2 s.
PEER_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES * 16),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES * 16),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_timeout_ms", 1000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 0),
]

# Errors of a stream write: the call ended (peer gone, cancelled), or was half-closed.
_STREAM_ERRORS = (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError)


def peer_channel(address: str, peer_id: str = "", tls: TlsFiles | None = None) -> grpc.aio.Channel:
    """A channel to member ``peer_id`` at ``address``. With ``tls`` (this node's member
    certificate): mutual TLS, and the server must prove it is ``peer_id`` (its certificate
    names it: the address may be a proxy's, or a stale one now serving another node)."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=PEER_CHANNEL_OPTIONS)
    options = [*PEER_CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", peer_id)]
    return grpc.aio.secure_channel(address, channel_credentials(tls.ca, tls), options=options)


class PeerStream(Protocol[B_contra]):
    """What a sender uses of a client stream (`grpc.aio.StreamUnaryCall` has all of it)."""

    async def write(self, request: B_contra) -> None: ...

    def cancel(self) -> bool: ...

    def done(self) -> bool: ...


class StreamSender(Generic[M, B]):
    """Queue of one-way messages to one peer, written in batches to one client stream.

    `open_stream()` starts a new `Stream` call; `make_batch(messages)` wraps queued messages
    into one request. With `weight`, a batch carries messages up to `max_weight` in total
    (at least one; a message that would take a batch past it starts the next one), so a
    large backlog travels as several requests the peer can work on as they arrive.
    Counters updated: messages_sent, messages_dropped, wire_bytes_sent,
    peer_streams_opened.
    """

    def __init__(
        self,
        open_stream: Callable[[], PeerStream[B]],
        make_batch: Callable[[list[M]], B],
        *,
        timeout: float,
        max_queue: int,
        counters: MutableMapping[str, int],
        weight: Callable[[M], int] | None = None,
        max_weight: int = 0,
    ) -> None:
        self._open_stream = open_stream
        self._make_batch = make_batch
        self._weight = weight
        self._max_weight = max_weight
        self.timeout = timeout
        self.max_queue = max_queue
        self.counters = counters
        self.queue: deque[M] = deque()
        self._wake = asyncio.Event()
        self._call: PeerStream[B] | None = None
        self._task: asyncio.Task[None] | None = None
        # loop time at which the write under way on `_call` began; None between writes
        self._writing_since: float | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        # the watchdog has cancelled `_task` to end the write under way (not yet taken back)
        self._abandoning = False

    def push(self, message: M) -> None:
        if len(self.queue) >= self.max_queue:
            self.queue.popleft()
            self._count("messages_dropped", 1)
        self.queue.append(message)
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())
        self._watch()

    def _watch(self) -> None:
        """Abandon a write under way for `timeout` or more, and check again in `timeout / 4`.

        Cancelling the call alone does not always end its `write` (see the module
        docstring), so the writer task is cancelled too: its `write` raises CancelledError
        in `_write`, which tells this cancellation from `close()`'s by `_abandoning`.
        """
        loop = asyncio.get_running_loop()
        since = self._writing_since
        if since is not None and not self._abandoning and loop.time() - since >= self.timeout:
            if self._call is not None:
                self._call.cancel()
            if self._task is not None and not self._task.done():
                self._abandoning = True
                self._task.cancel()
        self._watchdog = loop.call_later(self.timeout / 4, self._watch)

    def _count(self, name: str, n: int) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.queue:
                batch = self._take()
                await self._write(batch)

    def _take(self) -> list[M]:
        if self._weight is None:
            batch = list(self.queue)
            self.queue.clear()
            return batch
        batch, total = [], 0
        while self.queue:
            w = self._weight(self.queue[0])
            if batch and total + w > self._max_weight:
                break  # the next batch starts with it
            batch.append(self.queue.popleft())
            total += w
        return batch

    async def _write(self, batch: list[M]) -> None:
        call = self._call
        if call is None or call.done():
            call = self._call = self._open_stream()
            self._count("peer_streams_opened", 1)
        request = self._make_batch(batch)
        self._writing_since = asyncio.get_running_loop().time()
        try:
            await call.write(request)
        except (*_STREAM_ERRORS, asyncio.CancelledError):
            if self._still_cancelled():
                raise  # the sender is closing (else the write failed or was abandoned)
            # Whatever this stream still had in flight is lost with it; so is this batch.
            self._count("messages_dropped", len(batch))
            call.cancel()
            self._call = None
            return
        finally:
            self._writing_since = None
        if self._abandoning:  # (grpc swallowed the watchdog's cancellation)
            self._still_cancelled()
        self._count("messages_sent", len(batch))
        self._count("wire_bytes_sent", request.ByteSize())  # type: ignore[attr-defined]

    def _still_cancelled(self) -> bool:
        """Take back the watchdog's cancellation of the writer task, if any (its write is
        over). True if the task is still being cancelled: by `close()` (or whoever else
        cancels the sender), not by the watchdog."""
        task = self._task
        if task is None:
            return False
        if self._abandoning:
            self._abandoning = False
            task.uncancel()
        return task.cancelling() > 0

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._call is not None:
            self._call.cancel()


class InboundStreams:
    """The peer streams a node is receiving; `close()` ends them all (node stopping)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self.closed = False

    async def serve(
        self, requests: AsyncIterator[B], handle: Callable[[B], Awaitable[None] | None]
    ) -> None:
        """Feed every request of one incoming stream to `handle`, until the stream ends."""
        if self.closed:
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            async for request in requests:
                pending = handle(request)
                if pending is not None:
                    await pending
        except asyncio.CancelledError:
            # Ended by close(): finish the call normally (a cancelled handler would keep
            # the server's graceful stop waiting). Any other cancellation propagates.
            if not self.closed:
                raise
        finally:
            self._tasks.discard(task)

    def close(self) -> None:
        self.closed = True
        for task in self._tasks:
            task.cancel()
