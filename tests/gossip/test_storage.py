"""GossipStorage: round trips, restart, dedup table, HLC, epoch, checksums and refusal of
corrupt records, clear start-up errors, compaction, migration from SQLite (issue 13)."""

from __future__ import annotations

import os
import re
import sqlite3
from pathlib import Path

import pytest

from caplab.disk import SimDisk
from gossip.crdt import Applied, Counter, Register, Value, applied_key, encode_value
from gossip.hlc import Timestamp
from gossip.storage import (
    CommitBatch,
    CorruptStorageError,
    DedupEntry,
    GossipStorage,
    Loaded,
    StorageError,
)

T1, T2, T3 = Timestamp(100, 0, "n1"), Timestamp(101, 4, "n1"), Timestamp(-5, 2**31 - 1, "nœud")
BIG = 2**127 - 1  # the largest counter component on disk (crdt.COMPONENT_MAX)
VALUES: dict[str, Value] = {
    "register": Register(T1, b"\x00\xffv" * 100),
    "empty": Register(T3, b""),
    "tombstone": Register(T2, None),
    "counter": Counter({"n1": 5, "n2/0a1b2c3d": 2**64 + 1}, {"n2": 2}),
    "huge counter": Counter({"n1": BIG, "n2": 2**100}, {"n1": BIG - 1}),
    "empty counter": Counter({}, {}),
    "clé ünïcode": Register(T1, "välue".encode()),
    "": Register(T1, b"the empty key"),
    applied_key("client-1", 2**64 - 1): Applied(T2, "n1/0a1b2c3d", "increment", "counter", -7, BIG),
    applied_key("client-2", 1): Applied(T1, "n2", "delete", "register", 0, 1),
    applied_key("client-2", 2): Applied(T2, "n2", "put", "register", 0, 0, b"\x00\xff" * 4),
}


D = "/data/n1"


def load(path: Path | str, disk: SimDisk | None = None) -> Loaded:
    s = GossipStorage(path, disk=disk, prealloc_bytes=4096)
    try:
        return s.load()
    finally:
        s.close()


def reopen(path: Path) -> GossipStorage:
    s = GossipStorage(path)
    s.load()
    return s


def log_file(path: Path) -> Path:
    (name,) = [n for n in os.listdir(path) if n.endswith(".log")]
    return path / name


def records_end(path: Path | str, disk: SimDisk | None = None) -> int:
    s = GossipStorage(path, disk=disk)
    s.load()
    s.close()
    return s.log_bytes


def test_commit_and_reload_every_kind_of_value(tmp_path: Path) -> None:
    s = GossipStorage(tmp_path)
    first = s.load()
    assert first == Loaded({}, [], None, first.epoch, [])
    assert re.fullmatch(r"[0-9a-f]{8}", first.epoch)
    s.commit(
        CommitBatch(
            kv={**VALUES, "gone": Register(T1, b"x")},
            dedup={("cl", 3): DedupEntry("cl", 3, "put", T1, 0)},
            hlc=T1,
        )
    )
    s.commit(
        CommitBatch(
            kv={"register": Register(T2, b"newer"), "gone": None, "never there": None},
            dedup={
                ("c2", 1): DedupEntry("c2", 1, "increment", T2, 2**100, low=0),
                ("c2", 2): DedupEntry("c2", 2, "increment", T2, -(2**90), low=1),
                ("c3", 2**64 - 1): DedupEntry("c3", 2**64 - 1, "delete", T3, 1, low=2**63),
            },
            hlc=T2,
        )
    )
    s.commit(CommitBatch(evict={"cl"}, evict_seqs={("c2", 2)}, hlc=T1))  # (an older HLC)
    assert s.commits == 3
    s.close()
    loaded = load(tmp_path)
    assert loaded.state == {**VALUES, "register": Register(T2, b"newer")}
    assert loaded.dedup == [
        DedupEntry("c2", 1, "increment", T2, 2**100),
        DedupEntry("c3", 2**64 - 1, "delete", T3, 1, low=2**63),
    ]
    assert loaded.hlc == T2  # the high-water mark never goes back
    assert loaded.epoch == first.epoch and loaded.corrupt == []
    assert sorted(os.listdir(tmp_path)) == ["CURRENT", "gossip.1.log"]


def test_each_data_directory_gets_its_own_epoch(tmp_path: Path) -> None:
    epochs = {load(tmp_path / str(i)).epoch for i in range(5)}
    assert len(epochs) == 5
    assert load(tmp_path / "0").epoch in epochs


