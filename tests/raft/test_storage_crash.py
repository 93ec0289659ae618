"""RaftStorage on a simulated disk: crashes at every write boundary, torn writes, a full
disk, failing fsyncs (issue 12)."""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from caplab.disk import SimCrash, SimDisk
from raft.messages import Entry, EntryKind, HardState, Snapshot, SnapshotMeta
from raft.storage import FatalStorageError, RaftStorage, RetryableStorageError

D = "/data/n1"
SEEDS = range(8)


def ents(first: int, last: int, term: int, tag: str = "") -> list[Entry]:
    return [
        Entry(term, i, EntryKind.COMMAND, f"e{i}t{term}{tag}".encode())
        for i in range(first, last + 1)
    ]


NO_HARD_STATE = HardState(0, None, 0)


@dataclass(frozen=True)
class State:
    """What load() returns, plus the recovering flag."""

    hs: HardState = NO_HARD_STATE
    snap: Snapshot | None = None
    log: tuple[Entry, ...] = ()
    recovering: bool = True

    @property
    def last(self) -> int:
        return self.log[-1].index if self.log else (self.snap.meta.index if self.snap else 0)

    def term_at(self, index: int) -> int:
        if self.snap is not None and index == self.snap.meta.index:
            return self.snap.meta.term
        return next(e.term for e in self.log if e.index == index)

    # the model of the durable state: what each storage call makes of it
    def saved(self, hs: HardState | None, entries: Sequence[Entry]) -> State:
        log = list(self.log)
        if entries:
            first = entries[0].index
            log = [e for e in log if e.index < first]
        return replace(self, hs=hs or self.hs, log=(*log, *entries))

    def installed(self, hs: HardState | None, snap: Snapshot, entries: Sequence[Entry]) -> State:
        return replace(self, hs=hs or self.hs, snap=snap, log=tuple(entries))

    def compacted(self, snap: Snapshot) -> State:
        if self.snap is not None and snap.meta.index <= self.snap.meta.index:
            return self
        return replace(self, snap=snap, log=tuple(e for e in self.log if e.index > snap.meta.index))


def load(disk: SimDisk) -> tuple[RaftStorage, State]:
    s = RaftStorage(D, disk)
    hs, snap, log = s.load()
    return s, State(hs, snap, tuple(log), s.recovering)


def restart(disk: SimDisk) -> tuple[SimDisk, RaftStorage, State]:
    """Power loss now (after the last call returned), then a new RaftStorage loads."""
    after = disk.crash()
    s, state = load(after)
    return after, s, state


@dataclass
class Op:
    """One storage call, and the durable states a crash in the middle of it may leave."""

    name: str
    call: Callable[[RaftStorage], None]
    model: Callable[[State], State]
    #: entries appended by a plain save: a torn write may leave a prefix of them durable
    #: (never acknowledged, so no loss), with the hard state of before (it is written last)
    entries: Sequence[Entry] = field(default_factory=tuple)

    def acceptable(self, before: State) -> list[State]:
        states = [before, self.model(before)]
        states += [before.saved(None, self.entries[:j]) for j in range(1, len(self.entries) + 1)]
        return states


def save(hs: HardState | None, entries: Sequence[Entry] = ()) -> Op:
    return Op(
        f"save({hs}, {len(entries)} entries)",
        lambda s: s.save(hs, entries),
        lambda st: st.saved(hs, entries),
        entries,
    )


def install(hs: HardState | None, snap: Snapshot, entries: Sequence[Entry] = ()) -> Op:
    return Op(
        f"install({snap.meta})",
        lambda s: s.save(hs, entries, snap),
        lambda st: st.installed(hs, snap, entries),
    )


def compact(snap: Snapshot) -> Op:
    return Op(f"compact({snap.meta})", lambda s: s.compact(snap), lambda st: st.compacted(snap))


def mark_recovered() -> Op:
    return Op(
        "mark_recovered", lambda s: s.mark_recovered(), lambda st: replace(st, recovering=False)
    )


def snap(index: int, term: int) -> Snapshot:
    return Snapshot(SnapshotMeta(index, term), f"state@{index}t{term}".encode())


# save entries, save a hard state, install a snapshot whose index the old log covers with
# another term (index 6: term 2 in the log, 3 in the snapshot), append after it, compact,
# append, overwrite a suffix, mark recovered
SCENARIO = [
    save(HardState(2, "n1", 0), ents(1, 4, 1) + ents(5, 8, 2)),
    save(HardState(3, "n2", 3)),
    install(HardState(3, "n2", 6), snap(6, 3)),
    save(None, ents(7, 9, 3)),
    compact(snap(8, 3)),
    save(HardState(3, "n2", 9), ents(10, 10, 3)),
    save(HardState(4, None, 9), ents(10, 11, 4)),
    mark_recovered(),
]


