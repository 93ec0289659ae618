"""The gossip peer path validates like the client path (defence in depth).

Every peer message is built here by hand as protobuf, as a buggy or compromised member
could send it, and goes through ``gossip.codec.from_pb`` (refused: ``CodecError``, which
the node counts and drops) and, for behaviour, on into the core the way the node's
``_deliver`` does it. Findings of the review this guards against:

1. a delta stamped 100 years ahead pinned its key (later writes answered OK, lost);
2. a forged counter total beyond 127 bits;
3. keys ``""``, ``"a\\0b"`` and a 5,000-byte key entered the store;
4. a forged SWIM ping declaring n3 dead at incarnation 2**64 - 1 wedged n3 (its
   refutation, 2**64, no longer fits the wire).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable

import pytest

from caplab.gossip.v1 import gossip_pb2 as pb
from caplab.validation import MAX_CLOCK_SKEW_MS, MAX_VALUE_BYTES
from gossip.codec import (
    MAX_COMPONENT_BYTES,
    MAX_LIST,
    MAX_UPDATES,
    CodecError,
    applied_from_pb,
    applied_to_pb,
    entry_from_pb,
    entry_to_pb,
    from_pb,
    to_pb,
)
from gossip.common import GossipConfig
from gossip.core import GossipCore
from gossip.crdt import (
    COMPONENT_MAX,
    MAX_DIGEST_BYTES,
    Applied,
    Counter,
    Register,
    applied_key,
    payload_digest,
    stable_key,
)
from gossip.hlc import Timestamp
from gossip.membership import Membership
from gossip.messages import (
    ALIVE,
    DEAD,
    MAX_INCARNATION,
    SUSPECT,
    Ack,
    AeItems,
    AeRequest,
    Deltas,
    Member,
    Message,
    Ping,
)
from gossip.sim import Sim

T = 1_732_000_000_000  # the wall clock of the receiving node (ms since the epoch)
DAY = 24 * 3600 * 1000
CENTURY = 100 * 365 * DAY
QUIET = GossipConfig(  # no timers fire in the direct tests
    gossip_interval_ms=10**9,
    anti_entropy_interval_ms=10**9,
    ping_interval_ms=10**9,
    ping_timeout_ms=10**9 - 1,
)
STEP = GossipConfig().max_incarnation_step


def _core(
    node: str = "a",
    members: Iterable[str] = ("a", "b", "c"),
    config: GossipConfig = QUIET,
    state: dict[str, Register | Counter | Applied] | None = None,
) -> GossipCore:
    return GossipCore(
        node, list(members), config, random.Random(7), state=state, now_ms=T, wall_ms=T
    )


def _deliver(core: GossipCore, m: pb.GossipMessage, now: int = T) -> bool:
    """What the node's ``_deliver`` does with one message: decode (a ``CodecError`` drops
    it) and step. Returns whether it reached the core."""
    try:
        msg = from_pb(pb.GossipMessage.FromString(m.SerializeToString()))
    except CodecError:
        return False
    core.step(msg, now, wall_ms=now)
    return True


def _pump(cores: dict[str, GossipCore], first: Iterable[Message], now: int) -> None:
    """Deliver messages through the codec (and everything they cause) between ``cores``
    at wall clock ``now``; messages to anyone else are dropped."""
    queue = list(first)
    while queue:
        msg = queue.pop(0)
        dst = cores.get(msg.to)
        if dst is not None:
            dst.step(from_pb(to_pb(msg)), now, wall_ms=now)
            queue += dst.take_outputs().messages


def _anti_entropy(cores: dict[str, GossipCore], frm: str, to: str, now: int) -> None:
    cores[frm].take_outputs()
    cores[frm].start_anti_entropy(now, to)
    _pump(cores, cores[frm].take_outputs().messages, now)


def _ts(wall: int = T, logical: int = 0, node: str = "b") -> pb.Timestamp:
    return pb.Timestamp(wall_ms=wall, logical=logical, node=node)


def _reg(key: str, value: bytes = b"v", ts: pb.Timestamp | None = None) -> pb.Entry:
    return pb.Entry(key=key, register=pb.Register(ts=_ts() if ts is None else ts, value=value))


def _rec(entry_key: str, /, **kw: object) -> pb.Entry:
    fields: dict[str, object] = {
        "ts": _ts(),
        "component": "b",
        "op": "put",
        "key": "k",
        "delta": 0,
        "num": 0,
    }
    fields.update(kw)
    return pb.Entry(key=entry_key, applied=pb.Applied(**fields))  # type: ignore[arg-type]


def _ctr(key: str, **maps: dict[str, int]) -> pb.Entry:
    return pb.Entry(key=key, counter=pb.Counter(**maps))


def _deltas(*entries: pb.Entry, sender: str = "b", to: str = "a") -> pb.GossipMessage:
    return pb.GossipMessage(sender=sender, to=to, deltas=pb.Deltas(entries=entries, seq=1))


def _refused(m: pb.GossipMessage, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        from_pb(m)


def _entries(m: pb.GossipMessage) -> dict[str, object]:
    msg = from_pb(m)
    assert isinstance(msg, Deltas)
    return dict(msg.entries)


# ---------------------------------------------------------------------------- entry keys


@pytest.mark.parametrize(
    ("key", "match"),
    [
        ("", "must not be empty"),
        ("a\0b", "NUL"),
        ("x" * 5000, "5000 bytes"),
        ("é" * 513, "1026 bytes"),  # 513 characters, two bytes each
    ],
    ids=["empty", "nul", "5000-bytes", "1026-bytes-in-513-characters"],
)
def test_entry_keys_obey_the_client_rules(key: str, match: str) -> None:
    for entry in (_reg(key), _ctr(key, p={"b": 1})):
        _refused(_deltas(entry), match)
    if key:  # (an empty one is in the records of an older version: see below)
        _refused(_deltas(_rec(applied_key("c", 1), key=key)), "key written")
    # the same through a node: nothing enters the store, the message is dropped
    a = _core()
    before = a.digest()
    assert not _deliver(a, _deltas(_reg("fine"), _reg(key)))
    assert a.digest() == before and a.get(key) is None and a.get("fine") is None
    # keys at the limits are taken
    for ok in ("k", "x" * 1024, "é" * 512, "日本語" * 100, "\t \U0001f600"):
        other = "#" + ok[1:]  # a counter under a key of the same size
        assert set(_entries(_deltas(_reg(ok), _ctr(other, p={"b": 1})))) == {ok, other}
    # an Applied record of an older version's exactly-once table wrote no key
    got = _entries(_deltas(_rec(applied_key("c", 3), key="")))
    assert isinstance(got[applied_key("c", 3)], Applied)


@pytest.mark.parametrize(
    ("key", "match"),
    [
        ("\0rid\0c\0" + "1", "20 digits"),  # not the canonical 20 digits
        ("\0rid\0c\0" + "1" * 21, "20 digits"),
        ("\0rid\0c\0" + "²" * 20, "20 digits"),  # Unicode digits (int() refuses them)
        ("\0rid\0c", "20 digits"),  # no sequence at all
        ("\0rid\0\0" + "1" * 20, "client id"),  # empty client id
        ("\0rid\0" + "c" * 129 + "\0" + "1" * 20, "client id"),  # client id > 128 bytes
        ("\0rid\0c\0" + "0" * 20, "malformed"),  # sequence 0
        ("\0rid\0" + "c" * 1100 + "\0" + "1" * 20, "longer than 1024"),
    ],
    ids=[
        "1-digit",
        "21-digits",
        "unicode-digits",
        "no-sequence",
        "empty-client",
        "client-129-bytes",
        "sequence-0",
        "1126-bytes",
    ],
)
def test_applied_record_keys_must_be_well_formed(key: str, match: str) -> None:
    _refused(_deltas(_rec(key)), match)


@pytest.mark.parametrize(
    ("key", "match"),
    [
        ("\0stable\0", "empty node id"),
        ("\0stable\0" + "n" * 129, "longer than 128"),
        ("\0", "neither an applied record nor a stable mark"),
        ("\0other\0x", "neither an applied record nor a stable mark"),
    ],
    ids=["stable-no-node", "stable-node-129-bytes", "nul", "unknown-prefix"],
)
def test_other_reserved_keys_are_refused(key: str, match: str) -> None:
    _refused(_deltas(_reg(key, b"")), match)


def test_values_match_the_kind_of_their_key() -> None:
    rid = applied_key("client-1", 42)
    mark = stable_key("b")
    _refused(_deltas(_rec("k")), "applied record under a client key")
    _refused(_deltas(_reg(rid)), "holds a register")
    _refused(_deltas(_ctr(rid, p={"b": 1})), "holds a counter")
    _refused(_deltas(_ctr(mark, p={"b": 1})), "holds a counter")
    _refused(_deltas(_rec(mark)), "holds a record")
    tomb = pb.Entry(key=mark, register=pb.Register(ts=_ts(), tombstone=True))
    _refused(_deltas(tomb), "not an empty register of its node")
    _refused(_deltas(_reg(mark, b"x")), "not an empty register of its node")
    _refused(_deltas(_reg(mark, b"", _ts(node="c"))), "not an empty register of its node")
    # what the store itself writes is taken
    got = _entries(_deltas(_rec(rid), _reg(mark, b"")))
    assert got == {
        rid: Applied(Timestamp(T, 0, "b"), "b", "put", "k", 0, 0),
        mark: Register(Timestamp(T, 0, "b"), b""),
    }


# ---------------------------------------------------------------------------- values


def test_register_values_are_bounded() -> None:
    big = b"x" * MAX_VALUE_BYTES
    assert _entries(_deltas(_reg("k", big)))["k"] == Register(Timestamp(T, 0, "b"), big)
    _refused(_deltas(_reg("k", big + b"x")), f"{MAX_VALUE_BYTES + 1} bytes")


@pytest.mark.parametrize(
    ("ts", "match"),
    [
        (_ts(node=""), "empty node id"),
        (_ts(node="n" * 129), "longer than 128 bytes"),
        (_ts(node="é" * 65), "longer than 128 bytes"),
        (_ts(wall=-1), "wall_ms -1 outside"),
        (_ts(wall=2**62), "outside"),
        (_ts(wall=2**63 - 1), "outside"),
        (_ts(logical=2**31), "logical"),
        (_ts(logical=2**64 - 1), "logical"),
        (pb.Timestamp(), "empty node id"),  # no timestamp at all
    ],
    ids=[
        "no-node",
        "node-129-bytes",
        "node-130-bytes-in-65-characters",
        "wall-negative",
        "wall-2^62",
        "wall-int64-max",
        "logical-2^31",
        "logical-uint64-max",
        "unset",
    ],
)
def test_timestamps_are_bounded(ts: pb.Timestamp, match: str) -> None:
    _refused(_deltas(_reg("k", ts=ts)), match)
    _refused(_deltas(_rec(applied_key("c", 1), ts=ts)), match)
    # at the limits: taken
    ts = _ts(wall=2**62 - 1, logical=2**31 - 1, node="n" * 128)
    got = _entries(_deltas(_reg("k", ts=ts)))
    assert got["k"] == Register(Timestamp(2**62 - 1, 2**31 - 1, "n" * 128), b"v")


def test_counter_components_and_totals_are_bounded() -> None:
    long = "c" * (MAX_COMPONENT_BYTES + 1)
    _refused(_deltas(_ctr("n", p={"": 1})), "empty counter component")
    _refused(_deltas(_ctr("n", n={long: 1})), "longer than")
    _refused(_deltas(_ctr("n", p={"b": 0}, p_high={"": 1})), "empty counter component")
    # totals: 127 bits at most (the high part below 2**63); the wire has no negative
    _refused(_deltas(_ctr("n", p={"b": 0}, p_high={"b": 2**63})), "beyond 2\\^127")
    _refused(_deltas(_ctr("n", n={"b": 5}, n_high={"b": 2**64 - 1})), "beyond 2\\^127")
    got = _entries(
        _deltas(_ctr("n", p={"b": 2**64 - 1}, p_high={"b": 2**63 - 1}, n={"b/1f2e3d4c": 2}))
    )
    assert got["n"] == Counter({"b": COMPONENT_MAX}, {"b/1f2e3d4c": 2})
    settlement = "b/1f2e3d4c!" + "x" * 128 + "/" + "9" * 20  # the longest legal component
    got = _entries(_deltas(_ctr("n", p={settlement: 1})))
    assert got["n"] == Counter({settlement: 1}, {})
    # through a node: a forged total is refused and the counter keeps its value
    a = _core(state={"n": Counter({"b": 5}, {})})
    assert not _deliver(a, _deltas(_ctr("n", p={"b": 0}, p_high={"b": 2**63})))
    assert not _deliver(a, _deltas(_ctr("n", p={long: 1})))
    assert a.get("n") == Counter({"b": 5}, {})


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"op": "drop"}, "unknown operation"),
        ({"op": ""}, "unknown operation"),
        ({"key": "a\0b"}, "key written"),
        ({"key": "x" * 5000}, "key written"),
        ({"component": ""}, "empty counter component"),
        ({"component": "c" * (MAX_COMPONENT_BYTES + 1)}, "longer than"),
        ({"key": "", "op": "increment", "delta": 5}, "an amount added to no key"),
        ({"digest": b"d" * (MAX_DIGEST_BYTES + 1)}, "payload digest of 33 bytes"),
    ],
    ids=[
        "op-unknown",
        "op-empty",
        "key-nul",
        "key-5000-bytes",
        "component-empty",
        "component-long",
        "amount-to-no-key",
        "digest-long",
    ],
)
def test_applied_records_are_bounded(fields: dict[str, object], match: str) -> None:
    rid = applied_key("c", 1)
    _refused(_deltas(_rec(rid, **fields)), match)
    # delta and num are sint64: the wire itself cannot carry more (nothing to check)
    a = pb.Applied()
    for bad in (2**63, -(2**63) - 1):
        with pytest.raises(ValueError):
            a.delta = bad
    got = _entries(_deltas(_rec(rid, op="increment", delta=-(2**63), num=2**63 - 1)))[rid]
    assert isinstance(got, Applied) and (got.delta, got.num) == (-(2**63), 2**63 - 1)


def test_applied_records_round_trip_with_and_without_a_digest() -> None:
    """The payload digest travels with a record through every conversion (the in-place
    encoder and the inline decoder of the hot path, and the slow path a long client id
    takes); a record without one (an older version's, or a delete) stays without."""
    ts = Timestamp(T, 3, "b")
    records = [
        Applied(ts, "b", "put", "k", 0, 0, payload_digest("put", b"v")),
        Applied(ts, "b", "increment", "c", -5, 7, payload_digest("increment", delta=-5)),
        Applied(ts, "b", "increment", "c", 2, 9, b"\xff" * MAX_DIGEST_BYTES),  # the longest
        Applied(ts, "b", "put", "k", 0, 0),  # written before digests were kept
        Applied(ts, "b", "delete", "k", 0, 1),
        Applied(ts, "b", "put", "", 0, 0),  # an older version's exactly-once table
    ]
    for client in ("c", "long-client-" + "x" * 100):  # hot path, slow path
        entries = tuple((applied_key(client, i + 1), r) for i, r in enumerate(records))
        m = from_pb(
            pb.GossipMessage.FromString(to_pb(Deltas("b", "a", entries, 1)).SerializeToString())
        )
        assert isinstance(m, Deltas) and m.entries == entries
        for k, r in entries:
            assert entry_from_pb(entry_to_pb(k, r)) == (k, r)
            assert applied_from_pb(applied_to_pb(r), k) == r
    # a record with a digest reaches another replica with it (anti-entropy)
    a, b = _core("a"), _core("b")
    w = b.put("k", b"first", T, rid=("cl", 1), wall_ms=T)
    rec = w.delta[applied_key("cl", 1)]
    assert isinstance(rec, Applied) and rec.digest == payload_digest("put", b"first")
    _anti_entropy({"a": a, "b": b}, "b", "a", T)
    assert a.lookup("cl", 1) == rec and a.digest() == b.digest()


# ---------------------------------------------------------------------------- messages


def test_sender_and_receiver_are_bounded() -> None:
    for sender, to in (("", "a"), ("b", ""), ("b" * 129, "a"), ("b", "é" * 65)):
        m = pb.GossipMessage(sender=sender, to=to, deltas_ack=pb.DeltasAck(seq=1))
        _refused(m, "empty node id|longer than 128")
    _refused(pb.GossipMessage(sender="b", to="a"), "without a body")


def test_lists_are_bounded() -> None:
    e = _reg("k")
    m = _deltas()
    m.deltas.entries.extend([e] * (MAX_LIST + 1))
    _refused(m, f"more than {MAX_LIST} entries")
    it = pb.GossipMessage(sender="b", to="a", ae_items=pb.AeItems(round=1, reply=True))
    it.ae_items.items.extend([e] * (MAX_LIST + 1))
    _refused(it, f"more than {MAX_LIST} entries")
    it = pb.GossipMessage(sender="b", to="a", ae_items=pb.AeItems(round=1, reply=True))
    it.ae_items.leaves.extend([0] * (MAX_LIST + 1))
    _refused(it, "cover codes")
    ups = [pb.Member(node="c", state=pb.MEMBER_STATE_ALIVE)] * (MAX_UPDATES + 1)
    ping = pb.GossipMessage(sender="b", to="a", ping=pb.Ping(seq=1, gossip_updates=ups))
    _refused(ping, "membership updates")


def _hashes(level: int, indices: list[int], hashes: list[bytes]) -> pb.GossipMessage:
    h = pb.AeHashes(round=1, level=level, indices=indices, hashes=hashes)
    return pb.GossipMessage(sender="b", to="a", ae_request=h)


def test_anti_entropy_messages_are_bounded() -> None:
    h = bytes(16)
    assert from_pb(_hashes(0, [0], [h])) == AeRequest("b", "a", 1, 0, (0,), (h,))
    assert isinstance(from_pb(_hashes(2, [3, 17, 255], [h, h, h])), AeRequest)
    assert isinstance(from_pb(_hashes(3, [], [])), AeRequest)  # "no difference left"
    _refused(_hashes(0, [0], [bytes(15)]), "hash of 15 bytes")
    _refused(_hashes(0, [0], [bytes(1000)]), "hash of 1000 bytes")
    _refused(_hashes(1, [0, 1], [h]), "2 indices but 1 hashes")
    _refused(_hashes(7, [0], [h]), "level 7 deeper")
    _refused(_hashes(1, [16], [h]), "within level 1")  # level 1 has 16 nodes
    _refused(_hashes(2, [5, 5], [h, h]), "increase strictly")
    _refused(_hashes(2, [9, 4], [h, h]), "increase strictly")
    many = list(range(MAX_LIST + 1))
    _refused(_hashes(6, many, [h] * len(many)), f"more than {MAX_LIST} indices")
    items = pb.AeItems(round=1, leaves=[16**6 + (16**6 - 1) // 15], reply=True)
    _refused(pb.GossipMessage(sender="b", to="a", ae_items=items), "beyond the deepest tree")
    items = pb.AeItems(round=1, leaves=[0, 16**6 + 5], items=[_reg("k")], reply=True)
    got = from_pb(pb.GossipMessage(sender="b", to="a", ae_items=items))
    assert isinstance(got, AeItems) and got.leaves == (0, 16**6 + 5)


def _ping(updates: list[pb.Member], incarnation: int = 0) -> pb.GossipMessage:
    return pb.GossipMessage(
        sender="n1",
        to="n0",
        ping=pb.Ping(seq=1, incarnation=incarnation, gossip_updates=updates),
    )


def test_membership_fields_are_bounded() -> None:
    dead = pb.MEMBER_STATE_DEAD
    _refused(_ping([pb.Member(node="n3", state=dead, incarnation=2**64 - 1)]), "incarnation")
    _refused(_ping([pb.Member(node="n3", state=dead, incarnation=2**62 + 1)]), "incarnation")
    _refused(_ping([], incarnation=2**64 - 1), "incarnation")
    _refused(_ping([pb.Member(node="", state=dead)]), "empty node id")
    _refused(_ping([pb.Member(node="n" * 129, state=dead)]), "longer than 128")
    _refused(_ping([pb.Member(node="n3")]), "unknown member state")
    req = pb.PingReq(seq=1, target="")
    _refused(pb.GossipMessage(sender="n1", to="n0", ping_req=req), "ping_req target")
    for ack in (pb.Ack(seq=1, node=""), pb.Ack(seq=1, node="n1", incarnation=2**63)):
        _refused(pb.GossipMessage(sender="n1", to="n0", ack=ack), "ack")
    got = from_pb(_ping([pb.Member(node="n3", state=dead, incarnation=2**62)], 2**62))
    assert got == Ping("n1", "n0", 1, 2**62, (Member("n3", DEAD, 2**62),))


# ---------------------------------------------------------------------------- the future


def test_a_delta_a_century_ahead_is_quarantined_and_later_writes_take_effect() -> None:
    a = _core()
    hlc = a.hlc_now
    evil = _ts(wall=T + CENTURY)
    rid = applied_key("c", 1)
    m = _deltas(
        _reg("k", b"pinned", evil),
        _rec(rid, ts=evil),
        _reg(stable_key("b"), b"", evil),
        _reg("fine", b"ok"),
    )
    assert _deliver(a, m)  # well formed: the codec cannot know the receiver's clock
    assert a.get("k") is None and a.get(rid) is None and a.get(stable_key("b")) is None
    assert a.get("fine") == Register(Timestamp(T, 0, "b"), b"ok")  # the rest is merged
    assert a.stats.entries_quarantined == 3
    assert a.stats.max_quarantined_lead_ms == CENTURY
    assert a.stats.clock_jumps == 0 and a.hlc_now.wall_ms < T + DAY and a.hlc_now > hlc
    out = a.take_outputs()
    assert set(out.to_persist) == {"fine"}  # nothing quarantined is persisted
    # later local writes take effect and are visible
    w = a.put("k", b"new", T + 1, wall_ms=T + 1)
    assert a.get("k") == Register(w.ts, b"new") and w.ts.wall_ms == T + 1
    d = a.delete("k", T + 2, wall_ms=T + 2)
    assert a.get("k") == Register(d.ts, None)
    # ... and the entry is not relayed: a peer that streams from a never sees it
    c = _core("c")
    a.tick(T + 10**9, wall_ms=T + 3)  # the gossip timer fires
    _pump({"a": a, "c": c}, a.take_outputs().messages, T + 3)
    assert c.get("k") == Register(d.ts, None) and c.get(rid) is None
    assert c.stats.entries_quarantined == 0 and c.hlc_now.wall_ms < T + DAY


def test_a_write_elsewhere_is_not_pinned_by_a_forged_timestamp() -> None:
    """b (compromised) sends a a value a century ahead; c, which never heard of it,
    writes the key later. After a and c synchronize, c's write is in effect on both."""
    a, c = _core("a"), _core("c")
    assert _deliver(a, _deltas(_reg("k", b"pinned", _ts(wall=T + CENTURY))))
    w = c.put("k", b"client", T + 5, wall_ms=T + 5)
    cores = {"a": a, "c": c}
    _anti_entropy(cores, "a", "c", T + 10)  # both ways, through the codec
    _anti_entropy(cores, "c", "a", T + 10)
    assert a.get("k") == c.get("k") == Register(w.ts, b"client")
    assert a.digest() == c.digest()


def test_a_lead_within_the_bound_is_still_followed() -> None:
    """Admin skews of a day each way: a sender a day ahead, this node a day behind."""
    cfg = GossipConfig()
    assert cfg.max_future_ms == 2 * MAX_CLOCK_SKEW_MS + 3_600_000
    a = _core()
    assert _deliver(a, _deltas(_reg("day", b"x", _ts(wall=T + DAY))))
    assert a.get("day") == Register(Timestamp(T + DAY, 0, "b"), b"x")
    assert a.stats.clock_jumps == 1 and a.stats.max_clock_jump_ms == DAY
    assert a.stats.entries_quarantined == 0
    assert a.put("day", b"later", T).ts.wall_ms == T + DAY  # the clock followed: it wins
    # the bound itself: max_future_ms ahead is followed, one more millisecond is not
    b = _core()
    edge = T + cfg.max_future_ms
    assert _deliver(
        b, _deltas(_reg("edge", b"x", _ts(wall=edge)), _reg("over", b"x", _ts(edge + 1)))
    )
    assert isinstance(b.get("edge"), Register) and b.get("over") is None
    assert b.stats.entries_quarantined == 1 and b.stats.max_quarantined_lead_ms == edge + 1 - T
    # a smaller bound (configurable)
    c = _core(config=dataclasses.replace(QUIET, max_future_ms=DAY))
    assert _deliver(c, _deltas(_reg("k", b"x", _ts(wall=T + DAY + 1))))
    assert c.get("k") is None and c.stats.entries_quarantined == 1


def test_a_quarantined_entry_does_not_wedge_anti_entropy() -> None:
    """A replica that holds an entry too far ahead (it took it before this check, or its
    own clock is that far ahead) and a healthy one: rounds still complete, everything
    else is repaired, the entry stays out; it is taken once within the bound."""
    ahead = Register(Timestamp(T + CENTURY, 0, "p"), b"pinned")
    p = _core("p", ("p", "h"), state={"k": ahead, "x": Register(Timestamp(T, 0, "p"), b"1")})
    h = _core("h", ("p", "h"))
    cores = {"p": p, "h": h}
    for rnd in range(3):
        _anti_entropy(cores, "p", "h", T + rnd)
        _anti_entropy(cores, "h", "p", T + rnd)
    assert h.get("x") == Register(Timestamp(T, 0, "p"), b"1") and h.get("k") is None
    assert h.stats.entries_quarantined >= 1 and h.stats.ae_rounds_completed == 3
    assert p.stats.ae_rounds_completed == 3
    # a century later, the same entry is within the bound: anti-entropy delivers it
    _anti_entropy(cores, "p", "h", T + CENTURY)
    assert h.get("k") == ahead and h.digest() == p.digest()


# ---------------------------------------------------------------------------- membership


def test_a_forged_death_at_an_absurd_incarnation_is_refused() -> None:
    """Through the codec the 2**64 - 1 of the review is malformed; a core fed directly
    (no codec) refuses it, and the other absurd claims, in membership."""
    nodes = ("n0", "n1", "n2", "n3")
    dead = pb.Member(node="n3", state=pb.MEMBER_STATE_DEAD, incarnation=2**64 - 1)
    n0 = _core("n0", nodes)
    assert not _deliver(n0, _ping([dead]))
    assert n0.member_states()["n3"].state == ALIVE
    for claim in (
        Member("n3", DEAD, 2**64 - 1),
        Member("n3", DEAD, 2**63 - 1),
        Member("n3", SUSPECT, MAX_INCARNATION),  # could not be refuted within the bound
        Member("n3", ALIVE, MAX_INCARNATION + 1),
        Member("n3", DEAD, STEP + 1),  # more than a step above what n0 knows (0)
    ):
        n0.step(Ping("n1", "n0", 1, 0, (claim,)), T)
    st = n0.member_states()["n3"]
    assert (st.state, st.incarnation) == (ALIVE, 0)
    assert n0.stats.membership_updates_refused == 5
    # the member itself does not take such a claim about itself either
    n3 = _core("n3", nodes)
    n3.step(Ping("n1", "n3", 1, 0, (Member("n3", DEAD, 2**64 - 1),)), T)
    n3.step(Ping("n1", "n3", 2, 0, (Member("n3", SUSPECT, STEP + 1),)), T)
    assert n3.incarnation == 0 and n3.stats.membership_updates_refused == 2
    for m in n3.take_outputs().messages:
        to_pb(m)  # everything it sends fits the wire
    # a direct ping declaring an absurd own incarnation is refused as well
    n0.step(Ping("n2", "n0", 3, 2**63, ()), T)
    assert n0.member_states()["n2"].incarnation == 0
    assert n0.stats.membership_updates_refused == 6
    # a claim exactly the step above what is known is taken, and refuted
    n0, n3 = _core("n0", nodes), _core("n3", nodes)
    claim = Member("n3", DEAD, STEP)
    n0.step(Ping("n1", "n0", 1, 0, (claim,)), T)
    assert n0.member_states()["n3"].state == DEAD
    n3.step(Ping("n1", "n3", 1, 0, (claim,)), T)
    assert n3.incarnation == STEP + 1
    (ack,) = n3.take_outputs().messages
    assert isinstance(ack, Ack) and to_pb(ack).ack.incarnation == STEP + 1
    n0.step(Ping("n3", "n0", 2, n3.incarnation, ()), T)
    st = n0.member_states()["n3"]
    assert (st.state, st.incarnation) == (ALIVE, STEP + 1)
    assert n0.stats.membership_updates_refused == n3.stats.membership_updates_refused == 0


def test_a_members_answer_to_our_probe_repairs_a_view_that_fell_behind() -> None:
    """A view more than a step behind a member (it never heard a claim the member
    refuted) refuses hearsay about it; the member's own answer to this node's probe is
    taken (within the cap), so the view is not wedged."""
    sent: list[Message] = []
    z = Membership(
        "z", ["n3"], GossipConfig(), random.Random(1), sent.append, lambda ev: None,
        now_ms=0, first_ping_ms=0,
    )  # fmt: skip
    far = STEP + 5
    z.on_ping(Ping("n3", "z", 1, far, ()), 0)  # its own ping: not an answer to a probe
    z.on_ack(Ack("n1", "z", 77, "n3", far, ()), 0)  # relayed or unsolicited
    assert z.members["n3"].incarnation == 0 and z.stats.membership_updates_refused == 2
    z.tick(0)
    (probe,) = [m for m in sent if isinstance(m, Ping)]
    assert probe.to == "n3"
    z.on_ack(Ack("n3", "z", probe.seq, "n3", MAX_INCARNATION + 1, ()), 0)  # beyond the cap
    assert z.members["n3"].incarnation == 0
    z.on_ack(Ack("n3", "z", probe.seq, "n3", far, ()), 0)
    assert (z.members["n3"].state, z.members["n3"].incarnation) == (ALIVE, far)
    assert z.stats.membership_updates_refused == 3


def _inject(sim: Sim, node: str, msg: Message) -> None:
    core = sim.cores[node]
    assert core is not None
    core.step(msg, sim.now, wall_ms=sim.phys(node))
    sim._flush(node)


def test_a_forged_death_leaves_the_member_serving_in_a_simulated_cluster() -> None:
    """The review's attack on a running cluster (production core, commit path, codec):
    n1 sends every other node a ping declaring n3 dead at 2**64 - 1 (and 2**63 - 1, and
    far beyond the step). n3 stays a member in every view and keeps serving."""
    sim = Sim(11, 4, max_skew_ms=0)
    sim.advance(1000)
    claims = (
        Member("n3", DEAD, 2**64 - 1),
        Member("n3", DEAD, 2**63 - 1),
        Member("n3", SUSPECT, 2**62 - 1),
    )
    for node in ("n0", "n2", "n3"):
        _inject(sim, node, Ping("n1", node, 10**6, 0, claims))
    for _ in range(40):
        sim.advance(250)
        for o in ("n0", "n1", "n2"):
            core = sim.cores[o]
            assert core is not None
            assert core.member_states()["n3"].state == ALIVE
    assert sum(c.stats.membership_updates_refused for c in sim.live()) == 9
    n3 = sim.cores["n3"]
    assert n3 is not None and n3.incarnation == 0
    op = sim.client_op("n3", "put", "after", b"served")
    assert op.acked
    assert sim.wait_converged(10_000) is not None
    for core in sim.live():
        got = core.get("after")
        assert isinstance(got, Register) and got.value == b"served"
    assert sim.check() == [] and sim.errors == []


@pytest.mark.parametrize("seed", [3, 4])
def test_legitimate_clusters_refuse_nothing(seed: int) -> None:
    """Crashes and restarts (incarnations start again at 0), suspicion and refutation,
    wall clocks set a day forward and back (Admin skew): no membership update refused,
    no entry quarantined."""
    sim = Sim(seed, 4, max_skew_ms=300)
    rng = random.Random(seed)
    refused = quarantined = jumps = 0
    for i in range(24):
        node = rng.choice(sim.nodes)
        if i % 4 == 0:
            core = sim.cores[node]
            if core is not None:
                refused += core.stats.membership_updates_refused
                quarantined += core.stats.entries_quarantined
                jumps += core.stats.clock_jumps
            sim.crash(node)
        elif i % 4 == 1:
            sim.skew[node] = rng.choice((-DAY, DAY, -3_600_000, 0))
        for n in sim.nodes:
            if sim.cores[n] is not None:
                sim.client_op(n, "put", f"k{i % 5}", b"%d" % i)
        sim.advance(rng.choice((300, 1500, 3000)))
        if i % 4 == 2:
            for n in sim.nodes:
                sim.restart(n)
    sim.heal()
    assert sim.wait_converged(30_000) is not None
    refused += sum(c.stats.membership_updates_refused for c in sim.live())
    quarantined += sum(c.stats.entries_quarantined for c in sim.live())
    jumps += sum(c.stats.clock_jumps for c in sim.live())
    assert (refused, quarantined) == (0, 0)
    assert jumps > 0  # the skews were real: clocks followed leads of up to two days
    assert sim.check() == []
