"""The node's physical clock, with a skew that Admin.SetClockSkew can inject."""

from __future__ import annotations

import time


class SkewableClock:
    """Wall-clock milliseconds plus an injected offset; monotonic time is never skewed."""

    def __init__(self) -> None:
        self.skew_ms = 0

    def wall_ms(self) -> int:
        return time.time_ns() // 1_000_000 + self.skew_ms

    @staticmethod
    def monotonic() -> float:
        return time.monotonic()
