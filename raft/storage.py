"""Durable Raft state: generations of (snapshot, CRC-framed append-only log), switched
atomically by a manifest.

Theory of operation
-------------------
A log file is a sequence of records, each framed as

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
truncated before appending again. (So a torn save may leave a prefix of its
entries, never its hard state without all of them: that record is written last.)
A record that fails its CRC while valid records follow it is corruption of
acknowledged data: `load()` refuses to start with CorruptStorageError, so corrupt
records are never silently applied.

Generations. The durable state is generation G: `snapshot.G` (magic, index, term,
length, CRC, data) and `raft.G.log`, holding the entries after the snapshot. The
file `CURRENT` (magic, G, CRC) names G. Installing a snapshot or compacting never
modifies generation G; it builds G+1 beside it and switches:

1. write `snapshot.G+1` and `raft.G+1.log` (the kept entries and the hard state),
   fsync both, fsync the directory (their names are durable);
2. write `CURRENT.tmp`, fsync it, rename it over `CURRENT`, fsync the directory:
   the rename is the switch (atomic: a crash leaves either G or G+1);
3. delete generation G's files (no fsync needed: see next).

`load()` reads CURRENT and deletes every file of another generation: the leftovers
of an unfinished switch, or of a finished one whose deletions were lost. Without
CURRENT the directory has the layout of old versions, generation 0: `raft.log`
plus maybe `snapshot.bin`, where a crash between writing the snapshot and
rewriting the log could leave log entries the snapshot covers or contradicts.
Those are dropped as the core does when it installs a snapshot (and a gap right
after the snapshot, left by appends after such a crash, is skipped), and a
generation 0 with a snapshot is migrated to generation 1 at once, so that
nothing is ever appended behind stale entries again. A blank directory starts as
generation 0 without a snapshot.

Failures. `save()` on an OSError while writing (ENOSPC, EIO on write, a short
write then an error) truncates the log back to its size before the call (and
fdatasyncs that) and raises RetryableStorageError: the durable state is exactly
as before the call, and the same call may be retried later. Installing a
snapshot or compacting raises RetryableStorageError on any error before the
switch; the old generation stays, the new one's files are removed (best effort;
load removes what is left). A failing fsync/fdatasync anywhere (after it the
kernel may have dropped the unwritten pages and a later fsync would report
success: "fsyncgate"), a failing rollback, or a failure during the switch that
leaves it undecided raises FatalStorageError: from then on every call but
`close` raises FatalStorageError again, and the node must exit and reload from
disk. `load()` raises RetryableStorageError on I/O errors (its own repairs are
idempotent) and FatalStorageError on a failed fsync. Both errors carry the `errno`.

Lost disk. `load()` on a blank directory durably creates the marker file
`recovering` before anything else: this node has no memory of its votes and log,
so its vote must elect no one until it has caught up (it may have forgotten a vote it
cast; raft/core.py, "Recovering nodes"); `recovering`
says so, and `mark_recovered()` durably removes the marker. A directory whose
content was lost after the marker was removed is blank again, so it is marked again.
This is also the way out of a CorruptStorageError, and its message says so.

One operation at a time: every public method holds one lock. The node calls
`save` from two threads (its disk thread, and its event loop for a lone write)
while `compact` runs on the disk thread; unserialized, a save landing in the
old log file between compaction's reading it and replacing it would be lost
with the old file (and a save could write to a closed descriptor).

All file I/O goes through a `caplab.disk.Disk` (OsDisk by default; SimDisk in tests and
the simulator).
"""

from __future__ import annotations

import errno as errno_mod
import os
import re
import struct
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from caplab.disk import Disk, OsDisk
from caplab.logs import get_logger
from raft.messages import Entry, EntryKind, HardState, Snapshot, SnapshotMeta

log = get_logger("raft.storage")

_HEADER = struct.Struct(">IIB")  # payload length, crc32(type + payload), type
_ENTRY = struct.Struct(">QQB")  # term, index, kind (data follows)
_HARD = struct.Struct(">QQ")  # term, commit (vote utf-8 follows)
_SNAP = struct.Struct(">8sQQQI")  # magic, index, term, length, crc32(data)
_SNAP_MAGIC = b"CAPSNAP1"
_MANIFEST = struct.Struct(">8sQI")  # magic, generation, crc32(magic + generation)
_MANIFEST_MAGIC = b"CAPGEN01"
ENTRY, HARD_STATE = 1, 2
MAX_RECORD = 64 * 1024 * 1024

