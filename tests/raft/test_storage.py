from __future__ import annotations

import struct
import threading
from pathlib import Path
from zlib import crc32

import pytest

from raft.messages import Entry, EntryKind, HardState, Snapshot, SnapshotMeta
from raft.storage import CorruptStorageError, RaftStorage


def ents(first: int, last: int, term: int) -> list[Entry]:
    return [Entry(term, i, EntryKind.COMMAND, f"e{i}".encode()) for i in range(first, last + 1)]


def old_snapshot_file(snap: Snapshot) -> bytes:
    """snapshot.bin as old versions wrote it (magic, index, term, length, crc32, data)."""
    m = snap.meta
    head = struct.pack(">8sQQQI", b"CAPSNAP1", m.index, m.term, len(snap.data), crc32(snap.data))
    return head + snap.data


def reopen(path: Path) -> tuple[HardState, Snapshot | None, list[Entry]]:
    s = RaftStorage(path)
    try:
        return s.load()
    finally:
        s.close()


def test_roundtrip_and_suffix_overwrite(tmp_path: Path) -> None:
    s = RaftStorage(tmp_path)
    s.load()
    s.save(HardState(1, "n1", 0), ents(1, 5, 1))
    s.save(HardState(2, "n2", 3), ents(4, 6, 2))  # conflicting suffix from index 4
    s.close()
    hs, snap, log = reopen(tmp_path)
    assert hs == HardState(2, "n2", 3)
    assert snap is None
    assert [(e.index, e.term) for e in log] == [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2)]
    assert log[3].data == b"e4"


def test_truncation_to_a_shorter_log(tmp_path: Path) -> None:
    s = RaftStorage(tmp_path)
    s.load()
    s.save(HardState(1, None, 0), ents(1, 5, 1))
    s.save(HardState(2, None, 0), ents(2, 2, 2))
    s.close()
    assert [(e.index, e.term) for e in reopen(tmp_path)[2]] == [(1, 1), (2, 2)]


def test_compaction_keeps_snapshot_and_tail(tmp_path: Path) -> None:
    s = RaftStorage(tmp_path)
    s.load()
    s.save(HardState(1, None, 8), ents(1, 10, 1))
    s.compact(Snapshot(SnapshotMeta(8, 1), b"state@8"))
    s.save(None, ents(11, 11, 1))
    s.close()
    hs, snap, log = reopen(tmp_path)
    assert snap == Snapshot(SnapshotMeta(8, 1), b"state@8")
    assert [e.index for e in log] == [9, 10, 11]
    assert hs.commit == 8


def test_received_snapshot_replaces_the_log(tmp_path: Path) -> None:
    s = RaftStorage(tmp_path)
    s.load()
    s.save(HardState(1, None, 0), ents(1, 3, 1))
    s.save(HardState(3, None, 20), snapshot=Snapshot(SnapshotMeta(20, 3), b"s"))
    s.save(None, ents(21, 22, 3))
    s.close()
    _, snap, log = reopen(tmp_path)
    assert snap is not None and snap.meta.index == 20
    assert [e.index for e in log] == [21, 22]


def test_crash_between_snapshot_and_log_rewrite(tmp_path: Path) -> None:
    """What old versions left after a crash between writing snapshot.bin and rewriting
    raft.log: the old log behind a newer snapshot that contradicts it at its index."""
    s = RaftStorage(tmp_path)
    s.load()
    s.save(HardState(2, None, 3), ents(1, 3, 1) + ents(4, 6, 2))
    s.close()
    (tmp_path / "snapshot.bin").write_bytes(old_snapshot_file(Snapshot(SnapshotMeta(5, 3), b"o")))
    _, snap, log = reopen(tmp_path)
    assert snap is not None and log == []  # entry 5 had term 2, not 3: drop the tail too


def test_old_layout_mid_install_is_migrated_and_appends_survive(tmp_path: Path) -> None:
    """Issue 12, on the layout of old versions: a crash between writing snapshot.bin and
    rewriting raft.log left entries the snapshot covers (1..3, snapshot at 20), or entries
    contradicting it (term 2 at the snapshot's index 5, snapshot term 3). Old versions
    dropped them only in memory and appended behind them: "gap before entry 21" on every
    later start, or acknowledged entries 6..7 silently dropped at the next load."""
    cases = [
        (ents(1, 3, 1), SnapshotMeta(20, 3), ents(21, 22, 3)),
        (ents(1, 4, 1) + ents(5, 6, 2), SnapshotMeta(5, 3), ents(6, 7, 3)),
    ]
    for n, (before, meta, after) in enumerate(cases):
        d = tmp_path / str(n)
        s = RaftStorage(d)
        s.load()
        s.save(HardState(2, None, 0), before)
        s.close()
        (d / "snapshot.bin").write_bytes(old_snapshot_file(Snapshot(meta, b"s")))  # "crash"
        s = RaftStorage(d)
        _, snap, log = s.load()
        assert snap is not None and snap.meta == meta and log == []
        s.save(HardState(3, None, meta.index), after)  # acknowledged
        s.close()
        for _ in range(2):
            hs, snap, log = reopen(d)
            assert snap is not None and snap.meta == meta
            assert log == after and hs == HardState(3, None, meta.index)
        s = RaftStorage(d)
        s.load()
        s.compact(Snapshot(SnapshotMeta(after[0].index, 3), b"s2"))
        s.close()
        assert reopen(d)[2] == after[1:]
        assert sorted(p.name for p in d.iterdir()) == [
            "CURRENT",
            "raft.2.log",
            "recovering",  # (the directory was blank at the first load)
            "snapshot.2",
        ]