def run_until_crash(disk: SimDisk, ops: Sequence[Op]) -> tuple[int, list[State]]:
    """Load, then the ops; -> (how many completed, the model state before each op and
    after the last one). A SimCrash stops it."""
    states = [State()]
    try:
        s, loaded = load(disk)
        assert loaded == states[0]
        for op in ops:
            op.call(s)
            states.append(op.model(states[-1]))
    except SimCrash:
        return len(states) - 1, states
    return len(ops), states


def check_files(disk: SimDisk, s: RaftStorage) -> None:
    """After load: only the current generation's files (leftovers of others removed)."""
    g = s.generation
    current = (
        {"raft.log", "snapshot.bin"} if g == 0 else {"CURRENT", f"raft.{g}.log", f"snapshot.{g}"}
    )
    assert set(disk.files(D)) - {"recovering"} <= current


def check_goes_on(disk: SimDisk, s: RaftStorage, state: State) -> None:
    """After recovering from a crash: append, compact, append, restart: all as expected."""
    check_files(disk, s)
    last, commit = state.last, state.hs.commit
    s.save(HardState(9, "n3", commit), ents(last + 1, last + 3, 9, "x"))
    s.compact(snap(last + 1, 9))
    s.save(None, ents(last + 4, last + 4, 9, "x"))
    expected = State(
        HardState(9, "n3", commit), snap(last + 1, 9), tuple(ents(last + 2, last + 4, 9, "x"))
    )
    for _ in range(2):
        disk, s, again = restart(disk)
        assert again == replace(expected, recovering=state.recovering)
        check_files(disk, s)


def test_scenario_keeps_everything_without_crashes() -> None:
    disk = SimDisk(0)
    done, states = run_until_crash(disk, SCENARIO)
    assert done == len(SCENARIO)
    disk, _, state = restart(disk)
    assert state == states[-1]
    assert state.snap == snap(8, 3) and [e.index for e in state.log] == [9, 10, 11]
    assert sorted(disk.files(D)) == ["CURRENT", "raft.2.log", "snapshot.2"]


@pytest.mark.parametrize("seed", SEEDS)
def test_crash_at_every_write_boundary(seed: int) -> None:
    dry = SimDisk(seed)
    assert run_until_crash(dry, SCENARIO)[0] == len(SCENARIO)
    total = dry.mutations
    assert total > 40
    interrupted = set()
    for k in range(total + 1):
        disk = SimDisk(seed * 1000 + k)
        disk.crash_after(k)
        done, states = run_until_crash(disk, SCENARIO)
        disk, s, state = restart(disk)
        if done == len(SCENARIO):
            assert k == total and state == states[-1]
        else:
            interrupted.add(SCENARIO[done].name)
            acceptable = SCENARIO[done].acceptable(states[-1])
            assert state in acceptable, f"crash at mutation {k} in {SCENARIO[done].name}"
        check_goes_on(disk, s, state)
    assert interrupted == {op.name for op in SCENARIO}  # every op was crashed into


@pytest.mark.parametrize("same_term", [True, False])
def test_crash_during_install_never_leaves_stale_entries_behind_the_snapshot(
    same_term: bool,
) -> None:
    """Issue 12: old versions wrote snapshot.bin, then rewrote raft.log; a crash between
    the two left the old entries in the log file, behind which the restarted node appended
    ("gap before entry 21" at the next compaction and every later start), or which made
    the next load drop acknowledged entries (the old log's term at the snapshot index
    differs from the snapshot's). Crash the install at every point, append, restart."""
    before = ents(1, 3, 1) if same_term else ents(1, 4, 1) + ents(5, 6, 2)
    meta = SnapshotMeta(20, 3) if same_term else SnapshotMeta(5, 3)
    for seed in SEEDS:
        for k in range(40):
            disk = SimDisk(seed * 100 + k)
            s, _ = load(disk)
            s.save(HardState(2, None, 0), before)
            disk.crash_after(k)
            try:
                s.save(HardState(3, None, meta.index), snapshot=Snapshot(meta, b"s"))
            except SimCrash:
                disk, s, state = restart(disk)
            else:
                disk, s, state = restart(disk)
                assert state.snap is not None
                break
            if state.snap is None:  # the old state
                assert list(state.log) == before
                continue
            assert state.snap.meta == meta and state.log == ()
            after = ents(meta.index + 1, meta.index + 2, 3)
            s.save(HardState(3, None, meta.index), after)  # acknowledged
            disk, s, state = restart(disk)
            assert list(state.log) == after
            s.compact(Snapshot(SnapshotMeta(meta.index + 1, 3), b"s2"))
            disk, s, state = restart(disk)
            assert list(state.log) == after[1:]
        else:
            pytest.fail("the install never completed")


