"""The side-by-side report of a run folder: ``summary.json``, plots and ``report.html``.

Theory of operation
-------------------
A run folder is what :mod:`harness.runner` writes: ``<out>/results.json`` and, per store,
``<out>/<store>/history.jsonl``, ``digests.jsonl``, ``logs/*.log`` and ``results.json``.
:func:`build_report` reads it back and never needs the processes: everything is computed
from those files, so ``caplab report RUN_DIR`` rebuilds the same report later.

Per store it computes, on the run's single time axis (seconds since the common ``t0``):

* *fault episodes* from the nemesis actions (results.json ``timings.faults``, or the
  ``process: "nemesis"`` events of the history): start, end (heal/restart/resume), sides;
* *phases* ``before`` / ``during`` / ``after`` split at the fault window (first fault to
  last recovery, as the runner defines it) and *sides* ``majority`` / ``minority``. An
  operation's side is the tag the workload recorded (only while a partition is in force);
  outside the partition it is the side its node was on during the (first) partition, so
  "minority, after" means "clients of the nodes that had been cut off, after the heal";
* per phase x side: availability ``ok / (ok + fail + info)`` (a failed compare counts as an
  answer, a FAILED_PRECONDITION "not supported" is left out, as the runner does), how
  refusals came (median time-to-fail of ``fail`` ops vs ``info`` ops), throughput and the
  latency percentiles of ``ok`` ops (HdrHistogram);
* CP figures: per episode, the *majority unavailability window* (fault start until the
  first acknowledged mutation invoked on the majority side after it completed) and how long
  the minority side stayed refused; the linearizability verdict (results.json, or
  :func:`harness.runner.run_checkers` when the runner did not get that far);
* AP figures: divergence over time (distinct replica digests per ~100 ms sample), per
  episode the divergence interval (first disagreeing sample at or after the fault start to
  the first sample after the heal where every node reports one digest) and the time from the
  heal to one digest; stale reads (:func:`harness.checker.staleness.stale_reads`), LWW
  losers and counter exactness (from the runner's checkers); whether every register ended
  as its last acknowledged write said (no acknowledged delete undone) and how many
  tombstones the nodes held and collected (Status counters);
* both: how many deletes were acknowledged.

:func:`build_summary` returns the JSON document (validated against
``harness/summary_schema.json`` by :func:`validate_summary`); :func:`verdict` turns it into
one paragraph of plain words, always computed, violations first; :func:`build_report`
writes everything into the run folder and returns a :class:`Report`.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import html
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

from harness.history import NEMESIS, Event, Operation, pair_operations, read_history

SUMMARY_SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("summary_schema.json")
STORES = ("raft", "gossip")
PHASES = ("before", "during", "after")
SIDES = ("majority", "minority")
MUTATIONS = frozenset({"write", "cas", "delete", "incr"})
FAULT_ACTIONS = frozenset({"partition", "kill", "pause"})
RECOVERY_ACTIONS = frozenset({"heal", "restart", "resume"})
FINAL_READ_PROCESS = 1_000_000  # = harness.runner.FINAL_READ_PROCESS (post-run reads)
BIN_S = 0.5  # width of the time bins of the throughput and latency series
PLOTS = ("timeline", "latency", "throughput", "divergence", "availability")


class ReportError(Exception):
    """The folder is not a run folder (no history of any store); the message says why."""


# -- reading a run folder -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Episode:
    """One fault period: a fault action until the recovery that undoes it."""

    action: str  # partition | kill | pause | clock-skew
    start_s: float
    end_s: float | None  # None: never recovered within the history
    label: str  # e.g. "partition majority-minority"
    sides: Mapping[str, str]  # node -> majority/minority (partitions only)


@dataclass(slots=True)
class StoreData:
    """Everything read from ``<out>/<store>/`` (ops are client operations only)."""

    store: str
    dir: Path
    events: list[Event]
    ops: list[Operation]  # client ops of the workload (no nemesis, no final reads)
    all_ops: list[Operation]
    complete_s: dict[int, float]  # invoke index -> completion time (s), info ones included
    samples: list[dict[str, Any]]
    results: dict[str, Any] | None
    faults: list[dict[str, Any]]
    episodes: list[Episode]
    window: tuple[float, float] | None
    end_s: float  # end of the workload
    nodes: list[str]
    node_side: dict[str, str]  # node -> side during the (first) partition


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def read_digests(path: Path) -> list[dict[str, Any]]:
    """The digest samples of ``digests.jsonl`` (a torn last line is ignored)."""
    out: list[dict[str, Any]] = []
    if not path.exists():
        return out
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and "time_ns" in obj and "digests" in obj:
                out.append(obj)
    return out


def faults_from_history(ops: Sequence[Operation]) -> list[dict[str, Any]]:
    """The runner's ``timings.faults`` entries rebuilt from the nemesis operations."""
    out: list[dict[str, Any]] = []
    for op in ops:
        if op.process != NEMESIS:
            continue
        entry: dict[str, Any] = {"t_s": op.invoke_time / 1e9, "action": op.f}
        if op.type == "ok":
            entry["done_s"] = float(op.complete_time) / 1e9
            entry["description"] = op.result if isinstance(op.result, dict) else {}
        else:
            entry["error"] = op.error or "no completion"
        out.append(entry)
    return out


def fault_window(faults: Sequence[Mapping[str, Any]]) -> tuple[float, float] | None:
    """(start, end) s: the first fault action to the last recovery (as the runner does)."""
    from harness.runner import fault_window as runner_window

    return runner_window(faults)


def episodes_of(faults: Sequence[Mapping[str, Any]], end_s: float) -> list[Episode]:
    """Fault periods in time order (a new partition replaces the one in force)."""
    out: list[Episode] = []
    open_: list[tuple[str, float, str, dict[str, str]]] = []
    for f in faults:
        if "error" in f:
            continue
        action = f["action"]
        desc = f.get("description") or {}
        t = float(f["t_s"])
        skew_on = action == "clock-skew" and bool(desc.get("skew_ms"))
        if action in FAULT_ACTIONS or skew_on:
            if action == "partition":
                for o in [o for o in open_ if o[0] == "partition"]:
                    out.append(Episode(o[0], o[1], t, o[2], o[3]))
                    open_.remove(o)
            label = action
            if action == "partition":
                label = f"partition {desc.get('shape', '')}".strip()
            elif desc.get("nodes"):
                label = f"{action} {','.join(map(str, desc['nodes']))}"
            sides = desc.get("sides") if isinstance(desc.get("sides"), dict) else {}
            open_.append((action, t, label, dict(sides or {})))
            continue
        undo = {"heal": "partition", "restart": "kill", "resume": "pause"}.get(action)
        if action == "clock-skew":
            undo = "clock-skew"
        if undo is None:
            continue
        done = float(f.get("done_s", t))
        for o in [o for o in open_ if o[0] == undo]:
            out.append(Episode(o[0], o[1], done, o[2], o[3]))
            open_.remove(o)
    for o in open_:
        out.append(Episode(o[0], o[1], None, o[2], o[3]))
    out.sort(key=lambda e: e.start_s)
    return out


