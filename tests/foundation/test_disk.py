"""caplab.disk: the simulated disk loses exactly what a real one may lose in a crash."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from caplab.disk import Disk, OsDisk, SimCrash, SimDisk

SEEDS = range(40)
T = TypeVar("T")


def outcomes(make: Callable[[int], T], seeds: range = SEEDS) -> set[T]:
    """The set of results of `make(seed)` over the seeds (the possible crash outcomes)."""
    return {make(seed) for seed in seeds}


def test_synced_data_survives_a_crash_and_unsynced_appends_survive_as_a_prefix() -> None:
    def run(seed: int) -> bytes | None:
        d = SimDisk(seed)
        fd = d.create("/a/f")
        d.write(fd, b"durable")
        d.fsync(fd)
        d.fsync_dir("/a")
        d.write(fd, b"-pending-bytes")
        return d.crash().read("/a/f")

    seen = outcomes(run)
    full = b"durable-pending-bytes"
    assert all(s is not None and full.startswith(s) and s.startswith(b"durable") for s in seen)
    assert b"durable" in seen and full in seen
    assert any(s is not None and 7 < len(s) < len(full) for s in seen)  # torn mid-write


def test_a_new_name_is_durable_only_after_a_directory_sync() -> None:
    def run(seed: int, sync_dir: bool) -> bool:
        d = SimDisk(seed)
        fd = d.create("/a/f")
        d.write(fd, b"x")
        d.fsync(fd)
        if sync_dir:
            d.fsync_dir("/a")
        return d.crash().read("/a/f") == b"x"

    assert outcomes(lambda s: run(s, False)) == {True, False}
    assert outcomes(lambda s: run(s, True)) == {True}


def test_an_unsynced_rename_or_unlink_may_or_may_not_have_happened() -> None:
    def run(seed: int, sync_dir: bool) -> tuple[bytes | None, bytes | None]:
        d = SimDisk(seed)
        for name, data in (("old", b"1"), ("new", b"2")):
            fd = d.create(f"/a/{name}")
            d.write(fd, data)
            d.fsync(fd)
            d.close(fd)
        d.fsync_dir("/a")
        d.rename("/a/new", "/a/old")
        if sync_dir:
            d.fsync_dir("/a")
        after = d.crash()
        return after.read("/a/old"), after.read("/a/new")

    assert outcomes(lambda s: run(s, False)) == {(b"1", b"2"), (b"2", None)}
    assert outcomes(lambda s: run(s, True)) == {(b"2", None)}

    def unlink(seed: int) -> bool:
        d = SimDisk(seed)
        d.close(d.create("/a/f"))
        d.fsync_dir("/a")
        d.remove("/a/f")
        assert d.read("/a/f") is None and d.listdir("/a") == []
        return d.crash().read("/a/f") is not None

    assert outcomes(unlink) == {True, False}


def test_an_unsynced_truncation_may_be_lost() -> None:
    def run(seed: int) -> bytes | None:
        d = SimDisk(seed)
        fd = d.create("/f")
        d.write(fd, b"abcdef")
        d.fsync(fd)
        d.fsync_dir("/")
        d.truncate(fd, 2)
        assert d.read("/f") == b"ab" and d.size(fd) == 2
        return d.crash().read("/f")

    assert outcomes(run) == {b"abcdef", b"ab"}


def test_a_full_disk_fails_every_write_maybe_after_a_prefix() -> None:
    def run(seed: int) -> bytes | None:
        d = SimDisk(seed)
        fd = d.create("/f")
        d.full = True
        with pytest.raises(OSError) as err:
            d.write(fd, b"0123456789")
        assert err.value.errno == errno.ENOSPC
        return d.read("/f")

    seen = outcomes(run)
    assert b"" in seen and len(seen) > 2
    assert all(s is not None and b"0123456789".startswith(s) for s in seen)


def test_an_unsynced_positional_write_survives_as_a_prefix_of_it() -> None:
    """pwrite over synced zeros (a preallocated log): after a crash, the old bytes with a
    prefix of the new ones written over them; the file never shrinks."""

    def run(seed: int) -> bytes | None:
        d = SimDisk(seed)
        fd = d.open_write("/a/f")
        d.pwrite(fd, bytes(8), 0)
        d.fsync(fd)
        d.fsync_dir("/a")
        d.pwrite(fd, b"abcd", 2)
        assert d.read("/a/f") == b"\0\0abcd\0\0" and d.size(fd) == 8
        return d.crash().read("/a/f")

    seen = outcomes(run)
    assert b"\0" * 8 in seen and b"\0\0abcd\0\0" in seen
    assert any(s not in (b"\0" * 8, b"\0\0abcd\0\0") for s in seen)  # torn
    for s in seen:
        assert s is not None and len(s) == 8
        k = len(s[2:6].rstrip(b"\0"))
        assert s[2 : 2 + k] == b"abcd"[:k] and s[:2] == s[6:] == b"\0\0"


def test_a_positional_write_past_the_end_extends_the_file_with_zeros() -> None:
    d = SimDisk(2)
    fd = d.open_write("/f")
    d.pwrite(fd, b"xy", 3)
    assert d.read("/f") == b"\0\0\0xy"
    d.pwrite(fd, b"Z", 0)
    assert d.read("/f") == b"Z\0\0xy"
    with pytest.raises(OSError) as err:
        d.pwrite(fd, b"a", -1)
    assert err.value.errno == errno.EINVAL


def test_a_full_disk_fails_only_positional_writes_that_extend_the_file() -> None:
    def run(seed: int) -> bytes | None:
        d = SimDisk(seed)
        fd = d.open_write("/f")
        d.pwrite(fd, bytes(4), 0)
        d.full = True
        d.pwrite(fd, b"ab", 1)  # overwrites allocated bytes: no space needed
        with pytest.raises(OSError) as err:
            d.pwrite(fd, b"0123", 2)
        assert err.value.errno == errno.ENOSPC
        return d.read("/f")

    seen = outcomes(run)
    assert b"\0ab\0" in seen and len(seen) > 2  # (a prefix, possibly none, was written)
    assert seen <= {b"\0ab\0", b"\0a0\0", b"\0a01", b"\0a012", b"\0a0123"}
    d = SimDisk(1)
    fd = d.open_write("/g")
    d.pwrite(fd, bytes(4), 0)
    d.fail_next("write", errno.ENOSPC)  # (a copy-on-write file system)
    with pytest.raises(OSError):
        d.pwrite(fd, b"ab", 0)


def test_fail_next_hits_the_chosen_occurrence_of_an_op_once() -> None:
    d = SimDisk(1)
    fd = d.create("/f")
    d.fail_next("fsync", errno.EIO, after=1)
    d.fsync(fd)
    with pytest.raises(OSError) as err:
        d.fdatasync(fd)  # "fsync" covers fdatasync
    assert err.value.errno == errno.EIO
    d.fsync(fd)
    d.fail_next("rename", errno.EXDEV)
    with pytest.raises(OSError):
        d.rename("/f", "/g")
    d.rename("/f", "/g")
    assert d.listdir("/") == ["g"]
    with pytest.raises(ValueError):
        d.fail_next("replace")


def test_after_a_failed_fsync_the_data_never_becomes_durable() -> None:
    """fsyncgate: the kernel dropped the dirty pages; a later fsync reports success."""

    def run(seed: int) -> bytes | None:
        d = SimDisk(seed)
        fd = d.create("/f")
        d.fsync_dir("/")
        d.write(fd, b"abc")
        d.fail_next("fsync")
        with pytest.raises(OSError):
            d.fsync(fd)
        d.fsync(fd)  # "succeeds"
        assert d.read("/f") == b"abc"  # the page cache still has it
        return d.crash().read("/f")

    assert b"" in outcomes(run)


def test_crash_after_counts_mutations_and_kills_the_disk() -> None:
    d = SimDisk(3)
    fd = d.create("/f")
    d.write(fd, b"a")
    assert d.mutations == 2
    d.read("/f")
    d.size(fd)
    assert d.mutations == 2  # reads do not count
    d.crash_after(1)
    d.fsync(fd)
    with pytest.raises(SimCrash):
        d.write(fd, b"b")
    assert d.mutations == 4
    with pytest.raises(SimCrash):
        d.read("/f")  # dead
    d.close(fd)  # harmless
    try:
        d.fsync(fd)
    except Exception:  # pragma: no cover - must not catch it
        pytest.fail("SimCrash is caught by `except Exception`")
    except SimCrash:
        pass
    assert d.crash().listdir("/") == []  # the name was never made durable


def test_disarm_cancels_a_crash_point_and_pending_faults() -> None:
    d = SimDisk(4)
    fd = d.create("/f")
    d.crash_after(0)
    d.fail_next("write", errno.ENOSPC)
    d.disarm(faults=False)
    with pytest.raises(OSError):
        d.write(fd, b"a")
    d.fail_next("fsync")
    d.disarm()
    d.fsync(fd)


def test_a_crash_can_strike_halfway_through_a_write() -> None:
    def run(seed: int) -> bytes:
        d = SimDisk(seed)
        fd = d.create("/f")
        d.crash_after(0)
        with pytest.raises(SimCrash):
            d.write(fd, b"0123456789")
        return bytes(d.files("/")["f"])

    seen = outcomes(run)
    assert b"" in seen and any(0 < len(s) < 10 for s in seen)


def test_the_simulation_is_deterministic_given_the_seed() -> None:
    def run(seed: int) -> tuple[tuple[str, bytes], ...]:
        d = SimDisk(seed)
        d.full = False
        for i in range(5):
            fd = d.create(f"/d/f{i}")
            d.write(fd, bytes(range(i * 7)))
            if i % 2:
                d.fsync(fd)
            d.write(fd, b"tail")
        d.fsync_dir("/d")
        d.rename("/d/f1", "/d/f0")
        return tuple(sorted(d.crash().files("/d").items()))

    assert [run(7) for _ in range(3)] == [run(7)] * 3
    assert len({run(s) for s in range(20)}) > 1


def test_os_disk_roundtrip(tmp_path: Path) -> None:
    disk: Disk = OsDisk()
    disk.makedirs(tmp_path / "x")
    assert disk.listdir(tmp_path / "missing") == [] and disk.read(tmp_path / "nope") is None
    fd = disk.create(tmp_path / "x" / "f")
    disk.write(fd, b"hello world")
    disk.fdatasync(fd)
    disk.truncate(fd, 5)
    disk.write(fd, b"!")  # appends at the (new) end
    disk.fsync(fd)
    assert disk.size(fd) == 6
    disk.close(fd)
    fd = disk.open_append(tmp_path / "x" / "f")
    disk.write(fd, b"?")
    disk.close(fd)
    disk.rename(tmp_path / "x" / "f", tmp_path / "x" / "g")
    disk.fsync_dir(tmp_path / "x")
    assert disk.listdir(tmp_path / "x") == ["g"] and disk.read(tmp_path / "x" / "g") == b"hello!?"
    disk.remove(tmp_path / "x" / "g")
    with pytest.raises(FileNotFoundError):
        disk.remove(tmp_path / "x" / "g")
    fd = disk.open_write(tmp_path / "x" / "p")
    disk.pwrite(fd, b"0123456789", 0)
    disk.pwrite(fd, b"ab", 3)  # in place, not appended
    disk.pwrite(fd, b"!", 12)
    disk.fdatasync(fd)
    assert disk.size(fd) == 13
    disk.close(fd)
    assert disk.read(tmp_path / "x" / "p") == b"012ab56789\0\0!"