def test_dedup_is_kept_in_lru_order(tmp_path: Path) -> None:
    s = reopen(tmp_path)
    t = Timestamp(1, 0, "n")
    for c in ("x", "y", "z"):
        s.commit(CommitBatch(dedup={(c, 1): DedupEntry(c, 1, "put", t, 0)}))
    s.commit(CommitBatch(dedup={("x", 2): DedupEntry("x", 2, "put", t, 0, low=1)}))
    s.commit(CommitBatch(dedup={("y", 1): DedupEntry("y", 1, "put", t, 0)}))  # used again
    s.close()
    s2 = reopen(tmp_path)  # the order continues after a restart
    s2.commit(CommitBatch(dedup={("y", 9): DedupEntry("y", 9, "delete", t, 1)}))
    s2.close()
    got = [(e.client_id, e.seq, e.low) for e in load(tmp_path).dedup]
    assert got == [("x", 1, 0), ("z", 1, 0), ("x", 2, 1), ("y", 1, 0), ("y", 9, 0)]


def test_commit_before_load_is_a_programming_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="load"):
        GossipStorage(tmp_path).commit(CommitBatch(kv={"a": Register(T1, b"v")}))


def test_a_batch_that_cannot_be_encoded_leaves_nothing_behind(tmp_path: Path) -> None:
    s = reopen(tmp_path)
    s.commit(CommitBatch(kv={"a": Register(T1, b"v")}))
    bad = CommitBatch(kv={"b": Register(T2, b"w")})
    bad.dedup[("x", 1)] = "not an entry"  # type: ignore[assignment]
    with pytest.raises(AttributeError):
        s.commit(bad)
    with pytest.raises(OverflowError):  # beyond what the format holds: refused up front
        s.commit(CommitBatch(kv={"b": Counter({"n1": BIG + 1}, {})}))
    s.commit(CommitBatch(kv={"c": Register(T3, b"z")}))
    s.close()
    assert set(load(tmp_path).state) == {"a", "c"}


def test_an_empty_batch_writes_nothing(tmp_path: Path) -> None:
    s = reopen(tmp_path)
    s.commit(CommitBatch(hlc=T1))
    end = s.log_bytes
    s.commit(CommitBatch())
    s.commit(CommitBatch(hlc=T1))
    assert s.log_bytes == end
    s.close()
    assert load(tmp_path).hlc == T1


def test_compaction_keeps_the_live_state_and_removes_the_old_generation(tmp_path: Path) -> None:
    s = GossipStorage(tmp_path, compact_min_bytes=20_000, prealloc_bytes=4096)
    epoch = s.load().epoch
    expected: dict[str, Value] = {}
    for i in range(400):
        ts = Timestamp(i, 0, "n1")
        kv: dict[str, Value | None] = {f"k{i % 37}": Register(ts, bytes(200)), f"d{i}": None}
        kv[f"c{i % 5}"] = Counter({"n1": i + 1}, {})
        expected.update({k: v for k, v in kv.items() if v is not None})
        dedup = {("cl", i): DedupEntry("cl", i, "put", ts, 0, max(0, i - 3))}
        evict = {("cl", i - 4)} if i >= 4 else set()
        s.commit(CommitBatch(kv=kv, dedup=dedup, evict_seqs=evict, hlc=ts))
    assert s.generation > 3 and s.compactions == s.generation  # (the creation: 1)
    assert s.log_bytes < 3 * 20_000
    s.close()
    assert sorted(os.listdir(tmp_path)) == ["CURRENT", f"gossip.{s.generation}.log"]
    loaded = load(tmp_path)
    assert loaded.state == expected and loaded.epoch == epoch and loaded.corrupt == []
    assert [e.seq for e in loaded.dedup] == [396, 397, 398, 399]
    assert loaded.hlc == Timestamp(399, 0, "n1")


def test_leftovers_of_other_generations_are_removed(tmp_path: Path) -> None:
    s = reopen(tmp_path)
    s.commit(CommitBatch(kv={"a": Register(T1, b"v")}))
    s.close()
    for name in ("gossip.7.log", "gossip.0.log", "CURRENT.tmp", "gossip.db", "gossip.db-wal"):
        (tmp_path / name).write_bytes(b"junk")
    (tmp_path / "notes.txt").write_text("not ours")
    assert load(tmp_path).state == {"a": Register(T1, b"v")}
    assert sorted(os.listdir(tmp_path)) == ["CURRENT", "gossip.1.log", "notes.txt"]


