"""Deterministic simulator for ``GossipCore`` clusters.

Theory of operation
-------------------
``Sim(seed)`` builds N cores on a virtual millisecond clock. Everything random comes from
one ``random.Random(seed)``, so a seed replays exactly. Time advances in ``tick_ms``
steps; in each step, due messages are delivered in (time, send order) order, then every
live node is ticked. After every call into a core its outputs are applied like a real
shell would: ``to_persist``/``collected`` go into the node's durable store first, then
the messages are handed to the network.

Network faults: per-message drop, duplication and random delay (which reorders), and
partitions of every shape (``halves``, ``isolated`` node, ``bridge`` node seeing both
halves, ``ring`` where each node only sees its ring neighbours). A partition drops a message
both when sent and when delivered across it.

Nodes: per-node clock skew (physical time = virtual time + skew); crashes lose everything
but the durable store; restart builds a fresh core from it (only what was persisted
survives). Client ops are recorded with their HLC timestamp and whether they were
acknowledged: an op is acknowledged after its ``Write.delta`` is in the durable store; a
crash injected between the core call and the persist leaves it unacknowledged (it then
never leaves the node: the core only sends on ``tick``).

``run_random(seed)`` is the randomized scenario used by the tests: faults + client load,
then heal everything and wait for convergence; ``check`` verifies the end state.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from gossip.core import GossipConfig, GossipCore, RequestTooOldError, ValueOutOfRangeError
from gossip.crdt import (
    Applied,
    Counter,
    Register,
    Value,
    WrongTypeError,
    is_reserved,
    merge_state,
)
from gossip.hlc import Timestamp
from gossip.messages import Message


@dataclass(slots=True)
class Op:
    """One client operation as seen by the client."""

    time_ms: int
    node: str
    kind: str  # put | delete | increment
    key: str
    value: bytes | None  # put value
    delta: int  # increment amount
    ts: Timestamp | None  # HLC timestamp assigned by the core (None if rejected)
    acked: bool
    rid: tuple[str, int] | None = None  # request id (exactly once across nodes)
    replayed: bool = False  # answered from the request's record: not applied again


@dataclass(slots=True)
class NetConfig:
    """Network fault parameters."""

    drop: float = 0.0
    dup: float = 0.0
    min_delay_ms: int = 1
    max_delay_ms: int = 20


@dataclass(slots=True)
class SimResult:
    """Outcome of ``run_random``."""

    seed: int
    converged_ms: int | None  # virtual ms from heal to identical digests (None = never)
    rounds: int | None  # the same in gossip rounds
    errors: list[str] = field(default_factory=list)
    ops: int = 0
    acked: int = 0
    collected: int = 0
    lww_overwrites: int = 0
    duplicates: int = 0  # the same request met applied on two nodes (merged as one)
    replays: int = 0  # requests answered from their record instead of applied again


class Sim:
    """A cluster of cores on a simulated network."""

    def __init__(
        self,
        seed: int,
        n_nodes: int = 3,
        config: GossipConfig | None = None,
        *,
        max_skew_ms: int = 300,
        tick_ms: int = 25,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.config = config or GossipConfig()
        self.nodes = [f"n{i}" for i in range(n_nodes)]
        self.skew = {n: self.rng.randint(-max_skew_ms, max_skew_ms) for n in self.nodes}
        self.tick_ms = tick_ms
        self.now = 1_000_000  # virtual ms (not 0, so skew keeps physical time positive)
        self.net = NetConfig()
        self.durable: dict[str, dict[str, Value]] = {n: {} for n in self.nodes}
        # the HLC high-water mark each node persisted with its last commit (as the shell
        # does): a restart never reissues a timestamp, also one no register kept
        self.durable_hlc: dict[str, Timestamp] = {}
        self.cores: dict[str, GossipCore | None] = {}
        self.blocked: set[frozenset[str]] = set()
        self.ops: list[Op] = []
        self._queue: list[tuple[int, int, Message]] = []
        self._qseq = 0
        self.restarts = 0
        for n in self.nodes:
            self.cores[n] = self._new_core(n)

    # ------------------------------------------------------------------ plumbing

    def phys(self, node: str) -> int:
        """Physical clock of ``node`` (virtual time + skew)."""
        return self.now + self.skew[node]

    def _new_core(self, node: str) -> GossipCore:
        return GossipCore(
            node,
            self.nodes,
            self.config,
            random.Random(self.rng.getrandbits(64)),
            state=dict(self.durable[node]),
            now_ms=self.phys(node),
            hlc_floor=self.durable_hlc.get(node),
        )

    def _flush(self, node: str) -> None:
        core = self.cores[node]
        assert core is not None
        out = core.take_outputs()
        store = self.durable[node]
        if out.to_persist or out.collected:
            self.durable_hlc[node] = core.hlc_now
        if out.to_persist:
            store.update(merge_state(store, out.to_persist))
        for k, ts in out.collected:
            v = store.get(k)
            if isinstance(v, Applied | Register) and v.ts == ts and _collectable(v):
                del store[k]
        for msg in out.messages:
            self._send(msg)

    def _send(self, msg: Message) -> None:
        if frozenset((msg.frm, msg.to)) in self.blocked:
            return
        if self.rng.random() < self.net.drop:
            return
        copies = 2 if self.rng.random() < self.net.dup else 1
        for _ in range(copies):
            delay = self.rng.randint(self.net.min_delay_ms, self.net.max_delay_ms)
            self._qseq += 1
            heapq.heappush(self._queue, (self.now + delay, self._qseq, msg))

    def advance(self, ms: int) -> None:
        """Run the cluster for ``ms`` virtual milliseconds."""
        end = self.now + ms
        while self.now < end:
            self.now += self.tick_ms
            while self._queue and self._queue[0][0] <= self.now:
                _, _, msg = heapq.heappop(self._queue)
                core = self.cores.get(msg.to)
                if core is None or frozenset((msg.frm, msg.to)) in self.blocked:
                    continue
                core.step(msg, self.phys(msg.to))
                self._flush(msg.to)
            for n in self.nodes:
                core = self.cores[n]
                if core is not None:
                    core.tick(self.phys(n))
                    self._flush(n)

    # ------------------------------------------------------------------ faults

    def partition(self, shape: str) -> None:
        """Install a partition: none | halves | isolated | bridge | ring."""
        nodes = list(self.nodes)
        self.rng.shuffle(nodes)
        allowed: Callable[[str, str], bool]
        if shape == "none" or len(nodes) < 2:
            self.blocked = set()
            return
        if shape == "halves":
            cut = self.rng.randint(1, len(nodes) - 1)
            side = {n: i < cut for i, n in enumerate(nodes)}
            allowed = lambda a, b: side[a] == side[b]  # noqa: E731
        elif shape == "isolated":
            lone = nodes[0]
            allowed = lambda a, b: lone not in (a, b)  # noqa: E731
        elif shape == "bridge":
            bridge, rest = nodes[0], nodes[1:]
            cut = max(1, len(rest) // 2)
            side = {n: i < cut for i, n in enumerate(rest)}
            allowed = lambda a, b: bridge in (a, b) or side[a] == side[b]  # noqa: E731
        elif shape == "ring":
            pos = {n: i for i, n in enumerate(nodes)}
            size = len(nodes)
            allowed = lambda a, b: (pos[a] - pos[b]) % size in (1, size - 1)  # noqa: E731
        else:
            raise ValueError(shape)
        self.blocked = {
            frozenset((a, b)) for a in self.nodes for b in self.nodes if a < b and not allowed(a, b)
        }

    def crash(self, node: str) -> None:
        """Stop ``node``; only its durable store survives."""
        self.cores[node] = None

    def restart(self, node: str) -> None:
        """Start ``node`` again from its durable store."""
        if self.cores[node] is None:
            self.restarts += 1
            self.cores[node] = self._new_core(node)

    def heal(self) -> None:
        """Remove partitions and network faults, restart crashed nodes."""
        self.blocked = set()
        self.net = NetConfig()
        for n in self.nodes:
            self.restart(n)

    # ------------------------------------------------------------------ client

    def client_op(
        self,
        node: str,
        kind: str,
        key: str,
        value: bytes = b"",
        delta: int = 0,
        crash: bool = False,
        rid: tuple[str, int] | None = None,
        crash_after_persist: bool = False,
    ) -> Op:
        """Run one client op on ``node``; ``crash=True`` crashes it before the persist,
        ``crash_after_persist`` after it (durable, but never acknowledged). With ``rid``
        the node first looks the request up, as the shell does."""
        core = self.cores[node]
        assert core is not None
        phys = self.phys(node)
        op = Op(self.now, node, kind, key, value if kind == "put" else None, delta, None, False)
        op.rid = rid
        try:
            rec = None if rid is None else core.lookup(*rid)
            if rec is not None and rid is not None:
                # answered from the record (the shell waits until it is durable here)
                self.durable[node][_rid_key(rid)] = rec
                op.ts, op.acked, op.replayed = rec.ts, True, True
                self.ops.append(op)
                return op
            if kind == "put":
                w = core.put(key, value, phys, rid)
            elif kind == "delete":
                w = core.delete(key, phys, rid)
            else:
                w = core.increment(key, delta, phys, rid)
        except (WrongTypeError, ValueOutOfRangeError, RequestTooOldError):
            self.ops.append(op)
            return op
        op.ts = w.ts
        if crash:
            self.crash(node)
        else:
            store = self.durable[node]
            store.update(merge_state(store, w.delta))
            self.durable_hlc[node] = core.hlc_now
            if crash_after_persist:
                self.flush_then_crash(node)
            else:
                op.acked = True
        self.ops.append(op)
        return op

    def flush_then_crash(self, node: str) -> None:
        """Crash ``node`` right after its last write became durable, before it answered
        (its messages, queued for the next tick, are lost)."""
        self.crash(node)

    # ------------------------------------------------------------------ observation

    def live(self) -> list[GossipCore]:
        """Running cores."""
        return [c for c in self.cores.values() if c is not None]

    def converged(self) -> bool:
        """All nodes running with identical digests."""
        cores = self.live()
        return len(cores) == len(self.nodes) and len({c.digest() for c in cores}) == 1

    def wait_converged(self, max_ms: int, step_ms: int = 100) -> int | None:
        """Advance until converged; virtual ms waited, or None if not within ``max_ms``."""
        waited = 0
        while not self.converged():
            if waited >= max_ms:
                return None
            self.advance(step_ms)
            waited += step_ms
        return waited

    def check(self) -> list[str]:
        """End-state invariants against the acknowledged client history."""
        errors: list[str] = []
        best: dict[str, Op] = {}
        sums: dict[str, int] = {}
        last_ts: dict[str, Timestamp] = {}
        counted: set[tuple[str, int]] = set()  # request ids whose effect is counted once
        for op in self.ops:
            if not op.acked or op.ts is None:
                continue
            if op.rid is not None:
                if op.rid in counted:
                    continue
                counted.add(op.rid)
                if op.replayed:
                    # its effect is the first application's (acknowledged or not)
                    first = next(
                        o
                        for o in self.ops
                        if o.rid == op.rid and o.ts is not None and not o.replayed
                    )
                    if op.kind == "increment":
                        sums[op.key] = sums.get(op.key, 0) + first.delta
                    continue
            if op.replayed:
                continue
            prev = last_ts.get(op.node)
            if prev is not None and op.ts <= prev:
                errors.append(f"HLC not monotonic on {op.node}: {op.ts} after {prev}")
            last_ts[op.node] = op.ts
            if op.kind == "increment":
                sums[op.key] = sums.get(op.key, 0) + op.delta
            else:
                cur = best.get(op.key)
                if cur is None or (cur.ts is not None and op.ts > cur.ts):
                    best[op.key] = op
        for core in self.live():
            st = core.state()
            for key, op in best.items():
                v = st.get(key)
                if op.kind == "delete":
                    if v is not None and not (isinstance(v, Register) and v.value is None):
                        errors.append(f"{core.node_id}: deleted key {key} came back as {v}")
                elif not isinstance(v, Register) or v.value != op.value or v.ts != op.ts:
                    errors.append(f"{core.node_id}: {key}={v}, expected {op.value!r}@{op.ts}")
            for key, total in sums.items():
                v = st.get(key)
                got = v.value if isinstance(v, Counter) else None
                if got != total:
                    errors.append(f"{core.node_id}: counter {key}={got}, expected {total}")
            for key in st:
                if is_reserved(key):
                    continue
                if key not in best and key not in sums:
                    errors.append(f"{core.node_id}: key {key} has no acknowledged write")
        return errors


def _collectable(v: Value) -> bool:
    return isinstance(v, Applied) or (isinstance(v, Register) and v.value is None)


def _rid_key(rid: tuple[str, int]) -> str:
    from gossip.crdt import applied_key

    return applied_key(*rid)


REG_KEYS = tuple(f"r{i}" for i in range(6))
CNT_KEYS = tuple(f"c{i}" for i in range(3))
SHAPES = ("none", "halves", "isolated", "bridge", "ring")


def sim_config(rng: random.Random) -> GossipConfig:
    """Config used by the randomized scenario: production timings, small Merkle tree,
    tombstones collectable after 1 s (network delay is bounded by 100 ms here)."""
    return GossipConfig(
        merkle_depth=rng.choice((1, 2, 3)),
        tombstone_min_age_ms=1000,
        delta_log_max=rng.choice((4, 1000)),  # small log exercises the "behind" path
        delta_batch_max=rng.choice((2, 1000)),
    )


def run_random(
    seed: int, *, fault_ms: int = 2000, converge_max_ms: int = 20_000, settle_ms: int = 1500
) -> SimResult:
    """Random faults and client load, then heal and converge; returns checked result."""
    pick = random.Random(seed ^ 0x5EED)
    n = pick.randint(2, 5)
    sim = Sim(seed, n, sim_config(pick))
    rng = sim.rng
    deleted: set[str] = set()
    seqs: dict[str, int] = {}
    elapsed = 0
    while elapsed < fault_ms:
        # nemesis: change faults every ~250 ms
        sim.partition(rng.choice(SHAPES))
        sim.net = NetConfig(
            drop=rng.choice((0.0, 0.05, 0.3)),
            dup=rng.choice((0.0, 0.1)),
            max_delay_ms=rng.choice((5, 50, 100)),
        )
        for node in sim.nodes:
            if sim.cores[node] is None:
                if rng.random() < 0.5:
                    sim.restart(node)
            elif rng.random() < 0.08:
                sim.crash(node)
        for _ in range(rng.randint(0, 6)):
            live = [x for x in sim.nodes if sim.cores[x] is not None]
            if not live:
                break
            node = rng.choice(live)
            crash = rng.random() < 0.03
            r = rng.random()
            if r < 0.5:
                key = rng.choice(REG_KEYS)
                sim.client_op(
                    node, "put", key, value=f"{seed}-{len(sim.ops)}".encode(), crash=crash
                )
            elif r < 0.65:
                key = rng.choice(REG_KEYS)
                op = sim.client_op(node, "delete", key, crash=crash)
                if op.acked:
                    deleted.add(key)
            elif r < 0.85:
                key = rng.choice(CNT_KEYS)
                sim.client_op(node, "increment", key, delta=rng.randint(-5, 10), crash=crash)
            else:
                # exactly once across nodes: a request id; the node may die after making
                # the increment durable, before answering, and the client retries on
                # another node at once (which has not heard of it yet)
                key = rng.choice(CNT_KEYS)
                seqs[node] = seqs.get(node, 0) + 1
                rid = (f"client-{node}", seqs[node])
                d = rng.randint(-5, 10)
                died = rng.random() < 0.5
                first = sim.client_op(node, "increment", key, delta=d, rid=rid,
                                      crash_after_persist=died)  # fmt: skip
                if died or rng.random() < 0.3:
                    others = [x for x in sim.nodes if x != node or not died]
                    other = rng.choice(others)
                    sim.restart(other)
                    retry = sim.client_op(other, "increment", key, delta=d, rid=rid)
                    assert retry.acked or first.ts is None, "a retry must be answered"
            sim.advance(rng.choice((0, 25, 50)))
        sim.advance(250)
        elapsed += 250
    sim.heal()
    waited = sim.wait_converged(converge_max_ms)
    res = SimResult(seed, waited, None if waited is None else waited // 100)
    res.ops = len(sim.ops)
    res.acked = sum(op.acked for op in sim.ops)
    if waited is None:
        res.errors.append(f"no convergence within {converge_max_ms} ms after heal")
    res.errors += sim.check()
    # let tombstones be collected, then the replicas must agree again
    sim.advance(settle_ms)
    if sim.wait_converged(converge_max_ms) is None:
        res.errors.append("no convergence after tombstone collection")
    res.errors += sim.check()
    res.collected = sum(c.stats.tombstones_collected for c in sim.live())
    res.lww_overwrites = sum(c.stats.lww_overwrites for c in sim.live())
    res.duplicates = sum(c.stats.duplicates_merged for c in sim.live())
    res.replays = sum(op.replayed for op in sim.ops)
    return res
