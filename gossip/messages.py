"""Peer protocol messages of the gossip store (sans-IO; the shell maps them to protobuf).

Every message carries ``frm`` (sender node id) and ``to`` (destination node id). Fields
use plain types only (str, int, bytes, tuples, and the frozen dataclasses ``Register``,
``Counter``, ``Timestamp`` and ``Member``), so the shell can translate them 1:1.

Delivery contract: the network may drop, duplicate, delay and reorder any message; every
handler is idempotent and tolerates stale messages.

``wire_size`` is the documented byte estimate used for the bytes counters and the
anti-entropy cost tests: 16 bytes of header (kind + ``frm``/``to`` ids are counted at
their UTF-8 length + 2), ints 8 bytes, bytes/str their length + 2, tuples the sum of their
elements + 2, a CRDT value the length of ``crdt.encode_value``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass

from gossip.crdt import Applied, Counter, Register, Value, cached_encoding

ALIVE = "alive"
SUSPECT = "suspect"
DEAD = "dead"
MEMBER_STATES = (ALIVE, SUSPECT, DEAD)
# The largest SWIM incarnation a peer may state (gossip.codec refuses more; membership
# also refuses a suspect/dead claim at it, which could not be refuted: see
# gossip.membership, "Bounded incarnations"). Far below the wire's 2**64 - 1, so that a
# refutation (claim + 1) always fits.
MAX_INCARNATION = 2**62

Entry = tuple[str, Value]  # (key, CRDT value): a one-key delta / state fragment


@dataclass(frozen=True, slots=True)
class Member:
    """A SWIM membership update, piggybacked on pings and acks."""

    node: str
    state: str  # "alive" | "suspect" | "dead"
    # Set only by ``node`` itself (refutation bumps it). For the same node: alive(i)
    # overrides suspect/dead(j) iff i > j; suspect(i) overrides alive(j) iff i >= j;
    # dead(i) overrides alive/suspect(j) iff i >= j.
    incarnation: int


@dataclass(frozen=True, slots=True)
class Deltas:
    """Delta gossip: joined state of keys changed since the receiver's last ack."""

    frm: str
    to: str
    entries: tuple[Entry, ...]  # at most one entry per key; each is the sender's current value
    # The sender's delta-log sequence number of the newest entry included. The receiver
    # answers DeltasAck(seq) after joining (and persisting) all entries.
    seq: int
    # True only if, once the receiver joined these entries, it holds everything the
    # sender's log held when it sent them: the batch starts where the receiver's
    # acknowledgements end (nothing in flight before it) and reaches the log's head. Only
    # such a batch counts as a sync for bounded-staleness reads (``last_sync_ms``).
    complete: bool = False


@dataclass(frozen=True, slots=True)
class DeltasAck:
    """The receiver of ``Deltas(seq)`` has joined and persisted every entry in it."""

    frm: str
    to: str
    seq: int  # echo of Deltas.seq; acks are cumulative per (sender, receiver) pair


@dataclass(frozen=True, slots=True)
class AeRequest:
    """Anti-entropy step, initiator -> responder: "these are my hashes of these nodes"."""

    frm: str
    to: str
    round: int  # initiator's round id, echoed by every reply of the round
    level: int  # 0 = root, ``depth`` = leaves (depth is fixed cluster-wide)
    indices: tuple[int, ...]  # node indices at ``level``; strictly increasing
    hashes: tuple[bytes, ...]  # same length as ``indices``: sender's hash of each node


