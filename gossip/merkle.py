"""Merkle tree over the key space, for anti-entropy.

Theory of operation
-------------------
Keys are spread over ``16**depth`` leaf buckets by a stable hash of the key (BLAKE2b, not
Python's salted ``hash``). A leaf's hash is the XOR of the 128-bit item hashes
``H(key, encode_value(value))`` of the keys in it, so a write updates its leaf in O(1)
without sorting. An internal node at ``(level, index)`` hashes the concatenation of its 16
children ``(level + 1, 16 * index + j)``; level 0 is the root, level ``depth`` the leaves.

Writes are hashed lazily too: ``update`` only notes the key's latest value (``_pending``);
the pending items are hashed into their leaves on the next read of the tree (any hash, a
leaf's keys, an item, the size; or once ``PENDING_MAX`` keys are pending), so a key
written many times between two reads (under a steady load, between two anti-entropy
rounds) is hashed once, and one added and removed in between (an Applied record
collected before the next round) never. Hashed items mark
their leaf dirty; dirty paths are re-hashed on the next read of an internal hash, so a
write costs O(1) now plus O(depth) = O(log n) hashing later, and a bulk load re-hashes
each internal node once.

Protocol use: two replicas compare roots; where a node differs they compare its 16
children, down to the leaves, and then exchange the items of differing leaves. Identical
replicas exchange one hash; ``d`` differing keys cost at most ``d * 16 * depth`` hashes
plus the items of ``d`` leaves: O(d log n).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

from gossip.crdt import Value, encode_value

FANOUT = 16
HASH_BYTES = 16
DEFAULT_DEPTH = 4  # 65,536 leaves: ~1.5 keys per leaf at 100k keys
# Pending items hashed at once beyond this many, however long until the next read (the
# memory they take stays bounded when nothing reads the tree for a while).
PENDING_MAX = 1 << 16


def _h(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=HASH_BYTES).digest()


def item_hash(key: str, value: Value) -> int:
    """128-bit hash of one (key, value) entry."""
    kb = key.encode()
    data = len(kb).to_bytes(4, "big") + kb + encode_value(value)
    return int.from_bytes(_h(data), "big")


class MerkleTree:
    """Incrementally maintained hash tree over a key -> value map."""

    __slots__ = ("_dirty", "_items", "_leaf_keys", "_leaves", "_levels", "_pending", "depth")

    def __init__(self, depth: int = DEFAULT_DEPTH) -> None:
        if not 1 <= depth <= 6:
            raise ValueError("depth must be in 1..6")
        self.depth = depth
        self._items: dict[str, int] = {}  # key -> item hash
        self._leaves: list[int] = [0] * (FANOUT**depth)  # XOR of item hashes
        self._leaf_keys: dict[int, set[str]] = {}
        # _levels[l][i]: hash of internal node (l, i) for l < depth (stale if dirty)
        self._levels: list[list[bytes]] = []
        empty = bytes(HASH_BYTES)
        for level in range(depth - 1, -1, -1):
            empty = _h(empty * FANOUT)
            self._levels.insert(0, [empty] * (FANOUT**level))
        self._dirty: set[int] = set()  # leaf indices whose ancestors need re-hashing
        # key -> its latest value (None: removed), not hashed yet (see the module doc)
        self._pending: dict[str, Value | None] = {}

    @property
    def leaf_count(self) -> int:
        """Number of leaf buckets (``16**depth``)."""
        return len(self._leaves)

    def leaf_of(self, key: str) -> int:
        """Leaf bucket index of ``key`` (stable across processes)."""
        digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.leaf_count

    def update(self, key: str, value: Value | None) -> None:
        """Set (or remove, if ``value is None``) the entry for ``key``. O(1) now; hashed on
        the next read of the tree (only the latest value of a key)."""
        self._pending[key] = value
        if len(self._pending) > PENDING_MAX:
            self._hash_pending()

    def update_many(self, items: Iterable[tuple[str, Value | None]]) -> None:
        """``update`` for each pair."""
        self._pending.update(items)
        if len(self._pending) > PENDING_MAX:
            self._hash_pending()

    def _hash_pending(self) -> None:
        """Hash the pending items into their leaves (before any read of the tree)."""
        pending = self._pending
        if not pending:
            return
        self._pending = {}
        blake = hashlib.blake2b
        enc = encode_value
        items_ = self._items
        leaves = self._leaves
        leaf_keys = self._leaf_keys
        dirty = self._dirty
        n = len(leaves)
        for key, value in pending.items():
            kb = key.encode()
            old = items_.pop(key, None)
            if value is None and old is None:
                continue  # (absent before and after: nothing changes)
            leaf = int.from_bytes(blake(kb, digest_size=8).digest(), "big") % n
            acc = leaves[leaf]
            if old is not None:
                acc ^= old
            if value is None:
                keys = leaf_keys.get(leaf)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del leaf_keys[leaf]
            else:
                data = len(kb).to_bytes(4, "big") + kb + enc(value)
                new = int.from_bytes(blake(data, digest_size=HASH_BYTES).digest(), "big")
                items_[key] = new
                acc ^= new
                keys = leaf_keys.get(leaf)
                if keys is None:
                    leaf_keys[leaf] = {key}
                else:
                    keys.add(key)
            leaves[leaf] = acc
            dirty.add(leaf)

    def _flush(self) -> None:
        self._hash_pending()
        if not self._dirty:
            return
        parents = {leaf // FANOUT for leaf in self._dirty}
        self._dirty.clear()
        level = self.depth - 1
        while level >= 0:
            row = self._levels[level]
            for p in parents:
                start = p * FANOUT
                if level == self.depth - 1:
                    data = b"".join(
                        x.to_bytes(HASH_BYTES, "big") for x in self._leaves[start : start + FANOUT]
                    )
                else:
                    data = b"".join(self._levels[level + 1][start : start + FANOUT])
                row[p] = _h(data)
            parents = {p // FANOUT for p in parents}
            level -= 1

    def root(self) -> bytes:
        """Root hash: equal on two trees iff (with overwhelming probability) equal contents."""
        return self.node_hash(0, 0)

    def node_hash(self, level: int, index: int) -> bytes:
        """Hash of node ``(level, index)``; ``level == depth`` addresses a leaf."""
        if level == self.depth:
            self._hash_pending()
            return self._leaves[index].to_bytes(HASH_BYTES, "big")
        self._flush()
        return self._levels[level][index]

    def children(self, level: int, index: int) -> range:
        """Indices at ``level + 1`` of the children of ``(level, index)``."""
        return range(index * FANOUT, index * FANOUT + FANOUT)

    def children_hashes(self, level: int, index: int) -> list[tuple[int, bytes]]:
        """``(child index, child hash)`` for the children of ``(level, index)``."""
        return [(c, self.node_hash(level + 1, c)) for c in self.children(level, index)]

    def leaf_keys(self, index: int) -> frozenset[str]:
        """Keys stored in leaf bucket ``index``."""
        self._hash_pending()
        return frozenset(self._leaf_keys.get(index, ()))

    def cover_code(self, level: int, index: int) -> int:
        """Code of node ``(level, index)`` in an ``AeItems.leaves`` cover: a leaf is its own
        index; the subtree of an internal node is ``leaf_count + (16**level - 1) // 15 +
        index`` (internal nodes numbered level by level after the leaves)."""
        if level == self.depth:
            return index
        first: int = (FANOUT**level - 1) // (FANOUT - 1)  # internal nodes above ``level``
        return self.leaf_count + first + index

    def cover_leaves(self, codes: Iterable[int]) -> list[int]:
        """The leaves covered by ``cover_code`` codes (invalid codes are ignored)."""
        out: list[int] = []
        n = self.leaf_count
        for c in codes:
            if 0 <= c < n:
                out.append(c)
                continue
            c -= n
            for level in range(self.depth):
                width = FANOUT**level
                if 0 <= c < width:
                    span = FANOUT ** (self.depth - level)
                    out.extend(range(c * span, (c + 1) * span))
                    break
                c -= width
        return out

    def keys_of_leaves(self, leaves: Iterable[int]) -> Iterator[set[str]]:
        """The (non-empty) key sets of the given leaves, in order; do not mutate them."""
        self._hash_pending()
        get = self._leaf_keys.get
        for leaf in leaves:
            keys = get(leaf)
            if keys:
                yield keys

    def item(self, key: str) -> int | None:
        """Item hash of ``key`` or None if absent."""
        self._hash_pending()
        return self._items.get(key)

    def __len__(self) -> int:
        self._hash_pending()
        return len(self._items)


def differing_leaves(a: MerkleTree, b: MerkleTree) -> list[int]:
    """Leaves whose hashes differ, found by top-down descent (what the protocol does)."""
    if a.depth != b.depth:
        raise ValueError("trees of different depth")
    frontier = [0] if a.root() != b.root() else []
    for level in range(a.depth):
        nxt: list[int] = []
        for i in frontier:
            for c in a.children(level, i):
                if a.node_hash(level + 1, c) != b.node_hash(level + 1, c):
                    nxt.append(c)
        frontier = nxt
    return frontier


def differing_keys(a: MerkleTree, b: MerkleTree) -> set[str]:
    """Keys present in one tree only or with different values, via ``differing_leaves``."""
    out: set[str] = set()
    for leaf in differing_leaves(a, b):
        for k in a.leaf_keys(leaf) | b.leaf_keys(leaf):
            if a.item(k) != b.item(k):
                out.add(k)
    return out
