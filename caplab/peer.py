"""Outbound peer messaging shared by both stores.

Both stores speak one-way messages between nodes (Raft's appends and votes,
gossip's deltas and pings). A :class:`BatchSender` per peer queues them and
ships everything queued as one unary `Send(Batch)` call with a short deadline,
with a few calls in flight (pipelining). A cut link therefore costs dropped
messages, never a stuck sender: both protocols tolerate loss. The queue is
bounded; when it is full the oldest message is dropped.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Generic, TypeVar

import grpc

from caplab.validation import MAX_MESSAGE_BYTES

M = TypeVar("M")

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


def peer_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=PEER_CHANNEL_OPTIONS)


class BatchSender(Generic[M]):
    """Queue of one-way messages to one peer, shipped in batches.

    `send_batch(messages, timeout)` performs one call and returns the bytes it sent.
    With `weight`, a call carries messages up to `max_weight` in total (at least one), so
    a large backlog travels as several calls the peer can work on as they arrive.
    Counters updated: messages_sent, messages_dropped, wire_bytes_sent.
    """

    def __init__(
        self,
        send_batch: Callable[[list[M], float], Awaitable[int]],
        *,
        timeout: float,
        inflight: int,
        max_queue: int,
        counters: MutableMapping[str, int],
        weight: Callable[[M], int] | None = None,
        max_weight: int = 0,
    ) -> None:
        self._send_batch = send_batch
        self._weight = weight
        self._max_weight = max_weight
        self.timeout = timeout
        self.max_queue = max_queue
        self.counters = counters
        self.queue: deque[M] = deque()
        self._wake = asyncio.Event()
        self._inflight = asyncio.Semaphore(inflight)
        self._calls: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    def push(self, message: M) -> None:
        if len(self.queue) >= self.max_queue:
            self.queue.popleft()
            self.counters["messages_dropped"] = self.counters.get("messages_dropped", 0) + 1
        self.queue.append(message)
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.queue:
                await self._inflight.acquire()
                batch = self._take()
                call = asyncio.create_task(self._ship(batch))
                self._calls.add(call)
                call.add_done_callback(self._calls.discard)

    def _take(self) -> list[M]:
        if self._weight is None:
            batch = list(self.queue)
            self.queue.clear()
            return batch
        batch, total = [], 0
        while self.queue and (not batch or total < self._max_weight):
            m = self.queue.popleft()
            batch.append(m)
            total += self._weight(m)
        return batch

    async def _ship(self, batch: list[M]) -> None:
        c = self.counters
        try:
            size = await self._send_batch(batch, self.timeout)
            c["messages_sent"] = c.get("messages_sent", 0) + len(batch)
            c["wire_bytes_sent"] = c.get("wire_bytes_sent", 0) + size
        except grpc.aio.AioRpcError:
            c["messages_dropped"] = c.get("messages_dropped", 0) + len(batch)
        except asyncio.CancelledError:
            pass
        finally:
            self._inflight.release()

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._calls) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
