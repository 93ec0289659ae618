"""GossipStorage: durable round trip, restart, dedup table, HLC high-water, corruption."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest

from gossip.core import GossipConfig, GossipCore
from gossip.crdt import Counter, Register, Value, encode_value
from gossip.hlc import Timestamp
from gossip.storage import CommitBatch, CorruptStateError, DedupEntry, GossipStorage, decode_value


def test_value_encoding_round_trips() -> None:
    values: list[Value] = [
        Register(Timestamp(-5, 0, "n1"), b""),
        Register(Timestamp(1_700_000_000_000, 2**31 - 1, "nœud"), b"\x00\xffv" * 100),
        Register(Timestamp(7, 3, "n2"), None),
        Counter({}, {}),
        Counter({"a": 2**63 - 1, "b": 1}, {"a": 2**63 + 7}),
    ]
    for v in values:
        got = decode_value(encode_value(v))
        assert got == v
        assert encode_value(got) == encode_value(v)
    for bad in (b"", b"X", encode_value(values[1])[:-1], encode_value(values[4]) + b"\x00"):
        with pytest.raises(CorruptStateError):
            decode_value(bad)


def test_commit_and_reload(tmp_path: Path) -> None:
    s = GossipStorage(tmp_path)
    ts1, ts2 = Timestamp(100, 0, "n1"), Timestamp(101, 4, "n1")
    s.commit(
        CommitBatch(
            kv={"a": Register(ts1, b"1"), "c": Counter({"n1": 5}, {"n2": 2}), "gone": None},
            dedup={("cl", 3): DedupEntry("cl", 3, "put", ts1, 0)},
            hlc=ts2,
        )
    )
    s.commit(
        CommitBatch(
            kv={"a": Register(ts2, None), "b": Register(ts2, b"2")},
            dedup={
                ("c2", 1): DedupEntry("c2", 1, "increment", ts2, 3),
                ("c2", 2): DedupEntry("c2", 2, "put", ts2, 0, low=0),
            },
            hlc=ts2,
        )
    )
    s.commit(CommitBatch(kv={"b": None}, evict={"cl"}, evict_seqs={("c2", 2)}))
    assert s.commits == 3
    s.close()
    loaded = GossipStorage(tmp_path).load()
    assert loaded.state == {"a": Register(ts2, None), "c": Counter({"n1": 5}, {"n2": 2})}
    assert loaded.dedup == [DedupEntry("c2", 1, "increment", ts2, 3)]
    assert loaded.hlc == ts2


def test_dedup_is_kept_in_lru_order(tmp_path: Path) -> None:
    s = GossipStorage(tmp_path)
    t = Timestamp(1, 0, "n")
    for c in ("x", "y", "z"):
        s.commit(CommitBatch(dedup={(c, 1): DedupEntry(c, 1, "put", t, 0)}))
    s.commit(CommitBatch(dedup={("x", 2): DedupEntry("x", 2, "put", t, 0, low=1)}))
    s.close()
    s2 = GossipStorage(tmp_path)  # the `used` counter continues after a restart
    s2.commit(CommitBatch(dedup={("y", 9): DedupEntry("y", 9, "delete", t, 1)}))
    s2.close()
    loaded = GossipStorage(tmp_path).load()
    got = [(e.client_id, e.seq, e.low) for e in loaded.dedup]
    assert got == [("x", 1, 0), ("y", 1, 0), ("z", 1, 0), ("x", 2, 1), ("y", 9, 0)]


def test_restart_keeps_hlc_monotonic(tmp_path: Path) -> None:
    """Increments leave no timestamp in the state: the high-water mark covers them."""
    cfg = GossipConfig()
    s = GossipStorage(tmp_path)
    c = GossipCore("n1", ["n1", "n2"], cfg, random.Random(1), now_ms=1000)
    w = None
    for _ in range(5):
        w = c.increment("ctr", 1, 50_000)  # the clock was far ahead before the crash
        s.commit(CommitBatch(kv={"ctr": c.get("ctr")}, hlc=c.hlc_now))
    assert w is not None
    s.close()
    loaded = GossipStorage(tmp_path).load()
    c2 = GossipCore(
        "n1",
        ["n1", "n2"],
        cfg,
        random.Random(2),
        state=loaded.state,
        now_ms=1000,
        hlc_floor=loaded.hlc,
    )
    assert c2.increment("ctr", 1, 1000).ts > w.ts
    got = c2.get("ctr")
    assert isinstance(got, Counter) and got.value == 6


def test_corrupt_value_is_refused(tmp_path: Path) -> None:
    s = GossipStorage(tmp_path)
    s.commit(CommitBatch(kv={"a": Register(Timestamp(1, 0, "n"), b"v")}))
    s.close()
    db = sqlite3.connect(tmp_path / "gossip.db")
    db.execute("UPDATE kv SET value = ? WHERE key = 'a'", (b"Rgarbage",))
    db.commit()
    db.close()
    with pytest.raises(CorruptStateError):
        GossipStorage(tmp_path).load()


def test_uncommitted_batch_is_rolled_back(tmp_path: Path) -> None:
    s = GossipStorage(tmp_path)
    s.commit(CommitBatch(kv={"a": Register(Timestamp(1, 0, "n"), b"v")}))
    bad = CommitBatch(kv={"b": Register(Timestamp(2, 0, "n"), b"w")})
    bad.dedup[("x", 1)] = "not an entry"  # type: ignore[assignment]
    with pytest.raises(AttributeError):
        s.commit(bad)
    s.commit(CommitBatch(kv={"c": Register(Timestamp(3, 0, "n"), b"z")}))
    s.close()
    assert set(GossipStorage(tmp_path).load().state) == {"a", "c"}
