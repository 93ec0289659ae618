"""The event loop every long-running caplab process runs on: uvloop where it is installed
(Linux and macOS), else asyncio's own.

Nodes and the benchmark's no-op server use the same loop, so the no-op server stays the
ceiling it is meant to be. uvloop measured about 0.25 ms lower Raft write p50 at
concurrency 1 (7 alternating pairs of runs, 6 lower); `CAPLAB_EVENT_LOOP=asyncio`
selects asyncio's loop instead (for comparison, or to rule uvloop out).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

ENV = "CAPLAB_EVENT_LOOP"


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None for asyncio's default loop."""
    choice = os.environ.get(ENV, "uvloop")
    if choice not in ("uvloop", "asyncio"):
        raise SystemExit(f"{ENV} must be 'uvloop' or 'asyncio', not {choice!r}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on the loop chosen by `loop_factory()`."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
