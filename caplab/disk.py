"""The file I/O under the stores' storage: the real disk (OsDisk) and a simulated one
(SimDisk).

Theory of operation
-------------------
RaftStorage (raft/storage.py) and GossipStorage (gossip/storage.py) do all their I/O
through the small ``Disk`` interface, so the production storage code runs unchanged on a
real file system and in the deterministic simulators and crash tests.
Files are addressed by path and opened as integer handles, in append mode
(``open_append``, ``create``: ``write`` appends) or for positional writes
(``open_write``: ``pwrite`` at an offset; never mix the two on one handle: on Linux a
pwrite to an O_APPEND file appends).

``OsDisk`` is a thin layer over ``os``: one ``os.write`` (``os.pwrite``) and one
``os.fdatasync`` per write-and-sync, as without it.

``SimDisk`` is an in-memory file system with the semantics a crash exposes:

* a file has durable content plus unsynced writes (appends, positional writes,
  truncations); ``fsync``/``fdatasync`` of the file makes its current content durable;
* a new file's directory entry, a rename and an unlink become durable only with
  ``fsync_dir`` of their directory;
* ``crash()`` returns the disk as it is found after a power loss: its durable state,
  plus, chosen by the seeded ``random.Random``, for each file a prefix of its unsynced
  writes (possibly cut in the middle of one: a torn write), and for each unsynced
  directory operation, independently, whether it happened.

Faults: ``full = True`` makes every ``write``, and every ``pwrite`` that would extend the
file (overwriting allocated bytes needs no space), raise OSError(ENOSPC), after writing
a random prefix of its data (a short write, then the error); ``fail_next(op, errno,
after=0)`` makes the next operation of that kind (one of OPS; "fsync" is fsync or
fdatasync, "write" is write or pwrite) but ``after`` raise OSError(errno) (a write may
leave a prefix of its data; a
failed fsync leaves the file's unsynced writes unsynced for good: later fsyncs of it
report success without making anything durable, as Linux may after a writeback error);
``crash_after(n)`` makes the mutating operation after the next ``n`` raise ``SimCrash``,
either before doing anything or, at random, halfway through (part of a write written,
part of a sync done). After a SimCrash the disk refuses every call but ``close``: take
``crash()`` and build new storage on it. ``mutations`` counts mutating operations (file
creation, write, pwrite, truncate, fsync, fdatasync, fsync_dir, rename, remove) so far, so a
test can crash at every one of them. Everything is deterministic given the seed; there
is no notion of time.
"""

from __future__ import annotations

import errno as errno_mod
import os
import posixpath
import random
from typing import Protocol

StrPath = str | os.PathLike[str]

_O_WRITE = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
_O_APPEND = _O_WRITE | os.O_APPEND
_O_CREATE = _O_APPEND | os.O_TRUNC
_fdatasync = getattr(os, "fdatasync", os.fsync)  # (macOS has none)


class Disk(Protocol):
    """The file operations the storages need. Errors are OSError (as from ``os``)."""

    def makedirs(self, path: StrPath) -> None:
        """Create the directory (and its parents) if missing."""

    def listdir(self, path: StrPath) -> list[str]:
        """Names in the directory (empty if it does not exist)."""
        ...

    def read(self, path: StrPath) -> bytes | None:
        """The whole content of the file, or None if there is no such file."""
        ...

    def open_append(self, path: StrPath) -> int:
        """Open for appending; create the file (empty) if missing."""
        ...

    def create(self, path: StrPath) -> int:
        """Open for appending a new, empty file (an existing one is truncated)."""
        ...

    def open_write(self, path: StrPath) -> int:
        """Open for positional writes (``pwrite``); create the file (empty) if missing."""
        ...

    def size(self, fd: int) -> int: ...

    def write(self, fd: int, data: bytes) -> None:
        """Append all of ``data``; on OSError a prefix of it may have been written."""

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        """Write all of ``data`` at ``offset`` (of a file opened with ``open_write``),
        extending the file if needed; on OSError a prefix of it may have been written."""

    def truncate(self, fd: int, size: int) -> None: ...

    def fsync(self, fd: int) -> None: ...

    def fdatasync(self, fd: int) -> None: ...

    def close(self, fd: int) -> None: ...

    def rename(self, src: StrPath, dst: StrPath) -> None:
        """Atomically replace ``dst`` by ``src`` (``os.replace``); same directory."""

    def remove(self, path: StrPath) -> None:
        """Unlink the file; FileNotFoundError if missing."""

    def fsync_dir(self, path: StrPath) -> None:
        """Make the directory's entries (creations, renames, unlinks) durable."""


