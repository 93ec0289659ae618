"""Durable Raft state: log entries, hard state (term, vote, commit) and the latest snapshot.

Theory of operation: one SQLite database per node in WAL mode with
synchronous=FULL, so that `save()` returns only after its transaction is on
disk (fsync of the WAL). The node calls `save()` with everything a Ready asks to
persist, and only then sends the Ready's messages or acknowledges clients: a
vote, an append response or a committed write is never acknowledged before the
state it promises is durable.

SQLite discards a torn WAL tail by its own frame checksums (such a transaction
was never acknowledged). On top of that every log row carries a CRC-32 of
(index, term, kind, data), and the snapshot row a CRC-32 of its data; `load()`
verifies all of them and refuses to start on a mismatch (CorruptStorageError),
so corrupt records are never silently applied.
"""

from __future__ import annotations

import sqlite3
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

from raft.messages import Entry, EntryKind, HardState, Snapshot, SnapshotMeta

_SCHEMA = """
CREATE TABLE IF NOT EXISTS log (idx INTEGER PRIMARY KEY, term INTEGER NOT NULL,
  kind INTEGER NOT NULL, data BLOB NOT NULL, crc INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS hard_state (id INTEGER PRIMARY KEY CHECK (id = 1),
  term INTEGER NOT NULL, vote TEXT, commit_idx INTEGER NOT NULL, crc INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS snapshot (id INTEGER PRIMARY KEY CHECK (id = 1),
  idx INTEGER NOT NULL, term INTEGER NOT NULL, data BLOB NOT NULL, crc INTEGER NOT NULL);
"""


class CorruptStorageError(RuntimeError):
    """The durable state failed its checksums; the node must not start from it."""


def _entry_crc(index: int, term: int, kind: int, data: bytes) -> int:
    return zlib.crc32(data, zlib.crc32(struct.pack(">QQB", index, term, kind)))


def _hs_crc(term: int, vote: str | None, commit: int) -> int:
    return zlib.crc32((vote or "").encode(), zlib.crc32(struct.pack(">QQ", term, commit)))


def _snap_crc(index: int, term: int, data: bytes) -> int:
    return zlib.crc32(data, zlib.crc32(struct.pack(">QQ", index, term)))


class RaftStorage:
    def __init__(self, data_dir: str | Path) -> None:
        path = Path(data_dir)
        path.mkdir(parents=True, exist_ok=True)
        self.path = path / "raft.sqlite3"
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA wal_autocheckpoint=4000")
        self.db.executescript(_SCHEMA)

    def load(self) -> tuple[HardState, Snapshot | None, list[Entry]]:
        """Everything durable, verified; raises CorruptStorageError on any mismatch."""
        hs = HardState(0, None, 0)
        row = self.db.execute("SELECT term, vote, commit_idx, crc FROM hard_state").fetchone()
        if row is not None:
            term, vote, commit, crc = row
            if _hs_crc(term, vote, commit) != crc:
                raise CorruptStorageError(f"{self.path}: hard state fails its checksum")
            hs = HardState(term, vote, commit)
        snap = None
        row = self.db.execute("SELECT idx, term, data, crc FROM snapshot").fetchone()
        if row is not None:
            idx, term, data, crc = row
            if _snap_crc(idx, term, data) != crc:
                raise CorruptStorageError(f"{self.path}: snapshot at {idx} fails its checksum")
            snap = Snapshot(SnapshotMeta(idx, term), bytes(data))
        entries: list[Entry] = []
        after = snap.meta.index if snap else 0
        expected = after + 1
        for idx, term, kind, data, crc in self.db.execute(
            "SELECT idx, term, kind, data, crc FROM log WHERE idx > ? ORDER BY idx", (after,)
        ):
            if _entry_crc(idx, term, kind, data) != crc:
                raise CorruptStorageError(
                    f"{self.path}: log entry {idx} fails its checksum; refusing to start "
                    "(restore this node's data directory or wipe it to rejoin as a new replica)"
                )
            if idx != expected:
                raise CorruptStorageError(f"{self.path}: log has a gap before entry {idx}")
            entries.append(Entry(term, idx, EntryKind(kind), bytes(data)))
            expected += 1
        if hs.commit > (entries[-1].index if entries else after):
            raise CorruptStorageError(
                f"{self.path}: commit index {hs.commit} is beyond the last durable entry"
            )
        return hs, snap, entries

    def save(
        self,
        hard_state: HardState | None = None,
        entries: Sequence[Entry] = (),
        snapshot: Snapshot | None = None,
    ) -> None:
        """Persist atomically and durably (returns after fsync)."""
        if hard_state is None and not entries and snapshot is None:
            return
        cur = self.db.cursor()
        cur.execute("BEGIN")
        try:
            if snapshot is not None:
                self._put_snapshot(cur, snapshot)
                # A received snapshot replaces the whole durable log (the core
                # restarts its in-memory log empty after it).
                cur.execute("DELETE FROM log")
            if entries:
                cur.execute("DELETE FROM log WHERE idx >= ?", (entries[0].index,))
                cur.executemany(
                    "INSERT INTO log (idx, term, kind, data, crc) VALUES (?, ?, ?, ?, ?)",
                    [
                        (
                            e.index,
                            e.term,
                            int(e.kind),
                            e.data,
                            _entry_crc(e.index, e.term, int(e.kind), e.data),
                        )
                        for e in entries
                    ],
                )
            if hard_state is not None:
                cur.execute(
                    "INSERT OR REPLACE INTO hard_state (id, term, vote, commit_idx, crc) "
                    "VALUES (1, ?, ?, ?, ?)",
                    (
                        hard_state.term,
                        hard_state.vote,
                        hard_state.commit,
                        _hs_crc(hard_state.term, hard_state.vote, hard_state.commit),
                    ),
                )
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    def _put_snapshot(self, cur: sqlite3.Cursor, snapshot: Snapshot) -> None:
        m = snapshot.meta
        cur.execute(
            "INSERT OR REPLACE INTO snapshot (id, idx, term, data, crc) VALUES (1, ?, ?, ?, ?)",
            (m.index, m.term, snapshot.data, _snap_crc(m.index, m.term, snapshot.data)),
        )

    def compact(self, snapshot: Snapshot) -> None:
        """Store a locally taken snapshot and drop the log entries it covers (durably)."""
        cur = self.db.cursor()
        cur.execute("BEGIN")
        try:
            self._put_snapshot(cur, snapshot)
            cur.execute("DELETE FROM log WHERE idx <= ?", (snapshot.meta.index,))
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.db.close()
