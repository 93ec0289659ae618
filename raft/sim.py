"""Deterministic in-process simulator for ``RaftCore`` clusters.

Theory of operation
-------------------
N ``RaftCore`` nodes live in one process and share one seeded ``random.Random``; time is a
virtual tick counter. Each tick: the nemesis may change faults, messages due this tick are
delivered (or dropped if their directed link is not in ``allowed``), every live node ticks,
clients invoke operations, and then every live node's ``Ready`` is processed exactly as the
real shell must: persist (into ``Durable``), send (into the network, with random drop,
duplication and delay, hence reordering), restore/apply, serve reads, ``advance``.

A crash discards the core and everything not persisted; a restart builds a new core from the
node's ``Durable`` state only. Clients drive a key/value register state machine (``put`` of
unique values, ``get``) through ``propose`` and ``read_index``; every operation is recorded as a
``harness.history.Operation`` with logical invoke/complete times (a global event counter).

Invariants are checked as the run goes and raise ``InvariantViolation`` with a message:
election safety, log matching, leader completeness, state machine safety, monotonic commit
(in memory and durable). At the end the client history is checked for linearizability with
``harness.checker.linearizable.check_register``.
"""

from __future__ import annotations

import heapq
import json
import math
import random
from dataclasses import dataclass, field, replace

from harness.checker.linearizable import check_register
from harness.history import Operation
from raft.core import RaftConfig, RaftCore, Ready, Role
from raft.messages import Append, Entry, EntryKind, HardState, Message, Snapshot


class InvariantViolation(AssertionError):
    """A safety or liveness property of the cluster was violated."""


@dataclass(slots=True)
class SimConfig:
    """Knobs of one simulated run."""

    n_nodes: int = 3
    fault_ticks: int = 200  #: ticks with faults active.
    heal_limit: int = 200  #: after healing, a new write must commit within this many ticks.
    drain_ticks: int = 40  #: ticks without new operations at the end.
    drop: float = 0.05  #: per-message drop probability (fault phase).
    dup: float = 0.03  #: per-message duplication probability (fault phase).
    max_delay: int = 3  #: messages take 1..max_delay ticks.
    nemesis_rate: float = 0.04  #: per-tick probability of a fault change.
    op_rate: float = 0.5  #: per-tick probability a free client invokes an operation.
    clients: int = 4
    keys: int = 3
    compact_every: int = 25  #: compact when this many entries applied past the snapshot.
    #: per-Ready probability (fault phase) of crashing after the early Appends left but
    #: before the Ready was persisted (the shell sends Appends in parallel with its fsync).
    crash_mid_ready: float = 0.005
    #: a Ready's fsync takes up to this many ticks (0: synchronous); meanwhile the node keeps
    #: receiving messages, and a crash loses the Ready.
    disk_ticks: int = 0
    raft: RaftConfig = field(default_factory=lambda: RaftConfig(election_ticks=10))


@dataclass(slots=True)
class Durable:
    """What a node has fsynced: it survives crashes, nothing else does."""

    hs: HardState = field(default_factory=lambda: HardState(0, None, 0))
    snapshot: Snapshot | None = None
    entries: list[Entry] = field(default_factory=list)  #: dense, after the snapshot.


@dataclass(slots=True)
class _Op:
    process: int
    node: str
    f: str  # "write" | "read"
    key: str
    value: str | None
    invoke: int
    result: str | None = None
    type: str = "pending"
    complete: float = math.inf


@dataclass(slots=True)
class SimNode:
    """A simulated node: durable state plus (when up) a core and its state machine."""

    id: str
    durable: Durable = field(default_factory=Durable)
    core: RaftCore | None = None
    kv: dict[str, str] = field(default_factory=dict)
    applied: int = 0
    pending_puts: dict[int, _Op] = field(default_factory=dict)  #: log index -> op
    pending_reads: dict[int, _Op] = field(default_factory=dict)  #: request id -> op
    ready_reads: list[tuple[int, _Op]] = field(default_factory=list)  #: (index, op)
    commit_seen: int = 0
    recorded_commit: int = 0
    #: a Ready whose fsync is still running (asynchronous disk), and when it completes.
    writing: Ready | None = None
    write_done_at: int = 0


