"""The runner keeps every node's state when the replicas disagree at the end of a run."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from harness import cluster as cluster_module
from harness.runner import StoreRun
from harness.scenario import Scenario


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_dump_states_writes_status_and_entries(tmp_path: Path) -> None:
    run = StoreRun(Scenario(name="dumps", duration=1, nodes=3), "gossip", tmp_path)
    try:
        await run.setup()  # the cluster holds the readiness write
        await run._dump_states()
    finally:
        await run.close()
    assert not cluster_module._LIVE
    for node in ("n1", "n2", "n3"):
        doc = json.loads((tmp_path / "gossip" / "dumps" / f"{node}.json").read_text())
        assert doc["node"] == node and "error" not in doc
        assert doc["status"]["nodeId"] == node and doc["status"]["stateDigest"]
        if node == "n1":  # the readiness write went to n1 (the others may still get it)
            assert "__caplab_ready__" in [e["key"] for e in doc["entries"]]


SMOKE = Path(__file__).resolve().parents[2] / "scenarios" / "smoke.yaml"


async def test_the_sampler_stops_only_on_agreeing_replicas(tmp_path: Path) -> None:
    """After convergence and the tombstone wait, a node's background write made the last
    sample disagree; the sampler stopped there and the convergence checker failed the run
    (seed 6 of gossip-crash-restart-short). The end waits for agreement again."""
    import types

    from harness.scenario import load_scenario

    sc = load_scenario(SMOKE)
    run = StoreRun(sc, "gossip", tmp_path)
    run.cluster = types.SimpleNamespace(nodes={"n1": 0, "n2": 0, "n3": 0})  # type: ignore[assignment]

    def sample(digests: dict[str, str | None]) -> None:
        run._latest_digests = digests
        run._latest_time_ns = time.monotonic_ns() - run.t0_ns
        run._samples_taken += 1

    sample({"n1": "a", "n2": "a", "n3": "a"})
    assert await run._agree_at_the_end(0.5)
    sample({"n1": "a", "n2": "a", "n3": "b"})  # n3's stable mark, not yet spread

    async def spread() -> None:  # the sampler's cadence (not a wait for a condition)
        for _ in range(3):
            await asyncio.sleep(0.05)
            sample({"n1": "b", "n2": "b", "n3": "b"})

    task = asyncio.create_task(spread())
    assert await run._agree_at_the_end(5.0)
    await task
    sample({"n1": "a", "n2": "b", "n3": "b"})
    assert not await run._agree_at_the_end(0.3)  # never again: the evidence is dumped
