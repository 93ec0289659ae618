"""Durable state of one gossip replica: SQLite in WAL mode, fsync on every commit.

What is stored (one database file, ``<data_dir>/gossip.db``):

* ``kv``: key -> the replica's current CRDT value (``crdt.encode_value``, the canonical
  encoding also hashed by the Merkle tree), tombstones included until collected;
* ``dedup``: (client_id, sequence) -> (operation, result timestamp, numeric result, the
  client's low-water mark): the exactly-once table (the last ``window`` results of each
  client, as raft's sessions), in least-recently-used order (``used``), bounded by the node;
* ``meta``: the HLC high-water mark, so a restarted node never issues a timestamp at or
  below one it issued (or observed) before it stopped.

Group commit. The node's single disk thread calls :meth:`GossipStorage.commit` with
everything that accumulated while the previous commit was running (client writes, their
dedup entries, merged remote state, collected tombstones), coalesced per key, in one
transaction: one WAL append and one fsync (``synchronous=FULL``) acknowledge them all.
Batches are applied in the order the core produced them, and each batch holds the latest
value of each key, so "overwrite with the latest value" equals "join into the durable
state" (the replica's state only grows in the lattice).

A SIGKILL loses at most the batch being committed, none of which was acknowledged; SQLite
rolls an incomplete WAL tail back on open.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from gossip.crdt import Counter, Register, Value, encode_value
from gossip.hlc import Timestamp

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dedup (
    client_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    op TEXT NOT NULL,
    wall_ms INTEGER NOT NULL,
    logical INTEGER NOT NULL,
    node TEXT NOT NULL,
    num INTEGER NOT NULL,
    low INTEGER NOT NULL,
    used INTEGER NOT NULL,
    PRIMARY KEY (client_id, seq)
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, a INTEGER, b INTEGER, c TEXT);
"""


class CorruptStateError(Exception):
    """A stored value cannot be decoded: the node refuses to start on it."""


def _dec_str(buf: bytes, pos: int) -> tuple[str, int]:
    n = int.from_bytes(buf[pos : pos + 4], "big")
    end = pos + 4 + n
    if end > len(buf):
        raise CorruptStateError("truncated string")
    return buf[pos + 4 : end].decode(), end


def decode_value(buf: bytes) -> Value:
    """Inverse of ``crdt.encode_value``; ``CorruptStateError`` on malformed input."""
    try:
        if buf[:1] == b"R":
            wall = int.from_bytes(buf[1:9], "big", signed=True)
            logical = int.from_bytes(buf[9:17], "big")
            node, pos = _dec_str(buf, 17)
            ts = Timestamp(wall, logical, node)
            if buf[pos : pos + 1] == b"\x00" and pos + 1 == len(buf):
                return Register(ts, None)
            if buf[pos : pos + 1] != b"\x01":
                raise CorruptStateError("bad register tag")
            n = int.from_bytes(buf[pos + 1 : pos + 5], "big")
            if pos + 5 + n != len(buf):
                raise CorruptStateError("register length mismatch")
            return Register(ts, buf[pos + 5 :])
        if buf[:1] == b"C":
            pos = 1
            maps: list[dict[str, int]] = []
            for _ in range(2):
                count = int.from_bytes(buf[pos : pos + 4], "big")
                pos += 4
                m: dict[str, int] = {}
                for _ in range(count):
                    k, pos = _dec_str(buf, pos)
                    m[k] = int.from_bytes(buf[pos : pos + 16], "big", signed=True)
                    pos += 16
                maps.append(m)
            if pos != len(buf):
                raise CorruptStateError("counter length mismatch")
            return Counter(maps[0], maps[1])
    except (UnicodeDecodeError, IndexError) as e:
        raise CorruptStateError(str(e)) from e
    raise CorruptStateError(f"unknown value tag {buf[:1]!r}")


