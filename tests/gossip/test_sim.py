"""Randomized simulation of the production core, commit path (gossip.pipeline), storage
(on a SimDisk) and codec: network faults, crashes (also in the middle of a commit or a
compaction), full disks, fsync errors, event-loop stalls, big values; then heal,
convergence, and the end state against the client history (acknowledged writes kept at
every restart, each request counted once).

A failing seed is printed with a one-line replay command:
``CAPLAB_SEED=<seed> .venv/bin/pytest tests/gossip/test_sim.py -k replay``.
``CAPLAB_SOAK=1`` enables the ``soak`` test with many more seeds.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gossip.core import GossipConfig
from gossip.crdt import Register
from gossip.sim import Sim, SimResult, run_random

SEEDS = 1000
CHUNK = 50
CONVERGE_MAX_MS = 20_000  # 200 gossip rounds after heal
REPLAY = "CAPLAB_SEED={seed} .venv/bin/pytest tests/gossip/test_sim.py -k replay"


def _run_seeds(seeds: range) -> list[SimResult]:
    results = [run_random(s, converge_max_ms=CONVERGE_MAX_MS) for s in seeds]
    failed = [r for r in results if r.errors]
    if failed:
        lines = [
            f"seed {r.seed}: {r.errors[0]} ({len(r.errors)} errors); replay: "
            + REPLAY.format(seed=r.seed)
            for r in failed
        ]
        pytest.fail("\n".join(lines))
    return results


@pytest.mark.parametrize("chunk", range(SEEDS // CHUNK))
def test_random_faults_then_heal(chunk: int) -> None:
    results = _run_seeds(range(chunk * CHUNK, (chunk + 1) * CHUNK))
    # the scenarios really exercise the paths under test
    assert sum(r.acked for r in results) > 10 * CHUNK
    assert sum(r.collected for r in results) > 0, "no tombstone was ever collected"
    # requests applied on two nodes met and were merged as one; retries were answered
    assert sum(r.duplicates for r in results) > 0, "no duplicate application was merged"
    assert sum(r.replays for r in results) > 0, "no retry was answered from its record"
    assert all(r.converged_ms is not None for r in results)


def test_the_seeds_exercise_every_fault() -> None:
    """The shell's faults really fire in the seeds `make test` runs (a fault that never
    fires tests nothing): crashes in the middle of a disk operation, full disks, fsync
    errors, compactions, event-loop stalls, 1 MiB-class values."""
    results = [run_random(s) for s in range(0, SEEDS, 10)]
    faults = (
        "crashes",
        "disk_full",
        "fatal",
        "compactions",
        "stalls",
        "big_values",
        "clock_steps",
        "records_collected",
    )
    for name in faults:
        assert sum(getattr(r, name) for r in results) > 0, f"no {name} in 100 seeds"
    assert not [r.errors for r in results if r.errors]


def test_a_seed_replays_exactly() -> None:
    assert run_random(17) == run_random(17)


def test_replay() -> None:
    seed = os.environ.get("CAPLAB_SEED")
    if seed is None:
        pytest.skip("set CAPLAB_SEED to replay one seed")
    r = run_random(int(seed), converge_max_ms=CONVERGE_MAX_MS)
    print(f"seed {r.seed}: ops={r.ops} acked={r.acked} converged after {r.converged_ms} ms")
    assert not r.errors, "\n".join(r.errors)


SOAK = bool(os.environ.get("CAPLAB_SOAK"))


@pytest.mark.soak
@pytest.mark.skipif(not SOAK, reason="set CAPLAB_SOAK=1")
@pytest.mark.parametrize("chunk", range(100) if SOAK else range(1))
def test_soak(chunk: int) -> None:
    """50,000 more seeds (about 50 minutes on one core)."""
    base = 1_000_000 + chunk * 500
    _run_seeds(range(base, base + 500))


@pytest.mark.parametrize(
    "seed",
    [
        # a maybe-write (its node failed during the commit) whose timestamp the restarted
        # node issued again: proof that it was not durable (the checker took it for the
        # write in effect)
        1014017,
        1023835,
        1044761,
        # a range of the delta log given up by a go-back, its late ack lost, never sent
        # again (a tombstone never learnt its last holder: no agreement, ever)
        1026696,
        1030790,
    ],
)
def test_soak_seeds_that_failed_once(seed: int) -> None:
    _run_seeds(range(seed, seed + 1))


@pytest.mark.parametrize("seed", range(5))
def test_tombstone_survives_long_isolation(seed: int) -> None:
    """A node isolated with the old value long past the GC age must not resurrect it."""
    cfg = GossipConfig(tombstone_min_age_ms=500, merkle_depth=2)
    sim = Sim(seed, 3, cfg)
    sim.client_op("n0", "put", "k", value=b"old")
    assert sim.wait_converged(10_000) is not None
    sim.partition("none")
    sim.blocked = {frozenset(("n2", "n0")), frozenset(("n2", "n1"))}
    sim.advance(100)
    sim.client_op("n0", "delete", "k")
    sim.advance(6_000)  # >> min age (+ the collected-memory window): n2 lacks the tombstone
    for n in ("n0", "n1"):
        core = sim.cores[n]
        assert core is not None and core.tombstone_count() == 1
        assert core.stats.tombstones_collected == 0
    sim.heal()
    assert sim.wait_converged(10_000) is not None
    sim.advance(3_000)
    assert sim.wait_converged(10_000) is not None
    for core in sim.live():
        v = core.get("k")
        assert v is None or (isinstance(v, Register) and v.value is None)
    assert sum(c.stats.tombstones_collected for c in sim.live()) == 3
    assert not sim.check()


@pytest.mark.parametrize("seed", range(3))
def test_a_restarted_node_does_not_reinsert_tombstones_the_others_collected(seed: int) -> None:
    """The others collected the deletes while n4 was down and forgot them after 20 s;
    n4 came back with the tombstones and pushed them to everyone, who then collected
    them again one by one: the replicas' states differed for seconds (34-37 s in 5-node
    harness runs) although their live keys agreed (issue 13)."""
    cfg = GossipConfig(anti_entropy_interval_ms=5000, tombstone_min_age_ms=10_000, merkle_depth=3)
    sim = Sim(seed, 5, cfg, max_skew_ms=0)
    for i in range(200):
        sim.client_op("n0", "put", f"k{i}", value=b"v")
    sim.advance(2000)
    for i in range(200):
        sim.client_op("n0", "delete", f"k{i}")
    sim.advance(3000)  # every node holds the tombstones
    sim.crash("n4")
    sim.advance(40_000)  # the others collect them (10 s) and, before, forgot them (20 s)
    assert [c.tombstone_count() for c in sim.live()] == [0, 0, 0, 0]
    sim.restart("n4")
    waited = 0
    while not (sim.converged() and all(c.tombstone_count() == 0 for c in sim.live())):
        others = [c.tombstone_count() for c in sim.live() if c.node_id != "n4"]
        assert others == [0, 0, 0, 0], f"re-inserted after {waited} ms: {others}"
        assert waited < 2000, "no single state within 2 s of the restart"
        sim.advance(100)
        waited += 100
    assert not sim.check()


def test_a_seed_replays_exactly_in_another_process() -> None:
    """Set iteration order depends on the hash seed of the process: records collected in
    set order reached the log and the disk in a different order, and seeds 162 and 173
    ran differently from one process to the next (a printed seed must replay)."""
    code = (
        "from caplab.logs import configure_logging\n"
        "configure_logging(level='critical')\n"
        "from gossip.sim import run_random\n"
        "for s in (162, 173):\n"
        "    r = run_random(s)\n"
        "    print(s, r.converged_ms, r.collected, r.records_collected, r.duplicates)\n"
    )
    runs = [
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": str(h)},
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        ).stdout
        for h in (1, 2)
    ]
    assert runs[0] == runs[1] and runs[0]
