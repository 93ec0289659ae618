"""State-based CRDTs with delta-mutators (Almeida, Shoker, Baquero: delta-state CRDTs).

Theory of operation
-------------------
A replica's ``State`` maps a key to a value that is either

* a last-writer-wins ``Register(ts, value)`` (``value is None`` is a tombstone), ordered by
  its HLC timestamp ``ts`` (unique per write, so equal timestamps mean the same write); or
* a PN-``Counter(p, n)``: per-node monotone sums of increments (``p``) and decrements
  (``n``); value = sum(p) - sum(n).

Every value type is a join-semilattice and ``merge_*`` is its join (commutative,
associative, idempotent). ``merge_state`` is the pointwise join over keys (a missing key is
bottom).

Type conflicts. A key's type is fixed by its first write on a replica (the core refuses a
put/delete on a counter key and an increment on a register key, including a tombstoned
one). Two sides of a partition may still write different types to a key concurrently. The
join resolves this deterministically: **the counter wins** (every Register is below every
Counter in the lattice), so merging is still commutative/associative/idempotent. The
register writes lost this way are reported in ``ApplyResult.type_lost``.

Counter components. ``p``/``n`` are keyed by *component*: the node id, or ``node/epoch``
after the node lost its data (a wiped or corrupt disk), so a node never restarts a
component from 0 that other replicas hold higher (the join would discard its new
increments). Components are unbounded integers in memory and at most ``COMPONENT_MAX``
(2**127 - 1) on disk and on the wire: each increment adds at most 2**63, so 2**64
increments would be needed to reach it (the core refuses one that would). A counter's
*value* is exact; it can leave int64 only when increments legal on two sides of a
partition are merged (each side saw a value within int64). Reads then saturate (see
``saturate``).

Equal timestamps. A timestamp is unique per write, so two registers with the same ``ts``
are the same write; they differ only if one was corrupted or forged. The join must still
be deterministic (else replicas never agree): the larger BLAKE2b hash of the value wins,
which favours neither the larger value nor either side (the storage refuses corrupt
records by checksum, so a corrupt value never gets this far).

Delta-mutators return a one-key ``State`` (the delta). Joining the delta into the state
equals applying the mutation to the full state: ``merge_state(s, m_delta(s)) == m(s)``.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field

from gossip.hlc import Timestamp

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
COMPONENT_MAX = 2**127 - 1  # a counter component (per node total) on disk and on the wire


@dataclass(frozen=True, slots=True)
class Register:
    """LWW register. The write with the larger ``ts`` wins; ``value is None`` = deleted."""

    ts: Timestamp  # HLC timestamp of the write; unique per write
    value: bytes | None  # None = tombstone
    # ``encode_value``'s bytes, kept once computed (see ``encode_value``); not a part of
    # the value: no argument, no part of equality, hashing or ``repr``
    _enc: bytes | None = field(default=None, init=False, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Counter:
    """PN-counter. ``p[node]``/``n[node]`` are non-negative, only ever grow per node."""

    p: Mapping[str, int] = field(default_factory=dict)  # treat as immutable
    n: Mapping[str, int] = field(default_factory=dict)  # treat as immutable

    @property
    def value(self) -> int:
        """The counter's value: sum of increments minus sum of decrements."""
        return sum(self.p.values()) - sum(self.n.values())


