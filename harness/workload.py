"""Workloads: closed-loop clients that drive one cluster and record every operation.

Theory of operation
-------------------
Each client is a closed loop (one operation at a time) pinned to one node; it talks to that
node directly (never through the proxies) with its own :class:`~caplab.client.KVClient`
(no retries, the scenario's per-operation deadline). An optional target rate (ops/s for the
whole store) spaces the operations of each client evenly; a client that falls behind does
not burst to catch up.

Every operation is recorded through a :class:`Recorder` (a :class:`~harness.history.HistoryWriter`
whose times are relative to a shared ``t0``, so that histories of two stores run side by
side share one time axis): ``invoke``, then ``ok``, ``fail`` (only when the error is
*definite*: :attr:`caplab.errors.StoreError.definite`, or a CAS whose comparison failed) or
``info`` (everything uncertain: deadline exceeded, connection lost mid-call, ...). After an
``info`` the client continues under a new process id (Jepsen convention: the old process
may still have an operation in flight). Operations carry the node and, when the nemesis has
a partition in force, the node's side (``majority``/``minority``).

Workloads:

``register``  read / write / delete / cas over ``keys`` registers ``r0..``: half reads (one
              in five of them LOCAL), ``delete_fraction`` deletes (default 0.15 of the
              register operations), the rest writes and CAS (3:2). Every written value is
              unique (``"<process>-<n>"``), so every read traces back to one write; a read
              of a deleted key returns null (absent). CAS expects the value this client
              last saw (null: absent). The AP store refuses CAS with FAILED_PRECONDITION:
              a ``fail``. The ``ok`` of a write or delete carries the store's HLC timestamp
              of that write when the store gives one (gossip: ``hlc`` in the history).
``counter``   increments by a random delta in 1..5 and reads of ``keys`` counters ``c0..``.
``both``      each operation picks one of the two at random.

Conflict keys (``conflict_keys`` > 0): while the client's node is on one side of a
partition (``side_of(node)`` is not None), one operation in ten instead writes one of the
registers ``lww0..`` (unique values as above). Nothing else touches them and nobody writes
them once the partition is healed, so their converged values are decided by
last-writer-wins between the two sides' last writes: the losing side's acknowledged writes
are discarded (:func:`harness.divergence.lww_discards`), instead of being superseded in
real time by the writes that keep coming after the heal, as on ``r0..``.

Read guarantees (``levels``, the consistency spectrum): each name in ``levels`` gets
``clients_per_node`` clients on every node, whose register reads ask for that level
(:data:`LEVELS`; ``strong`` reads are recorded as ``read``, every other level's as
``read-local``, each invoke carrying ``consistency``). A share ``roam`` of each level's
clients (spread evenly over the nodes) *roam*: before every operation they move to a
node picked at random (invokes carry ``roaming``), the case session guarantees are for.
The session levels carry a session token (kv.proto ``session_token``) and keep exactly what
their guarantee needs: ``session`` the token of every answer, ``read_my_writes`` only that
of its writes, ``monotonic_reads`` only that of its reads, so that each shows the
anomalies of the other. ``bounded_staleness`` reads pass ``max_staleness_ms``. Without
``levels``, one read in five is LOCAL and the rest use the store's default, as above.

Own keys (``own_keys``): each client writes (and CASes) only its own register ``w<index>``
and reads it half the time, another client's the other half. With no other writer
overwriting it within milliseconds, a read of one's own register after moving to a replica
that lacks the last write shows read-your-writes at work, and a reader of a register written
far away sees exactly how stale its replica is; shared registers hide both behind the
next writer's overwrite.

The ``ok`` of a mutation (write, cas, delete, incr) on a store that applies its writes at
log positions (raft) carries that position: ``log_index`` in the history (the response
header's ``index``), so that a replica's ``applied_index`` tells whether it has the write.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeAlias

from caplab import errors
from caplab.client import KVClient
from caplab.v1 import kv_pb2
from harness.history import CompletionType, Event, HistoryWriter, Hlc, Json, Process

WORKLOADS = ("register", "counter", "both")


@dataclass(frozen=True, slots=True)
class Level:
    """A read guarantee a spectrum client asks for."""

    consistency: int  # kv_pb2.Consistency
    f: str  # how its reads are recorded: "read" (linearizability-checked) or "read-local"
    # The session token this client keeps (None: it carries none): from the answers to
    # its reads, its writes, or both. Weaker than "both" on purpose: each single session
    # guarantee then shows the anomalies of the other.
    token_from: frozenset[str] | None = None


_READS = frozenset({"read"})
_WRITES = frozenset({"write"})
LEVELS: dict[str, Level] = {  # strongest first (Terry's Table 2 order)
    "strong": Level(kv_pb2.CONSISTENCY_STRONG, "read"),
    "bounded_staleness": Level(kv_pb2.CONSISTENCY_BOUNDED_STALENESS, "read-local"),
    "session": Level(kv_pb2.CONSISTENCY_SESSION, "read-local", _READS | _WRITES),
    "read_my_writes": Level(kv_pb2.CONSISTENCY_READ_MY_WRITES, "read-local", _WRITES),
    "monotonic_reads": Level(kv_pb2.CONSISTENCY_MONOTONIC_READS, "read-local", _READS),
    "consistent_prefix": Level(kv_pb2.CONSISTENCY_CONSISTENT_PREFIX, "read-local"),
    "eventual": Level(kv_pb2.CONSISTENCY_EVENTUAL, "read-local"),
}
DEFAULT_DELETE_FRACTION = 0.15
MAX_DELETE_FRACTION = 0.5  # the other half of the register operations are reads
CONFLICT_FRACTION = 0.1  # of the operations of a client on one side of a partition
MUTATIONS = ("write", "cas", "delete", "incr")
# completion type, value, error, the store's response header (None: none)
_Outcome: TypeAlias = tuple[CompletionType, Json, str | None, kv_pb2.ResponseHeader | None]


def register_keys(n: int) -> list[str]:
    return [f"r{i}" for i in range(n)]


def counter_keys(n: int) -> list[str]:
    return [f"c{i}" for i in range(n)]


def own_keys(n_clients: int) -> list[str]:
    """One register per client (``own_keys``): ``w<client index>``."""
    return [f"w{i}" for i in range(n_clients)]


def conflict_keys(n: int) -> list[str]:
    """The registers written from both sides of a partition, and only then."""
    return [f"lww{i}" for i in range(n)]


class Recorder:
    """A history writer on a shared time axis: event time = ``monotonic_ns() - t0_ns``."""

    def __init__(self, path: str | Path, t0_ns: int) -> None:
        self.t0_ns = t0_ns
        self.writer = HistoryWriter(path)
        self.path = Path(path)

    def now(self) -> int:
        return max(0, time.monotonic_ns() - self.t0_ns)

    def invoke(
        self,
        process: Process,
        f: str,
        key: str | None,
        value: Json = None,
        *,
        node: str | None = None,
        side: str | None = None,
        consistency: str | None = None,
        roaming: bool = False,
        client: int | None = None,
    ) -> Event:
        return self.writer.invoke(
            process,
            f,
            key,
            value,
            node=node,
            side=side,
            time=self.now(),
            consistency=consistency,
            roaming=roaming,
            client=client,
        )

    def complete(
        self,
        type: CompletionType,
        process: Process,
        value: Json = None,
        *,
        error: str | None = None,
        hlc: Hlc | None = None,
        log_index: int | None = None,
    ) -> Event:
        return self.writer.complete(
            type, process, value, error=error, time=self.now(), hlc=hlc, log_index=log_index
        )

    def close(self) -> None:
        self.writer.close()


@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    kind: str = "both"  # register | counter | both
    keys: int = 3
    clients_per_node: int = 2
    rate: float = 0.0  # ops/s for the whole store; 0 = closed loop as fast as possible
    op_timeout: float = 1.0
    seed: int = 0
    delete_fraction: float = DEFAULT_DELETE_FRACTION  # of the register operations
    conflict_keys: int = 0  # registers lww0.. written from both sides during partitions
    levels: tuple[str, ...] = ()  # read guarantees (LEVELS), clients_per_node clients each
    roam: float = 0.0  # share of each level's clients that move node before every operation
    max_staleness_ms: int = 1000  # bounded_staleness reads
    # Each client writes only its own register w<index>; half its reads are of it, half
    # of another client's (instead of registers r0.. shared by all; no deletes).
    own_keys: bool = False
    pipelined: bool = False  # operations over KV.Pipeline instead of unary RPCs

    def __post_init__(self) -> None:
        unknown = [lv for lv in self.levels if lv not in LEVELS]
        if unknown:
            raise ValueError(
                f"unknown read level(s) {', '.join(unknown)}; allowed: {', '.join(LEVELS)}"
            )
        if len(set(self.levels)) != len(self.levels):
            raise ValueError(f"read levels repeat: {', '.join(self.levels)}")
        if not 0.0 <= self.roam <= 1.0:
            raise ValueError(f"roam must be between 0 and 1, got {self.roam}")
        if self.max_staleness_ms < 1:
            raise ValueError(f"max_staleness_ms must be >= 1, got {self.max_staleness_ms}")
        if not 0.0 <= self.delete_fraction <= MAX_DELETE_FRACTION:
            raise ValueError(
                f"delete_fraction must be between 0 and {MAX_DELETE_FRACTION}, "
                f"got {self.delete_fraction}"
            )
        if self.conflict_keys < 0:
            raise ValueError(f"conflict_keys must be >= 0, got {self.conflict_keys}")


def header_hlc(header: kv_pb2.ResponseHeader) -> Hlc | None:
    """The HLC timestamp of a response header (gossip writes), None when it has none."""
    if not header.HasField("hlc"):
        return None
    return (header.hlc.wall_ms, header.hlc.logical, header.hlc.node_id)


def header_log_index(header: kv_pb2.ResponseHeader) -> int | None:
    """The log index of a response header (raft writes), None when it has none (gossip)."""
    return header.index if header.index > 0 else None


def _error_text(e: BaseException) -> str:
    if isinstance(e, errors.StoreError):
        text = f"{e.code.name}: {e.message}"
    else:
        text = f"{type(e).__name__}: {e}"
    return text[:300]


class Workload:
    """Clients of one cluster. ``endpoints`` maps node id -> address (direct, no proxy);
    ``side_of(node)`` gives the node's current partition side or None."""

    def __init__(
        self,
        config: WorkloadConfig,
        endpoints: Mapping[str, str],
        recorder: Recorder,
        side_of: Callable[[str], str | None] = lambda _n: None,
        *,
        client_prefix: str = "c",
    ) -> None:
        if config.kind not in WORKLOADS:
            raise ValueError(f"unknown workload {config.kind!r}; allowed: {', '.join(WORKLOADS)}")
        self.config = config
        self.endpoints = dict(endpoints)
        self.recorder = recorder
        self.side_of = side_of
        self.client_prefix = client_prefix
        self.pins: list[ClientSpec] = _layout(list(self.endpoints), config)
        self.counts: dict[str, int] = {"ok": 0, "fail": 0, "info": 0}

    @property
    def clients(self) -> int:
        return len(self.pins)

    def register_names(self) -> list[str]:
        """Every register this workload may write (for the final reads)."""
        shared = own_keys(self.clients) if self.config.own_keys else register_keys(self.config.keys)
        return shared + conflict_keys(self.config.conflict_keys)

    async def run(self, stop: asyncio.Event) -> None:
        """Run every client until ``stop`` is set (each finishes its operation in flight)."""
        await asyncio.gather(*(self._client(i, spec, stop) for i, spec in enumerate(self.pins)))

    async def _client(self, index: int, spec: ClientSpec, stop: asyncio.Event) -> None:
        cfg = self.config
        rng = random.Random(cfg.seed * 1_000_003 + index)
        n_clients = self.clients
        interval = n_clients / cfg.rate if cfg.rate > 0 else 0.0
        level = LEVELS[spec.level] if spec.level is not None else None
        state = _ClientState(process=index, rng=rng, spec=spec, level=level, index=index)
        nodes = list(self.endpoints) if spec.roaming else [spec.node]
        node = spec.node
        async with KVClient(
            [self.endpoints[n] for n in nodes],
            timeout=cfg.op_timeout,
            retries=0,
            client_id=f"{self.client_prefix}{index}-{cfg.seed}",
            session=level is not None and level.token_from is not None,
            pipeline=cfg.pipelined,
        ) as client:
            state.client = client
            next_at = time.monotonic() + rng.uniform(0, interval)
            while not stop.is_set():
                if interval:
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        try:
                            await asyncio.wait_for(stop.wait(), delay)
                            break
                        except TimeoutError:
                            pass
                    next_at = max(next_at + interval, time.monotonic())
                if spec.roaming:
                    node = rng.choice(nodes)
                    client.move_to(self.endpoints[node])
                kind = cfg.kind
                if (
                    cfg.conflict_keys
                    and self.side_of(node) is not None
                    and rng.random() < CONFLICT_FRACTION
                ):
                    kind = "conflict"
                elif kind == "both":
                    kind = "register" if rng.random() < 0.5 else "counter"
                if kind == "conflict":
                    outcome = await self._conflict_write(client, node, state)
                elif kind == "register":
                    outcome = await self._register_op(client, node, state)
                else:
                    outcome = await self._counter_op(client, node, state)
                self.counts[outcome] += 1
                if outcome == "info":
                    state.process += n_clients  # the old process may still be in flight
                if not interval:
                    await asyncio.sleep(0)  # let other clients and the nemesis run

    async def _do(
        self,
        state: _ClientState,
        node: str,
        f: str,
        key: str,
        value: Json,
        call: Callable[[], Awaitable[_Outcome]],
    ) -> CompletionType:
        rec = self.recorder
        pid = state.process
        rec.invoke(
            pid,
            f,
            key,
            value,
            node=node,
            side=self.side_of(node),
            consistency=state.spec.level,
            roaming=state.spec.roaming,
            client=state.index,
        )
        header: kv_pb2.ResponseHeader | None = None
        token = state.client.session_token if state.client is not None else b""
        try:
            result = await asyncio.wait_for(call(), self.config.op_timeout + 2.0)
            ctype, out, err, header = result
        except errors.StoreError as e:
            ctype, out, err = ("fail" if e.definite else "info"), None, _error_text(e)
        except TimeoutError:
            ctype, out, err = "info", None, "harness timeout (no answer after the deadline)"
        except asyncio.CancelledError:
            raise
        except Exception as e:  # anything unexpected: the outcome is unknown
            ctype, out, err = "info", None, _error_text(e)
        keep = state.level.token_from if state.level is not None else None
        if keep is not None and state.client is not None:
            kind = "read" if f.startswith("read") else "write"
            if kind not in keep:  # this guarantee does not need what this answer saw
                state.client.session_token = token
        if ctype == "ok" and f in ("write", "cas", "incr"):
            out = value
        hlc: Hlc | None = None
        log_index: int | None = None
        if ctype == "ok" and header is not None and f in MUTATIONS:
            if f != "incr":  # a counter has no single write timestamp
                hlc = header_hlc(header)
            log_index = header_log_index(header)
        rec.complete(ctype, pid, out, error=err, hlc=hlc, log_index=log_index)
        return ctype

    async def _conflict_write(
        self, client: KVClient, node: str, st: _ClientState
    ) -> CompletionType:
        key = st.rng.choice(conflict_keys(self.config.conflict_keys))
        st.n += 1
        new = f"{st.process}-{st.n}"

        async def write() -> _Outcome:
            resp = await client.put(key, new.encode())
            return "ok", new, None, resp.header

        return await self._do(st, node, "write", key, new, write)

    async def _register_op(self, client: KVClient, node: str, st: _ClientState) -> CompletionType:
        rng = st.rng
        r = rng.random()
        if not self.config.own_keys:
            key = rng.choice(register_keys(self.config.keys))
        elif r < 0.5 and rng.random() < 0.5:  # a read of another client's register
            key = f"w{rng.choice([i for i in range(self.clients) if i != st.index] or [0])}"
        else:
            key = f"w{st.index}"
        if r < 0.5:
            # Without a level, one read in five asks for LOCAL consistency: on raft it may
            # be stale, and the harness counts such stale reads instead of checking them
            # for linearizability.
            staleness = 0
            if st.level is not None:
                f, level = st.level.f, st.level.consistency
                if level == kv_pb2.CONSISTENCY_BOUNDED_STALENESS:
                    staleness = self.config.max_staleness_ms
            elif r < 0.1:
                f, level = "read-local", kv_pb2.CONSISTENCY_LOCAL
            else:
                f, level = "read", kv_pb2.CONSISTENCY_DEFAULT

            async def read() -> _Outcome:
                g = await client.get(key, level, max_staleness_ms=staleness)
                v = g.value
                text: str | None
                if v is None:
                    text = None
                elif isinstance(v, bytes):
                    text = v.decode("utf-8", "replace")
                else:
                    text = str(v)
                st.last[key] = text
                return "ok", text, None, None

            return await self._do(st, node, f, key, None, read)
        deletes = 0.0 if self.config.own_keys else self.config.delete_fraction
        if r < 0.5 + deletes:

            async def delete() -> _Outcome:
                resp = await client.delete(key)
                st.last[key] = None
                return "ok", None, None, resp.header

            return await self._do(st, node, "delete", key, None, delete)
        st.n += 1
        new = f"{st.process}-{st.n}"
        if r < 0.5 + deletes + (0.5 - deletes) * 0.6:

            async def write() -> _Outcome:
                resp = await client.put(key, new.encode())
                st.last[key] = new
                return "ok", new, None, resp.header

            return await self._do(st, node, "write", key, new, write)
        expected = st.last.get(key)

        async def cas() -> _Outcome:
            resp = await client.cas(
                key, None if expected is None else expected.encode(), new.encode()
            )
            if resp.swapped:
                st.last[key] = new
                return "ok", [expected, new], None, resp.header
            current = resp.current.decode("utf-8", "replace") if resp.found else None
            st.last[key] = current
            return "fail", None, f"compare failed: current value {current!r}", None

        return await self._do(st, node, "cas", key, [expected, new], cas)

    async def _counter_op(self, client: KVClient, node: str, st: _ClientState) -> CompletionType:
        rng = st.rng
        key = rng.choice(counter_keys(self.config.keys))
        if rng.random() < 0.5:
            delta = rng.randint(1, 5)

            async def incr() -> _Outcome:
                resp = await client.increment(key, delta)
                return "ok", delta, None, resp.header

            return await self._do(st, node, "incr", key, delta, incr)

        async def read() -> _Outcome:
            g = await client.get(key)
            v = g.value if isinstance(g.value, int) else 0
            return "ok", v, None, None

        return await self._do(st, node, "read-counter", key, None, read)


