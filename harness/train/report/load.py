"""Layer 1 of the train report: a ``caplab train`` run folder read into dataclasses.

Theory of operation
-------------------
The orchestrator writes ``run.json`` (schema ``caplab.train/1``: status, config, the list of
experiments in order) and one folder per experiment with ``experiment.json``, one
``worker<i>.jsonl`` per worker (one line per completed step, in order) and, for ASP, a
``divergence.jsonl`` sampled by the orchestrator. This module only reads: it checks the
schema, turns every line into a :class:`StepRecord` / :class:`DivergenceSample` and skips
what it cannot parse (a run killed mid-write leaves a truncated last line). An experiment
named in ``run.json`` whose ``experiment.json`` is missing is left out. Nothing is computed
here (see :mod:`.figures`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.report.load import ReportError, read_json

SCHEMA_VERSION = "caplab.train/1"
RUN_FILE = "run.json"
EXPERIMENT_FILE = "experiment.json"
DIVERGENCE_FILE = "divergence.jsonl"


@dataclass(frozen=True, kw_only=True)
class StepRecord:
    """One completed step of one worker (times in seconds since the experiment's t0)."""

    step: int
    t: float
    started: float
    compute_ms: float
    wait_ms: float
    staleness: int | None = None
    age_ms: float | None = None
    stale_at_read: int | None = None  # of those, acknowledged before its read began
    lead: int | None = None
    digest: str | None = None
    loss: float | None = None
    acc: float | None = None


@dataclass(frozen=True, kw_only=True)
class DivergenceSample:
    t: float
    distance: float | None  # None: fewer than two nodes answered
    nodes: tuple[str, ...]
    answered: int


@dataclass(frozen=True, kw_only=True)
class Straggler:
    worker: int
    factor: float


@dataclass(frozen=True, kw_only=True)
class Partition:
    start_s: float
    end_s: float
    minority_nodes: tuple[str, ...] = ()
    minority_workers: tuple[int, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Experiment:
    name: str
    mode: str  # bsp | asp | ssp
    store: str  # raft | gossip
    condition: str  # clean | straggler | partition
    workers: int
    nodes: int
    worker_nodes: dict[int, str]
    staleness_bound: int | None
    backups: int
    straggler: Straggler | None
    partition: Partition | None
    duration_s: float
    status: str
    error: str | None
    steps: dict[int, tuple[StepRecord, ...]]  # worker -> its records, in order
    divergence: tuple[DivergenceSample, ...]


@dataclass(frozen=True, kw_only=True)
class TrainRun:
    out: Path
    status: str  # complete | interrupted | failed
    config: dict[str, Any]
    experiments: tuple[Experiment, ...]  # in run.json's order
    t0_unix_ns: int | None


def _num(x: object) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def _int(x: object) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of ``path``, one a line; unreadable lines (and files) are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            yield obj


def step_record(d: Mapping[str, Any]) -> StepRecord | None:
    """One line of ``worker<i>.jsonl``; None without a step number and times."""
    step, t, started = _int(d.get("step")), _num(d.get("t")), _num(d.get("started"))
    if step is None or t is None or started is None:
        return None
    digest = d.get("digest")
    return StepRecord(
        step=step,
        t=t,
        started=started,
        compute_ms=_num(d.get("compute_ms")) or 0.0,
        wait_ms=_num(d.get("wait_ms")) or 0.0,
        staleness=_int(d.get("staleness")),
        age_ms=_num(d.get("age_ms")),
        stale_at_read=_int(d.get("stale_at_read")),
        lead=_int(d.get("lead")),
        digest=digest if isinstance(digest, str) else None,
        loss=_num(d.get("loss")),
        acc=_num(d.get("acc")),
    )


def divergence_sample(d: Mapping[str, Any]) -> DivergenceSample | None:
    t = _num(d.get("t"))
    if t is None:
        return None
    nodes = d.get("nodes")
    return DivergenceSample(
        t=t,
        distance=_num(d.get("distance")),
        nodes=tuple(str(n) for n in nodes) if isinstance(nodes, list) else (),
        answered=_int(d.get("answered")) or 0,
    )


def _straggler(d: object) -> Straggler | None:
    if not isinstance(d, dict) or _int(d.get("worker")) is None:
        return None
    return Straggler(worker=int(d["worker"]), factor=_num(d.get("factor")) or 1.0)


def _partition(d: object) -> Partition | None:
    if not isinstance(d, dict):
        return None
    start, end = _num(d.get("start_s")), _num(d.get("end_s"))
    if start is None or end is None:
        return None
    return Partition(
        start_s=start,
        end_s=end,
        minority_nodes=tuple(str(n) for n in d.get("minority_nodes") or ()),
        minority_workers=tuple(int(w) for w in d.get("minority_workers") or ()),
    )


def load_experiment(folder: Path) -> Experiment | None:
    """One experiment's folder; None when ``experiment.json`` is missing or unreadable."""
    meta = read_json(folder / EXPERIMENT_FILE)
    if meta is None:
        return None
    workers = _int(meta.get("workers")) or 0
    steps: dict[int, tuple[StepRecord, ...]] = {}
    for i in range(workers):
        recs = (step_record(d) for d in _jsonl(folder / f"worker{i}.jsonl"))
        steps[i] = tuple(r for r in recs if r is not None)
    samples = (divergence_sample(d) for d in _jsonl(folder / DIVERGENCE_FILE))
    raw_nodes = meta.get("worker_nodes")
    worker_nodes = (
        {int(k): str(v) for k, v in raw_nodes.items()} if isinstance(raw_nodes, dict) else {}
    )
    error = meta.get("error")
    return Experiment(
        name=str(meta.get("name") or folder.name),
        mode=str(meta.get("mode") or ""),
        store=str(meta.get("store") or ""),
        condition=str(meta.get("condition") or ""),
        workers=workers,
        nodes=_int(meta.get("nodes")) or 0,
        worker_nodes=worker_nodes,
        staleness_bound=_int(meta.get("staleness_bound")),
        backups=_int(meta.get("backups")) or 0,
        straggler=_straggler(meta.get("straggler")),
        partition=_partition(meta.get("partition")),
        duration_s=_num(meta.get("duration_s")) or 0.0,
        status=str(meta.get("status") or "failed"),
        error=None if error is None else str(error),
        steps=steps,
        divergence=tuple(s for s in samples if s is not None),
    )


def is_train_run(out: Path | str) -> bool:
    """``out`` holds a ``run.json`` of a ``caplab train`` run."""
    run = read_json(Path(out) / RUN_FILE)
    return run is not None and run.get("schema_version") == SCHEMA_VERSION


def load_train_run(out: Path | str) -> TrainRun:
    """Read the run folder ``out``; :class:`ReportError` when it is not a train run."""
    out = Path(out)
    run = read_json(out / RUN_FILE)
    if run is None:
        raise ReportError(f"{out}: not a train run (no readable {RUN_FILE})")
    if run.get("schema_version") != SCHEMA_VERSION:
        raise ReportError(
            f"{out}: not a train run ({RUN_FILE} schema_version "
            f"{run.get('schema_version')!r}, expected {SCHEMA_VERSION!r})"
        )
    names = run.get("experiments")
    experiments = []
    for name in names if isinstance(names, list) else []:
        exp = load_experiment(out / str(name))
        if exp is not None:
            experiments.append(exp)
    config = run.get("config")
    return TrainRun(
        out=out,
        status=str(run.get("status") or "interrupted"),
        config=dict(config) if isinstance(config, dict) else {},
        experiments=tuple(experiments),
        t0_unix_ns=_int(run.get("t0_unix_ns")),
    )
