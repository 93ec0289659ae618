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


class _Replicas:
    """Status answers of three nodes, as the digest sampler asks for them. ``digests`` is
    what each node answers now; while ``hold`` is set, n3's answer waits for it to clear
    (a Status call in flight)."""

    def __init__(self) -> None:
        self.digests = {"n1": "a", "n2": "a", "n3": "a"}
        self.hold: asyncio.Event | None = None
        self.held = 0  # n3's calls now waiting

    async def status(self, *, endpoint: str) -> object:
        import types

        node = endpoint
        digest = self.digests[node]  # the state when the call arrives
        if node == "n3" and self.hold is not None:
            self.held += 1
            await self.hold.wait()
            self.held -= 1
        return types.SimpleNamespace(
            state_digest=digest.encode(),
            leader_id="",
            term=0,
            applied_index=0,
            counters={"tombstones": 0, "tombstones_collected": 0},
            keys=10**6,  # more than the sampler dumps
        )


def _sampling(run: StoreRun, replicas: _Replicas) -> None:
    """Start ``run``'s real digest sampler against ``replicas``."""
    import types

    run.cluster = types.SimpleNamespace(  # type: ignore[assignment]
        nodes={"n1": 0, "n2": 0, "n3": 0}, endpoints={n: n for n in ("n1", "n2", "n3")}
    )
    run._status_client = replicas  # type: ignore[assignment]
    run.t0_ns = time.monotonic_ns()
    run.dir.mkdir(parents=True)
    run._digest_file = open(run.digests_path, "w", encoding="utf-8")  # noqa: SIM115
    run._tasks.append(asyncio.create_task(run._sample_digests()))


async def test_the_sampler_stops_only_on_agreeing_replicas(tmp_path: Path) -> None:
    """The sample in flight when the run ends is written too. In CI a spectrum run failed
    "the replicas did not converge" so: they agreed, then a node's background write (its
    stable mark) was caught by that last sample, and the sampler stopped on it (seed 6 of
    gossip-crash-restart-short, the same). The sampler itself now stops, and only right
    after two consecutive agreeing samples; never again agreeing, it stops at the time
    limit on a disagreeing one, and the run keeps the evidence."""
    from harness.checker.convergence import check_convergence
    from harness.scenario import load_scenario
    from tests.polling import eventually

    sc = load_scenario(SMOKE)
    run = StoreRun(sc, "gossip", tmp_path)
    replicas = _Replicas()
    _sampling(run, replicas)

    def samples() -> list[tuple[int, dict[str, str | None]]]:
        lines = run.digests_path.read_text(encoding="utf-8").splitlines()
        return [(d["time_ns"], d["digests"]) for d in map(json.loads, lines)]

    await eventually(lambda: run._samples_taken >= 2, 10)
    # n3 writes its stable mark; the sample now asking n3 is in flight as the run ends
    replicas.hold = asyncio.Event()
    replicas.digests = {"n1": "a", "n2": "a", "n3": "b"}
    await eventually(lambda: replicas.held == 1, 10)
    stopping = asyncio.create_task(run._stop_sampler(agreeing_within=10.0))
    # the stop is asked for while the sample is in flight
    await eventually(lambda: run._stop_agreeing_by is not None, 10)
    taken = run._samples_taken
    replicas.digests = {"n1": "b", "n2": "b", "n3": "b"}  # the mark spreads
    hold, replicas.hold = replicas.hold, None
    hold.set()
    assert await stopping
    assert run._samples_taken >= taken + 3  # the disagreeing sample and two agreeing ones
    rows = samples()
    assert len(set(rows[-1][1].values())) == 1 and rows[-1][1]["n1"] == b"b".hex()
    assert any(len(set(d.values())) == 2 for _, d in rows)
    assert check_convergence(rows, rows[0][0]).converged

    # the replicas never agree again: the sampler stops at the limit, and says so
    run2 = StoreRun(sc, "gossip", tmp_path / "again")
    replicas.digests = {"n1": "a", "n2": "b", "n3": "b"}
    _sampling(run2, replicas)
    assert not await run2._stop_sampler(agreeing_within=0.3)
    assert run2._tasks[0].done()
