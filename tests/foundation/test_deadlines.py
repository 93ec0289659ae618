"""caplab.deadlines on both event loops the project runs: asyncio's and uvloop's (the
nodes' loop, whose handle for a time under half a millisecond away has no ``when()``)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest
import uvloop

from caplab.deadlines import Deadlines

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def _run(loop: str, main: Callable[[], object]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(main())  # type: ignore[arg-type]


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_close_deadlines_each_expire_once_in_order(loop: str) -> None:
    """Many deadlines within a millisecond of each other (operations sent together), added
    before and after the first ones expired: each live item expires once, none early."""

    async def main() -> None:
        lp = asyncio.get_running_loop()
        done = set(range(0, 200, 3))  # (answered before their deadline)
        live = {i for i in range(400) if i not in done}
        expired: list[tuple[int, float]] = []
        when: dict[int, float] = {}
        all_expired = asyncio.Event()
        d: Deadlines[int]

        def add_more() -> None:
            # Added while the first ones expire: all due within half a millisecond.
            for i in range(200, 400):
                when[i] = lp.time() + random.random() * 0.0004
                d.add(when[i], i)

        def expire(i: int) -> None:
            expired.append((i, lp.time()))
            if len(expired) == 10:
                lp.call_soon(add_more)
            if len(expired) == len(live):
                all_expired.set()

        d = Deadlines(expire, lambda i: i not in done, limit=64)
        t0 = lp.time()
        for i in range(200):
            when[i] = t0 + 0.002 + (i % 7) * 0.0001
            d.add(when[i], i)
        await asyncio.wait_for(all_expired.wait(), 5)
        assert sorted(i for i, _ in expired) == sorted(live)
        assert all(at >= when[i] for i, at in expired)
        assert len(d) == 0
        d.close()

    _run(loop, main)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_closed_deadlines_expire_nothing(loop: str) -> None:
    async def main() -> None:
        lp = asyncio.get_running_loop()
        expired: list[int] = []
        d: Deadlines[int] = Deadlines(expired.append, lambda i: True, limit=8)
        d.add(lp.time() + 0.001, 1)
        d.close()
        later = asyncio.Event()
        lp.call_at(lp.time() + 0.005, later.set)  # (a timer due after the closed one)
        await later.wait()
        assert expired == []

    _run(loop, main)
