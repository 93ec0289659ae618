"""Gossip under process faults, network faults and clock skew, end to end through the runner
(issue 13: the AP store keeps every promise at the edges).

``test_crash_restart_short`` (in ``make test``) runs ``scenarios/gossip-crash-restart-short
.yaml``: 3 gossip nodes, registers with 15% deletes and counters; SIGKILL a random node,
restart it with its data, SIGSTOP a random node for a while; tombstones collectable after
2 s. ``test_soak`` (``make soak``: ``CAPLAB_SOAK=1``) runs ``crash-restart``, ``flapping``,
``clock-skew`` (skews up to an hour) and ``majorities-ring`` on gossip
``CAPLAB_SOAK_RUNS`` times each (default 5); repetition ``i`` runs with the file's seed + i
(written to its own scenario file, so the replay command printed on failure runs exactly
that scenario) into its own folder. A case listed in ``XFAIL`` (a known problem of the
store) is expected to fail, not strictly.

Every run is judged from its run folder (the checks shared with the raft scenarios are in
``scenario_checks.py``):

* ``results.json`` (combined) and ``gossip/results.json``: ``valid`` is True (not
  "unknown"); the checkers ``counter``, ``convergence``, ``final_state`` (every register
  holds its last acknowledged write by HLC, no acknowledged delete undone) and
  ``tombstones`` (every node collected every tombstone within the scenario's
  ``tombstone_timeout``) are all True; enough deletes were acknowledged;
  ``timings.converged_s`` and ``timings.tombstones_collected_s`` are set;
* counters: every node's final read within [acknowledged, possible] increments, all equal;
* ``timings.faults``: exactly the scenario's actions, none with an ``error``, each process
  fault on one node and undone on that node, each clock skew set on every node targeted;
* ``history.jsonl``: acknowledged mutations (write, delete, incr) after every recovery
  (restart, resume, heal, clock skew back to 0), and after the last one on every node;
* the final state agrees: ``final_registers`` has every node and every register key, one
  value per key, and (recomputed from ``history.jsonl``, independently of the checker) each
  is the outcome of the key's last acknowledged write by HLC or of an indeterminate write;
  the last ``digests.jsonl`` sample has one digest from every node.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from harness.history import Operation, pair_operations, read_history
from harness.runner import RunResult
from harness.scenario import Scenario
from harness.workload import register_keys
from tests.harness.scenario_checks import (
    SCENARIOS,
    SOAK,
    Prepared,
    check_counters,
    check_digests,
    check_faults,
    check_progress,
    client_ops,
    load_json,
    prepare,
    replay,
    run,
    soak_runs,
)

STORE = "gossip"
MUTATIONS = ("write", "delete", "incr")
MUST_BE_TRUE = ("counter", "convergence", "final_state", "tombstones")
MIN_DELETES = 20  # acknowledged deletes in a run
SOAK_SCENARIOS = ("crash-restart", "flapping", "clock-skew", "majorities-ring")
SOAK_RUNS = soak_runs()
# scenario -> why it is expected to fail for now (a known problem of the store, not of the
# harness); non-strict, so that the case passes again once the store is fixed
XFAIL: dict[str, str] = {}


def _check_verdicts(combined: Mapping[str, Any], res: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    if combined["valid"] is not True:
        problems.append(f"results.json valid is {combined['valid']!r}, expected True")
    if set(combined["stores"]) != {STORE}:
        problems.append(f"results.json stores are {sorted(combined['stores'])}, expected gossip")
    if res["valid"] is not True:
        problems.append(f"gossip/results.json valid is {res['valid']!r}, expected True")
    checkers = res["checkers"]
    for name in MUST_BE_TRUE:
        c = checkers.get(name)
        if c is None:
            problems.append(f"no {name} checker verdict")
        elif c["valid"] is not True:
            problems.append(f"{name} valid is {c['valid']!r}: {c.get('summary') or c}")
    final = checkers.get("final_state") or {}
    if final.get("acknowledged_deletes", 0) < MIN_DELETES:
        problems.append(
            f"final_state judged {final.get('acknowledged_deletes')} acknowledged deletes, "
            f"expected >= {MIN_DELETES}"
        )
    timings = res["timings"]
    if timings["converged_s"] is None:
        problems.append("timings.converged_s is null: the replicas never agreed after the run")
    if timings["tombstones_collected_s"] is None:
        problems.append("timings.tombstones_collected_s is null: tombstones were left")
    return problems


def _outcome(w: Operation) -> str | None:
    return w.value if w.f == "write" and isinstance(w.value, str) else None


def _last_acknowledged(ops: Sequence[Operation]) -> dict[str, tuple[str | None, set[str | None]]]:
    """key -> (outcome of the last acknowledged write by HLC, outcomes of indeterminate
    writes). Outcome: the value written, None for a delete."""
    out: dict[str, tuple[str | None, set[str | None]]] = {}
    by_key: dict[str, list[Operation]] = {}
    for o in client_ops(ops):
        if o.f in ("write", "delete") and o.key is not None and o.type != "fail":
            by_key.setdefault(o.key, []).append(o)
    for key, writes in by_key.items():
        acked = [w for w in writes if w.type == "ok" and w.hlc is not None]
        last = max(acked, key=lambda w: w.hlc or (0, 0, ""), default=None)
        outcome = None if last is None else _outcome(last)
        out[key] = (outcome, {_outcome(w) for w in writes if w.type == "info"})
    return out


def _check_final_registers(
    res: Mapping[str, Any], scenario: Scenario, ops: Sequence[Operation]
) -> list[str]:
    problems: list[str] = []
    nodes, keys = set(scenario.node_ids), register_keys(scenario.keys)
    finals: Mapping[str, Mapping[str, str | None]] = res["final_registers"]
    if set(finals) != nodes:
        problems.append(f"final_registers has nodes {sorted(finals)}, expected {sorted(nodes)}")
    acked = [o for o in client_ops(ops) if o.f in ("write", "delete") and o.type == "ok"]
    if any(o.hlc is None for o in acked):
        problems.append("an acknowledged gossip write or delete carries no HLC timestamp")
    last = _last_acknowledged(ops)
    for key in keys:
        if any(key not in finals.get(n, {}) for n in nodes):
            problems.append(f"final read of {key} failed on some node: {dict(finals)}")
            continue
        values = {finals[n][key] for n in nodes}
        if len(values) != 1:
            problems.append(f"nodes disagree on {key} after the run: {dict(finals)}")
            continue
        (value,) = values
        outcome, indeterminate = last.get(key, (None, set()))
        if value != outcome and value not in indeterminate:
            what = "absent" if outcome is None else repr(outcome)
            problems.append(
                f"every node holds {value!r} for {key}, but its last acknowledged write "
                f"(by HLC) left {what}"
            )
    return problems


def _node_states(run_dir: Path) -> list[str]:
    """How often each node started, its clock alarms and its last log event (failures)."""
    out: list[str] = []
    for log in sorted((run_dir / "logs").glob("*.log")):
        last_event, starts, warnings = "-", 0, 0
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            last_event = str(event.get("event"))
            starts += last_event == "node_started"
            warnings += event.get("level") in ("warning", "error")
        out.append(f"  {log.stem}: started {starts}x; {warnings} warnings; last {last_event}")
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
        *_check_final_registers(res, sc, ops),
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
@pytest.mark.timeout(120)
def test_crash_restart_short(tmp_path: Path) -> None:
    p = prepare(SCENARIOS / "gossip-crash-restart-short.yaml", 0, tmp_path)
    sc = p.scenario
    assert sc.store == STORE and sc.nodes == 3 and sc.duration <= 12
    assert sc.delete_fraction > 0 and sc.tombstone_timeout > 0
    assert [(f.action, f.target) for f in sc.faults] == [
        ("kill", "random"),
        ("restart", "killed"),
        ("pause", "random"),
        ("resume", "paused"),
    ]
    _judge(run(p, STORE, tmp_path / "run"), p)


def _soak_cases() -> list[Any]:
    cases = []
    for name in SOAK_SCENARIOS:
        marks = [pytest.mark.xfail(reason=XFAIL[name], strict=False)] if name in XFAIL else []
        cases.append(pytest.param(name, marks=marks, id=name))
    return cases


@pytest.mark.integration
@pytest.mark.soak
@pytest.mark.skipif(not SOAK, reason="set CAPLAB_SOAK=1 (make soak)")
@pytest.mark.timeout(420)
@pytest.mark.parametrize("rep", range(SOAK_RUNS), ids=lambda r: f"run{r + 1}of{SOAK_RUNS}")
@pytest.mark.parametrize("name", _soak_cases())
def test_soak(name: str, rep: int, tmp_path: Path) -> None:
    p = prepare(SCENARIOS / f"{name}.yaml", rep, tmp_path)
    _judge(run(p, STORE, tmp_path / "run"), p)


def test_soak_covers_the_gossip_scenarios() -> None:
    """The soak runs every shipped gossip fault scenario asked for by issue 13, and the
    clock-skew one skews by up to an hour both ways."""
    from harness.scenario import load_scenario

    for name in SOAK_SCENARIOS:
        sc = load_scenario(SCENARIOS / f"{name}.yaml")
        assert STORE in sc.stores and sc.delete_fraction > 0 and sc.tombstone_timeout > 0
    skews = [f.skew_ms for f in load_scenario(SCENARIOS / "clock-skew.yaml").faults]
    assert max(skews) == 3_600_000 and min(skews) == -3_600_000
