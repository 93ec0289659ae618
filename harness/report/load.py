"""Layer 1 of the report: read a run folder back (no figures, no drawing).

A run folder is what :mod:`harness.runner` writes: ``<out>/results.json`` (``"status":
"complete"`` when the run finished; ``"interrupted"`` / ``"failed"`` when it did not) and, per
store, ``<out>/<store>/history.jsonl``, ``digests.jsonl``, ``logs/*.log`` and
``results.json``. Everything here is computed from those files, never from processes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.checks import FAULT_ACTIONS, FINAL_READ_PROCESS, fault_window
from harness.history import NEMESIS, Event, Operation, pair_operations, read_history

STORES = ("raft", "gossip")
PHASES = ("before", "during", "after")
SIDES = ("majority", "minority")
BIN_S = 0.5  # width of the time bins of the throughput and latency series
RUN_STATUSES = ("complete", "interrupted", "failed")


class ReportError(Exception):
    """The folder is not a run folder (no history of any store); the message says why."""


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


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def run_status(out: Path) -> str:
    """``complete`` when the runner finished and wrote ``results.json``; ``interrupted``
    when it is missing (Ctrl-C, a crash before the end) or says so; ``failed`` when the
    runner recorded an error."""
    combined = read_json(out / "results.json")
    if combined is None:
        return "interrupted"
    status = combined.get("status")
    if status in RUN_STATUSES:
        return str(status)
    return "complete" if isinstance(combined.get("stores"), dict) else "interrupted"


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


def node_key(n: str) -> tuple[int, str]:
    """Sort ``n2`` before ``n10``."""
    digits = "".join(c for c in n if c.isdigit())
    return (int(digits) if digits else 0, n)


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
    results = read_json(d / "results.json")
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
        key=node_key,
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


def load_run(out_dir: Path | str) -> dict[str, StoreData]:
    """Every store found in the run folder, by name."""
    out = Path(out_dir)
    return {s: sd for s in STORES if (sd := load_store(out, s)) is not None}


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
