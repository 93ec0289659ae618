"""Scenario files: parsing, expansion of repeating faults, strict validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.scenario import ScenarioError, load_scenario, parse_duration, parse_scenario

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = sorted((ROOT / "scenarios").glob("*.yaml"))

BASE = "name: t\nduration: 30s\nnodes: 5\n"


def _err(text: str) -> str:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text, "scenarios/x.yaml")
    return str(info.value)


def test_all_shipped_scenarios_are_valid() -> None:
    names = {p.stem for p in SCENARIOS}
    assert {
        "majority-minority",
        "isolate-leader",
        "bridge",
        "majorities-ring",
        "flapping",
        "crash-restart",
        "clock-skew",
        "smoke",
    } <= names
    for p in SCENARIOS:
        sc = load_scenario(p)
        assert sc.name == p.stem
        assert all(0 <= f.at <= sc.duration for f in sc.faults)


def test_shipped_scenarios_delete_by_default() -> None:
    for p in SCENARIOS:
        sc = load_scenario(p)
        assert sc.delete_fraction == 0.15, p.name
        assert sc.summary()["delete_fraction"] == 0.15


def test_workload_fields() -> None:
    sc = parse_scenario(BASE + "delete_fraction: 0.3\ntombstone_timeout: 20s\n")
    assert (sc.delete_fraction, sc.tombstone_timeout) == (0.3, 20.0)
    assert parse_scenario(BASE + "delete_fraction: 0\n").delete_fraction == 0
    assert parse_scenario(BASE).tombstone_timeout == 0
    assert _err(BASE + "delete_fraction: 0.6\n") == (
        "scenarios/x.yaml:4: delete_fraction must be between 0 and 0.5, got 0.6"
    )
    assert _err(BASE + "delete_fraction: -0.1\n") == (
        "scenarios/x.yaml:4: delete_fraction must be >= 0, got -0.1"
    )


def test_node_options_are_checked_by_the_store() -> None:
    sc = parse_scenario(
        BASE + "node_options:\n  gossip: {tombstone_min_age_ms: 2000}\n  raft: {tick_ms: 20}\n"
    )
    assert sc.options_for("gossip") == {"tombstone_min_age_ms": 2000}
    assert sc.options_for("raft") == {"tick_ms": 20}
    assert sc.summary()["node_options"] == {
        "gossip": {"tombstone_min_age_ms": 2000},
        "raft": {"tick_ms": 20},
    }
    assert parse_scenario(BASE).options_for("gossip") == {}
    msg = _err(BASE + "node_options:\n  gossip: {tombstone_age: 1}\n")
    assert msg.startswith(
        "scenarios/x.yaml:5: unknown field 'tombstone_age' in node_options of gossip; allowed:"
    )
    assert "tombstone_min_age_ms" in msg
    assert _err(BASE + "node_options:\n  gossip: {ping_interval_ms: 50}\n") == (
        "scenarios/x.yaml:5: gossip option ping_interval_ms must exceed ping_timeout_ms"
    )
    assert _err(BASE + "node_options:\n  raft: {tick_ms: soon}\n") == (
        "scenarios/x.yaml:5: raft option tick_ms must be an integer, got 'soon'"
    )
    assert _err(BASE + "node_options:\n  zab: {}\n") == (
        "scenarios/x.yaml:5: unknown field 'zab' in node_options; allowed: raft, gossip"
    )


def test_clock_skew_in_hours() -> None:
    sc = parse_scenario(BASE + "faults:\n  - at: 1s\n    clock-skew: n1\n    skew: -1h\n")
    assert sc.faults[0].skew_ms == -3_600_000
    assert _err(BASE + "faults:\n  - at: 1s\n    clock-skew: n1\n    skew: 25h\n") == (
        "scenarios/x.yaml:7: skew must be within +-1 day"
    )


def test_majority_minority_file() -> None:
    sc = load_scenario(ROOT / "scenarios" / "majority-minority.yaml")
    assert (sc.nodes, sc.duration, sc.stores) == (5, 35.0, ("raft", "gossip"))
    assert [(f.at, f.action, f.shape) for f in sc.faults] == [
        (10.0, "partition", "majority-minority"),
        (25.0, "heal", None),
    ]


def test_smoke_is_small() -> None:
    sc = load_scenario(ROOT / "scenarios" / "smoke.yaml")
    assert sc.nodes == 3 and sc.duration <= 12
    assert [(f.at, f.action) for f in sc.faults] == [(2.0, "partition"), (7.0, "heal")]


def test_durations() -> None:
    assert parse_duration("500ms") == 0.5
    assert parse_duration("10s") == 10
    assert parse_duration("1m") == 60
    assert parse_duration("-2s") == -2
    assert parse_duration("1h") == 3600
    assert parse_duration("-0.5h") == -1800
    for bad in ("10", "1d", "s", "1 s", "ten s"):
        with pytest.raises(ValueError, match="like 500ms, 10s, 1m or 1h"):
            parse_duration(bad)


def test_repeating_schedule_expands_with_undo() -> None:
    sc = parse_scenario(
        BASE + "faults:\n  - every: 5s\n    for: 2s\n    from: 5s\n    until: 20s\n"
        "    partition: random-halves\n"
    )
    assert [(f.at, f.action) for f in sc.faults] == [
        (5, "partition"),
        (7, "heal"),
        (10, "partition"),
        (12, "heal"),
        (15, "partition"),
        (17, "heal"),
    ]


def test_for_undoes_process_faults() -> None:
    sc = parse_scenario(
        BASE + "faults:\n  - at: 3s\n    for: 2s\n    kill: leader\n"
        "  - at: 4s\n    for: 1s\n    clock-skew: n1\n    skew: -1500ms\n"
    )
    got = [(f.at, f.action, f.target, f.skew_ms) for f in sc.faults]
    assert got == [
        (3, "kill", "leader", 0),
        (4, "clock-skew", "n1", -1500),
        (5, "restart", "killed", 0),
        (5, "clock-skew", "skewed", 0),
    ]


def test_unknown_fault_field_names_file_line_and_allowed() -> None:
    msg = _err(BASE + "faults:\n  - at: 10s\n    partiton: majority-minority\n")
    assert msg.startswith("scenarios/x.yaml:6: unknown field 'partiton' in fault; allowed: at,")
    assert "partition, heal, kill, restart, pause, resume, clock-skew" in msg


def test_unknown_top_level_field() -> None:
    msg = _err(BASE + "duraton: 5s\n")
    assert msg.startswith("scenarios/x.yaml:4: unknown field 'duraton' in scenario; allowed: name")


def test_bad_values_name_the_allowed_ones() -> None:
    msg = _err(BASE + "faults:\n  - at: 10s\n    partition: halves\n")
    assert msg.startswith("scenarios/x.yaml:6: bad partition shape 'halves'; allowed: groups,")
    assert "majorities-ring" in msg
    msg = _err(BASE + "store: cp\n")
    assert msg == "scenarios/x.yaml:4: bad store 'cp'; allowed: raft, gossip, both"
    msg = _err(BASE + "faults:\n  - at: 1s\n    kill: n7\n")
    assert msg.startswith("scenarios/x.yaml:6: bad kill target 'n7'; allowed: n1, n2, n3, n4, n5")
    assert _err(BASE + "workload: kv\n").endswith("allowed: register, counter, both")


def test_bad_durations_and_times() -> None:
    assert _err("name: t\nduration: 30\n") == (
        "scenarios/x.yaml:2: duration: expected a duration like 500ms, 10s, 1m or 1h, got '30'"
    )
    assert _err(BASE + "faults:\n  - at: 40s\n    heal: true\n") == (
        "scenarios/x.yaml:5: at 40s is after the end of the run (30s)"
    )
    msg = _err(BASE + "faults:\n  - every: 2s\n    for: 3s\n    partition: bridge\n")
    assert msg == "scenarios/x.yaml:6: for (3s) must be shorter than every (2s)"


def test_fault_needs_exactly_one_action_and_one_time() -> None:
    assert "exactly one action, got no action" in _err(BASE + "faults:\n  - at: 1s\n")
    msg = _err(BASE + "faults:\n  - at: 1s\n    heal: true\n    kill: n1\n")
    assert msg.startswith("scenarios/x.yaml:5: a fault needs exactly one action, got several")
    assert "either at (once) or every (repeating), not neither" in _err(
        BASE + "faults:\n  - heal: true\n"
    )
    assert "not both" in _err(BASE + "faults:\n  - heal: true\n    at: 1s\n    every: 2s\n")


def test_fields_that_do_not_apply() -> None:
    assert _err(BASE + "faults:\n  - at: 1s\n    kill: n1\n    skew: 1s\n") == (
        "scenarios/x.yaml:7: field 'skew' does not apply to kill"
    )
    assert "groups only apply to 'partition: groups'" in _err(
        BASE + "faults:\n  - at: 1s\n    partition: bridge\n    groups: [[n1]]\n"
    )
    assert "clock-skew needs skew" in _err(BASE + "faults:\n  - at: 1s\n    clock-skew: n1\n")
    assert "for does not apply to heal" in _err(
        BASE + "faults:\n  - at: 1s\n    for: 1s\n    heal: true\n"
    )


def test_groups_validation() -> None:
    sc = parse_scenario(
        BASE + "faults:\n  - at: 1s\n    partition: groups\n    groups: [[n1, n2], [n3]]\n"
    )
    assert sc.faults[0].groups == (("n1", "n2"), ("n3",))
    msg = _err(BASE + "faults:\n  - at: 1s\n    partition: groups\n    groups: [[n1], [n1]]\n")
    assert msg == "scenarios/x.yaml:7: node 'n1' is in more than one group"
    assert "needs a groups field" in _err(BASE + "faults:\n  - at: 1s\n    partition: groups\n")


def test_shape_must_fit_the_cluster() -> None:
    msg = _err(
        "name: t\nduration: 9s\nnodes: 3\nfaults:\n  - at: 1s\n    partition: majorities-ring\n"
    )
    assert msg == (
        "scenarios/x.yaml:6: majorities-ring needs at least 4 nodes (the scenario has 3 nodes)"
    )


def test_missing_required_and_invalid_yaml() -> None:
    assert _err("name: t\n") == "scenarios/x.yaml:1: missing required field 'duration'"
    assert _err("") == "scenarios/x.yaml:1: empty scenario; required fields: name, duration"
    assert _err("name: t\nduration: [1s\n").startswith("scenarios/x.yaml:3: invalid YAML")
    assert _err("- 1\n") == "scenarios/x.yaml:1: scenario must be a mapping of fields"


def test_load_scenario_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("name: t\nduration: 5s\nfaults:\n  - at: 1s\n    heal: yes please\n")
    with pytest.raises(ScenarioError, match=rf"^{p}:5: heal must be true"):
        load_scenario(p)
    with pytest.raises(ScenarioError, match="cannot read scenario"):
        load_scenario(tmp_path / "missing.yaml")


def test_with_duration_drops_later_faults() -> None:
    sc = load_scenario(ROOT / "scenarios" / "majority-minority.yaml").with_duration(20)
    assert sc.duration == 20 and [f.action for f in sc.faults] == ["partition"]


def test_read_levels_roam_staleness_and_own_keys() -> None:
    sc = parse_scenario(
        BASE + "read_levels: [strong, session, eventual]\nroam: 0.4\nmax_staleness: 250ms\n"
        "own_keys: true\n"
    )
    assert sc.read_levels == ("strong", "session", "eventual")
    assert (sc.roam, sc.max_staleness, sc.own_keys) == (0.4, 0.25, True)
    summary = sc.summary()
    assert summary["read_levels"] == ["strong", "session", "eventual"]
    assert summary["max_staleness_ms"] == 250 and summary["own_keys"] is True
    plain = parse_scenario(BASE)
    assert (plain.read_levels, plain.roam, plain.own_keys) == ((), 0.0, False)
    err = _err(BASE + "read_levels: [strong, linearizable]\n")
    assert err.startswith("scenarios/x.yaml:4: bad read level 'linearizable'; allowed: strong,")
    assert "listed twice" in _err(BASE + "read_levels: [session, session]\n")
    assert "must be a list" in _err(BASE + "read_levels: session\n")
    assert "between 0 and 1" in _err(BASE + "roam: 1.5\n")
    assert "true or false" in _err(BASE + "own_keys: maybe\n")
    assert "between 1ms and 24h" in _err(BASE + "max_staleness: 0s\n")


def test_client_path() -> None:
    assert parse_scenario(BASE).client_path == "unary"
    sc = parse_scenario(BASE + "client_path: pipelined\n")
    assert sc.client_path == "pipelined" and sc.summary()["client_path"] == "pipelined"
    assert "client_path" in _err(BASE + "client_path: batched\n")
    assert load_scenario(ROOT / "scenarios" / "crash-restart-short.yaml").client_path == (
        "pipelined"
    )
