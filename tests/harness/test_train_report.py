"""The ``caplab train`` report from hand-made run folders: every figure known in advance
(binary-exact times, so they compare with ``==``), the verdict sentences, the files written,
violations listed first, and a run that did not finish refused. No cluster runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from harness.report.load import ReportError
from harness.train.report import HTML_NAME, SUMMARY_NAME, build_train_report
from harness.train.report.figures import (
    Stall,
    compute_figures,
    digest_check,
    divergence_figures,
    longest_gap,
    nearest_rank,
    steps_per_s,
    time_to_target,
)
from harness.train.report.load import DivergenceSample, StepRecord, load_train_run

PARTITION = {"start_s": 3.0, "end_s": 8.0, "minority_nodes": ["n3"], "minority_workers": [2]}
STRAGGLER = {"worker": 2, "factor": 3.0}
CONFIG: dict[str, Any] = {
    "workers": 3,
    "nodes": 3,
    "seed": 1,
    "lr": 0.5,
    "batch": 32,
    "step_ms": 20,
    "duration_s": 12.0,
    "target_accuracy": 0.9,
    "staleness": 3,
    "backups": 0,
    "straggler": STRAGGLER,
    "partition": {"start_s": 3.0, "end_s": 8.0},
}

Rec = dict[str, Any]


def rec(step: int, started: float, t: float, **kw: Any) -> Rec:
    return {
        "step": step,
        "t": t,
        "started": started,
        "compute_ms": 20.0,
        "wait_ms": kw.pop("wait_ms", 0.0),
        "staleness": None,
        "age_ms": None,
        "lead": None,
        "digest": None,
        "loss": None,
        "acc": None,
        **kw,
    }


def write_experiment(
    out: Path,
    name: str,
    workers: list[list[Rec]],
    *,
    staleness_bound: int | None = None,
    straggler: dict[str, Any] | None = None,
    partition: dict[str, Any] | None = None,
    divergence: list[dict[str, Any]] | None = None,
    truncated: bool = False,
) -> None:
    mode, condition = name.split("-")
    folder = out / name
    folder.mkdir(parents=True)
    meta = {
        "name": name,
        "mode": mode,
        "store": "gossip" if mode == "asp" else "raft",
        "condition": condition,
        "workers": len(workers),
        "nodes": 3,
        "worker_nodes": {str(i): f"n{i + 1}" for i in range(len(workers))},
        "staleness_bound": staleness_bound,
        "backups": 0,
        "straggler": straggler,
        "partition": partition,
        "duration_s": 12.0,
        "status": "complete",
        "error": None,
    }
    (folder / "experiment.json").write_text(json.dumps(meta))
    for i, recs in enumerate(workers):
        text = "".join(json.dumps(r) + "\n" for r in recs)
        if truncated and i == 0:
            text += '{"step": 99, "t": 5'  # a run killed mid-write
        (folder / f"worker{i}.jsonl").write_text(text)
    if divergence is not None:
        (folder / "divergence.jsonl").write_text("".join(json.dumps(d) + "\n" for d in divergence))


def write_run(out: Path, names: list[str], status: str = "complete") -> None:
    out.mkdir(parents=True, exist_ok=True)
    run = {
        "schema_version": "caplab.train/1",
        "status": status,
        "config": CONFIG,
        "experiments": names,
        "t0_unix_ns": 123,
    }
    (out / "run.json").write_text(json.dumps(run))


# -- the experiments ----------------------------------------------------------------------
def bsp_clean(out: Path) -> None:
    """Three workers, five 0.5 s steps each (wait 100 ms each: a fifth); worker 1 reaches
    0.92 at step 4 (2.0 s), worker 0 0.95 at step 5."""
    accs = {0: {2: 0.5, 5: 0.95}, 1: {4: 0.92, 5: 0.93}, 2: {5: 0.85}}
    workers = [
        [
            rec(
                k,
                0.5 * (k - 1),
                0.5 * k,
                wait_ms=100.0,
                digest=f"d{k}",
                acc=accs[w].get(k),
                loss=None if k not in accs[w] else 1.0 - accs[w][k],
            )
            for k in range(1, 6)
        ]
        for w in range(3)
    ]
    write_experiment(out, "bsp-clean", workers)


def bsp_straggler(out: Path) -> None:
    """Everyone at the straggler's pace: 1 step/s each."""
    workers = [[rec(k, k - 1.0, float(k), digest=f"s{k}") for k in range(1, 6)] for _ in range(3)]
    write_experiment(out, "bsp-straggler", workers, straggler=STRAGGLER)