def load_store(out_dir: Path, store: str) -> StoreData | None:
    """Read one store's files; None when the store has no history in ``out_dir``."""
    d = out_dir / store
    hist = d / "history.jsonl"
    if not hist.exists():
        return None
    events = read_history(hist)
    all_ops = pair_operations(events)
    by_index = {e.index: e for e in events}
    complete_s: dict[int, float] = {}
    for op in all_ops:
        if op.complete_index is not None:
            complete_s[op.index] = by_index[op.complete_index].time / 1e9
    ops = [op for op in all_ops if isinstance(op.process, int) and op.process < FINAL_READ_PROCESS]
    results = _read_json(d / "results.json")
    timings = (results or {}).get("timings") or {}
    faults = list(timings.get("faults") or faults_from_history(all_ops))
    last_s = max((e.time for e in events), default=0) / 1e9
    scenario = (results or {}).get("scenario") or {}
    end_s = float(timings.get("workload_end_s") or scenario.get("duration_s") or last_s or BIN_S)
    fw = timings.get("fault_window_s") if results else None
    window = (float(fw[0]), float(fw[1])) if fw else (fault_window(faults) if faults else None)
    episodes = episodes_of(faults, end_s)
    samples = read_digests(d / "digests.jsonl")
    nodes = sorted(
        {op.node for op in all_ops if op.node is not None}
        | {n for s in samples for n in s["digests"]},
        key=_node_key,
    )
    node_side: dict[str, str] = {}
    for ep in episodes:
        if ep.sides:
            node_side = dict(ep.sides)
            break
    return StoreData(
        store=store,
        dir=d,
        events=events,
        ops=ops,
        all_ops=all_ops,
        complete_s=complete_s,
        samples=samples,
        results=results,
        faults=faults,
        episodes=episodes,
        window=window,
        end_s=end_s,
        nodes=nodes,
        node_side=node_side,
    )


def _node_key(n: str) -> tuple[int, str]:
    digits = "".join(c for c in n if c.isdigit())
    return (int(digits) if digits else 0, n)


# -- figures -----------------------------------------------------------------------------
def classify(op: Operation) -> str:
    """``ok`` | ``fail`` | ``info`` | ``unsupported`` for availability (runner's rules): a
    failed compare is an answer (ok); FAILED_PRECONDITION (e.g. CAS on the AP store) is not
    offered by the store and is left out."""
    err = op.error or ""
    if op.type == "ok" or (op.type == "fail" and err.startswith("compare")):
        return "ok"
    if op.type == "fail" and err.startswith("FAILED_PRECONDITION"):
        return "unsupported"
    return "fail" if op.type == "fail" else "info"


def side_of(op: Operation, node_side: Mapping[str, str]) -> str | None:
    """The op's recorded side, else its node's side during the (first) partition."""
    if op.side is not None:
        return op.side
    return node_side.get(op.node) if op.node is not None else None


def phase_of(t_s: float, window: tuple[float, float] | None) -> str:
    if window is None or t_s < window[0]:
        return "before"
    return "during" if t_s < window[1] else "after"


def _percentiles(values_us: Iterable[int]) -> dict[str, Any] | None:
    h = HdrHistogram(1, 600_000_000, 3)  # microseconds, 1 us .. 10 min
    n = 0
    for v in values_us:
        h.record_value(max(1, min(int(v), 600_000_000)))
        n += 1
    if not n:
        return None
    return {
        "count": n,
        "p50_ms": round(h.get_value_at_percentile(50) / 1000, 3),
        "p95_ms": round(h.get_value_at_percentile(95) / 1000, 3),
        "p99_ms": round(h.get_value_at_percentile(99) / 1000, 3),
        "max_ms": round(h.get_max_value() / 1000, 3),
    }


def _median_ms(values_s: Sequence[float]) -> float | None:
    return round(statistics.median(values_s) * 1000, 3) if values_s else None


def cell(
    ops: Sequence[Operation], complete_s: Mapping[int, float], span_s: float | None
) -> dict[str, Any]:
    """Counts, availability, refusal timing, throughput and latency of ``ops``."""
    counts = {"ok": 0, "fail": 0, "info": 0, "unsupported": 0}
    fail_s: list[float] = []
    info_s: list[float] = []
    hung = 0
    ok_local = 0  # LOCAL reads answered: available even without a quorum (possibly stale)
    ok_us: list[int] = []
    for op in ops:
        c = classify(op)
        counts[c] += 1
        ok_local += c == "ok" and op.f == "read-local"
        if c == "ok" and not math.isinf(op.complete_time):
            ok_us.append(int((op.complete_time - op.invoke_time) / 1000))
        elif c == "fail":
            fail_s.append((op.complete_time - op.invoke_time) / 1e9)
        elif c == "info":
            if op.index in complete_s:
                info_s.append(complete_s[op.index] - op.invoke_time / 1e9)
            else:
                hung += 1
    total = counts["ok"] + counts["fail"] + counts["info"]
    return {
        **counts,
        "ok_local_reads": ok_local,
        "total": total,
        "availability": round(counts["ok"] / total, 4) if total else None,
        "throughput_ok_per_s": round(counts["ok"] / span_s, 2) if span_s else None,
        "latency": _percentiles(ok_us),
        "refusals": {
            "fail_median_ms": _median_ms(fail_s),
            "info_median_ms": _median_ms(info_s),
            "info_without_answer": hung,
        },
    }


def phase_spans(window: tuple[float, float] | None, end_s: float) -> dict[str, tuple[float, float]]:
    if window is None:
        return {"before": (0.0, end_s), "during": (0.0, 0.0), "after": (end_s, end_s)}
    a, b = window
    return {"before": (0.0, a), "during": (a, b), "after": (b, max(b, end_s))}


def phase_table(sd: StoreData) -> dict[str, Any]:
    """phase -> {start_s, end_s, all, majority, minority} cells."""
    spans = phase_spans(sd.window, sd.end_s)
    out: dict[str, Any] = {}
    for phase in PHASES:
        a, b = spans[phase]
        in_phase = [op for op in sd.ops if phase_of(op.invoke_time / 1e9, sd.window) == phase]
        span = b - a if b > a else None
        entry: dict[str, Any] = {
            "start_s": round(a, 3),
            "end_s": round(b, 3),
            "all": cell(in_phase, sd.complete_s, span),
        }
        for side in SIDES:
            sel = [op for op in in_phase if side_of(op, sd.node_side) == side]
            entry[side] = cell(sel, sd.complete_s, span) if sel else None
        out[phase] = entry
    return out


