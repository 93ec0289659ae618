"""caplab.peer.StreamSender against fake streams that misbehave at random (no gRPC).

Each seed drives one sender through a random schedule: pushes, pauses, stalls of the
event loop, calls cancelled from outside, and writes that complete, stall then complete,
fail, or never return, even once their call is cancelled (grpc.aio's trap: a call
cancelled before its headers went out leaves `write` waiting for them forever). Then the
peer behaves, and the sender must account for every message: sent or counted dropped,
the sent ones delivered once each and in order, the last one delivered. Last, `close()`
ends it without counting its own cancellation as a drop.

Time is the loop's own, and virtual: when nothing is ready the clock jumps to the next
timer, so a seed takes milliseconds and replays exactly. A failing seed is printed with
the command that replays it alone, with its event log:
`CAPLAB_SEED=N .venv/bin/pytest tests/foundation/test_peer_sim.py -k replay -s`.
"""

from __future__ import annotations

import asyncio
import os
import random
import selectors
from collections.abc import Callable

import grpc
import pytest

from caplab.peer import StreamSender

SEEDS = 200
TIMEOUT = 0.05  # the sender's write timeout, in (virtual) seconds
VIRTUAL_LIMIT = 60.0  # a seed that has not finished by then (virtual seconds) failed


def _replay_command(seed: int) -> str:
    return f"CAPLAB_SEED={seed} .venv/bin/pytest tests/foundation/test_peer_sim.py -k replay -s"


