"""Randomized deterministic simulation of RaftCore clusters (see raft/sim.py).

Normal run: 1,000 seeds in 20 chunks. ``CAPLAB_SOAK=1`` (``make soak``) runs 20,000 seeds
with longer fault schedules. Replay one seed with
``CAPLAB_SEED=123 .venv/bin/pytest tests/raft/test_sim.py -k replay``.
"""

from __future__ import annotations

import os

import pytest

from raft.sim import run_seed

CHUNKS = 20
PER_CHUNK = 50
SOAK_CHUNKS = 100
SOAK_PER_CHUNK = 200


def _run(seed: int, *, soak: bool = False) -> None:
    try:
        sim = run_seed(seed, soak=soak)
    except Exception as e:
        soak_env = "CAPLAB_SOAK=1 " if soak else ""
        pytest.fail(
            f"seed {seed} failed: {e}\nreplay: {soak_env}CAPLAB_SEED={seed} "
            f".venv/bin/pytest tests/raft/test_sim.py -k replay",
            pytrace=False,
        )
    # The run must have done real work: writes committed and a leader at the end.
    assert any(op.f == "write" and op.type == "ok" for op in sim.ops)
    assert sim.leader() is not None


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_sim_seeds(chunk: int) -> None:
    for seed in range(chunk * PER_CHUNK, (chunk + 1) * PER_CHUNK):
        _run(seed)


@pytest.mark.soak
@pytest.mark.skipif(not os.environ.get("CAPLAB_SOAK"), reason="set CAPLAB_SOAK=1")
@pytest.mark.parametrize("chunk", range(SOAK_CHUNKS))
def test_sim_soak(chunk: int) -> None:
    base = 1_000_000
    for seed in range(base + chunk * SOAK_PER_CHUNK, base + (chunk + 1) * SOAK_PER_CHUNK):
        _run(seed, soak=True)


@pytest.mark.skipif(not os.environ.get("CAPLAB_SEED"), reason="set CAPLAB_SEED=<seed>")
def test_replay() -> None:
    _run(int(os.environ["CAPLAB_SEED"]), soak=bool(os.environ.get("CAPLAB_SOAK")))


def test_simulator_detects_violations() -> None:
    """The invariant checks are live: corrupting a node's applied entry is caught."""
    from raft.messages import Entry, EntryKind
    from raft.sim import InvariantViolation, Simulator

    sim = Simulator(7)
    for _ in range(60):
        sim.step_tick(faults=False, clients=True)
    idx = max(sim.applied_at)
    sim.applied_at[idx] = Entry(999, idx, EntryKind.COMMAND, b"bogus")
    n = next(n for n in sim.nodes.values() if n.core is not None)
    with pytest.raises(InvariantViolation, match="state machine safety"):
        n.applied = idx - 1
        sim._apply(n, Entry(1, idx, EntryKind.NOOP, b""))