# -- torn tails and corruption ---------------------------------------------------------
def three_commits(path: Path | str, disk: SimDisk | None = None) -> tuple[str, dict[str, Value]]:
    """A store with three commits: "a" written twice (b"first-a", then b"second-a")."""
    s = GossipStorage(path, disk=disk)
    epoch = s.load().epoch
    s.commit(CommitBatch(kv={"a": Register(T1, b"first-a"), "b": Register(T1, b"bbbb")}))
    s.commit(
        CommitBatch(
            kv={"a": Register(T2, b"second-a"), "c": Register(T2, b"cccc")},
            dedup={("cl", 1): DedupEntry("cl", 1, "put", T2, 0)},
            hlc=T2,
        )
    )
    s.commit(CommitBatch(kv={"d": Counter({"n1": 3}, {})}, hlc=T3))
    s.close()
    state: dict[str, Value] = {
        "a": Register(T2, b"second-a"),
        "b": Register(T1, b"bbbb"),
        "c": Register(T2, b"cccc"),
        "d": Counter({"n1": 3}, {}),
    }
    return epoch, state


def flip_at(path: Path, needle: bytes, delta: int = 0) -> None:
    raw = bytearray(path.read_bytes())
    at = raw.index(needle) + delta
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))


def test_a_flipped_byte_in_a_value_is_refused_reported_and_the_epoch_replaced(
    tmp_path: Path,
) -> None:
    """Issue 13: SQLite carried no checksums, and one flipped byte in a stored value was
    loaded and gossiped to every replica."""
    epoch, state = three_commits(tmp_path)
    flip_at(log_file(tmp_path), b"second-a", 3)
    loaded = load(tmp_path)
    assert loaded.state == {**state, "a": Register(T1, b"first-a")}  # its earlier value
    assert loaded.dedup == [DedupEntry("cl", 1, "put", T2, 0)]  # the same record's others
    assert len(loaded.corrupt) == 1 and "key 'a'" in loaded.corrupt[0]
    assert "gossip.1.log" in loaded.corrupt[0] and "checksum" in loaded.corrupt[0]
    assert loaded.epoch != epoch and re.fullmatch(r"[0-9a-f]{8}", loaded.epoch)
    again = load(tmp_path)  # durably: the new epoch, without the refused record
    assert again.corrupt == [] and again.epoch == loaded.epoch
    assert again.state == loaded.state and again.dedup == loaded.dedup
    assert sorted(os.listdir(tmp_path)) == ["CURRENT", "gossip.2.log"]


def test_a_damaged_record_header_refuses_that_record_only(tmp_path: Path) -> None:
    epoch, state = three_commits(tmp_path)
    # the second commit's header: its length field (just before its first entry)
    raw = log_file(tmp_path).read_bytes()
    second = raw.index(b"second-a")
    header = raw.rindex(b"\xe2GLr", 0, second)
    flip_at(log_file(tmp_path), raw[header : header + 8], 5)
    loaded = load(tmp_path)
    assert loaded.state == {"a": Register(T1, b"first-a"), "b": state["b"], "d": state["d"]}
    assert loaded.dedup == [] and len(loaded.corrupt) == 1
    assert "not a valid record" in loaded.corrupt[0] and loaded.epoch != epoch
    assert load(tmp_path).corrupt == []


def test_a_torn_last_commit_is_dropped_silently(tmp_path: Path) -> None:
    """A commit that never returned: its record incomplete (or failing its checksum) at
    the end of the log; dropped and zeroed, without a report or a new epoch."""
    epoch, state = three_commits(tmp_path)
    path = log_file(tmp_path)
    end = records_end(tmp_path)
    raw = path.read_bytes()
    for torn in (raw[:end] + b"\xe2GLr\x00\x00", raw[:end] + raw[end - 30 : end - 10]):
        path.write_bytes(torn + bytes(len(raw) - len(torn)))
        loaded = load(tmp_path)
        assert loaded.state == state and loaded.corrupt == [] and loaded.epoch == epoch
        assert path.read_bytes() == raw  # zeroed again
    flipped = bytearray(raw)
    flipped[end - 10] ^= 0x04  # in the last commit
    path.write_bytes(bytes(flipped))
    loaded = load(tmp_path)
    assert loaded.state == {k: v for k, v in state.items() if k != "d"}
    assert loaded.corrupt == [] and loaded.epoch == epoch and loaded.hlc == T2


