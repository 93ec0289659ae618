"""End to end: `scenarios/smoke.yaml` on both stores, side by side, through the runner.

Asserts the CAP trade-off itself: during the partition the Raft minority refuses while its
majority keeps writing and the history stays linearizable; the gossip store answers on both
sides, diverges, converges after the heal and loses no acknowledged increment.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from harness import cluster as cluster_module
from harness.history import Operation, pair_operations, read_history
from harness.runner import FINAL_READ_PROCESS, RunResult, run_scenario
from harness.scenario import load_scenario

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
MUTATIONS = ("write", "cas", "incr")


def _available(store: str) -> bool:
    try:
        module = importlib.import_module(f"{store}.node")
    except ImportError:
        return False
    return hasattr(module, "build_backend")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    missing = [s for s in ("raft", "gossip") if not _available(s)]
    if missing:
        pytest.skip(f"store(s) not built yet: {', '.join(missing)}")
    scenario = load_scenario(ROOT / "scenarios" / "smoke.yaml")
    out = tmp_path_factory.mktemp("smoke")
    result = run_scenario(scenario, "both", out)
    assert not cluster_module._LIVE, "a node process survived the run"
    return result


def _ops(result: RunResult, store: str) -> list[Operation]:
    return pair_operations(read_history(result.out_dir / store / "history.jsonl"))


def _client_ops(ops: Sequence[Operation]) -> list[Operation]:
    return [o for o in ops if isinstance(o.process, int) and o.process < FINAL_READ_PROCESS]


def _window(result: RunResult, store: str) -> tuple[float, float]:
    w = result.stores[store]["timings"]["fault_window_s"]
    assert w is not None, "the partition was not recorded"
    return w[0] * 1e9, w[1] * 1e9


def test_layout(run: RunResult) -> None:
    out = run.out_dir
    combined = json.loads((out / "results.json").read_text())
    assert set(combined["stores"]) == {"raft", "gossip"}
    assert combined["schema_version"] == 1
    for store in ("raft", "gossip"):
        d = out / store
        for f in ("history.jsonl", "digests.jsonl", "results.json", "logs/n1.log"):
            assert (d / f).exists(), f"{store}/{f} missing"
        assert (d / "data" / "n3").is_dir()
        res = json.loads((d / "results.json").read_text())
        assert res["store"] == store and res["scenario"]["name"] == "smoke"
        assert [f["action"] for f in res["timings"]["faults"]] == ["partition", "heal"]
        nemesis = [o for o in _ops(run, store) if o.process == "nemesis"]
        assert [o.f for o in nemesis] == ["partition", "heal"]
        assert all(o.type == "ok" for o in nemesis)


def test_raft_minority_refused_while_majority_wrote(run: RunResult) -> None:
    ops = _client_ops(_ops(run, "raft"))
    start, end = _window(run, "raft")
    minority = [o for o in ops if o.side == "minority" and o.f in MUTATIONS]
    majority = [o for o in ops if o.side == "majority" and o.f in MUTATIONS]
    assert minority, "no minority client tried to write during the partition"
    assert [o for o in minority if o.type == "ok"] == []
    assert all(o.type in ("fail", "info") for o in minority)
    ok_majority = [o for o in majority if o.type == "ok" and start <= o.invoke_time < end]
    assert len(ok_majority) >= 5, "the majority did not keep writing"


def test_raft_history_is_linearizable(run: RunResult) -> None:
    lin = run.stores["raft"]["checkers"]["linearizable"]
    assert lin["valid"] is True, lin.get("summary")
    assert lin["operations"] > 20


def test_gossip_answered_on_both_sides(run: RunResult) -> None:
    ops = _client_ops(_ops(run, "gossip"))
    for side in ("majority", "minority"):
        oks = [o for o in ops if o.side == side and o.type == "ok" and o.f in ("write", "incr")]
        assert oks, f"gossip {side} wrote nothing during the partition"


def test_gossip_diverged_then_converged(run: RunResult) -> None:
    res = run.stores["gossip"]
    assert res["digests"]["max_distinct_digests_during"] > 1
    assert res["timings"]["converged_s"] is not None, "replicas never agreed after the heal"
    digests = [
        json.loads(line)
        for line in (run.out_dir / "gossip" / "digests.jsonl").read_text().splitlines()
    ]
    last = digests[-1]["digests"]
    assert None not in last.values() and len(set(last.values())) == 1


def _increments(ops: Sequence[Operation]) -> tuple[dict[str, int], dict[str, int]]:
    acked: dict[str, int] = {}
    possible: dict[str, int] = {}
    for o in ops:
        if o.f != "incr" or o.key is None or not isinstance(o.value, int):
            continue
        if o.type == "ok":
            acked[o.key] = acked.get(o.key, 0) + o.value
        if o.type in ("ok", "info"):
            possible[o.key] = possible.get(o.key, 0) + o.value
    return acked, possible


@pytest.mark.parametrize("store", ["gossip", "raft"])
def test_counters_lost_no_acknowledged_increment(run: RunResult, store: str) -> None:
    ops = _ops(run, store)
    acked, possible = _increments(_client_ops(ops))
    assert acked, "no increment was acknowledged"
    finals: Mapping[str, Mapping[str, Any]] = run.stores[store]["final_reads"]
    assert set(finals) == {"n1", "n2", "n3"}
    for node, values in finals.items():
        for key, total in acked.items():
            value = values[key]
            assert value is not None, f"{store} {node}: final read of {key} failed"
            assert total <= value <= possible[key], (store, node, key, value, total)
    # the final reads are in the history too
    reads = [
        o
        for o in ops
        if o.f == "read-counter" and isinstance(o.process, int) and o.process >= FINAL_READ_PROCESS
    ]
    assert len(reads) == 3 * len(finals["n1"])
    assert run.stores[store]["checkers"]["counter"]["valid"] is True


# -- the CLI on recorded histories (no nodes needed) -----------------------------------
def _history(path: Path, stale: bool) -> None:
    from harness.history import HistoryWriter

    t = iter(range(0, 10_000, 10))
    with HistoryWriter(path) as w:
        w.invoke(0, "write", "k", "a", node="n1", time=next(t))
        w.complete("ok", 0, "a", time=next(t))
        w.invoke(1, "write", "k", "b", node="n2", time=next(t))
        w.complete("ok", 1, "b", time=next(t))
        w.invoke(0, "read", "k", None, node="n1", time=next(t))
        w.complete("ok", 0, "a" if stale else "b", time=next(t))
        w.invoke(2, "incr", "c", 3, node="n1", time=next(t))
        w.complete("ok", 2, 3, time=next(t))
        w.invoke(2, "read-counter", "c", None, node="n1", time=next(t))
        w.complete("ok", 2, 5 if stale else 3, time=next(t))  # 5: never incremented that far


@pytest.mark.parametrize("model", ["register", "counter"])
def test_cli_check_exit_codes(
    tmp_path: Path, model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from caplab.cli import main

    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    _history(good, stale=False)
    _history(bad, stale=True)
    assert main(["check", str(good), "--model", model]) == 0
    assert main(["check", str(bad), "--model", model]) == 1
    out = capsys.readouterr().out
    if model == "register":
        assert "counterexample on key 'k'" in out and "read -> 'a'" in out
    else:
        assert "read-counter by process 2 returned 5" in out
    assert main(["check", str(tmp_path / "missing.jsonl"), "--model", model]) == 1
    assert "cannot open history" in capsys.readouterr().err


def test_cli_run_refuses_bad_scenarios(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from caplab.cli import main

    p = tmp_path / "x.yaml"
    p.write_text("name: x\nduration: 5s\nfaults:\n  - at: 1s\n    partiton: bridge\n")
    assert main(["run", str(p)]) == 2
    err = capsys.readouterr().err
    assert f"{p}:5: unknown field 'partiton' in fault" in err
    assert "Traceback" not in err
    assert main(["run", str(ROOT / "scenarios" / "smoke.yaml"), "--duration", "soon"]) == 2


async def test_a_run_can_go_without_tls_when_told(tmp_path: Path) -> None:
    """`caplab run --insecure` (and demo): the nodes run --insecure; by default they run
    with the run's certificates."""
    from harness.runner import StoreRun

    scenario = load_scenario(ROOT / "scenarios" / "smoke.yaml")
    for secure in (False, True):
        run = StoreRun(scenario, "gossip", tmp_path / str(secure), secure=secure)
        try:
            await run.setup()
            assert run.cluster is not None and run.cluster.secure is secure
            args = run.cluster.nodes["n1"].args
            assert ("--insecure" in args) is not secure and ("--certs" in args) is secure
        finally:
            await run.close()
