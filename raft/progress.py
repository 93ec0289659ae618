"""The leader's view of one follower (etcd-io/raft ``tracker/progress.go``).

Theory of operation
-------------------
``match`` is the highest index known to be durable on the follower (it only moves back
when the follower proves it lost entries: a disk wiped or replaced); ``next`` is the next
index to send. The state says how to send:

* PROBE: one Append in flight until it is answered (after a reject, on a new leader);
* REPLICATE: optimistic pipelining of up to ``max_inflight`` Appends, ``inflight`` holding
  the last index of each;
* SNAPSHOT: an InstallSnapshot is on its way; nothing else is sent until it is answered.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum


class PState(Enum):
    PROBE = 0
    REPLICATE = 1
    SNAPSHOT = 2


@dataclass(slots=True)
class Progress:
    """Leader's view of one follower (etcd tracker.Progress)."""

    match: int
    next: int
    state: PState = PState.PROBE
    probe_sent: bool = False  #: PROBE: an Append is in flight, wait for its answer.
    inflight: deque[int] = field(default_factory=deque)  #: last index of each in-flight msg.
    pending_snapshot: int = 0  #: SNAPSHOT: index of the snapshot sent.
    recent_active: bool = False  #: heard from it in the current check-quorum window.
    stall: int = 0  #: ticks spent behind without progress.

    def become_probe(self) -> None:
        if self.state is PState.SNAPSHOT:
            self.next = max(self.match + 1, self.pending_snapshot + 1)
        else:
            self.next = self.match + 1
        self.state = PState.PROBE
        self.probe_sent = False
        self.inflight.clear()
        self.pending_snapshot = 0
        self.stall = 0

    def become_replicate(self) -> None:
        self.state = PState.REPLICATE
        self.next = self.match + 1
        self.probe_sent = False
        self.inflight.clear()
        self.pending_snapshot = 0

    def become_snapshot(self, index: int) -> None:
        self.state = PState.SNAPSHOT
        self.pending_snapshot = index
        self.probe_sent = False
        self.inflight.clear()
        self.stall = 0

    def forget_match(self, next_index: int) -> None:
        """The follower answered a message anchored at ``match`` with a log that ends
        before it: it lost entries it had acknowledged (its disk was wiped or replaced).
        Forget ``match`` (it no longer counts towards commitment) and probe again from
        ``next_index``."""
        self.match = 0
        self.become_probe()
        self.next = max(1, next_index)