@dataclass(frozen=True, slots=True)
class Applied:
    """One application of a client request (``client_id``, ``sequence``) on some node.

    Stored under ``applied_key(client_id, sequence)`` and replicated like any value, so a
    retry of the same request reaching another node is recognized there, and two
    applications made before either node heard of the other meet and are merged as one
    (see ``gossip/core.py``, "Exactly once"). Join: the earliest application wins.

    ``digest`` (``payload_digest``) tells a retry (same payload) from a request id reused
    for another payload with the same operation and key, which is refused. Empty for a
    delete (no payload) and in records written before it was kept: payload unknown, any
    retry of the operation and key is answered from the record, as it was then.
    """

    ts: Timestamp  # HLC timestamp of the application (that of the write it made)
    component: str  # counter component of the node that applied it
    op: str  # "put" | "delete" | "increment"
    key: str  # the key it wrote
    delta: int  # increment: the amount added; 0 otherwise
    num: int  # the answer: increment -> the counter after it; delete -> 1 if it existed
    digest: bytes = b""  # payload_digest of the request; b"": none (delete) or unknown
    _enc: bytes | None = field(default=None, init=False, repr=False, compare=False)  # see Register


DIGEST_BYTES = 8  # of a request's payload (``payload_digest``)
MAX_DIGEST_BYTES = 32  # the longest a peer may send (``gossip.codec``)


def payload_digest(op: str, value: bytes = b"", delta: int = 0) -> bytes:
    """A short, stable digest of what a request carries besides its operation and key:
    put: ``value``; increment: ``delta``; delete: nothing (b""). Every node
    and version computes the same bytes (a canonical encoding, as raft's)."""
    if op == "put":
        data = b"P" + value
    elif op == "increment":
        data = b"I" + delta.to_bytes(16, "big", signed=True)
    else:
        return b""
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


Value = Register | Counter | Applied
State = Mapping[str, Value]

# Keys of Applied records. Client keys never contain NUL (caplab.validation), so these
# never collide with them; ``is_reserved`` tells them apart.
APPLIED_PREFIX = "\x00rid\x00"


def applied_key(client_id: str, seq: int) -> str:
    """The key of the Applied record of request (client_id, seq)."""
    return f"{APPLIED_PREFIX}{client_id}\x00{seq:020d}"


def parse_applied_key(key: str) -> tuple[str, int] | None:
    """(client_id, seq) of an Applied record's key; None for any other key."""
    if not key.startswith(APPLIED_PREFIX):
        return None
    client, sep, seq = key[len(APPLIED_PREFIX) :].rpartition("\x00")
    if not sep or not seq.isdigit():
        return None
    return client, int(seq)


STABLE_PREFIX = "\x00stable\x00"


def stable_key(node: str) -> str:
    """The key of ``node``'s stable mark: a ``Register(ts, b"")`` whose ``ts`` is below
    every Applied record ``node`` wrote that some member may still lack (max-join: LWW)."""
    return STABLE_PREFIX + node


def is_reserved(key: str) -> bool:
    """A key the store keeps for itself (not a client key)."""
    return key.startswith("\x00")


class WrongTypeError(Exception):
    """An operation does not match the type the key already has."""

    def __init__(self, key: str, actual: str, op: str) -> None:
        super().__init__(f"key {key!r} holds a {actual}; {op} is not allowed on it")
        self.key = key
        self.actual = actual  # "register" | "counter"
        self.op = op


def type_name(v: Value) -> str:
    """``"register"``, ``"counter"`` or ``"record"`` (Applied)."""
    if isinstance(v, Applied):
        return "record"
    return "counter" if isinstance(v, Counter) else "register"


def _tie_key(r: Register) -> tuple[int, bytes]:
    # Equal ts: the same write, unless corrupted or forged. Deterministic, and blind to
    # which value is larger (see "Equal timestamps" above).
    if r.value is None:
        return (0, b"")
    return (1, hashlib.blake2b(r.value, digest_size=16).digest())


def merge_register(a: Register, b: Register) -> Register:
    """Join of two LWW registers: the one with the larger timestamp."""
    if a.ts != b.ts:
        return a if a.ts > b.ts else b
    if a.value == b.value:
        return a
    return a if _tie_key(a) >= _tie_key(b) else b


def _max_map(a: Mapping[str, int], b: Mapping[str, int]) -> Mapping[str, int]:
    if a is b or a == b:
        return a
    out = dict(a)
    for k, v in b.items():
        if v > out.get(k, v - 1):
            out[k] = v
    return out


