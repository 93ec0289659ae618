"""Raft wire-level value types: log entries, durable state, snapshots and messages.

Every type is an immutable, slotted dataclass so the sans-IO core can hand them to the
shell (which serializes them, e.g. to protobuf) without defensive copies.

Common message contract: every message carries ``frm`` (sender id), ``to`` (recipient id)
and ``term`` (the sender's current term, except where noted). A receiver first compares
``term`` with its own term (higher: adopt it; lower: drop or answer with its own term) and
only then interprets the message body.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Union


class EntryKind(IntEnum):
    """Kind of a log entry."""

    NOOP = 0  #: appended by every new leader; commits the leader's term (Raft §5.4.2).
    COMMAND = 1  #: an opaque application command, applied to the state machine.


@dataclass(frozen=True, slots=True)
class Entry:
    """One log entry."""

    term: int  #: term of the leader that created the entry; >= 1; never changes.
    index: int  #: position in the log, 1-based; dense (no gaps) within one log.
    kind: EntryKind  #: NOOP entries carry empty ``data`` and must be skipped by the app.
    data: bytes  #: opaque application payload (COMMAND) or b"" (NOOP).


@dataclass(frozen=True, slots=True)
class HardState:
    """State that must be durable (fsync) before any message that depends on it is sent."""

    term: int  #: latest term this node has seen; never decreases.
    vote: str | None  #: candidate voted for in ``term`` (None: no vote yet in this term).
    commit: int  #: highest index known committed; never decreases. May be persisted lazily.


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    """Position of a snapshot in the log."""

    index: int  #: last log index covered by the snapshot (the state after applying it).
    term: int  #: term of the entry at ``index``.


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An application state-machine snapshot plus the log position it reflects."""

    meta: SnapshotMeta
    data: bytes  #: opaque, produced and consumed by the application only.


@dataclass(frozen=True, slots=True)
class PreVote:
    """Pre-vote request (Raft thesis §9.6). Does not change anybody's term.

    ``term`` is the term the sender *would* campaign in (its current term + 1).
    """

    frm: str
    to: str
    term: int
    last_index: int  #: index of the sender's last log entry.
    last_term: int  #: term of the sender's last log entry.


@dataclass(frozen=True, slots=True)
class PreVoteResp:
    """Answer to PreVote. When granted, ``term`` echoes the PreVote's term."""

    frm: str
    to: str
    term: int
    reject: bool  #: False: the sender would vote for the pre-candidate.
    #: rejected only because the sender is recovering (started without durable state);
    #: a candidate that gets these from a majority (itself included, if it is blank too)
    #: is in a new cluster and counts them as grants (see RaftCore ``recovering``).
    blank: bool = False


@dataclass(frozen=True, slots=True)
class Vote:
    """RequestVote (Raft §5.2). ``term`` is the candidate's new (already persisted) term."""

    frm: str
    to: str
    term: int
    last_index: int  #: index of the candidate's last log entry.
    last_term: int  #: term of the candidate's last log entry.
    transfer: bool  #: True when caused by TimeoutNow: voters ignore their leader lease.


@dataclass(frozen=True, slots=True)
class VoteResp:
    """Answer to Vote. A grant is only sent after the vote is durable (HardState)."""

    frm: str
    to: str
    term: int
    reject: bool  #: False: vote granted for ``term``.
    #: as in PreVoteResp; the sender recorded its vote for the candidate all the same (so
    #: that it is counted at most once per term), durably before this message.
    blank: bool = False


@dataclass(frozen=True, slots=True)
class Append:
    """AppendEntries (Raft §5.3); with no entries it doubles as the heartbeat.

    The receiver accepts iff its log has an entry at ``prev_index`` with ``prev_term``.
    """

    frm: str
    to: str
    term: int
    prev_index: int  #: index immediately preceding ``entries[0]`` (0: start of log).
    prev_term: int  #: term of the entry at ``prev_index`` (0 when prev_index == 0).
    entries: tuple[Entry, ...]  #: consecutive entries starting at prev_index + 1.
    commit: int  #: leader's commit index; receiver commits min(commit, last new index).
    ctx: int  #: ReadIndex heartbeat round id to echo in the response; 0 if none.


@dataclass(frozen=True, slots=True)
class AppendResp:
    """Answer to Append or InstallSnapshot.

    Success (``reject`` False): ``index`` is the highest index the receiver's log is known to
    match the leader's log up to (prev_index + len(entries), or the snapshot index); it is
    durable before this message is sent.
    Reject: ``index`` echoes the rejected ``prev_index``; (``hint_index``, ``hint_term``) is the
    receiver's largest index whose term is <= the rejected prev_term (etcd findConflictByTerm),
    letting the leader skip a whole divergent term per round trip.
    """

    frm: str
    to: str
    term: int
    reject: bool
    index: int
    hint_index: int
    hint_term: int
    ctx: int  #: echo of Append.ctx (ReadIndex round acknowledgement), 0 if none.


@dataclass(frozen=True, slots=True)
class InstallSnapshot:
    """Leader -> follower: replace your log prefix with this snapshot (follower is behind
    the leader's compacted log). Answered by AppendResp(index=snapshot index)."""

    frm: str
    to: str
    term: int
    snapshot: Snapshot


@dataclass(frozen=True, slots=True)
class TimeoutNow:
    """Leader -> up-to-date follower during leadership transfer: campaign immediately
    (skipping pre-vote and election timeout), with ``Vote.transfer`` set."""

    frm: str
    to: str
    term: int


@dataclass(frozen=True, slots=True)
class ReadIndex:
    """Follower -> its leader: give me a linearizable read point for a batch of reads
    (Raft thesis §6.4, reads served by followers). The leader treats it as one read of its
    own: once it has committed an entry of its term and confirmed leadership with a
    heartbeat round started after this arrived, it answers ``ReadIndexResp``; in a cluster
    of two or three voters, where the asker and the leader are a majority, without the
    round (raft/core.py, "Reads served by followers")."""

    frm: str
    to: str
    term: int
    ctx: int  #: the follower's batch id, echoed in the response; >= 1.


@dataclass(frozen=True, slots=True)
class ReadIndexResp:
    """Leader -> follower: the reads of batch ``ctx`` may be served once the follower
    has applied ``index``. Only valid in ``term`` and from the follower's current leader."""

    frm: str
    to: str
    term: int
    ctx: int
    index: int  #: the leader's commit index when the ReadIndex arrived.


@dataclass(frozen=True, slots=True)
class TermProbe:
    """A node that started without durable state -> each peer: tell me your current term.
    Its ``term`` is the asker's and changes nothing at the receiver (raft/core.py,
    "Recovering nodes")."""

    frm: str
    to: str
    term: int
    nonce: int  #: drawn at the asker's start: an answer to its previous life does not count


@dataclass(frozen=True, slots=True)
class TermProbeResp:
    """Answer to TermProbe: ``term`` is the answerer's current term, taken after the probe
    arrived (hence after the asker started)."""

    frm: str
    to: str
    term: int
    nonce: int  #: echoes TermProbe.nonce


Message = Union[  # noqa: UP007 - a runtime alias usable in isinstance-free match statements
    PreVote,
    PreVoteResp,
    Vote,
    VoteResp,
    Append,
    AppendResp,
    InstallSnapshot,
    TimeoutNow,
    ReadIndex,
    ReadIndexResp,
    TermProbe,
    TermProbeResp,
]
