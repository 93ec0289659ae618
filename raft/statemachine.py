"""The replicated key/value state machine of the Raft store.

Theory of operation: every replica applies the same committed log entries in
the same order, so this class must be deterministic: no clocks, no randomness,
no iteration over unordered containers where order matters. A command carries
(client_id, sequence); the session table remembers, per client, the results of
its last `window` applied sequences, so that a retried command is applied at
most once and answered with the original result (Raft thesis §6.3), even when
the client has several requests in flight that arrive out of order. A sequence
at or below the session's low-water mark (evicted from the window) is refused
as too old (it may or may not have been applied; the client has long given up
on it). A cached result remembers the operation (put, delete, cas, increment) and
the key of its request: a command reusing the request id of another operation or key is
refused (status REUSED, FAILED_PRECONDITION; not applied), not answered with the other
request's result. So is one reusing it for the same operation and key with another
payload: a cached result also keeps a short digest of its request's payload
(``payload_digest``: the value, the delta, the compare-and-swap's operands; none for a
delete). An empty digest (a result restored from a snapshot taken before digests were
kept) means "payload unknown": any retry of that operation and key is answered from it,
as it was then. Like everything here it depends on the replicated state only (the digest
is computed from the committed command), so every replica decides alike. The table is
part of the snapshot, so deduplication survives compaction and restarts. Sessions are
evicted deterministically (least recent last_index first, ties by client id) once there
are more than `max_sessions`.

The state digest is an XOR of SHA-256 hashes of (key, type, value), updated in
O(1) per change: two replicas have equal digests iff their key/value states are
equal (up to hash collisions).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from caplab.errors import InvalidArgument, OutOfRange
from caplab.raft.v1 import raft_pb2
from caplab.validation import (
    MAX_VALUE_BYTES,
    check_counter_result,
    check_key,
    check_request_id,
)

OK, TYPE_CONFLICT, OVERFLOW, STALE, REUSED = 0, 1, 2, 3, 4
# How a refusal names an operation (the Command's oneof names), as gossip does.
OP_NAMES = {"put": "put", "delete": "delete", "cas": "compare-and-swap", "increment": "increment"}
DEFAULT_MAX_SESSIONS = 20_000
DEFAULT_WINDOW = 128  # results remembered per client: its max requests in flight
DIGEST_BYTES = 8  # of a request's payload (``payload_digest``)
MAX_DIGEST_BYTES = 32  # the longest a snapshot may carry (``check_snapshot``)
# What a refusal says differs when only the payload does, per operation.
_OTHER_PAYLOAD = {
    "put": "another value",
    "increment": "another delta",
    "cas": "other operands",
}


@dataclass(frozen=True, slots=True)
class Applied:
    """A request applied for a client: what it was and what it answered."""

    op: str  # the Command's oneof name; "" if restored from a snapshot that lacked it
    key: str
    result: raft_pb2.CommandResult
    digest: bytes = b""  # payload_digest of the request; b"": unknown (or a delete)


@dataclass(slots=True)
class Session:
    low: int  # sequences <= low are too old to deduplicate: refused
    results: dict[int, Applied]  # sequence -> its request and result, newest `window`
    last_index: int  # log index of the last command applied for this client


@dataclass(slots=True)
class Slot:
    value: bytes | int  # bytes: register, int: counter
    index: int  # log index of the last change
    h: int = 0  # _key_hash(key, value): its share of the state digest (kept, not recomputed)


_sha256 = hashlib.sha256


def payload_digest(cmd: raft_pb2.Command) -> bytes:
    """A short, stable digest of what ``cmd`` carries besides its operation and key:
    put: the value; increment: the delta; cas: whether the key must be absent, the
    expected value and the new value; delete: nothing (b""). Equal payloads, equal
    digests, on every replica and version (a canonical encoding, not protobuf's)."""
    op = cmd.WhichOneof("op")
    if op == "put":
        data = b"P" + cmd.put
    elif op == "increment":
        data = b"I" + cmd.increment.to_bytes(16, "big", signed=True)
    elif op == "cas":
        c = cmd.cas
        expected = b"\x00" if c.expected_absent else b"\x01" + _len_prefixed(c.expected)
        data = b"C" + expected + c.new_value
    else:
        return b""
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


def _len_prefixed(b: bytes) -> bytes:
    return len(b).to_bytes(4, "big") + b


def _key_hash(key: str, value: bytes | int) -> int:
    """SHA-256 of (4-byte key length, key, b"R" + value | b"C" + 8-byte counter)."""
    kb = key.encode()
    if isinstance(value, bytes):
        tail = b"R" + value
    else:
        tail = b"C" + value.to_bytes(8, "big", signed=True)
    return int.from_bytes(_sha256(len(kb).to_bytes(4, "big") + kb + tail).digest(), "big")


class KvStateMachine:
    def __init__(
        self, max_sessions: int = DEFAULT_MAX_SESSIONS, window: int = DEFAULT_WINDOW
    ) -> None:
        self.data: dict[str, Slot] = {}
        self.sessions: dict[str, Session] = {}
        self.max_sessions = max_sessions
        self.window = window
        self._digest = 0

    # -- reads ---------------------------------------------------------------
    def get(self, key: str) -> bytes | int | None:
        slot = self.data.get(key)
        return None if slot is None else slot.value

    def digest(self) -> bytes:
        return self._digest.to_bytes(32, "big")

    def __len__(self) -> int:
        return len(self.data)

    # -- writes --------------------------------------------------------------
    def _set(self, key: str, value: bytes | int, index: int) -> None:
        old = self.data.get(key)
        h = _key_hash(key, value)
        if old is not None:
            self._digest ^= old.h
        self.data[key] = Slot(value, index, h)
        self._digest ^= h

    def _del(self, key: str) -> bool:
        old = self.data.pop(key, None)
        if old is None:
            return False
        self._digest ^= old.h
        return True

    def apply(self, index: int, payload: bytes) -> raft_pb2.CommandResult:
        """Apply the command in the log entry at `index`; return its (possibly cached) result."""
        cmd = raft_pb2.Command.FromString(payload)
        op = cmd.WhichOneof("op") or ""
        session = self.sessions.get(cmd.client_id) if cmd.client_id else None
        if session is not None:
            cached = session.results.get(cmd.sequence)
            if cached is not None:
                if cached.op and (cached.op != op or cached.key != cmd.key):
                    return _reused(cmd, cached)
                if cached.digest and cached.digest != payload_digest(cmd):
                    return _reused(cmd, cached, other_payload=True)
                return cached.result
            if cmd.sequence <= session.low:
                return raft_pb2.CommandResult(
                    status=STALE,
                    message=f"request {cmd.client_id}/{cmd.sequence} is too old to tell whether "
                    f"it was applied (this client has had more than {self.window} newer requests "
                    "applied since); it was not applied now",
                )
        result = self._execute(cmd, index)
        if cmd.client_id:
            if session is None:
                session = self.sessions[cmd.client_id] = Session(0, {}, index)
                if len(self.sessions) > self.max_sessions:
                    victim = min(self.sessions.items(), key=lambda kv: (kv[1].last_index, kv[0]))
                    del self.sessions[victim[0]]
            session.results[cmd.sequence] = Applied(op, cmd.key, result, payload_digest(cmd))
            session.last_index = index
            if len(session.results) > self.window:
                oldest = min(session.results)
                del session.results[oldest]
                session.low = max(session.low, oldest)
        return result

    def _execute(self, cmd: raft_pb2.Command, index: int) -> raft_pb2.CommandResult:
        key = cmd.key
        cur = self.get(key)
        op = cmd.WhichOneof("op")
        if op == "put":
            if isinstance(cur, int):
                return _conflict(key, "counter", "Put")
            self._set(key, cmd.put, index)
            return raft_pb2.CommandResult(status=OK)
        if op == "delete":
            return raft_pb2.CommandResult(status=OK, flag=self._del(key))
        if op == "cas":
            if isinstance(cur, int):
                return _conflict(key, "counter", "CompareAndSwap")
            c = cmd.cas
            matches = cur is None if c.expected_absent else cur == c.expected
            if matches:
                self._set(key, c.new_value, index)
            return raft_pb2.CommandResult(
                status=OK, flag=matches, found=cur is not None, current=cur or b""
            )
        if op == "increment":
            if isinstance(cur, bytes):
                return _conflict(key, "register", "Increment")
            try:
                new = check_counter_result(cur or 0, cmd.increment, key)
            except OutOfRange as e:
                return raft_pb2.CommandResult(status=OVERFLOW, message=e.message)
            self._set(key, new, index)
            return raft_pb2.CommandResult(status=OK, counter=new)
        raise ValueError(f"log entry {index} holds an unknown command {op!r}")

    # -- snapshots -----------------------------------------------------------
    def snapshot(self) -> bytes:
        snap = raft_pb2.StateSnapshot()
        for key, slot in self.data.items():
            v = snap.data[key]
            if isinstance(slot.value, bytes):
                v.register = slot.value
            else:
                v.counter = slot.value
            v.index = slot.index
        for client_id in sorted(self.sessions):
            sess = self.sessions[client_id]
            snap.sessions.add(
                client_id=client_id,
                low=sess.low,
                results=[
                    raft_pb2.SessionResult(
                        sequence=q, result=a.result, op=a.op, key=a.key, digest=a.digest
                    )
                    for q, a in sorted(sess.results.items())
                ],
                last_index=sess.last_index,
            )
        return snap.SerializeToString(deterministic=True)

    def restore(self, data: bytes) -> None:
        snap = raft_pb2.StateSnapshot.FromString(data)
        self.data.clear()
        self.sessions.clear()
        self._digest = 0
        for key in sorted(snap.data):
            v = snap.data[key]
            value: bytes | int = v.register if v.WhichOneof("v") == "register" else v.counter
            self._set(key, value, v.index)
        for s in snap.sessions:
            self.sessions[s.client_id] = Session(
                s.low,
                {r.sequence: Applied(r.op, r.key, r.result, r.digest) for r in s.results},
                s.last_index,
            )


def check_snapshot(data: bytes) -> None:
    """ValueError (the reason) unless ``data`` is a state snapshot ``restore`` may install:
    it decodes (strings are valid UTF-8), every key obeys ``check_key`` and holds a
    register of at most MAX_VALUE_BYTES or a counter (a sint64: always within int64), and
    every session's client id obeys ``check_request_id`` (non-empty, at most
    MAX_CLIENT_ID_BYTES), and every cached result names a known operation, a key obeying
    ``check_key`` when it does, and a payload digest of at most MAX_DIGEST_BYTES. Run on
    a snapshot received from a peer before it replaces the state (RaftCore's
    ``snapshot_check``)."""
    try:
        snap = raft_pb2.StateSnapshot.FromString(data)
    except DecodeError as e:
        raise ValueError(f"undecodable state snapshot: {e}") from None
    try:
        for key, v in snap.data.items():
            check_key(key)
            which = v.WhichOneof("v")
            if which is None:
                raise ValueError(f"key {key!r} holds no value")
            if which == "register" and len(v.register) > MAX_VALUE_BYTES:
                raise ValueError(f"key {key!r} holds more than {MAX_VALUE_BYTES} bytes")
        for s in snap.sessions:
            if not s.client_id:
                raise ValueError("a session has no client id")
            check_request_id(s.client_id, 1)
            for r in s.results:
                if r.op and r.op not in OP_NAMES:
                    raise ValueError(f"a session result names an unknown operation {r.op!r}")
                if r.op:
                    check_key(r.key)
                if len(r.digest) > MAX_DIGEST_BYTES:
                    raise ValueError(
                        f"a session result's payload digest is longer than {MAX_DIGEST_BYTES} bytes"
                    )
    except InvalidArgument as e:
        raise ValueError(f"state snapshot: {e.message}") from None


def _reused(
    cmd: raft_pb2.Command, cached: Applied, other_payload: bool = False
) -> raft_pb2.CommandResult:
    """The refusal of a command whose request id an earlier, different request used (the
    message as gossip's, naming what the id was used for): another operation or key, or
    (``other_payload``) the same operation and key with another payload."""
    used = OP_NAMES.get(cached.op, cached.op)
    what = f"{'an' if used[:1] in tuple('aeiou') else 'a'} {used} of key {cached.key!r}"
    if other_payload:
        what += f" with {_OTHER_PAYLOAD.get(cached.op, 'another payload')}"
    elif cached.op == (cmd.WhichOneof("op") or ""):
        what += f" (not {cmd.key!r})"
    return raft_pb2.CommandResult(
        status=REUSED,
        message=f"request sequence {cmd.sequence} of client {cmd.client_id!r} was already "
        f"used for {what}; not applied (use a new sequence for a new request)",
    )


def _conflict(key: str, holds: str, op: str) -> raft_pb2.CommandResult:
    fix = "use Increment and Get" if holds == "counter" else "use Put, Get and CompareAndSwap"
    return raft_pb2.CommandResult(
        status=TYPE_CONFLICT,
        message=f"key {key!r} holds a {holds}; {op} cannot change it ({fix}, or Delete it first)",
    )
