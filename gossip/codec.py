"""Conversion between the core's message dataclasses (gossip.messages) and caplab.gossip.v1.

Validation. ``from_pb`` is the peer path's gate: it refuses (``CodecError``, the receiver
drops and counts the message) anything no correct member sends, so that a buggy or
compromised member cannot put into the other replicas what the client path would refuse:

* entry keys: client keys obey ``caplab.validation.check_key`` (1 to 1024 bytes of
  UTF-8, no NUL); a key starting with NUL is one of the store's own and must be well
  formed: an Applied record's (``crdt.applied_key``: a client id of 1 to 128 bytes, a
  sequence >= 1 in 20 digits) holding an Applied value, or a stable mark
  (``crdt.stable_key`` of a node id) holding ``Register(ts, b"")`` stamped by that node;
  a client key holds a register or a counter, never a record;
* register values at most ``caplab.validation.MAX_VALUE_BYTES``;
* timestamps: a node id of 1 to ``hlc.MAX_NODE_ID_BYTES`` bytes, ``0 <= wall_ms <
  hlc.MAX_WALL_MS``, ``logical <= hlc.DEFAULT_MAX_LOGICAL`` (no clock issues more);
  whether one is too far in the future depends on the receiver's clock: the core
  quarantines it (``GossipConfig.max_future_ms``);
* counters: component names of 1 to ``MAX_COMPONENT_BYTES`` bytes, totals within
  ``crdt.COMPONENT_MAX`` (127 bits: the high bits < 2**63; the wire types are unsigned,
  so no total is negative);
* Applied records: a known operation, the key written (a client key, or empty in the
  records of an older version's exactly-once table, which add nothing: ``delta`` 0), a
  component name as above, a payload digest of at most ``crdt.MAX_DIGEST_BYTES`` (empty
  in records written before digests were kept, and for deletes); ``delta`` and ``num``
  are sint64 on the wire, so within int64 by construction;
* membership: node ids as above, known states, incarnations at most
  ``messages.MAX_INCARNATION`` (``gossip.membership`` also bounds their steps);
* anti-entropy: levels within the deepest Merkle tree, indices strictly increasing and
  within their level, one hash of ``merkle.HASH_BYTES`` per index, cover codes within the
  deepest tree;
* any message: sender and receiver node ids as above, lists at most ``MAX_LIST``
  (entries, items, indices, leaves) or ``MAX_UPDATES`` (membership updates) long.

Cost: ``entry_from_pb`` runs on every entry of every message (up to thousands per
message), so the common case (a register under a short client key, a short node id) is
decided by a few length and range comparisons; the precise checks and their messages run
only when one of those fails.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from caplab.errors import InvalidArgument
from caplab.gossip.v1 import gossip_pb2 as pb
from caplab.validation import MAX_CLIENT_ID_BYTES, MAX_KEY_BYTES, MAX_VALUE_BYTES, check_key
from gossip.crdt import (
    APPLIED_PREFIX,
    COMPONENT_MAX,
    MAX_DIGEST_BYTES,
    STABLE_PREFIX,
    Applied,
    Counter,
    Register,
    Value,
    applied_key,
    parse_applied_key,
    stable_key,
)
from gossip.hlc import DEFAULT_MAX_LOGICAL, MAX_NODE_ID_BYTES, MAX_WALL_MS, Timestamp
from gossip.merkle import FANOUT, HASH_BYTES
from gossip.messages import (
    ALIVE,
    DEAD,
    MAX_INCARNATION,
    SUSPECT,
    Ack,
    AeItems,
    AeRequest,
    AeResponse,
    Deltas,
    DeltasAck,
    Entry,
    Member,
    Message,
    Ping,
    PingReq,
)

_STATE_TO_PB = {
    ALIVE: pb.MEMBER_STATE_ALIVE,
    SUSPECT: pb.MEMBER_STATE_SUSPECT,
    DEAD: pb.MEMBER_STATE_DEAD,
}
_STATE_FROM_PB = {v: k for k, v in _STATE_TO_PB.items()}


class CodecError(ValueError):
    """A peer message that cannot be a valid core message (dropped by the receiver)."""


# A counter component is a node id, ``node/epoch`` (a node that lost its data, 8 hex
# digits) or a settlement's ``component!client_id/sequence`` (gossip.core._settle): at
# most 128 + 9 + 1 + 128 + 1 + 20 bytes. Twice that, rounded up.
MAX_COMPONENT_BYTES = 2 * (MAX_NODE_ID_BYTES + 9 + 1 + MAX_CLIENT_ID_BYTES + 1 + 20)
# Entries, anti-entropy items, indices and cover codes in one message: far above what
# any sender produces (a Deltas holds up to ``delta_batch_max`` = 1,000 entries, an
# AeItems about ``ae_chunk_items`` = 2,000 within ``max_message_bytes``; an AeRequest at
# most 16 * ``ae_max_nodes`` = 65,536 indices).
MAX_LIST = 1 << 18
MAX_UPDATES = 1024  # membership updates per Ping/PingReq/Ack (``max_piggyback`` + 1 sent)
MAX_MERKLE_DEPTH = 6  # gossip.merkle.MerkleTree allows depths 1..6
# cover codes: a leaf, or leaf_count + an internal node's number (gossip.merkle.cover_code)
_MAX_COVER_CODE = FANOUT**MAX_MERKLE_DEPTH + (FANOUT**MAX_MERKLE_DEPTH - 1) // (FANOUT - 1)
# Fast paths: a string of at most this many characters is within the byte bound (UTF-8
# takes at most 4 bytes per character); longer ones are measured exactly.
_KEY_CHARS = MAX_KEY_BYTES // 4
_NODE_CHARS = MAX_NODE_ID_BYTES // 4
_COMPONENT_CHARS = MAX_COMPONENT_BYTES // 4


def _show(s: str) -> str:
    """``s`` for an error message: repr, cut to a readable length."""
    return repr(s) if len(s) <= 64 else f"{s[:64]!r}... ({len(s)} characters)"


def _utf8_len(s: str, what: str) -> int:
    try:
        return len(s.encode())
    except UnicodeEncodeError:
        raise CodecError(f"{what} {_show(s)} is not valid UTF-8") from None


def _check_node(node: str, what: str) -> None:
    """A node id: 1 to MAX_NODE_ID_BYTES bytes of UTF-8."""
    if not node:
        raise CodecError(f"{what}: empty node id")
    if len(node) > _NODE_CHARS and _utf8_len(node, what) > MAX_NODE_ID_BYTES:
        raise CodecError(f"{what}: node id {_show(node)} longer than {MAX_NODE_ID_BYTES} bytes")


def _check_component(name: str, what: str) -> None:
    if not name:
        raise CodecError(f"{what}: empty counter component")
    if len(name) > _COMPONENT_CHARS and _utf8_len(name, what) > MAX_COMPONENT_BYTES:
        raise CodecError(
            f"{what}: counter component {_show(name)} longer than {MAX_COMPONENT_BYTES} bytes"
        )


def _check_ts(t: pb.Timestamp, what: str) -> None:
    """Raise the precise error of a timestamp outside the bounds (see the module doc)."""
    _check_node(t.node, f"{what}: timestamp")
    if not 0 <= t.wall_ms < MAX_WALL_MS:
        raise CodecError(f"{what}: timestamp wall_ms {t.wall_ms} outside [0, 2^62)")
    if t.logical > DEFAULT_MAX_LOGICAL:
        raise CodecError(f"{what}: timestamp logical {t.logical} beyond {DEFAULT_MAX_LOGICAL}")


def _check_key(key: str, kind: str) -> None:
    """Raise the precise error of an entry key that cannot hold a ``kind`` value
    ("register" | "counter" | "record"; see the module doc)."""
    if not key.startswith("\x00"):
        try:
            check_key(key)
        except InvalidArgument as e:
            raise CodecError(f"entry key {_show(key)}: {e}") from None
        if kind == "record":
            raise CodecError(f"entry key {_show(key)}: an applied record under a client key")
        return
    if _utf8_len(key, "entry key") > MAX_KEY_BYTES:
        raise CodecError(f"reserved key {_show(key)} longer than {MAX_KEY_BYTES} bytes")
    if key.startswith(APPLIED_PREFIX):
        client, sep, seq = key[len(APPLIED_PREFIX) :].rpartition("\x00")
        # (checked before parse_applied_key, whose int() refuses non-ASCII digits)
        if not (sep and len(seq) == 20 and seq.isascii() and seq.isdigit()):
            raise CodecError(f"applied record key {_show(key)}: not client\\0<20 digits>")
        parsed = parse_applied_key(key)
        if parsed is None or applied_key(*parsed) != key or parsed[1] < 1:
            raise CodecError(f"applied record key {_show(key)} is malformed")
        if not client or _utf8_len(client, "client id") > MAX_CLIENT_ID_BYTES:
            raise CodecError(f"applied record key {_show(key)}: client id of 1 to 128 bytes")
        if kind != "record":
            raise CodecError(f"applied record key {_show(key)} holds a {kind}")
        return
    if key.startswith(STABLE_PREFIX):
        node = key[len(STABLE_PREFIX) :]
        _check_node(node, "stable mark key")
        if stable_key(node) != key:  # (the format, should stable_key change)
            raise CodecError(f"stable mark key {_show(key)} is malformed")
        if kind != "register":
            raise CodecError(f"stable mark key {_show(key)} holds a {kind}")
        return
    raise CodecError(f"reserved key {_show(key)} is neither an applied record nor a stable mark")


def _check_register(key: str, r: pb.Register) -> None:
    """Raise the precise error of a register entry outside the bounds (slow path)."""
    _check_key(key, "register")
    _check_ts(r.ts, f"entry {_show(key)}")
    if not r.tombstone and len(r.value) > MAX_VALUE_BYTES:
        raise CodecError(
            f"entry {_show(key)}: value of {len(r.value)} bytes (limit {MAX_VALUE_BYTES})"
        )
    if key.startswith(STABLE_PREFIX) and (
        r.tombstone or r.value or r.ts.node != key[len(STABLE_PREFIX) :]
    ):
        raise CodecError(f"stable mark {_show(key)}: not an empty register of its node")


def ts_to_pb(ts: Timestamp) -> pb.Timestamp:
    return pb.Timestamp(wall_ms=ts.wall_ms, logical=ts.logical, node=ts.node)


def ts_from_pb(t: pb.Timestamp) -> Timestamp:
    """The timestamp of ``t``; ``CodecError`` if out of bounds."""
    node, wall, logical = t.node, t.wall_ms, t.logical
    if not (0 < len(node) <= _NODE_CHARS and 0 <= wall < MAX_WALL_MS) or (
        logical > DEFAULT_MAX_LOGICAL
    ):
        _check_ts(t, "timestamp")
    return Timestamp(wall, logical, node)


_LOW = (1 << 64) - 1


def _split(m: Mapping[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """Component totals as (low 64 bits, high bits); high omitted when 0."""
    low: dict[str, int] = {}
    high: dict[str, int] = {}
    for k, a in m.items():
        if a > _LOW:
            high[k] = a >> 64
            low[k] = a & _LOW
        else:
            low[k] = a
    return low, high


def counter_to_pb(v: Counter) -> pb.Counter:
    p, ph = _split(v.p)
    n, nh = _split(v.n)
    return pb.Counter(p=p, n=n, p_high=ph, n_high=nh)


def _join(low: Mapping[str, int], high: Mapping[str, int], what: str) -> dict[str, int]:
    out = dict(low)
    for k, h in high.items():
        total = (h << 64) | out.get(k, 0)
        if total > COMPONENT_MAX:
            raise CodecError(f"counter component {_show(k)}: {what} total beyond 2^127 - 1")
        out[k] = total
    return out


def _what(kind: str, key: str | None) -> str:
    """What an error is about (built only when there is one)."""
    return kind if key is None else f"{kind} {_show(key)}"


def counter_from_pb(c: pb.Counter, key: str | None = None) -> Counter:
    """The counter of ``c`` (the value of ``key``); ``CodecError`` if out of bounds."""
    for m in (c.p, c.n, c.p_high, c.n_high):
        if len(m) > MAX_LIST:
            raise CodecError(f"{_what('counter', key)}: more than {MAX_LIST} components")
        for k in m:
            if not 0 < len(k) <= _COMPONENT_CHARS:
                _check_component(k, _what("counter", key))
    # (totals: the low 64 bits are uint64 on the wire; the high bits are checked here)
    if not c.p_high and not c.n_high:
        return Counter(dict(c.p), dict(c.n))
    return Counter(_join(c.p, c.p_high, "increment"), _join(c.n, c.n_high, "decrement"))


OPS = ("put", "delete", "increment")


def applied_to_pb(v: Applied) -> pb.Applied:
    return pb.Applied(
        ts=ts_to_pb(v.ts),
        component=v.component,
        op=v.op,
        key=v.key,
        delta=v.delta,
        num=v.num,
        digest=v.digest,
    )


def applied_from_pb(a: pb.Applied, key: str | None = None) -> Applied:
    """The record of ``a`` (the value of ``key``); ``CodecError`` if out of bounds."""
    op = a.op
    if op not in OPS:
        raise CodecError(f"{_what('applied record', key)}: unknown operation {_show(op)}")
    written = a.key
    # the key it wrote: a client key (empty in records of an older version's table,
    # which added nothing: a settlement would write to that key)
    if not written and a.delta:
        raise CodecError(f"{_what('applied record', key)}: an amount added to no key")
    if written and (len(written) > _KEY_CHARS or "\x00" in written):
        try:
            check_key(written)
        except InvalidArgument as e:
            what = _what("applied record", key)
            raise CodecError(f"{what}: key written {_show(written)}: {e}") from None
    comp = a.component
    if not 0 < len(comp) <= _COMPONENT_CHARS:
        _check_component(comp, _what("applied record", key))
    t = a.ts
    node, wall, logical = t.node, t.wall_ms, t.logical
    if not (0 < len(node) <= _NODE_CHARS and 0 <= wall < MAX_WALL_MS) or (
        logical > DEFAULT_MAX_LOGICAL
    ):
        _check_ts(t, _what("applied record", key))
    digest = a.digest
    if len(digest) > MAX_DIGEST_BYTES:
        raise CodecError(
            f"{_what('applied record', key)}: payload digest of {len(digest)} bytes "
            f"(limit {MAX_DIGEST_BYTES})"
        )
    # (delta and num are sint64 on the wire: within int64 by construction)
    return Applied(Timestamp(wall, logical, node), comp, op, written, a.delta, a.num, digest)


_APPLIED_AT = len(APPLIED_PREFIX)
_CLIENT_CHARS = MAX_CLIENT_ID_BYTES // 4
_SEQ_ZERO = "0" * 20


def entry_to_pb(key: str, v: Value) -> pb.Entry:
    if isinstance(v, Register):
        reg = pb.Register(ts=ts_to_pb(v.ts), tombstone=v.value is None, value=v.value or b"")
        return pb.Entry(key=key, register=reg)
    if isinstance(v, Applied):
        return pb.Entry(key=key, applied=applied_to_pb(v))
    return pb.Entry(key=key, counter=counter_to_pb(v))


def entry_from_pb(e: pb.Entry) -> Entry:
    """The entry of ``e``; ``CodecError`` if it is outside the bounds (module doc)."""
    key = e.key
    if e.HasField("register"):
        r = e.register
        t = r.ts
        node, wall, logical = t.node, t.wall_ms, t.logical
        value = None if r.tombstone else r.value
        # hot path: a short client key, a short node id, a timestamp in range
        if not (
            0 < len(key) <= _KEY_CHARS
            and 0 < len(node) <= _NODE_CHARS
            and 0 <= wall < MAX_WALL_MS
            and logical <= DEFAULT_MAX_LOGICAL
            and "\x00" not in key
            and (value is None or len(value) <= MAX_VALUE_BYTES)
        ):
            _check_register(key, r)  # raises, unless only a length needed measuring
        return key, Register(Timestamp(wall, logical, node), value)
    if e.HasField("applied"):
        a = e.applied
        t = a.ts
        op, comp, written, delta, digest = a.op, a.component, a.key, a.delta, a.digest
        node, wall, logical = t.node, t.wall_ms, t.logical
        # hot path (one record per write with a request id): as applied_from_pb, inline
        head, _, seq = key.rpartition("\x00")  # head: the prefix and the client id
        if not (
            0 < len(head) - _APPLIED_AT <= _CLIENT_CHARS
            and len(seq) == 20
            and key.startswith(APPLIED_PREFIX)
            and seq.isascii()
            and seq.isdigit()
            and seq != _SEQ_ZERO
            and op in OPS
            and 0 < len(comp) <= _COMPONENT_CHARS
            and 0 < len(node) <= _NODE_CHARS
            and 0 <= wall < MAX_WALL_MS
            and logical <= DEFAULT_MAX_LOGICAL
            and 0 < len(written) <= _KEY_CHARS
            and "\x00" not in written
            and len(digest) <= MAX_DIGEST_BYTES
        ):
            _check_key(key, "record")
            return key, applied_from_pb(a, key)  # raises, or measures the long strings
        ts = Timestamp(wall, logical, node)
        return key, Applied(ts, comp, op, written, delta, a.num, digest)
    if e.HasField("counter"):
        if not 0 < len(key) <= _KEY_CHARS or "\x00" in key:
            _check_key(key, "counter")
        return key, counter_from_pb(e.counter, key)
    raise CodecError(f"entry {_show(key)} has no value")


def _add_entries(out: Any, entries: tuple[Entry, ...]) -> None:
    """Append ``entries`` to a repeated Entry field (hot path: fields are set in place,
    which is several times faster with upb than building sub-messages)."""
    add = out.add
    for k, v in entries:
        if isinstance(v, Register):
            e = add(key=k)
            r = e.register
            t = r.ts
            ts = v.ts
            t.wall_ms = ts.wall_ms
            t.logical = ts.logical
            t.node = ts.node
            if v.value is None:
                r.tombstone = True
            else:
                r.value = v.value
        elif isinstance(v, Applied):
            a = add(key=k).applied
            t = a.ts
            ts = v.ts
            t.wall_ms = ts.wall_ms
            t.logical = ts.logical
            t.node = ts.node
            a.component = v.component
            a.op = v.op
            a.key = v.key
            if v.delta:
                a.delta = v.delta
            if v.num:
                a.num = v.num
            if v.digest:
                a.digest = v.digest
        else:
            add(key=k, counter=counter_to_pb(v))


def _members_to_pb(ms: tuple[Member, ...]) -> list[pb.Member]:
    return [
        pb.Member(node=m.node, state=_STATE_TO_PB[m.state], incarnation=m.incarnation) for m in ms
    ]


def _check_incarnation(i: int, what: str) -> int:
    if i > MAX_INCARNATION:
        raise CodecError(f"{what}: incarnation {i} beyond 2^62")
    return i


def _members_from_pb(ms: Any) -> tuple[Member, ...]:
    if len(ms) > MAX_UPDATES:
        raise CodecError(f"more than {MAX_UPDATES} membership updates")
    out = []
    for m in ms:
        state = _STATE_FROM_PB.get(m.state)
        if state is None:
            raise CodecError(f"unknown member state {m.state}")
        _check_node(m.node, "membership update")
        out.append(Member(m.node, state, _check_incarnation(m.incarnation, "membership update")))
    return tuple(out)


def _entries_from_pb(es: Any, what: str) -> tuple[Entry, ...]:
    if len(es) > MAX_LIST:
        raise CodecError(f"{what}: more than {MAX_LIST} entries")
    return tuple([entry_from_pb(e) for e in es])


def _indices(h: pb.AeHashes, what: str) -> tuple[int, ...]:
    """The (level, indices, hashes) of anti-entropy hashes, checked; returns indices."""
    if h.level > MAX_MERKLE_DEPTH:
        raise CodecError(f"{what}: level {h.level} deeper than {MAX_MERKLE_DEPTH}")
    if len(h.indices) > MAX_LIST:
        raise CodecError(f"{what}: more than {MAX_LIST} indices")
    indices = tuple(h.indices)
    hashes = h.hashes
    if len(indices) != len(hashes):
        raise CodecError(f"{what}: {len(indices)} indices but {len(hashes)} hashes")
    width = FANOUT**h.level
    prev = -1
    for i in indices:
        if not prev < i < width:
            raise CodecError(
                f"{what}: indices must increase strictly within level {h.level} (got {i})"
            )
        prev = i
    for x in hashes:
        if len(x) != HASH_BYTES:
            raise CodecError(f"{what}: a hash of {len(x)} bytes (not {HASH_BYTES})")
    return indices


def to_pb(m: Message) -> pb.GossipMessage:
    """The protobuf form of a core message."""
    out = pb.GossipMessage(sender=m.frm, to=m.to)
    if isinstance(m, Deltas):
        out.deltas.seq = m.seq
        out.deltas.complete = m.complete
        _add_entries(out.deltas.entries, m.entries)
    elif isinstance(m, DeltasAck):
        out.deltas_ack.seq = m.seq
    elif isinstance(m, AeRequest | AeResponse):
        h = out.ae_request if isinstance(m, AeRequest) else out.ae_response
        h.round, h.level = m.round, m.level
        h.indices.extend(m.indices)
        h.hashes.extend(m.hashes)
    elif isinstance(m, AeItems):
        it = out.ae_items
        it.round, it.reply = m.round, m.reply
        it.leaves.extend(m.leaves)
        _add_entries(it.items, m.items)
    elif isinstance(m, Ping):
        out.ping.CopyFrom(
            pb.Ping(
                seq=m.seq,
                incarnation=m.incarnation,
                gossip_updates=_members_to_pb(m.gossip_updates),
            )
        )
    elif isinstance(m, PingReq):
        out.ping_req.CopyFrom(
            pb.PingReq(seq=m.seq, target=m.target, gossip_updates=_members_to_pb(m.gossip_updates))
        )
    else:
        out.ack.CopyFrom(
            pb.Ack(
                seq=m.seq,
                node=m.node,
                incarnation=m.incarnation,
                gossip_updates=_members_to_pb(m.gossip_updates),
            )
        )
    return out


def from_pb(m: pb.GossipMessage) -> Message:
    """The core message of a protobuf; ``CodecError`` if it is malformed (module doc)."""
    frm, to = m.sender, m.to
    if not (0 < len(frm) <= _NODE_CHARS and 0 < len(to) <= _NODE_CHARS):
        _check_node(frm, "sender")
        _check_node(to, "receiver")
    kind = m.WhichOneof("body")
    if kind == "deltas":
        d = m.deltas
        return Deltas(frm, to, _entries_from_pb(d.entries, "deltas"), d.seq, d.complete)
    if kind == "deltas_ack":
        return DeltasAck(frm, to, m.deltas_ack.seq)
    if kind in ("ae_request", "ae_response"):
        h = m.ae_request if kind == "ae_request" else m.ae_response
        cls = AeRequest if kind == "ae_request" else AeResponse
        return cls(frm, to, h.round, h.level, _indices(h, kind), tuple(h.hashes))
    if kind == "ae_items":
        it = m.ae_items
        leaves = tuple(it.leaves)
        if len(leaves) > MAX_LIST:
            raise CodecError(f"ae_items: more than {MAX_LIST} cover codes")
        if leaves and max(leaves) >= _MAX_COVER_CODE:
            raise CodecError(f"ae_items: cover code {max(leaves)} beyond the deepest tree")
        items = _entries_from_pb(it.items, "ae_items")
        return AeItems(frm, to, it.round, leaves, items, it.reply)
    if kind == "ping":
        p = m.ping
        inc = _check_incarnation(p.incarnation, "ping")
        return Ping(frm, to, p.seq, inc, _members_from_pb(p.gossip_updates))
    if kind == "ping_req":
        q = m.ping_req
        _check_node(q.target, "ping_req target")
        return PingReq(frm, to, q.seq, q.target, _members_from_pb(q.gossip_updates))
    if kind == "ack":
        a = m.ack
        _check_node(a.node, "ack")
        inc = _check_incarnation(a.incarnation, "ack")
        return Ack(frm, to, a.seq, a.node, inc, _members_from_pb(a.gossip_updates))
    raise CodecError("message without a body")
