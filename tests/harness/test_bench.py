"""`caplab bench` end to end, tiny: real processes, interleaved no-op/store cells, JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_interleaves_noop_and_store_cells_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "caplab.cli",
            "bench",
            "--store",
            "raft",
            "--concurrency",
            "1,2",
            "--duration",
            "0.3",
            "--warmup",
            "0",
            "--data-dir",
            str(tmp_path / "data"),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["schema_version"] == 1 and result["store"] == "raft"
    order = [(c["target"], c["op"], c["concurrency"]) for c in result["cells"]]
    one = [
        ("noop", "write", 1),
        ("raft", "write", 1),
        ("noop", "write", 2),
        ("raft", "write", 2),
        ("noop", "read", 1),
        ("raft", "read", 1),
        ("noop", "read", 2),
        ("raft", "read", 2),
    ]
    # the same cells again, the cluster's peer links without TLS
    insecure = [(t if t == "noop" else "raft-insecure", op, n) for t, op, n in one]
    assert order == one + insecure
    for c in result["cells"]:
        assert c["ops"] > 0 and c["errors"] == 0, c
    assert set(result["fraction_of_noop"]) == {"write@1", "write@2", "read@1", "read@2"}
    assert set(result["fraction_of_noop_insecure"]) == set(result["fraction_of_noop"])
    assert 0 <= result["cluster_idle_cpu_during_noop"] < 1
    assert result["machine"]["cpus"] >= 1