class Simulator:
    """One deterministic run; see the module docstring."""

    def __init__(self, seed: int, cfg: SimConfig | None = None) -> None:
        self.seed = seed
        self.cfg = cfg or SimConfig()
        self.rng = random.Random(seed)
        self.ids = [f"n{i + 1}" for i in range(self.cfg.n_nodes)]
        self.nodes = {i: SimNode(i) for i in self.ids}
        self.link_list = [(a, b) for a in self.ids for b in self.ids if a != b]
        self.all_links = frozenset(self.link_list)
        self.allowed: frozenset[tuple[str, str]] = self.all_links
        self.drop = self.cfg.drop
        self.dup = self.cfg.dup
        self.now = 0
        self._faults = False
        self.clock = 0  # logical event counter for operation times
        self.net: list[tuple[int, int, Message]] = []
        self.seq = 0
        self.ops: list[_Op] = []
        self.busy: dict[int, _Op] = {}
        self.next_value = 0
        self.next_rid = 0
        self.leaders: dict[int, str] = {}  # term -> leader (election safety)
        self.completeness_checked: set[int] = set()
        self.entry_at: dict[tuple[int, int], Entry] = {}  # (index, term) -> entry
        self.applied_at: dict[int, Entry] = {}  # index -> entry applied (SM safety)
        self.committed_term: dict[int, int] = {}  # index -> term of committed entry
        self.max_committed = 0
        self.log: list[str] = []
        for i in self.ids:
            self._start(i)

    # ------------------------------------------------------------------ lifecycle
    def _start(self, nid: str) -> None:
        n = self.nodes[nid]
        d = n.durable
        n.core = RaftCore(
            nid,
            self.ids,
            self.cfg.raft,
            random.Random(self.rng.getrandbits(64)),
            hard_state=d.hs,
            snapshot=d.snapshot,
            entries=list(d.entries),
        )
        n.kv = dict(json.loads(d.snapshot.data)) if d.snapshot else {}
        n.applied = d.snapshot.meta.index if d.snapshot else 0
        n.commit_seen = n.core.commit_index
        if n.core.commit_index < n.recorded_commit:
            raise self._fail(f"{nid} restarted with commit {n.core.commit_index} < durable")

    def crash(self, nid: str) -> None:
        """Crash ``nid``: unpersisted state is lost; its clients' operations become info."""
        n = self.nodes[nid]
        if n.core is None:
            return
        n.core = None
        n.writing = None
        for op in [*n.pending_puts.values(), *n.pending_reads.values()]:
            self._complete(op, "info", None)
        for _, op in n.ready_reads:
            self._complete(op, "info", None)
        n.pending_puts.clear()
        n.pending_reads.clear()
        n.ready_reads.clear()
        self.log.append(f"t={self.now} crash {nid}")

    def restart(self, nid: str) -> None:
        """Restart a crashed node from its durable state."""
        if self.nodes[nid].core is None:
            self._start(nid)
            self.log.append(f"t={self.now} restart {nid}")

    def _fail(self, msg: str) -> InvariantViolation:
        tail = "\n".join(self.log[-15:])
        return InvariantViolation(f"seed={self.seed} t={self.now}: {msg}\nrecent events:\n{tail}")

    # ------------------------------------------------------------------ network
    def _send(self, m: Message) -> None:
        if self.drop and self.rng.random() < self.drop:
            return
        copies = 2 if self.dup and self.rng.random() < self.dup else 1
        for _ in range(copies):
            self.seq += 1
            at = self.now + self.rng.randint(1, self.cfg.max_delay)
            heapq.heappush(self.net, (at, self.seq, m))

    def _deliver(self) -> None:
        net = self.net
        while net and net[0][0] <= self.now:
            _, _, m = heapq.heappop(net)
            if (m.frm, m.to) not in self.allowed:
                continue
            core = self.nodes[m.to].core
            if core is not None:
                core.step(m)

    # ------------------------------------------------------------------ ready processing
    def _process(self, n: SimNode) -> None:
        core = n.core
        assert core is not None
        if n.writing is not None:
            if self.now < n.write_done_at:
                return  # still fsyncing; the core keeps stepping messages meanwhile
            done, n.writing = n.writing, None
            self._finish(n, done)
        while (rd := core.ready()) is not None:
            # As the real shell: Appends leave before the fsync, everything else after.
            for m in rd.messages:
                if isinstance(m, Append):
                    self._send(m)
            if self._faults and self.rng.random() < self.cfg.crash_mid_ready:
                self.crash(n.id)
                return
            if self.cfg.disk_ticks and self.rng.random() < 0.5:
                n.writing = rd
                n.write_done_at = self.now + self.rng.randint(1, self.cfg.disk_ticks)
                return
            self._finish(n, rd)
        self._after_ready(n)

    def _finish(self, n: SimNode, rd: Ready) -> None:
        """The rest of a Ready once its fsync completed: persist, send, apply, advance."""
        core = n.core
        assert core is not None
        self._persist(n, rd)
        for m in rd.messages:
            if not isinstance(m, Append):
                self._send(m)
        if rd.snapshot is not None:
            meta = rd.snapshot.meta
            n.kv = dict(json.loads(rd.snapshot.data))
            n.applied = meta.index
            for idx in [i for i in n.pending_puts if i <= meta.index]:
                self._complete(n.pending_puts.pop(idx), "info", None)
        for e in rd.committed_entries:
            self._apply(n, e)
        for rs in rd.read_states:
            op = n.pending_reads.pop(rs.request_id, None)
            if op is not None:
                n.ready_reads.append((rs.index, op))
        for rid in rd.dropped_reads:
            op = n.pending_reads.pop(rid, None)
            if op is not None:
                self._complete(op, "fail", None)
        core.advance(rd)
        if n.ready_reads:
            keep = []
            for idx, op in n.ready_reads:
                if idx <= n.applied:
                    self._complete(op, "ok", n.kv.get(op.key))
                else:
                    keep.append((idx, op))
            n.ready_reads = keep

    def _after_ready(self, n: SimNode) -> None:
        core = n.core
        assert core is not None
        if n.pending_puts and core.role is not Role.LEADER:
            # As the real shell: writes in flight when leadership is lost get "unknown"
            # (a later leader may still commit them), so their clients move on.
            for op in n.pending_puts.values():
                self._complete(op, "info", None)
            n.pending_puts.clear()
        # Compaction, as an application would do it.
        if n.applied - core.first_index + 1 >= self.cfg.compact_every:
            data = json.dumps(sorted(n.kv.items())).encode()
            core.compact(n.applied, data)
            snap = core.snapshot
            assert snap is not None
            d = n.durable
            d.snapshot = snap
            d.entries = [e for e in d.entries if e.index > snap.meta.index]
        self._check_node(n)

    def _persist(self, n: SimNode, rd: Ready) -> None:
        d = n.durable
        if rd.snapshot is not None:
            d.snapshot = rd.snapshot
            d.entries = []
        if rd.entries:
            first = rd.entries[0].index
            base = d.snapshot.meta.index if d.snapshot else 0
            if first - base - 1 > len(d.entries) or first <= base:
                raise self._fail(f"{n.id}: Ready entries start at {first}, durable base {base}")
            del d.entries[first - base - 1 :]
            d.entries.extend(rd.entries)
            for e in rd.entries:
                prev = self.entry_at.setdefault((e.index, e.term), e)
                if prev != e:
                    raise self._fail(f"log matching: {n.id} has {e} but another log has {prev}")
        if rd.hard_state is not None:
            hs = rd.hard_state
            old = d.hs
            if hs.term < old.term or hs.commit < old.commit:
                raise self._fail(f"{n.id}: durable hard state went backwards {old} -> {hs}")
            if hs.term == old.term and old.vote is not None and hs.vote != old.vote:
                raise self._fail(f"{n.id}: changed its vote in term {hs.term}: {old} -> {hs}")
            d.hs = hs
            n.recorded_commit = hs.commit
            core = n.core
            assert core is not None
            for i in range(max(self.max_committed, core.first_index - 1) + 1, hs.commit + 1):
                t = core.log_term(i)
                if t is None:
                    break
                self.committed_term[i] = t
                self.max_committed = i

    def _apply(self, n: SimNode, e: Entry) -> None:
        if e.index != n.applied + 1:
            raise self._fail(f"{n.id}: applied {e.index} after {n.applied}")
        prev = self.applied_at.setdefault(e.index, e)
        if prev != e:
            raise self._fail(f"state machine safety: {n.id} applied {e} but another {prev}")
        n.applied = e.index
        op = n.pending_puts.pop(e.index, None)
        if e.kind is EntryKind.COMMAND:
            op_id, key, value = e.data.decode().split(":", 2)
            n.kv[key] = value
            if op is not None:
                mine = op_id == str(id_of(op))
                self._complete(op, "ok" if mine else "fail", None)
        elif op is not None:
            self._complete(op, "fail", None)

    def _check_node(self, n: SimNode) -> None:
        core = n.core
        assert core is not None
        if core.commit_index < n.commit_seen:
            raise self._fail(f"{n.id}: commit went back {n.commit_seen} -> {core.commit_index}")
        n.commit_seen = core.commit_index
        if core.role is Role.LEADER:
            other = self.leaders.setdefault(core.term, n.id)
            if other != n.id:
                raise self._fail(f"election safety: {other} and {n.id} lead term {core.term}")
            if core.term not in self.completeness_checked:
                self.completeness_checked.add(core.term)
                for i in range(core.first_index, self.max_committed + 1):
                    ct = self.committed_term.get(i)
                    if ct is not None and core.log_term(i) != ct:
                        raise self._fail(
                            f"leader completeness: {n.id} leads term {core.term} with term "
                            f"{core.log_term(i)} at committed index {i} "
                            f"(committed term {self.committed_term.get(i)})"
                        )

    def check_log_matching(self) -> None:
        """Pairwise: if two logs agree on (index, term) they agree on every earlier entry."""
        cores = [(i, n.core) for i, n in self.nodes.items() if n.core is not None]
        for a in range(len(cores)):
            for b in range(a + 1, len(cores)):
                (ia, ca), (ib, cb) = cores[a], cores[b]
                lo = max(ca.first_index, cb.first_index)
                hi = min(ca.last_index, cb.last_index)
                i = hi
                while i >= lo and ca.log_term(i) != cb.log_term(i):
                    i -= 1
                if i >= lo and ca.log_slice(lo, i + 1) != cb.log_slice(lo, i + 1):
                    raise self._fail(f"log matching: {ia} and {ib} agree at {i} but differ below")

    # ------------------------------------------------------------------ clients
    def _complete(self, op: _Op, typ: str, result: str | None) -> None:
        if op.type != "pending":
            return
        self.clock += 1
        op.type = typ
        op.result = result
        if typ != "info":
            op.complete = self.clock
        if self.busy.get(op.process) is op:
            del self.busy[op.process]

    def leader(self) -> str | None:
        """A live node that believes it is leader (highest term), if any."""
        best: tuple[int, str] | None = None
        for i, n in self.nodes.items():
            c = n.core
            if c is not None and c.role is Role.LEADER and (best is None or c.term > best[0]):
                best = (c.term, i)
        return best[1] if best else None

    def _invoke(self, process: int, write: bool | None = None) -> _Op | None:
        live = [i for i, n in self.nodes.items() if n.core is not None]
        if not live:
            return None
        # Mostly the newest leader, but also any node that believes it leads (possibly a
        # deposed one behind a partition) and sometimes any node at all.
        # Reads go to any node half of the time: followers serve them too (ReadIndex).
        ldr = self.leader()
        lds = [i for i in live if self.nodes[i].core.role is Role.LEADER]  # type: ignore[union-attr]
        if write is None:
            write = self.rng.random() < 0.5
        r = self.rng.random()
        if not write and r < 0.5:
            nid = self.rng.choice(live)
        elif ldr is not None and r < 0.6:
            nid = ldr
        elif lds and r < 0.9:
            nid = self.rng.choice(lds)
        else:
            nid = self.rng.choice(live)
        n = self.nodes[nid]
        core = n.core
        assert core is not None
        key = f"k{self.rng.randrange(self.cfg.keys)}"
        self.clock += 1
        if write:
            self.next_value += 1
            op = _Op(process, nid, "write", key, f"v{self.next_value}", self.clock)
        else:
            op = _Op(process, nid, "read", key, None, self.clock)
        self.ops.append(op)
        self.busy[process] = op
        if write:
            idx = core.propose(f"{id_of(op)}:{key}:{op.value}".encode())
            if idx is None:
                self._complete(op, "fail", None)
            else:
                n.pending_puts[idx] = op
        else:
            self.next_rid += 1
            if core.read_index(self.next_rid):
                n.pending_reads[self.next_rid] = op
            else:
                self._complete(op, "fail", None)
        return op

    # ------------------------------------------------------------------ nemesis
    def _partition(self) -> None:
        ids = list(self.ids)
        self.rng.shuffle(ids)
        n = len(ids)
        shape = self.rng.choice(["halves", "isolate_leader", "bridge", "ring", "oneway"])
        groups: list[set[str]]
        if shape == "isolate_leader":
            ldr = self.leader() or ids[0]
            groups = [{ldr}, set(ids) - {ldr}]
        elif shape == "bridge" and n >= 3:
            k = (n - 1) // 2
            b = ids[0]
            groups = [{b, *ids[1 : 1 + k]}, {b, *ids[1 + k :]}]
        elif shape == "ring":
            links = set()
            for i in range(n):
                for d in (1, -1):
                    links.add((ids[i], ids[(i + d) % n]))
            self.allowed = frozenset(links & self.all_links)
            self.log.append(f"t={self.now} partition ring {ids}")
            return
        elif shape == "oneway":
            self.allowed = frozenset(lk for lk in self.link_list if self.rng.random() < 0.6)
            self.log.append(f"t={self.now} partition oneway {sorted(self.allowed)}")
            return
        else:
            k = self.rng.randint(1, n - 1)
            groups = [set(ids[:k]), set(ids[k:])]
        self.allowed = frozenset(
            (a, b) for a, b in self.all_links if any(a in g and b in g for g in groups)
        )
        self.log.append(f"t={self.now} partition {shape} {[sorted(g) for g in groups]}")

    def _nemesis(self) -> None:
        r = self.rng.random()
        if r < 0.35:
            self._partition()
        elif r < 0.55:
            self.allowed = self.all_links
            self.log.append(f"t={self.now} heal")
        elif r < 0.75:
            up = [i for i, n in self.nodes.items() if n.core is not None]
            if up:
                self.crash(self.rng.choice(up))
        elif r < 0.9:
            down = [i for i, n in self.nodes.items() if n.core is None]
            if down:
                self.restart(self.rng.choice(down))
        else:
            self.drop = self.rng.choice([0.0, self.cfg.drop, 0.3])
            self.log.append(f"t={self.now} drop={self.drop}")

    # ------------------------------------------------------------------ main loop
    def step_tick(self, *, faults: bool, clients: bool) -> None:
        """Advance the whole cluster by one tick."""
        self.now += 1
        self._faults = faults
        if faults and self.rng.random() < self.cfg.nemesis_rate:
            self._nemesis()
        self._deliver()
        for n in self.nodes.values():
            if n.core is not None:
                n.core.tick()
        if clients:
            for p in range(self.cfg.clients):
                if p not in self.busy and self.rng.random() < self.cfg.op_rate:
                    self._invoke(p)
        order = list(self.nodes.values())
        self.rng.shuffle(order)
        for n in order:
            if n.core is not None:
                self._process(n)

    def heal(self) -> None:
        """Stop all faults: full connectivity, no loss or duplication, every node up."""
        self.allowed = self.all_links
        self.drop = 0.0
        self.dup = 0.0
        for i in self.ids:
            self.restart(i)
        self.log.append(f"t={self.now} heal-all")

    def run(self) -> None:
        """Faults, then heal and require progress, then drain and check everything."""
        cfg = self.cfg
        for _ in range(cfg.fault_ticks):
            self.step_tick(faults=True, clients=True)
        self.check_log_matching()
        self.heal()
        healed_at = self.clock
        deadline = self.now + cfg.heal_limit
        while True:
            if self.now >= deadline:
                raise self._fail(
                    f"no progress: no write invoked after healing committed within "
                    f"{cfg.heal_limit} ticks (leader={self.leader()})"
                )
            self.step_tick(faults=False, clients=True)
            if any(
                op.f == "write" and op.type == "ok" and op.invoke > healed_at for op in self.ops
            ):
                break
        for _ in range(cfg.drain_ticks):
            self.step_tick(faults=False, clients=False)
        self.check_log_matching()
        self.check_linearizable()

    def history(self) -> list[Operation]:
        """The client operations as harness Operations (pending ones are info)."""
        out = []
        for op in self.ops:
            typ = op.type if op.type != "pending" else "info"
            out.append(
                Operation(
                    process=op.process,
                    node=op.node,
                    f=op.f,
                    key=op.key,
                    value=op.value,
                    result=op.result,
                    type=typ,  # type: ignore[arg-type]
                    invoke_time=op.invoke,
                    complete_time=op.complete if typ == "ok" else math.inf,
                )
            )
        return out

    def check_linearizable(self) -> None:
        """Raise unless the recorded client history is linearizable."""
        res = check_register(self.history(), timeout_s=20.0)
        if res.valid is not True:
            cex = res.counterexample
            raise self._fail(
                f"history not linearizable ({res.valid}): {cex.reason if cex else res}"
            )


