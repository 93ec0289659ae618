"""Deterministic simulator of gossip clusters: the production core, commit path and codec.

Theory of operation
-------------------
``Sim(seed)`` builds N nodes on a virtual millisecond clock. Everything random comes from
one ``random.Random(seed)``, so a seed replays exactly. Each node is what the asyncio node
runs, minus asyncio and gRPC: a ``GossipCore``, the node's ``Pipeline`` (open batch,
take/commit/finish, keys not yet durable) and ``GossipStorage`` on a ``SimDisk``. Time
advances in ``tick_ms`` steps; in each step due messages are delivered in (time, send
order) order, then every running node is ticked; after each call into a core the node
collects its outputs and commits them (one group commit), and only a finished batch
acknowledges its client writes and hands its messages to the network. Messages travel
encoded (``gossip.codec`` to protobuf bytes and back), as on the wire.

Network faults: per-message drop, duplication and random delay (which reorders), and
partitions of every shape (``halves``, ``isolated`` node, ``bridge`` node seeing both
halves, ``ring`` where each node only sees its ring neighbours). A partition drops a
message both when sent and when delivered across it.

Node faults: wall clocks set forward or back by up to a day; crash (the node keeps only
what its SimDisk keeps after a power loss: unsynced writes lost or torn); crash in the
middle of a commit or a compaction (``SimDisk.crash_after``); a full disk (the batch is
held and retried, new writes are refused, as the node does); an fsync error (fatal: the
node stops and later restarts from its disk); event-loop stalls (no ticks, deliveries
wait); clock skew.

Client ops are recorded with their HLC timestamp and outcome: *acked* once their batch
is finished; *maybe* when the node crashed after their batch may have reached the disk
(a torn commit, or a crash between commit and answer): such a write may or may not be
in effect. ``check`` verifies the end state against that history, and every restart
verifies that the disk kept every acknowledged write of the node.

``run_random(seed)`` is the randomized scenario used by the tests: faults + client load,
then heal everything and wait for convergence; ``check`` verifies the end state.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from caplab.disk import SimCrash, SimDisk
from caplab.gossip.v1 import gossip_pb2 as pb
from gossip.codec import from_pb, to_pb
from gossip.core import (
    GossipConfig,
    GossipCore,
    RequestTooOldError,
    ValueOutOfRangeError,
    Write,
)
from gossip.crdt import (
    Counter,
    Register,
    Value,
    WrongTypeError,
    applied_key,
    encode_value,
    is_reserved,
    merge_value,
)
from gossip.hlc import Timestamp
from gossip.messages import Message
from gossip.pipeline import Batch, Pipeline
from gossip.storage import DiskFullError, GossipStorage, StorageError

DATA = "/data"


@dataclass(slots=True, eq=False)
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
    maybe: bool = False  # not acknowledged, but may be durable (crash during its commit)
    effect: Value | None = None  # what it wrote to its key (checked at every restart)


@dataclass(slots=True)
class NetConfig:
    """Network fault parameters."""

    drop: float = 0.0
    dup: float = 0.0
    min_delay_ms: int = 1
    max_delay_ms: int = 20


@dataclass(slots=True)
class DiskConfig:
    """How the storage of every node is set up (small sizes exercise compaction)."""

    compact_min_bytes: int = 1 << 20
    prealloc_bytes: int = 1 << 20


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
    crashes: int = 0  # SimCrash in the middle of a disk operation
    disk_full: int = 0  # commits refused for lack of space (then retried)
    fatal: int = 0  # nodes stopped by a storage error
    compactions: int = 0
    records_collected: int = 0  # Applied records collected (their client moved on)
    stalls: int = 0  # event-loop stalls
    clock_steps: int = 0  # a node's wall clock set forward or back (up to a day)
    big_values: int = 0  # acknowledged puts of 100 KiB or more


@dataclass(slots=True, eq=False)
class _Node:
    disk: SimDisk
    core: GossipCore | None = None
    pipe: Pipeline | None = None
    held: Batch | None = None  # refused for lack of space: committed again first
    stalled_until: int = 0  # event loop stalled: no ticks, deliveries wait
    failed: bool = False  # stopped by a fatal storage error (restarts later)


class Sim:
    """A cluster of gossip nodes (core + commit path + storage) on a simulated network."""

    def __init__(
        self,
        seed: int,
        n_nodes: int = 3,
        config: GossipConfig | None = None,
        *,
        max_skew_ms: int = 300,
        tick_ms: int = 25,
        disk: DiskConfig | None = None,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.config = config or GossipConfig()
        self.disk_config = disk or DiskConfig()
        self.nodes = [f"n{i}" for i in range(n_nodes)]
        self.skew = {n: self.rng.randint(-max_skew_ms, max_skew_ms) for n in self.nodes}
        self.tick_ms = tick_ms
        self.now = 1_000_000  # virtual ms (not 0, so skew keeps physical time positive)
        self.net = NetConfig()
        self.blocked: set[frozenset[str]] = set()
        self.ops: list[Op] = []
        self.errors: list[str] = []  # found while running (durability at restarts)
        self._queue: list[tuple[int, int, str, bytes]] = []  # (due, seq, to, encoded)
        self._qseq = itertools.count()
        self.restarts = 0
        self.stats = SimResult(seed, None, None)
        self.n: dict[str, _Node] = {
            x: _Node(SimDisk(random.Random(self.rng.getrandbits(64)))) for x in self.nodes
        }
        for x in self.nodes:
            self._start(x)

    # ------------------------------------------------------------------ plumbing

    @property
    def cores(self) -> dict[str, GossipCore | None]:
        """Running cores by node (None: crashed)."""
        return {x: nd.core for x, nd in self.n.items()}

    def phys(self, node: str) -> int:
        """Physical clock of ``node`` (virtual time + skew)."""
        return self.now + self.skew[node]

    def _start(self, node: str) -> None:
        nd = self.n[node]
        nd.disk.disarm()
        nd.disk.full = False
        dc = self.disk_config
        storage = GossipStorage(
            DATA, disk=nd.disk, compact_min_bytes=dc.compact_min_bytes,
            prealloc_bytes=dc.prealloc_bytes, rng=self.rng,
        )  # fmt: skip
        loaded = storage.load()
        if loaded.corrupt:
            self.errors.append(f"{node}: storage refused records after a crash: {loaded.corrupt}")
        self._check_durable(node, loaded.state)
        core = GossipCore(
            node,
            self.nodes,
            self.config,
            random.Random(self.rng.getrandbits(64)),
            state=loaded.state,
            now_ms=self.now,
            wall_ms=self.phys(node),
            hlc_floor=loaded.hlc,
            component=f"{node}/{loaded.epoch}" if loaded.epoch else node,
        )
        nd.core, nd.pipe, nd.held, nd.failed = core, Pipeline(core, storage), None, False

    def _check_durable(self, node: str, state: dict[str, Value]) -> None:
        """Every write this node acknowledged is on its disk (or superseded there)."""
        for op in self.ops:
            if op.node != node or not op.acked or op.effect is None or op.replayed:
                continue
            v = state.get(op.key)
            if v is None:
                if op.kind != "increment":
                    continue  # a tombstone (this one or a later one) was collected
                self.errors.append(f"{node}: acknowledged {op.kind} of {op.key} lost at restart")
            elif encode_value(merge_value(v, op.effect)) != encode_value(v):
                self.errors.append(
                    f"{node}: acknowledged {op.kind} of {op.key} lost at restart: "
                    f"disk has {v}, the write was {op.effect}"
                )

    def _flush(self, node: str) -> None:
        """Collect the core's outputs and commit them (held batches first)."""
        nd = self.n[node]
        if nd.pipe is None:
            return
        nd.pipe.collect()
        self._commit(node)

    def _commit(self, node: str) -> None:
        nd = self.n[node]
        while nd.pipe is not None and (nd.held is not None or nd.pipe.batch):
            b = nd.held or nd.pipe.take()
            nd.held = None
            try:
                nd.pipe.commit(b)
            except DiskFullError:
                self.stats.disk_full += 1
                nd.held = b  # retried at the next flush; its writes wait
                return
            except SimCrash:
                self.stats.crashes += 1
                self._lost(node, b)
                return
            except StorageError:
                self.stats.fatal += 1  # (an fsync error): the node stops
                self._lost(node, b)
                nd.failed = True
                return
            for op in b.tag or ():
                op.acked = True
            for m in nd.pipe.finish(b):
                self._send(m)

    def _lost(self, node: str, b: Batch | None) -> None:
        """The node crashed while ``b`` was being committed: its writes may be durable."""
        for op in (b.tag if b is not None else None) or ():
            op.maybe = True
        self.crash(node)

    def _send(self, msg: Message) -> None:
        """Hand ``msg`` to the network, encoded as on the wire."""
        frm, to = msg.frm, msg.to
        if frozenset((frm, to)) in self.blocked:
            return
        raw = to_pb(msg).SerializeToString()
        if self.rng.random() < self.net.drop:
            return
        copies = 2 if self.rng.random() < self.net.dup else 1
        for _ in range(copies):
            delay = self.rng.randint(self.net.min_delay_ms, self.net.max_delay_ms)
            heapq.heappush(self._queue, (self.now + delay, next(self._qseq), to, raw))

    def advance(self, ms: int) -> None:
        """Run the cluster for ``ms`` virtual milliseconds."""
        end = self.now + ms
        while self.now < end:
            self.now += self.tick_ms
            later: list[tuple[int, int, str, bytes]] = []
            while self._queue and self._queue[0][0] <= self.now:
                item = heapq.heappop(self._queue)
                _, _, to, raw = item
                nd = self.n[to]
                if nd.core is None:
                    continue
                if nd.stalled_until > self.now:
                    later.append((nd.stalled_until, item[1], to, raw))
                    continue
                msg = from_pb(pb.GossipMessage.FromString(raw))
                if frozenset((msg.frm, msg.to)) in self.blocked:
                    continue
                nd.core.step(msg, self.now, wall_ms=self.phys(to))
                self._flush(to)
            for item in later:
                heapq.heappush(self._queue, item)
            for x in self.nodes:
                nd = self.n[x]
                if nd.core is not None and nd.stalled_until <= self.now:
                    nd.core.tick(self.now, wall_ms=self.phys(x))
                    self._flush(x)

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
        """Power loss: the node keeps only what its disk keeps."""
        nd = self.n[node]
        if nd.core is None:
            return
        if nd.held is not None:
            for op in nd.held.tag or ():  # refused for lack of space: never durable
                op.maybe = False
        nd.core = nd.pipe = nd.held = None
        nd.disk = nd.disk.crash()

    def restart(self, node: str) -> None:
        """Start ``node`` again from its disk."""
        if self.n[node].core is None:
            self.restarts += 1
            self._start(node)

    def stall(self, node: str, ms: int) -> None:
        """The node's event loop stalls for ``ms``: no ticks; deliveries wait."""
        self.n[node].stalled_until = self.now + ms
        self.stats.stalls += 1

    def heal(self) -> None:
        """Remove partitions, network and disk faults; restart crashed nodes."""
        self.blocked = set()
        self.net = NetConfig()
        for x in self.nodes:
            nd = self.n[x]
            nd.stalled_until = 0
            nd.disk.full = False
            nd.disk.disarm()
            if nd.failed:
                self.crash(x)
            self.restart(x)
            self._flush(x)

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
        """Run one client op on ``node`` as the node would: look the request up, refuse
        it while the disk is full, apply it, commit. ``crash=True`` crashes the node
        before the commit, ``crash_after_persist`` after it (durable, never answered)."""
        nd = self.n[node]
        core, pipe = nd.core, nd.pipe
        assert core is not None and pipe is not None
        op = Op(self.now, node, kind, key, value if kind == "put" else None, delta, None, False)
        op.rid = rid
        self.ops.append(op)
        if nd.held is not None or nd.failed:
            return op  # refused: the disk is full (definitely not applied)
        try:
            rec = None if rid is None else core.lookup(*rid)
            if rec is not None and rid is not None:
                # answered from the record, once it is durable here (as the node does)
                if applied_key(*rid) in pipe.unsynced:
                    self._commit(node)
                    if nd.core is None or applied_key(*rid) in pipe.unsynced:
                        return op  # crashed or disk full meanwhile: no answer
                op.ts, op.acked, op.replayed = rec.ts, True, True
                return op
            w: Write
            now, wall = self.now, self.phys(node)
            if kind == "put":
                w = core.put(key, value, now, rid, wall_ms=wall)
            elif kind == "delete":
                w = core.delete(key, now, rid, wall_ms=wall)
            else:
                w = core.increment(key, delta, now, rid, wall_ms=wall)
        except (WrongTypeError, ValueOutOfRangeError, RequestTooOldError):
            return op
        op.ts, op.effect = w.ts, w.delta[key]
        b = pipe.add_write(w)
        b.tag = [*(b.tag or ()), op]
        if crash:
            self.crash(node)  # before the commit: never durable
            return op
        if crash_after_persist:
            pipe.collect()
            b = pipe.take()
            try:
                pipe.commit(b)
            except (DiskFullError, SimCrash, StorageError):
                pass
            self._lost(node, b)  # durable (unless the commit failed), never answered
            return op
        self._flush(node)
        return op

    # ------------------------------------------------------------------ observation

    def durable(self, node: str) -> Mapping[str, Value]:
        """What ``node`` (running) has on its disk."""
        pipe = self.n[node].pipe
        assert pipe is not None, f"{node} is down"
        return pipe.storage.state

    def live(self) -> list[GossipCore]:
        """Running cores."""
        return [nd.core for nd in self.n.values() if nd.core is not None]

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
        """End-state invariants against the client history (see the module docstring)."""
        errors = list(self.errors)
        last_ts: dict[str, Timestamp] = {}
        regs: dict[str, list[Op]] = {}  # key -> register writes that may be in effect
        sure: dict[str, int] = {}  # counter -> sum of increments surely in effect
        unsure: dict[str, list[int]] = {}  # counter -> deltas that may be in effect
        first: dict[tuple[str, int], Op] = {}  # request id -> its first application
        for op in self.ops:
            if op.rid is not None and op.ts is not None and not op.replayed:
                first.setdefault(op.rid, op)
        resolved: dict[tuple[str, int], bool] = {}  # request id -> surely in effect
        # A timestamp issued again (after a restart) proves that the write which had it
        # was not durable: the restarted node's clock starts above everything on its disk.
        # So a maybe-write whose timestamp was reused is not in effect, and an
        # acknowledged write's timestamp must never be issued again.
        issued: dict[Timestamp, list[Op]] = {}
        for op in self.ops:
            if op.ts is not None and not op.replayed and (op.acked or op.maybe):
                issued.setdefault(op.ts, []).append(op)
        gone: set[int] = set()
        for ts, ops in issued.items():
            if len(ops) > 1:
                for earlier in ops[:-1]:
                    if earlier.acked:
                        errors.append(f"timestamp {ts} of an acknowledged write issued again")
                    gone.add(id(earlier))
        for op in self.ops:
            if op.ts is None or not (op.acked or op.maybe) or id(op) in gone:
                continue
            if op.acked and not op.replayed:
                prev = last_ts.get(op.node)
                if prev is not None and op.ts <= prev:
                    errors.append(f"HLC not monotonic on {op.node}: {op.ts} after {prev}")
                last_ts[op.node] = op.ts
            if op.rid is not None and op.kind == "increment":
                resolved[op.rid] = resolved.get(op.rid, False) or op.acked
                continue
            if op.replayed:
                continue
            if op.kind == "increment":
                if op.acked:
                    sure[op.key] = sure.get(op.key, 0) + op.delta
                else:
                    unsure.setdefault(op.key, []).append(op.delta)
            else:
                regs.setdefault(op.key, []).append(op)
        for rid, surely in resolved.items():  # each request counts once, whoever applied it
            op = first[rid]
            if surely:
                sure[op.key] = sure.get(op.key, 0) + op.delta
            else:
                unsure.setdefault(op.key, []).append(op.delta)
        for core in self.live():
            st = core.state()
            for key, cands in regs.items():
                errors += _check_register(core.node_id, key, st.get(key), cands)
            for key in sure.keys() | unsure.keys():
                v = st.get(key)
                got = v.value if isinstance(v, Counter) else 0
                possible = _sums(sure.get(key, 0), unsure.get(key, []))
                if got not in possible:
                    want = sure.get(key, 0)
                    errors.append(
                        f"{core.node_id}: counter {key}={got}, expected {want}"
                        + (f" plus some of {unsure[key]}" if key in unsure else "")
                    )
            for key in st:
                if not (is_reserved(key) or key in regs or key in sure or key in unsure):
                    errors.append(f"{core.node_id}: key {key} has no write in effect")
        return errors