@dataclass(frozen=True, slots=True)
class AeResponse:
    """Anti-entropy step, responder -> initiator; same contract as ``AeRequest``.

    Empty ``indices`` means "no difference left": the round ends in sync.
    """

    frm: str
    to: str
    round: int
    level: int
    indices: tuple[int, ...]
    hashes: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class AeItems:
    """Anti-entropy items of differing leaves (push-pull).

    ``reply=True``: the receiver joins ``items`` and answers with ``AeItems(reply=False)``
    holding its entries of ``leaves`` that the sender lacks or has older, so both sides
    end with the join.
    """

    frm: str
    to: str
    round: int
    # Covered parts of the key space: a leaf index (< 16**depth), or a whole subtree coded
    # as ``MerkleTree.cover_code(level, index)`` (>= 16**depth; bulk anti-entropy).
    # A reply (reply=False) echoes the request's ``leaves``.
    leaves: tuple[int, ...]
    items: tuple[Entry, ...]  # all of the sender's entries in ``leaves`` (reply=True) or a subset
    reply: bool


@dataclass(frozen=True, slots=True)
class Ping:
    """SWIM direct probe; answered by ``Ack(seq)``."""

    frm: str
    to: str
    seq: int  # sender-local probe number
    incarnation: int  # sender's own incarnation
    gossip_updates: tuple[Member, ...]


@dataclass(frozen=True, slots=True)
class PingReq:
    """SWIM indirect probe: "please ping ``target`` and forward its Ack(seq) to me"."""

    frm: str
    to: str
    seq: int  # requester's probe number, echoed in the forwarded Ack
    target: str
    gossip_updates: tuple[Member, ...]


@dataclass(frozen=True, slots=True)
class Ack:
    """SWIM acknowledgement: ``node`` was alive with ``incarnation`` (direct or forwarded)."""

    frm: str
    to: str
    seq: int  # the seq of the Ping or PingReq being answered
    node: str  # the node proven alive (== frm for a direct ack)
    incarnation: int
    gossip_updates: tuple[Member, ...]


Message = Deltas | DeltasAck | AeRequest | AeResponse | AeItems | Ping | PingReq | Ack


def _value_size(v: Value) -> int:
    """``len(encode_value(v))`` without encoding (hot path: every entry of every message)."""
    enc = cached_encoding(v)
    if enc is not None:
        return len(enc)
    if isinstance(v, Register):
        n = 22 + len(v.ts.node.encode())
        return n if v.value is None else n + 4 + len(v.value)
    if isinstance(v, Applied):
        n = 65 + sum(len(x.encode()) for x in (v.ts.node, v.component, v.op, v.key))
        return n + 4 + len(v.digest) if v.digest else n
    n = 9
    for m in (v.p, v.n):
        for k, a in m.items():
            if a != 0:
                n += 20 + len(k.encode())
    return n


def entry_size(key: str, v: Value) -> int:
    """Estimated bytes of one entry in a message (as counted by ``wire_size``)."""
    return 4 + len(key.encode()) + _value_size(v)


def _entries_size(entries: tuple[Entry, ...]) -> int:
    # each entry is a (key, value) tuple: 2 + (len(key) + 2) + value
    return 2 + sum(4 + len(k.encode()) + _value_size(v) for k, v in entries)


def _size(x: object) -> int:
    if isinstance(x, bool | int):
        return 8
    if isinstance(x, str):
        return len(x.encode()) + 2
    if isinstance(x, bytes):
        return len(x) + 2
    if isinstance(x, Register | Counter | Applied):
        return _value_size(x)
    if isinstance(x, tuple):
        return 2 + sum(_size(e) for e in x)
    if is_dataclass(x):
        return sum(_size(getattr(x, f.name)) for f in fields(x))
    raise TypeError(f"cannot size {type(x).__name__}")


def wire_size(msg: Message) -> int:
    """Estimated encoded size of ``msg`` in bytes (see module docstring)."""
    if isinstance(msg, Deltas):
        return 16 + _size(msg.frm) + _size(msg.to) + _entries_size(msg.entries) + 8
    if isinstance(msg, AeItems):
        return (
            16
            + _size(msg.frm)
            + _size(msg.to)
            + 8
            + 2
            + 8 * len(msg.leaves)
            + _entries_size(msg.items)
            + 8
        )
    return 16 + _size(msg)