def episode_figures(sd: StoreData) -> list[dict[str, Any]]:
    """Per fault episode: majority unavailability window, minority refusal, divergence."""
    out: list[dict[str, Any]] = []
    for ep in sd.episodes:
        end = ep.end_s if ep.end_s is not None else sd.end_s
        entry: dict[str, Any] = {
            "action": ep.action,
            "label": ep.label,
            "start_s": round(ep.start_s, 3),
            "end_s": None if ep.end_s is None else round(ep.end_s, 3),
            "duration_s": round(end - ep.start_s, 3),
            "sides": dict(ep.sides),
        }
        for side in SIDES:
            entry[f"{side}_write_after_s"] = _first_write_after(sd, ep.start_s, end, side)
        entry["divergence"] = divergence_interval(sd.samples, ep.start_s, ep.end_s)
        out.append(entry)
    return out


def _first_write_after(sd: StoreData, start: float, end: float, side: str) -> float | None:
    """Seconds from ``start`` until the first acknowledged mutation invoked on ``side`` in
    [start, end) completed; None when none did."""
    best: float | None = None
    for op in sd.ops:
        t = op.invoke_time / 1e9
        if (
            op.type == "ok"
            and op.f in MUTATIONS
            and start <= t < end
            and side_of(op, sd.node_side) == side
        ):
            done = float(op.complete_time) / 1e9 - start
            best = done if best is None else min(best, done)
    return None if best is None else round(best, 3)


def distinct(sample: Mapping[str, Any]) -> int:
    """Distinct known digests in one sample."""
    return len({d for d in sample["digests"].values() if d is not None})


def agree(sample: Mapping[str, Any]) -> bool:
    """Every node answered, all with the same digest."""
    values = list(sample["digests"].values())
    return bool(values) and None not in values and len(set(values)) == 1


def divergence_interval(
    samples: Sequence[Mapping[str, Any]], start_s: float, heal_s: float | None
) -> dict[str, Any]:
    """From the first sample at or after ``start_s`` with 2+ digests to the first sample at
    or after ``heal_s`` where all nodes agree. Also the most digests seen in between and the
    time from the heal to one digest."""
    first: float | None = None
    max_d = 0
    converged_at: float | None = None
    for s in samples:
        t = s["time_ns"] / 1e9
        if t < start_s:
            continue
        if heal_s is None or t < heal_s:
            max_d = max(max_d, distinct(s))
        if first is None and distinct(s) >= 2 and (heal_s is None or t < heal_s):
            first = t
        if heal_s is not None and t >= heal_s and agree(s):
            converged_at = t
            break
    diverged = first is not None
    return {
        "diverged": diverged,
        "max_distinct_digests": max_d,
        "diverged_from_s": None if first is None else round(first, 3),
        "converged_at_s": None if converged_at is None else round(converged_at, 3),
        "diverged_for_s": (
            round(converged_at - first, 3)
            if first is not None and converged_at is not None
            else None
        ),
        "one_digest_after_heal_s": (
            round(converged_at - heal_s, 3)
            if converged_at is not None and heal_s is not None
            else None
        ),
    }