# -- a full disk, failing I/O ---------------------------------------------------------
def prepared(seed: int) -> tuple[SimDisk, RaftStorage, State]:
    """A node at generation 1 with a snapshot, log entries and a hard state."""
    disk = SimDisk(seed)
    s, state = load(disk)
    for op in (save(HardState(1, "n1", 2), ents(1, 5, 1)), compact(snap(2, 1))):
        op.call(s)
        state = op.model(state)
    op = save(None, ents(6, 7, 1))
    op.call(s)
    return disk, s, op.model(state)


FAULTY_OPS = [
    save(HardState(2, "n1", 5), ents(6, 9, 2)),  # overwrites a suffix
    save(HardState(2, "n2", 5)),
    install(HardState(3, None, 20), snap(20, 3), ents(21, 21, 3)),
    install(None, snap(7, 2)),  # the log has term 1 at index 7
    compact(snap(5, 1)),
]


def writes_of(op: Op) -> int:
    disk, s, _ = prepared(0)
    n = disk.op_counts.get("write", 0)
    op.call(s)
    return disk.op_counts["write"] - n


@pytest.mark.parametrize("op", FAULTY_OPS, ids=lambda op: op.name)
def test_enospc_at_every_write_is_retryable_and_changes_nothing(op: Op) -> None:
    writes = writes_of(op)
    assert writes == (1 if op.name.startswith("save") else 3)
    for w in range(writes):
        for seed in SEEDS:
            for then_crash in (False, True):
                disk, s, before = prepared(seed)
                files = disk.files(D)
                disk.fail_next("write", errno.ENOSPC, after=w)
                with pytest.raises(RetryableStorageError) as err:
                    op.call(s)
                assert err.value.errno == errno.ENOSPC
                assert "disk full (ENOSPC) writing " in str(err.value)
                assert "nothing of this write is durable" in str(err.value)
                assert disk.files(D) == files  # partial writes rolled back, temp files gone
                if then_crash:
                    disk, s, state = restart(disk)
                    assert state == before
                    check_goes_on(disk, s, state)
                else:
                    op.call(s)  # the same call, retried
                    disk, s, state = restart(disk)
                    assert state == op.model(before)
                    check_goes_on(disk, s, state)


@pytest.mark.parametrize("op", FAULTY_OPS, ids=lambda op: op.name)
def test_a_full_disk_then_freed_space(op: Op) -> None:
    for seed in SEEDS:
        disk, s, before = prepared(seed)
        files = disk.files(D)
        disk.full = True
        for _ in range(3):
            with pytest.raises(RetryableStorageError, match="disk full"):
                op.call(s)
            assert disk.files(D) == files
        disk.full = False
        op.call(s)
        s.save(None, ents(100, 100, 9)[:0])  # (nothing to save: no-op)
        disk, s, state = restart(disk)
        assert state == op.model(before)


def refused_calls(s: RaftStorage) -> list[Callable[[], object]]:
    return [
        lambda: s.save(HardState(9, None, 0)),
        lambda: s.compact(snap(7, 1)),
        lambda: s.save(None, (), snap(30, 9)),
        s.load,
        s.mark_recovered,
    ]


@pytest.mark.parametrize("op", FAULTY_OPS, ids=lambda op: op.name)
@pytest.mark.parametrize("kind", ["fsync", "fsync_dir"])
def test_a_failing_fsync_is_fatal(op: Op, kind: str) -> None:
    disk, s, _ = prepared(0)
    n = disk.op_counts.get(kind, 0)
    op.call(s)
    syncs = disk.op_counts.get(kind, 0) - n
    if kind == "fsync_dir":
        assert syncs == (0 if op.name.startswith("save") else 2)
    for i in range(syncs):
        for seed in SEEDS:
            disk, s, before = prepared(seed)
            disk.fail_next(kind, errno.EIO, after=i)
            with pytest.raises(FatalStorageError) as err:
                op.call(s)
            assert err.value.errno == errno.EIO
            for later in refused_calls(s):
                with pytest.raises(FatalStorageError, match="refused"):
                    later()
            s.close()
            disk, s, state = restart(disk)  # the node exits and reloads from disk
            assert state in op.acceptable(before)
            check_goes_on(disk, s, state)


def test_a_failed_save_leaves_no_trace_in_a_later_compaction() -> None:
    """The hard state of a failed save must not be made durable by a later rewrite."""
    for op in (compact(snap(5, 1)), install(None, snap(30, 4))):
        disk, s, before = prepared(3)
        disk.full = True
        with pytest.raises(RetryableStorageError):
            s.save(HardState(7, "n7", 7), ents(8, 8, 7))
        disk.full = False
        op.call(s)
        disk, s, state = restart(disk)
        assert state == op.model(before) and state.hs == HardState(1, "n1", 2)


