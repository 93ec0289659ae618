from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from raft.messages import Entry, EntryKind, HardState, Snapshot, SnapshotMeta
from raft.storage import CorruptStorageError, RaftStorage


def ents(first: int, last: int, term: int) -> list[Entry]:
    return [Entry(term, i, EntryKind.COMMAND, f"e{i}".encode()) for i in range(first, last + 1)]


def test_roundtrip_and_suffix_overwrite(tmp_path: Path) -> None:
    s = RaftStorage(tmp_path)
    s.save(HardState(1, "n1", 0), ents(1, 5, 1))
    s.save(HardState(2, "n2", 3), ents(4, 6, 2))  # conflicting suffix from index 4
    s.close()
    hs, snap, log = RaftStorage(tmp_path).load()
    assert hs == HardState(2, "n2", 3)
    assert snap is None
    assert [(e.index, e.term) for e in log] == [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2)]


def test_compaction_keeps_snapshot_and_tail(tmp_path: Path) -> None:
    s = RaftStorage(tmp_path)
    s.save(HardState(1, None, 8), ents(1, 10, 1))
    s.compact(Snapshot(SnapshotMeta(8, 1), b"state@8"))
    _hs, snap, log = s.load()
    assert snap == Snapshot(SnapshotMeta(8, 1), b"state@8")
    assert [e.index for e in log] == [9, 10]


def test_received_snapshot_replaces_covered_entries(tmp_path: Path) -> None:
    s = RaftStorage(tmp_path)
    s.save(HardState(1, None, 0), ents(1, 3, 1))
    s.save(HardState(3, None, 20), snapshot=Snapshot(SnapshotMeta(20, 3), b"s"))
    _hs, snap, log = s.load()
    assert snap is not None and snap.meta.index == 20
    assert log == []


@pytest.mark.parametrize("column", ["data", "term"])
def test_corrupt_entry_is_refused(tmp_path: Path, column: str) -> None:
    s = RaftStorage(tmp_path)
    s.save(HardState(1, None, 2), ents(1, 3, 1))
    s.close()
    db = sqlite3.connect(tmp_path / "raft.sqlite3")
    value = "X'00'" if column == "data" else "7"
    db.execute(f"UPDATE log SET {column} = {value} WHERE idx = 3")
    db.commit()
    db.close()
    with pytest.raises(CorruptStorageError, match="entry 3 fails its checksum"):
        RaftStorage(tmp_path).load()


def test_corrupt_hard_state_is_refused(tmp_path: Path) -> None:
    s = RaftStorage(tmp_path)
    s.save(HardState(4, "n2", 0))
    s.close()
    db = sqlite3.connect(tmp_path / "raft.sqlite3")
    db.execute("UPDATE hard_state SET vote = 'n3'")
    db.commit()
    db.close()
    with pytest.raises(CorruptStorageError, match="hard state"):
        RaftStorage(tmp_path).load()


def test_commit_beyond_log_is_refused(tmp_path: Path) -> None:
    s = RaftStorage(tmp_path)
    s.save(HardState(1, None, 0), ents(1, 2, 1))
    s.close()
    db = sqlite3.connect(tmp_path / "raft.sqlite3")
    db.execute("DELETE FROM log WHERE idx = 2")
    db.commit()
    db.close()
    s = RaftStorage(tmp_path)
    s.save(HardState(1, None, 1))
    assert s.load()[0].commit == 1


def test_gap_is_refused(tmp_path: Path) -> None:
    s = RaftStorage(tmp_path)
    s.save(HardState(1, None, 0), ents(1, 3, 1))
    s.close()
    db = sqlite3.connect(tmp_path / "raft.sqlite3")
    db.execute("DELETE FROM log WHERE idx = 2")
    db.commit()
    db.close()
    with pytest.raises(CorruptStorageError, match="gap"):
        RaftStorage(tmp_path).load()
