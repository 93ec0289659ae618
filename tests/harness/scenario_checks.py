"""What the scenario tests of both stores check in a run folder (test_raft_scenarios.py,
test_gossip_scenarios.py), and how a soak repetition gets its own seed.

Every run is judged from its run folder (``results.json``, ``<store>/results.json``,
``history.jsonl``, ``digests.jsonl``), never from the runner's return value alone; every
check returns a list of problems (empty: fine) so that a failure reports all of them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from harness import cluster as cluster_module
from harness.history import NEMESIS, Operation
from harness.runner import FINAL_READ_PROCESS, RunResult, run_scenario
from harness.scenario import Scenario, load_scenario
from harness.workload import counter_keys

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ROOT / "scenarios"
RECOVERIES = ("restart", "resume", "heal")
PROCESS_FAULTS = {"kill": "restart", "pause": "resume"}  # fault -> the action that undoes it
MIN_ACKED_AFTER_RECOVERY = 20  # acknowledged mutations (all nodes) after each recovery
SOAK = bool(os.environ.get("CAPLAB_SOAK"))
_SEED_LINE = re.compile(r"^seed:[ \t]*\d+[ \t]*(#.*)?$", re.MULTILINE)


def soak_runs() -> int:
    """``CAPLAB_SOAK_RUNS`` (default 5): repetitions of each soak scenario."""
    text = os.environ.get("CAPLAB_SOAK_RUNS", "").strip()
    if not text:
        return 5
    runs = int(text)
    if runs < 1:
        raise ValueError(f"CAPLAB_SOAK_RUNS must be >= 1, got {text!r}")
    return runs


@dataclass(frozen=True, slots=True)
class Prepared:
    scenario: Scenario
    file: Path  # the scenario file that was run (what the replay command runs)


def prepare(path: Path, seed_offset: int, workdir: Path) -> Prepared:
    """The scenario of ``path``; with a ``seed:`` line and an offset, a copy of the file
    with seed + offset in ``workdir`` (so that ``caplab run`` on it replays the run)."""
    base = load_scenario(path)
    text = path.read_text(encoding="utf-8")
    if seed_offset == 0 or len(_SEED_LINE.findall(text)) != 1:
        return Prepared(base, path)
    seed = base.seed + seed_offset
    file = workdir / f"{path.stem}.seed{seed}.yaml"
    file.write_text(_SEED_LINE.sub(f"seed: {seed}", text), encoding="utf-8")
    scenario = load_scenario(file)
    assert scenario == replace(base, seed=seed, path=str(file)), "seed override changed more"
    return Prepared(scenario, file)


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def replay(p: Prepared, store: str) -> str:
    return (
        f".venv/bin/caplab run {shlex.quote(_shown(p.file))} --store {store} "
        f"--out /tmp/{p.scenario.name}-replay"
    )


def run(p: Prepared, store: str, out: Path) -> RunResult:
    result = run_scenario(p.scenario, store, out)
    assert not cluster_module._LIVE, "a node process survived the run"
    return result


def client_ops(ops: Sequence[Operation]) -> list[Operation]:
    return [o for o in ops if isinstance(o.process, int) and o.process < FINAL_READ_PROCESS]


def load_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def check_counters(
    res: Mapping[str, Any], scenario: Scenario, ops: Sequence[Operation]
) -> list[str]:
    """The counter checker's verdict over every key and node, and independently of it: no
    acknowledged increment lost, none invented, every node's final read the same."""
    problems: list[str] = []
    nodes, keys = set(scenario.node_ids), counter_keys(scenario.keys)
    counter = res["checkers"].get("counter")
    if counter is None:
        return ["no counter checker verdict (no counter operations?)"]
    if counter["valid"] is not True:
        problems.append(f"counter valid is {counter['valid']!r}: {counter['summary']}")
    if set(counter["keys"]) != set(keys):
        problems.append(f"counter judged keys {sorted(counter['keys'])}, expected {keys}")
    for key, entry in sorted(counter["keys"].items()):
        if set(entry["final_reads"]) != nodes:
            problems.append(f"counter {key} judged final reads of {sorted(entry['final_reads'])}")
        if entry["violations"]:
            problems.append(f"counter {key} violations: {entry['violations']}")
    acked: dict[str, int] = dict.fromkeys(keys, 0)
    possible: dict[str, int] = dict.fromkeys(keys, 0)
    for o in client_ops(ops):
        if o.f != "incr" or o.key not in acked or not isinstance(o.value, int):
            continue
        if o.type == "ok":
            acked[o.key] += o.value
        if o.type in ("ok", "info"):
            possible[o.key] += o.value
    if not all(acked.values()):
        problems.append(f"a counter key had no acknowledged increment: {acked}")
    finals: Mapping[str, Mapping[str, int | None]] = res["final_reads"]
    if set(finals) != nodes:
        problems.append(f"final_reads has nodes {sorted(finals)}, expected {sorted(nodes)}")
    for key in keys:
        read = {node: finals.get(node, {}).get(key) for node in sorted(nodes)}
        values = {node: v for node, v in read.items() if v is not None}
        if len(values) != len(nodes):
            problems.append(f"final read of {key} failed on some node: {read}")
        if len(set(values.values())) > 1:
            problems.append(f"nodes disagree on {key} after the run: {values}")
        for node, v in values.items():
            if not acked[key] <= v <= possible[key]:
                problems.append(
                    f"{node} final {key} = {v}, outside [{acked[key]} acknowledged, "
                    f"{possible[key]} possible]"
                )
    return problems