def test_a_failing_rollback_is_fatal() -> None:
    disk, s, before = prepared(1)
    disk.full = True
    disk.fail_next("truncate")
    with pytest.raises(FatalStorageError, match="rolling back"):
        s.save(None, ents(8, 8, 1))
    with pytest.raises(FatalStorageError):
        s.save(None, ents(8, 8, 1))
    disk.full = False
    disk, s, state = restart(disk)
    assert state in save(None, ents(8, 8, 1)).acceptable(before)


def test_a_failed_rename_of_the_manifest_is_retryable() -> None:
    disk, s, before = prepared(2)
    files = disk.files(D)
    disk.fail_next("rename", errno.EIO)
    with pytest.raises(RetryableStorageError, match=r"renaming CURRENT\.tmp"):
        s.compact(snap(5, 1))
    assert disk.files(D) == files
    s.compact(snap(5, 1))
    disk, s, state = restart(disk)
    assert state == before.compacted(snap(5, 1))


# -- the recovering marker ------------------------------------------------------------
def test_a_blank_directory_is_recovering_until_marked_recovered() -> None:
    for seed in SEEDS:
        for k in range(12):  # crash anywhere in the first load(s): still recovering
            disk = SimDisk(seed)
            disk.crash_after(k)
            try:
                s, state = load(disk)
                assert state.recovering
                s.save(HardState(1, None, 0), ents(1, 2, 1))
            except SimCrash:
                pass
            disk, s, state = restart(disk)
            assert state.recovering
            assert "recovering" in disk.files(D)
        s.mark_recovered()
        assert not s.recovering
        disk, s, state = restart(disk)
        assert not state.recovering and "recovering" not in disk.files(D)


# -- a property: random calls and crashes against a model ------------------------------
_call = st.one_of(
    st.tuples(st.just("append"), st.integers(0, 3), st.integers(1, 3), st.booleans()),
    st.tuples(st.just("hard_state"), st.integers(0, 4), st.integers(1, 3), st.booleans()),
    st.tuples(st.just("install"), st.integers(0, 4), st.integers(0, 0), st.booleans()),
    st.tuples(st.just("compact"), st.integers(0, 2), st.integers(0, 0), st.booleans()),
)
#: what strikes during the call: nothing, a crash after that many more mutations (or
#: right after the call), a full disk
_fault = st.one_of(st.none(), st.none(), st.integers(0, 2), st.integers(0, 15), st.just("full"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    script=st.lists(st.tuples(_call, _fault), max_size=40),
)
def test_random_calls_and_crashes_match_a_model(
    seed: int, script: list[tuple[tuple[str, int, int, bool], int | str | None]]
) -> None:
    disk = SimDisk(seed)
    s, model = load(disk)
    term = 1
    for n, ((kind, a, b, flag), fault) in enumerate(script):
        last, commit = model.last, model.hs.commit
        snap_index = model.snap.meta.index if model.snap else 0
        if kind == "append":  # from last + 1, or overwriting a suffix after the commit index
            term += flag
            start = max(commit + 1, last + 1 - a)
            op = save(
                HardState(term, "n1", commit) if flag else None,
                ents(start, start + b - 1, term, f"#{n}"),
            )
        elif kind == "hard_state":
            op = save(HardState(term, f"n{b}", min(last, commit + a)))
        elif kind == "install":
            index = commit + 1 + a
            if flag and snap_index < index <= last:
                t = model.term_at(index)  # agrees with the log
            else:
                term += 1
                t = term  # (where the log has the index: another term there)
            op = install(HardState(term, None, index), snap(index, t))
        else:
            if commit > snap_index:
                index = max(snap_index + 1, commit - a)
                op = compact(snap(index, model.term_at(index)))
            elif flag and snap_index:  # a stale one: ignored
                op = compact(snap(snap_index, 1))
            else:
                continue
        before = model
        event(kind)
        if fault == "full":
            disk.full = True
            files = disk.files(D)
            try:
                op.call(s)
            except RetryableStorageError:
                event(f"disk full in {kind}")
                assert disk.files(D) == files
            else:
                assert op.model(model) == before  # (it had nothing to write)
            disk.full = False
        elif isinstance(fault, int):
            disk.crash_after(fault)
            try:
                op.call(s)
                acceptable = [op.model(before)]
            except SimCrash:
                event(f"crash in {kind}")
                acceptable = op.acceptable(before)
            disk, s, model = restart(disk)
            assert model in acceptable, f"after {op.name}"
        else:
            op.call(s)
            model = op.model(model)
    disk, s, state = restart(disk)
    assert state == model