class OsDisk:
    """The real file system."""

    def makedirs(self, path: StrPath) -> None:
        os.makedirs(path, exist_ok=True)

    def listdir(self, path: StrPath) -> list[str]:
        try:
            return os.listdir(path)
        except FileNotFoundError:
            return []

    def read(self, path: StrPath) -> bytes | None:
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def open_append(self, path: StrPath) -> int:
        return os.open(path, _O_APPEND, 0o644)

    def create(self, path: StrPath) -> int:
        return os.open(path, _O_CREATE, 0o644)

    def open_write(self, path: StrPath) -> int:
        return os.open(path, _O_WRITE, 0o644)

    def size(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def write(self, fd: int, data: bytes) -> None:
        n = os.write(fd, data)
        if n < len(data):  # a short write: go on from where it stopped (rare)
            view = memoryview(data)[n:]
            while view:
                view = view[os.write(fd, view) :]

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:  # (a short write, rare: go on from where it stopped)
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n

    def truncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        _fdatasync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def rename(self, src: StrPath, dst: StrPath) -> None:
        os.replace(src, dst)

    def remove(self, path: StrPath) -> None:
        os.remove(path)

    def fsync_dir(self, path: StrPath) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class SimCrash(BaseException):
    """The simulated machine lost power (a BaseException: ``except Exception`` in the
    code under test must not swallow it)."""


#: operation kinds for SimDisk.fail_next: the Disk method names, except that "open" is
#: open_append or open_write, "write" is write or pwrite, and "fsync" is fsync or
#: fdatasync of a file
OPS = frozenset(
    {"listdir", "read", "open", "create", "write", "truncate", "fsync", "fsync_dir"}
    | {"rename", "remove"}
)


#: an unsynced change of a file: (data, -1) appends, (data, offset) writes at offset,
#: (None, size) truncates
_Op = tuple[bytes | None, int]


class _Inode:
    """A file: durable content, and the writes since the last sync, in order (_Op)."""

    __slots__ = ("durable", "ops", "poisoned", "view")

    def __init__(self, durable: bytes = b"") -> None:
        self.durable = durable
        self.view = bytearray(durable)  # what reads see: durable + ops applied
        self.ops: list[_Op] = []
        self.poisoned = False  # a sync failed: its unsynced writes never become durable

    def apply(self, op: _Op) -> None:
        self.ops.append(op)
        _apply(self.view, op)

    def sync(self, n: int | None = None) -> None:
        """Make the first ``n`` unsynced writes (all: None) durable."""
        if self.poisoned:
            return
        n = len(self.ops) if n is None else n
        buf = bytearray(self.durable)
        for op in self.ops[:n]:
            _apply(buf, op)
        self.durable = bytes(buf)
        del self.ops[:n]


def _apply(buf: bytearray, op: _Op) -> None:
    data, n = op
    if data is None:
        del buf[n:]
        buf.extend(bytes(n - len(buf)))
    elif n < 0:
        buf += data
    else:
        if len(buf) < n:
            buf.extend(bytes(n - len(buf)))
        buf[n : n + len(data)] = data


class _DirOp:
    """An unsynced directory change: link (name -> inode), rename (name -> dst), unlink."""

    __slots__ = ("dst", "inode", "kind", "name")

    def __init__(self, kind: str, name: str, dst: str = "", inode: _Inode | None = None) -> None:
        self.kind, self.name, self.dst, self.inode = kind, name, dst, inode

    def apply(self, names: dict[str, _Inode]) -> None:
        if self.kind == "link":
            assert self.inode is not None
            names[self.name] = self.inode
        elif self.kind == "rename":
            if self.name in names:
                names[self.dst] = names.pop(self.name)
        else:
            names.pop(self.name, None)


def _norm(path: StrPath) -> str:
    return posixpath.normpath(os.fspath(path))


class SimDisk:
    """An in-memory file system that loses what a real one may lose in a crash.

    ``rng``: the seeded random source of torn writes, crash outcomes and short writes
    (an int seeds a new one). ``full``: every write fails with ENOSPC.
    """

    def __init__(self, rng: random.Random | int | None = None) -> None:
        self.rng = rng if isinstance(rng, random.Random) else random.Random(rng or 0)
        self.full = False
        self.mutations = 0  #: mutating operations so far (see crash_after)
        self._names: dict[str, _Inode] = {}  # the namespace as the running system sees it
        self._durable_names: dict[str, _Inode] = {}  # what survives a crash for sure
        self._dir_ops: dict[str, list[_DirOp]] = {}  # unsynced, per directory, in order
        self._dirs: set[str] = set()
        self._fds: dict[int, _Inode] = {}
        self._next_fd = 3
        self._fail: dict[str, dict[int, int]] = {}  # op -> {ordinal of that op: errno}
        self.op_counts: dict[str, int] = {}  #: calls so far per op kind (see OPS)
        self._crash_at: int | None = None
        self._dead = False

    # -- fault injection --------------------------------------------------------------
    def fail_next(self, op: str, errno: int = errno_mod.EIO, *, after: int = 0) -> None:
        """The next ``op`` (see OPS) but ``after`` more of its kind raises OSError(errno)."""
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; one of {sorted(OPS)}")
        self._fail.setdefault(op, {})[self.op_counts.get(op, 0) + after] = errno

    def crash_after(self, n: int) -> None:
        """The mutating operation after the next ``n`` ones raises SimCrash."""
        self._crash_at = self.mutations + n

    def disarm(self, *, faults: bool = True) -> None:
        """Cancel a pending crash_after and (``faults``) the pending fail_next errors."""
        self._crash_at = None
        if faults:
            self._fail.clear()

    def crash(self) -> SimDisk:
        """The disk as found after a power loss now (this one is dead from now on)."""
        self._dead = True
        rng = self.rng
        names = dict(self._durable_names)
        for d in sorted(self._dir_ops):
            for op in self._dir_ops[d]:
                if rng.random() < 0.5:
                    op.apply(names)
        after = SimDisk(rng)
        after.full = self.full
        after._dirs = set(self._dirs)
        survived: dict[int, _Inode] = {}
        for name in sorted(names):
            ino = names[name]
            if id(ino) not in survived:
                survived[id(ino)] = _Inode(self._torn(ino))
            after._names[name] = after._durable_names[name] = survived[id(ino)]
        return after

    def _torn(self, ino: _Inode) -> bytes:
        """Durable content plus a random prefix of the unsynced writes."""
        buf = bytearray(ino.durable)
        k = self.rng.randint(0, len(ino.ops))
        for op in ino.ops[:k]:
            _apply(buf, op)
        if k < len(ino.ops) and ino.ops[k][0] is not None and self.rng.random() < 0.5:
            data, n = ino.ops[k]
            assert data is not None
            _apply(buf, (data[: self.rng.randint(0, len(data))], n))
        return bytes(buf)

    # -- inspection (tests) -----------------------------------------------------------
    def files(self, path: StrPath) -> dict[str, bytes]:
        """Name -> content of the files in a directory, as the running system sees them."""
        d = _norm(path)
        return {
            posixpath.basename(n): bytes(i.view)
            for n, i in sorted(self._names.items())
            if posixpath.dirname(n) == d
        }

    # -- plumbing ---------------------------------------------------------------------
    def _check(self, op: str) -> None:
        if self._dead:
            raise SimCrash("the simulated disk crashed: use crash() to get its successor")
        n = self.op_counts.get(op, 0)
        self.op_counts[op] = n + 1
        code = self._fail[op].pop(n, None) if op in self._fail else None
        if code is not None:
            raise OSError(code, os.strerror(code))

    def _mutate(self, op: str) -> bool:
        """Account one mutating op; True: a crash strikes halfway through it."""
        if self._dead:
            raise SimCrash("the simulated disk crashed: use crash() to get its successor")
        n = self.mutations
        self.mutations += 1
        if self._crash_at is not None and n >= self._crash_at:
            self._dead = True
            if self.rng.random() < 0.5:
                raise SimCrash(f"crash before mutation {n} ({op})")
            return True
        self._check(op)
        return False

    def _dir_op(self, op: _DirOp) -> None:
        op.apply(self._names)
        d = posixpath.dirname(op.name)
        self._dir_ops.setdefault(d, []).append(op)

    def _fd(self, fd: int) -> _Inode:
        if self._dead:
            raise SimCrash("the simulated disk crashed: use crash() to get its successor")
        try:
            return self._fds[fd]
        except KeyError:
            raise OSError(errno_mod.EBADF, os.strerror(errno_mod.EBADF)) from None

    def _open(self, ino: _Inode) -> int:
        fd = self._next_fd
        self._next_fd += 1
        self._fds[fd] = ino
        return fd

    # -- the Disk interface -----------------------------------------------------------
    def makedirs(self, path: StrPath) -> None:
        self._check("makedirs")
        self._dirs.add(_norm(path))

    def listdir(self, path: StrPath) -> list[str]:
        self._check("listdir")
        d = _norm(path)
        return [posixpath.basename(n) for n in self._names if posixpath.dirname(n) == d]

    def read(self, path: StrPath) -> bytes | None:
        self._check("read")
        ino = self._names.get(_norm(path))
        return None if ino is None else bytes(ino.view)

    def open_append(self, path: StrPath) -> int:
        p = _norm(path)
        ino = self._names.get(p)
        if ino is not None:
            self._check("open")
            return self._open(ino)
        halfway = self._mutate("open")
        ino = _Inode()
        self._dir_op(_DirOp("link", p, inode=ino))
        if halfway:
            raise SimCrash(f"crash while creating {p}")
        return self._open(ino)

    def create(self, path: StrPath) -> int:
        p = _norm(path)
        halfway = self._mutate("create")
        ino = self._names.get(p)
        if ino is None:
            ino = _Inode()
            self._dir_op(_DirOp("link", p, inode=ino))
        elif ino.view:
            ino.apply((None, 0))
        if halfway:
            raise SimCrash(f"crash while creating {p}")
        return self._open(ino)

    def open_write(self, path: StrPath) -> int:
        return self.open_append(path)  # (the same file; SimDisk does not mix them up)

    def size(self, fd: int) -> int:
        self._check("size")
        return len(self._fd(fd).view)

    def write(self, fd: int, data: bytes) -> None:
        self._write(fd, data, -1)

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        if offset < 0:
            raise OSError(errno_mod.EINVAL, os.strerror(errno_mod.EINVAL))
        self._write(fd, data, offset)

    def _write(self, fd: int, data: bytes, offset: int) -> None:
        """Append (``offset`` -1) or write at ``offset``."""
        ino = self._fd(fd)
        try:
            halfway = self._mutate("write")
        except OSError:
            self._short_write(ino, data, offset)
            raise
        if halfway:
            self._short_write(ino, data, offset)
            raise SimCrash("crash in the middle of a write")
        if self.full and (offset < 0 or offset + len(data) > len(ino.view)):
            self._short_write(ino, data, offset)
            raise OSError(errno_mod.ENOSPC, os.strerror(errno_mod.ENOSPC))
        if data:
            ino.apply((bytes(data), offset))

    def _short_write(self, ino: _Inode, data: bytes, offset: int) -> None:
        n = self.rng.randint(0, len(data))
        if n:
            ino.apply((bytes(data[:n]), offset))

    def truncate(self, fd: int, size: int) -> None:
        ino = self._fd(fd)
        halfway = self._mutate("truncate")
        ino.apply((None, size))
        if halfway:
            raise SimCrash("crash in the middle of a truncate")

    def fsync(self, fd: int) -> None:
        self._sync(fd, "fsync")

    def fdatasync(self, fd: int) -> None:
        self._sync(fd, "fdatasync")

    def _sync(self, fd: int, op: str) -> None:
        ino = self._fd(fd)
        try:
            halfway = self._mutate("fsync")
        except OSError:
            ino.poisoned = True  # "fsyncgate": the dirty pages were dropped
            raise
        if halfway:
            ino.sync(self.rng.randint(0, len(ino.ops)))
            raise SimCrash(f"crash in the middle of an {op}")
        ino.sync()

    def close(self, fd: int) -> None:
        if not self._dead:
            self._fd(fd)
        self._fds.pop(fd, None)

    def rename(self, src: StrPath, dst: StrPath) -> None:
        s, d = _norm(src), _norm(dst)
        if posixpath.dirname(s) != posixpath.dirname(d):
            raise OSError(errno_mod.EXDEV, "SimDisk renames only within a directory")
        if s not in self._names:
            raise FileNotFoundError(errno_mod.ENOENT, os.strerror(errno_mod.ENOENT), s)
        halfway = self._mutate("rename")
        self._dir_op(_DirOp("rename", s, dst=d))
        if halfway:
            raise SimCrash(f"crash while renaming {s}")

    def remove(self, path: StrPath) -> None:
        p = _norm(path)
        if p not in self._names:
            raise FileNotFoundError(errno_mod.ENOENT, os.strerror(errno_mod.ENOENT), p)
        halfway = self._mutate("remove")
        self._dir_op(_DirOp("unlink", p))
        if halfway:
            raise SimCrash(f"crash while removing {p}")

    def fsync_dir(self, path: StrPath) -> None:
        d = _norm(path)
        halfway = self._mutate("fsync_dir")
        ops = self._dir_ops.pop(d, [])
        n = self.rng.randint(0, len(ops)) if halfway else len(ops)
        for op in ops[:n]:
            op.apply(self._durable_names)
        if ops[n:]:
            self._dir_ops[d] = ops[n:]
        if halfway:
            raise SimCrash(f"crash in the middle of an fsync of {d}")
