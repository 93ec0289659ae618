"""The runner keeps every node's state when the replicas disagree at the end of a run."""

from __future__ import annotations

import json
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
