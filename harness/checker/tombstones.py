"""Tombstone collection, from the gossip store's Status counters sampled over the run.

Theory of operation
-------------------
A delete in the gossip store leaves a *tombstone* (a register with no value and the
delete's timestamp) that must reach every replica before it may go: a replica that missed
it would otherwise bring the deleted value back. A node collects a tombstone once every
member holds it and it is older than ``tombstone_min_age_ms`` (default 10 s).

The runner samples every node's ``Cluster.Status`` every ~100 ms (``digests.jsonl``); for
gossip each sample also carries two of its counters per node: ``tombstones`` (tombstones
the node holds now) and ``tombstones_collected`` (tombstones it collected since it last
started). After the clients stop and the replicas converge, the runner keeps sampling for
up to the scenario's ``tombstone_timeout`` until every node holds none.

``all_collected_at``: the first sample at or after the end of the workload from which on
every later sample has every node answering with 0 tombstones. With a
``tombstone_timeout`` the verdict is whether that point exists (every tombstone left by
the run was collected in time); without one the figures are only measured (``valid``
None).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from harness.checker.linearizable import Validity


@dataclass(frozen=True, slots=True)
class TombstoneResult:
    """Result of :func:`check_tombstones` (times in ns since run start)."""

    valid: Validity | None  # None: measured only (the run did not wait for collection)
    samples: int  # samples that carried tombstone counters
    max_held: int  # most tombstones one node held in one sample
    held_at_end: Mapping[str, int | None]  # first sample at/after the workload's end
    collected: Mapping[str, int | None]  # last sample: collected since each node's start
    all_collected_at_ns: int | None
    waited_s: float  # the scenario's tombstone_timeout

    @property
    def collected_total(self) -> int:
        return sum(v for v in self.collected.values() if v is not None)

    def summary(self) -> str:
        held = sum(v for v in self.held_at_end.values() if v is not None)
        lines = [
            f"tombstones: {self.valid} (at most {self.max_held} held by one node; "
            f"{held} held over all nodes when the clients stopped; {self.collected_total} "
            "collected over all nodes, each counted since its last start)"
        ]
        if self.all_collected_at_ns is not None:
            lines.append(f"every node held none from {self.all_collected_at_ns / 1e9:.3f}s on")
        elif self.waited_s > 0:
            lines.append(
                f"tombstones were still held {self.waited_s:g}s after the run "
                f"(held when the clients stopped: {dict(self.held_at_end)})"
            )
        return "\n".join(lines)


def _counts(sample: Mapping[str, Any], field: str) -> dict[str, int | None]:
    raw = sample.get(field)
    if not isinstance(raw, Mapping):
        return {}
    return {str(n): v if isinstance(v, int) else None for n, v in raw.items()}


def check_tombstones(
    samples: Sequence[Mapping[str, Any]], end_ns: int, *, timeout_s: float = 0.0
) -> TombstoneResult:
    """Tombstone figures of the samples (ordered by time) and, when the run waited
    ``timeout_s`` for collection, whether every node ended up holding none."""
    ordered = sorted(
        (s for s in samples if isinstance(s.get("tombstones"), Mapping)),
        key=lambda s: int(s["time_ns"]),
    )
    max_held = max((v or 0 for s in ordered for v in _counts(s, "tombstones").values()), default=0)
    after = [s for s in ordered if int(s["time_ns"]) >= end_ns]
    held_at_end = _counts(after[0], "tombstones") if after else {}
    collected = _counts(ordered[-1], "tombstones_collected") if ordered else {}
    at: int | None = None
    for s in reversed(after):
        held = _counts(s, "tombstones")
        if not held or any(v != 0 for v in held.values()):
            break
        at = int(s["time_ns"])
    valid: Validity | None = None
    if timeout_s > 0:
        valid = at is not None if ordered else "unknown"
    return TombstoneResult(
        valid=valid,
        samples=len(ordered),
        max_held=max_held,
        held_at_end=held_at_end,
        collected=collected,
        all_collected_at_ns=at,
        waited_s=timeout_s,
    )
