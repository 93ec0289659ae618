"""Hybrid logical clock (Kulkarni, Demirbas et al., "Logical Physical Clocks", 2014).

Theory of operation
-------------------
A timestamp is ``(wall_ms, logical, node)``. ``wall_ms`` tracks the largest physical time
this node has heard of (its own clock or a remote timestamp), ``logical`` counts events
that happened within the same ``wall_ms`` and ``node`` breaks the remaining ties, so
timestamps are totally ordered and unique per node.

* ``now(pt)`` (local or send event): ``wall = max(wall, pt)``; ``logical`` is incremented
  if ``wall`` did not move, else reset to 0.
* ``update(remote, pt)`` (receive event): ``wall = max(wall, remote.wall, pt)`` with the
  logical rule of the paper. Every later ``now`` is therefore strictly greater than
  ``remote`` even if the local physical clock is far behind: causality is preserved.

The physical time is always passed in (the shell may add an injected skew); the clock never
reads a real clock.

Bounds (documented choices):

* Drift: ``update`` refuses (``ClockDriftError``) a remote timestamp more than
  ``max_drift_ms`` ahead of the local physical time, leaving the clock untouched, so the
  caller decides. The gossip core follows it all the same with ``observe`` (a value it
  merges must never outrank the later local writes) and counts it as a clock jump, up to
  a hard bound (``GossipConfig.max_future_ms``, two days and an hour): an entry further
  ahead is quarantined (never merged, never observed), so one forged timestamp cannot
  move every clock of the cluster years ahead.
* Peer input: a timestamp from a peer has ``0 <= wall_ms < MAX_WALL_MS``, ``0 <= logical
  <= DEFAULT_MAX_LOGICAL`` (no clock issues more, see below) and a node id of 1 to
  ``MAX_NODE_ID_BYTES`` bytes (``gossip.codec`` refuses anything else).
* Logical counter: if ``logical`` would exceed ``max_logical`` the clock "borrows" one
  millisecond from the future (``wall += 1``, ``logical = 0``). Monotonicity is kept; the
  clock runs ahead of physical time by at most ``events / max_logical`` ms, which never
  happens in practice with the default 2**31 - 1.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_DRIFT_MS = 60_000
DEFAULT_MAX_LOGICAL = 2**31 - 1
# Bounds of a timestamp received from a peer (gossip.codec): a physical time below 2**62
# ms (146 million years: room for any skew, and ``wall + 1`` never nears int64 in the
# storage's and Merkle's encodings), and the node ids of the cluster (caplab.security
# allows letters, digits, '.', '_', '-'; 128 bytes is far more than any real id).
MAX_WALL_MS = 2**62
MAX_NODE_ID_BYTES = 128


@dataclass(frozen=True, slots=True, order=True)
class Timestamp:
    """A hybrid logical timestamp; ordered by ``(wall_ms, logical, node)``."""

    wall_ms: int  # milliseconds; never decreases on one node
    logical: int  # 0 <= logical <= max_logical
    node: str  # issuing node id: tie-break, makes timestamps unique per node


class ClockDriftError(Exception):
    """A remote timestamp is further ahead of the local physical clock than allowed."""

    def __init__(self, remote: Timestamp, physical_ms: int, max_drift_ms: int) -> None:
        super().__init__(
            f"remote timestamp {remote} is {remote.wall_ms - physical_ms} ms ahead of the "
            f"local clock (max drift {max_drift_ms} ms)"
        )
        self.remote = remote
        self.physical_ms = physical_ms


class HLC:
    """Hybrid logical clock of one node. Pure: physical time is an argument."""

    __slots__ = ("_logical", "_wall", "max_drift_ms", "max_logical", "node")

    def __init__(
        self,
        node: str,
        *,
        max_drift_ms: int = DEFAULT_MAX_DRIFT_MS,
        max_logical: int = DEFAULT_MAX_LOGICAL,
    ) -> None:
        self.node = node
        self.max_drift_ms = max_drift_ms
        self.max_logical = max_logical
        self._wall = 0
        self._logical = 0

    def peek(self) -> Timestamp:
        """The last timestamp issued or observed (does not advance the clock)."""
        return Timestamp(self._wall, self._logical, self.node)

    def _set(self, wall: int, logical: int) -> Timestamp:
        if logical > self.max_logical:
            wall, logical = wall + 1, 0
        self._wall, self._logical = wall, logical
        return Timestamp(wall, logical, self.node)

    def now(self, physical_ms: int) -> Timestamp:
        """Timestamp a local or send event; strictly greater than every earlier result."""
        wall = max(self._wall, physical_ms)
        logical = self._logical + 1 if wall == self._wall else 0
        return self._set(wall, logical)

    def update(self, remote: Timestamp, physical_ms: int) -> Timestamp:
        """Receive event: returns a timestamp greater than both ``remote`` and the clock.

        Raises ``ClockDriftError`` (clock unchanged) if ``remote`` is more than
        ``max_drift_ms`` ahead of ``physical_ms``.
        """
        if remote.wall_ms - physical_ms > self.max_drift_ms:
            raise ClockDriftError(remote, physical_ms, self.max_drift_ms)
        return self.observe(remote, physical_ms)

    def observe(self, remote: Timestamp, physical_ms: int) -> Timestamp:
        """Like ``update`` without the drift check (used when restoring durable state)."""
        wall = max(self._wall, remote.wall_ms, physical_ms)
        if wall == self._wall and wall == remote.wall_ms:
            logical = max(self._logical, remote.logical) + 1
        elif wall == self._wall:
            logical = self._logical + 1
        elif wall == remote.wall_ms:
            logical = remote.logical + 1
        else:
            logical = 0
        return self._set(wall, logical)
