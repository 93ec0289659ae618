"""Property tests: CRDT joins are semilattices, deltas match full mutations, HLC is causal,
Merkle roots/diffs reflect exactly the state differences."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.crdt import (
    Applied,
    Counter,
    DecodeError,
    Register,
    Value,
    WrongTypeError,
    decode_value,
    delete_delta,
    encode_value,
    increment_delta,
    merge_state,
    merge_value,
    payload_digest,
    put_delta,
    same_application,
)
from gossip.hlc import HLC, ClockDriftError, Timestamp
from gossip.merkle import MerkleTree, differing_keys
from gossip.messages import entry_size

NODES = ("a", "b", "c")
KEYS = tuple(f"k{i}" for i in range(8))

timestamps = st.builds(Timestamp, st.integers(0, 6), st.integers(0, 3), st.sampled_from(NODES))
registers = st.builds(Register, timestamps, st.one_of(st.none(), st.binary(max_size=3)))
counts = st.dictionaries(st.sampled_from(NODES), st.integers(1, 50), max_size=3)
counters = st.builds(Counter, counts, counts)
applieds = st.builds(
    Applied,
    timestamps,
    st.sampled_from(NODES),
    st.sampled_from(("put", "delete", "increment")),
    st.sampled_from(KEYS),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from((b"", b"\x01" * 8, b"\x02" * 8)),  # none (old or delete), or a digest
)
values: st.SearchStrategy[Value] = st.one_of(registers, counters)
# every kind, Applied records included (they live under reserved keys only)
all_values: st.SearchStrategy[Value] = st.one_of(registers, counters, applieds)
states = st.dictionaries(st.sampled_from(KEYS), values, max_size=6)

settings.register_profile("caplab", max_examples=150, deadline=None)
settings.load_profile("caplab")


@given(all_values, all_values)
def test_merge_value_commutative(a: Value, b: Value) -> None:
    assert merge_value(a, b) == merge_value(b, a)


@given(all_values, all_values, all_values)
def test_merge_value_associative(a: Value, b: Value, c: Value) -> None:
    assert merge_value(merge_value(a, b), c) == merge_value(a, merge_value(b, c))


@given(all_values)
def test_merge_value_idempotent(a: Value) -> None:
    assert merge_value(a, a) == a


@given(all_values, all_values)
def test_merge_is_upper_bound(a: Value, b: Value) -> None:
    j = merge_value(a, b)
    assert merge_value(j, a) == j and merge_value(j, b) == j


@given(states, states)
def test_merge_state_commutative(a: dict[str, Value], b: dict[str, Value]) -> None:
    assert merge_state(a, b) == merge_state(b, a)


@given(states, states, states)
def test_merge_state_associative(
    a: dict[str, Value], b: dict[str, Value], c: dict[str, Value]
) -> None:
    assert merge_state(merge_state(a, b), c) == merge_state(a, merge_state(b, c))


@given(states)
def test_merge_state_idempotent(a: dict[str, Value]) -> None:
    assert merge_state(a, a) == a


def test_type_conflict_counter_wins() -> None:
    r = Register(Timestamp(99, 0, "z"), b"x")
    c = Counter({"a": 1}, {})
    assert merge_value(r, c) == c and merge_value(c, r) == c


def _fresh_ts(*ss: dict[str, Value]) -> Timestamp:
    walls = [v.ts.wall_ms for s in ss for v in s.values() if isinstance(v, Register)]
    return Timestamp(max(walls, default=0) + 1, 0, "a")


@given(states, states, st.sampled_from(KEYS), st.binary(max_size=3))
def test_put_delta_equals_full_mutation(
    s: dict[str, Value], t: dict[str, Value], key: str, v: bytes
) -> None:
    ts = _fresh_ts(s, t)
    if isinstance(s.get(key), Counter):
        try:
            put_delta(s, key, v, ts)
        except WrongTypeError as e:
            assert e.actual == "counter"
            return
        raise AssertionError("put on a counter must raise")
    full = {**s, key: Register(ts, v)}
    d = put_delta(s, key, v, ts)
    assert list(d) == [key]
    assert merge_state(s, d) == full
    # a replica that already has s (joined with anything else) gets the same from the delta
    assert merge_state(merge_state(t, s), d) == merge_state(t, full)


@given(states, states, st.sampled_from(KEYS))
def test_delete_delta_equals_full_mutation(
    s: dict[str, Value], t: dict[str, Value], key: str
) -> None:
    if isinstance(s.get(key), Counter):
        return
    ts = _fresh_ts(s, t)
    full = {**s, key: Register(ts, None)}
    d = delete_delta(s, key, ts)
    assert merge_state(s, d) == full
    assert merge_state(merge_state(t, s), d) == merge_state(t, full)


@given(states, states, st.sampled_from(KEYS), st.sampled_from(NODES), st.integers(-20, 20))
def test_increment_delta_equals_full_mutation(
    s: dict[str, Value], t: dict[str, Value], key: str, node: str, amount: int
) -> None:
    cur = s.get(key)
    if isinstance(cur, Register):
        try:
            increment_delta(s, key, node, amount)
        except WrongTypeError as e:
            assert e.actual == "register"
            return
        raise AssertionError("increment on a register must raise")
    assert cur is None or isinstance(cur, Counter)
    p = dict(cur.p) if cur else {}
    n = dict(cur.n) if cur else {}
    if amount >= 0:
        p[node] = p.get(node, 0) + amount
    else:
        n[node] = n.get(node, 0) - amount
    full = {**s, key: Counter(p, n)}
    d = increment_delta(s, key, node, amount)
    merged = merge_state(s, d)
    got = merged[key]
    assert isinstance(got, Counter)
    assert got.value == (cur.value if cur else 0) + amount
    assert _norm(merged) == _norm(full)
    t2 = {k: v for k, v in t.items() if not isinstance(v, Register) or k != key}
    assert _norm(merge_state(merge_state(t2, s), d)) == _norm(merge_state(t2, full))


def _norm(s: dict[str, Value]) -> dict[str, object]:
    # zero entries are equivalent to absent ones
    out: dict[str, object] = {}
    for k, v in s.items():
        if isinstance(v, Counter):
            out[k] = (
                {a: x for a, x in v.p.items() if x},
                {a: x for a, x in v.n.items() if x},
            )
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------------------- HLC

events = st.lists(
    st.one_of(
        st.tuples(st.just("now"), st.integers(0, 10_000)),
        st.tuples(
            st.just("recv"),
            st.integers(0, 10_000),
            st.builds(Timestamp, st.integers(0, 20_000), st.integers(0, 5), st.sampled_from(NODES)),
        ),
    ),
    max_size=40,
)


@given(events)
def test_hlc_monotonic_and_causal(evs: list[tuple[object, ...]]) -> None:
    clock = HLC("me", max_drift_ms=100_000)
    last = clock.peek()
    for ev in evs:
        if ev[0] == "now":
            pt = ev[1]
            assert isinstance(pt, int)
            ts = clock.now(pt)
            assert ts.wall_ms >= pt
        else:
            pt, remote = ev[1], ev[2]
            assert isinstance(pt, int) and isinstance(remote, Timestamp)
            ts = clock.update(remote, pt)
            assert ts > remote
            # a send after the receive is causally later, even with a clock far behind
            nxt = clock.now(0)
            assert nxt > remote and nxt > ts
            ts = nxt
        assert ts > last
        last = ts


def test_hlc_drift_bound_and_logical_overflow() -> None:
    clock = HLC("me", max_drift_ms=1000, max_logical=3)
    before = clock.now(100)
    try:
        clock.update(Timestamp(5000, 0, "x"), 100)
    except ClockDriftError:
        pass
    else:
        raise AssertionError("expected ClockDriftError")
    assert clock.peek() == before
    stamps = [clock.now(100) for _ in range(10)]
    assert stamps == sorted(stamps) and len(set(stamps)) == 10
    assert all(s.logical <= 3 for s in stamps)
    assert stamps[-1].wall_ms > 100  # borrowed from the future after the counter filled up


# ---------------------------------------------------------------------------- Merkle


def _tree(s: dict[str, Value], depth: int = 2) -> MerkleTree:
    t = MerkleTree(depth)
    t.update_many(s.items())
    return t


@given(states, states)
def test_merkle_root_equal_iff_states_equal(a: dict[str, Value], b: dict[str, Value]) -> None:
    assert (_tree(a).root() == _tree(b).root()) == (a == b or _norm(a) == _norm(b))


@given(states, states)
def test_merkle_diff_finds_exactly_the_differing_keys(
    a: dict[str, Value], b: dict[str, Value]
) -> None:
    want = {
        k
        for k in set(a) | set(b)
        if (k in a) != (k in b) or (k in a and _norm({k: a[k]}) != _norm({k: b[k]}))
    }
    assert differing_keys(_tree(a), _tree(b)) == want
    assert differing_keys(_tree(a, 1), _tree(b, 1)) == want


@given(st.lists(st.tuples(st.sampled_from(KEYS), st.one_of(st.none(), values)), max_size=30))
def test_merkle_incremental_equals_rebuild(ops: list[tuple[str, Value | None]]) -> None:
    inc = MerkleTree(2)
    final: dict[str, Value] = {}
    for i, (k, v) in enumerate(ops):
        inc.update(k, v)
        if i % 3 == 0:
            inc.root()  # interleave reads with lazy re-hashing
        if v is None:
            final.pop(k, None)
        else:
            final[k] = v
    assert inc.root() == _tree(final).root()
    assert len(inc) == len(final)
    for leaf in range(inc.leaf_count):
        assert inc.leaf_keys(leaf) == frozenset(k for k in final if inc.leaf_of(k) == leaf)


big = st.integers(0, 2**127 - 1)
wide_counters = st.builds(
    Counter,
    st.dictionaries(st.text(max_size=4), big, max_size=3),
    st.dictionaries(st.text(max_size=4), big, max_size=3),
)


@given(st.one_of(all_values, wide_counters))
def test_entry_size_is_the_encodings(v: Value) -> None:
    assert entry_size("k", v) == 4 + 1 + len(encode_value(v))


@given(st.one_of(all_values, wide_counters))
def test_encoding_round_trips(v: Value) -> None:
    assert decode_value(encode_value(v)) == v or (
        isinstance(v, Counter)  # zero totals are not encoded (they join as absent)
        and decode_value(encode_value(v))
        == Counter({k: a for k, a in v.p.items() if a}, {k: a for k, a in v.n.items() if a})
    )


def test_applied_records_without_a_digest_keep_their_older_encoding() -> None:
    """A record without a payload digest (written before digests were kept, or a delete)
    encodes as it did then, so stored records decode (digest empty: payload unknown) and
    Merkle hashes of such records are unchanged; one with a digest appends it."""
    ts = Timestamp(5, 1, "n1")
    old = Applied(ts, "n1", "put", "k", 0, 0)
    legacy = (
        b"A"
        + (5).to_bytes(8, "big")
        + (1).to_bytes(8, "big")
        + b"".join(len(s).to_bytes(4, "big") + s for s in (b"n1", b"n1", b"put", b"k"))
        + bytes(32)
    )
    assert encode_value(old) == legacy and decode_value(legacy) == old and old.digest == b""
    new = Applied(ts, "n1", "put", "k", 0, 0, payload_digest("put", b"v"))
    assert len(new.digest) == 8
    assert encode_value(new) == legacy + (8).to_bytes(4, "big") + new.digest
    assert decode_value(encode_value(new)) == new
    for bad in (legacy + b"\x00", legacy + bytes(4), legacy + (9).to_bytes(4, "big") + bytes(8)):
        with pytest.raises(DecodeError):
            decode_value(bad)
    # a copy that lost its digest (relayed by an older version) is the same application:
    # the join keeps the digest, and it is no duplicate to settle
    assert merge_value(old, new) == merge_value(new, old) == new
    assert same_application(old, new) and same_application(new, old)
    other = dataclasses.replace(new, digest=payload_digest("put", b"w"))
    assert not same_application(new, other)
    assert not same_application(old, dataclasses.replace(old, ts=Timestamp(5, 2, "n1")))


def test_payload_digests_are_stable_and_tell_payloads_apart() -> None:
    assert payload_digest("put", b"first") == payload_digest("put", b"first")
    assert payload_digest("put", b"first") != payload_digest("put", b"second")
    assert payload_digest("increment", delta=1) != payload_digest("increment", delta=100)
    assert payload_digest("increment", delta=1) != payload_digest("increment", delta=-1)
    assert payload_digest("increment", delta=-(2**63)) != payload_digest("put", b"")
    assert payload_digest("delete") == b""  # no payload
    # fixed bytes: every node and version must compute the same (blake2b-64)
    assert payload_digest("put", b"v").hex() == hashlib.blake2b(b"Pv", digest_size=8).hexdigest()