def bsp_partition(out: Path) -> None:
    """Steps at 0.5 ... 3.0 s, nothing until 8.5 s, then 9.0, 9.5, 10.0."""
    times = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 8.5, 9.0, 9.5, 10.0]
    workers = [
        [rec(k, t - 0.5, t, digest=f"p{k}") for k, t in enumerate(times, 1)] for _ in range(3)
    ]
    write_experiment(out, "bsp-partition", workers, partition=PARTITION)


def asp_clean(out: Path) -> None:
    """Four 0.25 s steps per worker, staleness 0, 1, 2, 3 (age 10 ms per update); workers 0
    and 1 reach 0.9 at step 4 (1.0 s): the median worker's time to the target."""
    workers = [
        [
            rec(
                k,
                0.25 * (k - 1),
                0.25 * k,
                staleness=k - 1,
                age_ms=10.0 * (k - 1),
                acc=(0.9 if w in (0, 1) else 0.8) if k == 4 else None,
            )
            for k in range(1, 5)
        ]
        for w in range(3)
    ]
    write_experiment(out, "asp-clean", workers)


def asp_straggler(out: Path) -> None:
    """Workers 0 and 1: five steps in 1 s; the straggler two steps in 2 s, 6 and 8 stale."""
    fast = [rec(k, 0.2 * (k - 1), 0.2 * k, staleness=1, age_ms=5.0) for k in range(1, 6)]
    slow = [
        rec(1, 0.0, 1.0, staleness=6, age_ms=50.0),
        rec(2, 1.0, 2.0, staleness=8, age_ms=70.0),
    ]
    write_experiment(out, "asp-straggler", [fast, fast, slow], straggler=STRAGGLER)


def asp_partition(out: Path) -> None:
    """Every worker steps every 0.5 s from 0.5 to 10.0 s; the sides drift to 2.0 and are
    back within 1.5x the pre-partition median (0.5) one second after the heal."""
    times = [0.5 * i for i in range(1, 21)]
    workers = [
        [rec(k, t - 0.5, t, staleness=2, age_ms=20.0) for k, t in enumerate(times, 1)]
        for _ in range(3)
    ]
    nodes = ["n1", "n2", "n3"]
    samples = [
        (0.5, 9.0),  # outside the 2 s before the partition: not in the median
        (1.0, 0.5),
        (1.5, 0.5),
        (2.0, 0.75),
        (2.5, 0.25),
        (4.0, 1.5),
        (5.0, None),
        (6.0, 2.0),
        (8.0, 1.75),
        (8.5, 1.0),
        (9.0, 0.75),
        (9.5, 0.5),
    ]
    div = [
        {"t": t, "distance": d, "nodes": nodes, "answered": 3 if d is not None else 1}
        for t, d in samples
    ]
    write_experiment(out, "asp-partition", workers, partition=PARTITION, divergence=div)


def ssp_clean(out: Path, *, lead_top: int = 3, truncated: bool = False) -> None:
    """Like asp-clean, staleness 2 everywhere, leads 0..3; workers 0 and 1 reach 0.9 at
    step 2."""
    workers = [
        [
            rec(
                k,
                0.25 * (k - 1),
                0.25 * k,
                staleness=2,
                age_ms=20.0,
                lead=min(k - 1, lead_top) if k < 4 else lead_top,
                acc=0.9 if (w in (0, 1) and k == 2) else None,
            )
            for k in range(1, 5)
        ]
        for w in range(3)
    ]
    write_experiment(out, "ssp-clean", workers, staleness_bound=3, truncated=truncated)


