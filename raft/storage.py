"""Durable Raft state: a CRC-framed append-only log file plus a snapshot file.

Theory of operation
-------------------
`raft.log` is a sequence of records, each framed as

    length: u32 (payload bytes) | crc32: u32 (of type + payload) | type: u8 | payload

with two record types: ENTRY (term, index, kind, data) and HARD_STATE (term,
commit, vote). Replaying the file rebuilds the state: an ENTRY whose index is
at or below the last replayed index truncates the log there first (this is how
the core's "overwrite the conflicting suffix" is made durable without
rewriting), and the last HARD_STATE wins. `save()` appends all the records of
one Ready with a single write and returns only after `fdatasync`, so the node
acknowledges nothing (a vote, an append, a client write) before it is on disk.

A crash can leave a torn last write. On load, a record that is incomplete at
the end of the file, or that fails its CRC with nothing valid after it, is a
torn tail: it was never acknowledged, so it is dropped (and logged) and the file
truncated before appending again. A record that fails its CRC while valid
records follow it is corruption of acknowledged data: `load()` refuses to start
with CorruptStorageError, so corrupt records are never silently applied.

Snapshots live in `snapshot.bin` (magic, index, term, length, CRC, data),
replaced atomically (write to a temporary file, fsync, rename, fsync the
directory). Compaction writes the snapshot first, then atomically rewrites the
log with the entries after it. After a crash between the two steps, load()
drops log entries covered by the snapshot, and also the entries after it when
the log disagrees with the snapshot at its index (they belonged to another
history), which is exactly what the core does when it installs a snapshot.

One operation at a time: every public method holds one lock. The node calls
`save` from two threads (its disk thread, and its event loop for a lone write)
while `compact` runs on the disk thread; unserialized, a save landing in the
old log file between compaction's reading it and replacing it would be lost
with the old file (and a save could write to a closed descriptor).
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path

from caplab.logs import get_logger
from raft.messages import Entry, EntryKind, HardState, Snapshot, SnapshotMeta

log = get_logger("raft.storage")

_HEADER = struct.Struct(">IIB")  # payload length, crc32(type + payload), type
_ENTRY = struct.Struct(">QQB")  # term, index, kind (data follows)
_HARD = struct.Struct(">QQ")  # term, commit (vote utf-8 follows)
_SNAP = struct.Struct(">8sQQQI")  # magic, index, term, length, crc32(data)
_SNAP_MAGIC = b"CAPSNAP1"
ENTRY, HARD_STATE = 1, 2
MAX_RECORD = 64 * 1024 * 1024


class CorruptStorageError(RuntimeError):
    """The durable state failed its checksums; the node must not start from it."""


def _record(rtype: int, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(bytes((rtype,))))
    return _HEADER.pack(len(payload), crc, rtype) + payload


def _entry_record(e: Entry) -> bytes:
    return _record(ENTRY, _ENTRY.pack(e.term, e.index, int(e.kind)) + e.data)


def _hard_state_record(hs: HardState) -> bytes:
    return _record(HARD_STATE, _HARD.pack(hs.term, hs.commit) + (hs.vote or "").encode())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class RaftStorage:
    def __init__(self, data_dir: str | Path) -> None:
        self.dir = Path(data_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "raft.log"
        self.snap_path = self.dir / "snapshot.bin"
        self._fd: int | None = None
        self._hs = HardState(0, None, 0)
        self._loaded = False
        self._lock = threading.Lock()  # see "One operation at a time" above

    # -- loading ---------------------------------------------------------------------
    def _read_snapshot(self) -> Snapshot | None:
        if not self.snap_path.exists():
            return None
        raw = self.snap_path.read_bytes()
        if len(raw) < _SNAP.size:
            raise CorruptStorageError(f"{self.snap_path}: truncated snapshot header")
        magic, index, term, length, crc = _SNAP.unpack_from(raw)
        data = raw[_SNAP.size :]
        if magic != _SNAP_MAGIC or len(data) != length or zlib.crc32(data) != crc:
            raise CorruptStorageError(f"{self.snap_path}: snapshot fails its checksum")
        return Snapshot(SnapshotMeta(index, term), data)

    def _replay(self) -> tuple[HardState, list[Entry], int]:
        """Records of raft.log -> (hard state, entries, length of the valid prefix)."""
        hs = HardState(0, None, 0)
        entries: list[Entry] = []
        if not self.log_path.exists():
            return hs, entries, 0
        raw = self.log_path.read_bytes()
        pos, end = 0, len(raw)
        while pos < end:
            bad = self._bad_record_at(raw, pos)
            if bad is not None:
                if self._valid_record_follows(raw, pos):
                    raise CorruptStorageError(
                        f"{self.log_path}: record at byte {pos} is corrupt ({bad}) and valid "
                        "records follow it; refusing to start (restore this node's data "
                        "directory, or wipe it to rejoin the cluster as a new replica)"
                    )
                log.warning("torn_tail_dropped", offset=pos, bytes=end - pos, reason=bad)
                return hs, entries, pos
            length, _, rtype = _HEADER.unpack_from(raw, pos)
            payload = raw[pos + _HEADER.size : pos + _HEADER.size + length]
            pos += _HEADER.size + length
            if rtype == ENTRY:
                term, index, kind = _ENTRY.unpack_from(payload)
                e = Entry(term, index, EntryKind(kind), bytes(payload[_ENTRY.size :]))
                if entries and index <= entries[-1].index:
                    del entries[max(0, index - entries[0].index) :]
                if entries and index != entries[-1].index + 1:
                    raise CorruptStorageError(f"{self.log_path}: gap before entry {index}")
                entries.append(e)
            elif rtype == HARD_STATE:
                term, commit = _HARD.unpack_from(payload)
                vote = bytes(payload[_HARD.size :]).decode() or None
                hs = HardState(term, vote, commit)
            else:
                raise CorruptStorageError(f"{self.log_path}: unknown record type {rtype}")
        return hs, entries, pos

    @staticmethod
    def _bad_record_at(raw: bytes, pos: int) -> str | None:
        if pos + _HEADER.size > len(raw):
            return "incomplete header"
        length, crc, rtype = _HEADER.unpack_from(raw, pos)
        if length > MAX_RECORD:
            return "impossible length"
        start = pos + _HEADER.size
        if start + length > len(raw):
            return "incomplete payload"
        if zlib.crc32(raw[start : start + length], zlib.crc32(bytes((rtype,)))) != crc:
            return "checksum mismatch"
        return None

    def _valid_record_follows(self, raw: bytes, pos: int) -> bool:
        """Whether a well-formed record starts anywhere after the bad one at `pos`."""
        if pos + _HEADER.size <= len(raw):
            length = _HEADER.unpack_from(raw, pos)[0]
            nxt = pos + _HEADER.size + length
            if length <= MAX_RECORD and nxt < len(raw) and self._bad_record_at(raw, nxt) is None:
                return True
        return False

    def load(self) -> tuple[HardState, Snapshot | None, list[Entry]]:
        """Everything durable, verified; raises CorruptStorageError on corruption."""
        with self._lock:
            return self._load()

    def _load(self) -> tuple[HardState, Snapshot | None, list[Entry]]:
        snap = self._read_snapshot()
        hs, entries, valid = self._replay()
        if snap is not None:
            s = snap.meta
            at = [e for e in entries if e.index == s.index]
            if at and at[0].term != s.term:
                entries = []
            else:
                entries = [e for e in entries if e.index > s.index]
            if entries and entries[0].index != s.index + 1:
                entries = []
        last = entries[-1].index if entries else (snap.meta.index if snap else 0)
        if hs.commit > last:
            raise CorruptStorageError(
                f"{self.log_path}: commit index {hs.commit} is beyond the last durable entry {last}"
            )
        self._open(valid)
        self._hs = hs
        self._loaded = True
        return hs, snap, entries

    def _open(self, valid: int) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self.log_path, os.O_RDWR | os.O_CREAT, 0o644)
        if os.fstat(self._fd).st_size != valid:
            os.ftruncate(self._fd, valid)
            os.fsync(self._fd)
        os.lseek(self._fd, 0, os.SEEK_END)
        _fsync_dir(self.dir)

    # -- writing ---------------------------------------------------------------------
    def save(
        self,
        hard_state: HardState | None = None,
        entries: Sequence[Entry] = (),
        snapshot: Snapshot | None = None,
    ) -> None:
        """Persist durably (returns after fdatasync). A snapshot replaces the whole log."""
        with self._lock:
            self._save(hard_state, entries, snapshot)

    def _save(
        self, hard_state: HardState | None, entries: Sequence[Entry], snapshot: Snapshot | None
    ) -> None:
        if not self._loaded:
            self._load()
        if snapshot is not None:
            self._write_snapshot(snapshot)
            hs = hard_state or self._hs
            self._rewrite_log(hs, entries)
            self._hs = hs
            return
        if hard_state is None and not entries:
            return
        buf = b"".join(_entry_record(e) for e in entries)
        if hard_state is not None:
            buf += _hard_state_record(hard_state)
            self._hs = hard_state
        assert self._fd is not None
        _write_all(self._fd, buf)
        os.fdatasync(self._fd)

    def _write_snapshot(self, snapshot: Snapshot) -> None:
        m = snapshot.meta
        tmp = self.snap_path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(
                _SNAP.pack(
                    _SNAP_MAGIC, m.index, m.term, len(snapshot.data), zlib.crc32(snapshot.data)
                )
            )
            f.write(snapshot.data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.snap_path)
        _fsync_dir(self.dir)

    def _rewrite_log(self, hs: HardState, entries: Sequence[Entry]) -> None:
        tmp = self.log_path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(b"".join(_entry_record(e) for e in entries) + _hard_state_record(hs))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.log_path)
        _fsync_dir(self.dir)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self.log_path, os.O_RDWR | os.O_APPEND)

    def compact(self, snapshot: Snapshot) -> None:
        """Store a locally taken snapshot and drop the log entries it covers (durably)."""
        with self._lock:
            self._write_snapshot(snapshot)
            hs, entries, _ = self._replay()
            keep = [e for e in entries if e.index > snapshot.meta.index]
            self._rewrite_log(self._hs if self._loaded else hs, keep)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
