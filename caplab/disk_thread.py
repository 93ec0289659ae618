"""A node's disk thread: its storage calls run there, one at a time, in order.

Both stores keep one such thread per node (their storage is single-writer): the event
loop hands a call over and awaits its result without blocking. It is a lean
``run_in_executor``: a queue, one thread, and one ``call_soon_threadsafe`` back to the
loop per call (a ThreadPoolExecutor chains a concurrent Future to an asyncio one, about
50 us more per call, and the stores make one call per commit).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

#: one storage call for the disk thread: (loop, its future, function, arguments)
_DiskJob = tuple[
    asyncio.AbstractEventLoop, asyncio.Future[Any], Callable[..., Any], tuple[Any, ...]
]


def _settle(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if not fut.done():
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


class DiskThread:
    """The thread starts with the first call; ``shutdown`` waits for the calls queued
    before it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: queue.SimpleQueue[_DiskJob | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def call(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        self._queue.put((loop, fut, fn, args))
        return fut

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            loop, fut, fn, args = item
            try:
                outcome: tuple[bool, Any] = (True, fn(*args))
            except BaseException as e:  # (as run_in_executor: the caller gets it)
                outcome = (False, e)
            try:
                loop.call_soon_threadsafe(_settle, fut, *outcome)
            except RuntimeError:  # the loop is closed: nobody awaits it any more
                pass
            del item, fut, outcome

    def shutdown(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