ALL = ["bsp-clean", "bsp-straggler", "bsp-partition", "asp-clean", "asp-straggler"]
ALL += ["asp-partition", "ssp-clean"]  # no ssp-straggler, no ssp-partition: skipped


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    write_run(out, [*ALL, "ssp-partition"])  # named, but its folder is missing: skipped
    bsp_clean(out)
    bsp_straggler(out)
    bsp_partition(out)
    asp_clean(out)
    asp_straggler(out)
    asp_partition(out)
    ssp_clean(out, truncated=True)
    return out


# -- pure functions -----------------------------------------------------------------------
def test_nearest_rank_and_steps_per_s() -> None:
    assert nearest_rank(list(range(1, 101)), 0.99) == 99
    assert nearest_rank([5.0], 0.99) == 5.0
    assert nearest_rank([3, 1, 2], 0.5) == 2
    one = [StepRecord(step=1, t=1.0, started=0.0, compute_ms=1.0, wait_ms=0.0)]
    assert steps_per_s(one) == 0.0
    two = [*one, StepRecord(step=2, t=4.0, started=1.0, compute_ms=1.0, wait_ms=0.0)]
    assert steps_per_s(two) == 0.5


def test_longest_gap() -> None:
    assert longest_gap([1.0, 2.0, 6.0, 7.5], 2.0, 8.0) == Stall(length_s=4.0, from_s=2.0, to_s=6.0)
    assert longest_gap([], 3.0, 5.0) == Stall(length_s=2.0, from_s=3.0, to_s=5.0)


def test_time_to_target_and_digests() -> None:
    def r(step: int, t: float, **kw: Any) -> StepRecord:
        return StepRecord(step=step, t=t, started=t - 0.5, compute_ms=1.0, wait_ms=0.0, **kw)

    steps = {
        0: [r(1, 1.0, acc=0.5, digest="a"), r(2, 2.0, acc=0.95, digest="b")],
        1: [r(1, 1.1, digest="a"), r(2, 1.9, acc=0.91, digest="x"), r(3, 3.0, digest="c")],
    }
    assert time_to_target(steps, 0.9) == (1.9, 2)
    assert time_to_target(steps, 0.99) is None
    d = digest_check(steps)
    assert (d.checked, d.disagreeing) == (2, (2,))


def test_divergence_figures_never_merged() -> None:
    s = [
        DivergenceSample(t=t, distance=d, nodes=(), answered=2)
        for t, d in [(2.0, 1.0), (4.0, 3.0), (9.0, 2.0)]
    ]
    assert divergence_figures(s, 3.0, 8.0) == (3.0, 1.0, None)
    assert divergence_figures(s[1:], 3.0, 8.0) == (3.0, None, None)