def id_of(op: _Op) -> int:
    """Stable id of an operation (its invoke time is unique)."""
    return op.invoke


def run_seed(seed: int, *, soak: bool = False) -> Simulator:
    """Run one randomized scenario derived from ``seed``; raises on any violation."""
    r = random.Random(seed ^ 0x5EED)
    n = r.choice([3, 3, 5])
    rc = RaftConfig(
        election_ticks=10,
        heartbeat_ticks=r.choice([1, 2]),
        max_inflight=r.choice([1, 4, 64]),
        max_entries_per_msg=r.choice([1, 3, 256]),
        pre_vote=r.random() < 0.8,
        check_quorum=r.random() < 0.8,
    )
    cfg = SimConfig(
        n_nodes=n,
        fault_ticks=r.randint(600, 1500) if soak else r.randint(80, 200),
        max_delay=r.choice([1, 2, 3, 5]),
        drop=r.choice([0.0, 0.02, 0.1]),
        dup=r.choice([0.0, 0.05]),
        nemesis_rate=r.choice([0.02, 0.05, 0.1]),
        compact_every=r.choice([5, 20, 1000]),
        disk_ticks=r.choice([0, 2, 4]),
        raft=rc,
    )
    # Raft's liveness needs broadcast time << election timeout (paper §5.6): a round trip
    # (two message delays plus an fsync) must fit in half an election timeout, or elections
    # can livelock by design. Safety is checked whatever the timing.
    round_trip = 2 * cfg.max_delay + cfg.disk_ticks + cfg.raft.heartbeat_ticks
    election = max(rc.election_ticks, 2 * round_trip)
    cfg = replace(
        cfg,
        raft=replace(rc, election_ticks=election),
        # progress after heal may take a few (randomized, possibly split) elections
        heal_limit=max(cfg.heal_limit, 10 * election),
        drain_ticks=max(cfg.drain_ticks, 4 * election),
    )
    sim = Simulator(seed, cfg)
    sim.run()
    return sim