def divergence_series(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """(time, distinct digests, nodes not answering) per sample, and simple statistics."""
    t = [round(s["time_ns"] / 1e9, 3) for s in samples]
    d = [distinct(s) for s in samples]
    missing = [sum(1 for v in s["digests"].values() if v is None) for s in samples]
    return {
        "samples": len(samples),
        "t_s": t,
        "distinct": d,
        "unanswered": missing,
        "max_distinct": max(d, default=0),
    }


def digest_phases(sd: StoreData) -> dict[str, Any]:
    """Per phase: samples, share of samples where every replica agreed, mean distinct
    states. (While clients write, replicas of a busy store rarely hold the very same state
    at one instant, so the share before the fault is the baseline to compare with.)"""
    out: dict[str, Any] = {}
    for phase in PHASES:
        sel = [
            s
            for s in sd.samples
            if phase_of(s["time_ns"] / 1e9, sd.window) == phase and s["time_ns"] / 1e9 <= sd.end_s
        ]
        n = len(sel)
        out[phase] = {
            "samples": n,
            "agree_share": round(sum(1 for s in sel if agree(s)) / n, 4) if n else None,
            "mean_distinct": round(sum(distinct(s) for s in sel) / n, 3) if n else None,
        }
    return out


def quiet_convergence(sd: StoreData) -> float | None:
    """Seconds from the end of the workload (clients stopped, faults undone) to the first
    sample where every replica reports the same state; None if that never happened."""
    for s in sd.samples:
        t = float(s["time_ns"]) / 1e9
        if t >= sd.end_s and agree(s):
            return round(t - sd.end_s, 3)
    return None


def _quantile_ms(sorted_us: Sequence[int], q: float) -> float:
    i = min(len(sorted_us) - 1, max(0, math.ceil(q * len(sorted_us)) - 1))
    return round(sorted_us[i] / 1000, 3)


def time_series(sd: StoreData, bin_s: float = BIN_S) -> dict[str, Any]:
    """Completions per second by outcome and ok-latency percentiles, per ``bin_s`` bin (by
    invoke time)."""
    n = max(1, math.ceil(sd.end_s / bin_s))
    counts = {k: [0] * n for k in ("ok", "fail", "info", "unsupported")}
    lat: list[list[int]] = [[] for _ in range(n)]
    for op in sd.ops:
        i = min(n - 1, max(0, int(op.invoke_time / 1e9 / bin_s)))
        c = classify(op)
        counts[c][i] += 1
        if c == "ok" and not math.isinf(op.complete_time):
            lat[i].append(int((op.complete_time - op.invoke_time) / 1000))
    p50: list[float | None] = []
    p99: list[float | None] = []
    for vals in lat:  # exact per-bin quantiles (cheap; HdrHistogram for the phase figures)
        vals.sort()
        p50.append(_quantile_ms(vals, 0.50) if vals else None)
        p99.append(_quantile_ms(vals, 0.99) if vals else None)
    return {
        "bin_s": bin_s,
        "t_s": [round(i * bin_s, 3) for i in range(n)],
        **{f"{k}_per_s": [round(v / bin_s, 2) for v in vals] for k, vals in counts.items()},
        "p50_ms": p50,
        "p99_ms": p99,
    }


def checkers_of(sd: StoreData) -> dict[str, Any]:
    """The runner's checker results, or the same checkers run here when results.json is
    missing (e.g. an interrupted run)."""
    if sd.results is not None and isinstance(sd.results.get("checkers"), dict):
        return dict(sd.results["checkers"])
    from harness.runner import (
        FINAL_REGISTER_READ_PROCESS,
        final_reads_from_history,
        run_checkers,
    )

    finals = final_reads_from_history(sd.all_ops)
    by_node: dict[str, dict[str, int | None]] = {}
    for key, per_node in finals.items():
        for node, v in per_node.items():
            by_node.setdefault(node, {})[key] = v
    registers: dict[str, dict[str, str | None]] = {}
    for op in sd.all_ops:
        if (
            op.f == "read"
            and op.type == "ok"
            and isinstance(op.process, int)
            and op.process >= FINAL_REGISTER_READ_PROCESS
            and op.node is not None
            and op.key is not None
            and (op.result is None or isinstance(op.result, str))
        ):
            registers.setdefault(op.node, {})[op.key] = op.result
    ops = [op for op in sd.all_ops if op.process != NEMESIS]
    return run_checkers(sd.store, ops, sd.samples, sd.window, by_node, registers, end_s=sd.end_s)


def _stale(sd: StoreData, checkers: Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(checkers.get("stale_reads"), dict):
        c = checkers["stale_reads"]
        return {
            "reads_checked": c.get("reads_checked", 0),
            "stale": c.get("stale", 0),
            "max_lag_ms": c.get("max_lag_ms", 0.0),
        }
    from harness.checker.staleness import stale_reads

    r = stale_reads(sd.ops)
    return {
        "reads_checked": r.reads_checked,
        "stale": r.stale_count,
        "max_lag_ms": round(r.max_lag_ns / 1e6, 3),
    }


def _counter(checkers: Mapping[str, Any]) -> dict[str, Any] | None:
    c = checkers.get("counter")
    if not isinstance(c, dict):
        return None
    keys: dict[str, Any] = {}
    lost = 0
    exact = True
    for key, k in sorted((c.get("keys") or {}).items()):
        finals = [int(v) for v in (k.get("final_reads") or {}).values()]
        k_lost = max((k["lower"] - v for v in finals), default=0)
        lost += max(0, k_lost)
        k_exact = bool(finals) and all(v == k["acknowledged"] for v in finals)
        exact = exact and k_exact
        keys[key] = {
            "valid": k.get("valid"),
            "acknowledged": k["acknowledged"],
            "lower": k["lower"],
            "upper": k["upper"],
            "final_reads": k.get("final_reads") or {},
            "lost_increments": max(0, k_lost),
            "exact": k_exact,
        }
    return {"valid": c.get("valid"), "exact": exact and bool(keys), "lost": lost, "keys": keys}


def _deletes(sd: StoreData) -> dict[str, int]:
    ops = [op for op in sd.ops if op.f == "delete"]
    return {
        "invoked": len(ops),
        "acknowledged": sum(1 for op in ops if op.type == "ok"),
        "indeterminate": sum(1 for op in ops if op.type == "info"),
        "refused": sum(1 for op in ops if op.type == "fail"),
    }


def _final_state(checkers: Mapping[str, Any]) -> dict[str, Any] | None:
    c = checkers.get("final_state")
    if not isinstance(c, dict):
        return None
    return {
        "valid": c.get("valid"),
        "keys": int(c.get("keys", 0)),
        "deleted_keys": len(c.get("deleted_keys") or []),
        "violations": [str(v) for v in c.get("violations") or []],
    }


def _tombstones(checkers: Mapping[str, Any]) -> dict[str, Any] | None:
    c = checkers.get("tombstones")
    if not isinstance(c, dict):
        return None
    held = c.get("held_at_end") or {}
    return {
        "valid": c.get("valid"),
        "max_held": int(c.get("max_held", 0)),
        "held_at_end": sum(v for v in held.values() if isinstance(v, int)),
        "collected": int(c.get("collected_total", 0)),
        "all_collected_after_stop_s": c.get("all_collected_after_stop_s"),
        "waited_s": float(c.get("waited_s", 0.0)),
    }


def store_summary(sd: StoreData) -> dict[str, Any]:
    """Every figure of one store (see the module docstring)."""
    checkers = checkers_of(sd)
    verdicts = [c.get("valid") for c in checkers.values() if isinstance(c, dict)]
    valid: bool | str = True
    if any(v is False for v in verdicts):
        valid = False
    elif any(v == "unknown" for v in verdicts):
        valid = "unknown"
    lin = checkers.get("linearizable")
    lww = checkers.get("lww_losers")
    conv = checkers.get("convergence")
    overall_span = sd.end_s if sd.end_s > 0 else None
    return {
        "store": sd.store,
        "valid": valid,
        "operations": len(sd.ops),
        "nodes": sd.nodes,
        "node_sides": dict(sd.node_side),
        "end_s": round(sd.end_s, 3),
        "fault_window_s": None if sd.window is None else [round(x, 3) for x in sd.window],
        "overall": cell(sd.ops, sd.complete_s, overall_span),
        "phases": phase_table(sd),
        "episodes": episode_figures(sd),
        "linearizable": None
        if not isinstance(lin, dict)
        else {
            "valid": lin.get("valid"),
            "summary": lin.get("summary", ""),
            "counterexample": lin.get("counterexample"),
        },
        "stale_reads": _stale(sd, checkers),
        "lww": None
        if not isinstance(lww, dict)
        else {
            "acknowledged_writes": lww.get("acknowledged_writes", 0),
            "losers": lww.get("losers", 0),
            "lost": lww.get("lost", 0),
            "overwritten": int(lww.get("losers", 0)) + int(lww.get("lost", 0)),
            "examples": list(lww.get("examples") or []),
        },
        "counter": _counter(checkers),
        "convergence": None
        if not isinstance(conv, dict)
        else {
            "valid": conv.get("valid"),
            "converged_for_good_after_heal_s": conv.get("time_to_converge_s"),
            "max_divergence": conv.get("max_divergence"),
        },
        "divergence": divergence_series(sd.samples),
        "digest_phases": digest_phases(sd),
        "quiet_convergence_s": quiet_convergence(sd),
        "deletes": _deletes(sd),
        "final_state": _final_state(checkers),
        "tombstones": _tombstones(checkers),
        "security": (sd.results or {}).get("security"),
        "series": time_series(sd),
        "checkers": checkers,
        "files": {
            "history": f"{sd.store}/history.jsonl",
            "digests": f"{sd.store}/digests.jsonl",
            "results": f"{sd.store}/results.json" if sd.results is not None else None,
            "logs": sorted(f"{sd.store}/logs/{p.name}" for p in (sd.dir / "logs").glob("*.log")),
        },
    }


# -- environment ---------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count() or 0,
    }


def commit_info(repo: Path | None = None) -> dict[str, Any] | None:
    """``git rev-parse HEAD`` and whether the tree is dirty; None without git or a repo."""
    cwd = repo or Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return {"sha": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


# -- summary and verdict ---------------------------------------------------------------------
def load_run(out_dir: Path | str) -> dict[str, StoreData]:
    """Every store found in the run folder, by name."""
    out = Path(out_dir)
    return {s: sd for s in STORES if (sd := load_store(out, s)) is not None}


def build_summary(
    out_dir: Path | str, data: Mapping[str, StoreData] | None = None
) -> dict[str, Any]:
    """Read a run folder (or use ``data`` read from it) and compute the summary document
    (not written)."""
    out = Path(out_dir)
    data = load_run(out) if data is None else data
    if not data:
        raise ReportError(f"{out}: no run here (expected raft/history.jsonl or gossip/...)")
    combined = _read_json(out / "results.json") or {}
    scenario = combined.get("scenario")
    if not isinstance(scenario, dict):
        first = next((sd.results for sd in data.values() if sd.results), None) or {}
        scenario = first.get("scenario") if isinstance(first.get("scenario"), dict) else {}
    stores = {s: store_summary(sd) for s, sd in data.items()}
    summary: dict[str, Any] = {
        "schema_version": SUMMARY_SCHEMA_VERSION,
        "generated_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "run_dir": str(out.resolve()),
        "t0_unix_ns": combined.get("t0_unix_ns"),
        "machine": machine_info(),
        "commit": commit_info(),
        "scenario": scenario or {},
        "stores": stores,
    }
    summary["violations"] = violations(summary)
    summary["valid"] = not summary["violations"]
    summary["verdict"] = verdict(summary)
    return summary


def violations(summary: Mapping[str, Any]) -> list[str]:
    """One line per checker that found a real violation (empty: none)."""
    out: list[str] = []
    for store, s in summary["stores"].items():
        for name, c in sorted(s["checkers"].items()):
            if isinstance(c, dict) and c.get("valid") is False:
                text = str(c.get("summary") or "").strip().splitlines()
                detail = text[-1] if text else ""
                if name == "convergence":
                    detail = "replicas did not reach one digest after the heal"
                out.append(f"{store}: {name} violated" + (f" ({detail})" if detail else ""))
    return out


def pct(x: float | None) -> str:
    """A fraction as a percentage; "100%" and "0%" only when exact."""
    if x is None:
        return "n/a"
    if x >= 1.0:
        return "100%"
    if x <= 0.0:
        return "0%"
    v = x * 100
    text = f"{v:.0f}%"
    if text in ("100%", "0%"):
        text = f"{v:.1f}%"
        if text in ("100.0%", "0.0%"):
            text = f"{v:.2f}%"
    return text


def plural(n: int, word: str) -> str:
    """``1 key``, ``2 keys``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def secs(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.1f} s" if abs(x) >= 0.95 else f"{x:.2f} s"


def _avail(s: Mapping[str, Any], phase: str, side: str) -> float | None:
    c = s["phases"][phase].get(side)
    return None if c is None else c.get("availability")


def _refusal_style(c: Mapping[str, Any] | None) -> str:
    if c is None or (c["fail"] + c["info"]) == 0:
        return ""
    r = c["refusals"]
    if c["fail"] >= c["info"] and r["fail_median_ms"] is not None:
        return f"failing fast (median {r['fail_median_ms']:.0f} ms per refusal)"
    if r["info_median_ms"] is not None:
        return f"mostly by hanging until the deadline (median {r['info_median_ms'] / 1000:.1f} s)"
    return "mostly without any answer"


def _raft_sentence(s: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    lin = s.get("linearizable") or {}
    lin_valid = lin.get("valid")
    if lin_valid is False:
        cex = lin.get("counterexample") or {}
        why = cex.get("reason") or str(lin.get("summary", "")).strip().splitlines()[-1:]
        out.append(f"Raft was NOT linearizable: {why if isinstance(why, str) else ''}".strip())
    counter = s.get("counter")
    if counter and counter.get("valid") is False:
        out.append(
            f"Raft's counters broke their bounds ({counter['lost']} acknowledged increments lost)"
        )
    eps = s["episodes"]
    part = [e for e in eps if e["action"] == "partition"]
    lin_words = {
        True: "stayed linearizable",
        False: "was not linearizable",
        "unknown": "the linearizability check ran out of time (unknown)",
        None: "had no register operations to check",
    }.get(lin_valid, "had no linearizability verdict")
    if not eps:
        avail = s["overall"]["availability"]
        out.append(f"Raft answered {pct(avail)} of requests with no fault and {lin_words}")
        return out
    minority = s["phases"]["during"].get("minority")
    majority = s["phases"]["during"].get("majority")
    if part and minority is not None:
        refused = None if minority["availability"] is None else 1 - minority["availability"]
        dur = sum(e["duration_s"] for e in part)
        style = _refusal_style(minority)
        text = f"Raft refused {pct(refused)} of requests on the minority side for {secs(dur)}"
        if minority["ok"] and minority["ok"] == minority.get("ok_local_reads"):
            text += " (all but its LOCAL reads, answered from possibly stale state)"
        if style:
            text += f", {style}"
        if majority is not None:
            text += f"; its majority side answered {pct(majority['availability'])}"
            waits = [e["majority_write_after_s"] for e in part]
            if any(w is None for w in waits):
                text += " but acknowledged no write during the fault"
            elif max(waits) >= 0.25:
                text += f" and took {secs(max(waits))} to accept writes again after the cut"
            else:
                text += " and kept accepting writes"
        out.append(text + f"; it {lin_words}")
    else:
        during = s["phases"]["during"]["all"]
        out.append(
            f"During the faults ({', '.join(e['label'] for e in eps)}) raft answered "
            f"{pct(during['availability'])} of requests and {lin_words}"
        )
    return out


def _gossip_sentence(s: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    counter = s.get("counter")
    conv = s.get("convergence") or {}
    eps = s["episodes"]
    heal_eps = [e for e in eps if e["end_s"] is not None]
    final = s.get("final_state")
    tombs = s.get("tombstones")
    if counter and counter.get("valid") is False:
        out.append(f"Gossip LOST acknowledged increments ({counter['lost']} lost on the counters)")
    if final and final.get("valid") is False:
        out.append(
            f"Gossip's replicas did NOT end with the last acknowledged write of "
            f"{plural(len(final['violations']), 'key')} (an acknowledged delete undone, or an "
            "older write winning)"
        )
    if tombs and tombs.get("valid") is False:
        out.append(
            f"Gossip did NOT collect its tombstones within {secs(tombs['waited_s'])} after the run"
        )
    if conv.get("valid") is False:
        out.append("Gossip's replicas did NOT converge to one state after the heal")
    if not eps:
        out.append(f"Gossip answered {pct(s['overall']['availability'])} of requests")
    else:
        maj, mino = _avail(s, "during", "majority"), _avail(s, "during", "minority")
        if maj is not None and mino is not None:
            if maj == mino:
                text = f"gossip answered {pct(maj)} on both sides"
            else:
                text = f"gossip answered {pct(maj)} on the majority and {pct(mino)} on the minority"
        else:
            text = f"gossip answered {pct(s['phases']['during']['all']['availability'])}"
        divs = [e["divergence"] for e in eps]
        base = s["digest_phases"]["before"]["agree_share"]
        quiet = s["quiet_convergence_s"]
        if base is not None and base < 0.5:
            # Busy replicas rarely agree at one instant even without a fault: the digests
            # cannot time the divergence, only show it and the convergence once quiet.
            during = s["digest_phases"]["during"]["agree_share"]
            text += (
                f", its replicas agreed in {pct(during)} of the samples during the fault "
                f"(up to {max(d['max_distinct_digests'] for d in divs)} distinct states; "
                f"{pct(base)} before it, while writes were still spreading) and "
            )
            text += (
                "never reached one state after the clients stopped"
                if quiet is None
                else f"reached one state {secs(quiet)} after the clients stopped"
            )
        elif len(eps) == 1:
            d = divs[0]
            if not d["diverged"]:
                text += ", its replicas never disagreed"
            elif d["diverged_for_s"] is not None:
                text += (
                    f", its replicas diverged for {secs(d['diverged_for_s'])} and converged "
                    f"{secs(d['one_digest_after_heal_s'])} after heal"
                )
            else:
                text += ", its replicas diverged and did not reach one digest after the heal"
        else:
            fors = [d["diverged_for_s"] for d in divs if d["diverged_for_s"] is not None]
            afters = [
                d["one_digest_after_heal_s"]
                for d in divs
                if d["one_digest_after_heal_s"] is not None
            ]
            if fors:
                text += (
                    f", across {len(eps)} fault periods its replicas diverged for up to "
                    f"{secs(max(fors))}"
                )
            if afters:
                text += f" and converged at most {secs(max(afters))} after each heal"
            if len(afters) < len(heal_eps):
                text += " (not after every heal)"
        out.append(text)
    lww = s.get("lww")
    if lww is not None:
        n = lww["overwritten"]
        out.append(
            f"{n} acknowledged write{'s were' if n != 1 else ' was'} overwritten by "
            "last-writer-wins"
        )
    stale = s.get("stale_reads") or {}
    if stale.get("reads_checked"):
        out.append(f"{stale['stale']} of {stale['reads_checked']} reads were stale")
    deletes = s["deletes"]["acknowledged"]
    if final and final.get("valid") is True:
        text = "every register ended as its last acknowledged write"
        if deletes:
            text += f" ({plural(deletes, 'acknowledged delete')}, none undone)"
        out.append(text)
    if tombs and tombs.get("all_collected_after_stop_s") is not None and tombs["collected"]:
        out.append(
            f"its tombstones were all collected {secs(tombs['all_collected_after_stop_s'])} "
            "after the clients stopped"
        )
    if counter and counter.get("valid") is not False:
        out.append("no acknowledged increment was lost")
    return out


def verdict(summary: Mapping[str, Any]) -> str:
    """The verdict in plain words, computed from ``summary`` (violations first)."""
    stores = summary["stores"]
    parts: list[str] = []
    bad = summary.get("violations") or violations(summary)
    if bad:
        parts.append("VIOLATION: " + "; ".join(bad) + ".")
    clauses: list[str] = []
    if "raft" in stores:
        clauses += _raft_sentence(stores["raft"])
    if "gossip" in stores:
        g = _gossip_sentence(stores["gossip"])
        clauses += g
    text = "; ".join(c for c in clauses if c)
    if text:
        text = text[0].upper() + text[1:] + "."
        parts.append(text)
    return " ".join(parts)


# -- schema ---------------------------------------------------------------------------
def load_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return schema


def validate_summary(doc: Mapping[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` when ``doc`` does not match the schema."""
    import jsonschema

    jsonschema.validate(instance=doc, schema=load_schema(), cls=jsonschema.Draft202012Validator)


# -- building ---------------------------------------------------------------------------
@dataclass(slots=True)
class Report:
    """What :func:`build_report` wrote."""

    out_dir: Path
    summary: dict[str, Any]
    html_path: Path
    summary_path: Path
    plots: dict[str, Path] = field(default_factory=dict)

    @property
    def valid(self) -> bool:
        """False when a checker found a real violation."""
        return bool(self.summary["valid"])

    @property
    def verdict(self) -> str:
        return str(self.summary["verdict"])


def build_report(out_dir: Path | str) -> Report:
    """(Re)build ``summary.json``, the plots and ``report.html`` in the run folder."""
    from harness import plots

    out = Path(out_dir)
    data = load_run(out)
    summary = build_summary(out, data)
    paths = plots.draw_all(out, data, summary)
    summary["plots"] = {k: p.name for k, p in paths.items()}
    validate_summary(summary)
    summary_path = out / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    images = {k: base64.b64encode(p.read_bytes()).decode("ascii") for k, p in paths.items()}
    scenario_text = _scenario_text(summary["scenario"], out)
    html_path = out / "report.html"
    html_path.write_text(render_html(summary, images, scenario_text), encoding="utf-8")
    return Report(out, summary, html_path, summary_path, paths)


def _scenario_text(scenario: Mapping[str, Any], out: Path) -> str:
    f = scenario.get("file")
    for cand in (Path(str(f)) if f else None, Path.cwd() / str(f) if f else None):
        if cand is not None and cand.is_file():
            try:
                return cand.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                break
    return json.dumps(dict(scenario), indent=2)


def escape(x: object) -> str:
    return html.escape(str(x), quote=True)


# -- the side-by-side key figures (HTML and terminal) ---------------------------------------
def _lat(c: Mapping[str, Any] | None, q: str) -> str:
    if c is None or c.get("latency") is None:
        return "-"
    return f"{c['latency'][q]:.1f} ms"


def _fails(c: Mapping[str, Any] | None) -> str:
    if c is None or c["fail"] + c["info"] == 0:
        return "-"
    r = c["refusals"]
    parts = []
    if c["fail"]:
        parts.append(f"{c['fail']} fail, median {r['fail_median_ms']:.0f} ms")
    if c["info"]:
        med = r["info_median_ms"]
        parts.append(f"{c['info']} info" + (f", median {med:.0f} ms" if med is not None else ""))
    return "; ".join(parts)


def _if_quiet(s: Mapping[str, Any], text: str) -> str:
    """``text``, unless the replicas rarely agreed even before the fault (busy store): then
    instants of agreement cannot time the divergence."""
    base = s["digest_phases"]["before"]["agree_share"]
    return text if base is None or base >= 0.5 else "n/a (rarely agree under load)"


def key_rows(summary: Mapping[str, Any]) -> list[tuple[str, list[str]]]:
    """Label and one cell per store: the side-by-side table of the report and the demo."""
    stores = list(summary["stores"].values())
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, f: Any) -> None:
        rows.append((label, [f(s) for s in stores]))

    def verdict_cell(v: object) -> str:
        return {True: "ok", False: "VIOLATION", "unknown": "unknown", None: "-"}.get(
            v if isinstance(v, bool | str) or v is None else None, str(v)
        )

    row("checkers", lambda s: verdict_cell(s["valid"]))
    row("linearizable", lambda s: verdict_cell((s["linearizable"] or {}).get("valid")))
    row("operations", lambda s: str(s["operations"]))
    for phase, name in (
        ("before", "before fault"),
        ("during", "during fault"),
        ("after", "after heal"),
    ):
        for side in SIDES:
            row(f"availability {name}, {side}", lambda s, p=phase, d=side: pct(_avail(s, p, d)))
        if phase == "before":
            row(
                f"availability {name}, all",
                lambda s: pct(s["phases"]["before"]["all"]["availability"]),
            )
    row("refusals during fault, minority", lambda s: _fails(s["phases"]["during"].get("minority")))
    row("refusals during fault, majority", lambda s: _fails(s["phases"]["during"].get("majority")))
    row(
        "majority accepts writes after the cut",
        lambda s: (
            ", ".join(
                "never"
                if e["majority_write_after_s"] is None
                else secs(e["majority_write_after_s"])
                for e in s["episodes"]
                if e["action"] == "partition"
            )
            or "-"
        ),
    )
    row("throughput ok/s (whole run)", lambda s: f"{s['overall']['throughput_ok_per_s'] or 0:.1f}")
    row(
        "throughput ok/s during fault",
        lambda s: f"{s['phases']['during']['all']['throughput_ok_per_s'] or 0:.1f}",
    )
    for q in ("p50_ms", "p95_ms", "p99_ms"):
        row(f"latency {q[:3]} (ok ops)", lambda s, q=q: _lat(s["overall"], q))
    row(
        "max distinct replica states in fault",
        lambda s: (
            ", ".join(str(e["divergence"]["max_distinct_digests"]) for e in s["episodes"]) or "-"
        ),
    )
    row(
        "replicas diverged for",
        lambda s: _if_quiet(
            s, ", ".join(secs(e["divergence"]["diverged_for_s"]) for e in s["episodes"]) or "-"
        ),
    )
    row(
        "one digest after heal",
        lambda s: _if_quiet(
            s,
            ", ".join(secs(e["divergence"]["one_digest_after_heal_s"]) for e in s["episodes"])
            or "-",
        ),
    )
    for phase, name in (
        ("before", "before fault"),
        ("during", "during fault"),
        ("after", "after heal"),
    ):
        row(
            f"replicas agreeing {name} (share of samples)",
            lambda s, p=phase: pct(s["digest_phases"][p]["agree_share"]),
        )
    row("one state after clients stopped", lambda s: secs(s["quiet_convergence_s"]))
    row(
        "stale reads",
        lambda s: f"{s['stale_reads']['stale']} / {s['stale_reads']['reads_checked']}",
    )
    row(
        "LWW overwritten acked writes",
        lambda s: (
            "-"
            if s["lww"] is None
            else f"{s['lww']['overwritten']} / {s['lww']['acknowledged_writes']}"
        ),
    )
    row(
        "deletes acknowledged",
        lambda s: f"{s['deletes']['acknowledged']} / {s['deletes']['invoked']}",
    )
    row("last acked write on every replica", lambda s: _final_cell(s["final_state"]))
    row("tombstones", lambda s: _tombstone_cell(s["tombstones"]))
    row(
        "counters",
        lambda s: (
            "-"
            if s["counter"] is None
            else (
                ("exact" if s["counter"]["exact"] else "within bounds")
                if s["counter"]["valid"]
                else f"VIOLATION ({s['counter']['lost']} lost)"
            )
        ),
    )
    return rows


def _final_cell(f: Mapping[str, Any] | None) -> str:
    if f is None:
        return "-"
    if f["valid"] is False:
        return f"VIOLATION ({plural(len(f['violations']), 'key')})"
    if f["valid"] is not True:
        return str(f["valid"])
    return f"yes ({f['deleted_keys']} of {plural(f['keys'], 'key')} deleted)"


def _tombstone_cell(t: Mapping[str, Any] | None) -> str:
    if t is None:
        return "-"
    text = f"{t['collected']} collected, {t['held_at_end']} held at the end"
    after = t["all_collected_after_stop_s"]
    if after is not None:
        return f"{text}; none left {secs(after)} after the stop"
    if t["waited_s"] > 0:
        return f"{text}; NOT all collected within {secs(t['waited_s'])}"
    return text


# -- HTML ------------------------------------------------------------------------------------
CSS_PATH = Path(__file__).with_name("templates") / "report.css"
CAPTIONS = {
    "timeline": "Every client operation as a bar from invocation to completion, one lane "
    "per client, grouped by the node it talks to (its side during the partition in "
    "brackets). Green: ok. Red: refused (definitely not applied). Orange: outcome unknown "
    "(timed out). Shaded: the fault.",
    "availability": "Share of requests answered ok, before the fault, during it and after "
    "the heal, for clients of the majority-side and minority-side nodes.",
    "latency": "Latency of each operation (log scale) at the time it was invoked; lines: "
    "median and 99th percentile of ok operations per half second. Refusals that fail fast "
    "sit low; operations that hang until the deadline sit at the top.",
    "throughput": "Operations per second by outcome (stacked), per half second.",
    "divergence": "How many different replica states the nodes report, sampled every ~100 ms "
    "(1 = all replicas agree). Brief blips without a fault are writes still spreading.",
}


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]], cls: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _store_details(name: str, s: Mapping[str, Any]) -> str:
    parts = [f'<h3 id="store-{escape(name)}">{escape(name)}</h3>']
    rows = []
    for phase in PHASES:
        p = s["phases"][phase]
        for side in ("all", *SIDES):
            c = p.get(side)
            if c is None:
                continue
            r = c["refusals"]
            lat = c.get("latency") or {}
            rows.append(
                [
                    f"{phase} ({p['start_s']:.1f}-{p['end_s']:.1f} s)",
                    side,
                    c["ok"],
                    c["fail"],
                    c["info"],
                    c["unsupported"],
                    pct(c["availability"]),
                    "-" if r["fail_median_ms"] is None else f"{r['fail_median_ms']:.1f}",
                    "-" if r["info_median_ms"] is None else f"{r['info_median_ms']:.1f}",
                    "-" if c["throughput_ok_per_s"] is None else f"{c['throughput_ok_per_s']:.1f}",
                    *(f"{lat[q]:.1f}" if q in lat else "-" for q in ("p50_ms", "p95_ms", "p99_ms")),
                ]
            )
    parts.append(
        _table(
            [
                "phase",
                "side",
                "ok",
                "fail",
                "info",
                "not supported",
                "availability",
                "fail: median ms to refuse",
                "info: median ms to give up",
                "ok/s",
                "p50 ms",
                "p95 ms",
                "p99 ms",
            ],
            rows,
            "num",
        )
    )
    if s["episodes"]:
        parts.append("<h4>Fault periods</h4>")
        erows = []
        for e in s["episodes"]:
            d = e["divergence"]
            sides = ", ".join(f"{n}: {v}" for n, v in sorted(e["sides"].items()))
            erows.append(
                [
                    e["label"],
                    f"{e['start_s']:.2f}",
                    "-" if e["end_s"] is None else f"{e['end_s']:.2f}",
                    secs(e["duration_s"]),
                    sides or "-",
                    secs(e["majority_write_after_s"])
                    if e["majority_write_after_s"] is not None
                    else "none",
                    secs(e["minority_write_after_s"])
                    if e["minority_write_after_s"] is not None
                    else "none",
                    d["max_distinct_digests"],
                    secs(d["diverged_for_s"]),
                    secs(d["one_digest_after_heal_s"]),
                ]
            )
        parts.append(
            _table(
                [
                    "fault",
                    "start s",
                    "end s",
                    "length",
                    "sides",
                    "first majority write acked after",
                    "first minority write acked after",
                    "max distinct states",
                    "diverged for",
                    "one state after heal",
                ],
                erows,
                "num",
            )
        )
    parts.append("<h4>Checkers</h4>")
    for cname, c in sorted(s["checkers"].items()):
        if not isinstance(c, dict):
            continue
        v = c.get("valid")
        badge = {True: "ok", False: "VIOLATION", None: "measured"}.get(
            v if isinstance(v, bool) or v is None else None, str(v)
        )
        cls = {"ok": "good", "VIOLATION": "bad"}.get(badge, "neutral")
        text = c.get("summary")
        if text is None:
            text = json.dumps({k: v2 for k, v2 in c.items() if k != "valid"}, indent=1)[:3000]
        parts.append(
            f"<details{' open' if v is False else ''}><summary>{escape(cname)} "
            f'<span class="badge {cls}">{escape(badge)}</span></summary>'
            f"<pre>{escape(text)}</pre></details>"
        )
    lin = s.get("linearizable") or {}
    if lin.get("counterexample"):
        parts.append(
            "<h4>Counterexample</h4><pre>"
            + escape(json.dumps(lin["counterexample"], indent=2))
            + "</pre>"
        )
    if s.get("lww") and s["lww"]["examples"]:
        parts.append(
            "<h4>Writes overwritten by last-writer-wins (examples)</h4><ul>"
            + "".join(f"<li>{escape(x)}</li>" for x in s["lww"]["examples"])
            + "</ul>"
        )
    f = s["files"]
    links = [("history", f["history"]), ("digests", f["digests"])]
    if f.get("results"):
        links.append(("results.json", f["results"]))
    links += [(Path(x).name, x) for x in f["logs"]]
    parts.append(
        '<p class="files">Files: '
        + " · ".join(f'<a href="{escape(href)}">{escape(label)}</a>' for label, href in links)
        + "</p>"
    )
    return "\n".join(parts)


