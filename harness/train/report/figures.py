"""Layer 2 of the train report: every number, computed from what :mod:`.load` read.

Theory of operation
-------------------
Each function here is small and pure (records in, numbers out), so the tests can feed it
hand-made records. Per experiment (times in seconds since its t0):

* **pace**: steps completed per worker; steps/s = steps / (``t`` of the last step -
  ``started`` of the first), 0 with fewer than two steps; the total is the sum over workers;
* **accuracy**: each worker's last record carrying ``acc`` gives its final held-out
  accuracy and loss (mean over workers and worker 0's); time to target = the earliest ``t``
  of any record with ``acc >= target_accuracy`` (and that record's step);
* **staleness** (ASP/SSP): median, p99 (nearest rank) and max of ``staleness`` and of
  ``age_ms`` over every record carrying them, and the staleness histogram;
* **BSP digests**: for every step number reached by two or more workers, their parameter
  digests must all be equal (steps checked, steps where they differ);
* **SSP lead**: the largest ``lead`` seen, and whether it stayed within the bound;
* **straggler**: its steps/s against the median of the others' (and its own staleness);
  per mode, slowdown = clean total steps/s / straggler total steps/s;
* **partition**: the stall, i.e. the longest interval within ``[start_s, end_s + 2]`` in
  which no worker completed a step; how soon after the heal a step completed; the steps
  completed in ``[start_s, end_s)`` by majority vs minority workers; for ASP, the largest
  divergence during the window, the median in the 2 s before it, and how long after the heal
  the distance first fell to at most 1.5x that median;
* **wait share**: total ``wait_ms`` / total step time (``t - started``) over all records.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from harness.train.report.load import (
    DivergenceSample,
    Experiment,
    Partition,
    StepRecord,
    TrainRun,
)

MODES = ("bsp", "asp", "ssp")
CONDITIONS = ("clean", "straggler", "partition")
STALL_AFTER_HEAL_S = 2.0  # the stall is looked for until this long after the heal
BEFORE_PARTITION_S = 2.0  # the pre-partition divergence is the median over this window
MERGE_FACTOR = 1.5  # "merged": distance back to at most this times the pre-partition median
MERGE_FLOOR = 0.1  # ... or to a tenth of the largest distance, whichever is larger
AFTER_HEAL_PEAK_S = 1.0  # the largest distance is looked for until this long after the heal
DEFAULT_TARGET = 0.9


@dataclass(frozen=True, kw_only=True)
class CurvePoint:
    t: float
    step: int
    acc: float
    loss: float | None


@dataclass(frozen=True, kw_only=True)
class Dist:
    """Median, p99 (nearest rank) and max of some values; ``histogram``: value -> count."""

    n: int
    median: float
    p99: float
    max: float
    histogram: dict[int, int]


@dataclass(frozen=True, kw_only=True)
class WorkerFigures:
    worker: int
    node: str | None
    steps: int
    steps_per_s: float
    final_acc: float | None
    final_loss: float | None
    curve: tuple[CurvePoint, ...]


@dataclass(frozen=True, kw_only=True)
class DigestCheck:
    checked: int  # step numbers reached by two or more workers
    disagreeing: tuple[int, ...]  # steps where their digests differ (must be empty)


@dataclass(frozen=True, kw_only=True)
class LeadCheck:
    max_lead: int | None  # None: no record carried a lead
    bound: int | None
    ok: bool  # max_lead <= bound (True when either is unknown)


@dataclass(frozen=True, kw_only=True)
class StragglerFigures:
    worker: int
    factor: float
    steps_per_s: float
    others_median_steps_per_s: float | None
    staleness_median: float | None  # of the straggler's own records (ASP/SSP)


@dataclass(frozen=True, kw_only=True)
class Stall:
    length_s: float
    from_s: float
    to_s: float


@dataclass(frozen=True, kw_only=True)
class PartitionFigures:
    start_s: float
    end_s: float
    minority_workers: tuple[int, ...]
    stall: Stall
    resumed_after_heal_s: float | None  # first step completed at or after end_s, minus end_s
    majority_steps: int  # steps completed in [start_s, end_s) by majority workers
    minority_steps: int
    divergence_max: float | None  # ASP: the largest distance in [start_s, end_s]
    divergence_before: float | None  # median distance in [start_s - 2, start_s)
    merged_after_s: float | None  # from end_s to distance <= 1.5 x divergence_before
    progress: dict[int, tuple[tuple[float, int], ...]]  # worker -> (t, step) of every step
    divergence: tuple[tuple[float, float], ...]  # (t, distance) of every answered sample


@dataclass(frozen=True, kw_only=True)
class ExperimentFigures:
    name: str
    mode: str
    store: str
    condition: str
    status: str
    error: str | None
    duration_s: float
    staleness_bound: int | None
    workers: tuple[WorkerFigures, ...]
    total_steps: int
    total_steps_per_s: float
    final_acc_mean: float | None
    final_loss_mean: float | None
    final_acc_w0: float | None
    final_loss_w0: float | None
    target: float
    time_to_target_s: float | None
    steps_to_target: int | None
    staleness: Dist | None
    age_ms: Dist | None
    # updates acknowledged before a read began that it did not return: 0 for linearizable
    # reads (SSP over raft), what had not reached the node for eventual ones (ASP, gossip)
    read_missed: Dist | None = None
    digests: DigestCheck | None  # bsp only
    lead: LeadCheck | None  # ssp only
    straggler: StragglerFigures | None
    partition: PartitionFigures | None
    wait_share: float | None


@dataclass(frozen=True, kw_only=True)
class StragglerEffect:
    mode: str
    clean_steps_per_s: float | None
    straggler_steps_per_s: float | None
    slowdown: float | None  # clean / straggler; None when either is missing or zero
    # The workers other than the straggler (median steps/s of one worker): what the
    # straggler cost them, which the total hides (it includes the straggler's own steps).
    others_clean_steps_per_s: float | None = None
    others_straggler_steps_per_s: float | None = None
    others_slowdown: float | None = None
    straggler_own_steps_per_s: float | None = None


@dataclass(frozen=True, kw_only=True)
class TrainFigures:
    config: dict[str, Any]
    target: float
    experiments: dict[str, ExperimentFigures]  # in the run's order
    straggler_effect: dict[str, StragglerEffect]  # mode -> effect (modes with either run)

    def get(self, mode: str, condition: str) -> ExperimentFigures | None:
        for e in self.experiments.values():
            if e.mode == mode and e.condition == condition:
                return e
        return None


# -- small pure functions ---------------------------------------------------------------
def nearest_rank(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile by nearest rank (``q = 0.99``: the p99) of non-empty ``values``."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def dist(values: Iterable[float]) -> Dist | None:
    """Median, p99, max and histogram (of the values rounded to integers); None if empty."""
    vals = list(values)
    if not vals:
        return None
    return Dist(
        n=len(vals),
        median=float(statistics.median(vals)),
        p99=float(nearest_rank(vals, 0.99)),
        max=float(max(vals)),
        histogram=dict(sorted(Counter(round(v) for v in vals).items())),
    )


def steps_per_s(records: Sequence[StepRecord]) -> float:
    """Steps / (``t`` of the last step - ``started`` of the first); 0 with fewer than two."""
    if len(records) < 2:
        return 0.0
    span = records[-1].t - records[0].started
    return len(records) / span if span > 0 else 0.0


def final_metrics(records: Sequence[StepRecord]) -> tuple[float | None, float | None]:
    """(accuracy, loss) of the last record carrying an accuracy."""
    for r in reversed(records):
        if r.acc is not None:
            return r.acc, r.loss
    return None, None


def curve(records: Sequence[StepRecord]) -> tuple[CurvePoint, ...]:
    return tuple(
        CurvePoint(t=r.t, step=r.step, acc=r.acc, loss=r.loss) for r in records if r.acc is not None
    )


def time_to_target(
    steps: Mapping[int, Sequence[StepRecord]], target: float
) -> tuple[float, int] | None:
    """When the workers reached ``target``: each worker's first record with
    ``acc >= target``, and of those the median one (by time) over the workers that
    reached it, if at least half did; None otherwise. (The first hit of any worker would
    favour modes with more, noisier curves.)"""
    firsts = []
    for recs in steps.values():
        hit = next(((r.t, r.step) for r in recs if (r.acc or 0.0) >= target), None)
        if hit is not None:
            firsts.append(hit)
    if not firsts or 2 * len(firsts) < len(steps):
        return None
    firsts.sort()
    return firsts[(len(firsts) - 1) // 2]


def digest_check(steps: Mapping[int, Sequence[StepRecord]]) -> DigestCheck:
    """Every step number reached (with a digest) by two or more workers: are they equal?"""
    by_step: dict[int, list[str]] = {}
    for recs in steps.values():
        for r in recs:
            if r.digest is not None:
                by_step.setdefault(r.step, []).append(r.digest)
    shared = {s: d for s, d in by_step.items() if len(d) >= 2}
    bad = tuple(sorted(s for s, d in shared.items() if len(set(d)) > 1))
    return DigestCheck(checked=len(shared), disagreeing=bad)


def lead_check(steps: Mapping[int, Sequence[StepRecord]], bound: int | None) -> LeadCheck:
    leads = [r.lead for recs in steps.values() for r in recs if r.lead is not None]
    top = max(leads) if leads else None
    return LeadCheck(max_lead=top, bound=bound, ok=top is None or bound is None or top <= bound)


def longest_gap(times: Iterable[float], lo: float, hi: float) -> Stall:
    """The longest interval within ``[lo, hi]`` containing no time of ``times``."""
    inside = sorted(t for t in times if lo < t < hi)
    edges = [lo, *inside, hi]
    best = Stall(length_s=0.0, from_s=lo, to_s=lo)
    for a, b in itertools.pairwise(edges):
        if b - a > best.length_s:
            best = Stall(length_s=b - a, from_s=a, to_s=b)
    return best


def wait_share(records: Iterable[StepRecord]) -> float | None:
    """Total ``wait_ms`` / total step time (``t - started``); None without step time."""
    recs = list(records)
    total_ms = sum((r.t - r.started) * 1000.0 for r in recs)
    return sum(r.wait_ms for r in recs) / total_ms if total_ms > 0 else None


def divergence_figures(
    samples: Sequence[DivergenceSample], start_s: float, end_s: float
) -> tuple[float | None, float | None, float | None]:
    """(largest distance in [start, end], median in the 2 s before start, seconds from end
    until the distance first fell to <= 1.5 x that median)."""
    # the largest distance: during the cut and just after the heal (a node that merged
    # one side's updates before the other's is briefly furthest from the rest)
    during = [
        s.distance
        for s in samples
        if start_s <= s.t <= end_s + AFTER_HEAL_PEAK_S and s.distance is not None
    ]
    # before: only once training runs (before t0 every node holds the zero vector)
    before = [
        s.distance
        for s in samples
        if max(0.0, start_s - BEFORE_PARTITION_S) <= s.t < start_s and s.distance is not None
    ]
    top = max(during) if during else None
    pre = float(statistics.median(before)) if before else None
    merged = None
    if pre is not None and top is not None:
        # back to the distance gossip keeps while writes flow (with a floor: a baseline
        # near 0 would call no realistic state "merged")
        limit = max(MERGE_FACTOR * pre, MERGE_FLOOR * top)
        for s in sorted(samples, key=lambda s: s.t):
            if s.t >= end_s and s.distance is not None and s.distance <= limit:
                merged = s.t - end_s
                break
    return top, pre, merged


def partition_figures(exp: Experiment, part: Partition) -> PartitionFigures:
    times = [r.t for recs in exp.steps.values() for r in recs]
    last = max(times, default=part.end_s)  # (the quiet after the last step is no stall)
    stall = longest_gap(times, part.start_s, min(part.end_s + STALL_AFTER_HEAL_S, last))
    after = [t for t in times if t >= part.end_s]
    minority = set(part.minority_workers)
    maj = mino = 0
    for w, recs in exp.steps.items():
        n = sum(1 for r in recs if part.start_s <= r.t < part.end_s)
        if w in minority:
            mino += n
        else:
            maj += n
    top = pre = merged = None
    if exp.divergence:
        top, pre, merged = divergence_figures(exp.divergence, part.start_s, part.end_s)
    return PartitionFigures(
        start_s=part.start_s,
        end_s=part.end_s,
        minority_workers=part.minority_workers,
        stall=stall,
        resumed_after_heal_s=min(after) - part.end_s if after else None,
        majority_steps=maj,
        minority_steps=mino,
        divergence_max=top,
        divergence_before=pre,
        merged_after_s=merged,
        progress={w: tuple((r.t, r.step) for r in recs) for w, recs in exp.steps.items()},
        divergence=tuple((s.t, s.distance) for s in exp.divergence if s.distance is not None),
    )


def straggler_figures(exp: Experiment, workers: Sequence[WorkerFigures]) -> StragglerFigures:
    assert exp.straggler is not None
    w = exp.straggler.worker
    own = [wf.steps_per_s for wf in workers if wf.worker == w]
    others = [wf.steps_per_s for wf in workers if wf.worker != w]
    stal = [r.staleness for r in exp.steps.get(w, ()) if r.staleness is not None]
    return StragglerFigures(
        worker=w,
        factor=exp.straggler.factor,
        steps_per_s=own[0] if own else 0.0,
        others_median_steps_per_s=float(statistics.median(others)) if others else None,
        staleness_median=float(statistics.median(stal)) if stal else None,
    )


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


# -- per experiment and per run -----------------------------------------------------------
def experiment_figures(exp: Experiment, target: float) -> ExperimentFigures:
    workers = []
    for w in sorted(exp.steps):
        recs = exp.steps[w]
        acc, loss = final_metrics(recs)
        workers.append(
            WorkerFigures(
                worker=w,
                node=exp.worker_nodes.get(w),
                steps=len(recs),
                steps_per_s=steps_per_s(recs),
                final_acc=acc,
                final_loss=loss,
                curve=curve(recs),
            )
        )
    w0 = next((wf for wf in workers if wf.worker == 0), None)
    all_recs = [r for recs in exp.steps.values() for r in recs]
    hit = time_to_target(exp.steps, target)
    accs = [wf.final_acc for wf in workers if wf.final_acc is not None]
    losses = [wf.final_loss for wf in workers if wf.final_loss is not None]
    return ExperimentFigures(
        name=exp.name,
        mode=exp.mode,
        store=exp.store,
        condition=exp.condition,
        status=exp.status,
        error=exp.error,
        duration_s=exp.duration_s,
        staleness_bound=exp.staleness_bound,
        workers=tuple(workers),
        total_steps=len(all_recs),
        total_steps_per_s=sum(wf.steps_per_s for wf in workers),
        final_acc_mean=_mean(accs),
        final_loss_mean=_mean(losses),
        final_acc_w0=None if w0 is None else w0.final_acc,
        final_loss_w0=None if w0 is None else w0.final_loss,
        target=target,
        time_to_target_s=None if hit is None else hit[0],
        steps_to_target=None if hit is None else hit[1],
        staleness=dist(r.staleness for r in all_recs if r.staleness is not None),
        age_ms=dist(r.age_ms for r in all_recs if r.age_ms is not None),
        read_missed=dist(r.stale_at_read for r in all_recs if r.stale_at_read is not None),
        digests=digest_check(exp.steps) if exp.mode == "bsp" else None,
        lead=lead_check(exp.steps, exp.staleness_bound) if exp.mode == "ssp" else None,
        straggler=straggler_figures(exp, workers) if exp.straggler is not None else None,
        partition=None if exp.partition is None else partition_figures(exp, exp.partition),
        wait_share=wait_share(all_recs),
    )


def straggler_effect(mode: str, experiments: Iterable[ExperimentFigures]) -> StragglerEffect:
    by_cond = {e.condition: e for e in experiments if e.mode == mode}
    clean, slow = by_cond.get("clean"), by_cond.get("straggler")
    c = None if clean is None else clean.total_steps_per_s
    s = None if slow is None else slow.total_steps_per_s
    oc = os_ = own = None
    if clean is not None and clean.workers:
        oc = statistics.median(w.steps_per_s for w in clean.workers)
    if slow is not None and slow.straggler is not None:
        k = slow.straggler.worker
        others = [w.steps_per_s for w in slow.workers if w.worker != k]
        os_ = statistics.median(others) if others else None
        own = slow.straggler.steps_per_s
    return StragglerEffect(
        mode=mode,
        clean_steps_per_s=c,
        straggler_steps_per_s=s,
        slowdown=c / s if c is not None and s else None,
        others_clean_steps_per_s=oc,
        others_straggler_steps_per_s=os_,
        others_slowdown=oc / os_ if oc is not None and os_ else None,
        straggler_own_steps_per_s=own,
    )


def compute_figures(run: TrainRun) -> TrainFigures:
    target = run.config.get("target_accuracy")
    tgt = float(target) if isinstance(target, int | float) else DEFAULT_TARGET
    exps = {e.name: experiment_figures(e, tgt) for e in run.experiments}
    modes = [m for m in MODES if any(e.mode == m for e in exps.values())]
    return TrainFigures(
        config=dict(run.config),
        target=tgt,
        experiments=exps,
        straggler_effect={m: straggler_effect(m, exps.values()) for m in modes},
    )