class _JumpingSelector(selectors.SelectSelector):
    """Polls without waiting; a wait for the next timer moves the virtual clock there."""

    def __init__(self, loop: VirtualClockLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if not ready:
            if timeout is None:
                raise RuntimeError("the loop would wait forever: nothing is scheduled")
            self._loop.now += timeout
        return ready


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An asyncio loop on a virtual clock. `stall(d)` moves the clock on by d at once, as a
    callback that blocks the loop for d (a blocking fsync, CPU starvation) would."""

    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(_JumpingSelector(self))

    def time(self) -> float:
        return self.now

    def stall(self, seconds: float) -> None:
        self.now += seconds


class FakeBatch:
    def __init__(self, messages: list[int]) -> None:
        self.messages = messages

    def ByteSize(self) -> int:  # (protobuf's name)
        return 8 * len(self.messages)


class FakePeer:
    """The far end and every stream the sender opens to it; misbehaves at random until
    `behave()`. `delivered` lists the messages of every write that returned normally."""

    def __init__(self, rng: random.Random, log: Callable[[str], None]) -> None:
        self.rng = rng
        self.log = log
        self.calls: list[FakeCall] = []
        self.delivered: list[int] = []
        self.healthy = False

    def open(self) -> FakeCall:
        call = FakeCall(self, len(self.calls))
        self.calls.append(call)
        return call

    def behave(self) -> None:
        self.healthy = True
        for call in self.calls:
            call.send_headers()  # (live calls whose headers were held back: now)


class FakeCall:
    """A client stream as grpc.aio has it: a write first waits for the call's headers to
    have gone out (a moment after opening, or never; and never once cancelled first), then
    completes, stalls then completes, stalls for good, or fails, as the peer decides. A
    cancel ends the write under way with CancelledError (as grpc's cancelled operation
    does), with an error, or not at all."""

    def __init__(self, peer: FakePeer, number: int) -> None:
        self.peer = peer
        self.number = number
        self.ended = False
        self._headers_sent = asyncio.Event()
        self._pending: list[tuple[asyncio.Future[None], str]] = []
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualClockLoop)
        rng = peer.rng
        peer.log(f"open call {number}")
        # (each is scheduled at once, in a random order: which runs first is up to chance)
        soon: list[tuple[float, Callable[[], None]]] = []
        if peer.healthy or rng.random() < 0.8:  # (else the headers never go out)
            soon.append((rng.choice([0.0, rng.uniform(0, TIMEOUT / 2)]), self.send_headers))
        if not peer.healthy and rng.random() < 0.3:
            stall = rng.uniform(0, 3 * TIMEOUT)

            def stall_now() -> None:
                peer.log(f"loop stalls {stall:.3f} right after call {number} opened")
                loop.stall(stall)

            soon.append((0.0, stall_now))
        rng.shuffle(soon)
        for delay, callback in soon:
            loop.call_later(delay, callback)

    def send_headers(self) -> None:
        if not self.ended:  # (grpc: cancelled before they went out: never sent)
            self._headers_sent.set()

    def done(self) -> bool:
        return self.ended

    def cancel(self) -> bool:
        if self.ended:
            return False
        self.ended = True
        self.peer.log(f"call {self.number} cancelled")
        for fut, on_cancel in self._pending:
            if fut.done():
                continue
            if on_cancel == "raise":
                fut.cancel()
            elif on_cancel == "fail":
                fut.set_exception(asyncio.InvalidStateError("RPC already finished"))
            # "hang": the write never returns
        return True

    async def write(self, batch: FakeBatch) -> None:
        if self.ended:
            raise asyncio.InvalidStateError("RPC already finished")
        if not self._headers_sent.is_set():
            await self._headers_sent.wait()
            if self.ended:
                raise asyncio.InvalidStateError("RPC already finished")
        rng, peer = self.peer.rng, self.peer
        loop = asyncio.get_running_loop()
        outcome = "ok" if peer.healthy else rng.choice(["ok", "ok", "slow", "stuck", "fail"])
        on_cancel = rng.choice(["raise", "fail", "hang"])
        peer.log(f"write {batch.messages} on call {self.number}: {outcome}, {on_cancel}")
        if outcome == "fail":
            self.ended = True
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata()
            )
        fut: asyncio.Future[None] = loop.create_future()
        if outcome != "stuck":
            high = TIMEOUT / 2 if outcome == "ok" else 3 * TIMEOUT
            loop.call_later(rng.uniform(0, high), self._complete, fut)
        entry = (fut, on_cancel)
        self._pending.append(entry)
        try:
            await fut
        finally:
            self._pending.remove(entry)
        peer.delivered.extend(batch.messages)

    def _complete(self, fut: asyncio.Future[None]) -> None:
        if not fut.done() and not self.ended:
            fut.set_result(None)


async def _scenario(seed: int, log: Callable[[str], None]) -> None:
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    assert isinstance(loop, VirtualClockLoop)

    def note(line: str) -> None:
        log(f"{loop.time():8.4f} {line}")

    peer = FakePeer(rng, note)
    counters: dict[str, int] = {}
    weighted = rng.random() < 0.5
    sender: StreamSender[int, FakeBatch] = StreamSender(
        peer.open,
        FakeBatch,
        timeout=TIMEOUT,
        max_queue=rng.choice([1, 2, 5, 50]),
        counters=counters,
        weight=(lambda m: 1) if weighted else None,
        max_weight=rng.randint(1, 4),
    )
    note(f"max_queue {sender.max_queue}, weighted {weighted}")
    sender.start()
    pushed = 0

    def push(n: int) -> None:
        nonlocal pushed
        for _ in range(n):
            pushed += 1
            sender.push(pushed)
        note(f"pushed up to {pushed}")

    def accounted() -> int:
        return counters.get("messages_sent", 0) + counters.get("messages_dropped", 0)

    # Trouble.
    for _ in range(rng.randint(10, 60)):
        r = rng.random()
        if r < 0.4:
            push(rng.randint(1, 4))
        elif r < 0.7:
            await asyncio.sleep(
                rng.choice([0, rng.uniform(0, TIMEOUT / 2), rng.uniform(0, 3 * TIMEOUT)])
            )
        elif r < 0.8:
            stall = rng.uniform(0, 3 * TIMEOUT)
            note(f"loop stalls {stall:.3f}")
            loop.stall(stall)
        elif r < 0.9:
            if peer.calls:
                note(f"cancel call {peer.calls[-1].number} from outside")
                peer.calls[-1].cancel()
        else:
            await asyncio.sleep(0)

    # The peer behaves again: every message gets accounted for, the last one delivered.
    note("peer behaves")
    peer.behave()
    push(rng.randint(1, 5))
    deadline = loop.time() + 20 * TIMEOUT
    while accounted() != pushed:
        if loop.time() >= deadline:
            raise AssertionError(
                f"sender wedged: {pushed} pushed, {accounted()} accounted for ({counters}), "
                f"{len(sender.queue)} queued"
            )
        await asyncio.sleep(TIMEOUT / 10)
    note(f"all accounted for: {counters}")
    assert sender._task is not None and not sender._task.done()
    sent = counters.get("messages_sent", 0)
    assert len(peer.delivered) == sent, (peer.delivered, counters)
    assert all(a < b for a, b in zip(peer.delivered, peer.delivered[1:], strict=False)), (
        f"out of order or duplicated: {peer.delivered}"
    )
    assert peer.delivered[-1] == pushed

    # Closing, with a write perhaps under way (stuck or not), counts nothing itself.
    peer.healthy = rng.random() < 0.5
    push(rng.randint(0, 3))
    await asyncio.sleep(rng.uniform(0, 2 * TIMEOUT))
    before = dict(counters)
    note(f"close, counters {before}")
    task = sender._task
    await sender.close()
    assert task is not None
    assert task.cancelled()
    assert counters == before, f"close() counted {before} -> {counters}"
    assert all(call.done() for call in peer.calls[-1:])


def _run(seed: int, log: Callable[[str], None]) -> None:
    """One seed's scenario, failing (not hanging) if it or the sender's end never comes."""
    loop = VirtualClockLoop()
    try:
        try:
            loop.run_until_complete(asyncio.wait_for(_scenario(seed, log), VIRTUAL_LIMIT))
        except TimeoutError:
            raise AssertionError(
                f"not over after {VIRTUAL_LIMIT} virtual seconds (the sender wedged, or "
                "close() did not end it)"
            ) from None
    finally:
        # Whatever is left gets a bounded while to end (a sender that ignored close()'s
        # cancellation would spin the clock forever), then is dropped with the loop.
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()
        try:
            if left:
                loop.run_until_complete(asyncio.wait(left, timeout=1.0))
        except RuntimeError:
            pass  # (nothing was scheduled any more)
        loop.close()


def test_the_sender_never_wedges_and_loses_nothing_unaccounted() -> None:
    failures: list[tuple[int, str]] = []
    for seed in range(SEEDS):
        try:
            _run(seed, lambda line: None)
        except Exception as e:  # (report every failing seed)
            failures.append((seed, f"{type(e).__name__}: {e}"))
    if failures:
        seed, error = failures[0]
        listed = " ".join(str(s) for s, _ in failures[:20])
        pytest.fail(
            f"{len(failures)} of {SEEDS} seeds failed ({listed}). Seed {seed}: {error}\n"
            f"replay: {_replay_command(seed)}",
            pytrace=False,
        )


def test_replay() -> None:
    """One seed (CAPLAB_SEED), printing its event log."""
    seed = os.environ.get("CAPLAB_SEED")
    if seed is None:
        pytest.skip("set CAPLAB_SEED to replay one seed")
    lines: list[str] = []
    try:
        _run(int(seed), lines.append)
    finally:
        print("\n".join(lines))