# -- the whole run ----------------------------------------------------------------------
def test_figures(run_dir: Path) -> None:
    f = compute_figures(load_train_run(run_dir))
    assert list(f.experiments) == ALL
    bc = f.experiments["bsp-clean"]
    assert [w.steps for w in bc.workers] == [5, 5, 5]
    assert [w.steps_per_s for w in bc.workers] == [2.0, 2.0, 2.0]
    assert bc.total_steps_per_s == 6.0
    assert (bc.time_to_target_s, bc.steps_to_target) == (2.0, 4)
    assert bc.final_acc_w0 == 0.95
    assert bc.final_loss_w0 == pytest.approx(0.05)
    assert bc.final_acc_mean == pytest.approx((0.95 + 0.93 + 0.85) / 3)
    assert [(p.t, p.step, p.acc) for p in bc.workers[0].curve] == [(1.0, 2, 0.5), (2.5, 5, 0.95)]
    assert bc.wait_share == pytest.approx(0.2)
    assert bc.digests is not None and (bc.digests.checked, bc.digests.disagreeing) == (5, ())
    assert bc.staleness is None and bc.lead is None and bc.partition is None

    ac = f.experiments["asp-clean"]
    assert ac.total_steps_per_s == 12.0
    assert (ac.time_to_target_s, ac.steps_to_target) == (1.0, 4)
    assert ac.staleness is not None and ac.age_ms is not None
    assert (ac.staleness.median, ac.staleness.p99, ac.staleness.max) == (1.5, 3.0, 3.0)
    assert ac.staleness.histogram == {0: 3, 1: 3, 2: 3, 3: 3}
    assert (ac.age_ms.median, ac.age_ms.p99) == (15.0, 30.0)
    assert ac.wait_share == 0.0 and ac.digests is None

    bs = f.experiments["bsp-straggler"]
    assert bs.straggler is not None
    assert (bs.straggler.steps_per_s, bs.straggler.others_median_steps_per_s) == (1.0, 1.0)
    assert f.straggler_effect["bsp"].slowdown == 2.0
    ast = f.experiments["asp-straggler"]
    assert [w.steps_per_s for w in ast.workers] == [5.0, 5.0, 1.0]
    assert ast.straggler is not None and ast.straggler.staleness_median == 7.0
    assert ast.straggler.others_median_steps_per_s == 5.0
    assert f.straggler_effect["asp"].slowdown == 12.0 / 11.0
    assert f.straggler_effect["ssp"].slowdown is None  # no ssp-straggler run

    bp = f.experiments["bsp-partition"].partition
    assert bp is not None
    assert bp.stall == Stall(length_s=5.5, from_s=3.0, to_s=8.5)
    assert bp.resumed_after_heal_s == 0.5
    assert (bp.majority_steps, bp.minority_steps) == (2, 1)
    assert bp.divergence_max is None and bp.merged_after_s is None

    ap = f.experiments["asp-partition"].partition
    assert ap is not None
    assert ap.stall.length_s == 0.5
    assert (ap.majority_steps, ap.minority_steps) == (20, 10)
    assert (ap.divergence_max, ap.divergence_before, ap.merged_after_s) == (2.0, 0.5, 1.0)

    sc = f.experiments["ssp-clean"]
    assert [w.steps for w in sc.workers] == [4, 4, 4]  # the truncated line is skipped
    assert sc.lead is not None and (sc.lead.max_lead, sc.lead.bound, sc.lead.ok) == (3, 3, True)
    assert (sc.time_to_target_s, sc.steps_to_target) == (0.5, 2)


def test_verdict_and_files(run_dir: Path) -> None:
    rep = build_train_report(run_dir)
    v = rep.verdict
    assert v.ok and v.violations == []
    assert v.headline == (
        "SSP reached 90% held-out accuracy first (0.5 s); BSP kept every worker identical "
        "and SSP stayed within s=3."
    )
    assert v.lines == [
        "BSP reached 90% held-out accuracy in 2.0 s (4 steps); ASP in 1.0 s (4 steps) with "
        "median staleness 1.5 updates (p99 3, 15 ms old); SSP (s=3) in 0.5 s (2 steps) with "
        "median staleness 2 updates (p99 2, 20 ms old).",
        "With a 3x straggler (worker 2), BSP slowed the other workers by 2.0x (every step "
        "waits for it); ASP's other workers kept their pace (1.2x; 5.0 steps/s each, the "
        "straggler 1.0), the straggler's gradients 7 updates stale (median).",
        "Under the partition (3.0-8.0 s), BSP stopped for 5.5 s (no step completed) and "
        "resumed 0.5 s after the heal; ASP kept training on both sides (majority 20 steps, "
        "minority 10), the sides drifted to distance 2 and merged 1.0 s after the heal.",
        "BSP parameters were identical on every worker after every step (20 steps checked).",
        "No SSP worker started a step more than 3 steps ahead of the slowest (bound s=3).",
    ]
    names = {p.name for p in run_dir.iterdir()}
    assert {SUMMARY_NAME, HTML_NAME, "accuracy.png", "throughput.png"} <= names
    assert {"staleness.png", "partition.png"} <= names
    assert not [n for n in names if "tmp" in n]
    for p in rep.plot_paths.values():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(rep.summary_path.read_text())
    assert doc["schema_version"] == "caplab.train.summary/1"
    assert doc["config"] == CONFIG
    assert set(doc["plots"]) == {"accuracy", "throughput", "staleness", "partition"}
    assert doc["verdict"]["lines"] == v.lines
    e = doc["experiments"]["asp-partition"]
    assert e["partition"]["merged_after_s"] == 1.0
    assert doc["experiments"]["asp-clean"]["staleness"]["histogram"] == {
        "0": 3,
        "1": 3,
        "2": 3,
        "3": 3,
    }
    page = rep.html_path.read_text()
    assert page.count("data:image/png;base64,") == 4
    assert page.index(v.headline) < page.index("<h2>Experiments</h2>")
    assert "VIOLATION" not in page


