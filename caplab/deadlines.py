"""Deadlines of many items on one loop timer (KV.Pipeline's operations, both ends).

A timer per item (``asyncio.timeout``) cost about 5 % of a node's CPU under pipelined
load. Instead the items wait in a heap and one timer is armed for the earliest; when it
fires, every item due is expired (if still alive) and the timer re-armed for the next.
Items that ended are not removed one by one: they are skipped when due, and dropped in
bulk once the heap holds more than ``limit``.

The time the timer is armed for is kept here, not asked of the handle: uvloop returns a
plain ``Handle`` (no ``when()``) for a time less than half a millisecond away, which is
common when many deadlines lie close together.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Deadlines(Generic[T]):
    """``expire(item)`` is called once an item's deadline passed, unless ``alive(item)``
    is false by then."""

    def __init__(
        self, expire: Callable[[T], None], alive: Callable[[T], bool], *, limit: int
    ) -> None:
        self._expire = expire
        self._alive = alive
        self._limit = limit
        self._heap: list[tuple[float, int, T]] = []
        self._order = itertools.count()  # (ties never compare items)
        self._timer: asyncio.Handle | None = None
        self._timer_at = math.inf  # loop time the timer is armed for (inf: none)

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, when: float, item: T) -> None:
        """Expire ``item`` at loop time ``when``."""
        if len(self._heap) > self._limit:
            self._heap = [d for d in self._heap if self._alive(d[2])]
            heapq.heapify(self._heap)
        heapq.heappush(self._heap, (when, next(self._order), item))
        if when < self._timer_at:
            self._arm(when)

    def close(self) -> None:
        """Expire nothing more."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = math.inf
        self._heap.clear()

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = asyncio.get_running_loop().call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        heap = self._heap
        now = asyncio.get_running_loop().time()
        while heap and heap[0][0] <= now:
            item = heapq.heappop(heap)[2]
            if self._alive(item):
                self._expire(item)
        if heap:
            self._arm(heap[0][0])
