"""``caplab demo``: arguments, the progress watcher on growing files, the command end to end
with a stand-in runner, and (integration) a short real demo."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from caplab.cli import main as cli_main
from harness.demo import (
    DEFAULT_SCENARIO,
    DemoUsageError,
    HistoryTail,
    Watcher,
    demo_scenario,
    parse_seconds,
    run_demo,
)
from harness.scenario import Scenario
from tests.harness.test_report import raft_results, write_run

ROOT = Path(__file__).resolve().parents[2]


def test_parse_seconds() -> None:
    assert parse_seconds("60") == 60.0
    assert parse_seconds("20s") == 20.0
    assert parse_seconds("1m") == 60.0
    for bad in ("0", "-3", "soon"):
        with pytest.raises(ValueError):
            parse_seconds(bad)


def test_demo_scenario_overrides() -> None:
    sc = demo_scenario(DEFAULT_SCENARIO, 3, 30.0)
    assert sc.nodes == 3 and sc.duration == 30.0 and sc.store == "both"
    assert [f.action for f in sc.faults] == ["partition", "heal"]
    short = demo_scenario(DEFAULT_SCENARIO, None, 12.0)
    assert short.nodes == 5 and [f.action for f in short.faults] == ["partition"]
    with pytest.raises(DemoUsageError, match="between 3 and 15"):
        demo_scenario(DEFAULT_SCENARIO, 2, None)
    with pytest.raises(DemoUsageError):
        demo_scenario(ROOT / "scenarios" / "missing.yaml", None, None)


def test_history_tail_reads_only_complete_lines(tmp_path: Path) -> None:
    p = tmp_path / "h.jsonl"
    tail = HistoryTail(p)
    assert tail.poll() == []  # no file yet
    p.write_text('{"a": 1}\n{"a": 2')
    assert tail.poll() == [{"a": 1}]
    with open(p, "a") as fh:
        fh.write('}\n{"a": 3}\n')
    assert tail.poll() == [{"a": 2}, {"a": 3}]
    assert tail.poll() == []
    p.write_text('{"b": 1}\n')  # replaced by a new, shorter file
    assert tail.poll() == [{"b": 1}]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _ev(i: int, t: float, process: Any, etype: str, f: str, **kw: Any) -> str:
    ev = {
        "index": i,
        "time": int(t * 1e9),
        "process": process,
        "node": "n1",
        "type": etype,
        "f": f,
        "key": None,
        "value": kw.pop("value", None),
        "error": kw.pop("error", None),
    }
    return json.dumps(ev) + "\n"


def test_watcher_phases_fault_and_rates(tmp_path: Path) -> None:
    sc = Scenario(name="t", duration=10.0, nodes=3, store="both")
    clock = FakeClock()
    w = Watcher(tmp_path, sc, clock=clock)
    w.poll()
    assert w.phase().startswith("starting nodes: 2 x 3")
    (tmp_path / "raft").mkdir()
    lines = [_ev(0, 0.1, 0, "invoke", "write"), _ev(1, 0.2, 0, "ok", "write")]
    lines += [
        _ev(2, 0.3, 0, "invoke", "cas"),
        _ev(3, 0.4, 0, "fail", "cas", error="compare failed"),
    ]
    lines += [
        _ev(4, 0.5, 0, "invoke", "cas"),
        _ev(5, 0.6, 0, "fail", "cas", error="UNAVAILABLE: x"),
    ]
    lines += [_ev(6, 0.7, "nemesis", "invoke", "partition")]
    sides = {"n1": "minority", "n2": "majority", "n3": "majority"}
    lines += [
        _ev(
            7,
            0.8,
            "nemesis",
            "ok",
            "partition",
            value={"shape": "majority-minority", "sides": sides},
        )
    ]
    (tmp_path / "raft" / "history.jsonl").write_text("".join(lines))
    clock.now = 101.0
    w.poll()
    raft = w.stores["raft"]
    assert (raft.ok, raft.fail, raft.info) == (2, 1, 0)  # a failed compare is an answer
    assert raft.fault == "partition majority-minority (minority: n1)"
    assert w.phase() == "running: fault in force: partition majority-minority (minority: n1)"
    assert raft.ops_per_s(w.elapsed) == 3.0
    clock.now = 105.0  # nothing new for 4 s: the rate drops to 0
    assert raft.ops_per_s(w.elapsed) == 0.0
    with open(tmp_path / "raft" / "history.jsonl", "a") as fh:
        fh.write(_ev(8, 5.0, "nemesis", "invoke", "heal"))
        fh.write(_ev(9, 5.1, "nemesis", "ok", "heal", value={"healed": "majority-minority"}))
    w.poll()
    assert raft.fault is None and w.phase().startswith("running: healed")
    clock.now = 111.0
    assert w.phase().startswith("checking: clients stopped")
    with open(tmp_path / "raft" / "history.jsonl", "a") as fh:  # the runner's final reads
        fh.write(_ev(10, 11.0, 1_000_000, "invoke", "read-counter"))
    w.poll()
    assert w.phase().startswith("checking: final reads")
    w.reporting = True
    assert w.phase() == "writing the report"
    assert "raft:" in w.line() and all(len(x) <= 100 for x in w.line().splitlines())


def _fake_runner(valid: bool) -> Any:
    def run(scenario: Scenario, store: str, out: Path) -> None:
        assert store == "both"
        write_run(out, raft_results=raft_results(valid))

    return run


def _console(width: int = 120) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=width, force_terminal=False, color_system=None), buf


def test_run_demo_prints_table_verdict_and_report(tmp_path: Path) -> None:
    console, buf = _console(width=200)
    out = tmp_path / "demo-out"
    (out / "raft").mkdir(parents=True)
    (out / "raft" / "stale.txt").write_text("from an earlier demo")
    sc = demo_scenario(DEFAULT_SCENARIO, 3, None)
    assert run_demo(sc, out, console, runner=_fake_runner(True)) == 0
    text = buf.getvalue()
    assert "side by side" in text and "Consistency checks" in text and "minority side" in text
    assert "CP (raft) gave up availability" in text and "AP (gossip) gave up" in text
    assert "minority refused 100% of requests for 4.0 s" in text
    assert f"report: {(out / 'report.html').resolve()}" in text
    assert not (out / "raft" / "stale.txt").exists()
    assert (out / "summary.json").exists()
    # the printout fits in 100 columns (but for the lines naming the output folder)
    wide = [x for x in text.splitlines() if len(x) > 100 and str(tmp_path) not in x]
    assert not wide, wide


def _runner_that_fails(exc: BaseException) -> Any:
    """Writes part of a run, then fails as ``exc`` (Ctrl-C, a crash)."""

    def run(scenario: Scenario, store: str, out: Path) -> None:
        write_run(out, finished=False)
        raise exc

    return run


def test_a_new_run_keeps_the_previous_report_until_it_is_replaced(tmp_path: Path) -> None:
    out = tmp_path / "demo-out"
    sc = demo_scenario(DEFAULT_SCENARIO, 3, None)
    console, _ = _console()
    assert run_demo(sc, out, console, runner=_fake_runner(True)) == 0
    good = (out / "report.html").read_bytes()
    for exc, rc in ((KeyboardInterrupt(), 130), (RuntimeError("node n2 died"), 1)):
        console, buf = _console()
        assert run_demo(sc, out, console, runner=_runner_that_fails(exc)) == rc, buf.getvalue()
        assert (out / "report.html").read_bytes() == good
        assert (out / "summary.json").exists() and (out / "timeline.png").exists()
        # the folder says the run did not finish; its report says so, not "violation"
        status = json.loads((out / "results.json").read_text())["status"]
        assert status == ("interrupted" if rc == 130 else "failed")
        assert cli_main(["report", str(out)]) == 1
        html = (out / "report.html").read_text()
        assert "VIOLATION FOUND" not in html
        assert ("INTERRUPTED" if rc == 130 else "RUN DID NOT FINISH") in html
        good = (out / "report.html").read_bytes()


def test_run_demo_exits_1_on_a_violation(tmp_path: Path) -> None:
    console, buf = _console()
    sc = demo_scenario(DEFAULT_SCENARIO, 3, None)
    assert run_demo(sc, tmp_path / "out", console, runner=_fake_runner(False)) == 1
    assert "VIOLATION" in buf.getvalue()


def test_run_demo_reports_a_failed_run(tmp_path: Path) -> None:
    def broken(scenario: Scenario, store: str, out: Path) -> None:
        raise TimeoutError("raft cluster accepted no write within 60s")

    console, buf = _console()
    sc = demo_scenario(DEFAULT_SCENARIO, 3, None)
    assert run_demo(sc, tmp_path / "out", console, runner=broken) == 1
    assert "the run failed: raft cluster accepted no write" in buf.getvalue()


def test_cli_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["demo", "--nodes", "2"]) == 2
    assert cli_main(["demo", "--duration", "soon"]) == 2
    assert "error" in capsys.readouterr().out


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_real_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    rc = cli_main(
        [
            "demo",
            "--out",
            str(out),
            "--nodes",
            "3",
            "--duration",
            "8",
            "--scenario",
            str(ROOT / "scenarios" / "smoke.yaml"),
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "report:" in text and (out / "report.html").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["stores"]) == {"raft", "gossip"}
    assert summary["stores"]["raft"]["phases"]["during"]["minority"]["availability"] < 0.5
    assert summary["stores"]["gossip"]["phases"]["during"]["minority"]["availability"] > 0.9
    # the nodes were authenticated to each other, and the report says so
    assert {s["security"]["peers"] for s in summary["stores"].values()} == {"mutual TLS"}
    assert "Peers authenticated" in (out / "report.html").read_text()
