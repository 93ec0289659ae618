"""Layer 2 of the report: every figure of one store, computed from what :mod:`.load` read.

Per store, on the run's single time axis (seconds since the common ``t0``):

* *phases* ``before`` / ``during`` / ``after`` split at the fault window (first fault to
  last recovery, as the runner defines it) and *sides* ``majority`` / ``minority``. An
  operation's side is the tag the workload recorded (only while a partition is in force);
  outside the partition it is the side its node was on during the (first) partition;
* per phase x side: availability ``ok / (ok + fail + info)`` (a failed compare counts as an
  answer, a FAILED_PRECONDITION "not supported" is left out), how refusals came (median
  time-to-fail of ``fail`` ops vs ``info`` ops), throughput and latency percentiles of ``ok``
  ops (HdrHistogram);
* per fault episode: the *majority unavailability window* (fault start until the first
  acknowledged mutation invoked on the majority side after it completed) and the replica
  lag: how many acknowledged writes each node had not seen yet
  (:func:`harness.divergence.lag_series`), its peak, and the time from the heal until every
  node had seen them all (:func:`harness.divergence.time_to_converge`, the one definition);
* the checkers' figures (results.json, or :func:`harness.checks.checkers_from_history` when
  the runner did not get that far): linearizability, stale reads (raft: LOCAL reads),
  acknowledged writes discarded by last-writer-wins, counters, final state, tombstones.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from hdrh.histogram import HdrHistogram

from harness.checks import checkers_from_history
from harness.divergence import LagPoint, lag_series, time_to_converge
from harness.history import Operation
from harness.report.load import (
    BIN_S,
    PHASES,
    SIDES,
    StoreData,
    classify,
    phase_of,
    side_of,
)

MUTATIONS = frozenset({"write", "cas", "delete", "incr"})


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


# -- replica lag (harness.divergence) -----------------------------------------------------
def lag_points(sd: StoreData) -> list[LagPoint]:
    """Per digest sample: each node's acknowledged writes not seen yet."""
    return lag_series(sd.store, sd.ops, sd.samples)


def lag_figures(points: Sequence[LagPoint], nodes: Sequence[str]) -> dict[str, Any]:
    """The lag series for the summary and the plot, and its peaks."""
    names = [n for n in nodes if any(n in p.missing for p in points)]
    names += sorted({n for p in points for n in p.missing} - set(names))
    behind = [max(p.oldest_ms.values(), default=0.0) for p in points]
    return {
        "t_s": [round(p.t_s, 3) for p in points],
        "missing": {n: [int(p.missing.get(n, 0)) for p in points] for n in names},
        "max_missing": max((max(p.missing.values(), default=0) for p in points), default=0),
        "max_behind_ms": round(max(behind, default=0.0), 1),
    }


def episode_lag(
    points: Sequence[LagPoint], start_s: float, end_s: float | None, run_end_s: float
) -> dict[str, Any]:
    """From the fault until every replica caught up: the most acknowledged writes a node had
    not seen, how far behind its oldest missing write was, and the time from the heal until
    none was missing (:func:`harness.divergence.time_to_converge`)."""
    ttc = None if end_s is None else time_to_converge(points, end_s)
    # from the fault until the replicas caught up (the lag peaks around the heal)
    stop = run_end_s if end_s is None or ttc is None else end_s + ttc
    inside = [p for p in points if start_s <= p.t_s <= stop]
    most = max((max(p.missing.values(), default=0) for p in inside), default=0)
    behind = max((max(p.oldest_ms.values(), default=0.0) for p in inside), default=0.0)
    return {
        "diverged": most > 0,
        "max_missing_writes": int(most),
        "max_behind_ms": round(behind, 1),
        "time_to_converge_s": None if ttc is None else round(ttc, 3),
    }


def episode_figures(sd: StoreData, points: Sequence[LagPoint]) -> list[dict[str, Any]]:
    """Per fault episode: majority unavailability window, minority refusal, replica lag."""
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
        entry["divergence"] = episode_lag(points, ep.start_s, ep.end_s, sd.end_s)
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


# -- digests (details only) ----------------------------------------------------------------
def distinct(sample: Mapping[str, Any]) -> int:
    """Distinct known digests in one sample."""
    return len({d for d in sample["digests"].values() if d is not None})


def agree(sample: Mapping[str, Any]) -> bool:
    """Every node answered, all with the same digest."""
    values = list(sample["digests"].values())
    return bool(values) and None not in values and len(set(values)) == 1