def _check_register(node: str, key: str, v: Value | None, cands: list[Op]) -> list[str]:
    """``v`` must be the newest acknowledged write of ``key`` or a newer maybe-write."""
    acked = [o for o in cands if o.acked and o.ts is not None]
    floor = max((o.ts for o in acked if o.ts is not None), default=None)
    allowed = [o for o in cands if o.ts is not None and (floor is None or o.ts >= floor)]
    if v is None:  # absent: never written, or a collected tombstone
        if not acked or any(o.kind == "delete" for o in allowed):
            return []
        return [f"{node}: {key} is absent, expected {acked[-1].value!r}@{floor}"]
    if not isinstance(v, Register):
        return [f"{node}: {key} holds {v}, expected a register"]
    for o in allowed:
        if o.ts == v.ts:
            want = None if o.kind == "delete" else o.value
            if v.value == want:
                return []
            return [f"{node}: {key}={v}, but the write at {o.ts} was {want!r}"]
    if v.value is None:
        return [f"{node}: {key} deleted at {v.ts}, expected {acked[-1].value!r}@{floor}"]
    return [f"{node}: {key}={v.value!r}@{v.ts}, expected the write at {floor} or later"]


def _sums(base: int, maybe: list[int]) -> set[int]:
    """Every total of ``base`` plus a subset of ``maybe`` (few: crashes are rare)."""
    out = {base}
    for d in maybe[:16]:
        out |= {s + d for s in out}
    return out