CURRENT = "CURRENT"
RECOVERING = "recovering"
_TMP_NAMES = ("CURRENT.tmp", "raft.tmp", "snapshot.tmp")  # (raft.tmp etc.: old versions)
_GEN_FILE = re.compile(r"raft\.(\d+)\.log|snapshot\.(\d+)")

RECOVERY_ADVICE = (
    "to recover, move this node's data directory aside and restart it with an empty one: "
    "it rejoins as a recovering replica whose vote elects no leader with a log until it "
    "has caught up; never do this on a majority of the nodes at once "
    "(see README, 'A node lost its disk')"
)


class StorageError(RuntimeError):
    """Base of the errors RaftStorage raises."""


class CorruptStorageError(StorageError):
    """The durable state failed its checksums; the node must not start from it."""


class RetryableStorageError(StorageError):
    """An I/O error (e.g. a full disk): nothing of the failed call is durable, the
    durable state is exactly as before it, and the same call may be retried later."""

    def __init__(self, message: str, errno: int | None) -> None:
        super().__init__(message)
        self.errno = errno


class FatalStorageError(StorageError):
    """The durable state may differ from what this object believes (e.g. an fsync
    failed): it refuses every further call; the node must exit and reload from disk."""

    def __init__(self, message: str, errno: int | None) -> None:
        super().__init__(message)
        self.errno = errno


def _record(rtype: int, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(bytes((rtype,))))
    return _HEADER.pack(len(payload), crc, rtype) + payload


def _entry_record(e: Entry) -> bytes:
    return _record(ENTRY, _ENTRY.pack(e.term, e.index, int(e.kind)) + e.data)


def _hard_state_record(hs: HardState) -> bytes:
    return _record(HARD_STATE, _HARD.pack(hs.term, hs.commit) + (hs.vote or "").encode())


def encode_snapshot(snapshot: Snapshot) -> bytes:
    """The content of a snapshot file."""
    m, data = snapshot.meta, snapshot.data
    return _SNAP.pack(_SNAP_MAGIC, m.index, m.term, len(data), zlib.crc32(data)) + data


def _encode_manifest(gen: int) -> bytes:
    head = _MANIFEST_MAGIC + struct.pack(">Q", gen)
    return head + struct.pack(">I", zlib.crc32(head))


def _log_name(gen: int) -> str:
    return "raft.log" if gen == 0 else f"raft.{gen}.log"


def _snap_name(gen: int) -> str:
    return "snapshot.bin" if gen == 0 else f"snapshot.{gen}"


def _describe(e: OSError) -> str:
    code = e.errno
    if code is None:
        return str(e)
    name = errno_mod.errorcode.get(code, str(code))
    if code in (errno_mod.ENOSPC, errno_mod.EDQUOT):
        return f"disk full ({name})"
    return f"{os.strerror(code)} ({name})"


