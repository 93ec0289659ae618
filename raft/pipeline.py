"""The Raft shell's Ready pipeline: persist, send, apply, answer, advance, in one place.

Theory of operation
-------------------
The core (raft.core) says what to do in a ``Ready``; this module does it, for the real
node (raft.node) and for the deterministic simulator (raft.sim) alike, against the
production storage (raft.storage, on a real or simulated disk) and state machine
(raft.statemachine). Only scheduling differs between the two: *where* ``persist`` runs
(inline or on a disk thread; see ``SyncPolicy``) and *when* ``finish`` follows it.

One Ready goes through three calls, in this order, and nothing else touches it:

1. ``begin(rd)``: send the Appends (they promise nothing about this node's disk and
   leave in parallel with its fsync), and say what must be made durable (a ``Save``, or
   None). A commit-only hard state change is not worth an fsync: it is parked and rides
   along with the next Save (a restarted node learns its commit index again).
2. ``persist(save)``: the only disk I/O; may run on another thread. It raises
   RetryableStorageError (nothing of it is durable, the same Save may be retried later:
   a full disk) or FatalStorageError (the node must stop).
3. ``finish(rd)``: once durable: send the other messages (votes and acknowledgements
   are promises about durable state), restore a received snapshot, apply committed
   entries and answer their proposals, release reads, ``advance``, then answer
   what leadership changes decided.

Answers go to a ``Sink`` as tokens the shell chose (futures in the node, operations in
the simulator). A linearizable read is served (``Sink.read_ready``) only once *this
module's* ``applied`` index, the state the state machine really holds, has reached its
read point: a read point at or below a snapshot being installed waits until the state
machine was restored from it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from caplab.raft.v1 import raft_pb2 as pb
from raft.core import RaftCore, Ready, Role
from raft.messages import Append, Entry, EntryKind, HardState, Message, Snapshot, SnapshotMeta
from raft.statemachine import KvStateMachine
from raft.storage import RaftStorage

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)


class Sink(Protocol[T_contra]):
    """Where the pipeline's answers go. ``definite``: certainly not applied."""

    def proposal_done(self, token: T_contra, result: pb.CommandResult, index: int) -> None: ...

    def proposal_failed(self, token: T_contra, definite: bool, reason: str) -> None: ...

    def read_ready(self, token: T_contra, index: int) -> None:
        """Serve the read now: the state machine has applied at least ``index``."""

    def read_failed(self, token: T_contra, reason: str) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Save:
    """What one Ready must make durable, in this order (one ``RaftStorage.save``)."""

    hard_state: HardState | None
    entries: tuple[Entry, ...]
    snapshot: Snapshot | None
    recovered: bool  # then drop the "recovering" marker, after the rest is durable


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncPolicy:
    """Whether a Save runs inline (on the event loop: no thread hand-offs, ~0.4 ms less
    for a lone write) or on the disk thread (the loop keeps serving while it fsyncs, and
    requests arriving meanwhile form the next batch). Inline only for a small Save while
    the load is light and no other storage call is under way (the storage lock would
    block the loop)."""

    inline_max: int = 1  # entries; 0: never inline
    #: a follower's Save from the fast path runs inline up to this many bytes of entry data
    follower_bytes: int = 256 * 1024

    def inline(self, save: Save, *, in_flight: int, queued: int, disk_busy: bool) -> bool:
        return (
            save.snapshot is None
            and len(save.entries) <= self.inline_max
            and in_flight <= self.inline_max
            and not queued
            and not disk_busy
        )

    def follower_inline(self, save: Save, *, disk_busy: bool) -> bool:
        """A follower answering an Append on the fast path: its loop has nothing more
        urgent than that answer (the core holds one Ready at a time: the next Append
        waits for this one either way), so a Save of any number of entries runs inline
        up to ``follower_bytes`` of data; the hand-off to the disk thread and back costs
        the follower more CPU per batch than the fsync itself. Never with a snapshot,
        while another storage call is under way, or if ``inline_max`` is 0."""
        if self.inline_max == 0 or save.snapshot is not None or disk_busy:
            return False
        if len(save.entries) <= self.inline_max:
            return True
        return sum(len(e.data) for e in save.entries) <= self.follower_bytes


