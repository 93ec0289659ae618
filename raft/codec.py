"""Conversion between the core's message dataclasses and the caplab.raft.v1 protobufs.

Decoding validates like the client path does (defence in depth): a peer message is turned
into a core message only if correct Raft could have sent it, and every command it carries
is one the client path could have produced. Anything else raises ``CodecError`` (the
receiver drops that message, logs and counts it). What is checked:

* every message: ``sender`` and ``to`` are non-empty and at most ``MAX_NODE_ID_CHARS``
  characters; ``term`` and every index and term in the body are below ``MAX_INDEX`` (2^62);
  the body is a known one;
* Append: at most ``MAX_ENTRIES_PER_APPEND`` entries; ``prev_term <= term``, and
  ``prev_index`` is 0 exactly when ``prev_term`` is; the entries' indices are
  ``prev_index + 1, prev_index + 2, ...``; their terms are >= 1, >= ``prev_term``,
  non-decreasing and <= ``term``; their kind is NOOP (with no data) or COMMAND (whose data
  is a valid ``Command``: see ``check_command``);
* (Pre)Vote: nothing more (``last_term`` may exceed ``term``: a node whose last save was
  torn after its entries, before its HardState, restarts with an older term than its
  log's; refusing its votes could leave a cluster without a leader);
* InstallSnapshot (``snapshot_from_pb``): ``1 <= snapshot_term <= term``, ``index >= 1``.
  Its content is checked by the core (``RaftCore(snapshot_check=...)``), only when it
  would replace the state.

The core checks the Raft-level invariants again (a second leader in a term, TimeoutNow
from anybody but the leader, gaps): this module is about shape, the core about protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf.message import DecodeError

from caplab.errors import InvalidArgument
from caplab.raft.v1 import raft_pb2 as pb
from caplab.validation import (
    MAX_CLIENT_ID_BYTES,
    MAX_KEY_BYTES,
    MAX_VALUE_BYTES,
    check_key,
    check_request_id,
)
from raft.messages import (
    Append,
    AppendResp,
    Entry,
    EntryKind,
    InstallSnapshot,
    Message,
    PreVote,
    PreVoteResp,
    ReadIndex,
    ReadIndexResp,
    Snapshot,
    SnapshotMeta,
    TermProbe,
    TermProbeResp,
    TimeoutNow,
    Vote,
    VoteResp,
)

MAX_INDEX = 1 << 62  #: every term and log index on the wire is below this
MAX_NODE_ID_CHARS = 128
#: entries in one Append (RaftOptions.max_entries_per_msg must stay at or below it)
MAX_ENTRIES_PER_APPEND = 65_536


class CodecError(ValueError):
    """A peer message that cannot be a valid core message (dropped by the receiver)."""


# -- entries -----------------------------------------------------------------------------
_KINDS = (EntryKind.NOOP, EntryKind.COMMAND)
_parse_command = pb.Command.FromString
# Entry is a frozen slotted dataclass, whose __init__ sets each field through
# object.__setattr__ (~1 us per entry). Decoding builds entries through the slots'
# descriptors instead (same result, less than half the cost): it runs for every entry
# of every Append a follower receives.
_new_object = object.__new__


def _slot_setter(name: str) -> Callable[[Entry, Any], None]:
    setter: Callable[[Entry, Any], None] = vars(Entry)[name].__set__
    return setter


_set_term, _set_index, _set_kind, _set_data = map(_slot_setter, ("term", "index", "kind", "data"))
# Fast tests that imply the exact limits (the exact check runs only when they fail).
_KEY_CHARS_SURELY_OK = MAX_KEY_BYTES // 4  # at most 4 bytes of UTF-8 per character
_CLIENT_ID_CHARS_SURELY_OK = MAX_CLIENT_ID_BYTES // 4


def entry_to_pb(e: Entry) -> pb.Entry:
    return pb.Entry(term=e.term, index=e.index, kind=int(e.kind), data=e.data)


def entry_from_pb(e: pb.Entry) -> Entry:
    """One entry; only its kind is checked (``from_pb`` checks an Append's entries in context)."""
    kind = e.kind
    if kind > 1:
        raise CodecError(f"entry {e.index} has an unknown kind {kind}")
    return Entry(e.term, e.index, _KINDS[kind], e.data)


def check_command(data: bytes) -> None:
    """CodecError unless ``data`` is a serialized Command the client path could have
    produced: it decodes (strings are valid UTF-8), names an operation, its key obeys
    ``check_key``, its values are at most MAX_VALUE_BYTES, and its request id obeys
    ``check_request_id``. (An increment's delta is a sint64 on the wire: always within
    int64.) Append decoding runs the same checks inline (keep the two in step)."""
    try:
        c = _parse_command(data)
    except DecodeError as e:
        raise CodecError(f"undecodable command: {e}") from None
    key, client_id, sequence = c.key, c.client_id, c.sequence
    if (
        not 0 < len(key) <= _KEY_CHARS_SURELY_OK
        or "\x00" in key
        or (
            (sequence < 1 or len(client_id) > _CLIENT_ID_CHARS_SURELY_OK) if client_id else sequence
        )
        or not c.HasField("put")
        or len(data) > MAX_VALUE_BYTES
    ):
        _check_command_slowly(c, len(data))


def _check_command_slowly(c: pb.Command, size: int) -> None:
    """The exact checks of ``check_command`` (the fast test above was inconclusive)."""
    try:
        check_key(c.key)
        check_request_id(c.client_id, c.sequence)
    except InvalidArgument as e:
        raise CodecError(f"command: {e.message}") from None
    op = c.WhichOneof("op")
    if op is None:
        raise CodecError("command names no operation")
    if size <= MAX_VALUE_BYTES:
        return
    if op == "put":
        values = [c.put]
    elif op == "cas":
        values = [c.cas.expected, c.cas.new_value]
    else:
        return
    if any(len(v) > MAX_VALUE_BYTES for v in values):
        raise CodecError(f"command: a value is more than {MAX_VALUE_BYTES} bytes")


def _entries_from_pb(a: pb.Append, term: int) -> tuple[Entry, ...]:
    """The entries of Append ``a`` (at ``term``), checked: see the module docstring."""
    pbents = a.entries
    if not pbents:
        return ()
    prev_index, prev_term = a.prev_index, a.prev_term
    if len(pbents) > MAX_ENTRIES_PER_APPEND:
        raise CodecError(f"append carries {len(pbents)} entries (at most {MAX_ENTRIES_PER_APPEND})")
    if prev_index + len(pbents) >= MAX_INDEX:
        raise CodecError("append reaches beyond index 2^62")
    out: list[Entry] = []
    add = out.append
    index = prev_index
    floor = prev_term or 1  # entry terms: >= 1, >= prev_term, non-decreasing, <= term
    # one Command parsed into again and again: half the cost of a new one per entry
    c = pb.Command()
    parse, command, noop = c.ParseFromString, EntryKind.COMMAND, EntryKind.NOOP
    new, set_term, set_index, set_kind, set_data = (
        _new_object,
        _set_term,
        _set_index,
        _set_kind,
        _set_data,
    )
    for pe in pbents:
        index += 1
        t = pe.term
        if pe.index != index:
            raise CodecError(
                f"append after {prev_index}: entry {index - prev_index} has index {pe.index}, "
                f"not {index}"
            )
        if not floor <= t <= term:
            raise CodecError(
                f"append at term {term}: entry {index} has term {t} (expected {floor}..{term})"
            )
        floor = t
        data = pe.data
        if pe.kind == 1:
            kind = command
            # check_command(data), inline: this loop runs for every replicated entry
            try:
                parse(data)
            except DecodeError as err:
                raise CodecError(f"entry {index}: undecodable command: {err}") from None
            key, client_id, sequence = c.key, c.client_id, c.sequence
            if (
                not 0 < len(key) <= _KEY_CHARS_SURELY_OK
                or "\x00" in key
                or (
                    (sequence < 1 or len(client_id) > _CLIENT_ID_CHARS_SURELY_OK)
                    if client_id
                    else sequence
                )
                or not c.HasField("put")
                or len(data) > MAX_VALUE_BYTES
            ):
                try:
                    _check_command_slowly(c, len(data))
                except CodecError as err:
                    raise CodecError(f"entry {index}: {err}") from None
        elif pe.kind != 0:
            raise CodecError(f"entry {index} has an unknown kind {pe.kind}")
        elif data:
            raise CodecError(f"no-op entry {index} carries data")
        else:
            kind = noop
        e = new(Entry)
        set_term(e, t)
        set_index(e, index)
        set_kind(e, kind)
        set_data(e, data)
        add(e)
    return tuple(out)


# -- messages ------------------------------------------------------------------------------
def to_pb(m: Message) -> pb.RaftMessage:
    """Every message but InstallSnapshot (which travels chunked on its own RPC)."""
    out = pb.RaftMessage(sender=m.frm, to=m.to, term=m.term)
    if isinstance(m, Append):
        out.append.CopyFrom(
            pb.Append(
                prev_index=m.prev_index,
                prev_term=m.prev_term,
                entries=[entry_to_pb(e) for e in m.entries],
                commit=m.commit,
                ctx=m.ctx,
            )
        )
    elif isinstance(m, AppendResp):
        out.append_response.CopyFrom(
            pb.AppendResponse(
                reject=m.reject,
                index=m.index,
                hint_index=m.hint_index,
                hint_term=m.hint_term,
                ctx=m.ctx,
            )
        )
    elif isinstance(m, PreVote):
        out.pre_vote.CopyFrom(pb.PreVote(last_index=m.last_index, last_term=m.last_term))
    elif isinstance(m, PreVoteResp):
        out.pre_vote_response.CopyFrom(pb.PreVoteResponse(reject=m.reject, blank=m.blank))
    elif isinstance(m, Vote):
        out.vote.CopyFrom(
            pb.Vote(last_index=m.last_index, last_term=m.last_term, transfer=m.transfer)
        )
    elif isinstance(m, VoteResp):
        out.vote_response.CopyFrom(pb.VoteResponse(reject=m.reject, blank=m.blank))
    elif isinstance(m, TimeoutNow):
        out.timeout_now.CopyFrom(pb.TimeoutNow())
    elif isinstance(m, ReadIndex):
        out.read_index.CopyFrom(pb.ReadIndex(ctx=m.ctx))
    elif isinstance(m, ReadIndexResp):
        out.read_index_response.CopyFrom(pb.ReadIndexResponse(ctx=m.ctx, index=m.index))
    elif isinstance(m, TermProbe):
        out.term_probe.CopyFrom(pb.TermProbe(nonce=m.nonce))
    elif isinstance(m, TermProbeResp):
        out.term_probe_response.CopyFrom(pb.TermProbeResponse(nonce=m.nonce))
    else:
        raise TypeError(f"cannot encode {type(m).__name__} as a stream message")
    return out


def _check_header(frm: str, to: str, term: int) -> None:
    if not 0 < len(frm) <= MAX_NODE_ID_CHARS:
        raise CodecError(f"sender id must be 1..{MAX_NODE_ID_CHARS} characters")
    if not 0 < len(to) <= MAX_NODE_ID_CHARS:
        raise CodecError(f"recipient id must be 1..{MAX_NODE_ID_CHARS} characters")
    if term >= MAX_INDEX:
        raise CodecError(f"term {term} is beyond 2^62")


def _below(what: str, *values: int) -> None:
    for v in values:
        if v >= MAX_INDEX:
            raise CodecError(f"{what}: {v} is beyond 2^62")


def from_pb(m: pb.RaftMessage) -> Message:
    """The core message for ``m``; CodecError if it is malformed (module docstring)."""
    frm, to, term = m.sender, m.to, m.term
    _check_header(frm, to, term)
    body = m.WhichOneof("body")
    if body == "append":
        a = m.append
        prev_index, prev_term, commit = a.prev_index, a.prev_term, a.commit
        if prev_index >= MAX_INDEX or commit >= MAX_INDEX:
            raise CodecError(f"append: prev_index {prev_index} or commit {commit} beyond 2^62")
        if prev_term > term or (prev_index == 0) != (prev_term == 0):
            raise CodecError(
                f"append at term {term}: impossible prev_index {prev_index} / prev_term {prev_term}"
            )
        return Append(
            frm, to, term, prev_index, prev_term, _entries_from_pb(a, term), commit, a.ctx
        )
    if body == "append_response":
        r = m.append_response
        _below("append response", r.index, r.hint_index, r.hint_term)
        return AppendResp(frm, to, term, r.reject, r.index, r.hint_index, r.hint_term, r.ctx)
    if body == "pre_vote" or body == "vote":
        v = m.pre_vote if body == "pre_vote" else m.vote
        _below(body, v.last_index, v.last_term)
        if body == "pre_vote":
            return PreVote(frm, to, term, v.last_index, v.last_term)
        return Vote(frm, to, term, v.last_index, v.last_term, m.vote.transfer)
    if body == "pre_vote_response":
        r3 = m.pre_vote_response
        return PreVoteResp(frm, to, term, r3.reject, r3.blank)
    if body == "vote_response":
        r4 = m.vote_response
        return VoteResp(frm, to, term, r4.reject, r4.blank)
    if body == "timeout_now":
        return TimeoutNow(frm, to, term)
    if body == "read_index":
        return ReadIndex(frm, to, term, m.read_index.ctx)
    if body == "read_index_response":
        r2 = m.read_index_response
        _below("read index response", r2.index)
        return ReadIndexResp(frm, to, term, r2.ctx, r2.index)
    if body == "term_probe":
        return TermProbe(frm, to, term, m.term_probe.nonce)
    if body == "term_probe_response":
        return TermProbeResp(frm, to, term, m.term_probe_response.nonce)
    raise CodecError(f"raft message from {frm!r} has no known body ({body!r})")


def snapshot_from_pb(first: pb.SnapshotChunk, data: bytes) -> InstallSnapshot:
    """The InstallSnapshot for a reassembled snapshot (``first``: its first chunk, which
    carries the header), its header checked. Its content is checked by the core."""
    term, index, snap_term = first.term, first.index, first.snapshot_term
    _check_header(first.sender, first.to, term)
    if not 1 <= index < MAX_INDEX or not 1 <= snap_term <= term:
        raise CodecError(
            f"snapshot at term {term}: impossible index {index} / snapshot term {snap_term}"
        )
    return InstallSnapshot(
        first.sender, first.to, term, Snapshot(SnapshotMeta(index, snap_term), data)
    )
