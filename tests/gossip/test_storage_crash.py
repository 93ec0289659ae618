"""GossipStorage on a simulated disk (issue 13): crashes at every write boundary of
commits, compactions and load's own repairs, torn writes, a full disk, failing I/O."""

from __future__ import annotations

import errno
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from caplab.disk import SimCrash, SimDisk
from gossip import storage as storage_mod
from gossip.crdt import Applied, Counter, Register, Value, applied_key
from gossip.hlc import Timestamp
from gossip.storage import (
    CommitBatch,
    DedupEntry,
    DiskFullError,
    FatalStorageError,
    GossipStorage,
    Loaded,
)

D = "/data/n1"
SEEDS = range(6)
COMPACT_MIN = 1500  # bytes: a few compactions per scenario
PREALLOC = 512


@pytest.fixture(autouse=True)
def small_base_records(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Bases of several records, so that a crash can fall between two of them."""
    monkeypatch.setattr(storage_mod, "BASE_RECORD_BYTES", 300)
    yield


def new_storage(disk: SimDisk) -> GossipStorage:
    return GossipStorage(D, disk=disk, compact_min_bytes=COMPACT_MIN, prealloc_bytes=PREALLOC)


# -- the model -------------------------------------------------------------------------
@dataclass
class State:
    """What load returns, but the epoch (and what it refused)."""

    kv: dict[str, Value] = field(default_factory=dict)
    dedup: list[DedupEntry] = field(default_factory=list)
    hlc: Timestamp | None = None

    def committed(self, b: CommitBatch) -> State:
        """The state after ``b`` (the SQLite version's order: kv, evictions, dedup, HLC)."""
        kv = dict(self.kv)
        for k, v in b.kv.items():
            if v is None:
                kv.pop(k, None)
            else:
                kv[k] = v
        dedup = {(e.client_id, e.seq): e for e in self.dedup if e.client_id not in b.evict}
        for key in b.evict_seqs:
            dedup.pop(key, None)
        for e in b.dedup.values():
            dedup.pop((e.client_id, e.seq), None)
            dedup[(e.client_id, e.seq)] = e
        hlc = self.hlc if b.hlc is None or (self.hlc and self.hlc > b.hlc) else b.hlc
        return State(kv, list(dedup.values()), hlc)


def state_of(loaded: Loaded) -> State:
    return State(loaded.state, loaded.dedup, loaded.hlc)


def scenario(seed: int, n: int = 24) -> list[CommitBatch]:
    """Commits of registers (some large), tombstones, removals, Applied records, counters
    beyond 64 bits, (legacy) dedup entries, evictions: enough for several compactions."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ts = Timestamp(1000 + 3 * i, i % 3, "n1")
        b = CommitBatch(hlc=ts)
        for _ in range(rng.randint(1, 4)):
            k = f"k{rng.randint(0, 7)}"
            r = rng.random()
            if r < 0.5:
                b.kv[k] = Register(ts, rng.randbytes(rng.choice([0, 5, 40, 300])))
            elif r < 0.65:
                b.kv[k] = Register(ts, None)
            elif r < 0.75:
                b.kv[k] = None
            elif r < 0.85:
                rid = applied_key(f"client{rng.randint(0, 3)}", i)
                b.kv[rid] = Applied(ts, "n1", "increment", k, rng.randint(1, 9), 2**70 + i)
            else:
                p = {"n1": rng.randint(1, 2**127 - 1)}
                b.kv["c" + k] = Counter(p, {"n2/0a1b2c3d": rng.randint(1, 99)})
        for _ in range(rng.randint(0, 3)):
            c, s = f"client{rng.randint(0, 3)}", rng.randint(1, 6)
            op = rng.choice(["put", "delete", "increment"])
            b.dedup[(c, s)] = DedupEntry(c, s, op, ts, rng.randint(-(2**100), 2**100), s // 2)
        if rng.random() < 0.15:
            b.evict.add(f"client{rng.randint(0, 3)}")
        if rng.random() < 0.2:
            b.evict_seqs.add((f"client{rng.randint(0, 3)}", rng.randint(1, 6)))
        out.append(b)
    return out


def models(batches: Sequence[CommitBatch]) -> list[State]:
    """The state before each commit and after the last one."""
    states = [State()]
    for b in batches:
        states.append(states[-1].committed(b))
    return states


@dataclass
class Run:
    """Load, then commit ``batches`` until a SimCrash (or the end)."""

    loaded: bool = False  #: the first load returned
    done: int = 0  #: commits that returned
    epoch: str = ""
    storage: GossipStorage | None = None


def run(disk: SimDisk, batches: Sequence[CommitBatch]) -> Run:
    r = Run()
    try:
        s = r.storage = new_storage(disk)
        loaded = s.load()
        assert state_of(loaded) == State() and loaded.corrupt == []
        r.loaded, r.epoch = True, loaded.epoch
        for b in batches:
            s.commit(b)
            r.done += 1
    except SimCrash:
        pass
    return r


def restart(disk: SimDisk) -> tuple[SimDisk, GossipStorage, Loaded]:
    """Power loss now, then a new GossipStorage loads."""
    after = disk.crash()
    s = new_storage(after)
    return after, s, s.load()


def check_files(disk: SimDisk, s: GossipStorage) -> None:
    """After load: the manifest and the current generation's log, nothing else."""
    assert sorted(disk.files(D)) == ["CURRENT", f"gossip.{s.generation}.log"]


def check_goes_on(disk: SimDisk, s: GossipStorage, state: State, epoch: str) -> None:
    """After a restart: commit, restart twice: all there, same epoch, nothing refused."""
    check_files(disk, s)
    more = scenario(99, 6)
    for b in more:
        s.commit(b)
    expected = state
    for b in more:
        expected = expected.committed(b)
    for _ in range(2):
        disk, s, loaded = restart(disk)
        assert loaded.corrupt == [] and loaded.epoch == epoch
        assert state_of(loaded) == expected
        check_files(disk, s)


# -- crashes ---------------------------------------------------------------------------
def test_scenario_keeps_everything_without_crashes() -> None:
    batches = scenario(0)
    disk = SimDisk(0)
    r = run(disk, batches)
    assert r.done == len(batches) and r.storage is not None
    assert r.storage.compactions >= 4  # the creation, and compactions
    assert r.storage.commits == len(batches)
    disk, s, loaded = restart(disk)
    assert state_of(loaded) == models(batches)[-1]
    assert loaded.epoch == r.epoch and len(r.epoch) == 8 and int(r.epoch, 16) >= 0
    assert loaded.corrupt == []
    check_files(disk, s)


def mutation_map(seed: int, batches: Sequence[CommitBatch]) -> list[str]:
    """What each mutating disk operation of a run without faults belongs to: "load", or
    "commit i" (its record), or "compaction i" (after commit i's record)."""
    disk = SimDisk(seed)
    s = new_storage(disk)
    s.load()
    what = ["load"] * disk.mutations
    for i, b in enumerate(batches):
        s.commit(b)
        n = disk.mutations - len(what)
        assert n == 2 or n > 8  # pwrite + fdatasync (+ a compaction)
        what += [f"commit {i}"] * 2 + [f"compaction {i}"] * (n - 2)
    return what


@pytest.mark.parametrize("seed", SEEDS)
def test_crash_at_every_write_boundary(seed: int) -> None:
    """Whatever the crash point (in the creation, a commit, a compaction) and the torn
    writes: exactly the state after some prefix of the commits, including every commit
    that returned (and the one whose compaction was interrupted); the epoch of the store;
    and it goes on."""
    batches = scenario(seed)
    states = models(batches)
    what = mutation_map(seed, batches)
    assert sum(w.startswith("compaction") for w in what) > 30
    for k in range(len(what) + 1):
        disk = SimDisk(seed * 1000 + k)
        disk.crash_after(k)
        r = run(disk, batches)
        disk, s, loaded = restart(disk)
        where = f"crash at mutation {k}: {what[k] if k < len(what) else 'none'}"
        assert loaded.corrupt == [], where
        got = state_of(loaded)
        if k < len(what) and what[k] == "load":  # in the creation of the store: blank
            assert not r.loaded and got == State(), where
        else:
            assert loaded.epoch == r.epoch, where
            if k < len(what) and what[k].startswith("compaction"):
                assert got == states[r.done + 1], where  # its commit was durable
            else:
                assert r.done == (len(batches) if k == len(what) else int(what[k].split()[1]))
                assert got in states[r.done : r.done + 2], where
        check_goes_on(disk, s, got, loaded.epoch)


@pytest.mark.parametrize("seed", SEEDS)
def test_a_crash_during_loads_repairs_loses_nothing(seed: int) -> None:
    """A crash in a commit leaves a torn tail; a flipped byte makes load refuse a record
    and start a new generation with a new epoch. Crash those loads anywhere: the next
    load still gets the same state."""
    batches = scenario(seed, 10)
    states = models(batches)
    base = SimDisk(seed)
    s = new_storage(base)
    s.load()
    for b in batches[:-1]:
        s.commit(b)
    base.crash_after(0)  # the last commit: torn (as the crash leaves it)
    with pytest.raises(SimCrash):
        s.commit(batches[-1])
    for k in range(40):
        disk = base.crash()  # (each call: another torn tail)
        disk.crash_after(k % 4)
        try:
            assert state_of(new_storage(disk).load()) in states[-2:]
        except SimCrash:
            pass
        disk, s, loaded = restart(disk)
        assert state_of(loaded) in states[-2:] and loaded.corrupt == []


def flip(disk: SimDisk, name: str, offset: int) -> None:
    """Flip a bit of a durable file (bit rot)."""
    raw = bytearray(disk.files(D)[name])
    raw[offset] ^= 0x10
    fd = disk.create(f"{D}/{name}")
    disk.write(fd, bytes(raw))
    disk.fsync(fd)
    disk.close(fd)


@pytest.mark.parametrize("seed", SEEDS)
def test_a_crash_while_replacing_the_epoch(seed: int) -> None:
    disk = SimDisk(seed)
    s = new_storage(disk)
    epoch = s.load().epoch
    t = Timestamp(5, 0, "n1")
    s.commit(CommitBatch(kv={"a": Register(t, b"AAAA"), "b": Register(t, b"BBBB")}))
    s.commit(CommitBatch(kv={"c": Register(t, b"CCCC")}))
    s.close()
    name = f"gossip.{s.generation}.log"
    flip(disk, name, disk.files(D)[name].index(b"AAAA"))
    disk.fsync_dir(D)
    for k in range(15):
        d = disk.crash()
        d.crash_after(k)
        try:
            new_storage(d).load()
        except SimCrash:
            pass
        d, s, loaded = restart(d)
        assert set(loaded.state) == {"b", "c"}
        assert loaded.epoch != epoch
        if loaded.corrupt:  # the crash struck before the switch: refused again
            assert "'a'" in loaded.corrupt[0]
        d, s, again = restart(d)
        assert again.corrupt == [] and again.epoch == loaded.epoch
        assert set(again.state) == {"b", "c"}


# -- a full disk, failing I/O ---------------------------------------------------------
def prepared(seed: int, upto: int) -> tuple[SimDisk, GossipStorage, list[CommitBatch]]:
    batches = scenario(seed)
    disk = SimDisk(seed)
    s = new_storage(disk)
    s.load()
    for b in batches[:upto]:
        s.commit(b)
    return disk, s, batches


def writes_of_commit(seed: int, i: int) -> int:
    disk, s, batches = prepared(seed, i)
    n = disk.op_counts.get("write", 0)
    s.commit(batches[i])
    return disk.op_counts["write"] - n


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_enospc_at_every_write_of_a_commit(seed: int) -> None:
    """The record's write: DiskFullError, the files as before, the same batch later goes
    in once. A compaction's writes: the commit is durable, the compaction postponed."""
    batches = scenario(seed)
    states = models(batches)
    reference = prepared(seed, len(batches))[1]
    compacting = 0
    for i in range(len(batches)):
        writes = writes_of_commit(seed, i)
        compacting += writes > 1
        for w in range(writes):
            disk, s, _ = prepared(seed, i)
            files, gen = disk.files(D), s.generation
            disk.fail_next("write", errno.ENOSPC, after=w)
            if w == 0:
                with pytest.raises(DiskFullError) as err:
                    s.commit(batches[i])
                assert err.value.errno == errno.ENOSPC
                msg = str(err.value)
                assert f"the disk at {D} is full (ENOSPC) writing gossip.{gen}.log" in msg
                assert "nothing from this batch is durable" in msg and "\n" not in msg
                assert disk.files(D) == files  # rolled back
                if i % 2:
                    disk, s, loaded = restart(disk)
                    assert state_of(loaded) == states[i]
                s.commit(batches[i])  # the same batch, retried
            else:  # in the compaction: postponed, its files removed; the commit is durable
                s.commit(batches[i])
                assert s.generation == gen and sorted(disk.files(D)) == sorted(files)
            for b in batches[i + 1 :]:
                s.commit(b)
            if w == 0:
                assert s.log_bytes == reference.log_bytes  # nothing duplicated
            disk, s, loaded = restart(disk)
            assert state_of(loaded) == states[-1] and loaded.corrupt == []
            check_files(disk, s)
    assert compacting >= 3


@pytest.mark.parametrize("seed", SEEDS)
def test_a_full_disk_then_freed_space(seed: int) -> None:
    """Commits go on in the preallocated space; the first that needs more fails (three
    times, the files unchanged), and goes in once space is freed."""
    disk, s, batches = prepared(seed, 2)
    states = models(batches)
    disk.full = True
    i = 2
    while True:
        files = disk.files(D)
        try:
            s.commit(batches[i])
        except DiskFullError:
            break
        i += 1
    assert i < len(batches) - 1
    for _ in range(3):
        assert disk.files(D) == files
        with pytest.raises(DiskFullError, match="is full"):
            s.commit(batches[i])
    disk.full = False
    for b in batches[i:]:
        s.commit(b)
    disk, s, loaded = restart(disk)
    assert state_of(loaded) == states[-1]


def test_a_full_disk_at_creation_is_a_clear_error() -> None:
    disk = SimDisk(3)
    disk.full = True
    with pytest.raises(DiskFullError) as err:
        new_storage(disk).load()
    assert str(err.value).startswith(f"the disk at {D} is full (ENOSPC) writing gossip.1.log")
    assert "free space and restart the node" in str(err.value)
    disk.full = False
    s = new_storage(disk)
    assert s.load().state == {}
    check_files(disk, s)


def refused_calls(s: GossipStorage) -> list[Callable[[], object]]:
    t = Timestamp(1, 0, "x")
    return [lambda: s.commit(CommitBatch(kv={"z": Register(t, b"z")})), s.load]


@pytest.mark.parametrize("kind", ["fsync", "fsync_dir", "write"])
@pytest.mark.parametrize("seed", SEEDS[:3])
def test_a_failing_fsync_or_write_is_fatal(seed: int, kind: str) -> None:
    """EIO on a write or an fsync (after which nothing can be trusted): FatalStorageError
    naming the file, every later call refused; a restart finds a prefix of the commits."""
    batches = scenario(seed)
    states = models(batches)
    hit = 0
    for i in range(len(batches)):
        disk, s, _ = prepared(seed, i)
        n = disk.op_counts.get(kind, 0)
        s.commit(batches[i])
        ops = disk.op_counts.get(kind, 0) - n
        for j in range(ops):
            hit += 1
            disk, s, _ = prepared(seed, i)
            disk.fail_next(kind, errno.EIO, after=j)
            with pytest.raises(FatalStorageError) as err:
                s.commit(batches[i])
            assert err.value.errno == errno.EIO
            msg = str(err.value)
            assert "(EIO)" in msg and D in msg and "\n" not in msg
            for later in refused_calls(s):
                with pytest.raises(FatalStorageError, match="refused"):
                    later()
            s.close()
            disk, s, loaded = restart(disk)  # the node stops and reloads from disk
            assert state_of(loaded) in states[i : i + 2] and loaded.corrupt == []
            check_goes_on(disk, s, state_of(loaded), loaded.epoch)
    assert hit >= 4  # (fsync_dir: two per compaction)


def test_a_failing_rollback_is_fatal() -> None:
    disk, s, batches = prepared(1, 4)
    states = models(batches)
    disk.fail_next("write", errno.ENOSPC)
    disk.fail_next("fsync")
    with pytest.raises(FatalStorageError, match="rolling back"):
        s.commit(batches[4])
    with pytest.raises(FatalStorageError, match="refused"):
        s.commit(batches[4])
    disk, s, loaded = restart(disk)
    assert state_of(loaded) in states[4:6]


# -- a property: random commits, crashes and full disks against the model ---------------
_fault = st.one_of(st.none(), st.none(), st.integers(0, 3), st.integers(0, 12), st.just("full"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), faults=st.lists(_fault, max_size=30))
def test_random_commits_crashes_and_full_disks_match_the_model(
    seed: int, faults: list[int | str | None]
) -> None:
    batches = scenario(seed, len(faults))
    disk = SimDisk(seed)
    s = new_storage(disk)
    epoch = s.load().epoch
    model = State()
    for b, fault in zip(batches, faults, strict=True):
        if fault == "full":
            disk.full = True
            files = disk.files(D)
            try:
                s.commit(b)
                model = model.committed(b)  # (in the preallocated space)
            except DiskFullError:
                assert disk.files(D) == files
                event("disk full")
            disk.full = False
        elif isinstance(fault, int):
            disk.crash_after(fault)
            try:
                s.commit(b)
                acceptable = [model.committed(b)]
            except SimCrash:
                event("crash in a commit")
                acceptable = [model, model.committed(b)]
            disk, s, loaded = restart(disk)
            assert state_of(loaded) in acceptable and loaded.epoch == epoch
            model = state_of(loaded)
        else:
            s.commit(b)
            model = model.committed(b)
    disk, s, loaded = restart(disk)
    assert state_of(loaded) == model and loaded.epoch == epoch and loaded.corrupt == []
