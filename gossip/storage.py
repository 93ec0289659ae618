"""Durable state of one gossip replica: a checksummed, crash-safe log of group commits on
the shared ``caplab.disk.Disk``, in generations switched atomically by a manifest.

Theory of operation
-------------------
What is stored: ``kv`` (key -> the replica's current CRDT value, tombstones and Applied
records included until collected, in ``crdt.encode_value``'s canonical encoding, read
back with ``crdt.decode_value``), the per-node exactly-once table of older versions
(``DedupEntry`` per (client, sequence), least recently used first), the HLC high-water
mark (a restarted node never issues a timestamp at or below one it issued or observed
before) and the *epoch* (see below).

Group commit. The node's single disk thread calls :meth:`GossipStorage.commit` with
everything that accumulated while the previous commit was running (client writes, their
dedup entries, merged remote state, collected tombstones as removals), coalesced per key.
One commit is one *record* added to the log with one write, then ``fdatasync``:
``commit`` returns only when the batch is durable, and a batch is durable all or
nothing. Batches are replayed in the order they were committed, and each holds the
latest value of each key, so "overwrite with the latest value" equals "join into the
durable state".

Preallocation. The log file is extended ``prealloc_bytes`` (1 MiB) of zeros at a time
(written and synced together with the record that needed the space), and records are
written in place over those zeros (``Disk.pwrite``): an fdatasync that does not change
the file's size need not commit file-system metadata (ext4 here: 230 instead of 415 us
per commit). So a log is its records, then zeros to the end of the file.

Format. A log file ``gossip.<G>.log`` is a sequence of records::

    record = magic "\\xe2GLr" | length: u32 | crc32(magic, length) : u32 | payload
    payload = entry*
    entry  = kind: u8 | length: u32 | body | crc32(kind, length, body): u32

Every CRC is seeded with the generation and the entry's (or record's) byte offset in
the file, so bytes that happen to look like a record or an entry (a stored value may hold
anything) never verify anywhere but where they were written. Entry kinds: PUT (key,
value), DEL (key), DEDUP (one exactly-once result), EVICT (a client), EVICT_SEQ (one
result of a client), HLC, EPOCH, BASE_END. A commit applies, in this order, its PUT/DEL
entries, evictions, dedup entries, HLC (as the SQLite version did).

Checksums and refusal. Every entry carries its own CRC, verified on load. An entry that
fails it is *refused*: not loaded, and described in ``Loaded.corrupt`` (with its key
where it can be read), so a corrupt value is never served or gossiped; the node repairs
the key from its peers by anti-entropy. A record whose header fails its CRC (its length
cannot be trusted) is skipped up to the next valid record header, and reported. So one
corrupt key never costs the rest of the store; only a log without a single valid record,
an entry that passes its checksum but cannot be read (another version's format?), or a
damaged ``CURRENT`` stops the node.

Torn tails. A crash may leave the last write unfinished: a record, after which nothing
valid follows, that is incomplete or fails a checksum is a commit that never returned;
it is dropped silently (logged at info) and zeroed before the next commit is written
there. (A bad record *followed* by valid ones was acknowledged: that is corruption, see
above. The base of a generation is never torn: it was synced before it was used.)

Epoch. A random 8-hex-digit id of "this copy of the node's data", created durably with
the store and replaced by a new one (durably, before ``load`` returns) whenever load
refused anything: the node then names its counter component ``node_id/epoch`` instead
of ``node_id`` (``node_id`` alone for the empty epoch of a store migrated from SQLite), so
a node that lost increments never restarts a component from a total other replicas hold
higher (the join would silently discard its new increments).

Generations. The durable state is generation G: ``gossip.G.log``, which starts with a
*base* (the whole live state: EPOCH, HLC, PUTs, DEDUPs in LRU order, BASE_END; in
records of about ``BASE_RECORD_BYTES``) followed by commit records. ``CURRENT`` (magic,
G, CRC) names G. When the log has grown past ``max(compact_min_bytes, 2 x its base)``
after a commit (so compaction writes at most about twice what commits wrote), or when
load refused anything (new epoch), the live state is written as generation G+1:

1. write ``gossip.G+1.log`` (its base, and zeros), fsync it, fsync the directory;
2. write ``CURRENT.tmp``, fsync it, rename it over ``CURRENT``, fsync the directory: the
   rename is the switch (a crash leaves either G or G+1);
3. remove ``gossip.G.log`` (not synced: load removes leftovers).

``load`` reads ``CURRENT``, replays its generation and removes every other generation's
file (leftovers of an unfinished or unsynced switch). Without ``CURRENT``: a directory
holding the old SQLite ``gossip.db`` is migrated (read with the old code, written as
generation 1 with the empty epoch, then ``gossip.db`` and its ``-wal``/``-shm`` removed);
otherwise the directory is blank (log files of an unfinished creation are removed; one
holding commits means ``CURRENT`` was lost: refused) and generation 1 is created with a
new epoch, all before ``load`` returns.

Failures (all ``StorageError``, one line naming the file or directory and what to do):

* ``DiskFullError`` (ENOSPC/EDQUOT while writing; only a commit that extends the file
  needs space): ``commit`` writes zeros back where it wrote, cuts the extension and syncs
  that, so the files are as before the call and nothing of the batch is durable; the
  same batch may be committed again later. A compaction that finds the disk full is
  abandoned (its files removed; the commit itself is durable) and tried again once the
  log has grown by another ``compact_min_bytes``.
* ``FatalStorageError``: any other I/O error (EIO on a write...), and any failed
  fsync/fdatasync (after it the kernel may have dropped the unwritten pages and a later
  fsync would report success: "fsyncgate"), or a failed rollback. From then on every
  call but ``close`` raises it again: the node must stop and reload from disk. (A fatal
  error in a compaction comes after its commit was durable.)
* ``CorruptStorageError`` (load): the files cannot be read as a store at all (a damaged
  ``CURRENT``, a missing or garbage log, an unreadable ``gossip.db``).

One thread: ``load``, ``commit`` and ``close`` are called from the node's disk thread,
never concurrently.
"""

