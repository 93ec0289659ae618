"""``caplab spectrum``: the matrix computed from hand-made run folders (each cell's numbers
known in advance), the verdict, the files written, the fault timeline for any size, and the
short form end to end on real clusters."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.history import HistoryWriter
from harness.report.load import load_run
from harness.spectrum import HTML_NAME, SUMMARY_NAME, build_spectrum_report
from harness.spectrum.matrix import PROMISES, claimed_bound_ms, compute_matrix
from harness.spectrum.run import (
    DEFAULT_SCENARIO,
    SpectrumUsageError,
    spectrum_scenario,
    timeline,
)
from harness.spectrum.verdict import verdict
from harness.workload import LEVELS

MS = 1_000_000
ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self) -> None:
        self.t = 0

    def __call__(self) -> int:
        return self.t


class Run:
    """Writes one store's history by hand: ``op`` invokes and completes at once (1 ms)."""

    def __init__(self, out: Path, store: str) -> None:
        (out / store).mkdir(parents=True)
        self.clock = Clock()
        self.w = HistoryWriter(out / store / "history.jsonl", clock=self.clock)
        self.log = 0

    def at(self, ms: int) -> None:
        self.clock.t = ms * MS

    def op(
        self,
        p: int,
        f: str,
        key: str,
        value: str | None,
        *,
        node: str,
        level: str,
        result: str | None = None,
        type: str = "ok",
        error: str | None = None,
        side: str | None = None,
        roaming: bool = False,
    ) -> None:
        self.w.invoke(p, f, key, value, node=node, side=side, consistency=level, roaming=roaming)
        self.clock.t += MS
        log = None
        if f == "write" and type == "ok":
            self.log += 1
            log = self.log
        out = value if f == "write" else result
        self.w.complete(type, p, out if type == "ok" else None, error=error, log_index=log)  # type: ignore[arg-type]

    def nemesis(self, f: str, value: dict[str, object]) -> None:
        self.w.invoke("nemesis", f, None, None)
        self.w.complete("ok", "nemesis", value)  # type: ignore[arg-type]

    def close(self) -> None:
        self.w.close()


SIDES = {"n1": "majority", "n2": "majority", "n3": "minority"}


def write_run(out: Path, *, break_session: bool = False) -> None:
    """raft: strong, session and eventual clients through a partition of n3 (1 s .. 2 s);
    gossip: a strong client, refused."""
    r = Run(out, "raft")
    r.at(0)
    r.op(0, "write", "w0", "a1", node="n1", level="strong")
    r.op(1, "write", "w1", "b1", node="n1", level="session")
    r.op(2, "write", "w2", "c1", node="n3", level="eventual")
    r.at(1000)
    r.nemesis("partition", {"shape": "groups", "sides": SIDES})
    r.at(1100)
    r.op(0, "write", "w0", "a2", node="n1", level="strong", side="majority")
    r.op(1, "write", "w1", "b2", node="n1", level="session", side="majority", roaming=True)
    # strong on the minority: refused; on the majority: the latest value
    r.op(
        0,
        "read",
        "w0",
        None,
        node="n3",
        level="strong",
        type="fail",
        error="UNAVAILABLE: no leader",
        side="minority",
    )
    r.op(0, "read", "w0", None, node="n1", level="strong", result="a2", side="majority")
    # session, roaming to the minority: refused (it lacks the client's write) ...
    r.op(
        1,
        "read-local",
        "w1",
        None,
        node="n3",
        level="session",
        type="fail",
        error="UNAVAILABLE: not caught up",
        side="minority",
        roaming=True,
    )
    # ... unless the test breaks the promise: an old value of its own register
    if break_session:
        r.op(
            1,
            "read-local",
            "w1",
            None,
            node="n3",
            level="session",
            result="b1",
            side="minority",
            roaming=True,
        )
    # eventual, sticky on the minority: answers, from 1.2 s in the past (a2 came at 1.101 s)
    r.at(1500)
    r.op(2, "read-local", "w0", None, node="n3", level="eventual", result="a1", side="minority")
    r.op(2, "read-local", "w2", None, node="n3", level="eventual", result="c1", side="minority")
    r.at(1950)  # 849 ms stale: beyond what raft claims for a 100 ms bound (800 ms)
    r.op(2, "read-local", "w0", None, node="n3", level="eventual", result="a1", side="minority")
    r.at(2000)
    r.nemesis("heal", {"healed": "groups"})
    r.at(2500)
    r.op(2, "read-local", "w0", None, node="n3", level="eventual", result="a2")
    r.close()
    g = Run(out, "gossip")
    g.at(1100)
    for node, side in SIDES.items():
        g.op(
            0,
            "read",
            "w0",
            None,
            node=node,
            level="strong",
            type="fail",
            error="FAILED_PRECONDITION: an always-available store cannot read linearizably",
            side=side,
        )
    # one read timed out before the store could refuse it: still not offered
    g.op(
        1,
        "read",
        "w0",
        None,
        node="n1",
        level="strong",
        type="info",
        error="DEADLINE_EXCEEDED: deadline",
        side="majority",
    )
    g.close()
    (out / "results.json").write_text(
        json.dumps({"status": "complete", "scenario": {"max_staleness_ms": 100}}),
        encoding="utf-8",
    )


