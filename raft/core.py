"""Sans-IO Raft consensus core (in the style of etcd-io/raft ``raft.go`` + ``rawnode.go``).

Theory of operation
-------------------
``RaftCore`` is a deterministic state machine. It never performs I/O, never reads a clock
and never uses global randomness. Its only inputs are:

* ``tick()``: one unit of logical time (the shell calls it every ~50 ms). Heartbeats are
  sent every ``heartbeat_ticks``; a follower that hears nothing from a leader for a
  randomized timeout in ``[election_ticks, 2 * election_ticks)`` campaigns.
* ``step(msg)``: a message from a peer (already deserialized; ``msg.to`` is this node).
* ``propose`` / ``read_index`` / ``transfer_leadership`` / ``compact``: local requests.

Its only output is the ``Ready`` batch returned by ``ready()``; the shell MUST process each
Ready in this order and then call ``advance(rd)`` before asking for the next one:

1. durably persist (fsync) ``rd.snapshot`` (if set: it replaces the whole durable log),
   then ``rd.entries`` (entries[0].index may be <= the durable last index: truncate the
   durable log from there, then append) and ``rd.hard_state`` (if set);
2. only then send ``rd.messages`` (a vote grant or an AppendResp is a promise about durable
   state). Exception: ``Append`` messages (a leader's replication and heartbeats) promise
   nothing about the sender's disk and may be sent *before* step 1, in parallel with the
   leader's own fsync (etcd does the same): the leader counts its own entries towards
   commitment only once they are durable, i.e. from ``advance(rd)`` on (``_stable``);
3. restore the state machine from ``rd.snapshot`` if set, then apply
   ``rd.committed_entries`` in order (skip NOOP entries);
4. answer ``rd.read_states`` (serve each read once ``applied_index >= state.index``) and
   fail ``rd.dropped_reads`` (UNAVAILABLE: leadership was lost);
5. ``advance(rd)``.

``step``/``tick``/``propose`` may be called between ``ready()`` and ``advance()``; their effects
appear in the next Ready. The in-memory log is a Python list with an offset
(``_log[i]`` holds index ``_snap_index + 1 + i``); entries up to ``_snap_index`` were
compacted into ``_snapshot``.

Replication follows etcd's progress tracker: per follower ``match``/``next`` and a state:
PROBE (one Append in flight until an answer; after a reject or on a new leader), REPLICATE
(optimistic pipelining of up to ``max_inflight`` Append messages of up to
``max_entries_per_msg`` entries / ``max_bytes_per_msg`` bytes each) and SNAPSHOT (waiting for an
InstallSnapshot to be acknowledged). Rejections carry a (hint_index, hint_term) so the leader
skips whole divergent terms (fast backtracking). A leader only commits an entry of its own
term by counting replicas (Raft §5.4.2 / Figure 8); it appends a NOOP on election so this
happens promptly. Heartbeats are empty Appends anchored at the follower's ``match``; a
follower whose ``match`` does not advance for a while is probed again (lost messages).

Pre-vote (thesis §9.6) asks for hypothetical votes at ``term + 1`` without changing any term;
check-quorum makes a leader step down when it did not hear from a majority within an
election timeout, and makes nodes that heard from a leader within the election timeout
ignore (Pre)Vote requests (the "leader lease"), except for leadership transfer.

ReadIndex (thesis §6.4): a read request records the commit index; it is released as a
``ReadState`` once (a) the leader committed an entry of its current term and (b) a heartbeat
round (identified by ``Append.ctx``) started after the request was acknowledged by a majority
at the leader's term. Pending reads are reported in ``dropped_reads`` when leadership is
lost, so a deposed leader never releases a read state.

Reads served by followers (thesis §6.4): on a follower, ``read_index`` queues the request;
each ``ready()`` asks the leader for one read point for everything queued (``ReadIndex``),
which the leader treats as one read of its own (same two conditions) and answers with
``ReadIndexResp(index)``; the follower then releases the batch's read states with that
index (serve once applied). In a cluster of three (or two) voters the leader answers at
once, without a heartbeat round, once it has committed an entry of its term: the asker
sent the ReadIndex at the leader's term after its reads began, and the leader is still
at that term when it records the read point, so the two of them, a majority, were both
at that term after the reads began; a leader of a later term needs one of their votes,
so none can have committed anything before the reads began (one round trip instead of
two). A batch is dropped (``dropped_reads``) when the follower's
term or leader changes, or when no answer came within an election timeout.

Recovering nodes: a node that started without durable state (``recovering``: a new
cluster, or a wiped or replaced disk) may have forgotten votes it cast and entries it
acknowledged. It grants (pre-)votes only to candidates whose log is empty; to an
up-to-date candidate with a log it answers ``blank`` (recording a real vote all the same).
A recovering candidate's own vote is blank too. A candidate counts blank answers as grants
only when the blank nodes form a majority (a new cluster, whose first leader is elected
that way), or when its real grants alone meet every majority (more than ``n - majority``
of them: in a cluster of two, its own): every committed entry is on one of those, so the
candidate holds it, and they voted for no one else this term. A recovering node always
pre-votes. It leaves the state once both hold:

* Fenced: every peer answered its ``TermProbe`` (sent each heartbeat, with a nonce drawn
  at this start, until each answered) with its current term. A vote it forgot counts
  only if its candidate got it, and that candidate has been at that term or later since,
  so the highest answer bounds every such term. The node moves to that term and, unless
  it recorded a vote there already, votes for itself in it (durably): no real vote of
  its can meet a forgotten one. A vote it had recorded in that term stays blank
  (``_blank_through``), and the Ready that drops its marker waits until its term moves
  past that one: a restart before then (the vote on disk, the answer blank forgotten)
  starts it recovering again. Unless the node it voted for leads that term (it accepted
  its Append): then no one else won the term with a vote it forgot (the two majorities
  would share a real voter), and nothing waits. A peer that never answers keeps it
  recovering, its votes blank.
* Caught up: it holds an entry of a leader's current term that the leader reports
  committed (by leader completeness it then holds every entry committed before that
  term) and every entry up to the commit index of the first Append of that term that
  fitted its log. Every Append the leader builds while it still counts an old
  acknowledgement is anchored at or above it (at the old ``match``, or at a snapshot
  beyond it), so one that fits means this node holds all that acknowledgement covered;
  once the leader forgets the old ``match`` (a refusal below it) it counts none of them
  again. So the entries of the term this node acknowledged before, that the leader
  counts, are among them. (A message the leader built for the node's previous life and
  sent after its restart is outside this argument: the shell keeps a node that starts
  blank out for two of the longest election timeouts; README, "A node lost its disk".)
  As a leader, it is caught up once it commits an entry of its own term.

That Ready carries ``recovered``. A leader whose follower rejects at the follower's
``match`` with a log ending before it forgets that match (the follower lost its disk) and
catches it up.

Refusals (defence in depth: the shell authenticates peers, and its codec refuses malformed
messages, but even a member's buggy message must not corrupt this node's log or wedge it):
``step`` drops, without any effect, and counts in ``stats`` (the reason of the latest one
in ``last_refusal``) a message that correct Raft cannot send:

* from a node that is not a voter, or claiming to be this node; or addressed to another;
* an Append whose entries are not ``prev_index + 1, prev_index + 2, ...`` or whose terms
  are not non-decreasing within ``[max(prev_term, 1), term]`` (such entries would leave a
  gap in, or scramble, the log that is persisted); an InstallSnapshot whose position is
  impossible (index or term < 1, term above the message's);
* an Append or InstallSnapshot of the current term from a node other than the leader this
  node already knows for that term (two leaders in one term);
* a TimeoutNow that is not from the current leader of the current term (or arrives while
  this node is not its follower);
* a successful AppendResp acknowledging an index beyond the leader's log;
* an InstallSnapshot whose content ``snapshot_check`` (the application's) refuses, checked
  before it would replace the state.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from raft.messages import (
    Append,
    AppendResp,
    Entry,
    EntryKind,
    HardState,
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
from raft.progress import Progress, PState
from raft.quorum import VoteResult, committed_index, majority, vote_result

__all__ = [
    "CoreStats",
    "RaftConfig",
    "RaftCore",
    "ReadState",
    "Ready",
    "Role",
]


class Role(Enum):
    """Raft role of a node."""

    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass(frozen=True, slots=True)
class RaftConfig:
    """Tunables. All durations are in ticks."""

    election_ticks: int = 10  #: base election timeout; randomized in [e, 2e).
    heartbeat_ticks: int = 1  #: leader heartbeat interval; must be < election_ticks.
    max_inflight: int = 64  #: max unacknowledged Append messages per follower.
    max_entries_per_msg: int = 256  #: max entries in one Append.
    max_bytes_per_msg: int = 1 << 20  #: max payload bytes in one Append (>= 1 entry).
    pre_vote: bool = True  #: run a pre-vote round before bumping the term.
    check_quorum: bool = True  #: leader lease / step down without majority contact.

    def __post_init__(self) -> None:
        if self.election_ticks < 1 or self.heartbeat_ticks < 1:
            raise ValueError("election_ticks and heartbeat_ticks must be >= 1")
        if self.heartbeat_ticks >= self.election_ticks:
            raise ValueError("heartbeat_ticks must be < election_ticks")
        if self.max_inflight < 1 or self.max_entries_per_msg < 1:
            raise ValueError("max_inflight and max_entries_per_msg must be >= 1")


@dataclass(slots=True)
class CoreStats:
    """Monotone counters of the messages ``step`` refused (see "Refusals"), for the shell's
    Status. Each refusal is counted once, under the first reason that applies."""

    refused_non_member: int = 0  #: sender not a voter, or claiming to be this node
    refused_misaddressed: int = 0  #: ``to`` is not this node
    refused_malformed: int = 0  #: Append / InstallSnapshot that correct Raft cannot send
    refused_rival_leader: int = 0  #: Append / InstallSnapshot from a 2nd leader of a term
    refused_timeout_now: int = 0  #: TimeoutNow not from the current leader of the term
    refused_ack_beyond_log: int = 0  #: AppendResp acknowledging beyond the leader's log
    refused_snapshot_content: int = 0  #: InstallSnapshot that ``snapshot_check`` refused


def _append_well_formed(m: Append) -> bool:
    """Whether correct Raft could have sent ``m`` (the codec checks the same on the wire)."""
    term = m.term
    if m.prev_index < 0 or not 0 <= m.prev_term <= term or m.commit < 0:
        return False
    index, floor = m.prev_index, m.prev_term or 1
    for e in m.entries:
        index += 1
        if e.index != index or e.term < floor:
            return False
        floor = e.term
    return floor <= term


@dataclass(frozen=True, slots=True)
class ReadState:
    """A released linearizable read: serve it once ``applied_index >= index``."""

    request_id: int  #: the id passed to ``read_index``.
    index: int  #: commit index at the time of the request.


@dataclass(frozen=True, slots=True)
class Ready:
    """A batch of work for the shell; see the module docstring for the processing order."""

    hard_state: HardState | None  #: persist if not None (only set when changed).
    entries: tuple[Entry, ...]  #: persist; may overwrite the durable suffix from entries[0].
    snapshot: Snapshot | None  #: received snapshot: persist (replacing the log) and restore.
    messages: tuple[Message, ...]  #: send only after the above is durable.
    committed_entries: tuple[Entry, ...]  #: apply in order after persisting.
    read_states: tuple[ReadState, ...]  #: released reads.
    dropped_reads: tuple[int, ...]  #: read request ids to fail (leadership lost).
    #: this node started without durable state and has now caught up (see ``recovering``):
    #: persist that (after this Ready's entries) before sending this Ready's messages.
    recovered: bool = False


class RaftCore:
    """One Raft replica as a pure state machine. See the module docstring."""

    def __init__(
        self,
        node_id: str,
        voters: Sequence[str],
        config: RaftConfig,
        rng: random.Random,
        *,
        hard_state: HardState,
        snapshot: Snapshot | None,
        entries: Sequence[Entry],
        recovering: bool = False,
        snapshot_check: Callable[[bytes], object] | None = None,
    ) -> None:
        """Start (or restart) from durable state: the last persisted HardState, the last
        persisted snapshot (if any) and the persisted log entries after it (dense).

        ``recovering``: this node started without durable state (a new cluster, or a disk
        that was wiped or replaced) and has not yet caught up since; see "Recovering
        nodes" in the module docstring.

        ``snapshot_check``: the application's check of the data of a snapshot received
        from the leader, run before it replaces this node's state; it raises ValueError
        (the reason) to refuse it (see "Refusals"). None: snapshots are not checked."""
        self.id = node_id
        self.voters: tuple[str, ...] = tuple(dict.fromkeys(voters))
        if node_id not in self.voters:
            raise ValueError(f"{node_id} is not a voter in {self.voters}")
        self.peers: tuple[str, ...] = tuple(v for v in self.voters if v != node_id)
        self.cfg = config
        self._rng = rng

        self._snapshot = snapshot
        self._snap_index = snapshot.meta.index if snapshot else 0
        self._snap_term = snapshot.meta.term if snapshot else 0
        self._log: list[Entry] = [e for e in entries if e.index > self._snap_index]
        for i, e in enumerate(self._log):
            if e.index != self._snap_index + 1 + i:
                raise ValueError("restart entries must be dense and follow the snapshot")

        self._term = hard_state.term
        self._vote = hard_state.vote
        self._commit = max(hard_state.commit, self._snap_index)
        if self._commit > self.last_index:
            raise ValueError("durable commit index beyond the durable log")
        self._applied = self._snap_index
        self._role = Role.FOLLOWER
        self._leader: str | None = None
        #: the leader of ``_term`` once known (itself, or whose Append / InstallSnapshot it
        #: accepted); unlike ``_leader`` kept until the term changes: one leader per term.
        self._term_leader: str | None = None
        self._recovering = recovering
        self._snapshot_check = snapshot_check
        self.stats = CoreStats()
        self.last_refusal = ""  #: why ``step`` refused its latest message ("" if never)
        self._recovered = False  #: left ``recovering``; not yet reported in a Ready.
        #: (term, commit index) of the first Append of the latest term that fitted this node's
        #: log while recovering: it leaves ``recovering`` holding at least that much
        self._recover_to = (0, 0)
        #: it holds what it acknowledged before (the conditions on ``_recover_to`` held)
        self._data_recovered = False
        #: recovering: each peer's answer to this start's TermProbe (its current term then)
        self._probed: dict[str, int] = {}
        self._probe_nonce = rng.randrange(1, 1 << 62) if recovering else 0
        #: every peer answered: no term this node may have voted in before is left
        self._fenced = not recovering or not self.peers
        self._probe_elapsed = 0
        #: vote requests of this term or older are answered blank even once recovered: it
        #: recorded a vote in the term its fence ended at. Until its term moves past it,
        #: the marker stays on disk (a restart then starts it recovering again)
        self._blank_through = 0
        self._marker_due = False  #: left ``recovering``; the marker goes at that term

        # Ready bookkeeping.
        self._prev_hs = HardState(self._term, self._vote, self._commit)
        self._unstable_from = self.last_index + 1  #: first index not yet handed to a Ready.
        #: highest index known durable on this node (entries from restart are; a Ready's
        #: entries become so at advance). The leader's own vote in commitment counts only
        #: up to here, so its Appends may leave before its own fsync.
        self._stable = self.last_index
        self._pending_snapshot: Snapshot | None = None
        self._msgs: list[Message] = []
        self._read_states: list[ReadState] = []
        self._dropped_reads: list[int] = []
        self._outstanding: Ready | None = None

        # Timers.
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_timeout = 0
        self._reset_randomized_timeout()

        # Candidate state.
        self._votes: dict[str, bool] = {}
        self._blank_votes: set[str] = set()  #: rejected only for being blank (recovering)

        # Leader state.
        self._prs: dict[str, Progress] = {}
        self._transferee: str | None = None
        self._transfer_elapsed = 0
        self._reads_wait_commit: list[int] = []  #: read ids waiting for a current-term commit.
        self._reads_wait_round: list[ReadState] = []  #: reads waiting for a heartbeat round.
        self._read_rounds: deque[tuple[int, list[ReadState], set[str]]] = deque()
        self._ctx_seq = 0
        self._quorum_contact_ok = False  #: leader: majority heard in the last window.
        #: leader: reads asked by followers: internal id (< 0) -> (follower, its batch ctx).
        self._remote_reads: dict[int, tuple[str, int]] = {}
        self._remote_seq = 0

        # Follower reads: request ids for the next ReadIndex, and the batches asked of the
        # current leader: ctx -> (request ids, ticks waited). Cleared on any term/leader change.
        self._fread_queue: list[int] = []
        self._fread_batches: dict[int, tuple[list[int], int]] = {}
        #: batch ids (ReadIndex.ctx) start at random: a restarted follower must not take
        #: the leader's late answer to its previous incarnation's batch (same term, same
        #: small ctx) for an answer to its own, with a read point from before its writes.
        self._fread_seq = rng.randrange(1 << 62)

    # ------------------------------------------------------------------ properties
    @property
    def role(self) -> Role:
        """Current role."""
        return self._role

    @property
    def term(self) -> int:
        """Current term."""
        return self._term

    @property
    def vote(self) -> str | None:
        """Vote cast in the current term."""
        return self._vote

    @property
    def leader_id(self) -> str | None:
        """Known leader of the current term, or None (also None on a follower that has not
        heard from its leader for a full election timeout)."""
        if self._role is Role.FOLLOWER and self._election_elapsed >= self.cfg.election_ticks:
            return None
        return self._leader

    @property
    def recovering(self) -> bool:
        """Started without durable state and not caught up yet (see ``__init__``)."""
        return self._recovering

    @property
    def commit_index(self) -> int:
        """Highest log index known to be committed."""
        return self._commit

    @property
    def applied_index(self) -> int:
        """Highest index handed to the application and acknowledged via ``advance``."""
        return self._applied

    @property
    def last_index(self) -> int:
        """Index of the last entry of the in-memory log (0 if empty)."""
        return self._snap_index + len(self._log)

    @property
    def first_index(self) -> int:
        """Smallest index still present in the log (``snapshot index + 1``)."""
        return self._snap_index + 1

    @property
    def snapshot(self) -> Snapshot | None:
        """Latest snapshot (from compaction, InstallSnapshot or restart)."""
        return self._snapshot

    @property
    def transferring_to(self) -> str | None:
        """Target of an ongoing leadership transfer (leader only)."""
        return self._transferee

    def has_quorum_contact(self) -> bool:
        """True if this node believes it is connected to a working leader: a leader that
        heard from a majority within the last election timeout, or a follower that heard
        from its leader within an election timeout."""
        if self._role is Role.LEADER:
            if not self.peers:
                return True
            return self._quorum_contact_ok or self._count_recent_active()
        return self.leader_id is not None

    def progress(self) -> dict[str, int]:
        """Leader only: the highest log index known replicated on each peer (else empty)."""
        if self._role is not Role.LEADER:
            return {}
        return {p: pr.match for p, pr in self._prs.items()}

    def log_term(self, index: int) -> int | None:
        """Term of the entry at ``index`` (0 for index 0), None if compacted or absent."""
        if index == self._snap_index:
            return self._snap_term
        if index < self._snap_index or index > self.last_index:
            return None
        return self._log[index - self._snap_index - 1].term

    def log_slice(self, lo: int, hi: int) -> list[Entry]:
        """Entries with ``lo <= index < hi`` (clamped to what is in memory)."""
        off = self._snap_index + 1
        return self._log[max(lo - off, 0) : max(hi - off, 0)]

    # ------------------------------------------------------------------ local API
    def tick(self) -> None:
        """Advance logical time by one tick."""
        if not self._fenced:
            self._probe_elapsed -= 1
            if self._probe_elapsed <= 0:
                self._probe_elapsed = self.cfg.heartbeat_ticks
                for p in self.peers:
                    if p not in self._probed:
                        self._send(TermProbe(self.id, p, self._term, self._probe_nonce))
        if self._role is Role.LEADER:
            self._tick_leader()
        else:
            if self._fread_batches:
                self._age_follower_reads()
            self._election_elapsed += 1
            if self._election_elapsed >= self._randomized_timeout:
                self._election_elapsed = 0
                # (a recovering node always asks first: it must not bump terms in vain)
                self._campaign(pre=self.cfg.pre_vote or self._recovering, transfer=False)

    def propose(self, data: bytes) -> int | None:
        """Append a COMMAND entry if leader (and not transferring); returns its index."""
        r = self.propose_batch((data,))
        return r[0] if r else None

    def propose_batch(self, datas: Iterable[bytes]) -> list[int] | None:
        """Append several COMMAND entries at once (one Append per follower)."""
        if self._role is not Role.LEADER or self._transferee is not None:
            return None
        start = self.last_index + 1
        ents = [
            Entry(self._term, start + i, EntryKind.COMMAND, bytes(d)) for i, d in enumerate(datas)
        ]
        if not ents:
            return []
        self._append_local(ents)
        return list(range(start, start + len(ents)))

    def read_index(self, request_id: int) -> bool:
        """Request a linearizable read point (``request_id`` >= 1). See ``ReadState``.

        On the leader, and on a follower that knows its leader (which it then asks); False
        elsewhere (no read point can be had: refuse the read)."""
        if request_id < 1:
            raise ValueError("read request ids must be >= 1")
        if self._role is Role.FOLLOWER and self._leader is not None:
            self._fread_queue.append(request_id)
            return True
        return self._read_index(request_id)

    def _read_index(self, request_id: int) -> bool:
        if self._role is not Role.LEADER:
            return False
        if self.log_term(self._commit) != self._term:
            self._reads_wait_commit.append(request_id)
        elif not self.peers:
            self._read_states.append(ReadState(request_id, self._commit))
        else:
            self._reads_wait_round.append(ReadState(request_id, self._commit))
        return True

    def transfer_leadership(self, to: str) -> bool:
        """Start handing leadership to voter ``to``. Proposals are refused until the
        transfer completes or is aborted (after an election timeout)."""
        if self._role is not Role.LEADER or to == self.id or to not in self._prs:
            return False
        if self._transferee == to:
            return True
        self._transferee = to
        self._transfer_elapsed = 0
        pr = self._prs[to]
        if pr.match == self.last_index:
            self._send(TimeoutNow(self.id, to, self._term))
        else:
            self._send_append(to)
        return True

    def compact(self, index: int, data: bytes) -> None:
        """Record an application snapshot at applied ``index`` and drop the log up to it.

        The shell persists the snapshot itself before calling this (it is not repeated in
        a Ready). It is sent to followers that need compacted entries.
        """
        if index <= self._snap_index:
            return
        if index > self._applied:
            raise ValueError(f"cannot compact to {index} beyond applied {self._applied}")
        term = self.log_term(index)
        assert term is not None
        del self._log[: index - self._snap_index]
        self._snap_index, self._snap_term = index, term
        self._snapshot = Snapshot(SnapshotMeta(index, term), data)

    # ------------------------------------------------------------------ Ready
    def has_ready(self) -> bool:
        """Whether ``ready()`` would return a batch."""
        return bool(
            self._outstanding is None
            and (
                self._msgs
                or self._read_states
                or self._dropped_reads
                or (self._reads_wait_round and not self._read_rounds)
                or self._fread_queue
                or self._pending_snapshot is not None
                or self._recovered
                or self._unstable_from <= self.last_index
                or self._commit > self._applied
                or self._hard_state() != self._prev_hs
            )
        )

    def ready(self) -> Ready | None:
        """Collect pending work, or None. Call ``advance(rd)`` before the next ``ready``."""
        if not self.has_ready():
            return None
        if self._reads_wait_round and not self._read_rounds:
            # One heartbeat round in flight at a time: reads arriving meanwhile share the
            # next round, so a busy leader confirms many reads per round trip.
            self._start_read_round()
        if self._fread_queue:
            self._ask_read_index()
        if self._read_states:
            self._answer_remote_reads()
        hs = self._hard_state()
        off = self._snap_index + 1
        ents = tuple(self._log[self._unstable_from - off :])
        self._unstable_from = self.last_index + 1
        start = max(self._applied, self._snap_index) + 1
        committed = tuple(self._log[start - off : self._commit - off + 1])
        rd = Ready(
            hard_state=hs if hs != self._prev_hs else None,
            entries=ents,
            snapshot=self._pending_snapshot,
            messages=tuple(self._msgs),
            committed_entries=committed,
            read_states=tuple(self._read_states),
            dropped_reads=tuple(r for r in self._dropped_reads if r > 0),
            recovered=self._recovered,
        )
        self._recovered = False
        self._prev_hs = hs
        self._pending_snapshot = None
        self._msgs = []
        self._read_states = []
        self._dropped_reads = []
        self._outstanding = rd
        return rd

    def advance(self, rd: Ready) -> None:
        """Acknowledge that ``rd`` was fully processed (persisted, sent, applied)."""
        if rd is not self._outstanding:
            raise ValueError("advance() called with a Ready that is not outstanding")
        self._outstanding = None
        if rd.entries:
            last = rd.entries[-1]
            # Still the same entry in memory => (log matching) the whole prefix is durable.
            if self.log_term(last.index) == last.term:
                self._stable = max(self._stable, last.index)
        if rd.snapshot is not None:
            self._stable = max(self._stable, rd.snapshot.meta.index)
            self._applied = max(self._applied, rd.snapshot.meta.index)
        if rd.committed_entries:
            self._applied = max(self._applied, rd.committed_entries[-1].index)
        if self._role is Role.LEADER and rd.entries:
            self._maybe_commit()

    def _hard_state(self) -> HardState:
        hs = self._prev_hs
        if hs.term == self._term and hs.vote == self._vote and hs.commit == self._commit:
            return hs
        return HardState(self._term, self._vote, self._commit)

    # ------------------------------------------------------------------ step
    def step(self, m: Message) -> None:
        """Process one message from a peer. A message correct Raft cannot send is refused
        without any effect (counted in ``stats``): see "Refusals" in the module docstring."""
        stats = self.stats
        if m.frm not in self.voters or m.frm == self.id:
            stats.refused_non_member += 1
            self._refused(m, "its sender is not a voter")
            return
        if m.to != self.id:
            stats.refused_misaddressed += 1
            self._refused(m, "it is addressed to another node")
            return
        if isinstance(m, TermProbe):  # whatever its term: it changes nothing here
            self._send(TermProbeResp(self.id, m.frm, self._term, m.nonce))
            return
        if isinstance(m, TermProbeResp):
            if not self._fenced and m.nonce == self._probe_nonce:
                self._probed[m.frm] = max(m.term, self._probed.get(m.frm, 0))
                if len(self._probed) == len(self.peers):
                    self._fence()
            return
        if isinstance(m, Append):
            if not _append_well_formed(m):
                stats.refused_malformed += 1
                self._refused(m, "entries not following prev_index, or terms out of order")
                return
        elif isinstance(m, InstallSnapshot):
            meta = m.snapshot.meta
            if meta.index < 1 or not 1 <= meta.term <= m.term:
                stats.refused_malformed += 1
                self._refused(m, f"impossible snapshot position {meta}")
                return
        elif isinstance(m, TimeoutNow):
            from_leader = (
                m.term == self._term and m.frm == self._term_leader and self._role is Role.FOLLOWER
            )
            if m.term >= self._term and not from_leader:  # (older: stale, dropped below)
                stats.refused_timeout_now += 1
                self._refused(m, f"not from the leader of term {self._term} ({self._term_leader})")
                return
        if m.term > self._term:
            if isinstance(m, PreVote | Vote):
                transfer = isinstance(m, Vote) and m.transfer
                in_lease = (
                    self.cfg.check_quorum
                    and self._leader is not None
                    and self._election_elapsed < self.cfg.election_ticks
                )
                if in_lease and not transfer:
                    return  # leader lease: ignore disruptive (pre-)candidates
            if isinstance(m, PreVote) or (isinstance(m, PreVoteResp) and (not m.reject or m.blank)):
                pass  # pre-vote traffic never changes terms
            elif isinstance(m, Append | InstallSnapshot):
                self._become_follower(m.term, m.frm)
            else:
                self._become_follower(m.term, None)
        elif m.term < self._term:
            if isinstance(m, Append) and (self.cfg.check_quorum or self.cfg.pre_vote):
                # Tell a stale leader about the newer term so it steps down.
                self._send(AppendResp(self.id, m.frm, self._term, True, 0, 0, 0, 0))
            elif isinstance(m, PreVote):
                self._send(PreVoteResp(self.id, m.frm, self._term, True))
            return

        if (
            isinstance(m, Append | InstallSnapshot)
            and self._term_leader is not None
            and m.frm != self._term_leader
        ):
            stats.refused_rival_leader += 1
            self._refused(m, f"{self._term_leader} is the leader of term {self._term}")
            return

        if isinstance(m, PreVote | Vote):
            self._handle_vote_request(m)
            return

        role = self._role
        if role is Role.LEADER:
            self._step_leader(m)
        elif role is Role.FOLLOWER:
            if isinstance(m, Append | InstallSnapshot):
                self._election_elapsed = 0
                self._leader = self._term_leader = m.frm
                if self._marker_due:
                    self._maybe_recovered()
                if isinstance(m, Append):
                    self._handle_append(m)
                else:
                    self._handle_snapshot(m)
            elif isinstance(m, TimeoutNow):
                self._campaign(pre=False, transfer=True)
            elif isinstance(m, ReadIndexResp) and m.frm == self._leader:
                batch = self._fread_batches.pop(m.ctx, None)
                if batch is not None:
                    self._read_states.extend(ReadState(rid, m.index) for rid in batch[0])
        else:  # candidates
            if isinstance(m, Append | InstallSnapshot):
                self._become_follower(m.term, m.frm)
                self.step(m)
            elif (isinstance(m, PreVoteResp) and role is Role.PRE_CANDIDATE) or (
                isinstance(m, VoteResp) and role is Role.CANDIDATE
            ):
                self._poll(m.frm, not m.reject, m.blank)

    def _handle_vote_request(self, m: PreVote | Vote) -> None:
        pre = isinstance(m, PreVote)
        can_vote = (
            self._vote == m.frm
            or (self._vote is None and self._leader is None)
            or (pre and m.term > self._term)
        )
        last_term = self.log_term(self.last_index) or 0
        up_to_date = m.last_term > last_term or (
            m.last_term == last_term and m.last_index >= self.last_index
        )
        blank = self._recovering or m.term <= self._blank_through
        if blank and m.last_index > 0 and can_vote and up_to_date:
            # It may have voted otherwise before it lost its state: no grant. But say so,
            # recording the vote (it counts as a grant only if a majority is blank: a new
            # cluster, see ``_poll``).
            if not pre:
                self._election_elapsed = 0
                self._vote = m.frm
                self._send(VoteResp(self.id, m.frm, self._term, True, True))
            else:
                self._send(PreVoteResp(self.id, m.frm, m.term, True, True))  # (echoes, as a grant)
            return
        if can_vote and up_to_date:
            if pre:
                self._send(PreVoteResp(self.id, m.frm, m.term, False))
            else:
                self._election_elapsed = 0
                self._vote = m.frm
                self._send(VoteResp(self.id, m.frm, self._term, False))
        elif pre:
            self._send(PreVoteResp(self.id, m.frm, self._term, True))
        else:
            self._send(VoteResp(self.id, m.frm, self._term, True))

    # ------------------------------------------------------------------ elections
    def _reset_randomized_timeout(self) -> None:
        e = self.cfg.election_ticks
        self._randomized_timeout = e + self._rng.randrange(e)

    def _reset(self, term: int) -> None:
        if term != self._term:
            self._term = term
            self._vote = None
            self._term_leader = None
            if self._marker_due:
                self._maybe_recovered()
        self._leader = None
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._reset_randomized_timeout()
        self._votes = {}
        self._transferee = None
        self._prs = {}
        self._drop_reads()

    def _drop_reads(self) -> None:
        self._dropped_reads.extend(self._fread_queue)
        for ids, _ in self._fread_batches.values():
            self._dropped_reads.extend(ids)
        self._fread_queue = []
        self._fread_batches = {}
        self._remote_reads.clear()  # their internal ids are filtered out at ready()
        self._dropped_reads.extend(self._reads_wait_commit)
        self._dropped_reads.extend(r.request_id for r in self._reads_wait_round)
        for _, reads, _ in self._read_rounds:
            self._dropped_reads.extend(r.request_id for r in reads)
        self._reads_wait_commit = []
        self._reads_wait_round = []
        self._read_rounds.clear()

    def _become_follower(self, term: int, leader: str | None) -> None:
        self._reset(term)
        self._role = Role.FOLLOWER
        self._leader = leader
        if leader is not None:
            self._term_leader = leader

    def _campaign(self, *, pre: bool, transfer: bool) -> None:
        if self._role is Role.LEADER:
            return
        if pre:
            self._reset(self._term)
            self._role = Role.PRE_CANDIDATE
            term = self._term + 1
        else:
            self._reset(self._term + 1)
            self._role = Role.CANDIDATE
            self._vote = self.id
            term = self._term
        self._votes = {self.id: True}
        # a recovering node may have voted otherwise in this term before it lost its state:
        # its own vote is blank too
        self._blank_votes = {self.id} if self._recovering else set()
        if vote_result(self._votes, self.voters) is VoteResult.WON:
            self._on_won(pre)
            return
        li = self.last_index
        lt = self.log_term(li) or 0
        for p in self.peers:
            if pre:
                self._send(PreVote(self.id, p, term, li, lt))
            else:
                self._send(Vote(self.id, p, term, li, lt, transfer))

    def _poll(self, frm: str, granted: bool, blank: bool = False) -> None:
        self._votes.setdefault(frm, granted)
        votes = self._votes
        if blank:
            self._blank_votes.add(frm)
        if self._blank_votes:
            n, blanks = len(self.voters), len(self._blank_votes)
            solid = sum(1 for k, v in votes.items() if v and k not in self._blank_votes)
            if blanks >= majority(n) or solid > n - majority(n):
                # Either a majority started without durable state (itself included, if it
                # did): a new cluster, or one whose majority never held its state (beyond
                # what Raft recovers); blank nodes answered only because this candidate is
                # as up to date as they are. Or the real grants alone meet every majority
                # (two voters: the candidate's own, if it kept its disk): each committed
                # entry is on one of them, so this candidate holds it, and no other
                # candidate wins this term.
                votes = {**votes, **dict.fromkeys(self._blank_votes, True)}
            else:  # not a refusal yet: more blank answers may make a majority
                votes = {k: v for k, v in votes.items() if k not in self._blank_votes}
        res = vote_result(votes, self.voters)
        if res is VoteResult.WON:
            self._on_won(self._role is Role.PRE_CANDIDATE)
        elif res is VoteResult.LOST:
            self._become_follower(self._term, None)

    def _on_won(self, pre: bool) -> None:
        if pre:
            self._campaign(pre=False, transfer=False)
        else:
            self._become_leader()

    def _become_leader(self) -> None:
        self._reset(self._term)
        self._role = Role.LEADER
        self._leader = self._term_leader = self.id
        nxt = self.last_index + 1
        self._prs = {p: Progress(match=0, next=nxt) for p in self.peers}
        self._quorum_contact_ok = True
        self._append_local([Entry(self._term, nxt, EntryKind.NOOP, b"")])

    # ------------------------------------------------------------------ leader
    def _count_recent_active(self) -> bool:
        n = 1 + sum(1 for pr in self._prs.values() if pr.recent_active)
        return n >= majority(len(self.voters))

    def _tick_leader(self) -> None:
        cfg = self.cfg
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        if self._election_elapsed >= cfg.election_ticks:
            self._election_elapsed = 0
            ok = self._count_recent_active()
            self._quorum_contact_ok = ok
            if cfg.check_quorum and not ok:
                self._become_follower(self._term, None)
                return
            for pr in self._prs.values():
                pr.recent_active = False
        if self._transferee is not None:
            self._transfer_elapsed += 1
            if self._transfer_elapsed >= cfg.election_ticks:
                self._transferee = None
        last = self.last_index
        stall_limit = max(2 * cfg.heartbeat_ticks, cfg.election_ticks // 2)
        for p, pr in self._prs.items():
            if pr.match >= last:
                pr.stall = 0
                continue
            pr.stall += 1
            limit = cfg.election_ticks if pr.state is PState.SNAPSHOT else stall_limit
            if pr.stall >= limit:
                pr.become_probe()
                self._send_append(p)
        if self._heartbeat_elapsed >= cfg.heartbeat_ticks:
            self._heartbeat_elapsed = 0
            # Re-send the newest pending read round (its acks release all older rounds), so
            # lost heartbeats cannot strand reads.
            self._bcast_heartbeat(self._read_rounds[-1][0] if self._read_rounds else 0)

    def _bcast_heartbeat(self, ctx: int) -> None:
        # The leader's whole commit index, also to a follower that lags (etcd sends
        # min(commit, match)): the follower commits only min(commit, prev_index) after
        # checking prev (``_handle_append``), so that is as safe, and its BOUNDED_STALENESS
        # reads need to know how far behind it is (raft/node.py ``_bounded_ok``).
        commit = self._commit
        for p, pr in self._prs.items():
            idx = pr.match
            t = self.log_term(idx)
            if t is None:
                idx, t = self._snap_index, self._snap_term
            self._send(Append(self.id, p, self._term, idx, t, (), commit, ctx))

    def _ask_read_index(self) -> None:
        """Follower: one ReadIndex to the leader for every read queued since the last."""
        ids, self._fread_queue = self._fread_queue, []
        if self._role is not Role.FOLLOWER or self._leader is None:
            self._dropped_reads.extend(ids)
            return
        self._fread_seq += 1
        self._fread_batches[self._fread_seq] = (ids, 0)
        self._send(ReadIndex(self.id, self._leader, self._term, self._fread_seq))

    def _age_follower_reads(self) -> None:
        """Follower: drop batches the leader did not answer within an election timeout."""
        limit = self.cfg.election_ticks
        for ctx, (ids, age) in list(self._fread_batches.items()):
            if age + 1 >= limit:
                del self._fread_batches[ctx]
                self._dropped_reads.extend(ids)
            else:
                self._fread_batches[ctx] = (ids, age + 1)

    def _answer_remote_reads(self) -> None:
        """Leader: released read states of followers' batches become ReadIndexResps (and
        never reach the shell, whose request ids are >= 1)."""
        local: list[ReadState] = []
        for rs in self._read_states:
            if rs.request_id > 0:
                local.append(rs)
                continue
            dest = self._remote_reads.pop(rs.request_id, None)
            if dest is not None:
                self._send(ReadIndexResp(self.id, dest[0], self._term, dest[1], rs.index))
        self._read_states = local

    def _start_read_round(self) -> None:
        self._ctx_seq += 1
        ctx = self._ctx_seq
        self._read_rounds.append((ctx, self._reads_wait_round, {self.id}))
        self._reads_wait_round = []
        self._bcast_heartbeat(ctx)

    def _ack_read(self, frm: str, ctx: int) -> None:
        acked_upto = 0
        for c, _, acks in self._read_rounds:
            if c == ctx:
                acks.add(frm)
                if len(acks) >= majority(len(self.voters)):
                    acked_upto = c
                break
        if acked_upto:
            while self._read_rounds and self._read_rounds[0][0] <= acked_upto:
                _, reads, _ = self._read_rounds.popleft()
                self._read_states.extend(reads)

    def _append_local(self, ents: list[Entry]) -> None:
        self._log.extend(ents)
        if not self._maybe_commit():
            for p in self._prs:
                while self._send_append(p, send_if_empty=False):
                    pass

    def _maybe_commit(self) -> bool:
        """Advance commit by counting (current-term entries only); if advanced, send
        followers their pending entries (the new commit index rides along)."""
        match = {p: pr.match for p, pr in self._prs.items()}
        match[self.id] = min(self.last_index, self._stable)
        ci = committed_index(match, self.voters)
        if ci <= self._commit or self.log_term(ci) != self._term:
            return False
        first_in_term = self.log_term(self._commit) != self._term
        self._commit = ci
        if self._recovering:
            self._caught_up()  # elected by blank voters (a new cluster), now committing
        if first_in_term and self._reads_wait_commit:
            ids, self._reads_wait_commit = self._reads_wait_commit, []
            for rid in ids:
                if self.peers:
                    self._reads_wait_round.append(ReadState(rid, ci))
                else:
                    self._read_states.append(ReadState(rid, ci))
        # Followers learn the new commit index with the next Append or heartbeat (at most
        # one heartbeat interval later): an empty Append just to announce it would double
        # the messages per write when the load is light.
        for p in self._prs:
            while self._send_append(p, send_if_empty=False):
                pass
        return True

    def _send_append(self, to: str, send_if_empty: bool = True) -> bool:
        pr = self._prs[to]
        if pr.state is PState.SNAPSHOT:
            return False
        if pr.state is PState.PROBE and pr.probe_sent:
            return False
        if pr.state is PState.REPLICATE and len(pr.inflight) >= self.cfg.max_inflight:
            return False
        prev = pr.next - 1
        prev_term = self.log_term(prev)
        if prev_term is None:
            if prev > self.last_index:  # cannot happen; be defensive
                pr.become_probe()
                return False
            snap = self._snapshot
            assert snap is not None, "compacted log without a snapshot"
            pr.become_snapshot(snap.meta.index)
            self._send(InstallSnapshot(self.id, to, self._term, snap))
            return True
        off = self._snap_index + 1
        lo = pr.next - off
        hi = min(lo + self.cfg.max_entries_per_msg, len(self._log))
        if hi - lo > 1:
            budget = self.cfg.max_bytes_per_msg
            j = lo
            while j < hi:
                budget -= len(self._log[j].data)
                if budget < 0 and j > lo:
                    break
                j += 1
            hi = j
        if hi <= lo and not send_if_empty:
            return False
        ents = tuple(self._log[lo:hi])
        self._send(Append(self.id, to, self._term, prev, prev_term, ents, self._commit, 0))
        if pr.state is PState.REPLICATE:
            if ents:
                pr.next = ents[-1].index + 1
                pr.inflight.append(ents[-1].index)
        else:
            pr.probe_sent = True
        return bool(ents)

    def _step_leader(self, m: Message) -> None:
        if isinstance(m, ReadIndex):
            if m.frm in self._prs and m.ctx > 0:
                self._remote_seq += 1
                rid = -self._remote_seq
                self._remote_reads[rid] = (m.frm, m.ctx)
                if majority(len(self.voters)) <= 2 and self.log_term(self._commit) == self._term:
                    # The asker vouches for this leader: see "Reads served by followers".
                    self._read_states.append(ReadState(rid, self._commit))
                else:
                    self._read_index(rid)
            return
        if not isinstance(m, AppendResp):
            return
        pr = self._prs.get(m.frm)
        if pr is None:
            return
        if not m.reject and m.index > self.last_index:
            # (this leader's log only grows in its term: it never sent beyond its end)
            self.stats.refused_ack_beyond_log += 1
            self._refused(m, f"it acknowledges index {m.index}, beyond {self.last_index}")
            return
        pr.recent_active = True
        if m.ctx:
            self._ack_read(m.frm, m.ctx)
        if m.reject:
            next_probe = m.hint_index
            if m.hint_term > 0:
                next_probe = self._find_conflict_by_term(m.hint_index, m.hint_term)
            if m.index == pr.match > 0 and m.hint_index < pr.match:
                # Refused at the very index it had acknowledged, and its log ends before
                # it: the follower lost its disk. Stop counting it there; catch it up.
                pr.forget_match(min(m.index, next_probe + 1))
                self._send_append(m.frm)
                return
            if pr.state is PState.REPLICATE:
                if m.index <= pr.match:
                    return  # stale
                pr.become_probe()
            elif pr.state is PState.PROBE:
                if pr.next - 1 != m.index:
                    return  # stale
                pr.next = max(min(m.index, next_probe + 1), pr.match + 1)
                pr.probe_sent = False
            else:
                return
            self._send_append(m.frm)
            return
        updated = m.index > pr.match
        if updated:
            pr.match = m.index
            pr.stall = 0
            if pr.next <= m.index:
                pr.next = m.index + 1
        if updated or (pr.state is PState.PROBE and m.index == pr.next - 1):
            if pr.state is PState.PROBE:
                pr.become_replicate()
            elif pr.state is PState.SNAPSHOT:
                if pr.match >= pr.pending_snapshot or pr.match + 1 >= self.first_index:
                    pr.become_probe()
                    pr.become_replicate()
            else:
                inf = pr.inflight
                while inf and inf[0] <= m.index:
                    inf.popleft()
            if not self._maybe_commit():
                while self._send_append(m.frm, send_if_empty=False):
                    pass
            if m.frm == self._transferee and pr.match == self.last_index:
                self._send(TimeoutNow(self.id, m.frm, self._term))
        elif pr.state is PState.PROBE and pr.match < self.last_index:
            # Heartbeat answer while probing: the probe may have been lost; retry.
            pr.probe_sent = False
            self._send_append(m.frm)

    def _find_conflict_by_term(self, index: int, term: int) -> int:
        """Largest index <= ``index`` whose term is <= ``term`` (or the first unknown one)."""
        index = min(index, self.last_index)
        while index > self._snap_index:
            t = self.log_term(index)
            if t is None or t <= term:
                break
            index -= 1
        return index

    # ------------------------------------------------------------------ follower
    def _handle_append(self, m: Append) -> None:
        if m.prev_index < self._commit:
            self._send(AppendResp(self.id, m.frm, self._term, False, self._commit, 0, 0, m.ctx))
            return
        if self.log_term(m.prev_index) == m.prev_term:
            if self._recovering and self._recover_to[0] != m.term:
                # the first Append of the term that fits its log: anchored at or above
                # every old acknowledgement the leader still counted (see "Recovering")
                self._recover_to = (m.term, m.commit)
            last_new = m.prev_index + len(m.entries)
            self._append_entries(m.entries)
            c = min(m.commit, last_new)
            if c > self._commit:
                self._commit = c
            if self._recovering and c >= max(1, self._recover_to[1]) and self.log_term(c) == m.term:
                self._caught_up()
            self._send(AppendResp(self.id, m.frm, self._term, False, last_new, 0, 0, m.ctx))
            return
        hint = self._find_conflict_by_term(m.prev_index, m.prev_term)
        ht = self.log_term(hint) or 0
        self._send(AppendResp(self.id, m.frm, self._term, True, m.prev_index, hint, ht, m.ctx))

    def _append_entries(self, ents: tuple[Entry, ...]) -> None:
        last = self.last_index
        for k, e in enumerate(ents):
            if e.index > last:
                self._log.extend(ents[k:])
                return
            t = self.log_term(e.index)
            if t != e.term:
                if e.index <= self._commit:
                    raise AssertionError(
                        f"{self.id}: conflict at committed index {e.index} (commit {self._commit})"
                    )
                del self._log[e.index - self._snap_index - 1 :]
                self._unstable_from = min(self._unstable_from, e.index)
                self._stable = min(self._stable, e.index - 1)
                self._log.extend(ents[k:])
                return

    def _handle_snapshot(self, m: InstallSnapshot) -> None:
        meta = m.snapshot.meta
        if meta.index <= self._commit:
            self._send(AppendResp(self.id, m.frm, self._term, False, self._commit, 0, 0, 0))
            return
        if self.log_term(meta.index) == meta.term:
            # Our log already contains the snapshot point: just fast-forward commit.
            self._commit = meta.index
        else:
            check = self._snapshot_check
            if check is not None:
                try:
                    check(m.snapshot.data)
                except ValueError as e:
                    self.stats.refused_snapshot_content += 1
                    self._refused(m, f"its content is invalid: {e}")
                    return
            self._log = []
            self._snap_index, self._snap_term = meta.index, meta.term
            self._snapshot = m.snapshot
            self._pending_snapshot = m.snapshot
            self._commit = meta.index
            self._unstable_from = meta.index + 1
            self._stable = min(self._stable, meta.index)
            # (``applied`` moves to the snapshot index only at ``advance``, once the shell
            # has restored its state machine from it: a read released for an index the
            # snapshot covers must not be served from the old state before that.)
        self._send(AppendResp(self.id, m.frm, self._term, False, meta.index, 0, 0, 0))

    # ------------------------------------------------------------------ misc
    def _caught_up(self) -> None:
        """It holds what it acknowledged before: leave ``recovering`` once fenced too."""
        self._data_recovered = True
        self._maybe_recovered()

    def _fence(self) -> None:
        """Every peer told its term after this node started: any term in which a vote it
        forgot could count is at most the highest of them (the candidate it voted for has
        been at that term since). Move to that term and vote for itself in it, durably (it
        grants no one else a vote there), so that its votes are real from the next term on
        ("Recovering nodes")."""
        highest = max(self._probed.values(), default=0)
        if highest > self._term:
            self._become_follower(highest, None)
        if self._term == highest:
            if self._vote is None:
                self._vote = self.id
            elif self._vote != self.id:  # a vote it recorded blank: it stays blank ...
                self._blank_through = highest  # ... unless its candidate leads (below)
        self._fenced = True
        self._maybe_recovered()

    def _maybe_recovered(self) -> None:
        """Leave ``recovering``; a Ready says so (the shell drops its marker) once no vote
        request it would answer blank is left: its term is past ``_blank_through``, or the
        candidate it recorded its vote for there leads that term (then no one else won it
        with a vote it forgot: the two majorities would share a real voter)."""
        if self._recovering and self._data_recovered and self._fenced:
            self._recovering = False
            self._marker_due = True
        if self._blank_through == self._term and self._vote == self._term_leader:
            self._blank_through = 0
        if self._marker_due and self._term > self._blank_through:
            self._marker_due = False
            self._recovered = True

    def _refused(self, m: Message, why: str) -> None:
        self.last_refusal = f"{type(m).__name__} from {m.frm!r} at term {m.term}: {why}"

    def _send(self, m: Message) -> None:
        self._msgs.append(m)
