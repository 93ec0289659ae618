from __future__ import annotations

import threading
from pathlib import Path

import pytest

from raft.messages import Entry, EntryKind, HardState, Snapshot, SnapshotMeta
from raft.storage import CorruptStorageError, RaftStorage


def ents(first: int, last: int, term: int) -> list[Entry]:
    return [Entry(term, i, EntryKind.COMMAND, f"e{i}".encode()) for i in range(first, last + 1)]


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
    s = RaftStorage(tmp_path)
    s.load()
    s.save(HardState(2, None, 3), ents(1, 3, 1) + ents(4, 6, 2))
    s._write_snapshot(Snapshot(SnapshotMeta(5, 3), b"other history"))  # then "crash"
    s.close()
    _, snap, log = reopen(tmp_path)
    assert snap is not None and log == []  # entry 5 had term 2, not 3: drop the tail too


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
    raw = bytearray((tmp_path / "snapshot.bin").read_bytes())
    raw[-1] ^= 0x01
    (tmp_path / "snapshot.bin").write_bytes(bytes(raw))
    with pytest.raises(CorruptStorageError, match="snapshot"):
        reopen(tmp_path)


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