class RaftStorage:
    def __init__(self, data_dir: str | os.PathLike[str], disk: Disk | None = None) -> None:
        self.disk: Disk = OsDisk() if disk is None else disk
        self.dir = Path(data_dir)
        self.disk.makedirs(self.dir)
        self._gen = 0
        self.log_path = self.dir / _log_name(0)
        self.snap_path = self.dir / _snap_name(0)
        self._fd: int | None = None
        self._size = 0  # of the log file: everything in it is durable
        self._hs = HardState(0, None, 0)
        self._snap_meta: SnapshotMeta | None = None
        self._loaded = False
        self._recovering = False
        self._failed: FatalStorageError | None = None
        self._lock = threading.Lock()  # see "One operation at a time" above

    @property
    def recovering(self) -> bool:
        """Whether the data directory was blank (or still carries the marker) at load."""
        return self._recovering

    @property
    def generation(self) -> int:
        return self._gen

    # -- errors ----------------------------------------------------------------------
    def _corrupt(self, path: Path, what: str) -> CorruptStorageError:
        return CorruptStorageError(f"{path}: {what}; refusing to start. {RECOVERY_ADVICE}")

    def _retryable(
        self,
        e: OSError,
        doing: str,
        outcome: str = "nothing of this write is durable (the durable state is as "
        "before the call, which may be retried)",
    ) -> RetryableStorageError:
        return RetryableStorageError(f"{_describe(e)} {doing} on {self.dir}: {outcome}", e.errno)

    def _fatal(self, e: OSError, doing: str) -> FatalStorageError:
        self._failed = FatalStorageError(
            f"{_describe(e)} {doing} on {self.dir}: the durable state is uncertain (after "
            "a failed fsync the kernel may have dropped unwritten data); this storage "
            "refuses every further call: the node must exit and reload from disk",
            e.errno,
        )
        log.error("storage_failed", dir=str(self.dir), doing=doing, error=str(e))
        return self._failed

    def _check_failed(self) -> None:
        if self._failed is not None:
            raise FatalStorageError(
                f"refused: this storage failed earlier ({self._failed})", self._failed.errno
            )

    def _sync(self, fd: int, what: str) -> None:
        try:
            self.disk.fsync(fd)
        except OSError as e:
            raise self._fatal(e, f"fsync of {what}") from e

    def _sync_dir(self) -> None:
        try:
            self.disk.fsync_dir(self.dir)
        except OSError as e:
            raise self._fatal(e, "fsync of the directory") from e

    def _write_file(self, name: str, data: bytes) -> None:
        """A new file `name` with `data`, fsynced (its name is not durable yet)."""
        fd = self.disk.create(self.dir / name)
        try:
            self.disk.write(fd, data)
            self._sync(fd, name)
        finally:
            self.disk.close(fd)

    # -- loading ---------------------------------------------------------------------
    def _read_snapshot(self) -> Snapshot | None:
        raw = self.disk.read(self.snap_path)
        if raw is None:
            return None
        if len(raw) < _SNAP.size:
            raise self._corrupt(self.snap_path, "truncated snapshot header")
        magic, index, term, length, crc = _SNAP.unpack_from(raw)
        data = raw[_SNAP.size :]
        if magic != _SNAP_MAGIC or len(data) != length or zlib.crc32(data) != crc:
            raise self._corrupt(self.snap_path, "snapshot fails its checksum")
        return Snapshot(SnapshotMeta(index, term), data)

    def _read_manifest(self) -> int | None:
        path = self.dir / CURRENT
        raw = self.disk.read(path)
        if raw is None:
            return None
        if len(raw) != _MANIFEST.size:
            raise self._corrupt(path, "manifest has the wrong size")
        magic, gen, crc = _MANIFEST.unpack(raw)
        if magic != _MANIFEST_MAGIC or zlib.crc32(raw[:-4]) != crc or gen < 1:
            raise self._corrupt(path, "manifest fails its checksum")
        return int(gen)

    def _replay(self) -> tuple[HardState, list[Entry], int]:
        """Records of the log -> (hard state, entries, length of the valid prefix)."""
        return self._replay_log(None)

    def _replay_log(self, gap_ok_after: int | None) -> tuple[HardState, list[Entry], int]:
        """`_replay`; ``gap_ok_after``: a snapshot index; a gap right after it, behind
        entries it covers, is skipped (generation 0 only: see "Generations" above)."""
        hs = HardState(0, None, 0)
        entries: list[Entry] = []
        raw = self.disk.read(self.log_path)
        if raw is None:
            return hs, entries, 0
        pos, end = 0, len(raw)
        while pos < end:
            bad = self._bad_record_at(raw, pos)
            if bad is not None:
                if self._valid_record_follows(raw, pos):
                    raise self._corrupt(
                        self.log_path,
                        f"record at byte {pos} is corrupt ({bad}) and valid records follow it",
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
                    if gap_ok_after is None or not (
                        index == gap_ok_after + 1 and entries[-1].index <= gap_ok_after
                    ):
                        raise self._corrupt(self.log_path, f"gap before entry {index}")
                    log.warning("stale_entries_skipped", before=index, snapshot=gap_ok_after)
                    entries.clear()
                entries.append(e)
            elif rtype == HARD_STATE:
                term, commit = _HARD.unpack_from(payload)
                vote = bytes(payload[_HARD.size :]).decode() or None
                hs = HardState(term, vote, commit)
            else:
                raise self._corrupt(self.log_path, f"unknown record type {rtype}")
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
            self._check_failed()
            return self._load()

    def _load(self) -> tuple[HardState, Snapshot | None, list[Entry]]:
        try:
            return self._load_io()
        except OSError as e:
            raise self._retryable(e, "loading", "the load may be retried") from e

    def _load_io(self) -> tuple[HardState, Snapshot | None, list[Entry]]:
        disk = self.disk
        if self._fd is not None:
            disk.close(self._fd)
            self._fd = None
        self._loaded = False
        names = set(disk.listdir(self.dir))
        gen = self._read_manifest() if CURRENT in names else None
        blank = gen is None and not names & {_log_name(0), _snap_name(0)}
        gen = gen or 0
        self._gen = gen
        self.log_path, self.snap_path = self.dir / _log_name(gen), self.dir / _snap_name(gen)
        if gen > 0 and not {_log_name(gen), _snap_name(gen)} <= names:
            raise self._corrupt(self.dir / CURRENT, f"generation {gen} misses its files")
        self._recovering = RECOVERING in names
        if blank and not self._recovering:  # durable before anything else is created
            self._write_file(RECOVERING, b"this node lost its durable state\n")
            self._sync_dir()
            self._recovering = True
        for name in sorted(names):
            if self._is_leftover(name, gen):
                log.info("leftover_removed", file=name, generation=gen)
                self._remove_quietly(name)

        snap = self._read_snapshot()
        s = snap.meta if snap is not None else None
        hs, entries, valid = self._replay_log(s.index if s is not None and gen == 0 else None)
        if s is not None:
            at = [e for e in entries if e.index == s.index]
            if at and at[0].term != s.term:
                entries = []  # another history from the snapshot on
            else:
                entries = [e for e in entries if e.index > s.index]
            if entries and entries[0].index != s.index + 1:
                entries = []
        last = entries[-1].index if entries else (s.index if s is not None else 0)
        if hs.commit > last:
            raise self._corrupt(
                self.log_path,
                f"commit index {hs.commit} is beyond the last durable entry {last}",
            )
        self._hs, self._snap_meta = hs, s
        if gen == 0 and snap is not None:  # an old version's layout: migrate at once
            self._switch(snap, hs, entries)
        else:
            fd = self._fd = disk.open_append(self.log_path)
            if disk.size(fd) != valid:
                disk.truncate(fd, valid)
                self._sync(fd, self.log_path.name)
            self._size = valid
            self._sync_dir()
        self._loaded = True
        return hs, snap, entries

    @staticmethod
    def _is_leftover(name: str, gen: int) -> bool:
        if name in _TMP_NAMES:
            return True
        if gen > 0 and name in (_log_name(0), _snap_name(0)):
            return True
        m = _GEN_FILE.fullmatch(name)
        return m is not None and int(m.group(1) or m.group(2)) != gen

    def _ensure_loaded(self) -> None:
        self._check_failed()
        if not self._loaded:
            self._load()

    # -- writing ---------------------------------------------------------------------
    def save(
        self,
        hard_state: HardState | None = None,
        entries: Sequence[Entry] = (),
        snapshot: Snapshot | None = None,
    ) -> None:
        """Persist durably (returns after fdatasync). A snapshot replaces the whole log.

        RetryableStorageError: nothing of it is durable; FatalStorageError: see above."""
        with self._lock:
            self._ensure_loaded()
            if snapshot is not None:
                self._switch(snapshot, hard_state or self._hs, entries)
                return
            if hard_state is None and not entries:
                return
            buf = b"".join([_entry_record(e) for e in entries])
            if hard_state is not None:
                buf += _hard_state_record(hard_state)
            fd = self._fd
            assert fd is not None
            try:
                self.disk.write(fd, buf)
            except OSError as e:
                self._roll_back(fd, e)
            try:
                self.disk.fdatasync(fd)
            except OSError as e:
                raise self._fatal(e, f"fdatasync of {self.log_path.name}") from e
            self._size += len(buf)
            if hard_state is not None:
                self._hs = hard_state

    def _roll_back(self, fd: int, e: OSError) -> NoReturn:
        """After a failed append: cut the log back to its size before it, durably."""
        try:
            self.disk.truncate(fd, self._size)
            self.disk.fdatasync(fd)
        except OSError as e2:
            raise self._fatal(e2, f"rolling back a failed write to {self.log_path.name}") from e
        raise self._retryable(e, f"writing {self.log_path.name}") from e

    def compact(self, snapshot: Snapshot) -> None:
        """Store a locally taken snapshot and drop the log entries it covers (durably).

        A snapshot at or below the current one's index is ignored."""
        with self._lock:
            self._ensure_loaded()
            if self._snap_meta is not None and snapshot.meta.index <= self._snap_meta.index:
                log.info("stale_compaction_skipped", index=snapshot.meta.index)
                return
            try:
                _, entries, _ = self._replay()
            except OSError as e:
                raise self._retryable(e, f"reading {self.log_path.name}", "nothing changed") from e
            keep = [e for e in entries if e.index > snapshot.meta.index]
            self._switch(snapshot, self._hs, keep)

    def _switch(self, snap: Snapshot, hs: HardState, entries: Sequence[Entry]) -> None:
        """Make (snap, hs, entries) the durable state: generation G+1 (see above)."""
        disk, new = self.disk, self._gen + 1
        log_name, snap_name = _log_name(new), _snap_name(new)
        buf = b"".join([_entry_record(e) for e in entries]) + _hard_state_record(hs)
        fd: int | None = None
        doing = f"writing {snap_name}"
        try:
            self._write_file(snap_name, encode_snapshot(snap))
            doing = f"writing {log_name}"
            fd = disk.create(self.dir / log_name)
            disk.write(fd, buf)
            self._sync(fd, log_name)
            self._sync_dir()
            doing = f"writing {CURRENT}"
            self._write_file("CURRENT.tmp", _encode_manifest(new))
            doing = f"renaming CURRENT.tmp to {CURRENT}"
            disk.rename(self.dir / "CURRENT.tmp", self.dir / CURRENT)
        except OSError as e:
            if doing.startswith("renaming") and self._switched(new):
                raise self._fatal(e, doing) from e  # undecided: let load() decide
            if fd is not None:
                self._close_quietly(fd)
            for name in (snap_name, log_name, "CURRENT.tmp"):
                self._remove_quietly(name)
            raise self._retryable(e, doing) from e
        except FatalStorageError:
            if fd is not None:
                self._close_quietly(fd)
            raise
        self._sync_dir()  # the switch is durable
        old = [self.log_path] + ([self.snap_path] if self._snap_meta is not None else [])
        if self._fd is not None:
            self._close_quietly(self._fd)
        self._fd, self._size, self._gen = fd, len(buf), new
        self.log_path, self.snap_path = self.dir / log_name, self.dir / snap_name
        self._hs, self._snap_meta = hs, snap.meta
        for path in old:
            self._remove_quietly(path.name)

    def _switched(self, gen: int) -> bool:
        """After a failed rename of the manifest: whether it happened all the same."""
        try:
            return self.disk.read(self.dir / CURRENT) == _encode_manifest(gen)
        except OSError:
            return True  # cannot tell: assume the worst

    def _close_quietly(self, fd: int) -> None:
        try:
            self.disk.close(fd)
        except OSError as e:
            log.warning("close_failed", dir=str(self.dir), error=str(e))

    def _remove_quietly(self, name: str) -> None:
        try:
            self.disk.remove(self.dir / name)
        except FileNotFoundError:
            pass
        except OSError as e:  # load() removes it
            log.warning("remove_failed", file=name, dir=str(self.dir), error=str(e))

    def mark_recovered(self) -> None:
        """This node caught up: durably drop the `recovering` marker."""
        with self._lock:
            self._ensure_loaded()
            if not self._recovering:
                return
            try:
                self.disk.remove(self.dir / RECOVERING)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise self._retryable(e, f"removing {RECOVERING}") from e
            self._sync_dir()
            self._recovering = False
            log.info("recovered", dir=str(self.dir), marker_removed=RECOVERING)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                fd, self._fd = self._fd, None
                self._loaded = False
                self.disk.close(fd)