from __future__ import annotations

import errno as errno_mod
import os
import random
import re
import secrets
import sqlite3
import struct
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from caplab.disk import Disk, OsDisk
from caplab.logs import get_logger
from gossip.crdt import DecodeError, Value, decode_value, encode_value
from gossip.hlc import Timestamp

log = get_logger("gossip.storage")

CURRENT = "CURRENT"
CURRENT_TMP = "CURRENT.tmp"
LEGACY_DB = "gossip.db"
_LEGACY_FILES = (LEGACY_DB, f"{LEGACY_DB}-wal", f"{LEGACY_DB}-shm", f"{LEGACY_DB}-journal")
_LOG_FILE = re.compile(r"gossip\.(\d+)\.log")

#: a log shorter than this is never compacted
COMPACT_MIN_BYTES = 8 << 20
#: payload bytes per record of a generation's base (about)
BASE_RECORD_BYTES = 1 << 20
#: the log file is extended by (at least) this many bytes of zeros at a time
PREALLOC_BYTES = 1 << 20

_MAGIC = b"\xe2GLr"
_HEAD = struct.Struct(">4sII")  # magic, payload length, crc32 of the first 8 bytes
_ENTRY = struct.Struct(">BI")  # kind, body length (then the body, then its crc32)
_PUT = struct.Struct(">BII")  # a PUT entry's kind, body length, and the body's key length
_U32 = struct.Struct(">I")
_SEQ = struct.Struct(">Q")
_HLC = struct.Struct(">qQ")  # wall_ms, logical (then the node)
# seq, wall_ms, logical, num (high, low 64 bits), low, len(op), len(client_id)
_DEDUP = struct.Struct(">QqQqQQBI")
_MANIFEST = struct.Struct(">8sQI")  # magic, generation, crc32(magic + generation)
_MANIFEST_MAGIC = b"CAPGSP01"
_MASK = 0xFFFFFFFF
_MIX = 0x9E3779B1
_U64 = 2**64

PUT, DEL, DEDUP, EVICT, EVICT_SEQ, HLC, EPOCH, BASE_END = range(1, 9)
_KIND_NAMES = {
    DEDUP: "an exactly-once (dedup) entry",
    EVICT: "a dedup eviction",
    EVICT_SEQ: "a dedup eviction",
    HLC: "the HLC high-water mark",
    EPOCH: "the epoch",
    BASE_END: "the end-of-base marker",
}

_CANNOT_START = "the store could not be created or repaired; free space and restart the node"
RECOVERY_ADVICE = (
    "to recover, move the data directory {dir} aside and restart the node with an empty "
    "one: it starts a new epoch and gets its data back from its peers by anti-entropy"
)


def _seed(gen: int, pos: int) -> int:
    """The CRC seed of a record or entry at byte ``pos`` of generation ``gen``'s log."""
    return (pos ^ gen * _MIX) & _MASK


def _log_name(gen: int) -> str:
    return f"gossip.{gen}.log"


def new_epoch(old: str = "", rng: random.Random | None = None) -> str:
    """A random 8-hex-digit epoch, other than ``old`` (from ``rng`` if given: the
    simulator's, so that a seed replays exactly)."""
    while True:
        epoch = secrets.token_hex(4) if rng is None else f"{rng.getrandbits(32):08x}"
        if epoch != old:
            return epoch