@dataclass(frozen=True, slots=True)
class ClientSpec:
    """One client of a workload: its home node, read level and whether it roams."""

    node: str  # where it starts (a pinned client stays there)
    level: str | None = None  # a LEVELS name; None: the mixed default/LOCAL reads
    roaming: bool = False


def _layout(nodes: list[str], cfg: WorkloadConfig) -> list[ClientSpec]:
    """``clients_per_node`` clients per node (per level, with levels); within each level
    the ``roam`` share of them roams, spread evenly over the nodes."""
    if not cfg.levels:
        return [ClientSpec(node) for node in nodes for _ in range(cfg.clients_per_node)]
    out: list[ClientSpec] = []
    for level in cfg.levels:
        homes = [node for _ in range(cfg.clients_per_node) for node in nodes]
        for k, node in enumerate(homes):
            roams = math.floor((k + 1) * cfg.roam) > math.floor(k * cfg.roam)
            out.append(ClientSpec(node, level, roams))
    return out


@dataclass(slots=True)
class _ClientState:
    process: int
    rng: random.Random
    spec: ClientSpec = ClientSpec("")
    level: Level | None = None
    client: KVClient | None = None  # set by the client loop (its session token)
    index: int = 0  # the client's index (stable across process ids): its own register
    n: int = 0
    last: dict[str, str | None] = field(default_factory=dict)  # last value seen per key


