"""Work per write that must not grow with the state: the Merkle tree hashes a key's latest
value once per read of the tree; a collection pass looks neither at every record held
(the stable mark) nor at the whole memory of what was collected; that memory holds no
objects the Python garbage collector scans."""

from __future__ import annotations

import dataclasses
import gc
import random
from typing import Any

import pytest

from gossip.collection import collected_ts, collected_value
from gossip.core import GossipConfig, GossipCore
from gossip.crdt import Applied, Register, Value, applied_key, encode_value, stable_key
from gossip.hlc import Timestamp
from gossip.merkle import MerkleTree

QUIET = GossipConfig(  # no timers fire unless a test sets them
    gossip_interval_ms=10**9,
    anti_entropy_interval_ms=10**9,
    ping_interval_ms=10**9,
    ping_timeout_ms=10**9 - 1,
    gc_interval_ms=10**9,
)


def _core(node: str, members: tuple[str, ...], cfg: GossipConfig) -> GossipCore:
    return GossipCore(node, members, cfg, random.Random(1), now_ms=0)


def test_the_merkle_tree_hashes_the_latest_value_of_a_key_once_per_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every write hashed its key at once: a key written a hundred times between two
    anti-entropy rounds was hashed a hundred times, and a record collected before the
    next round was hashed for nothing."""
    encoded: list[Value] = []
    real = encode_value

    def counting(v: Value) -> bytes:
        encoded.append(v)
        return real(v)

    monkeypatch.setattr("gossip.merkle.encode_value", counting)
    t = MerkleTree(2)
    for i in range(100):
        t.update("k", Register(Timestamp(i + 1, 0, "a"), b"v%d" % i))
    t.update_many([("gone", Register(Timestamp(5, 0, "a"), b"x")), ("gone", None)])
    root = t.root()
    assert encoded == [Register(Timestamp(100, 0, "a"), b"v99")]
    monkeypatch.undo()
    eager = MerkleTree(2)
    eager.update("k", Register(Timestamp(100, 0, "a"), b"v99"))
    assert root == eager.root() and len(t) == 1 and t.item("gone") is None
    # every read sees the writes before it
    t.update("k2", Register(Timestamp(7, 0, "b"), b"w"))
    assert t.leaf_keys(t.leaf_of("k2")) >= {"k2"} and t.root() != root


def test_the_merkle_tree_keeps_a_bounded_number_of_pending_items(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Unread for long (no anti-entropy round), the pending items are hashed all the same
    once there are ``PENDING_MAX`` of them: they never take unbounded memory."""
    monkeypatch.setattr("gossip.merkle.PENDING_MAX", 10)
    t = MerkleTree(2)
    for i in range(10):
        t.update(f"k{i}", Register(Timestamp(1, 0, "a"), b"v"))
    assert t._pending
    t.update_many([("k10", Register(Timestamp(1, 0, "a"), b"v"))])
    assert not t._pending and t._items.keys() == {f"k{i}" for i in range(11)}


class _CountingDict(dict[str, Any]):
    """A dict that counts the entries a caller looks at."""

    looked = 0

    def items(self) -> Any:
        _CountingDict.looked += len(self)
        return super().items()

    def __iter__(self) -> Any:
        _CountingDict.looked += len(self)
        return super().__iter__()

    def get(self, key: str, default: Any = None) -> Any:
        _CountingDict.looked += 1
        return super().get(key, default)


def test_the_stable_mark_looks_only_at_records_it_does_not_cover_yet() -> None:
    """Each collection pass went over every tombstone and record held (tens of thousands
    under load, every second) to move the node's stable mark; records held everywhere
    below the mark can no longer move it."""
    a = _core("a", ("a", "b"), QUIET)
    coll = a._collection
    for seq in range(1, 1001):
        a.put(f"k{seq % 16}", b"v", seq, rid=("client", seq))
    for holders in coll.holders.values():
        holders.add("b")  # b acknowledged every record
    mark = coll.stable_mark(2000)
    latest = a.state()[applied_key("client", 1000)]
    assert isinstance(latest, Applied) and mark == Register(latest.ts, b"")
    a._apply_system(stable_key("a"), mark)
    assert coll.stable_mark(2000) is None  # (the pass that finds them covered)
    # a new record b lacks holds the mark back; once b holds it, the mark moves to it
    a.put("k", b"v", 3000, rid=("client", 1001))
    real = coll.holders
    counting = _CountingDict(real)
    coll.holders = counting
    try:
        _CountingDict.looked = 0
        assert coll.stable_mark(3000) is None
        assert _CountingDict.looked <= 10, "the pass looked at records the mark covers"
    finally:
        coll.holders = real
    rec = applied_key("client", 1001)
    real[rec].add("b")
    newest = a.state()[rec]
    assert isinstance(newest, Applied) and coll.stable_mark(3000) == Register(newest.ts, b"")


def _collect_tombstone(c: GossipCore, key: str, at: int) -> Timestamp:
    w = c.delete(key, at)
    c.tick(at + 1)  # a collection pass (a lone member holds it: collected at once)
    assert c.tombstone_count() == 0 and c.get(key) is None
    return w.ts


def test_the_memory_of_collected_values_holds_no_objects_the_garbage_collector_scans() -> None:
    """Five minutes of collected records (hundreds of thousands under load) were each a
    record, a timestamp and an entry object, all scanned by every full collection of the
    Python heap: stalls of up to ~0.7 s on the nodes under the benchmark's load."""
    cfg = dataclasses.replace(QUIET, gc_interval_ms=1, tombstone_min_age_ms=0)
    c = _core("a", ("a",), cfg)
    ts = _collect_tombstone(c, "k", 10)
    entry = c._collection.collected["k"]
    gc.collect()
    assert not gc.is_tracked(entry)
    assert c.collected_ts("k") == collected_ts(entry) == ts
    assert collected_value(entry) == Register(ts, None)


def test_a_collection_pass_forgets_what_expired_without_scanning_its_whole_memory() -> None:
    """Each pass went over every collected value remembered (five minutes' worth) to find
    the expired ones."""
    cfg = dataclasses.replace(
        QUIET,
        gc_interval_ms=1,
        tombstone_min_age_ms=0,
        collected_memory_ms=1000,
        anti_entropy_interval_ms=10,
    )
    c = _core("a", ("a",), cfg)
    old = _collect_tombstone(c, "old", 10)
    for i in range(200):
        _collect_tombstone(c, f"k{i}", 600 + 2 * i)
    coll = c._collection
    coll.collected = _CountingDict(coll.collected)  # (the core reads it from there)
    _CountingDict.looked = 0
    c.tick(1012)  # "old" (collected at 11) expires at 1011; the others are younger
    assert _CountingDict.looked <= 10, "the pass looked at the whole memory"
    assert c.collected_ts("old") is None and old is not None
    assert all(c.collected_ts(f"k{i}") is not None for i in range(200))
    c.tick(2000)
    assert not coll.collected
