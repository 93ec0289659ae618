"""Raft under process and network faults, end to end through the runner (issue 12).

``test_crash_restart_short`` (in ``make test``) runs ``scenarios/crash-restart-short.yaml``
on raft: 3 nodes, SIGKILL the leader, restart it with its data, SIGSTOP a random node for a
while. ``test_soak`` (``make soak``: ``CAPLAB_SOAK=1``) runs the full
``scenarios/crash-restart.yaml`` and ``scenarios/isolate-leader.yaml`` on raft
``CAPLAB_SOAK_RUNS`` times each (default 5); repetition ``i`` runs with the file's seed + i
(written to its own scenario file, so the replay command printed on failure runs exactly
that scenario) into its own folder.

Every run is judged from its run folder, never from the runner's return value alone (the
checks shared with the gossip scenarios are in ``scenario_checks.py``):

* ``results.json`` (combined) and ``raft/results.json``: ``valid`` is True (not "unknown");
  ``checkers.linearizable.valid`` is True over enough operations with no
  ``unknown_keys``; ``checkers.counter.valid`` is True with every counter key judged on
  every node (``keys.<k>.final_reads``), and, recomputed from ``history.jsonl``, every
  final read lies between the acknowledged and the possible increments (no acknowledged
  increment lost); ``checkers.convergence.valid`` is True and ``timings.converged_s`` set;
* ``timings.faults``: exactly the scenario's actions, none with an ``error``, each process
  fault on one node, each restart/resume on the node that was killed/paused;
* ``history.jsonl``: acknowledged mutations (write, cas, delete, incr) after every recovery
  (restart, resume, heal), and after the last one on *every* node (followers forward
  writes, so a node that did not rejoin shows up here);
* every node's final state agrees: ``final_reads`` has every node and every counter key,
  no failed read, one value per key; the last ``digests.jsonl`` sample has one digest from
  every node.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from harness.history import pair_operations, read_history
from harness.runner import RunResult
from tests.harness.scenario_checks import (
    SCENARIOS,
    SOAK,
    Prepared,
    check_counters,
    check_digests,
    check_faults,
    check_progress,
    load_json,
    prepare,
    replay,
    run,
    soak_runs,
)

STORE = "raft"
MUTATIONS = ("write", "cas", "delete", "incr")
MIN_LINEARIZABLE_OPS = 200  # register operations the checker must have judged
SOAK_SCENARIOS = ("crash-restart", "isolate-leader")
SOAK_RUNS = soak_runs()


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
    combined = load_json(out / "results.json")
    res = load_json(run_dir / "results.json")
    ops = pair_operations(read_history(run_dir / "history.jsonl"))
    problems = [
        *_check_verdicts(combined, res),
        *check_counters(res, sc, ops),
        *check_faults(res, sc),
        *check_progress(res, sc, ops, MUTATIONS),
        *check_digests(run_dir, sc),
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
                    f"replay: {replay(p, STORE)}",
                ]
            ),
            pytrace=False,
        )


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_crash_restart_short(tmp_path: Path) -> None:
    p = prepare(SCENARIOS / "crash-restart-short.yaml", 0, tmp_path)
    sc = p.scenario
    assert sc.store == STORE and sc.nodes == 3 and sc.duration <= 20
    assert [(f.action, f.target) for f in sc.faults] == [
        ("kill", "leader"),
        ("restart", "killed"),
        ("pause", "random"),
        ("resume", "paused"),
    ]
    _judge(run(p, STORE, tmp_path / "run"), p)


@pytest.mark.integration
@pytest.mark.soak
@pytest.mark.skipif(not SOAK, reason="set CAPLAB_SOAK=1 (make soak)")
@pytest.mark.timeout(420)
@pytest.mark.parametrize("rep", range(SOAK_RUNS), ids=lambda r: f"run{r + 1}of{SOAK_RUNS}")
@pytest.mark.parametrize("name", SOAK_SCENARIOS)
def test_soak(name: str, rep: int, tmp_path: Path) -> None:
    p = prepare(SCENARIOS / f"{name}.yaml", rep, tmp_path)
    _judge(run(p, STORE, tmp_path / "run"), p)
