"""Raft under process and network faults, end to end through the runner (issue 12).

``test_crash_restart_short`` (in ``make test``) runs ``scenarios/crash-restart-short.yaml``
on raft: 3 nodes, SIGKILL the leader, restart it with its data, SIGSTOP a random node for a
while. ``test_soak`` (``make soak``: ``CAPLAB_SOAK=1``) runs the full
``scenarios/crash-restart.yaml`` and ``scenarios/isolate-leader.yaml`` on raft
``CAPLAB_SOAK_RUNS`` times each (default 5); repetition ``i`` runs with the file's seed + i
(written to its own scenario file, so the replay command printed on failure runs exactly
that scenario) into its own folder.

Every run is judged from its run folder, never from the runner's return value alone:

* ``results.json`` (combined) and ``raft/results.json``: ``valid`` is True (not "unknown");
  ``checkers.linearizable.valid`` is True over enough operations with no
  ``unknown_keys``; ``checkers.counter.valid`` is True with every counter key judged on
  every node (``keys.<k>.final_reads``), and, recomputed from ``history.jsonl``, every
  final read lies between the acknowledged and the possible increments (no acknowledged
  increment lost); ``checkers.convergence.valid`` is True and ``timings.converged_s`` set;
* ``timings.faults``: exactly the scenario's actions, none with an ``error``, each process
  fault on one node, each restart/resume on the node that was killed/paused;
* ``history.jsonl``: acknowledged mutations after every recovery (restart, resume, heal),
  and after the last one on *every* node (followers forward writes, so a node that did not
  rejoin shows up here);
* every node's final state agrees: ``final_reads`` has every node and every counter key,
  no failed read, one value per key; the last ``digests.jsonl`` sample has one digest from
  every node.
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

import pytest

from harness import cluster as cluster_module
from harness.history import NEMESIS, Operation, pair_operations, read_history
from harness.runner import FINAL_READ_PROCESS, RunResult, run_scenario
from harness.scenario import Scenario, load_scenario
from harness.workload import counter_keys

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ROOT / "scenarios"
STORE = "raft"
MUTATIONS = ("write", "cas", "incr")
RECOVERIES = ("restart", "resume", "heal")
PROCESS_FAULTS = {"kill": "restart", "pause": "resume"}  # fault -> the action that undoes it
MIN_LINEARIZABLE_OPS = 200  # register operations the checker must have judged
MIN_ACKED_AFTER_RECOVERY = 20  # acknowledged mutations (all nodes) after each recovery
SOAK = bool(os.environ.get("CAPLAB_SOAK"))
SOAK_SCENARIOS = ("crash-restart", "isolate-leader")
_SEED_LINE = re.compile(r"^seed:[ \t]*\d+[ \t]*(#.*)?$", re.MULTILINE)


def _soak_runs() -> int:
    text = os.environ.get("CAPLAB_SOAK_RUNS", "").strip()
    if not text:
        return 5
    runs = int(text)
    if runs < 1:
        raise ValueError(f"CAPLAB_SOAK_RUNS must be >= 1, got {text!r}")
    return runs


SOAK_RUNS = _soak_runs()


@dataclass(frozen=True, slots=True)
class Prepared:
    scenario: Scenario
    file: Path  # the scenario file that was run (what the replay command runs)


def _prepare(path: Path, seed_offset: int, workdir: Path) -> Prepared:
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


def _replay(p: Prepared) -> str:
    return (
        f".venv/bin/caplab run {shlex.quote(_shown(p.file))} --store {STORE} "
        f"--out /tmp/{p.scenario.name}-replay"
    )


def _run(p: Prepared, out: Path) -> RunResult:
    result = run_scenario(p.scenario, STORE, out)
    assert not cluster_module._LIVE, "a node process survived the run"
    return result


def _client_ops(ops: Sequence[Operation]) -> list[Operation]:
    return [o for o in ops if isinstance(o.process, int) and o.process < FINAL_READ_PROCESS]


def _load_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def _check_verdicts(combined: Mapping[str, Any], res: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    if combined["valid"] is not True:
        problems.append(f"results.json valid is {combined['valid']!r}, expected True")
    if set(combined["stores"]) != {STORE}:
        problems.append(f"results.json stores are {sorted(combined['stores'])}, expected raft")
    if res["valid"] is not True:
        problems.append(f"raft/results.json valid is {res['valid']!r}, expected True")
    checkers = res["checkers"]
    lin = checkers.get("linearizable")
    if lin is None:
        problems.append("no linearizable checker verdict (no register operations?)")
    else:
        if lin["valid"] is not True:
            problems.append(
                f"linearizable valid is {lin['valid']!r}: {lin['summary']}; "
                f"counterexample: {lin.get('counterexample')}"
            )
        if lin["operations"] < MIN_LINEARIZABLE_OPS:
            problems.append(
                f"linearizable judged {lin['operations']} operations, "
                f"expected >= {MIN_LINEARIZABLE_OPS}"
            )
        if lin["unknown_keys"]:
            problems.append(f"linearizable unknown_keys {lin['unknown_keys']}")
    conv = checkers.get("convergence")
    if conv is None or conv["valid"] is not True:
        problems.append(f"convergence verdict {conv!r}, expected valid True")
    if res["timings"]["converged_s"] is None:
        problems.append("timings.converged_s is null: the replicas never agreed after the run")
    return problems


def _check_counters(
    res: Mapping[str, Any], scenario: Scenario, ops: Sequence[Operation]
) -> list[str]:
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
    # Independently of the checker: no acknowledged increment lost, none invented.
    acked: dict[str, int] = dict.fromkeys(keys, 0)
    possible: dict[str, int] = dict.fromkeys(keys, 0)
    for o in _client_ops(ops):
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


def _check_faults(res: Mapping[str, Any], scenario: Scenario) -> list[str]:
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
    return problems


def _check_progress(
    res: Mapping[str, Any], scenario: Scenario, ops: Sequence[Operation]
) -> list[str]:
    problems: list[str] = []
    client = _client_ops(ops)
    nemesis = [o for o in ops if o.process == NEMESIS]
    if [o.type for o in nemesis] != ["ok"] * len(nemesis):
        problems.append(f"nemesis operations not all ok: {[(o.f, o.type) for o in nemesis]}")
    end_ns = res["timings"]["workload_end_s"] * 1e9
    recoveries = [o for o in nemesis if o.f in RECOVERIES and o.complete_time < end_ns]
    expected = sum(1 for f in scenario.faults if f.action in RECOVERIES)
    if len(recoveries) != expected:
        problems.append(f"{len(recoveries)} recoveries in history.jsonl, expected {expected}")
    acked = [o for o in client if o.type == "ok" and o.f in MUTATIONS]
    for rec in recoveries:
        after = [o for o in acked if o.invoke_time >= rec.complete_time]
        if len(after) < MIN_ACKED_AFTER_RECOVERY:
            problems.append(
                f"only {len(after)} acknowledged mutations after the {rec.f} done at "
                f"{rec.complete_time / 1e9:.3f}s (expected >= {MIN_ACKED_AFTER_RECOVERY})"
            )
    if recoveries:
        last = recoveries[-1]
        for node in scenario.node_ids:
            n = sum(1 for o in acked if o.node == node and o.invoke_time >= last.complete_time)
            if n == 0:
                problems.append(
                    f"{node} acknowledged no mutation after the last recovery ({last.f} done "
                    f"at {last.complete_time / 1e9:.3f}s)"
                )
    return problems


def _check_digests(run_dir: Path, scenario: Scenario) -> list[str]:
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


def _node_states(run_dir: Path) -> list[str]:
    """Every node's last role change (with the commit index at that change), how often it
    started and its last log event, for failure messages."""
    out: list[str] = []
    for log in sorted((run_dir / "logs").glob("*.log")):
        role: dict[str, Any] | None = None
        last_event, starts = "-", 0
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            last_event = str(event.get("event"))
            starts += last_event == "node_started"
            if last_event == "raft_role":
                role = event
        state = (
            f"{role['role']} term {role['term']} leader {role['leader']} "
            f"(commit {role['commit']} at that change, {role['timestamp']})"
            if role
            else "none"
        )
        out.append(f"  {log.stem}: started {starts}x; last role change {state}; last {last_event}")
    return out


def _judge(result: RunResult, p: Prepared) -> None:
    """Fail with every problem found, the run folder and a replay command."""
    out, sc = result.out_dir, p.scenario
    run_dir = out / STORE
    combined = _load_json(out / "results.json")
    res = _load_json(run_dir / "results.json")
    ops = pair_operations(read_history(run_dir / "history.jsonl"))
    problems = [
        *_check_verdicts(combined, res),
        *_check_counters(res, sc, ops),
        *_check_faults(res, sc),
        *_check_progress(res, sc, ops),
        *_check_digests(run_dir, sc),
    ]
    if problems:
        pytest.fail(
            "\n".join(
                [
                    f"{sc.name} (seed {sc.seed}) on {STORE} is not valid:",
                    *(f"- {x}" for x in problems),
                    "node logs:",
                    *_node_states(run_dir),
                    f"run folder: {out}",
                    f"replay: {_replay(p)}",
                ]
            ),
            pytrace=False,
        )


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_crash_restart_short(tmp_path: Path) -> None:
    p = _prepare(SCENARIOS / "crash-restart-short.yaml", 0, tmp_path)
    sc = p.scenario
    assert sc.store == STORE and sc.nodes == 3 and sc.duration <= 20
    assert [(f.action, f.target) for f in sc.faults] == [
        ("kill", "leader"),
        ("restart", "killed"),
        ("pause", "random"),
        ("resume", "paused"),
    ]
    _judge(_run(p, tmp_path / "run"), p)


@pytest.mark.integration
@pytest.mark.soak
@pytest.mark.skipif(not SOAK, reason="set CAPLAB_SOAK=1 (make soak)")
@pytest.mark.timeout(420)
@pytest.mark.parametrize("rep", range(SOAK_RUNS), ids=lambda r: f"run{r + 1}of{SOAK_RUNS}")
@pytest.mark.parametrize("name", SOAK_SCENARIOS)
def test_soak(name: str, rep: int, tmp_path: Path) -> None:
    p = _prepare(SCENARIOS / f"{name}.yaml", rep, tmp_path)
    _judge(_run(p, tmp_path / "run"), p)
