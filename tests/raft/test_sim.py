"""Randomized deterministic simulation of Raft clusters running the production pipeline
and storage on a simulated disk (see raft/sim.py); the histories are checked here.

Normal run: 1,000 seeds in 20 chunks, and 300 more with clusters of two.
``CAPLAB_SOAK=1`` (``make soak``) runs 20,000 seeds (and 2,000 of two) with longer fault
schedules. Replay one seed with
``CAPLAB_SEED=123 .venv/bin/pytest tests/raft/test_sim.py -k replay`` (with
``CAPLAB_NODES=2`` for a cluster of two).
"""

from __future__ import annotations

import os

import pytest

from harness.checker.linearizable import check_register
from harness.history import Operation
from raft.sim import SimOp, Simulator, run_seed

CHUNKS = 20
PER_CHUNK = 50
SOAK_CHUNKS = 100
SOAK_PER_CHUNK = 200


def as_operations(ops: list[SimOp]) -> list[Operation]:
    return [
        Operation(
            process=op.process,
            node=op.node,
            f=op.f,
            key=op.key,
            value=op.value,
            result=op.result,
            type=op.type,  # type: ignore[arg-type]
            invoke_time=op.invoke,
            complete_time=op.complete,
        )
        for op in ops
    ]


def check_linearizable(sim: Simulator) -> None:
    res = check_register(as_operations(sim.history()), timeout_s=20.0)
    if res.valid is not True:
        cex = res.counterexample
        raise AssertionError(
            f"history not linearizable ({res.valid}): {cex.reason if cex else res}"
        )


def _run(seed: int, *, soak: bool = False, nodes: int | None = None) -> Simulator:
    try:
        sim = run_seed(seed, soak=soak, nodes=nodes)
        check_linearizable(sim)
    except Exception as e:
        soak_env = "CAPLAB_SOAK=1 " if soak else ""
        nodes_env = f"CAPLAB_NODES={nodes} " if nodes else ""
        pytest.fail(
            f"seed {seed} failed: {e}\nreplay: {soak_env}{nodes_env}CAPLAB_SEED={seed} "
            f".venv/bin/pytest tests/raft/test_sim.py -k replay",
            pytrace=False,
        )
    # The run must have done real work: writes committed and a leader at the end.
    assert any(op.f == "write" and op.type == "ok" for op in sim.ops)
    assert sim.leader() is not None
    return sim


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_sim_seeds(chunk: int) -> None:
    for seed in range(chunk * PER_CHUNK, (chunk + 1) * PER_CHUNK):
        _run(seed)


def test_sim_two_node_clusters() -> None:
    """Clusters of two, where every commit and every election needs both nodes: a node
    that restarted blank (wiped, or new and never caught up) left the other unable to win
    an election for good, since the blank vote never made a majority of two."""
    for seed in range(300):
        _run(seed, nodes=2)


FAULTS = (
    "crashes",
    "wipes",
    "recovered",
    "compactions",
    "disk_full",
    "fatal_disk",
    "loop_stalls",
    "stream_stalls",
    "reads_served",
)


def test_the_seeds_exercise_every_fault() -> None:
    """The simulator's faults really happen (a fault that never fires tests nothing): the
    first seeds, up to 300, show every one (wipes are the rarest: they wait for every
    node to hold its state)."""
    counts: dict[str, int] = {}
    for seed in range(300):
        sim = _run(seed)
        for k, v in sim.counts.items():
            counts[k] = counts.get(k, 0) + v
        counts["reads_served"] = counts.get("reads_served", 0) + sum(
            op.f == "read" and op.type == "ok" for op in sim.ops
        )
        if seed >= 59 and all(counts.get(f, 0) > 0 for f in FAULTS):
            break
    for fault in FAULTS:
        assert counts.get(fault, 0) > 0, (fault, counts)


@pytest.mark.soak
@pytest.mark.skipif(not os.environ.get("CAPLAB_SOAK"), reason="set CAPLAB_SOAK=1")
@pytest.mark.parametrize("chunk", range(SOAK_CHUNKS))
def test_sim_soak(chunk: int) -> None:
    base = 1_000_000
    for seed in range(base + chunk * SOAK_PER_CHUNK, base + (chunk + 1) * SOAK_PER_CHUNK):
        _run(seed, soak=True)
    for seed in range(base + chunk * 20, base + (chunk + 1) * 20):
        _run(seed, soak=True, nodes=2)


@pytest.mark.skipif(not os.environ.get("CAPLAB_SEED"), reason="set CAPLAB_SEED=<seed>")
def test_replay() -> None:
    _run(
        int(os.environ["CAPLAB_SEED"]),
        soak=bool(os.environ.get("CAPLAB_SOAK")),
        nodes=int(os.environ.get("CAPLAB_NODES") or 0) or None,
    )


def test_simulator_detects_violations() -> None:
    """The invariant checks are live: replicas that differ at one applied index are caught."""
    from raft.sim import InvariantViolation

    sim = Simulator(7)
    for _ in range(80):
        sim.step_tick(faults=False, clients=True)
    nodes = [n for n in sim.nodes.values() if n.pipe is not None]
    a, b = nodes[0], nodes[1]
    assert a.pipe is not None and b.pipe is not None
    b.pipe.applied = a.pipe.applied
    b.sm._set("intruder", b"x", 1)
    with pytest.raises(InvariantViolation, match="state machine safety"):
        sim.check_replicas_agree()


def test_the_checker_rejects_a_stale_read() -> None:
    """The history check is live: a read served from an old state is not linearizable."""
    ops = [
        SimOp(0, "n1", "write", "k0", "v1", invoke=1, result=None, type="ok", complete=2),
        SimOp(1, "n2", "read", "k0", None, invoke=3, result=None, type="ok", complete=4),
    ]

    class Fake:
        def history(self) -> list[SimOp]:
            return ops

    with pytest.raises(AssertionError, match="not linearizable"):
        check_linearizable(Fake())  # type: ignore[arg-type]