def test_violations_first(tmp_path: Path) -> None:
    out = tmp_path / "run"
    write_run(out, ["bsp-clean", "ssp-clean"])
    bsp_clean(out)
    ssp_clean(out, lead_top=5)
    w1 = (out / "bsp-clean" / "worker1.jsonl").read_text().replace('"d3"', '"zz"')
    (out / "bsp-clean" / "worker1.jsonl").write_text(w1)
    rep = build_train_report(out)
    v = rep.verdict
    assert not v.ok
    assert v.violations == [
        "VIOLATION: bsp-clean: BSP workers held different parameters after 1 step (step 3) "
        "of 5 checked.",
        "VIOLATION: ssp-clean: an SSP worker ran 5 steps ahead of the slowest, beyond the "
        "bound s=3.",
    ]
    assert v.headline == "VIOLATION: 2 broken promises (bsp-clean, ssp-clean)"
    assert v.text.splitlines()[:3] == [v.headline, *v.violations]
    assert not any(x.startswith(("BSP parameters", "SSP workers")) for x in v.lines)
    page = rep.html_path.read_text()
    assert page.index("VIOLATION: bsp-clean") < page.index("BSP reached")
    assert 'class="verdict violation"' in page
    assert {p.name for p in rep.plot_paths.values()} == {
        "accuracy.png",
        "throughput.png",
        "staleness.png",
    }


@pytest.mark.parametrize("status", ["interrupted", "failed"])
def test_unfinished_run_refused(tmp_path: Path, status: str) -> None:
    out = tmp_path / "run"
    write_run(out, ["bsp-clean"], status=status)
    bsp_clean(out)
    with pytest.raises(ReportError, match="did not finish"):
        build_train_report(out)
    assert not (out / HTML_NAME).exists() and not (out / SUMMARY_NAME).exists()


def test_not_a_train_run(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="not a train run"):
        build_train_report(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"schema_version": "caplab.other/1"}))
    with pytest.raises(ReportError, match="not a train run"):
        build_train_report(tmp_path)


def test_a_tie_to_the_target_names_every_mode_in_it(run_dir: Path) -> None:
    import dataclasses

    from harness.train.report.verdict import verdict

    f = compute_figures(load_train_run(run_dir))
    ssp = f.experiments["ssp-clean"]
    asp = dataclasses.replace(
        f.experiments["asp-clean"], time_to_target_s=(ssp.time_to_target_s or 0) + 0.01
    )
    tied = dataclasses.replace(f, experiments={**f.experiments, "asp-clean": asp})
    assert verdict(tied).headline.startswith(
        "ASP and SSP reached 90% held-out accuracy first (0.5 s)"
    )
    assert verdict(f).headline.startswith("SSP reached 90% held-out accuracy first (0.5 s)")