def test_the_matrix_of_a_hand_made_run(tmp_path: Path) -> None:
    write_run(tmp_path)
    m = compute_matrix(load_run(tmp_path), 100)
    assert m.levels == ("strong", "session", "eventual")
    assert m.partition_s is not None and m.partition_s[0] == pytest.approx(1.0, abs=0.01)
    raft = m.cells["raft"]
    strong, session, eventual = raft["strong"], raft["session"], raft["eventual"]
    assert strong.offered and not strong.broken and strong.reads == 2 and strong.reads_ok == 1
    assert strong.availability["minority"]["sticky"].total == 1
    assert strong.availability["minority"]["sticky"].ok == 0
    assert strong.availability["majority"]["sticky"].ok == 1
    assert session.availability["minority"]["roaming"].total == 1
    assert session.availability["minority"]["roaming"].ok == 0
    assert session.refused_reasons == {"UNAVAILABLE": 1}
    # eventual: the reads of w0 at 1.5 and 1.95 s returned a1, overwritten by a2 at 1.101 s
    assert eventual.anomalies["linearizable"].count == 2
    assert not eventual.anomalies["linearizable"].promised
    assert eventual.bound_ms == claimed_bound_ms("raft", 100) == 800
    assert eventual.anomalies["bounded_staleness"].count == 1  # 849 ms; not 399 ms
    st = eventual.staleness
    assert st is not None and st.reads == 4 and st.stale == 2
    assert st.max_ms == pytest.approx(1950 - 1101, abs=1)
    assert st.versions_behind_max == 1
    assert eventual.permitted == ["linearizable", "bounded_staleness"]
    assert eventual.broken == []
    gossip = m.cells["gossip"]["strong"]
    assert not gossip.offered and "always-available" in (gossip.refusal or "")
    v = verdict(m)
    assert v.ok and v.headline.startswith("Every promise kept")
    assert any("refuses STRONG" in line for line in v.lines["gossip"])
    assert any("EVENTUAL returned values up to 849 ms old" in line for line in v.lines["raft"])


def test_a_broken_promise_is_the_headline(tmp_path: Path) -> None:
    write_run(tmp_path, break_session=True)
    m = compute_matrix(load_run(tmp_path), 100)
    session = m.cells["raft"]["session"]
    assert session.broken == ["read_my_writes"], session.anomalies
    assert "b1" in (session.anomalies["read_my_writes"].example or "")
    v = verdict(m)
    assert not v.ok and v.headline.startswith("PROMISE BROKEN")
    assert any("SESSION" in line and "read my writes" in line for line in v.lines["broken"])


def test_the_report_files(tmp_path: Path) -> None:
    write_run(tmp_path)
    report = build_spectrum_report(tmp_path)
    doc = json.loads((tmp_path / SUMMARY_NAME).read_text(encoding="utf-8"))
    assert doc["schema_version"] == "caplab.spectrum/1"
    assert {"machine", "commit", "scenario", "matrix", "verdict", "levels"} <= set(doc)
    cell = doc["matrix"]["raft"]["eventual"]
    assert cell["promise_kept"] is True and cell["anomalies"]["linearizable"]["count"] == 2
    assert cell["staleness"]["versions_behind"]["max"] == 1
    assert doc["matrix"]["gossip"]["strong"]["offered"] is False
    page = (tmp_path / HTML_NAME).read_text(encoding="utf-8")
    assert "Terry&#x27;s Table 2, measured" in page or "Terry's Table 2, measured" in page
    assert "Every promise kept" in page and 'src="data:image/png;base64,' in page
    assert report.plot_path is not None and report.plot_path.stat().st_size > 1000
    assert not list(tmp_path.glob(".*.tmp*")), "temporary files left behind"


