"""raft.batching.BatchGate: a lone request goes at once; concurrent requests are gathered for
at most the interval (or until the batch is full), and the driver is woken when it ends."""

from __future__ import annotations

import asyncio

from raft.batching import BatchGate


async def test_lone_requests_never_wait() -> None:
    gate = BatchGate(50_000, 64, asyncio.Event())
    for _ in range(5):
        assert gate.open(1)  # the previous batch had one request: no gathering
    assert not gate.waiting


async def test_concurrent_requests_gather_until_the_interval_then_wake_the_driver() -> None:
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    gate = BatchGate(30_000, 64, wake)  # 30 ms
    assert gate.open(5)  # nothing before: goes at once
    went_at = loop.time()
    assert not gate.open(3)  # the last batch had several: gather
    assert gate.waiting
    await asyncio.wait_for(wake.wait(), timeout=5)
    assert loop.time() - went_at >= 0.029
    assert not gate.waiting
    assert gate.open(3)


async def test_a_full_batch_goes_at_once() -> None:
    gate = BatchGate(10_000_000, 8, asyncio.Event())
    assert gate.open(8)
    assert not gate.open(7)
    assert gate.open(8)
    assert not gate.waiting  # the pending timer was cancelled
