"""Deterministic simulator of Raft clusters that runs the production shell code.

Theory of operation
-------------------
N nodes live in one process and share one seeded ``random.Random``; time is a virtual tick
counter. Each node is what the real node is minus asyncio and gRPC: a ``RaftCore``, the
production ``ReadyPipeline`` (raft.pipeline), ``RaftStorage`` (raft.storage) on a simulated
disk (caplab.disk.SimDisk) and the real ``KvStateMachine``. Each tick: the nemesis may change
faults, due messages are delivered, every running node ticks, clients invoke operations,
and every node runs its Readies through the pipeline exactly as the shell does: begin
(Appends leave), persist (at once, or after a few ticks of disk latency while the core
keeps stepping messages), finish.

Faults: partitions (halves, isolated leader, bridge, ring, one-way), message loss,
duplication and delay (hence reordering), link stalls (a stalled stream delays its
messages, or drops them all once the stall outlasts the sender's timeout, as
caplab.peer does), event-loop stalls (the node does nothing, then fires its missed ticks
at once), crashes at any point of a save or compaction (the disk keeps only what was
fsynced, with torn tails), full disks (the save is retried until space returns, what was
in flight is answered "unknown" as the shell does), failing fsyncs (fatal: the node stops
and restarts from its disk), and lost disks (a node restarts blank and must catch up
before it votes).

Invariants are checked as the run goes and raise ``InvariantViolation``: election safety,
log matching, leader completeness, state machine safety, monotonic commit, and durability
(a restarted node has every entry it had made durable up to its durable commit index, and
never a lower term or another vote in the same term). Client operations are recorded
with logical invoke/complete times; reads record the value the pipeline actually served.
The history (``Simulator.history()``) is checked for linearizability by the tests: this
module imports nothing from the harness.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, field, replace

from caplab.disk import SimCrash, SimDisk
from caplab.raft.v1 import raft_pb2 as pb
from raft.core import RaftConfig, RaftCore, Ready, Role
from raft.messages import Entry, HardState, Message
from raft.pipeline import ReadyPipeline, Save
from raft.statemachine import KvStateMachine
from raft.storage import FatalStorageError, RaftStorage, RetryableStorageError

DATA_DIR = "/data"


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
    compact_every: int = 25  #: snapshot_entries: compact when this many entries applied.
    #: per-save probability (fault phase) of crashing at a random write of the save
    crash_mid_save: float = 0.005
    #: a save takes up to this many ticks (0: at once); meanwhile the node keeps
    #: receiving messages, and a crash loses it.
    disk_ticks: int = 0
    sender_timeout: int = 3  #: a link stalled longer than this drops what it held.
    wipes: bool = True  #: the nemesis may wipe a node's disk (needs pre-vote + check-quorum)
    raft: RaftConfig = field(default_factory=lambda: RaftConfig(election_ticks=10))


@dataclass(slots=True)
class SimOp:
    """One client operation, as recorded (logical times; ``complete`` inf while open)."""

    process: int
    node: str
    f: str  # "write" | "read"
    key: str
    value: str | None
    invoke: int
    result: str | None = None
    type: str = "pending"  # -> "ok" | "fail" | "info"
    complete: float = math.inf


@dataclass(slots=True)
class DurableModel:
    """What a node acknowledged as durable (completed saves): checked at restart."""

    hs: HardState = field(default_factory=lambda: HardState(0, None, 0))
    terms: dict[int, int] = field(default_factory=dict)  #: index -> term, dense suffix
    snap_index: int = 0


class _Sink:
    """The pipeline's answers for one simulated node: complete client operations."""

    def __init__(self, sim: Simulator, node: SimNode) -> None:
        self.sim = sim
        self.node = node

    def proposal_done(self, token: SimOp, result: pb.CommandResult, index: int) -> None:
        self.sim._complete(token, "ok", None)

    def proposal_failed(self, token: SimOp, definite: bool, reason: str) -> None:
        self.sim._complete(token, "fail" if definite else "info", None)

    def read_ready(self, token: SimOp, index: int) -> None:
        value = self.node.sm.get(token.key)
        assert value is None or isinstance(value, bytes)
        self.sim._complete(token, "ok", None if value is None else value.decode())

    def read_failed(self, token: SimOp, reason: str) -> None:
        self.sim._complete(token, "fail", None)