def merge_counter(a: Counter, b: Counter) -> Counter:
    """Join of two PN-counters: pointwise maximum of ``p`` and ``n``."""
    p, n = _max_map(a.p, b.p), _max_map(a.n, b.n)
    if p is a.p and n is a.n:
        return a
    return Counter(p, n)


def merge_applied(a: Applied, b: Applied) -> Applied:
    """Join of two applications of one request: the earliest (timestamps are unique).

    Equal timestamps: the same application. A copy that lost its digest (relayed by a
    version that did not keep it) yields to one that has it; otherwise (corrupt or
    forged) the smaller encoding wins, deterministically."""
    if a.ts != b.ts:
        return a if a.ts < b.ts else b
    if a == b:  # the same application (the usual case: a copy met again)
        return a
    if bool(a.digest) != bool(b.digest):
        return a if a.digest else b
    return a if encode_value(a) <= encode_value(b) else b


def same_application(a: Applied, b: Applied) -> bool:
    """``a`` and ``b`` are copies of one application, but for a digest one of them lost
    (relayed by a version that did not keep it): not two applications to settle."""
    if a.ts != b.ts or (a.digest and b.digest and a.digest != b.digest):
        return False
    return (a.component, a.op, a.key, a.delta, a.num) == (b.component, b.op, b.key, b.delta, b.num)


_RANK = {Applied: 0, Register: 1, Counter: 2}


def merge_value(a: Value, b: Value) -> Value:
    """Join of two values of any type; a Counter beats a Register (type conflict rule),
    and both beat an Applied record (which only ever meets its own kind)."""
    if isinstance(a, Register) and isinstance(b, Register):
        return merge_register(a, b)
    if isinstance(a, Counter) and isinstance(b, Counter):
        return merge_counter(a, b)
    if isinstance(a, Applied) and isinstance(b, Applied):
        return merge_applied(a, b)
    return a if _RANK[type(a)] > _RANK[type(b)] else b


def merge_state(a: State, b: State) -> dict[str, Value]:
    """Pointwise join of two states (a new dict; inputs are not modified)."""
    out = dict(a)
    for k, v in b.items():
        cur = out.get(k)
        out[k] = v if cur is None else merge_value(cur, v)
    return out


@dataclass(slots=True)
class ApplyResult:
    """What ``apply_delta`` changed."""

    changed: dict[str, Value] = field(default_factory=dict)  # key -> new value
    old: dict[str, Value | None] = field(default_factory=dict)  # key -> value before
    # registers replaced by a register with a larger timestamp
    overwritten: list[tuple[str, Register]] = field(default_factory=list)
    # registers replaced by a counter (type conflict: the counter wins)
    type_lost: list[tuple[str, Register]] = field(default_factory=list)


def apply_delta(
    state: MutableMapping[str, Value], delta: Iterable[tuple[str, Value]]
) -> ApplyResult:
    """Join ``delta`` into ``state`` in place and report what changed."""
    res = ApplyResult()
    for k, v in delta:
        cur = state.get(k)
        if cur is v:
            continue  # (a value this replica holds, sent back to it)
        new = v if cur is None else merge_value(cur, v)
        if new is cur or new == cur:
            continue
        state[k] = new
        if k not in res.old:
            res.old[k] = cur
        res.changed[k] = new
        if isinstance(cur, Register):
            if isinstance(new, Register):
                res.overwritten.append((k, cur))
            else:
                res.type_lost.append((k, cur))
    return res


def put_delta(state: State, key: str, value: bytes, ts: Timestamp) -> dict[str, Value]:
    """Delta of ``put(key, value)`` at ``ts``. Raises ``WrongTypeError`` on a counter key."""
    cur = state.get(key)
    if isinstance(cur, Counter | Applied):
        raise WrongTypeError(key, type_name(cur), "put")
    return {key: Register(ts, value)}