class ReadyPipeline(Generic[T]):
    """Processes the core's Readies for one node; see the module docstring."""

    def __init__(
        self,
        core: RaftCore,
        storage: RaftStorage,
        sm: KvStateMachine,
        send: Callable[[Message], None],
        sink: Sink[T],
        *,
        durable_hs: HardState,
        snapshot_entries: int,
    ) -> None:
        self.core = core
        self.storage = storage
        self.sm = sm
        self.send = send
        self.sink = sink
        self.snapshot_entries = snapshot_entries
        #: index of the state the state machine holds (restored snapshot + applied entries)
        self.applied = core.applied_index
        self.durable_hs = durable_hs
        self.lazy_hs: HardState | None = None  # a commit-only change not yet durable
        #: proposals by log index: (term proposed in, token)
        self.proposals: dict[int, tuple[int, T]] = {}
        self.reads: dict[int, T] = {}  # read id -> token, until the core releases it
        self.waiting: list[tuple[int, T]] = []  # released: (read point, token)
        self._next_read = 1

    # -- requests ------------------------------------------------------------------
    def propose(self, datas: Sequence[bytes], tokens: Sequence[T]) -> bool:
        """Hand commands to the core as one batch; False (nothing proposed) if this node
        cannot take proposals (not leader, or transferring leadership)."""
        idxs = self.core.propose_batch(datas)
        if idxs is None:
            return False
        term = self.core.term
        for idx, token in zip(idxs, tokens, strict=True):
            self.proposals[idx] = (term, token)
        return True

    def read(self, token: T) -> bool:
        """Ask for a linearizable read point; False if none can be had here."""
        rid = self._next_read
        self._next_read += 1
        if not self.core.read_index(rid):
            return False
        self.reads[rid] = token
        return True

    @property
    def in_flight(self) -> int:
        return len(self.proposals)

    # -- the three steps -----------------------------------------------------------
    def begin(self, rd: Ready) -> Save | None:
        """Step 1: send the Appends; return what must be made durable, if anything."""
        for m in rd.messages:
            if isinstance(m, Append):
                self.send(m)
        hs = rd.hard_state
        durable = self.durable_hs
        if (
            hs is not None
            and not rd.entries
            and rd.snapshot is None
            and not rd.recovered
            and (hs.term, hs.vote) == (durable.term, durable.vote)
        ):
            self.lazy_hs = hs  # only the commit index moved (see the module docstring)
            return None
        if hs is None:
            if not (rd.entries or rd.snapshot is not None or rd.recovered):
                return None
            hs = self.lazy_hs
        return Save(hard_state=hs, entries=rd.entries, snapshot=rd.snapshot, recovered=rd.recovered)

    def persist(self, save: Save) -> None:
        """Step 2: the disk I/O (may run on another thread; touches only storage)."""
        self.storage.save(save.hard_state, save.entries, save.snapshot)
        if save.recovered:
            self.storage.mark_recovered()

    def finish(self, rd: Ready, save: Save | None, *, send: bool = True) -> None:
        """Step 3, once ``save`` is durable (see the module docstring)."""
        if save is not None and save.hard_state is not None:
            self.durable_hs = save.hard_state
            if self.lazy_hs is not None and self.lazy_hs.commit <= save.hard_state.commit:
                self.lazy_hs = None
        if send:
            self.send_promises(rd)
        if rd.snapshot is not None:
            self._restore(rd.snapshot)
        for e in rd.committed_entries:
            self._apply(e)
        for rs in rd.read_states:
            token = self.reads.pop(rs.request_id, None)
            if token is not None:
                self.waiting.append((rs.index, token))
        for rid in rd.dropped_reads:
            token = self.reads.pop(rid, None)
            if token is not None:
                self.sink.read_failed(
                    token,
                    "no leader confirmed the read point (leadership changed, or the leader "
                    "is unreachable); read not served, retry",
                )
        self._release_reads()
        self.core.advance(rd)
        self._check_leadership()

    def send_promises(self, rd: Ready) -> None:
        """The messages that promise durable state (everything but Appends)."""
        for m in rd.messages:
            if not isinstance(m, Append):
                self.send(m)

    # -- applying ------------------------------------------------------------------
    def _restore(self, snap: Snapshot) -> None:
        self.sm.restore(snap.data)
        self.applied = snap.meta.index
        for idx in [i for i in self.proposals if i <= snap.meta.index]:
            _, token = self.proposals.pop(idx)
            self.sink.proposal_failed(
                token, False, "this node installed a snapshot past the write; outcome unknown"
            )

    def _apply(self, e: Entry) -> None:
        if e.index <= self.applied:
            return  # covered by a snapshot restored meanwhile
        result = self.sm.apply(e.index, e.data) if e.kind is EntryKind.COMMAND else None
        self.applied = e.index
        pend = self.proposals.pop(e.index, None)
        if pend is None:
            return
        term, token = pend
        if term != e.term or result is None:
            self.sink.proposal_failed(
                token,
                True,
                "the write was overwritten by a new leader before it committed; not applied "
                "(retry)",
            )
        else:
            self.sink.proposal_done(token, result, e.index)

    def _release_reads(self) -> None:
        if not self.waiting:
            return
        still = []
        for idx, token in self.waiting:
            if idx <= self.applied:
                self.sink.read_ready(token, idx)
            else:
                still.append((idx, token))
        self.waiting = still

    def _check_leadership(self) -> None:
        # (whether or not a Ready ever saw this node lead: it may have become leader,
        # taken proposals and lost leadership again between two Readies)
        if self.proposals and self.core.role is not Role.LEADER:
            pending, self.proposals = self.proposals, {}
            for _, token in pending.values():
                self.sink.proposal_failed(
                    token,
                    False,
                    "this node lost leadership while the write was in flight; a new leader "
                    "may still commit it (outcome unknown)",
                )

    # -- compaction ----------------------------------------------------------------
    def compaction_due(self) -> Snapshot | None:
        """A snapshot of the applied state to compact the log to, when it grew past the
        threshold (persist it with ``storage.compact``, then call ``compacted``)."""
        core = self.core
        applied = core.applied_index
        if applied - core.first_index < self.snapshot_entries or applied != self.applied:
            return None
        term = core.log_term(applied)
        if term is None:
            return None
        return Snapshot(SnapshotMeta(applied, term), self.sm.snapshot())

    def compacted(self, snap: Snapshot) -> None:
        self.core.compact(snap.meta.index, snap.data)

    # -- giving up -----------------------------------------------------------------
    def fail_all(self, reason: str) -> None:
        """Answer everything in flight (the node stops, or its disk failed)."""
        proposals, self.proposals = self.proposals, {}
        for _, token in proposals.values():
            self.sink.proposal_failed(token, False, f"{reason}; the write may still commit")
        reads = [*self.reads.values(), *(t for _, t in self.waiting)]
        self.reads, self.waiting = {}, []
        for token in reads:
            self.sink.read_failed(token, f"{reason}; read not served")