def peer_security(summary: Mapping[str, Any]) -> str:
    """One line: were the nodes authenticated to each other (issue 14)?"""
    kinds = {s: (v.get("security") or {}).get("peers") for s, v in summary["stores"].items()}
    if all(k == "mutual TLS" for k in kinds.values()):
        return (
            "Peers authenticated: every link between nodes was mutual TLS with certificates "
            "of the run's own CA (clients: plaintext on loopback)."
        )
    if all(k == "none" for k in kinds.values()):
        return "Peers NOT authenticated (--insecure): any client could have spoken as a node."
    return "Peer authentication: " + ", ".join(
        f"{s}: {k or 'not recorded'}" for s, k in kinds.items()
    )


def render_html(summary: Mapping[str, Any], images: Mapping[str, str], scenario_text: str) -> str:
    """One self-contained HTML page (CSS inline, images as data URIs, no script)."""
    css = CSS_PATH.read_text(encoding="utf-8")
    sc = summary.get("scenario") or {}
    stores = list(summary["stores"])
    title = f"caplab report: {sc.get('name', 'run')}"
    bad = bool(summary["violations"])
    rows = key_rows(summary)
    key_table = _table(["", *stores], [[label, *cells] for label, cells in rows], "key")
    figs = []
    for name in ("timeline", "availability", "latency", "throughput", "divergence"):
        if name in images:
            figs.append(
                f'<figure id="plot-{name}"><img alt="{name} plot" src="data:image/png;base64,'
                f'{images[name]}"><figcaption><b>{name.capitalize()}.</b> '
                f"{escape(CAPTIONS[name])}</figcaption></figure>"
            )
    commit = summary.get("commit")
    commit_text = (
        "no git information"
        if not commit
        else f"commit {commit['sha'][:12]}{' (uncommitted changes)' if commit['dirty'] else ''}"
    )
    m = summary["machine"]
    details = "\n".join(_store_details(n, summary["stores"][n]) for n in stores)
    faults = ", ".join(map(str, sc.get("faults") or [])) or "none"
    peers = peer_security(summary)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title><style>{css}</style></head>
