"""One training worker: a separate process, a gRPC client of one node, nothing shared but
the store (``python -m harness.train.worker CONFIG.json``).

Theory of operation
-------------------
Once loaded, the worker says so (``ready`` on stdout) and reads the experiment's ``t0_ns``
from stdin (the monotonic clock every process of the
machine shares), then runs steps until ``duration_s`` has passed. A step computes
the gradient of its minibatch at its current parameters (softmax regression, well under a
millisecond) and then waits out the rest of ``step_ms * factor``: the emulated cost of a
real model's forward and backward pass, which is what a straggler (``factor`` > 1) is slow
at. How the step meets the store is the mode (:mod:`harness.train.protocol`):

``bsp``  put the gradient, wait until every gradient of the step is readable (with
         ``backups``: join the step's manifest of the first ``workers - backups``; a worker
         that lags skips a step already complete), average them in worker order, apply:
         every worker's parameters are identical after every step.
``asp``  read every worker's cumulative update from this node (LOCAL, no waiting), compute,
         push its own cumulative update. The gradient is stale by whatever the node had
         not yet received.
``ssp``  like ``asp`` over raft with linearizable reads, but a worker that has completed
         ``c`` steps starts its next only once the slowest has completed ``c - staleness``.

Each completed step is one JSON line in ``out`` (times in s since ``t0``): ``step``,
``started``, ``t``, ``compute_ms``, ``wait_ms`` (the rest of the step: the store's round
trips, the barrier or the clock wait, refusals and their retries), and per mode
``digest`` (bsp), ``read_at``, ``seen`` (steps of each other worker its parameters
included), ``pushed_at`` (asp/ssp), ``lead`` (ssp);
every ``eval_every`` steps and after the last, the held-out ``loss`` and ``acc``. The
orchestrator turns ``seen`` and every worker's ``pushed_at`` into each gradient's
staleness. A store that refuses (a minority during a partition) is retried until it
answers or the experiment ends: the refusal is the stall being measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np

from caplab import errors
from caplab.client import KVClient
from caplab.v1 import kv_pb2
from harness.train import data, model
from harness.train.protocol import (
    decode_manifest,
    decode_update,
    encode_manifest,
    encode_update,
    grad_key,
    manifest_key,
    update_key,
)

T = TypeVar("T")
MODES = ("bsp", "asp", "ssp")
POLL_MIN_S, POLL_MAX_S = 0.002, 0.02  # a wait on the store polls, backing off to 20 ms


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    mode: str
    worker: int
    workers: int
    endpoint: str
    prefix: str  # every key of the experiment starts with it
    data: str  # the .npz of harness.train.data.prepare
    out: str  # the JSON-lines log
    t0_ns: int  # the experiment's start, time.monotonic_ns()
    duration_s: float
    step_ms: float = 20.0
    factor: float = 1.0  # > 1: a straggler
    lr: float = 0.5
    batch: int = 32
    seed: int = 0
    staleness: int = 3  # ssp
    backups: int = 0  # bsp
    eval_every: int = 5
    op_timeout: float = 1.0
    # True: say "ready" on stdout once loaded, then read t0_ns from stdin
    wait_for_start: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 0 <= self.worker < self.workers:
            raise ValueError(f"worker {self.worker} of {self.workers}")
        if not 0 <= self.backups < self.workers:
            raise ValueError(f"backups must be 0..{self.workers - 1}, got {self.backups}")


class Deadline(Exception):
    """The experiment ended while the worker waited."""


class Worker:
    def __init__(self, cfg: WorkerConfig, client: KVClient, log: IO[str]) -> None:
        self.cfg = cfg
        self.client = client
        self.log = log
        ds = data.load(Path(cfg.data))
        self.x, self.y = data.shard(ds, cfg.worker, cfg.workers)
        self.test_x, self.test_y = ds.test_x, ds.test_y
        self.n = model.size()
        self.theta = model.init()
        self.update = np.zeros(self.n)  # asp/ssp: this worker's cumulative update
        self.steps = 0
        self.t0_ns = cfg.t0_ns
        self.end_ns = cfg.t0_ns + int(cfg.duration_s * 1e9)
        self._pending: dict[str, Any] | None = None
        self._params_seen = model.init()  # asp/ssp: the parameters after the last step
        self._tasks: set[asyncio.Future[None]] = set()

    # -- time -----------------------------------------------------------------------------
    def now(self) -> float:
        """Seconds since the experiment's start."""
        return (time.monotonic_ns() - self.t0_ns) / 1e9

    def over(self) -> bool:
        return time.monotonic_ns() >= self.end_ns

    async def patient(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call`` until the store answers; refusals and timeouts are retried until the
        experiment ends (:class:`Deadline`)."""
        delay = POLL_MIN_S
        while True:
            try:
                return await call()
            except errors.StoreError as e:
                if not _retryable(e):
                    raise
            await self._pause(delay)
            delay = min(POLL_MAX_S, delay * 2)

    async def _pause(self, delay: float) -> None:
        if self.over():
            raise Deadline
        await asyncio.sleep(delay)

    async def poll(self, done: Callable[[], Awaitable[bool]]) -> None:
        """Wait until ``done()`` (a read of the store) holds, backing off."""
        delay = POLL_MIN_S
        while not await done():
            await self._pause(delay)
            delay = min(POLL_MAX_S, delay * 2)

    # -- the step ---------------------------------------------------------------------------
    async def compute(self, theta: model.Vector) -> model.Vector:
        """The gradient at ``theta`` of this step's minibatch, taking ``step_ms * factor``."""
        cfg = self.cfg
        t = time.monotonic()
        bx, by = data.batch(
            self.x, self.y, cfg.batch, seed=cfg.seed, worker=cfg.worker, step=self.steps + 1
        )
        g = model.gradient(theta, bx, by)
        rest = cfg.step_ms * cfg.factor / 1000 - (time.monotonic() - t)
        if rest > 0:
            await asyncio.sleep(rest)  # the emulated cost of a real model's step
        return g

    async def run(self, t0_ns: int | None = None) -> None:
        """Steps from ``t0_ns`` (default: the configured one) for ``duration_s``."""
        if t0_ns is not None:
            self.t0_ns = t0_ns
            self.end_ns = t0_ns + int(self.cfg.duration_s * 1e9)
        delay = (self.t0_ns - time.monotonic_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)  # every worker starts at t0
        step = {"bsp": self.bsp_step, "asp": self.asp_step, "ssp": self.ssp_step}[self.cfg.mode]
        try:
            while not self.over():
                started = self.now()
                record = await step()
                self.steps += 1
                t = self.now()
                record.update(
                    step=self.steps,
                    started=round(started, 6),
                    t=round(t, 6),
                    # everything but computing: the store's round trips, the barrier or the
                    # clock wait, refusals and their retries (one clock: nothing counted twice)
                    wait_ms=round(max(0.0, (t - started) * 1000 - record["compute_ms"]), 3),
                )
                if self.steps % self.cfg.eval_every == 0:
                    self._evaluate(record)
                self._emit(record)
        except Deadline:
            pass
        if self._pending is not None and "acc" not in self._pending:
            self._evaluate(self._pending)  # the last step's parameters are evaluated too
        self._emit(None)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self.cfg.op_timeout * 2)

    def _evaluate(self, record: dict[str, Any]) -> None:
        loss, acc = model.evaluate(self.params(), self.test_x, self.test_y)
        record.update(loss=round(loss, 6), acc=round(acc, 6))

    def _emit(self, record: dict[str, Any] | None) -> None:
        """Write the previous record (the last one is held back until the end, so that
        its evaluation can be added); ``None`` flushes."""
        if self._pending is not None:
            self.log.write(json.dumps(self._pending, separators=(",", ":")) + "\n")
            self.log.flush()
        self._pending = record

    def params(self) -> model.Vector:
        if self.cfg.mode == "bsp":
            return self.theta
        return self._params_seen

    # -- BSP ----------------------------------------------------------------------------------
    async def bsp_step(self) -> dict[str, Any]:
        cfg, client = self.cfg, self.client
        t = self.steps + 1
        need = cfg.workers - cfg.backups
        compute_ms = 0.0
        chosen: list[int] | None = None
        if cfg.backups:
            # With backup workers the fast ones do not wait for a straggler: a step they
            # completed while it lagged is not worth a gradient it would drop. It applies
            # that step's average and catches up.
            key = manifest_key(cfg.prefix, t)
            got = await self.patient(lambda: client.get(key))
            cur = decode_manifest(got.value if isinstance(got.value, bytes) else None)
            if len(cur) >= need:
                chosen = sorted(cur[:need])
        skipped = chosen is not None
        if chosen is None:
            c0 = time.monotonic()
            g = await self.compute(self.theta)
            compute_ms = (time.monotonic() - c0) * 1000
            await self.patient(
                lambda: client.put(grad_key(cfg.prefix, t, cfg.worker), model.encode(g))
            )
            if cfg.backups:
                chosen = await self._manifest(t, need)
            else:
                chosen = list(range(cfg.workers))  # every gradient: no manifest to agree on
        found: dict[int, bytes] = {}
        members = chosen

        async def all_in() -> bool:
            missing = [j for j in members if j not in found]
            got = await asyncio.gather(
                *(
                    self.patient(functools.partial(client.get, grad_key(cfg.prefix, t, j)))
                    for j in missing
                )
            )
            for j, r in zip(missing, got, strict=True):
                if isinstance(r.value, bytes):
                    found[j] = r.value
            return len(found) == len(members)

        await self.poll(all_in)  # the barrier
        stacked = np.stack([model.decode(found[j], self.n) for j in members])
        self.theta = self.theta - cfg.lr * np.mean(stacked, axis=0)
        if t > 2 and not cfg.backups:
            # Without backups no worker is more than one step behind another: step t-2's
            # gradients are read by nobody any more. (With backups a straggler may lag any
            # number of steps: the keys stay, a few KB per step.)
            self._background(client.delete(grad_key(cfg.prefix, t - 2, cfg.worker)))
        record: dict[str, Any] = {
            "compute_ms": round(compute_ms, 3),
            "digest": model.digest(self.theta),
            "members": members,
        }
        if cfg.backups:
            record["skipped"] = skipped
        return record

    def _background(self, call: Awaitable[object]) -> None:
        """Garbage collection off the step's path (a failure only leaves a key behind)."""

        async def quietly() -> None:
            with contextlib.suppress(errors.StoreError):
                await call

        task = asyncio.ensure_future(quietly())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _manifest(self, t: int, need: int) -> list[int]:
        """Backup workers: the ``need`` workers whose gradients step ``t`` averages (the
        first to join its manifest), in worker order."""
        client = self.client
        key = manifest_key(self.cfg.prefix, t)
        members = await self._join(key, need)
        if len(members) < need:
            state: list[list[int]] = [members]

            async def full() -> bool:
                got = await self.patient(lambda: client.get(key))
                state[0] = decode_manifest(got.value if isinstance(got.value, bytes) else None)
                return len(state[0]) >= need

            await self.poll(full)
            members = state[0]
        return sorted(members[:need])

    async def _join(self, key: str, need: int) -> list[int]:
        """Add this worker to the manifest unless it is full; the manifest seen."""
        client, me = self.client, self.cfg.worker
        while True:
            got = await self.patient(lambda: client.get(key))
            raw = got.value if isinstance(got.value, bytes) else None
            cur = decode_manifest(raw)
            if me in cur or len(cur) >= need:
                return cur
            try:
                r = await client.cas(key, raw, encode_manifest([*cur, me]))
            except errors.StoreError as e:
                if not _retryable(e):
                    raise
                await self._pause(POLL_MIN_S)
                continue  # (an unknown outcome shows in the next read)
            if r.swapped:
                return [*cur, me]

    # -- ASP and SSP ---------------------------------------------------------------------------
    async def _read_updates(self, level: int) -> tuple[dict[int, int], model.Vector]:
        """Every other worker's cumulative update at ``level``: (steps seen per worker,
        their sum)."""
        cfg, client = self.cfg, self.client
        others = [j for j in range(cfg.workers) if j != cfg.worker]
        got = await asyncio.gather(
            *(
                self.patient(functools.partial(client.get, update_key(cfg.prefix, j), level))
                for j in others
            )
        )
        seen: dict[int, int] = {}
        total = np.zeros(self.n)
        for j, r in zip(others, got, strict=True):
            if isinstance(r.value, bytes):
                steps, _, u = decode_update(r.value, self.n)
                seen[j] = steps
                total += u
            else:
                seen[j] = 0
        return seen, total

    async def _push(self, g: model.Vector) -> float:
        cfg, client = self.cfg, self.client
        # lr / workers: a round of one update per worker moves as far as one BSP step
        self.update = self.update - (cfg.lr / cfg.workers) * g
        payload = encode_update(self.steps + 1, time.monotonic_ns(), self.update)
        await self.patient(lambda: client.put(update_key(cfg.prefix, cfg.worker), payload))
        return self.now()

    async def asp_step(self) -> dict[str, Any]:
        read_at = self.now()
        seen, others = await self._read_updates(kv_pb2.CONSISTENCY_EVENTUAL)
        theta = model.init() + self.update + others
        c0 = time.monotonic()
        g = await self.compute(theta)
        compute_ms = (time.monotonic() - c0) * 1000
        pushed_at = await self._push(g)
        self._params_seen = theta + (-(self.cfg.lr / self.cfg.workers) * g)
        return {
            "compute_ms": round(compute_ms, 3),
            "read_at": round(read_at, 6),
            "seen": {str(j): c for j, c in seen.items()},
            "pushed_at": round(pushed_at, 6),
        }

    async def ssp_step(self) -> dict[str, Any]:
        cfg = self.cfg
        state: list[tuple[dict[int, int], model.Vector, float]] = []

        async def within_bound() -> bool:
            read_at = self.now()
            seen, others = await self._read_updates(kv_pb2.CONSISTENCY_LINEARIZABLE)
            state[:] = [(seen, others, read_at)]
            slowest = min([self.steps, *seen.values()])
            return self.steps - slowest <= cfg.staleness

        await self.poll(within_bound)
        seen, others, read_at = state[0]
        lead = self.steps - min([self.steps, *seen.values()])
        theta = model.init() + self.update + others
        c0 = time.monotonic()
        g = await self.compute(theta)
        compute_ms = (time.monotonic() - c0) * 1000
        pushed_at = await self._push(g)
        self._params_seen = theta + (-(cfg.lr / cfg.workers) * g)
        return {
            "compute_ms": round(compute_ms, 3),
            "read_at": round(read_at, 6),
            "seen": {str(j): c for j, c in seen.items()},
            "pushed_at": round(pushed_at, 6),
            "lead": lead,
        }