@dataclass(frozen=True, slots=True)
class DedupEntry:
    """One remembered mutation of a client on this node, and what it answered."""

    client_id: str
    seq: int
    op: str  # "put" | "delete" | "increment"
    ts: Timestamp  # HLC timestamp of the write
    num: int  # increment: the counter after it; delete: 1 if the key existed; put: 0
    low: int = 0  # the client's low-water mark: sequences <= low answer OUTCOME UNKNOWN


@dataclass(slots=True)
class CommitBatch:
    """One group commit. Coalesced: the last value per key / client wins."""

    kv: dict[str, Value | None] = field(default_factory=dict)  # None: remove the key
    dedup: dict[tuple[str, int], DedupEntry] = field(default_factory=dict)
    evict: set[str] = field(default_factory=set)  # clients dropped from the dedup table
    evict_seqs: set[tuple[str, int]] = field(default_factory=set)  # results out of a window
    hlc: Timestamp | None = None  # high-water mark of the HLC when the batch was taken

    def __bool__(self) -> bool:
        return bool(self.kv or self.dedup or self.evict or self.evict_seqs)


@dataclass(slots=True)
class Loaded:
    state: dict[str, Value]
    dedup: list[DedupEntry]  # least recently used first
    hlc: Timestamp | None


class GossipStorage:
    """SQLite-backed durable replica state. Not thread-safe: use from one thread."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        path = Path(data_dir)
        path.mkdir(parents=True, exist_ok=True)
        self.path = path / "gossip.db"
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA wal_autocheckpoint=4000")
        self.db.executescript(SCHEMA)
        row = self.db.execute("SELECT COALESCE(MAX(used), 0) FROM dedup").fetchone()
        self._used = int(row[0])
        self.commits = 0

    def load(self) -> Loaded:
        state = {k: decode_value(v) for k, v in self.db.execute("SELECT key, value FROM kv")}
        dedup = [
            DedupEntry(c, s, op, Timestamp(w, lg, n), num, low)
            for c, s, op, w, lg, n, num, low in self.db.execute(
                "SELECT client_id, seq, op, wall_ms, logical, node, num, low FROM dedup "
                "ORDER BY used"
            )
        ]
        row = self.db.execute("SELECT a, b, c FROM meta WHERE name = 'hlc'").fetchone()
        hlc = Timestamp(int(row[0]), int(row[1]), str(row[2])) if row else None
        return Loaded(state, dedup, hlc)

    def commit(self, batch: CommitBatch) -> None:
        """Apply ``batch`` in one transaction and fsync it."""
        db = self.db
        db.execute("BEGIN")
        try:
            puts = [(k, encode_value(v)) for k, v in batch.kv.items() if v is not None]
            dels = [(k,) for k, v in batch.kv.items() if v is None]
            if puts:
                db.executemany("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", puts)
            if dels:
                db.executemany("DELETE FROM kv WHERE key = ?", dels)
            if batch.evict:
                db.executemany("DELETE FROM dedup WHERE client_id = ?", [(c,) for c in batch.evict])
            if batch.evict_seqs:
                db.executemany(
                    "DELETE FROM dedup WHERE client_id = ? AND seq = ?", list(batch.evict_seqs)
                )
            if batch.dedup:
                rows = []
                for e in batch.dedup.values():
                    self._used += 1
                    rows.append(
                        (e.client_id, e.seq, e.op, e.ts.wall_ms, e.ts.logical, e.ts.node, e.num,
                         e.low, self._used)
                    )  # fmt: skip
                db.executemany(
                    "INSERT OR REPLACE INTO dedup VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows
                )
            if batch.hlc is not None:
                h = batch.hlc
                db.execute(
                    "INSERT OR REPLACE INTO meta (name, a, b, c) VALUES ('hlc', ?, ?, ?)",
                    (h.wall_ms, h.logical, h.node),
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.commits += 1

    def close(self) -> None:
        self.db.close()
