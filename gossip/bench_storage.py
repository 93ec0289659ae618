"""Commit latency of the gossip storage against the SQLite storage it replaced (issue 13).

    python -m gossip.bench_storage [--dir DIR] [--commits 2000] [--keys 64] [--value 100]

Each store commits the same batches (``--keys`` registers of ``--value`` bytes, alone
and with one exactly-once ``Applied`` record per key, as writes with request ids make
them) in its own fresh directory under ``--dir`` (default: a
temporary directory next to the working directory, so on the same file system as a
node's data), alternating between the stores in blocks so both see the same disk
conditions; it prints the median and p90 microseconds per commit (each one durable:
fdatasync / SQLite ``synchronous=FULL``).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from gossip.crdt import Applied, Register, Value, applied_key, encode_value
from gossip.hlc import Timestamp
from gossip.storage import CommitBatch, GossipStorage

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dedup (
    client_id TEXT NOT NULL, seq INTEGER NOT NULL, op TEXT NOT NULL,
    wall_ms INTEGER NOT NULL, logical INTEGER NOT NULL, node TEXT NOT NULL,
    num INTEGER NOT NULL, low INTEGER NOT NULL, used INTEGER NOT NULL,
    PRIMARY KEY (client_id, seq)
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, a INTEGER, b INTEGER, c TEXT);
"""


class SqliteStorage:
    """The commit path of the SQLite storage before issue 13 (the baseline)."""

    def __init__(self, data_dir: Path) -> None:
        self.db = sqlite3.connect(data_dir / "gossip.db", isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA wal_autocheckpoint=4000")
        self.db.executescript(_SCHEMA)
        self._used = 0

    def commit(self, batch: CommitBatch) -> None:
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

    def close(self) -> None:
        self.db.close()


def batches(n: int, keys: int, size: int, records: bool) -> list[CommitBatch]:
    """``n`` batches over a key space of 100 x ``keys`` keys (overwrites, like a run)."""
    out = []
    for i in range(n):
        ts = Timestamp(1_700_000_000_000 + i, 0, "n1")
        kv: dict[str, Value | None] = {}
        for j in range(keys):
            key = f"key-{(i * keys + j) % (100 * keys):08d}"
            kv[key] = Register(ts, os.urandom(size))
            if records:
                kv[applied_key(f"client-{j}", i)] = Applied(ts, "n1", "put", key, 0, 0)
        out.append(CommitBatch(kv=kv, hlc=ts))
    return out


def run(commits: int, keys: int, size: int, records: bool, base: Path, block: int = 100) -> None:
    work = batches(commits, keys, size, records)
    new_dir, old_dir = base / "log", base / "sqlite"
    new_dir.mkdir()
    old_dir.mkdir()
    new = GossipStorage(new_dir)
    new.load()
    old = SqliteStorage(old_dir)
    times: dict[str, list[float]] = {"log (this version)": [], "sqlite (before)": []}
    stores: list[tuple[str, Callable[[CommitBatch], None]]] = [
        ("log (this version)", new.commit),
        ("sqlite (before)", old.commit),
    ]
    for start in range(0, commits, block):
        for name, commit in stores if (start // block) % 2 == 0 else stores[::-1]:
            for b in work[start : start + block]:
                t = time.perf_counter()
                commit(b)
                times[name].append(time.perf_counter() - t)
    new.close()
    old.close()
    what = f"{keys} keys x {size} B" + (f" + {keys} Applied records" if records else "")
    for name, ts in times.items():
        us = sorted(t * 1e6 for t in ts)
        print(
            f"{what:38} {name:20} median {statistics.median(us):7.0f} us   "
            f"p90 {us[int(len(us) * 0.9)]:7.0f} us   ({len(us)} commits)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=".", help="make the stores' directories under this one")
    ap.add_argument("--commits", type=int, default=2000)
    ap.add_argument("--keys", type=int, default=64)
    ap.add_argument("--value", type=int, default=100)
    args = ap.parse_args()
    for records in (False, True):
        with tempfile.TemporaryDirectory(dir=args.dir, prefix=".bench-storage-") as d:
            run(args.commits, args.keys, args.value, records, Path(d))


if __name__ == "__main__":
    main()
