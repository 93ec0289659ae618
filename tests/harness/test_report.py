"""The side-by-side report: figures on small synthetic run folders with known answers, the
summary schema, the HTML page; and (integration) a short real run opened in Chromium."""

from __future__ import annotations

import copy
import json
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from caplab.cli import main as cli_main
from harness.history import HistoryWriter
from harness.report import (
    build_report,
    build_summary,
    divergence_interval,
    key_rows,
    pct,
    validate_summary,
)

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
    with HistoryWriter(d / "history.jsonl") as w:
        for t, _, (args, kw) in items:
            etype, process, f, key, value = args
            w.append(etype, process, f, key, value, time=t, **kw)
    with open(d / "digests.jsonl", "w", encoding="utf-8") as fh:
        for k in range(81):
            t = k / 10
            if store == "gossip" and t + 1e-9 >= 2.3 and t < 6.5 - 1e-9:
                digests = {"n1": "bb", "n2": "aa", "n3": "aa"}
            else:
                digests = {"n1": "aa", "n2": "aa", "n3": "aa"}
            fh.write(json.dumps({"time_ns": _ns(t), "digests": digests}) + "\n")


def write_run(root: Path, *, raft_results: dict[str, Any] | None = None) -> Path:
    """A synthetic run folder with both stores (no results.json unless given for raft)."""
    root.mkdir(parents=True, exist_ok=True)
    for store in ("raft", "gossip"):
        write_store(root, store)
    if raft_results is not None:
        (root / "raft" / "results.json").write_text(json.dumps(raft_results))
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


def test_divergence_duration_and_convergence(run_dir: Path) -> None:
    s = build_summary(run_dir)
    (ep,) = s["stores"]["gossip"]["episodes"]
    d = ep["divergence"]
    assert d["diverged"] and d["max_distinct_digests"] == 2
    assert d["diverged_from_s"] == pytest.approx(2.3)
    assert d["converged_at_s"] == pytest.approx(6.5)
    assert d["diverged_for_s"] == pytest.approx(4.2, abs=1e-6)
    assert d["one_digest_after_heal_s"] == pytest.approx(0.5, abs=1e-6)
    assert s["stores"]["raft"]["episodes"][0]["divergence"]["diverged"] is False
    assert s["stores"]["gossip"]["convergence"]["valid"] is True


def test_divergence_interval_never_converged() -> None:
    samples = [{"time_ns": _ns(t / 10), "digests": {"a": "x", "b": "y"}} for t in range(30)]
    d = divergence_interval(samples, 1.0, 2.0)
    assert d["diverged"] and d["converged_at_s"] is None and d["diverged_for_s"] is None


def test_verdict_in_plain_words(run_dir: Path) -> None:
    s = build_summary(run_dir)
    v = s["verdict"]
    assert s["valid"] is True and s["violations"] == []
    assert v.startswith("Raft refused 100% of requests on the minority side for 4.0 s")
    assert "took 1.0 s to accept writes again" in v
    assert "stayed linearizable" in v
    assert "gossip answered 100% on both sides" in v
    assert "diverged for 4.2 s and converged 0.50 s after heal" in v


def add_gossip_delete(root: Path, final: str | None) -> None:
    """Append to the synthetic gossip run: n1 deletes r0 at 7.9 s (after every write, also
    by its HLC timestamp), then every node's final read of r0 returns ``final``; the
    samples carry tombstone counters: one tombstone per node from 7.9 s to 9 s."""
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
    assert (
        "every register ended as its last acknowledged write (1 acknowledged delete, "
        in (s["verdict"])
    )
    assert "its tombstones were all collected 0.50 s after the clients stopped" in s["verdict"]
    rows = dict(key_rows(s))
    assert rows["deletes acknowledged"] == ["0 / 0", "1 / 1"]
    assert rows["last acked write on every replica"] == ["-", "yes (1 of 1 key deleted)"]
    assert rows["tombstones"] == [
        "-",
        "3 collected, 3 held at the end; none left 0.50 s after the stop",
    ]


def test_resurrected_key_is_a_violation(run_dir: Path) -> None:
    add_gossip_delete(run_dir, "2-15")  # n3's write at 7.5 s, older than the delete
    s = build_summary(run_dir)
    assert s["valid"] is False
    assert s["violations"][0].startswith("gossip: final_state violated (r0: RESURRECTION: ")
    assert s["verdict"].startswith("VIOLATION: gossip: final_state violated")
    assert (
        "Gossip's replicas did NOT end with the last acknowledged write of 1 key" in (s["verdict"])
    )
    assert dict(key_rows(s))["last acked write on every replica"][1] == "VIOLATION (1 key)"


def test_pct_never_rounds_up_to_100() -> None:
    assert pct(1.0) == "100%" and pct(0.0) == "0%"
    assert pct(0.9996) != "100%" and pct(0.0004) != "0%"
    assert pct(0.75) == "75%"


def test_violation_comes_first_and_fails_cli(tmp_path: Path) -> None:
    run = write_run(tmp_path / "bad", raft_results=raft_results(valid=False))
    s = build_summary(run)
    assert s["valid"] is False
    assert s["violations"] and s["violations"][0].startswith("raft: linearizable violated")
    assert s["verdict"].startswith("VIOLATION")
    assert "Raft was NOT linearizable" in s["verdict"]
    assert cli_main(["report", str(run)]) == 1
    html = (run / "report.html").read_text()
    assert "Counterexample" in html and "Violation found" in html


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
    assert "Raft refused 100% of requests" in html
    assert 'href="raft/history.jsonl"' in html and 'href="gossip/logs/n1.log"' in html
    doc = json.loads(rep.summary_path.read_text())
    validate_summary(doc)
    assert doc["machine"]["cpu_count"] >= 1
    assert doc["commit"] is None or len(doc["commit"]["sha"]) == 40


def test_report_cli(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "Raft refused" in out and "report.html" in out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["report", str(empty)]) == 2


def test_single_store_run(tmp_path: Path) -> None:
    run = write_run(tmp_path / "one")
    shutil.rmtree(run / "raft")
    rep = build_report(run)
    assert list(rep.summary["stores"]) == ["gossip"]
    assert rep.verdict.startswith("Gossip answered 100% on both sides")


# -- integration: a short real run, opened in headless Chromium -------------------------------
def chromium_dump_dom(html: Path, profile: Path) -> str:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail(
            "chromium is not installed: the report test opens report.html in Debian's headless "
            "Chromium (apt-get install -y chromium; .ci/run does it)"
        )
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
    text = dom[dom.index(">", start) + 1 : dom.index("</p>", start)]
    assert text.strip() == rep.verdict.replace("&", "&amp;").replace("<", "&lt;").replace(
        ">", "&gt;"
    ).replace('"', "&quot;").replace("'", "&#x27;") or text.strip().startswith(rep.verdict[:30])
    assert "Raft" in text and "gossip" in text.lower()
    assert rep.valid, rep.summary["violations"]