def delete_delta(state: State, key: str, ts: Timestamp) -> dict[str, Value]:
    """Delta of ``delete(key)`` at ``ts`` (a tombstone). ``WrongTypeError`` on a counter."""
    cur = state.get(key)
    if isinstance(cur, Counter | Applied):
        raise WrongTypeError(key, type_name(cur), "delete")
    return {key: Register(ts, None)}


def saturate(value: int) -> int:
    """``value`` clamped to int64: what a read of a counter outside int64 returns."""
    return INT64_MAX if value > INT64_MAX else INT64_MIN if value < INT64_MIN else value


def increment_delta(state: State, key: str, node: str, delta: int) -> dict[str, Value]:
    """Delta of ``increment(key, delta)`` in component ``node`` (delta may be negative).

    Raises ``WrongTypeError`` if the key holds a register (live or tombstone). The delta
    carries only ``node``'s entry, so it is O(1) in size.
    """
    cur = state.get(key)
    if isinstance(cur, Register):
        raise WrongTypeError(key, "register", "increment")
    if isinstance(cur, Applied):
        raise WrongTypeError(key, "record", "increment")
    p = cur.p.get(node, 0) if cur is not None else 0
    n = cur.n.get(node, 0) if cur is not None else 0
    if delta >= 0:
        return {key: Counter({node: p + delta}, {node: n} if n else {})}
    return {key: Counter({node: p} if p else {}, {node: n - delta})}


_REG_HEAD = struct.Struct(">cqQI")  # tag, wall_ms, logical, len(node)
_REG_VAL = struct.Struct(">cI")  # present, len(value)
_APPLIED_HEAD = struct.Struct(">cqQ")  # tag, wall_ms, logical


def _enc_str(s: str) -> bytes:
    b = s.encode()
    return len(b).to_bytes(4, "big") + b


def _enc_bytes(b: bytes) -> bytes:
    return len(b).to_bytes(4, "big") + b


def encode_value(v: Value) -> bytes:
    """Canonical byte encoding of a value (equal values <=> equal bytes).

    Used for Merkle hashing, by the storage and for message size estimates: a write's
    value is encoded by the Merkle tree, the storage and the size estimate of every
    message it travels in, so a register or record keeps its encoding once computed
    (they are immutable; a counter's maps are only treated as immutable, so its
    encoding is computed each time; so is a large register's)."""
    if isinstance(v, Counter):
        return _encode_counter(v)
    enc = v._enc
    if enc is None:
        enc = _encode_register(v) if isinstance(v, Register) else _encode_applied(v)
        if len(enc) <= _KEEP_ENCODING_MAX:
            object.__setattr__(v, "_enc", enc)
    return enc


# A large value's encoding is not kept (it would double the memory the value takes; its
# cost is the copy, paid anyway).
_KEEP_ENCODING_MAX = 4096


def cached_encoding(v: Value) -> bytes | None:
    """``encode_value(v)`` if it was computed already, else None (never computes it)."""
    return None if isinstance(v, Counter) else v._enc


def _encode_register(v: Register) -> bytes:
    ts = v.ts
    node = ts.node.encode()
    head = _REG_HEAD.pack(b"R", ts.wall_ms, ts.logical, len(node)) + node
    if v.value is None:
        return head + b"\x00"
    return head + _REG_VAL.pack(b"\x01", len(v.value)) + v.value


def _encode_applied(v: Applied) -> bytes:
    ts = v.ts
    return b"".join(
        (
            _APPLIED_HEAD.pack(b"A", ts.wall_ms, ts.logical),
            _enc_str(ts.node),
            _enc_str(v.component),
            _enc_str(v.op),
            _enc_str(v.key),
            v.delta.to_bytes(16, "big", signed=True),
            v.num.to_bytes(16, "big", signed=True),
            # (only when there is one: a record without has its older encoding)
            _enc_bytes(v.digest) if v.digest else b"",
        )
    )