def sim_disk(files: dict[str, bytes], seed: int = 0) -> SimDisk:
    """A simulated disk holding ``files`` (durably) in D."""
    disk = SimDisk(seed)
    for name, content in files.items():
        fd = disk.create(f"{D}/{name}")
        disk.write(fd, content)
        disk.fsync(fd)
        disk.close(fd)
    disk.fsync_dir(D)
    return disk


def test_no_flipped_bit_anywhere_ever_loads_a_value_that_was_not_committed() -> None:
    """Flip each of two bits of every byte of the records in turn: load refuses what it
    must (and replaces the epoch), or drops the last commit as torn; whatever it loads
    was committed for that key; a second load agrees, with nothing to refuse."""
    disk = SimDisk(0)
    epoch, state = three_commits(D, disk)
    committed = {(k, encode_value(v)) for k, v in state.items()}
    committed.add(("a", encode_value(Register(T1, b"first-a"))))
    files = disk.files(D)
    end = records_end(D, disk)
    outcomes = set()
    for at in range(end):
        for bit in (0x01, 0x80):
            raw = bytearray(files["gossip.1.log"])
            raw[at] ^= bit
            flipped = sim_disk({**files, "gossip.1.log": bytes(raw)}, seed=at)
            loaded = load(D, flipped)  # (a log of several records: never all unreadable)
            where = f"bit {bit:#x} of byte {at}"
            assert {(k, encode_value(v)) for k, v in loaded.state.items()} <= committed, where
            assert (loaded.epoch != epoch) == bool(loaded.corrupt), where
            outcomes.add("refused records" if loaded.corrupt else "dropped the last commit")
            again = load(D, flipped)
            assert again.corrupt == [] and again.epoch == loaded.epoch, where
            assert again.state == loaded.state, where
    assert outcomes == {"refused records", "dropped the last commit"}


@pytest.mark.parametrize(
    ("damage", "file", "what"),
    [
        (lambda p: (p / "CURRENT").write_bytes(b"CAPGS"), "CURRENT", "the manifest is 5 bytes"),
        (lambda p: (p / "CURRENT").write_bytes(b"x" * 20), "CURRENT", "fails its checksum"),
        (lambda p: os.remove(log_file(p)), "CURRENT", "gossip.1.log is missing"),
        (lambda p: log_file(p).write_bytes(os.urandom(3000)), "gossip.1.log", "not a gossip log"),
        (lambda p: log_file(p).write_bytes(b""), "gossip.1.log", "empty"),
        (lambda p: log_file(p).write_bytes(bytes(4096)), "gossip.1.log", "empty"),
        (lambda p: os.remove(p / "CURRENT"), "CURRENT", "missing, while gossip.1.log holds"),
    ],
    ids=[
        "CURRENT truncated",
        "CURRENT garbage",
        "no log",
        "garbage log",
        "empty log",
        "zeroed log",
        "no CURRENT",
    ],
)
def test_an_unreadable_store_fails_start_up_with_one_line_naming_the_file(
    tmp_path: Path, damage: object, file: str, what: str
) -> None:
    """Issue 13: a truncated or garbage database failed start-up with a raw traceback
    that did not name the file."""
    three_commits(tmp_path)
    assert callable(damage)
    damage(tmp_path)
    with pytest.raises(CorruptStorageError) as err:
        load(tmp_path)
    msg = str(err.value)
    assert isinstance(err.value, StorageError) and "\n" not in msg
    assert msg.startswith(f"{tmp_path / file}: ") and what in msg
    assert "refusing to start" in msg and f"move the data directory {tmp_path} aside" in msg


