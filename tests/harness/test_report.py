"""The side-by-side report: figures on small synthetic run folders with known answers, the
summary schema, the HTML page; and (integration) a short real run opened in Chromium."""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from caplab.cli import main as cli_main
from harness.divergence import LagPoint
from harness.history import HistoryWriter
from harness.report import (
    REPORT_FILES,
    build_report,
    build_summary,
    detail_rows,
    key_rows,
    pct,
    validate_summary,
)
from harness.report.figures import episode_lag
from harness.report.plots import PALETTE, side_colors

ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
S = 1_000_000_000  # ns per second
SIDES = {"n1": "minority", "n2": "majority", "n3": "majority"}
PARTITION = {
    "shape": "majority-minority",
    "groups": [["n2", "n3"], ["n1"]],
    "sides": SIDES,
    "blocked": ["n1->n2", "n1->n3", "n2->n1", "n3->n1"],
    "mode": "drop",
}


def _ns(t: float) -> int:
    return round(t * S)


def write_store(root: Path, store: str) -> None:
    """A 3-node history: partition (n1 cut off) from 2 s to 6 s, run ends at 8 s.

    Every client (one per node) invokes a write every 0.5 s. raft: the minority's ops during
    the partition fail after 2 ms, except the one at 5.5 s, which times out (info, after
    0.4 s); the majority's ops at 2.0 and 2.5 s fail after 5 ms (new election), from 3.0 s
    on they succeed in 10 ms. gossip: everything succeeds in 1 ms.

    Digest samples every 0.1 s say what each node has seen: raft's ``applied`` index (n1
    stays at what it had at 2.0 s until 6.3 s), gossip's ``seen`` HLC of r0 (n1 stays at
    what it had at 2.0 s until 6.5 s); the others see every write acknowledged before.
    """
    d = root / store
    (d / "logs").mkdir(parents=True)
    for n in SIDES:
        (d / "logs" / f"{n}.log").write_text(f"{n} log\n")
    items: list[tuple[int, int, Any]] = []  # (time, order, event args) sorted later
    order = 0

    def add(t: float, *args: Any, **kw: Any) -> None:
        nonlocal order
        items.append((_ns(t), order, (args, kw)))
        order += 1

    add(1.999, "invoke", "nemesis", "partition", None, {"action": "partition"})
    add(2.0, "ok", "nemesis", "partition", None, PARTITION)
    add(5.999, "invoke", "nemesis", "heal", None, {"action": "heal"})
    add(6.0, "ok", "nemesis", "heal", None, {"healed": "majority-minority"})
    for i, node in enumerate(("n1", "n2", "n3")):
        process = i
        for k in range(16):
            t = k * 0.5
            during = 2.0 <= t < 6.0
            side = SIDES[node] if during else None
            value = f"{process}-{k}"
            key = "r0"
            add(t, "invoke", process, "write", key, value, node=node, side=side)
            if store == "gossip":
                hlc = (_ns(t) // 1_000_000, 0, node)
                add(t + 0.001, "ok", process, "write", key, value, node=node, hlc=hlc)
            elif during and node == "n1" and t == 5.5:
                add(t + 0.4, "info", process, "write", key, None, node=node, error="timeout")
                process += 3
            elif during and node == "n1":
                add(t + 0.002, "fail", process, "write", key, None, node=node, error="UNAVAILABLE")
            elif during and t < 3.0:
                add(t + 0.005, "fail", process, "write", key, None, node=node, error="UNAVAILABLE")
            else:
                add(t + 0.010, "ok", process, "write", key, value, node=node)
    items.sort(key=lambda x: (x[0], x[1]))
    acked: list[tuple[int, Any]] = []  # (completion ns, raft log index / gossip HLC)
    with HistoryWriter(d / "history.jsonl") as w:
        for t, _, (args, kw) in items:
            etype, process, f, key, value = args
            client_ok = etype == "ok" and isinstance(process, int)
            if store == "raft" and client_ok:
                kw["log_index"] = len(acked) + 1
            ev = w.append(etype, process, f, key, value, time=t, **kw)
            if client_ok:
                acked.append((t, ev.log_index if store == "raft" else list(kw["hlc"])))
    cut_until = 6.3 if store == "raft" else 6.5
    with open(d / "digests.jsonl", "w", encoding="utf-8") as fh:
        for k in range(81):
            t = k / 10
            if store == "gossip" and t + 1e-9 >= 2.3 and t < 6.5 - 1e-9:
                digests = {"n1": "bb", "n2": "aa", "n3": "aa"}
            else:
                digests = {"n1": "aa", "n2": "aa", "n3": "aa"}
            sample: dict[str, Any] = {"time_ns": _ns(t), "digests": digests}
            view: dict[str, Any] = {}
            for n in SIDES:
                cut = n == "n1" and 2.0 <= t < cut_until - 1e-9
                upto = _ns(2.0) if cut else _ns(t)
                got = [a for done, a in acked if done < upto]
                view[n] = max(got) if got else None
            if store == "raft":
                sample["applied"] = {n: v or 0 for n, v in view.items()}
            else:
                sample["seen"] = {n: ({"r0": v} if v else {}) for n, v in view.items()}
            fh.write(json.dumps(sample) + "\n")


def write_run(
    root: Path, *, raft_results: dict[str, Any] | None = None, finished: bool = True
) -> Path:
    """A synthetic run folder with both stores (no per-store results.json unless given for
    raft); ``finished``: the top-level results.json of a run that finished."""
    root.mkdir(parents=True, exist_ok=True)
    for store in ("raft", "gossip"):
        write_store(root, store)
    if raft_results is not None:
        (root / "raft" / "results.json").write_text(json.dumps(raft_results))
    if finished:
        scenario = {"name": "synthetic", "nodes": 3, "workload": "register"}
        (root / "results.json").write_text(
            json.dumps({"status": "complete", "scenario": scenario, "stores": {}})
        )
    return root


def raft_results(valid: bool) -> dict[str, Any]:
    """A results.json as the runner writes it (the parts the report reads)."""
    lin: dict[str, Any] = {"valid": valid, "summary": f"linearizable: {valid}"}
    if not valid:
        lin["counterexample"] = {
            "key": "r0",
            "op": "read -> '0-3' by 4 on n1 at 3.000s",
            "state": "1-5",
            "reason": "read of '0-3' after '1-5' was acknowledged",
        }
    return {
        "store": "raft",
        "scenario": {"name": "synthetic", "nodes": 3, "clients_per_node": 1, "faults": []},
        "valid": valid,
        "timings": {
            "workload_end_s": 8.0,
            "fault_window_s": [1.999, 6.0],
            "faults": [
                {"t_s": 1.999, "done_s": 2.0, "action": "partition", "description": PARTITION},
                {"t_s": 5.999, "done_s": 6.0, "action": "heal", "description": {}},
            ],
        },
        "checkers": {"linearizable": lin},
    }


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return write_run(tmp_path / "run")


def test_availability_by_phase_and_side(run_dir: Path) -> None:
    s = build_summary(run_dir)
    raft = s["stores"]["raft"]
    ph = raft["phases"]
    assert raft["fault_window_s"] == [1.999, 6.0]
    assert ph["before"]["all"]["ok"] == 12 and ph["before"]["all"]["availability"] == 1.0
    minority = ph["during"]["minority"]
    assert (minority["ok"], minority["fail"], minority["info"]) == (0, 7, 1)
    assert minority["availability"] == 0.0
    majority = ph["during"]["majority"]
    assert (majority["ok"], majority["fail"], majority["total"]) == (12, 4, 16)
    assert majority["availability"] == 0.75
    # after the heal, clients of the former minority node are answered again
    assert ph["after"]["minority"]["availability"] == 1.0
    assert ph["after"]["minority"]["ok"] == 4
    gossip = s["stores"]["gossip"]["phases"]
    assert all(gossip[p]["all"]["availability"] == 1.0 for p in ("before", "during", "after"))
    assert gossip["during"]["minority"]["ok"] == 8


def test_refusal_timing_and_latency(run_dir: Path) -> None:
    raft = build_summary(run_dir)["stores"]["raft"]
    r = raft["phases"]["during"]["minority"]["refusals"]
    assert r["fail_median_ms"] == pytest.approx(2.0, abs=0.01)
    assert r["info_median_ms"] == pytest.approx(400.0, abs=0.01)
    assert r["info_without_answer"] == 0
    lat = raft["phases"]["before"]["all"]["latency"]
    assert lat["count"] == 12 and lat["p50_ms"] == pytest.approx(10.0, rel=0.01)
    assert raft["phases"]["before"]["all"]["throughput_ok_per_s"] == pytest.approx(12 / 1.999, 0.01)


def test_unavailability_window(run_dir: Path) -> None:
    (ep,) = build_summary(run_dir)["stores"]["raft"]["episodes"]
    assert ep["label"] == "partition majority-minority"
    assert ep["start_s"] == 1.999 and ep["end_s"] == 6.0
    # first majority write invoked after the cut that succeeded: at 3.0 s, acked at 3.01 s
    assert ep["majority_write_after_s"] == pytest.approx(3.01 - 1.999, abs=0.002)
    assert ep["minority_write_after_s"] is None


def test_replica_lag_and_one_time_to_converge(run_dir: Path) -> None:
    s = build_summary(run_dir)
    g = s["stores"]["gossip"]
    (ep,) = g["episodes"]
    d = ep["divergence"]
    # n1 saw nothing from 2.0 s until 6.5 s: at 6.4 s it lacked the 27 writes acknowledged
    # since (3 x 9), the oldest acknowledged at 2.001 s
    assert d["diverged"] and d["max_missing_writes"] == 27
    assert d["max_behind_ms"] == pytest.approx(6400 - 2001, abs=2)
    assert d["time_to_converge_s"] == pytest.approx(0.5, abs=1e-6)
    # the checker, the table and the verdict show the same figure
    assert g["checkers"]["convergence"]["time_to_converge_s"] == d["time_to_converge_s"]
    assert g["convergence"]["time_to_converge_s"] == d["time_to_converge_s"]
    rows = dict(key_rows(s))
    assert rows["Every replica caught up after the heal"] == ["in 0.30 s", "in 0.50 s"]
    assert "converged 0.50 s after the heal" in s["verdict"]
    assert "converged 0.30" not in s["verdict"] and "0.30 s" not in str(
        s["verdict_parts"]["columns"][0]
    )
    assert set(g["lag"]["missing"]) == {"n1", "n2", "n3"}
    assert max(g["lag"]["missing"]["n1"]) == 27 and max(g["lag"]["missing"]["n2"]) == 0
    raft = s["stores"]["raft"]["episodes"][0]["divergence"]
    assert raft["time_to_converge_s"] == pytest.approx(0.3, abs=1e-6)
    # raft's minority fell behind (and refused): the table says so, never "raft diverged"
    assert rows["Most acknowledged writes a replica lacked"][0].endswith(
        "(the minority: refused meanwhile)"
    )
    assert "diverged" not in " ".join(s["verdict_parts"]["columns"][0]["lines"])


def test_episode_lag_never_converged() -> None:
    points = [
        LagPoint(
            t_s=t / 10,
            missing={"a": 0, "b": t},
            oldest_ms={"a": 0.0, "b": 50.0 * t},
            differing_keys=None,
        )
        for t in range(30)
    ]
    d = episode_lag(points, 1.0, 2.0, 3.0)
    # never caught up: the peak is taken until the end of the run (3.0 s)
    assert d["diverged"] and d["max_missing_writes"] == 29 and d["time_to_converge_s"] is None


def test_verdict_two_columns_in_plain_words(run_dir: Path) -> None:
    s = build_summary(run_dir)
    parts = s["verdict_parts"]
    assert s["valid"] is True and s["violations"] == [] and parts["status"] == "ok"
    raft, gossip = parts["columns"]
    assert raft["title"] == "CP (raft) gave up availability"
    assert raft["lines"] == [
        "minority refused 100% of requests for 4.0 s (failing fast, median 2 ms)",
        "majority unavailable for 1.0 s during the election (75% answered during the fault)",
        "histories linearizable",
    ]
    assert gossip["title"] == "AP (gossip) gave up consistency"
    assert gossip["lines"][0] == "answered 100% on both sides"
    assert gossip["lines"][1] == "replicas diverged by up to 27 acknowledged writes, 4.4 s behind"
    assert gossip["lines"][2] == "converged 0.50 s after the heal"
    assert s["verdict"].startswith("CP (raft) gave up availability: minority refused 100%")


def test_an_unmeasured_time_to_converge_is_no_false_alarm(run_dir: Path) -> None:
    """No sample after the heal in which every node answered with its view (a Dump timed
    out, or too many keys to dump) while the convergence checker saw one state at the end:
    the verdict said "did NOT converge after the heal"."""
    import copy as _copy

    from harness.report.tables import _caught_up_cell
    from harness.report.verdict import gossip_lines

    s = _copy.deepcopy(build_summary(run_dir)["stores"]["gossip"])
    for e in s["episodes"]:
        e["divergence"]["time_to_converge_s"] = None
    assert s["checkers"]["convergence"]["valid"] is True
    assert "converged (the time after the heal was not measured)" in gossip_lines(s)[2]
    assert _caught_up_cell(s) == "not measured"
    s["checkers"]["convergence"]["valid"] = False
    assert "did NOT converge after the heal" in gossip_lines(s)[2]
    assert _caught_up_cell(s) == "not within the run"


def add_gossip_delete(root: Path, final: str | None, *, delete: bool = True) -> None:
    """Append to the synthetic gossip run: n1 deletes r0 at 7.9 s (after every write, also
    by its HLC timestamp; unless ``delete`` is False), then every node's final read of r0
    returns ``final``; the samples carry tombstone counters: one tombstone per node from
    7.9 s to 9 s."""
    from harness.history import read_history
    from harness.runner import FINAL_REGISTER_READ_PROCESS

    d = root / "gossip"
    events = read_history(d / "history.jsonl")
    with HistoryWriter(d / "history.jsonl") as w:
        for e in events:
            w.append(
                e.type,
                e.process,
                e.f,
                e.key,
                e.value,
                node=e.node,
                error=e.error,
                side=e.side,
                time=e.time,
                hlc=e.hlc,
            )
        if delete:
            w.append("invoke", 0, "delete", "r0", None, node="n1", time=_ns(7.9))
            w.append("ok", 0, "delete", "r0", None, node="n1", time=_ns(7.901), hlc=(7900, 0, "n1"))
        for i, node in enumerate(("n1", "n2", "n3")):
            pid = FINAL_REGISTER_READ_PROCESS + i
            w.append("invoke", pid, "read", "r0", None, node=node, time=_ns(8.5))
            w.append("ok", pid, "read", "r0", final, node=node, time=_ns(8.501))
    with open(d / "digests.jsonl", "w", encoding="utf-8") as fh:
        for k in range(101):
            t = k / 10
            held = 1 if 7.9 <= t < 9.0 else 0
            fh.write(
                json.dumps(
                    {
                        "time_ns": _ns(t),
                        "digests": {"n1": "aa", "n2": "aa", "n3": "aa"},
                        "tombstones": dict.fromkeys(SIDES, held),
                        "tombstones_collected": dict.fromkeys(SIDES, int(t >= 9.0)),
                    }
                )
                + "\n"
            )


def test_deletes_final_state_and_tombstones(run_dir: Path) -> None:
    add_gossip_delete(run_dir, None)
    s = build_summary(run_dir)
    validate_summary(s)
    g = s["stores"]["gossip"]
    assert g["deletes"] == {"invoked": 1, "acknowledged": 1, "indeterminate": 0, "refused": 0}
    assert s["stores"]["raft"]["deletes"]["invoked"] == 0
    assert g["final_state"] == {"valid": True, "keys": 1, "deleted_keys": 1, "violations": []}
    t = g["tombstones"]
    assert (t["valid"], t["max_held"], t["collected"]) == (None, 1, 3)
    assert t["all_collected_after_stop_s"] == pytest.approx(9.0 - 8.501, abs=0.002)
    rows = dict(key_rows(s))
    assert rows["Acknowledged writes and increments kept"] == ["-", "registers: yes"]
    more = dict(detail_rows(s))
    assert more["deletes acknowledged"] == ["0 / 0", "1 / 1"]
    assert more["tombstones"] == [
        "-",
        "3 collected, 3 held at the end; none left 0.50 s after the stop",
    ]
    # these samples carry no per-node view: the lag is "not measured", not "none"
    assert rows["Most acknowledged writes a replica lacked"][1] == "not measured"
    assert "replica lag not measured" in s["verdict"]


def test_resurrected_key_is_a_violation(run_dir: Path) -> None:
    add_gossip_delete(run_dir, "2-15")  # n3's write at 7.5 s, older than the delete
    s = build_summary(run_dir)
    assert s["valid"] is False
    assert s["violations"][0].startswith(
        "gossip: replicas did not end with the last acknowledged write of 1 key (r0: "
    )
    assert s["verdict"].startswith("VIOLATION: gossip: replicas did not end")
    rows = dict(key_rows(s))
    assert rows["Acknowledged writes and increments kept"][1] == "registers: VIOLATION (1 key)"
    assert rows["Consistency checks"][1] == "VIOLATION: final_state"


def test_lww_discards_count_and_one_example(run_dir: Path) -> None:
    """r0 ends as n3's write at 7.5 s (the greatest HLC): n1's and n2's concurrent writes
    at 7.5 s were acknowledged and discarded by last-writer-wins."""
    add_gossip_delete(run_dir, "2-15", delete=False)
    s = build_summary(run_dir)
    validate_summary(s)
    lww = s["stores"]["gossip"]["lww"]
    assert lww["discarded"] == 2
    assert {d["lost_value"] for d in lww["discards"]} == {"0-15", "1-15"}
    assert {d["winner_value"] for d in lww["discards"]} == {"2-15"}
    cell = dict(key_rows(s))["Acknowledged writes discarded by LWW"]
    assert cell[0] == "none (no last-writer-wins)"
    assert cell[1].startswith("2 of ")
    assert "key r0: '0-15' (n1, acked at 7.50 s) lost to '2-15' (n3, acked at 7.50 s)" in cell[1]
    assert "2 acknowledged writes discarded by LWW" in s["verdict"]


def test_pct_never_rounds_up_to_100() -> None:
    assert pct(1.0) == "100%" and pct(0.0) == "0%"
    assert pct(0.9996) != "100%" and pct(0.0004) != "0%"
    assert pct(0.75) == "75%"


def test_violation_comes_first_and_fails_cli(tmp_path: Path) -> None:
    run = write_run(tmp_path / "bad", raft_results=raft_results(valid=False))
    s = build_summary(run)
    assert s["valid"] is False
    assert s["violations"] == [
        "raft: NOT linearizable (read of '0-3' after '1-5' was acknowledged)"
    ]
    assert s["verdict"].startswith("VIOLATION: raft: NOT linearizable")
    assert "histories NOT linearizable" in s["verdict"]
    assert cli_main(["report", str(run)]) == 1
    html = (run / "report.html").read_text()
    assert "Counterexample" in html and "VIOLATION FOUND" in html
    assert 'class="verdict violation"' in html


def _never_converges(run: Path) -> None:
    """Gossip's n1 keeps another digest to the end: with a finished run, a convergence
    violation."""
    path = run / "gossip" / "digests.jsonl"
    lines = path.read_text().splitlines()
    out = []
    for line in lines:
        obj = json.loads(line)
        if obj["time_ns"] >= _ns(2.3):
            obj["digests"]["n1"] = "bb"
        out.append(json.dumps(obj))
    path.write_text("\n".join(out) + "\n")


def test_interrupted_run_is_labelled_interrupted_not_violation(tmp_path: Path) -> None:
    finished = write_run(tmp_path / "finished")
    _never_converges(finished)
    s = build_summary(finished)
    assert s["status"] == "complete" and s["verdict_parts"]["status"] == "violation"
    assert "gossip: replicas did not converge to one state after the heal" in s["violations"]

    for marker in (None, {"status": "interrupted", "scenario": {"name": "x", "nodes": 3}}):
        run = write_run(tmp_path / f"cut-{marker is None}", finished=False)
        _never_converges(run)
        if marker is not None:
            (run / "results.json").write_text(json.dumps(marker))
        rep = build_report(run)
        s = rep.summary
        validate_summary(s)
        assert s["status"] == "interrupted" and rep.status == "interrupted"
        assert s["violations"] == [] and "convergence" not in s["stores"]["gossip"]["checkers"]
        assert s["verdict"].startswith("INTERRUPTED: The run was interrupted")
        html = rep.html_path.read_text()
        assert 'class="verdict interrupted"' in html and "INTERRUPTED" in html
        assert "VIOLATION FOUND" not in html and "? nodes per store" not in html
        assert "3 nodes per store" in html
        assert cli_main(["report", str(run)]) == 1  # not a finished, passing run


def test_previous_report_survives_a_failed_build(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_report(run_dir)
    before = {n: (run_dir / n).read_bytes() for n in REPORT_FILES}
    from harness.report import html as report_html

    def broken(*args: Any, **kw: Any) -> str:
        raise RuntimeError("disk full, say")

    monkeypatch.setattr(report_html, "render_html", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        build_report(run_dir)
    assert {n: (run_dir / n).read_bytes() for n in REPORT_FILES} == before
    assert not [p.name for p in run_dir.iterdir() if ".tmp-" in p.name]


def test_one_colour_one_meaning() -> None:
    assert len(set(PALETTE.values())) == len(PALETTE)
    colors = side_colors(["n1", "n2", "n3", "n4"], {"n1": "minority", "n2": "majority"})
    assert len(set(colors.values())) == 4
    assert PALETTE["timeout"] not in colors.values() and PALETTE["minority"] != PALETTE["timeout"]


def test_results_json_is_reused(tmp_path: Path) -> None:
    run = write_run(tmp_path / "ok", raft_results=raft_results(valid=True))
    raft = build_summary(run)["stores"]["raft"]
    assert raft["checkers"] == raft_results(True)["checkers"]
    assert raft["linearizable"]["summary"] == "linearizable: True"


def test_summary_validates_and_broken_ones_do_not(run_dir: Path) -> None:
    s = build_summary(run_dir)
    validate_summary(s)
    broken: list[dict[str, Any]] = []
    b = copy.deepcopy(s)
    del b["machine"]
    broken.append(b)
    b = copy.deepcopy(s)
    b["stores"]["raft"]["phases"]["during"]["majority"]["availability"] = 1.5
    broken.append(b)
    b = copy.deepcopy(s)
    b["schema_version"] = 99
    broken.append(b)
    b = copy.deepcopy(s)
    b["stores"]["raft"]["episodes"][0]["majority_write_after_s"] = "soon"
    broken.append(b)
    b = copy.deepcopy(s)
    b["stores"]["etcd"] = b["stores"]["raft"]
    broken.append(b)
    for doc in broken:
        with pytest.raises(jsonschema.ValidationError):
            validate_summary(doc)


def _check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR", f"{path} has no IHDR chunk"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 0 and height > 0


def _check_html(path: Path) -> str:
    html = path.read_text(encoding="utf-8")
    assert 'id="verdict"' in html
    assert "<script" not in html.lower()
    assert 'src="http' not in html and "<link" not in html  # self-contained
    assert html.count('src="data:image/png;base64,') == 5
    return html


def test_build_report_writes_everything(run_dir: Path) -> None:
    rep = build_report(run_dir)
    assert rep.valid
    for name in ("timeline", "latency", "throughput", "divergence", "availability"):
        _check_png(run_dir / f"{name}.png")
    html = _check_html(rep.html_path)
    assert "minority refused 100% of requests" in html
    assert 'class="scroll"' in html and "<details><summary>All figures side by side" in html
    assert len(key_rows(rep.summary)) <= 10
    assert 'href="raft/history.jsonl"' in html and 'href="gossip/logs/n1.log"' in html
    doc = json.loads(rep.summary_path.read_text())
    validate_summary(doc)
    assert doc["machine"]["cpu_count"] >= 1
    assert doc["commit"] is None or len(doc["commit"]["sha"]) == 40


def test_report_cli(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "CP (raft) gave up availability" in out
    assert f"report: {(run_dir / 'report.html').resolve()}" in out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["report", str(empty)]) == 2


def test_single_store_run(tmp_path: Path) -> None:
    run = write_run(tmp_path / "one")
    shutil.rmtree(run / "raft")
    rep = build_report(run)
    assert list(rep.summary["stores"]) == ["gossip"]
    assert rep.verdict.startswith("AP (gossip) gave up consistency: answered 100% on both sides")


# -- integration: a short real run, opened in headless Chromium -------------------------------
def chromium_dump_dom(html: Path, profile: Path) -> str:
    exe = shutil.which("chromium")
    if exe is None:
        hint = "chromium is not installed (apt-get install -y chromium): report.html not opened"
        if os.environ.get("CAPLAB_REQUIRE_BROWSER"):  # .ci/run sets it
            pytest.fail(hint)
        pytest.skip(hint)
    proc = subprocess.run(
        [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--dump-dom",
            html.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc.stdout


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_report_of_a_real_run(tmp_path: Path) -> None:
    from harness.runner import run_scenario
    from harness.scenario import load_scenario

    scenario = load_scenario(ROOT / "scenarios" / "smoke.yaml")
    assert scenario.nodes == 3 and scenario.duration <= 10
    out = tmp_path / "smoke"
    run_scenario(scenario, "both", out)
    rep = build_report(out)
    for name in ("timeline", "latency", "throughput", "divergence", "availability"):
        _check_png(out / f"{name}.png")
    validate_summary(json.loads((out / "summary.json").read_text()))
    _check_html(rep.html_path)
    dom = chromium_dump_dom(rep.html_path, tmp_path / "chromium-profile")
    assert 'id="verdict"' in dom
    start = dom.index('id="verdict"')
    text = dom[start : dom.index("</section>", start)]
    assert "CP (raft) gave up availability" in text and "AP (gossip) gave up consistency" in text
    assert rep.valid, rep.summary["violations"]


def test_layers_import_no_runner_and_no_circle() -> None:
    """The report reads run folders without the runner; the checker dispatch is shared."""
    code = (
        "import sys, harness.report, harness.report.plots, harness.report.html\n"
        "import harness.checks\n"
        "assert 'harness.runner' not in sys.modules, 'the report imports the runner'\n"
        "import harness.runner\n"
        "assert harness.runner.run_checkers is harness.checks.run_checkers\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(("exc", "status"), [("cancel", "interrupted"), ("crash", "failed")])
def test_runner_marks_an_unfinished_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: str, status: str
) -> None:
    """SIGTERM/Ctrl-C (the run task cancelled) or a crash: results.json says the run did not
    finish, replacing the previous run's; the report then says INTERRUPTED, not violation."""
    import asyncio

    from harness import runner
    from harness.scenario import Scenario

    class CutShort:
        def __init__(self, scenario: Scenario, store: str, out: Path, **kw: Any) -> None:
            self.store = store

        async def setup(self) -> None:
            write_store(tmp_path / "run", self.store)
            if exc == "cancel":
                raise asyncio.CancelledError
            raise RuntimeError("node n2 exited")

        async def close(self) -> None:
            return None

    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"status": "complete", "stores": {}}))
    monkeypatch.setattr(runner, "StoreRun", CutShort)
    sc = Scenario(name="cut", duration=8.0, nodes=3, store="raft")
    with pytest.raises(KeyboardInterrupt if exc == "cancel" else RuntimeError):
        runner.run_scenario(sc, "raft", run)
    marker = json.loads((run / "results.json").read_text())
    assert marker["status"] == status and marker["scenario"]["nodes"] == 3
    s = build_summary(run)
    assert s["status"] == status and s["verdict_parts"]["status"] == status