async def _final_local_reads(
    endpoints: Mapping[str, str],
    keys: Sequence[str],
    recorder: Recorder,
    f: str,
    decode: Callable[[bytes | int | None], Json],
    *,
    first_process: int,
    timeout: float,
) -> dict[str, dict[str, Json]]:
    """LOCAL reads of ``keys`` on every node, each recorded in the history as ``f`` (one
    process per node from ``first_process``). Returns node -> key -> decoded value for the
    reads that succeeded."""
    out: dict[str, dict[str, Json]] = {}
    for i, (node, ep) in enumerate(endpoints.items()):
        pid = first_process + i
        out[node] = {}
        async with KVClient([ep], timeout=timeout, retries=0) as client:
            for key in keys:
                recorder.invoke(pid, f, key, None, node=node)
                try:
                    g = await client.get(key, kv_pb2.CONSISTENCY_LOCAL)
                except errors.StoreError as e:
                    recorder.complete(
                        "fail" if e.definite else "info", pid, None, error=_error_text(e)
                    )
                    if not e.definite:
                        pid += len(endpoints)
                    continue
                value = decode(g.value)
                recorder.complete("ok", pid, value)
                out[node][key] = value
    return out


async def final_counter_reads(
    endpoints: Mapping[str, str],
    keys: Sequence[str],
    recorder: Recorder,
    *,
    first_process: int,
    timeout: float = 2.0,
) -> dict[str, dict[str, int | None]]:
    """Read every counter on every node with LOCAL consistency, recording each read in the
    history (one process per node, starting at ``first_process``). Returns
    node -> key -> value (None when the read failed)."""
    reads = await _final_local_reads(
        endpoints,
        keys,
        recorder,
        "read-counter",
        lambda v: v if isinstance(v, int) else 0,
        first_process=first_process,
        timeout=timeout,
    )
    return {
        node: {k: v if isinstance(v := got.get(k), int) else None for k in keys}
        for node, got in reads.items()
    }


async def final_register_reads(
    endpoints: Mapping[str, str],
    keys: Sequence[str],
    recorder: Recorder,
    *,
    first_process: int,
    timeout: float = 2.0,
) -> dict[str, dict[str, str | None]]:
    """Read every register on every node with LOCAL consistency, recording each read in the
    history as a ``read`` (one process per node from ``first_process``). Returns
    node -> key -> value (None when absent; nodes/keys whose read failed are left out)."""
    reads = await _final_local_reads(
        endpoints,
        keys,
        recorder,
        "read",
        lambda v: v.decode("utf-8", "replace") if isinstance(v, bytes) else None,
        first_process=first_process,
        timeout=timeout,
    )
    return {
        node: {k: v if isinstance(v, str) else None for k, v in got.items()}
        for node, got in reads.items()
    }
