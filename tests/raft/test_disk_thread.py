"""caplab.disk_thread.DiskThread (the node's storage calls off the loop) and the follower's inline
fsync policy (raft.pipeline.SyncPolicy.follower_inline)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from caplab.disk_thread import DiskThread
from raft.messages import Entry, EntryKind, Snapshot, SnapshotMeta
from raft.pipeline import Save, SyncPolicy


async def test_calls_run_in_order_on_one_other_thread() -> None:
    disk = DiskThread("test-disk")
    seen: list[tuple[int, int]] = []

    def work(i: int) -> int:
        seen.append((i, threading.get_ident()))
        return i * 2

    try:
        results = await asyncio.gather(*(disk.call(work, i) for i in range(20)))
    finally:
        disk.shutdown()
    assert results == [i * 2 for i in range(20)]
    assert [i for i, _ in seen] == list(range(20))
    assert len({t for _, t in seen}) == 1
    assert seen[0][1] != threading.get_ident()


async def test_an_exception_reaches_the_caller_and_the_thread_goes_on() -> None:
    disk = DiskThread("test-disk")

    def boom() -> None:
        raise OSError(28, "No space left on device")

    try:
        with pytest.raises(OSError, match="No space"):
            await disk.call(boom)
        assert await disk.call(lambda: 7) == 7
    finally:
        disk.shutdown()


async def test_a_cancelled_caller_does_not_break_the_thread() -> None:
    disk = DiskThread("test-disk")
    gate = threading.Event()
    try:
        fut = disk.call(gate.wait, 5)
        fut.cancel()
        gate.set()
        assert await disk.call(lambda: "next") == "next"
    finally:
        disk.shutdown()


def test_shutdown_without_a_call_is_a_no_op() -> None:
    DiskThread("test-disk").shutdown()


def _save(*sizes: int, snapshot: bool = False) -> Save:
    return Save(
        hard_state=None,
        entries=tuple(Entry(1, i + 1, EntryKind.COMMAND, b"x" * n) for i, n in enumerate(sizes)),
        snapshot=Snapshot(SnapshotMeta(1, 1), b"") if snapshot else None,
        recovered=False,
    )


def test_follower_fsyncs_a_batch_inline_up_to_the_byte_limit() -> None:
    policy = SyncPolicy(inline_max=1, follower_bytes=1000)
    assert policy.follower_inline(_save(100, 100, 100), disk_busy=False)
    assert policy.follower_inline(_save(2000), disk_busy=False)  # one entry: as before
    assert not policy.follower_inline(_save(600, 600), disk_busy=False)
    assert not policy.follower_inline(_save(1, 1), disk_busy=True)
    assert not policy.follower_inline(_save(snapshot=True), disk_busy=False)
    assert not SyncPolicy(inline_max=0).follower_inline(_save(1), disk_busy=False)