def digest_phases(sd: StoreData) -> dict[str, Any]:
    """Per phase: samples, share of samples where every replica's digest agreed, mean
    distinct digests."""
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
    """Seconds from the end of the workload to the first sample where every replica reports
    the same digest; None if that never happened."""
    for s in sd.samples:
        t = float(s["time_ns"]) / 1e9
        if t >= sd.end_s and agree(s):
            return round(t - sd.end_s, 3)
    return None


# -- time series ---------------------------------------------------------------------------
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
    for vals in lat:
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


# -- checkers ------------------------------------------------------------------------------
def checkers_of(sd: StoreData, *, complete: bool = True) -> dict[str, Any]:
    """The runner's checker results, or the same checkers run here on the history when
    results.json is missing (an interrupted run: only those that hold on a prefix)."""
    if sd.results is not None and isinstance(sd.results.get("checkers"), dict):
        return dict(sd.results["checkers"])
    return checkers_from_history(
        sd.store, sd.all_ops, sd.samples, sd.window, end_s=sd.end_s, complete=complete
    )


def _stale(sd: StoreData, checkers: Mapping[str, Any]) -> dict[str, Any]:
    """Stale reads: gossip's reads, raft's LOCAL reads (its only reads that can be stale)."""
    c = checkers.get("stale_reads") or checkers.get("stale_local_reads")
    if isinstance(c, dict):
        return {
            "reads_checked": int(c.get("reads_checked", 0)),
            "stale": int(c.get("stale", 0)),
            "max_lag_ms": float(c.get("max_lag_ms", 0.0)),
            "read_functions": list(c.get("read_functions") or []),
        }
    from harness.checker.staleness import stale_reads

    fs = ("read-local",) if sd.store == "raft" else ("read", "read-local")
    r = stale_reads(sd.ops, read_fs=fs)
    return {
        "reads_checked": r.reads_checked,
        "stale": r.stale_count,
        "max_lag_ms": round(r.max_lag_ns / 1e6, 3),
        "read_functions": list(fs),
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


def _lww(checkers: Mapping[str, Any]) -> dict[str, Any] | None:
    lww = checkers.get("lww_losers")
    if not isinstance(lww, dict):
        return None
    discards = [d for d in lww.get("discards") or [] if isinstance(d, dict)]
    overwritten = int(lww.get("losers", 0)) + int(lww.get("lost", 0))
    return {
        "acknowledged_writes": int(lww.get("acknowledged_writes", 0)),
        "losers": int(lww.get("losers", 0)),
        "lost": int(lww.get("lost", 0)),
        "overwritten": overwritten,
        # harness.divergence.lww_discards when the checker recorded them (older runs: not)
        "discarded": len(discards) if "discards" in lww else overwritten,
        "discards": discards,
        "examples": [str(x) for x in lww.get("examples") or []],
    }


def _linearizable(checkers: Mapping[str, Any]) -> dict[str, Any] | None:
    lin = checkers.get("linearizable")
    if not isinstance(lin, dict):
        return None
    return {
        "valid": lin.get("valid"),
        "summary": str(lin.get("summary", "")),
        "counterexample": lin.get("counterexample"),
    }


def _convergence(checkers: Mapping[str, Any]) -> dict[str, Any] | None:
    conv = checkers.get("convergence")
    if not isinstance(conv, dict):
        return None
    return {
        "valid": conv.get("valid"),
        "time_to_converge_s": conv.get("time_to_converge_s"),
        "max_divergence": conv.get("max_divergence"),
    }


def store_summary(sd: StoreData, *, complete: bool = True) -> dict[str, Any]:
    """Every figure of one store (see the module docstring)."""
    checkers = checkers_of(sd, complete=complete)
    verdicts = [c.get("valid") for c in checkers.values() if isinstance(c, dict)]
    valid: bool | str = True
    if any(v is False for v in verdicts):
        valid = False
    elif any(v == "unknown" for v in verdicts):
        valid = "unknown"
    points = lag_points(sd)
    return {
        "store": sd.store,
        "valid": valid,
        "operations": len(sd.ops),
        "nodes": sd.nodes,
        "node_sides": dict(sd.node_side),
        "end_s": round(sd.end_s, 3),
        "fault_window_s": None if sd.window is None else [round(x, 3) for x in sd.window],
        "overall": cell(sd.ops, sd.complete_s, sd.end_s if sd.end_s > 0 else None),
        "phases": phase_table(sd),
        "episodes": episode_figures(sd, points),
        "linearizable": _linearizable(checkers),
        "stale_reads": _stale(sd, checkers),
        "lww": _lww(checkers),
        "counter": _counter(checkers),
        "convergence": _convergence(checkers),
        "lag": lag_figures(points, sd.nodes),
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