def check_faults(res: Mapping[str, Any], scenario: Scenario) -> list[str]:
    """Exactly the scenario's actions, none failed; each process fault on one node, undone
    on that node; each clock skew set on every node it targeted."""
    problems: list[str] = []
    faults: list[dict[str, Any]] = res["timings"]["faults"]
    expected = [f.action for f in scenario.faults]
    actions = [f["action"] for f in faults]
    if actions != expected:
        problems.append(f"timings.faults actions {actions}, expected {expected}")
    last_nodes: dict[str, list[str]] = {}
    for f in faults:
        if "error" in f:
            problems.append(f"fault {f['action']} at {f['at_s']}s failed: {f['error']}")
            continue
        action, desc = f["action"], f["description"]
        if action in PROCESS_FAULTS:
            if len(desc["nodes"]) != 1:
                problems.append(f"{action} {desc['target']} hit nodes {desc['nodes']}, not one")
            last_nodes[PROCESS_FAULTS[action]] = desc["nodes"]
        elif action in PROCESS_FAULTS.values():
            undone = last_nodes.pop(action, None)
            if desc["nodes"] != undone:
                problems.append(f"{action} at {f['at_s']}s hit {desc['nodes']}, expected {undone}")
        elif action == "clock-skew":
            applied: dict[str, Any] = desc["nodes"]
            wrong = {n: v for n, v in applied.items() if v != desc["skew_ms"]}
            if not applied or wrong:
                problems.append(
                    f"clock-skew {desc['target']} {desc['skew_ms']} ms at {f['at_s']}s did not "
                    f"land: {applied}"
                )
    return problems


def recoveries(ops: Sequence[Operation], end_s: float) -> list[Operation]:
    """Nemesis operations that undid a fault (heal, restart, resume, clock skew back to 0)
    and completed before the workload stopped."""
    out = []
    for o in ops:
        if o.process != NEMESIS or o.complete_time >= end_s * 1e9:
            continue
        skew_reset = (
            o.f == "clock-skew" and isinstance(o.result, dict) and o.result.get("skew_ms") == 0
        )
        if o.f in RECOVERIES or skew_reset:
            out.append(o)
    return out


def check_progress(
    res: Mapping[str, Any],
    scenario: Scenario,
    ops: Sequence[Operation],
    mutations: Sequence[str],
) -> list[str]:
    """Every nemesis operation ok; acknowledged ``mutations`` after every recovery, and
    after the last one on every node."""
    problems: list[str] = []
    client = client_ops(ops)
    nemesis = [o for o in ops if o.process == NEMESIS]
    if [o.type for o in nemesis] != ["ok"] * len(nemesis):
        problems.append(f"nemesis operations not all ok: {[(o.f, o.type) for o in nemesis]}")
    recs = recoveries(ops, res["timings"]["workload_end_s"])
    expected = sum(
        1
        for f in scenario.faults
        if f.action in RECOVERIES or (f.action == "clock-skew" and f.skew_ms == 0)
    )
    if len(recs) != expected:
        problems.append(f"{len(recs)} recoveries in history.jsonl, expected {expected}")
    acked = [o for o in client if o.type == "ok" and o.f in mutations]
    for rec in recs:
        after = [o for o in acked if o.invoke_time >= rec.complete_time]
        if len(after) < MIN_ACKED_AFTER_RECOVERY:
            problems.append(
                f"only {len(after)} acknowledged mutations after the {rec.f} done at "
                f"{rec.complete_time / 1e9:.3f}s (expected >= {MIN_ACKED_AFTER_RECOVERY})"
            )
    if recs:
        last = recs[-1]
        for node in scenario.node_ids:
            n = sum(1 for o in acked if o.node == node and o.invoke_time >= last.complete_time)
            if n == 0:
                problems.append(
                    f"{node} acknowledged no mutation after the last recovery ({last.f} done "
                    f"at {last.complete_time / 1e9:.3f}s)"
                )
    return problems


def check_digests(run_dir: Path, scenario: Scenario) -> list[str]:
    """The last ``digests.jsonl`` sample has one digest, from every node."""
    lines = (run_dir / "digests.jsonl").read_text(encoding="utf-8").splitlines()
    if not lines:
        return ["digests.jsonl is empty"]
    last = json.loads(lines[-1])
    digests: dict[str, str | None] = last["digests"]
    if set(digests) != set(scenario.node_ids):
        return [f"last digest sample has nodes {sorted(digests)}"]
    if None in digests.values() or len(set(digests.values())) != 1:
        return [f"last digest sample (t={last['time_ns'] / 1e9:.3f}s) disagrees: {digests}"]
    return []