def _retryable(e: errors.StoreError) -> bool:
    """Refused for now (no leader, cut off, not caught up) or outcome unknown: try again.
    Anything else (a bad request, a level not offered) is a bug: stop."""
    return not e.definite or e.code.name in ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "ABORTED")


async def main_async(cfg: WorkerConfig, log: IO[str]) -> None:
    async with KVClient(
        [cfg.endpoint],
        timeout=cfg.op_timeout,
        retries=0,
        client_id=f"train-{cfg.prefix}{cfg.worker}",
    ) as client:
        await Worker(cfg, client, log).run()


def ready_then_start(cfg: WorkerConfig) -> WorkerConfig:
    """Say this worker is ready (``ready`` on stdout: its imports done, the slow part of a
    start), then read the experiment's t0 from stdin, which the orchestrator sends once
    every worker is ready: a slow start under load no longer makes a worker start late."""
    print("ready", flush=True)
    sys.stdout = sys.stderr  # (nobody reads stdout from now on: it must not fill up)
    line = sys.stdin.readline()
    if not line.strip():
        raise RuntimeError("no start signal: the orchestrator closed stdin")
    return dataclasses.replace(cfg, t0_ns=int(line))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m harness.train.worker CONFIG.json", file=sys.stderr)
        return 2
    cfg = WorkerConfig(**json.loads(Path(args[0]).read_text(encoding="utf-8")))
    if cfg.wait_for_start:
        cfg = ready_then_start(cfg)
    from caplab.loop import run as loop_run  # (uvloop when there is one)

    with Path(cfg.out).open("w", encoding="utf-8") as log:
        loop_run(main_async(cfg, log))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