<body><main>
<header><h1>{escape(title)}</h1>
<p class="sub">{escape(sc.get("description", ""))}<br>
{escape(sc.get("nodes", "?"))} nodes per store · workload {escape(sc.get("workload", "?"))} ·
faults: {escape(faults)} · generated {escape(summary["generated_at"])}<br>
<span id="peer-security">{escape(peers)}</span></p></header>
<section class="verdict {"bad" if bad else "good"}">
<h2>{"Violation found" if bad else "Verdict"}</h2>
<p id="verdict">{escape(summary["verdict"])}</p></section>
<section><h2>Side by side</h2>{key_table}
<p class="note">Availability = ok / (ok + fail + info) of client requests, by the side the
client's node was on during the partition. A failed compare-and-swap counts as an answer;
operations a store does not offer (CAS on gossip) are left out.</p></section>
<section><h2>Plots</h2>{"".join(figs)}</section>
<section><h2>Details</h2>{details}</section>
<section><h2>Scenario</h2><pre>{escape(scenario_text)}</pre></section>
<footer>Run folder {escape(summary["run_dir"])} · {escape(commit_text)} ·
{escape(m["platform"])}, Python {escape(m["python"])}, {escape(m["cpu_count"])} CPUs ·
<a href="summary.json">summary.json</a> · <a href="results.json">results.json</a></footer>
</main></body></html>
"""


# -- CLI: caplab report ------------------------------------------------------------------
def add_report(sub: Any) -> None:
    p = sub.add_parser("report", help="(re)build report.html, plots and summary.json of a run")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from harness.history import HistoryError

    try:
        rep = build_report(Path(args.run_dir))
    except (ReportError, HistoryError) as e:
        print(f"caplab: {e}", file=sys.stderr)
        return 2 if isinstance(e, ReportError) else 1
    print(rep.verdict)
    print(f"report: {rep.html_path}")
    return 0 if rep.valid else 1


REGISTRARS = [add_report]
