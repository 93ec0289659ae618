"""The gossip convergence benchmark (``python -m harness.bench_convergence``), small.

The full benchmark (5 nodes, 10,000 keys per side) takes about half a minute; here its
two parts run on small inputs so that a change that breaks it shows up in ``make test``.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import pytest

from harness import bench_convergence as bench
from harness import cluster as cluster_module


def test_anti_entropy_cost_of_identical_and_differing_replicas() -> None:
    same_bytes, _, same_rounds = bench.ae_cost(2_000, 0)
    assert same_rounds == 1 and same_bytes <= 1024, "identical replicas: one cheap round"
    diff_bytes, _, _ = bench.ae_cost(2_000, 10)  # raises unless the replicas end equal
    assert diff_bytes > same_bytes


def test_main_prints_the_anti_entropy_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--skip-cluster", "--ae-keys", "1000"]) == 0
    out = capsys.readouterr().out
    assert "anti-entropy cost between two replicas of 1000 keys" in out
    assert "(target <= 1024)" in out


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_cluster_converges_after_heal(tmp_path: Path) -> None:
    args = argparse.Namespace(nodes=3, keys=200, concurrency=8, set=[], request_ids=True)
    result = asyncio.run(bench.convergence(args, tmp_path))  # raises unless it converges
    assert not cluster_module._LIVE, "a node process survived the benchmark"
    # each side lacks at least the 100 keys only the other side wrote
    assert result["delta_entries_sent"] + result["ae_items_sent"] >= 100