# -- errors ----------------------------------------------------------------------------
class StorageError(RuntimeError):
    """Base of the errors GossipStorage raises; the message is one line naming the file
    or directory and what to do. ``errno``: of the underlying OSError, if any."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class CorruptStorageError(StorageError):
    """load: the files cannot be read as a store; the node must not start on them."""


class DiskFullError(StorageError):
    """The disk is full: nothing of the failed call is durable, the files are as before
    it, and the same call (the same batch) may be retried later."""


class FatalStorageError(StorageError):
    """An I/O error (EIO, a failed fsync...): the durable state may differ from what this
    object believes; it refuses every further call. The node must stop and reload."""


def _errname(e: OSError) -> str:
    code = e.errno
    return "?" if code is None else errno_mod.errorcode.get(code, str(code))


def _is_full(e: OSError) -> bool:
    return e.errno in (errno_mod.ENOSPC, errno_mod.EDQUOT)


# -- the interface ---------------------------------------------------------------------
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
    #: this copy of the node's data: 8 hex digits, or "" (migrated from SQLite); a new one
    #: whenever load refused anything (``corrupt`` is not empty)
    epoch: str = ""
    #: what load refused (checksum failures), one human-readable line each
    corrupt: list[str] = field(default_factory=list)


# -- encoding ----------------------------------------------------------------------------
def _put_body(key: str, value: Value) -> bytes:
    kb = key.encode()
    return _U32.pack(len(kb)) + kb + encode_value(value)


def _dedup_body(e: DedupEntry) -> bytes:
    op, client = e.op.encode(), e.client_id.encode()
    ts = e.ts
    head = _DEDUP.pack(
        e.seq, ts.wall_ms, ts.logical, e.num >> 64, e.num & (_U64 - 1), e.low, len(op), len(client)
    )
    return head + op + client + ts.node.encode()


def _hlc_body(ts: Timestamp) -> bytes:
    return _HLC.pack(ts.wall_ms, ts.logical) + ts.node.encode()


def _frame(
    gen: int, start: int, entries: Iterable[tuple[int, bytes]], limit: int
) -> Iterator[bytes]:
    """``entries`` (kind, body) as records at byte ``start`` of generation ``gen``'s log, a
    new record after about ``limit`` payload bytes."""
    parts: list[bytes] = [b""]
    rec = start
    pos = rec + _HEAD.size
    for kind, body in entries:
        e = _ENTRY.pack(kind, len(body)) + body
        parts.append(e)
        parts.append(_U32.pack(zlib.crc32(e, _seed(gen, pos))))
        pos += len(e) + 4
        if pos - rec - _HEAD.size >= limit:
            parts[0] = _record_head(gen, rec, pos - rec - _HEAD.size)
            yield b"".join(parts)
            parts, rec = [b""], pos
            pos = rec + _HEAD.size
    if len(parts) > 1:
        parts[0] = _record_head(gen, rec, pos - rec - _HEAD.size)
        yield b"".join(parts)


def _record_head(gen: int, pos: int, length: int) -> bytes:
    front = _MAGIC + _U32.pack(length)
    return front + _U32.pack(zlib.crc32(front, _seed(gen, pos)))


def _encode_manifest(gen: int) -> bytes:
    head = _MANIFEST_MAGIC + _SEQ.pack(gen)
    return head + _U32.pack(zlib.crc32(head))


# -- decoding ----------------------------------------------------------------------------
def _record_at(raw: memoryview, pos: int, gen: int) -> int | None:
    """The payload length of the record whose header is valid at ``pos``, else None."""
    if pos + _HEAD.size > len(raw):
        return None
    magic, length, crc = _HEAD.unpack_from(raw, pos)
    if magic != _MAGIC or zlib.crc32(raw[pos : pos + 8], _seed(gen, pos)) != crc:
        return None
    return int(length)


def _next_record(raw: memoryview, pos: int, gen: int) -> int | None:
    """The offset of the first valid record header at or after ``pos``."""
    data = raw.obj
    assert isinstance(data, bytes)
    while (pos := data.find(_MAGIC, pos)) >= 0:
        if _record_at(raw, pos, gen) is not None:
            return pos
        pos += 1
    return None


def _entry_at(raw: memoryview, pos: int, end: int, gen: int) -> int | None:
    """The end of the entry that verifies at ``pos`` (within a payload ending at ``end``)."""
    if pos + 9 > end:
        return None
    q = pos + 9 + int(_ENTRY.unpack_from(raw, pos)[1])
    if q > end or zlib.crc32(raw[pos : q - 4], _seed(gen, pos)) != _U32.unpack_from(raw, q - 4)[0]:
        return None
    return q


def _entries(
    raw: memoryview, start: int, end: int, gen: int
) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]]]:
    """A payload's entries -> ([(kind, body start, body end)] that verify, [(start, end)
    of the byte ranges that do not])."""
    good: list[tuple[int, int, int]] = []
    bad: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        q = _entry_at(raw, pos, end, gen)
        if q is not None:
            good.append((raw[pos], pos + 5, q - 4))
            pos = q
            continue
        # skip to the next entry that verifies: where the length says (if it is the
        # end or an entry verifies there), else the first offset where one does
        nxt = end
        if pos + 9 <= end:
            declared = pos + 9 + _ENTRY.unpack_from(raw, pos)[1]
            if declared == end or (declared < end and _entry_at(raw, declared, end, gen)):
                nxt = declared
            else:
                nxt = next((r for r in range(pos + 1, end) if _entry_at(raw, r, end, gen)), end)
        bad.append((pos, nxt))
        pos = nxt
    return good, bad


def _describe_bad(raw: memoryview, start: int, end: int, name: str) -> str:
    """One line on a refused byte range (an entry that failed its checksum, as far as it
    can be read)."""
    where = f"in {name} at byte {start}"
    what = f"{end - start} unreadable bytes"
    if end - start >= 9:
        kind, n = _ENTRY.unpack_from(raw, start)
        body = bytes(raw[start + 5 : min(start + 5 + n, end)])
        key: str | None = None
        try:
            if kind == PUT and len(body) >= 4:
                kn = _U32.unpack_from(body)[0]
                if 4 + kn <= len(body):
                    key = body[4 : 4 + kn].decode()
            elif kind == DEL:
                key = body.decode()
        except UnicodeDecodeError:
            key = None
        if key is not None:
            return f"key {key!r}: its value {where} fails its checksum; refused"
        if kind in _KIND_NAMES:
            what = _KIND_NAMES[kind]
    return f"{what} {where}: checksum mismatch; refused"


class _Unreadable(Exception):
    """A verified entry that does not decode (a bug or a format mismatch)."""


# -- the storage -------------------------------------------------------------------------
class GossipStorage:
    """Durable replica state (see the module docstring). Use from one thread."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        disk: Disk | None = None,
        compact_min_bytes: int = COMPACT_MIN_BYTES,
        prealloc_bytes: int = PREALLOC_BYTES,
        rng: random.Random | None = None,
    ) -> None:
        self.disk: Disk = OsDisk() if disk is None else disk
        self._rng = rng  # for new epochs (None: the OS's randomness)
        self.dir = Path(data_dir)
        self.compact_min_bytes = compact_min_bytes
        self.prealloc_bytes = max(1, prealloc_bytes)
        self.commits = 0  #: batches committed by this object
        self.compactions = 0  #: generations written by this object (incl. creation)
        self._gen = 0
        self._fd: int | None = None
        self._size = 0  # where the current log's records end (all of them durable)
        self._alloc = 0  # the current log's file size: zeros from _size on
        self._compact_at = 0  # no compaction attempt before the log reaches this size
        self._failed: FatalStorageError | None = None
        self._reset()

    def _reset(self) -> None:
        self._kv: dict[str, Value] = {}
        self._base_size = 0  # of the current generation's base (the live state then)
        self._dedup: dict[tuple[str, int], DedupEntry] = {}  # least recently used first
        self._seqs: dict[str, set[int]] = {}  # client -> its sequences in _dedup
        self._hlc: Timestamp | None = None
        self._epoch = ""

    @property
    def generation(self) -> int:
        return self._gen

    @property
    def state(self) -> Mapping[str, Value]:
        """What is durable (the image of the log after the last commit; read only)."""
        return self._kv

    @property
    def epoch(self) -> str:
        return self._epoch

    @property
    def log_path(self) -> Path:
        return self.dir / _log_name(self._gen)

    @property
    def log_bytes(self) -> int:
        """Where the records of the current log end (the rest of the file is zeros)."""
        return self._size

    # -- errors ------------------------------------------------------------------------
    def _corrupt(self, path: Path, what: str) -> CorruptStorageError:
        advice = RECOVERY_ADVICE.format(dir=self.dir)
        return CorruptStorageError(f"{path}: {what}; refusing to start; {advice}")

    def _fatal(self, e: OSError, doing: str) -> FatalStorageError:
        self._failed = FatalStorageError(
            f"{os.strerror(e.errno) if e.errno else e} ({_errname(e)}) {doing} in {self.dir}: "
            "the durable state is uncertain (after a failed write or fsync the kernel may "
            "have dropped unwritten data); this storage refuses every further call: stop "
            "the node and restart it (it reloads from disk)",
            e.errno,
        )
        log.error("storage_failed", dir=str(self.dir), doing=doing, error=str(e))
        return self._failed

    def _full(self, e: OSError, doing: str, outcome: str) -> DiskFullError:
        return DiskFullError(
            f"the disk at {self.dir} is full ({_errname(e)}) {doing}: {outcome}", e.errno
        )

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise FatalStorageError(
                f"refused: this storage failed earlier ({self._failed})", self._failed.errno
            )
        if self._fd is None:
            raise RuntimeError("GossipStorage: load() must succeed before commit()")

    def _sync(self, fd: int, name: str, *, data_only: bool = False) -> None:
        try:
            if data_only:
                self.disk.fdatasync(fd)
            else:
                self.disk.fsync(fd)
        except OSError as e:
            raise self._fatal(e, f"{'fdatasync' if data_only else 'fsync'} of {name}") from e

    def _sync_dir(self) -> None:
        try:
            self.disk.fsync_dir(self.dir)
        except OSError as e:
            raise self._fatal(e, "fsync of the directory") from e

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
        except OSError as e:  # load removes it
            log.warning("remove_failed", file=name, dir=str(self.dir), error=str(e))

    # -- the in-memory image of the durable state --------------------------------------
    def _remember(self, e: DedupEntry) -> None:
        k = (e.client_id, e.seq)
        self._dedup.pop(k, None)  # (re-inserted: most recently used)
        self._dedup[k] = e
        self._seqs.setdefault(e.client_id, set()).add(e.seq)

    def _evict(self, client: str) -> None:
        for s in self._seqs.pop(client, ()):
            del self._dedup[(client, s)]

    def _evict_seq(self, client: str, seq: int) -> None:
        if self._dedup.pop((client, seq), None) is not None:
            seqs = self._seqs[client]
            seqs.discard(seq)
            if not seqs:
                del self._seqs[client]

    # -- loading -----------------------------------------------------------------------
    def load(self) -> Loaded:
        """Everything durable, verified (see the module docstring): refused entries are
        left out and described in ``corrupt``, and then the epoch is a new one.

        Raises CorruptStorageError, DiskFullError or FatalStorageError (StorageError)."""
        if self._failed is not None:
            raise FatalStorageError(
                f"refused: this storage failed earlier ({self._failed})", self._failed.errno
            )
        if self._fd is not None:
            fd, self._fd = self._fd, None
            self._close_quietly(fd)
        self._reset()
        doing = f"loading {self.dir}"
        try:
            corrupt = self._load_io()
        except OSError as e:
            if _is_full(e):
                raise self._full(e, doing, _CANNOT_START) from e
            raise self._fatal(e, doing) from e
        self._compact_at = 0
        log.info(
            "gossip_storage_loaded",
            dir=str(self.dir),
            generation=self._gen,
            keys=len(self._kv),
            dedup_entries=len(self._dedup),
            epoch=self._epoch,
            refused=len(corrupt),
        )
        return Loaded(
            dict(self._kv),
            list(self._dedup.values()),
            self._hlc,
            self._epoch,
            corrupt,
        )

    def _load_io(self) -> list[str]:
        disk = self.disk
        disk.makedirs(self.dir)
        names = set(disk.listdir(self.dir))
        self._gen = 0
        if CURRENT in names:
            gen = self._read_manifest()
            if _log_name(gen) not in names:
                raise self._corrupt(
                    self.dir / CURRENT, f"names generation {gen}, but {_log_name(gen)} is missing"
                )
            self._remove_leftovers(names, keep=gen)
            return self._open_generation(gen)
        if LEGACY_DB in names:
            self._remove_leftovers(names - set(_LEGACY_FILES), keep=None)
            return self._migrate()
        # blank, or an unfinished creation (its CURRENT was never switched in)
        for name in sorted(names):
            m = _LOG_FILE.fullmatch(name)
            if m is not None and self._holds_commits(name, int(m.group(1))):
                raise self._corrupt(
                    self.dir / CURRENT,
                    f"missing, while {name} holds commits (restore {CURRENT})",
                )
        self._remove_leftovers(names, keep=None)
        self._switch(new_epoch(rng=self._rng), _CANNOT_START)
        log.info("gossip_storage_created", dir=str(self.dir), epoch=self._epoch)
        return []

    def _read_manifest(self) -> int:
        path = self.dir / CURRENT
        raw = self.disk.read(path) or b""
        if len(raw) != _MANIFEST.size:
            raise self._corrupt(path, f"the manifest is {len(raw)} bytes, not {_MANIFEST.size}")
        magic, gen, crc = _MANIFEST.unpack(raw)
        if magic != _MANIFEST_MAGIC or zlib.crc32(raw[:-4]) != crc or gen < 1:
            raise self._corrupt(path, "the manifest fails its checksum (not a gossip store?)")
        return int(gen)

    def _remove_leftovers(self, names: set[str], keep: int | None) -> None:
        for name in sorted(names):
            m = _LOG_FILE.fullmatch(name)
            if (
                name == CURRENT_TMP
                or (m is not None and int(m.group(1)) != keep)
                or (keep is not None and name in _LEGACY_FILES)
            ):
                log.info("leftover_removed", file=name, dir=str(self.dir), generation=keep)
                self._remove_quietly(name)

    def _holds_commits(self, name: str, gen: int) -> bool:
        """Whether a log has a record after the one that ends its base."""
        raw = memoryview(self.disk.read(self.dir / name) or b"")
        pos, base_done = 0, False
        while (length := _record_at(raw, pos, gen)) is not None:
            if base_done:
                return True
            end = pos + _HEAD.size + length
            good, _ = _entries(raw, pos + _HEAD.size, min(end, len(raw)), gen)
            base_done = any(kind == BASE_END for kind, _, _ in good)
            pos = end
        return False

    def _open_generation(self, gen: int) -> list[str]:
        """Replay generation ``gen``; zero a torn tail; a new epoch if anything was refused."""
        self._gen = gen
        path = self.log_path
        raw = self.disk.read(path) or b""
        corrupt, valid = self._replay(memoryview(raw), gen, path)
        if corrupt:
            old = self._epoch
            for line in corrupt:
                log.warning("refused_corrupt_record", file=str(path), what=line)
            # without the refused bytes
            self._switch(new_epoch(self._epoch, self._rng), _CANNOT_START)
            log.warning(
                "epoch_replaced", dir=str(self.dir), old=old, new=self._epoch, refused=len(corrupt)
            )
            return corrupt
        fd = self._fd = self.disk.open_write(path)
        torn = len(raw[valid:].rstrip(b"\0"))
        if torn:  # the last write, unfinished: never acknowledged
            log.info("torn_tail_dropped", file=str(path), offset=valid, bytes=torn)
            self.disk.pwrite(fd, bytes(torn), valid)
            self._sync(fd, path.name, data_only=True)
        self._size, self._alloc = valid, len(raw)
        return []

    def _replay(self, raw: memoryview, gen: int, path: Path) -> tuple[list[str], int]:
        """Apply the log's records to the in-memory image -> (what was refused, where the
        valid records end)."""
        name = path.name
        corrupt: list[str] = []
        pos, end = 0, len(raw)
        if end == 0:
            raise self._corrupt(path, "empty")
        base_done = epoch_seen = False
        while pos < end:
            length = _record_at(raw, pos, gen)
            stop = pos + _HEAD.size + (length or 0)
            if length is not None and stop <= end:
                good, bad = _entries(raw, pos + _HEAD.size, stop, gen)
                if bad and base_done and _next_record(raw, stop, gen) is None:
                    break  # the last commit, torn (the base was synced before it was used)
                corrupt += [_describe_bad(raw, s, e, name) for s, e in bad]
                for kind, b0, b1 in good:
                    try:
                        self._apply(kind, bytes(raw[b0:b1]))
                    except (_Unreadable, DecodeError, UnicodeDecodeError, struct.error) as e:
                        # its checksum holds: not damage, but a bug or another version's
                        # format; refusing it would delete it for good (see Epoch)
                        raise self._corrupt(
                            path,
                            f"the entry at byte {b0 - 5} passes its checksum but cannot be "
                            f"read ({e}); written by another version of caplab?",
                        ) from e
                    if kind == BASE_END:
                        base_done = True
                        self._base_size = stop
                    elif kind == EPOCH:
                        epoch_seen = True
                pos = stop
                continue
            nxt = None if length is not None else _next_record(raw, pos + 1, gen)
            if nxt is None:  # nothing valid follows: the last write, torn
                if pos == 0:
                    raise self._corrupt(
                        path, "empty" if not any(raw) else "not a gossip log (no valid record)"
                    )
                break
            corrupt.append(
                f"{nxt - pos} bytes in {name} at byte {pos} are not a valid record (a damaged "
                "record header): whatever they held is refused"
            )
            pos = nxt
        if not base_done:
            corrupt.append(f"{name} ends before the end of its base (truncated or damaged)")
        elif not epoch_seen:
            corrupt.append(f"the epoch in {name} was lost")
        return corrupt, pos

    def _apply(self, kind: int, body: bytes) -> None:
        """One verified entry into the in-memory image."""
        if kind == PUT:
            kn = _U32.unpack_from(body)[0]
            if 4 + kn > len(body):
                raise _Unreadable("bad key length")
            self._kv[body[4 : 4 + kn].decode()] = decode_value(body[4 + kn :])
        elif kind == DEL:
            self._kv.pop(body.decode(), None)
        elif kind == DEDUP:
            seq, wall, logical, hi, lo, low, on, cn = _DEDUP.unpack_from(body)
            p = _DEDUP.size
            if p + on + cn > len(body):
                raise _Unreadable("bad dedup entry")
            op, client = body[p : p + on].decode(), body[p + on : p + on + cn].decode()
            ts = Timestamp(wall, logical, body[p + on + cn :].decode())
            self._remember(DedupEntry(client, seq, op, ts, hi << 64 | lo, low))
        elif kind == EVICT:
            self._evict(body.decode())
        elif kind == EVICT_SEQ:
            self._evict_seq(body[_SEQ.size :].decode(), _SEQ.unpack_from(body)[0])
        elif kind == HLC:
            wall, logical = _HLC.unpack_from(body)
            ts = Timestamp(wall, logical, body[_HLC.size :].decode())
            if self._hlc is None or ts > self._hlc:
                self._hlc = ts
        elif kind == EPOCH:
            self._epoch = body.decode()
        elif kind != BASE_END:
            raise _Unreadable(f"unknown entry kind {kind}")

    # -- migration from SQLite ---------------------------------------------------------
    def _migrate(self) -> list[str]:
        path = self.dir / LEGACY_DB
        try:
            state, dedup, hlc, corrupt = _load_sqlite(path)
        except _LegacyUnreadable as e:
            raise self._corrupt(path, f"the old version's database {e}") from e
        self._kv = state
        for d in dedup:
            self._remember(d)
        self._hlc = hlc
        for line in corrupt:
            log.warning("refused_corrupt_record", file=str(path), what=line)
        self._switch(new_epoch(rng=self._rng) if corrupt else "", _CANNOT_START)
        for name in _LEGACY_FILES:
            self._remove_quietly(name)
        log.info(
            "migrated_from_sqlite", file=str(path), keys=len(state), epoch=self._epoch,
            refused=len(corrupt),
        )  # fmt: skip
        return corrupt

    # -- writing -----------------------------------------------------------------------
    def commit(self, batch: CommitBatch) -> None:
        """Append ``batch`` as one record and fdatasync it: durable when this returns.

        DiskFullError: nothing of it is durable (retry the same batch later);
        FatalStorageError: see the module docstring."""
        self._check_usable()
        if not batch and (batch.hlc is None or batch.hlc == self._hlc):
            return
        gen, start = self._gen, self._size
        gmix = gen * _MIX  # (see _seed)
        pos = start + _HEAD.size
        parts: list[bytes] = [b""]
        add = parts.append
        pack_put, pack_entry, pack_u32 = _PUT.pack, _ENTRY.pack, _U32.pack
        crc32, enc = zlib.crc32, encode_value
        for k, v in batch.kv.items():
            kb = k.encode()
            if v is None:
                e = pack_entry(DEL, len(kb)) + kb
            else:
                ev = enc(v)
                e = pack_put(PUT, 4 + len(kb) + len(ev), len(kb)) + kb + ev
            add(e)
            add(pack_u32(crc32(e, (pos ^ gmix) & _MASK)))
            pos += len(e) + 4
        more = [(EVICT, c.encode()) for c in batch.evict]
        more += [(EVICT_SEQ, _SEQ.pack(s) + c.encode()) for c, s in batch.evict_seqs]
        more += [(DEDUP, _dedup_body(d)) for d in batch.dedup.values()]
        if batch.hlc is not None:
            more.append((HLC, _hlc_body(batch.hlc)))
        for kind, body in more:
            e = pack_entry(kind, len(body)) + body
            add(e)
            add(pack_u32(crc32(e, (pos ^ gmix) & _MASK)))
            pos += len(e) + 4
        parts[0] = _record_head(gen, start, pos - start - _HEAD.size)
        if pos > self._alloc:  # beyond the preallocated space: extend it (zeros)
            add(bytes(self._padded(pos) - pos))
        data = b"".join(parts)
        fd = self._fd
        assert fd is not None
        name = _log_name(gen)
        try:
            self.disk.pwrite(fd, data, start)
        except OSError as e:
            if not _is_full(e):
                raise self._fatal(e, f"writing {name}") from e
            self._roll_back(fd, name, e, start, len(data))
        self._sync(fd, name, data_only=True)
        self._size = pos
        self._alloc = max(self._alloc, start + len(data))
        self.commits += 1
        # the in-memory image, in the order replay applies the entries
        kv = self._kv
        for k, v in batch.kv.items():
            if v is None:
                kv.pop(k, None)
            else:
                kv[k] = v
        for c in batch.evict:
            self._evict(c)
        for c, s in batch.evict_seqs:
            self._evict_seq(c, s)
        for d in batch.dedup.values():
            self._remember(d)
        if batch.hlc is not None and (self._hlc is None or batch.hlc > self._hlc):
            self._hlc = batch.hlc
        if pos >= self._compact_at and pos > max(self.compact_min_bytes, 2 * self._base_size):
            self._compact()

    def _roll_back(self, fd: int, name: str, e: OSError, start: int, n: int) -> NoReturn:
        """After a failed write of ``n`` bytes at ``start`` (disk full): the log as before
        it (zeros where it wrote, no extension), durably."""
        disk = self.disk
        try:
            if disk.size(fd) > self._alloc:
                disk.truncate(fd, self._alloc)
            if start < self._alloc:
                disk.pwrite(fd, bytes(min(n, self._alloc - start)), start)
            disk.fdatasync(fd)
        except OSError as e2:
            raise self._fatal(e2, f"rolling back a failed write to {name}") from e
        raise self._full(
            e,
            f"writing {name}",
            "nothing from this batch is durable (the files are as before the commit); "
            "commit the same batch again once space is freed",
        ) from e

    def _compact(self) -> None:
        """Write the live state as the next generation (after a durable commit)."""
        before = self._size
        try:
            self._switch(self._epoch, "compaction postponed (the commit itself is durable)")
        except DiskFullError as e:
            self._compact_at = before + self.compact_min_bytes
            log.warning("compaction_postponed", dir=str(self.dir), log_bytes=before, error=str(e))
            return
        log.info("compacted", dir=str(self.dir), generation=self._gen, log_bytes=before,
                 live_bytes=self._size)  # fmt: skip

    def _switch(self, epoch: str, full: str) -> None:
        """Make the in-memory image, with ``epoch``, the durable state: generation G+1
        (see "Generations" in the module docstring). DiskFullError (its message ends with
        ``full``): nothing changed."""
        disk, new = self.disk, self._gen + 1
        name = _log_name(new)
        fd: int | None = None
        size = 0
        doing = f"writing {name}"
        try:
            fd = disk.create(self.dir / name)
            for rec in _frame(new, 0, self._base(epoch), BASE_RECORD_BYTES):
                disk.write(fd, rec)
                size += len(rec)
            disk.write(fd, bytes(self._padded(size) - size))
            self._sync(fd, name)
            disk.close(fd)
            fd = None
            self._sync_dir()
            doing = f"writing {CURRENT_TMP}"
            tmp = disk.create(self.dir / CURRENT_TMP)
            try:
                disk.write(tmp, _encode_manifest(new))
                self._sync(tmp, CURRENT_TMP)
            finally:
                disk.close(tmp)
            doing = f"renaming {CURRENT_TMP} to {CURRENT}"
            disk.rename(self.dir / CURRENT_TMP, self.dir / CURRENT)
        except OSError as e:
            if fd is not None:
                self._close_quietly(fd)
            if not _is_full(e) or (doing.startswith("renaming") and self._switched(new)):
                raise self._fatal(e, doing) from e
            for leftover in (name, CURRENT_TMP):
                self._remove_quietly(leftover)
            raise self._full(e, doing, full) from e
        except FatalStorageError:
            if fd is not None:
                self._close_quietly(fd)
            raise
        self._sync_dir()  # the switch is durable
        try:
            fd = disk.open_write(self.dir / name)
        except OSError as e:
            raise self._fatal(e, f"opening {name}") from e
        old_fd, old_gen = self._fd, self._gen
        self._fd, self._gen, self._epoch = fd, new, epoch
        self._size = self._base_size = size
        self._alloc = self._padded(size)
        self.compactions += 1
        if old_fd is not None:
            self._close_quietly(old_fd)
        if old_gen:
            self._remove_quietly(_log_name(old_gen))

    def _padded(self, end: int) -> int:
        """The file size to extend to for records ending at ``end``."""
        p = self.prealloc_bytes
        return (end // p + 1) * p

    def _base(self, epoch: str) -> Iterator[tuple[int, bytes]]:
        yield EPOCH, epoch.encode()
        if self._hlc is not None:
            yield HLC, _hlc_body(self._hlc)
        for k, v in self._kv.items():
            yield PUT, _put_body(k, v)
        for d in self._dedup.values():
            yield DEDUP, _dedup_body(d)
        yield BASE_END, b""

    def _switched(self, gen: int) -> bool:
        """After a failed rename of the manifest: whether it happened all the same."""
        try:
            return self.disk.read(self.dir / CURRENT) == _encode_manifest(gen)
        except OSError:
            return True  # cannot tell: assume the worst

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            self._close_quietly(fd)


# -- the SQLite format of earlier versions (read once, to migrate) ---------------------
_SQLITE_TABLES = frozenset({"kv", "dedup", "meta"})


class _LegacyUnreadable(Exception):
    """gossip.db cannot be read (the message says why)."""


def _load_sqlite(
    path: Path,
) -> tuple[dict[str, Value], list[DedupEntry], Timestamp | None, list[str]]:
    """The state in an old version's SQLite ``gossip.db`` -> (kv, dedup in LRU order, HLC,
    refused values). _LegacyUnreadable if it is not a readable gossip database."""
    try:
        # mode=rw: never create it; read-write so that SQLite recovers its WAL
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, isolation_level=None)
    except sqlite3.Error as e:
        raise _LegacyUnreadable(f"cannot be opened ({e})") from e
    try:
        row = db.execute("PRAGMA quick_check").fetchone()
        if row is None or row[0] != "ok":
            raise _LegacyUnreadable(
                f"fails SQLite's integrity check ({row[0] if row else 'no answer'})"
            )
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:  # an old version's start that never got to create its tables
            return {}, [], None, []
        if not tables >= _SQLITE_TABLES:
            raise _LegacyUnreadable(f"has no {sorted(_SQLITE_TABLES - tables)} table(s)")
        state: dict[str, Value] = {}
        corrupt: list[str] = []
        for key, raw in db.execute("SELECT key, value FROM kv"):
            try:
                state[str(key)] = decode_value(bytes(raw))
            except (DecodeError, TypeError) as e:
                corrupt.append(
                    f"key {key!r}: its value in {path.name} is unreadable ({e}); refused"
                )
        dedup = [
            DedupEntry(
                str(c), int(s), str(op), Timestamp(int(w), int(lg), str(n)), int(num), int(low)
            )
            for c, s, op, w, lg, n, num, low in db.execute(
                "SELECT client_id, seq, op, wall_ms, logical, node, num, low FROM dedup "
                "ORDER BY used"
            )
        ]
        row = db.execute("SELECT a, b, c FROM meta WHERE name = 'hlc'").fetchone()
        hlc = Timestamp(int(row[0]), int(row[1]), str(row[2])) if row else None
        return state, dedup, hlc, corrupt
    except sqlite3.Error as e:
        raise _LegacyUnreadable(f"is not a readable SQLite gossip database ({e})") from e
    finally:
        db.close()