def test_an_entry_of_an_unknown_format_stops_start_up_instead_of_being_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its checksum holds, so it is not damage (another version's value type, say):
    refusing it would delete it for good."""
    s = reopen(tmp_path)
    s.commit(CommitBatch(kv={"a": Register(T1, b"v")}))
    monkeypatch.setattr("gossip.storage.encode_value", lambda v: b"Z" + encode_value(v)[1:])
    s.commit(CommitBatch(kv={"b": Register(T2, b"w")}))
    s.close()
    before = log_file(tmp_path).read_bytes()
    with pytest.raises(CorruptStorageError) as err:
        load(tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"{log_file(tmp_path)}: the entry at byte ") and "\n" not in msg
    assert "another version" in msg
    assert sorted(os.listdir(tmp_path)) == ["CURRENT", "gossip.1.log"]
    assert log_file(tmp_path).read_bytes() == before  # left as it was


def test_an_unfinished_creation_is_started_again(tmp_path: Path) -> None:
    """A crash before CURRENT was switched in leaves a log with only its base: blank."""
    first = GossipStorage(tmp_path)
    first.load()
    first.close()
    os.remove(tmp_path / "CURRENT")
    loaded = load(tmp_path)
    assert loaded.state == {} and loaded.corrupt == [] and loaded.epoch != first.epoch
    assert sorted(os.listdir(tmp_path)) == ["CURRENT", "gossip.1.log"]


# -- migration from the SQLite format --------------------------------------------------
OLD_SCHEMA = """
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


def old_database(path: Path, kv: dict[str, bytes], *, close: bool = True) -> sqlite3.Connection:
    """A gossip.db as the SQLite version wrote it (WAL mode)."""
    path.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path / "gossip.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(OLD_SCHEMA)
    db.executemany("INSERT INTO kv VALUES (?, ?)", list(kv.items()))
    db.executemany(
        "INSERT INTO dedup VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            ("cl", 2, "put", 100, 0, "n1", 0, 1, 7),
            ("cl", 1, "increment", 99, 3, "n1", -(2**62), 0, 3),
            ("c2", 5, "delete", 101, 4, "n1", 1, 0, 9),
        ],
    )
    db.execute("INSERT INTO meta VALUES ('hlc', 101, 4, 'n1')")
    if close:
        db.close()
    return db


def test_migration_from_the_sqlite_database(tmp_path: Path) -> None:
    """The old version stopped (killed) with its last transactions still in the WAL."""
    values = dict(VALUES)
    db = old_database(
        tmp_path / "old", {k: encode_value(v) for k, v in values.items()}, close=False
    )
    node = tmp_path / "node"
    node.mkdir()
    for name in ("gossip.db", "gossip.db-wal"):
        (node / name).write_bytes((tmp_path / "old" / name).read_bytes())
    db.close()
    tmp_path = node
    loaded = load(tmp_path)
    expected_dedup = [
        DedupEntry("cl", 1, "increment", Timestamp(99, 3, "n1"), -(2**62)),
        DedupEntry("cl", 2, "put", Timestamp(100, 0, "n1"), 0, 1),
        DedupEntry("c2", 5, "delete", Timestamp(101, 4, "n1"), 1),
    ]
    assert loaded == Loaded(values, expected_dedup, Timestamp(101, 4, "n1"), "", [])
    assert sorted(os.listdir(tmp_path)) == ["CURRENT", "gossip.1.log"]
    assert load(tmp_path) == loaded  # the empty epoch is kept
    s = reopen(tmp_path)
    s.commit(CommitBatch(kv={"new": Register(T3, b"n")}))
    s.close()
    assert load(tmp_path).state == {**values, "new": Register(T3, b"n")}


def test_migration_refuses_an_undecodable_value_and_replaces_the_epoch(tmp_path: Path) -> None:
    old_database(tmp_path, {"good": encode_value(VALUES["register"]), "bad": b"Rgarbage"})
    loaded = load(tmp_path)
    assert loaded.state == {"good": VALUES["register"]}
    assert len(loaded.corrupt) == 1 and "key 'bad'" in loaded.corrupt[0]
    assert re.fullmatch(r"[0-9a-f]{8}", loaded.epoch)
    again = load(tmp_path)
    assert again.corrupt == [] and again.epoch == loaded.epoch


def test_an_empty_old_database_migrates_to_an_empty_store(tmp_path: Path) -> None:
    (tmp_path / "gossip.db").write_bytes(b"")
    loaded = load(tmp_path)
    assert loaded.state == {} and loaded.epoch == "" and loaded.corrupt == []


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other schema"])
def test_an_unreadable_old_database_fails_start_up_with_one_line(
    tmp_path: Path, damage: str
) -> None:
    db_path = tmp_path / "gossip.db"
    if damage == "other schema":
        db = sqlite3.connect(db_path)
        db.execute("CREATE TABLE t (x)")
        db.close()
    else:
        big = {f"key{i}": encode_value(Register(T1, bytes(300))) for i in range(200)}
        old_database(tmp_path, big)
        raw = db_path.read_bytes()
        db_path.write_bytes(os.urandom(len(raw)) if damage == "garbage" else raw[: len(raw) // 2])
    with pytest.raises(CorruptStorageError) as err:
        load(tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"{db_path}: the old version's database ") and "\n" not in msg
    assert "refusing to start" in msg
    assert "gossip.db" in os.listdir(tmp_path)  # left as it was
    assert "CURRENT" not in os.listdir(tmp_path)