@dataclass(slots=True)
class SimNode:
    """A simulated node: its disk, and while it runs, its core and pipeline."""

    id: str
    disk: SimDisk
    core: RaftCore | None = None
    storage: RaftStorage | None = None
    pipe: ReadyPipeline[SimOp] | None = None
    sm: KvStateMachine = field(default_factory=KvStateMachine)
    model: DurableModel = field(default_factory=DurableModel)
    commit_seen: int = 0
    #: a Ready whose save is under way, and when the disk completes it
    writing: tuple[Ready, Save | None] | None = None
    write_done_at: int = 0
    retrying: bool = False  #: the disk refused the save in ``writing``: retry each tick
    stalled_until: int = 0  #: event-loop stall: does nothing until then
    down_until: int = 0  #: a wiped node stays down until then
    wiped: bool = False  #: restarted blank and not yet caught up


class Simulator:
    """One deterministic run; see the module docstring."""

    def __init__(self, seed: int, cfg: SimConfig | None = None) -> None:
        self.seed = seed
        self.cfg = cfg or SimConfig()
        self.rng = random.Random(seed)
        self.ids = [f"n{i + 1}" for i in range(self.cfg.n_nodes)]
        self.nodes = {
            i: SimNode(i, SimDisk(random.Random(self.rng.getrandbits(64)))) for i in self.ids
        }
        self.link_list = [(a, b) for a in self.ids for b in self.ids if a != b]
        self.all_links = frozenset(self.link_list)
        self.allowed: frozenset[tuple[str, str]] = self.all_links
        self.stalled_links: dict[tuple[str, str], int] = {}  # link -> stalled until
        self.drop = self.cfg.drop
        self.dup = self.cfg.dup
        self.now = 0
        self._faults = False
        self.clock = 0  # logical event counter for operation times
        self.net: list[tuple[int, int, Message]] = []
        self.seq = 0
        self.ops: list[SimOp] = []
        self.busy: dict[int, SimOp] = {}
        self.next_value = 0
        self.next_seq: dict[int, int] = {}
        self.leaders: dict[int, str] = {}  # term -> leader (election safety)
        self.completeness_checked: set[int] = set()
        self.entry_at: dict[tuple[int, int], Entry] = {}  # (index, term) -> entry
        self.applied_at: dict[int, Entry] = {}  # index -> entry applied (SM safety)
        self.committed_term: dict[int, int] = {}  # index -> term of committed entry
        self.max_committed = 0
        self.counts: dict[str, int] = {}
        self.log: list[str] = []
        for i in self.ids:
            self._start(i)

    # ------------------------------------------------------------------ lifecycle
    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def _start(self, nid: str) -> None:
        n = self.nodes[nid]
        storage = RaftStorage(DATA_DIR, disk=n.disk)
        hs, snap, entries = storage.load()
        snap_index = snap.meta.index if snap else 0
        self._check_restart(n, hs, snap_index, entries)
        # From now on the durable state is what was loaded: it may hold a prefix of a
        # save that a crash interrupted (never acknowledged, so not in the model).
        n.model = DurableModel(hs, {e.index: e.term for e in entries}, snap_index)
        n.sm = KvStateMachine()
        if snap is not None:
            n.sm.restore(snap.data)
        n.core = RaftCore(
            nid,
            self.ids,
            self.cfg.raft,
            random.Random(self.rng.getrandbits(64)),
            hard_state=hs,
            snapshot=snap,
            entries=entries,
            recovering=storage.recovering,
        )
        n.storage = storage
        n.pipe = ReadyPipeline(
            n.core,
            storage,
            n.sm,
            self._send,
            _Sink(self, n),
            durable_hs=hs,
            snapshot_entries=self.cfg.compact_every,
        )
        n.commit_seen = n.core.commit_index
        n.writing, n.retrying, n.stalled_until = None, False, 0

    def _check_restart(
        self, n: SimNode, hs: HardState, snap_index: int, entries: list[Entry]
    ) -> None:
        """Durability: what completed saves made durable survived the crash."""
        m = n.model
        if hs.term < m.hs.term or hs.commit < m.hs.commit:
            raise self._fail(f"{n.id} restarted with hard state {hs} older than durable {m.hs}")
        if hs.term == m.hs.term and m.hs.vote is not None and hs.vote != m.hs.vote:
            raise self._fail(f"{n.id} restarted with vote {hs.vote}, durable {m.hs.vote}")
        loaded = {e.index: e.term for e in entries}
        for i in range(max(snap_index, m.snap_index) + 1, m.hs.commit + 1):
            if m.terms.get(i) is not None and loaded.get(i) != m.terms[i]:
                raise self._fail(
                    f"{n.id} restarted without durable committed entry {i} (term "
                    f"{m.terms[i]}; loaded {loaded.get(i)}, snapshot {snap_index})"
                )

    def crash(self, nid: str, *, wipe: bool = False) -> None:
        """Crash ``nid``: its disk keeps only what was fsynced (torn tails possible); its
        clients' operations become info. ``wipe``: the disk is lost altogether."""
        n = self.nodes[nid]
        if n.core is None:
            return
        n.core = n.pipe = n.storage = None
        n.writing = None
        for op in [o for o in self.busy.values() if o.node == nid]:
            self._complete(op, "info", None)
        if wipe:
            n.disk = SimDisk(random.Random(self.rng.getrandbits(64)))
            n.model = DurableModel()
            n.down_until = self.now + 2 * self.cfg.raft.election_ticks
            n.wiped = True
            self._count("wipes")
        else:
            n.disk = n.disk.crash()
        self.log.append(f"t={self.now} crash {nid}{' (disk wiped)' if wipe else ''}")
        self._count("crashes")

    def restart(self, nid: str) -> None:
        """Restart a crashed node from its disk."""
        n = self.nodes[nid]
        if n.core is None and self.now >= n.down_until:
            self._start(nid)
            self.log.append(f"t={self.now} restart {nid}")

    def _fail(self, msg: str) -> InvariantViolation:
        tail = "\n".join(self.log[-15:])
        return InvariantViolation(f"seed={self.seed} t={self.now}: {msg}\nrecent events:\n{tail}")

    # ------------------------------------------------------------------ network
    def _send(self, m: Message) -> None:
        if self.drop and self.rng.random() < self.drop:
            return
        link = (m.frm, m.to)
        stalled = self.stalled_links.get(link, 0)
        if stalled > self.now + self.cfg.sender_timeout:
            return  # the stalled stream is abandoned by its watchdog: lost
        copies = 2 if self.dup and self.rng.random() < self.dup else 1
        for _ in range(copies):
            self.seq += 1
            at = max(self.now + self.rng.randint(1, self.cfg.max_delay), stalled)
            heapq.heappush(self.net, (at, self.seq, m))

    def _deliver(self) -> None:
        net = self.net
        later = []
        while net and net[0][0] <= self.now:
            item = heapq.heappop(net)
            m = item[2]
            if (m.frm, m.to) not in self.allowed:
                continue
            n = self.nodes[m.to]
            if n.core is None:
                continue
            if n.stalled_until > self.now:
                later.append((n.stalled_until, item[1], m))
                continue
            n.core.step(m)
        for it in later:
            heapq.heappush(net, it)

    # ------------------------------------------------------------------ ready processing
    def _process(self, n: SimNode) -> None:
        """Run the node's Readies through the production pipeline, as the driver does."""
        core, pipe = n.core, n.pipe
        assert core is not None and pipe is not None
        if n.writing is not None:
            if self.now < n.write_done_at:
                return  # still fsyncing; the core keeps stepping messages meanwhile
            rd0, save0 = n.writing
            if not self._persist(n, save0):
                return
            n.writing = None
            pipe.finish(rd0, save0)
        while n.core is not None and (rd := core.ready()) is not None:
            save = pipe.begin(rd)
            if save is not None and self.cfg.disk_ticks and self.rng.random() < 0.5:
                n.writing = (rd, save)
                n.write_done_at = self.now + self.rng.randint(1, self.cfg.disk_ticks)
                return
            if not self._persist(n, save):
                if n.core is not None:
                    n.writing = (rd, save)
                return
            pipe.finish(rd, save)
        if n.core is not None:
            self._compact(n)
        if n.core is not None:
            self._after_ready(n)

    def _persist(self, n: SimNode, save: Save | None) -> bool:
        """The save, with the faults of a real disk; False if it did not complete (the
        node crashed, or the disk is full: retried next tick)."""
        if save is None:
            return True
        pipe = n.pipe
        assert pipe is not None
        if self._faults and self.rng.random() < self.cfg.crash_mid_save:
            n.disk.crash_after(self.rng.randrange(4))
        try:
            pipe.persist(save)
        except SimCrash:
            self.crash(n.id)
            return False
        except RetryableStorageError:
            if not n.retrying:
                n.retrying = True
                self._count("disk_full")
                pipe.fail_all("disk full")
            n.write_done_at = self.now + 1
            return False
        except FatalStorageError:
            self._count("fatal_disk")
            self.crash(n.id)
            return False
        _disarm(n.disk)
        n.retrying = False
        self._record_durable(n, save)
        return True

    def _compact(self, n: SimNode) -> None:
        pipe, storage = n.pipe, n.storage
        assert pipe is not None and storage is not None
        snap = pipe.compaction_due()
        if snap is None:
            return
        if self._faults and self.rng.random() < self.cfg.crash_mid_save * 4:
            n.disk.crash_after(self.rng.randrange(6))
        try:
            storage.compact(snap)
        except SimCrash:
            self.crash(n.id)
            return
        except RetryableStorageError:
            return
        except FatalStorageError:
            self.crash(n.id)
            return
        _disarm(n.disk)
        pipe.compacted(snap)
        m = n.model
        m.snap_index = max(m.snap_index, snap.meta.index)
        self._count("compactions")

    def _record_durable(self, n: SimNode, save: Save) -> None:
        """Track what completed saves made durable (checked at restart), and check the
        persisted state: terms and commit never go back, one vote per term, log matching."""
        m = n.model
        if save.snapshot is not None:
            meta = save.snapshot.meta
            m.terms = {}
            m.snap_index = meta.index
        if save.entries:
            first = save.entries[0].index
            for i in [i for i in m.terms if i >= first]:
                del m.terms[i]
            for e in save.entries:
                m.terms[e.index] = e.term
                prev = self.entry_at.setdefault((e.index, e.term), e)
                if prev != e:
                    raise self._fail(f"log matching: {n.id} has {e} but another log has {prev}")
        hs = save.hard_state
        if hs is not None:
            old = m.hs
            if hs.term < old.term or hs.commit < old.commit:
                raise self._fail(f"{n.id}: durable hard state went backwards {old} -> {hs}")
            if hs.term == old.term and old.vote is not None and hs.vote != old.vote:
                raise self._fail(f"{n.id}: changed its vote in term {hs.term}: {old} -> {hs}")
            m.hs = hs
            core = n.core
            assert core is not None
            for i in range(max(self.max_committed, core.first_index - 1) + 1, hs.commit + 1):
                t = core.log_term(i)
                if t is None:
                    break
                self.committed_term[i] = t
                self.max_committed = i

    def _after_ready(self, n: SimNode) -> None:
        core = n.core
        assert core is not None
        if n.wiped and not core.recovering:
            n.wiped = False
            self.log.append(f"t={self.now} {n.id} caught up after its disk was wiped")
            self._count("recovered")
        self._check_node(n)

    def _check_node(self, n: SimNode) -> None:
        core, pipe = n.core, n.pipe
        assert core is not None and pipe is not None
        if core.commit_index < n.commit_seen:
            raise self._fail(f"{n.id}: commit went back {n.commit_seen} -> {core.commit_index}")
        n.commit_seen = core.commit_index
        if core.applied_index != pipe.applied and n.writing is None:
            raise self._fail(
                f"{n.id}: core applied {core.applied_index}, state machine {pipe.applied}"
            )
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

    def check_applied(self, n: SimNode, e: Entry) -> None:
        """State machine safety: every node applies the same entry at an index."""
        prev = self.applied_at.setdefault(e.index, e)
        if prev != e:
            raise self._fail(f"state machine safety: {n.id} applied {e} but another {prev}")

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
                for e in ca.log_slice(lo, min(ca.commit_index, cb.commit_index) + 1):
                    self.check_applied(self.nodes[ia], e)

    # ------------------------------------------------------------------ clients
    def _complete(self, op: SimOp, typ: str, result: str | None) -> None:
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

    def _invoke(self, process: int, write: bool | None = None) -> SimOp | None:
        live = [i for i, n in self.nodes.items() if n.core is not None and not n.retrying]
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
        elif ldr is not None and ldr in live and r < 0.6:
            nid = ldr
        elif lds and r < 0.9:
            nid = self.rng.choice(lds)
        else:
            nid = self.rng.choice(live)
        n = self.nodes[nid]
        pipe = n.pipe
        assert pipe is not None
        key = f"k{self.rng.randrange(self.cfg.keys)}"
        self.clock += 1
        if write:
            self.next_value += 1
            op = SimOp(process, nid, "write", key, f"v{self.next_value}", self.clock)
        else:
            op = SimOp(process, nid, "read", key, None, self.clock)
        self.ops.append(op)
        self.busy[process] = op
        if write:
            seq = self.next_seq[process] = self.next_seq.get(process, 0) + 1
            cmd = pb.Command(key=key, put=(op.value or "").encode())
            cmd.client_id, cmd.sequence = f"p{process}", seq
            if not pipe.propose([cmd.SerializeToString()], [op]):
                self._complete(op, "fail", None)
        elif not pipe.read(op):
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

    def _may_wipe(self) -> bool:
        rc = self.cfg.raft
        # Safe only while the nodes that keep their disks meet every majority (one wipe
        # at a time: in a cluster of two too), and with the leader lease (check-quorum)
        # ending stale leaders before a wiped node is back (see README). Every other node
        # must hold its state durably: its marker gone from disk, not merely caught up in
        # memory (a node whose disk has been full since it started holds nothing, however
        # far its core got).
        return (
            self.cfg.wipes
            and rc.pre_vote
            and rc.check_quorum
            and self.cfg.n_nodes >= 2
            and all(n.storage is not None and not n.storage.recovering for n in self.nodes.values())
        )

    def _nemesis(self) -> None:
        r = self.rng.random()
        up = [i for i, n in self.nodes.items() if n.core is not None]
        down = [i for i, n in self.nodes.items() if n.core is None]
        if r < 0.3:
            self._partition()
        elif r < 0.45:
            self.allowed = self.all_links
            self.log.append(f"t={self.now} heal")
        elif r < 0.6:
            if up:
                self.crash(self.rng.choice(up))
        elif r < 0.63:
            if up and self._may_wipe():
                self.crash(self.rng.choice(up), wipe=True)
        elif r < 0.75:
            if down:
                self.restart(self.rng.choice(down))
        elif r < 0.8:
            if up:
                nid = self.rng.choice(up)
                self.nodes[nid].stalled_until = self.now + self.rng.randint(1, 8)
                self.log.append(f"t={self.now} loop stall {nid}")
                self._count("loop_stalls")
        elif r < 0.85:
            link = self.rng.choice(self.link_list)
            self.stalled_links[link] = self.now + self.rng.randint(1, 8)
            self.log.append(f"t={self.now} stream stall {link}")
            self._count("stream_stalls")
        elif r < 0.9:
            if up:
                nid = self.rng.choice(up)
                disk = self.nodes[nid].disk
                disk.full = not disk.full
                self.log.append(f"t={self.now} disk {'full' if disk.full else 'freed'} {nid}")
        elif r < 0.92:
            if up:
                nid = self.rng.choice(up)
                self.nodes[nid].disk.fail_next("fsync", 5)
                self.log.append(f"t={self.now} fsync EIO armed {nid}")
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
            if n.core is None:
                continue
            if n.stalled_until > self.now:
                continue
            if n.stalled_until == self.now:  # the loop wakes up: missed ticks fire at once
                for _ in range(self.rng.randint(1, 8)):
                    n.core.tick()
            n.core.tick()
        if clients:
            for p in range(self.cfg.clients):
                if p not in self.busy and self.rng.random() < self.cfg.op_rate:
                    self._invoke(p)
        order = list(self.nodes.values())
        self.rng.shuffle(order)
        for n in order:
            if n.core is not None and n.stalled_until <= self.now:
                self._process(n)

    def heal(self) -> None:
        """Stop all faults: full connectivity, no loss, no stalls, disks fine, every node up."""
        self.allowed = self.all_links
        self.drop = 0.0
        self.dup = 0.0
        self.stalled_links.clear()
        for n in self.nodes.values():
            n.disk.full = False
            _disarm(n.disk, faults=True)
            n.stalled_until = 0
            n.down_until = 0
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
        # Without pre-vote, a node that inflated its term while cut off deposes leaders
        # when it comes back until the others' timers beat its own: the drain may end
        # between two leaders. A leader must come within the post-heal bound.
        deadline = self.now + cfg.heal_limit
        while self.leader() is None:
            if self.now >= deadline:
                raise self._fail(f"no leader within {cfg.heal_limit} ticks after the drain")
            self.step_tick(faults=False, clients=False)
        self.check_log_matching()
        self.check_replicas_agree()

    def check_replicas_agree(self) -> None:
        """Replicas that applied the same index hold the same state machine state."""
        seen: dict[int, tuple[str, bytes]] = {}
        for n in self.nodes.values():
            if n.pipe is None:
                continue
            digest = n.sm.digest()
            other = seen.setdefault(n.pipe.applied, (n.id, digest))
            if other[1] != digest:
                raise self._fail(
                    f"state machine safety: {n.id} and {other[0]} applied up to "
                    f"{n.pipe.applied} but hold different states"
                )

    def history(self) -> list[SimOp]:
        """The client operations (pending ones become info)."""
        return [
            replace(op, type="info", complete=math.inf) if op.type == "pending" else op
            for op in self.ops
        ]


def _disarm(disk: SimDisk, *, faults: bool = False) -> None:
    """Cancel an armed crash point that did not strike (and with ``faults``, queued
    I/O errors)."""
    disk.disarm(faults=faults)


def sim_config(seed: int, *, soak: bool = False, nodes: int | None = None) -> SimConfig:
    """The randomized configuration of one seed's run (``nodes``: that many, not 3 or 5)."""
    r = random.Random(seed ^ 0x5EED)
    drawn = r.choice([3, 3, 5])  # (drawn whatever ``nodes`` says: the later draws stay)
    n = nodes or drawn
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
    return replace(
        cfg,
        raft=replace(rc, election_ticks=election),
        # progress after heal may take a few (randomized, possibly split) elections
        heal_limit=max(cfg.heal_limit, 20 * election),
        drain_ticks=max(cfg.drain_ticks, 4 * election),
    )


def run_seed(seed: int, *, soak: bool = False, nodes: int | None = None) -> Simulator:
    """Run one randomized scenario derived from ``seed``; raises on any violation."""
    sim = Simulator(seed, sim_config(seed, soak=soak, nodes=nodes))
    sim.run()
    return sim
