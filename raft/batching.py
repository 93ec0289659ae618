"""When queued client requests go to the Raft core as one batch (group commit).

Every batch has a fixed cost (messages, an fsync) that under load exceeds the cost of the
requests in it; a request with no company goes at once, so light load sees no added
latency.
"""

from __future__ import annotations

import asyncio


class BatchGate:
    """When queued requests may go to the core as one batch (see RaftOptions *_batch_us).

    Every batch has a fixed cost (messages, an fsync) that under load exceeds the cost of
    the requests in it. So once requests arrive concurrently (the previous batch had
    several), a new batch gathers for up to `interval_us` after the previous one went,
    unless `max_batch` are waiting. A request with no company goes at once, so light
    load sees no added latency."""

    def __init__(self, interval_us: int, max_batch: int, wake: asyncio.Event) -> None:
        self.interval = interval_us / 1e6
        self.max_batch = max_batch
        self.wake = wake
        self.last_at = 0.0  # loop time the previous batch went
        self.last_size = 0  # requests in it
        self.timer: asyncio.TimerHandle | None = None

    @property
    def waiting(self) -> bool:
        """A batch is being held; the timer will wake the driver."""
        return self.timer is not None

    def open(self, queued: int) -> bool:
        loop = asyncio.get_running_loop()
        now = loop.time()
        opens_at = self.last_at + self.interval
        if self.last_size > 1 and now < opens_at and queued < self.max_batch:
            if self.timer is None:
                self.timer = loop.call_at(opens_at, self._fire)
            return False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.last_at, self.last_size = now, queued
        return True

    def _fire(self) -> None:
        self.timer = None
        self.wake.set()