def test_caplab_report_rebuilds_a_spectrum_report(tmp_path: Path) -> None:
    from caplab.cli import main

    write_run(tmp_path)
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    results["scenario"]["read_levels"] = ["strong", "session", "eventual"]
    (tmp_path / "results.json").write_text(json.dumps(results), encoding="utf-8")
    assert main(["report", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / SUMMARY_NAME).read_text(encoding="utf-8"))
    assert doc["schema_version"] == "caplab.spectrum/1"


def test_an_unfinished_run_has_no_spectrum_report(tmp_path: Path) -> None:
    from harness.report.load import ReportError

    write_run(tmp_path)
    (tmp_path / "results.json").write_text('{"status": "interrupted"}', encoding="utf-8")
    with pytest.raises(ReportError, match="did not finish"):
        build_spectrum_report(tmp_path)


def test_every_level_has_promises() -> None:
    assert set(PROMISES) == set(LEVELS)
    assert PROMISES["eventual"] == frozenset()
    assert PROMISES["session"] == {"read_my_writes", "monotonic_reads", "monotonic_writes"}


@pytest.mark.parametrize("nodes", [3, 4, 5, 7])
def test_the_timeline_fits_any_size(nodes: int) -> None:
    *skews, part, heal = timeline(nodes, 20.0)
    assert part.groups is not None
    majority, minority = part.groups
    assert len(majority) > len(minority) >= 1 and f"n{nodes}" in minority
    assert [(f.action, f.target, f.skew_ms) for f in skews] == [
        ("clock-skew", n, -2000) for n in minority
    ]
    assert (part.at, heal.at) == (6.0, 15.0)


def test_the_default_scenario_and_its_overrides() -> None:
    sc = spectrum_scenario(DEFAULT_SCENARIO, nodes=None, duration=None, short=False, seed=None)
    assert sc.read_levels == tuple(LEVELS) and sc.own_keys and sc.roam > 0
    assert sc.store == "both" and sc.nodes == 5
    short = spectrum_scenario(DEFAULT_SCENARIO, nodes=None, duration=None, short=True, seed=3)
    assert (short.nodes, short.duration, short.seed) == (3, 14.0, 3)
    assert [f.action for f in short.faults] == ["clock-skew", "partition", "heal"]
    assert short.description == "7 read levels; n3: clocks 2 s behind, cut off 4.2-10.5 s."
    with pytest.raises(SpectrumUsageError, match="--nodes"):
        spectrum_scenario(DEFAULT_SCENARIO, nodes=2, duration=None, short=False, seed=None)


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_caplab_spectrum_short(tmp_path: Path) -> None:
    """The short form on real clusters: every promise a store makes holds, the refused
    levels are refused, the minority's STRONG reads are refused, and the weakest levels
    show stale reads (the workload reveals what they permit)."""
    out = tmp_path / "spectrum"
    proc = subprocess.run(
        [sys.executable, "-m", "caplab.cli", "spectrum", "--short", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=220,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / SUMMARY_NAME).read_text(encoding="utf-8"))
    assert doc["valid"] is True
    matrix = doc["matrix"]
    for store, cells in matrix.items():
        for level, cell in cells.items():
            if cell["offered"]:
                assert cell["promise_kept"], (store, level, cell["anomalies"])
    assert not matrix["gossip"]["strong"]["offered"]
    assert not matrix["gossip"]["consistent_prefix"]["offered"]
    strong = matrix["raft"]["strong"]["availability_during_partition"]["minority"]
    assert sum(a["ok"] for a in strong.values()) == 0 < sum(a["total"] for a in strong.values())
    eventual = matrix["raft"]["eventual"]["anomalies"]["linearizable"]["count"]
    assert eventual > 0, "no stale EVENTUAL read on raft's minority: the workload is too gentle"
    assert "Every promise kept" in proc.stdout
    assert (out / HTML_NAME).exists()
