"""Parameters and counters shared by the gossip core and its protocol modules.

``GossipConfig`` and ``Stats`` are re-exported by ``gossip.core`` (their public home);
they live here so that the protocol modules (``membership``, ``deltaflow``,
``antientropy``, ``collection``) can use them without importing the core. ``Send`` is how
every module emits a message: a callback into the core, which counts and queues it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from caplab.validation import MAX_CLOCK_SKEW_MS
from gossip.messages import Message

__all__ = ["GossipConfig", "Send", "Stats"]

Send = Callable[[Message], None]


@dataclass(frozen=True, slots=True)
class GossipConfig:
    """Timing and size parameters. All durations in milliseconds."""

    gossip_interval_ms: int = 100
    fanout: int = 3
    anti_entropy_interval_ms: int = 1000
    ping_interval_ms: int = 200  # must exceed ping_timeout_ms
    ping_timeout_ms: int = 100
    indirect_k: int = 3
    suspicion_timeout_ms: int = 1000
    dead_ping_every: int = 5  # a dead member is probed once per this many of its turns
    retransmit_mult: int = 3
    max_piggyback: int = 8  # membership updates per ping/ack
    tombstone_min_age_ms: int = 10_000  # also the assumed bound on message delay
    # How long a collected tombstone is remembered (entries it dominates are dropped, and
    # a member that still holds it is told it may collect it too): long enough for a
    # restarted member to come back with tombstones the others collected meanwhile,
    # without re-inserting them everywhere (each then collected again, at different times).
    collected_memory_ms: int = 300_000
    gc_interval_ms: int = 1000  # tombstone collection runs this often
    tombstone_grace_ms: int = 7 * 24 * 3600 * 1000  # forced GC: may resurrect (see module doc)
    # Exactly once (Applied records): per client, the records of its last ``dedup_window``
    # sequences are kept (older ones: a retry is answered "too old"); a client's records
    # are all dropped ``dedup_ttl_ms`` after its latest one (a retry later than that is a
    # new request). Records are collected like tombstones: once every member holds them.
    dedup_window: int = 128
    dedup_ttl_ms: int = 3_600_000
    delta_log_max: int = 10_000  # keys
    delta_batch_max: int = 1_000  # keys per Deltas message
    # Flow control of delta gossip, per peer: at most this many unacknowledged Deltas
    # (each continues where the previous one ended: pipelining) ...
    deltas_window: int = 4
    # ... and when the oldest is unacknowledged for this long, the window is re-sent from
    # the peer's last acknowledged position (go-back-N).
    deltas_resend_ms: int = 1000
    # How long an anti-entropy round may take before it is presumed lost (the repair-mode
    # windows below count in these too); never more than the interval.
    ae_round_timeout_ms: int = 1000
    ae_max_nodes: int = 4096  # differing tree nodes followed per level per round
    # Bulk anti-entropy: instead of descending further, ship the items under the differing
    # nodes once they hold at most this many keys each (estimated from the local key count).
    ae_bulk_keys: int = 8
    ae_chunk_items: int = 2_000  # items per AeItems(reply=True) message (about)
    # Repair mode: a peer that comes back (suspect/dead -> alive) gets no delta stream; it is
    # repaired by back-to-back anti-entropy rounds until one finds equal roots (the ack of
    # the whole log), at most this many rounds or for this long.
    repair_max_rounds: int = 4
    repair_max_ms: int = 5000
    merkle_depth: int = 4
    # A remote timestamp further ahead of the local physical clock than this is still
    # followed (the HLC moves to it, so later local writes order after it: read-your-writes
    # holds on every node), but counted and logged as a clock jump: some node's clock is
    # wrong, and every clock now runs ahead of physical time by the jump.
    max_drift_ms: int = 60_000
    # Hard bound of the above: an entry (register, tombstone, Applied record, stable mark)
    # whose timestamp is more than this ahead of the local wall clock is quarantined: not
    # merged, not relayed, the clock not moved (counted in Stats.entries_quarantined).
    # Legitimate leads are up to two days: the Admin service may skew a clock by up to a
    # day either way (caplab.validation.MAX_CLOCK_SKEW_MS), so the sender may run a day
    # ahead and this node a day behind; an hour more for real clock errors. A forged
    # timestamp (a buggy or compromised member: a year ahead) would otherwise win every
    # later write to its key until the cluster's clocks caught up with it, and drag every
    # clock of the cluster along. An entry quarantined here is taken once this node's
    # clock is within the bound of it (anti-entropy ships it again), so a legitimate lead
    # beyond the bound delays an entry, never loses it.
    max_future_ms: int = 2 * MAX_CLOCK_SKEW_MS + 3_600_000
    # SWIM: a membership update whose incarnation is more than this above the highest
    # incarnation this node knows for that member (or for itself) is refused (counted in
    # Stats.membership_updates_refused): an incarnation only grows by one per refutation,
    # so this many refutations would be needed (see gossip.membership, "Bounded
    # incarnations"), while one forged update could otherwise push a member's incarnation
    # to the end of the number space, where it can no longer refute.
    max_incarnation_step: int = 1_000_000
    # Estimated bytes (messages.wire_size) of the entries one Deltas or AeItems carries:
    # at least one entry, so any legal value (up to 1 MiB) travels; the shell's receivers
    # accept a few times this.
    max_message_bytes: int = 1 << 20


@dataclass(slots=True)
class Stats:
    """Monotone counters for the shell's Status."""

    deltas_sent: int = 0  # Deltas messages
    delta_entries_sent: int = 0
    deltas_received: int = 0
    delta_entries_received: int = 0
    ae_rounds_started: int = 0
    ae_rounds_completed: int = 0
    ae_items_sent: int = 0
    ae_items_received: int = 0
    lww_overwrites: int = 0
    type_conflict_overwrites: int = 0
    tombstones_collected: int = 0
    tombstones_force_collected: int = 0  # by grace period (subset of the above)
    records_collected: int = 0  # Applied records (exactly once) collected
    # the same request met here applied on two nodes (each detection; the later
    # application is settled, see "Exactly once")
    duplicates_merged: int = 0
    # remote timestamps more than max_drift_ms ahead of the local physical clock, which
    # the HLC followed all the same (see GossipConfig.max_drift_ms)
    clock_jumps: int = 0
    max_clock_jump_ms: int = 0  # the largest such lead seen
    # entries (registers, records, stable marks) received with a timestamp more than
    # max_future_ms ahead of the local wall clock: not merged (each arrival counted;
    # see GossipConfig.max_future_ms), and the largest such lead seen
    entries_quarantined: int = 0
    max_quarantined_lead_ms: int = 0
    # SWIM updates refused for an absurd incarnation (beyond messages.MAX_INCARNATION, or
    # more than max_incarnation_step above the highest known): forged or corrupt
    membership_updates_refused: int = 0
    peers_fell_behind: int = 0
    register_conflicts: int = 0  # equal timestamps, different values: corrupt or forged