def test_old_layout_already_broken_by_the_old_bug_loads(tmp_path: Path) -> None:
    """A raft.log that old versions already appended to behind a newer snapshot.bin:
    entries 1..3, then 21..22 after an installed snapshot at 20. It loads (the gap right
    after the snapshot is skipped), without the snapshot it is refused."""
    s = RaftStorage(tmp_path)
    s.load()
    s.save(HardState(1, None, 0), ents(1, 3, 1))
    s.save(HardState(3, None, 20), ents(21, 22, 3))  # (storage does not check for gaps)
    s.close()
    with pytest.raises(CorruptStorageError, match="gap before entry 21") as err:
        reopen(tmp_path)
    assert "it rejoins as a recovering replica whose vote elects no leader" in str(err.value)
    (tmp_path / "snapshot.bin").write_bytes(old_snapshot_file(Snapshot(SnapshotMeta(20, 3), b"")))
    for _ in range(2):
        hs, snap, log = reopen(tmp_path)
        assert snap is not None and snap.meta.index == 20
        assert log == ents(21, 22, 3) and hs == HardState(3, None, 20)
    assert not (tmp_path / "raft.log").exists()  # migrated


def test_torn_tail_is_dropped_not_applied(tmp_path: Path) -> None:
    s = RaftStorage(tmp_path)
    s.load()
    s.save(HardState(1, None, 2), ents(1, 3, 1))
    s.close()
    size = (tmp_path / "raft.log").stat().st_size
    with open(tmp_path / "raft.log", "ab") as f:
        f.write(b"\x00\x00\x01\x00\xde\xad")  # a torn record header + partial payload
    hs, _, log = reopen(tmp_path)
    assert [e.index for e in log] == [1, 2, 3] and hs.commit == 2
    assert (tmp_path / "raft.log").stat().st_size == size  # truncated back
    s = RaftStorage(tmp_path)
    s.load()
    s.save(None, ents(4, 4, 1))  # appends cleanly after the torn tail is gone
    s.close()
    assert [e.index for e in reopen(tmp_path)[2]] == [1, 2, 3, 4]


def test_torn_last_record_with_bad_crc_is_dropped(tmp_path: Path) -> None:
    s = RaftStorage(tmp_path)
    s.load()
    s.save(HardState(1, None, 0), ents(1, 2, 1))
    s.save(None, ents(3, 3, 1))
    s.close()
    raw = bytearray((tmp_path / "raft.log").read_bytes())
    raw[-1] ^= 0xFF  # the last record's payload was not fully written
    (tmp_path / "raft.log").write_bytes(bytes(raw))
    assert [e.index for e in reopen(tmp_path)[2]] == [1, 2]


def test_corruption_in_the_middle_is_refused(tmp_path: Path) -> None:
    s = RaftStorage(tmp_path)
    s.load()
    s.save(HardState(1, None, 3), ents(1, 3, 1))
    s.save(None, ents(4, 6, 1))
    s.close()
    raw = bytearray((tmp_path / "raft.log").read_bytes())
    raw[20] ^= 0x01  # inside entry 1's payload; valid records follow
    (tmp_path / "raft.log").write_bytes(bytes(raw))
    with pytest.raises(CorruptStorageError, match="corrupt"):
        reopen(tmp_path)


def test_corrupt_snapshot_is_refused(tmp_path: Path) -> None:
    s = RaftStorage(tmp_path)
    s.load()
    s.save(HardState(1, None, 2), ents(1, 2, 1))
    s.compact(Snapshot(SnapshotMeta(2, 1), b"state"))
    s.close()
    (snap_file,) = tmp_path.glob("snapshot*")
    raw = bytearray(snap_file.read_bytes())
    raw[-1] ^= 0x01
    snap_file.write_bytes(bytes(raw))
    with pytest.raises(CorruptStorageError, match="snapshot") as err:
        reopen(tmp_path)
    assert "move this node's data directory aside" in str(err.value)


def test_commit_beyond_log_is_refused(tmp_path: Path) -> None:
    s = RaftStorage(tmp_path)
    s.load()
    s.save(HardState(1, None, 5), ents(1, 2, 1))
    s.close()
    with pytest.raises(CorruptStorageError, match="beyond the last durable entry"):
        reopen(tmp_path)


def test_a_save_during_compaction_is_not_lost(tmp_path: Path) -> None:
    """The node saves from two threads (disk thread, event loop) while compaction runs on
    the disk thread: a save must never land in the old log between compaction reading it
    and replacing it."""
    s = RaftStorage(tmp_path)
    s.load()
    s.save(HardState(1, None, 8), ents(1, 10, 1))
    read_log = s._replay
    saver: threading.Thread | None = None

    def replay_then_save_from_another_thread() -> tuple[HardState, list[Entry], int]:
        nonlocal saver
        out = read_log()  # compaction has read the log it is about to replace
        saver = threading.Thread(target=s.save, args=(None, ents(11, 11, 1)))
        saver.start()
        saver.join(timeout=0.2)  # unserialized, the save completes here, into the old log
        return out

    s._replay = replay_then_save_from_another_thread  # type: ignore[method-assign]
    s.compact(Snapshot(SnapshotMeta(8, 1), b"state@8"))
    assert saver is not None
    saver.join(timeout=10)
    assert not saver.is_alive()
    s.close()
    _, snap, log = reopen(tmp_path)
    assert snap is not None and snap.meta.index == 8
    assert [e.index for e in log] == [9, 10, 11]  # entry 11 survived the compaction