def _encode_counter(v: Counter) -> bytes:
    parts = [b"C"]
    for m in (v.p, v.n):
        items = sorted((k, a) for k, a in m.items() if a != 0)
        parts.append(len(items).to_bytes(4, "big"))
        for k, a in items:
            parts.append(_enc_str(k) + a.to_bytes(16, "big", signed=True))
    return b"".join(parts)


class DecodeError(ValueError):
    """Bytes that are not a value's canonical encoding."""


def _dec_str(buf: bytes, pos: int) -> tuple[str, int]:
    if pos + 4 > len(buf):
        raise DecodeError("truncated string length")
    end = pos + 4 + int.from_bytes(buf[pos : pos + 4], "big")
    if end > len(buf):
        raise DecodeError("truncated string")
    return buf[pos + 4 : end].decode(), end


def _dec_int128(buf: bytes, pos: int) -> tuple[int, int]:
    if pos + 16 > len(buf):
        raise DecodeError("truncated integer")
    return int.from_bytes(buf[pos : pos + 16], "big", signed=True), pos + 16


def decode_value(buf: bytes) -> Value:
    """Inverse of ``encode_value``; ``DecodeError`` on anything else."""
    try:
        tag = buf[:1]
        if tag == b"R":
            if len(buf) < _REG_HEAD.size:
                raise DecodeError("truncated register")
            _, wall, logical, n = _REG_HEAD.unpack_from(buf)
            pos = _REG_HEAD.size + n
            ts = Timestamp(wall, logical, buf[_REG_HEAD.size : pos].decode())
            if buf[pos : pos + 1] == b"\x00" and pos + 1 == len(buf):
                return Register(ts, None)
            if buf[pos : pos + 1] != b"\x01" or pos + 5 > len(buf):
                raise DecodeError("bad register")
            if pos + 5 + int.from_bytes(buf[pos + 1 : pos + 5], "big") != len(buf):
                raise DecodeError("register length mismatch")
            return Register(ts, buf[pos + 5 :])
        if tag == b"A":
            if len(buf) < _APPLIED_HEAD.size:
                raise DecodeError("truncated record")
            _, wall, logical = _APPLIED_HEAD.unpack_from(buf)
            node, pos = _dec_str(buf, _APPLIED_HEAD.size)
            component, pos = _dec_str(buf, pos)
            op, pos = _dec_str(buf, pos)
            key, pos = _dec_str(buf, pos)
            delta, pos = _dec_int128(buf, pos)
            num, pos = _dec_int128(buf, pos)
            digest = b""
            if pos != len(buf):  # (absent in records written before digests were kept)
                if pos + 4 > len(buf):
                    raise DecodeError("truncated digest length")
                end = pos + 4 + int.from_bytes(buf[pos : pos + 4], "big")
                if end != len(buf) or end == pos + 4:
                    raise DecodeError("record length mismatch")
                digest = buf[pos + 4 : end]
            ts = Timestamp(wall, logical, node)
            return Applied(ts, component, op, key, delta, num, digest)
        if tag == b"C":
            pos = 1
            maps: list[dict[str, int]] = []
            for _ in range(2):
                if pos + 4 > len(buf):
                    raise DecodeError("truncated counter")
                count = int.from_bytes(buf[pos : pos + 4], "big")
                pos += 4
                m: dict[str, int] = {}
                for _ in range(count):
                    k, pos = _dec_str(buf, pos)
                    m[k], pos = _dec_int128(buf, pos)
                maps.append(m)
            if pos != len(buf):
                raise DecodeError("counter length mismatch")
            return Counter(maps[0], maps[1])
    except (UnicodeDecodeError, struct.error) as e:
        raise DecodeError(str(e)) from e
    raise DecodeError(f"unknown value tag {buf[:1]!r}")
