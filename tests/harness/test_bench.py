"""`caplab bench` end to end, tiny: real processes, interleaved no-op/store cells, JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from harness.bench import Cell, ratios


def _bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], Any]:
    """Run a tiny `caplab bench` (0.3 s cells, no warm-up); its output and its JSON."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "caplab.cli",
            "bench",
            *args,
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
    return proc, json.loads(out.read_text())


def test_bench_interleaves_noop_and_store_cells_and_writes_json(tmp_path: Path) -> None:
    _, result = _bench(tmp_path, "--store", "raft", "--concurrency", "1,2")
    assert result["schema_version"] == 2 and result["stores"] == ["raft"]
    order = [(c["target"], c["path"], c["op"], c["concurrency"]) for c in result["cells"]]
    one = [
        (target, path, op, n)
        for op in ("write", "read")
        for n in (1, 2)
        for path in ("unary", "pipelined")
        for target in ("noop", "raft")
    ]
    # the same cells again, the cluster's peer links without TLS
    insecure = [(t if t == "noop" else "raft-insecure", p, op, n) for t, p, op, n in one]
    assert order == one + insecure
    for c in result["cells"]:
        assert c["ops"] > 0 and c["errors"] == 0, c
    keys = {f"{t}/{p}/{op}@{n}" for t, p, op, n in one + insecure if t != "noop"}
    assert set(result["ratios"]["of_noop"]) == keys
    assert result["ratios"]["of_etcd"] == {} and result["ratios"]["gossip_over_raft"] == {}
    assert 0 <= result["idle_cpu_during_noop"] < 1
    assert result["machine"]["cpus"] >= 1


def test_bench_sends_raft_writes_through_a_follower(tmp_path: Path) -> None:
    proc, result = _bench(
        tmp_path,
        *("--store", "raft", "--raft-writes-to", "follower", "--security", "tls"),
        *("--concurrency", "4"),
    )
    assert "raft writes through a follower" in " ".join(proc.stdout.split())  # (wrapped)
    assert result["raft_writes_to"] == "follower"
    writes = [c for c in result["cells"] if c["target"] == "raft" and c["op"] == "write"]
    assert {c["path"] for c in writes} == {"unary", "pipelined"}
    for c in writes:
        assert c["ops"] > 0 and c["errors"] == 0, c
    # the writers' node forwarded every write (and the warm-up's) to its leader
    assert result["raft_forwarded"]["raft"] >= sum(c["ops"] for c in writes)


def test_compare_etcd_without_etcd_says_how_to_install_it(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "caplab.cli", "bench", "--compare", "etcd"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PATH": str(tmp_path)},  # (no etcd there)
    )
    assert proc.returncode != 0
    assert "apt-get install etcd-server" in proc.stderr
    assert "ops/s" not in proc.stderr  # nothing was measured


def _cell(target: str, path: str, op: str, n: int, rate: float) -> Cell:
    return Cell(target, path, op, n, int(rate), 0, 1.0, rate, 1.0, 2.0)


def test_ratios_pair_each_store_cell_with_its_noop_etcd_and_raft_cells() -> None:
    cells = [
        _cell("noop", "unary", "write", 64, 1000),
        _cell("etcd", "unary", "write", 64, 800),
        _cell("raft", "unary", "write", 64, 400),
        _cell("noop", "pipelined", "write", 64, 4000),
        _cell("raft", "pipelined", "write", 64, 1600),
        _cell("noop", "unary", "write", 64, 500),  # (the machine slowed down)
        _cell("etcd", "unary", "write", 64, 400),
        _cell("gossip", "unary", "write", 64, 300),
        _cell("noop", "pipelined", "write", 64, 2000),
        _cell("gossip", "pipelined", "write", 64, 1200),
    ]
    r = ratios(cells)
    assert r["of_noop"] == {
        "raft/unary/write@64": 0.4,
        "raft/pipelined/write@64": 0.4,
        "gossip/unary/write@64": 0.6,
        "gossip/pipelined/write@64": 0.6,
    }
    # each store beside the etcd cell of its own pass; etcd has one (unary) path
    assert r["of_etcd"] == {
        "raft/unary/write@64": 0.5,
        "raft/pipelined/write@64": 2.0,
        "gossip/unary/write@64": 0.75,
        "gossip/pipelined/write@64": 3.0,
    }
    assert r["gossip_over_raft"] == {
        "gossip/unary/write@64": 0.75,
        "gossip/pipelined/write@64": 0.75,
    }