REG_KEYS = tuple(f"r{i}" for i in range(6))
CNT_KEYS = tuple(f"c{i}" for i in range(3))
SHAPES = ("none", "halves", "isolated", "bridge", "ring")
BIG = 1 << 20
HOUR = 3_600_000
DAY = 24 * HOUR


def sim_config(rng: random.Random) -> GossipConfig:
    """Config used by the randomized scenario: production timings, small Merkle tree,
    tombstones collectable after 1 s (network delay is bounded by 100 ms here), and
    sometimes small message budgets (a value or two per message)."""
    return GossipConfig(
        merkle_depth=rng.choice((1, 2, 3)),
        tombstone_min_age_ms=1000,
        delta_log_max=rng.choice((4, 1000)),  # small log exercises the "behind" path
        delta_batch_max=rng.choice((2, 1000)),
        max_message_bytes=rng.choice((300, 4096, 1 << 20)),
        # small windows and TTLs: records are collected while the faults go on
        dedup_window=rng.choice((1, 3, 128)),
        dedup_ttl_ms=rng.choice((1500, 3_600_000)),
    )


def run_random(
    seed: int, *, fault_ms: int = 2000, converge_max_ms: int = 20_000, settle_ms: int = 1500
) -> SimResult:
    """Random faults and client load, then heal and converge; returns checked result."""
    pick = random.Random(seed ^ 0x5EED)
    n = pick.randint(2, 5)
    cfg = sim_config(pick)
    disk = DiskConfig(
        compact_min_bytes=pick.choice((2048, 1 << 20)), prealloc_bytes=pick.choice((512, 1 << 16))
    )
    big_values = pick.random() < 0.1  # some seeds write values up to 1 MiB
    disk_faults = pick.random() < 0.5
    sim = Sim(seed, n, cfg, disk=disk)
    rng = sim.rng
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
            nd = sim.n[node]
            if nd.core is None or nd.failed:
                if rng.random() < 0.5:
                    sim.crash(node)
                    sim.restart(node)
                continue
            r = rng.random()
            if r < 0.06:
                sim.crash(node)
            elif r < 0.1:
                sim.stall(node, rng.choice((100, 500, 2000)))
            elif r < 0.12:
                # the wall clock is set forward or back (Admin skew, NTP step): up to a day
                sim.skew[node] = rng.choice((0, -DAY, -HOUR, -61_000, 61_000, HOUR, DAY))
                sim.stats.clock_steps += 1
            elif disk_faults:
                r = rng.random()
                if r < 0.05:
                    nd.disk.full = True  # ENOSPC until cleared
                elif r < 0.3 and nd.disk.full:
                    nd.disk.full = False
                elif r < 0.33:
                    nd.disk.fail_next("fsync", errno.EIO)
                elif r < 0.38:
                    nd.disk.crash_after(rng.randint(0, 6))
        for _ in range(rng.randint(0, 6)):
            live = [x for x in sim.nodes if sim.n[x].core is not None and not sim.n[x].failed]
            if not live:
                break
            node = rng.choice(live)
            crash = rng.random() < 0.03
            r = rng.random()
            if r < 0.5:
                key = rng.choice(REG_KEYS)
                value = f"{seed}-{len(sim.ops)}".encode()
                if big_values and rng.random() < 0.1:
                    value = value * (rng.randint(BIG // 8, BIG) // len(value))
                sim.client_op(node, "put", key, value=value, crash=crash)
            elif r < 0.65:
                sim.client_op(node, "delete", rng.choice(REG_KEYS), crash=crash)
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
                sim.client_op(node, "increment", key, delta=d, rid=rid, crash_after_persist=died)
                if died or rng.random() < 0.3:
                    others = [
                        x
                        for x in sim.nodes
                        if (x != node or not died) and sim.n[x].core is not None
                    ]
                    if others:
                        sim.client_op(rng.choice(others), "increment", key, delta=d, rid=rid)
            if sim.n[node].core is None:
                continue
            sim.advance(rng.choice((0, 25, 50)))
        sim.advance(250)
        elapsed += 250
    sim.heal()
    waited = sim.wait_converged(converge_max_ms)
    res = sim.stats
    res.converged_ms, res.rounds = waited, None if waited is None else waited // 100
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
    cores = sim.live()
    res.collected = sum(c.stats.tombstones_collected for c in cores)
    res.lww_overwrites = sum(c.stats.lww_overwrites for c in cores)
    res.duplicates = sum(c.stats.duplicates_merged for c in cores)
    res.records_collected = sum(c.stats.records_collected for c in cores)
    res.replays = sum(op.replayed for op in sim.ops)
    res.big_values = sum(op.acked and len(op.value or b"") >= 100 << 10 for op in sim.ops)
    res.compactions = sum(
        nd.pipe.storage.compactions for nd in sim.n.values() if nd.pipe is not None
    )
    return res
