"""The side-by-side tables (HTML report and the demo's terminal): a main table of at most ten
rows in plain words, and every other figure for the collapsed details."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from harness.report.load import SIDES
from harness.report.words import discard_example, ms, pct, plural, secs

Row = tuple[str, list[str]]


def _avail(s: Mapping[str, Any], phase: str, side: str) -> float | None:
    c = s["phases"][phase].get(side)
    return None if c is None else c.get("availability")


def _rows(summary: Mapping[str, Any], spec: list[tuple[str, Callable[[Any], str]]]) -> list[Row]:
    stores = list(summary["stores"].values())
    return [(label, [f(s) for s in stores]) for label, f in spec]


def _checks_cell(s: Mapping[str, Any], status: str) -> str:
    bad = [n for n, c in s["checkers"].items() if isinstance(c, dict) and c.get("valid") is False]
    if bad:
        return "VIOLATION: " + ", ".join(sorted(bad))
    lin = (s.get("linearizable") or {}).get("valid")
    if s["store"] == "raft" and lin is not None:
        text = {True: "linearizable", "unknown": "linearizability unknown"}.get(lin, str(lin))
    else:
        text = "unknown" if s["valid"] == "unknown" else "all passed"
    return text + (" (run interrupted: not all checked)" if status != "complete" else "")


def _minority_cell(s: Mapping[str, Any]) -> str:
    c = s["phases"]["during"].get("minority")
    if c is None:
        return "-"
    text = pct(c["availability"])
    if c["ok"] and c["ok"] == c.get("ok_local_reads"):
        text += " (LOCAL reads only)"
    return text


def _writes_again(s: Mapping[str, Any]) -> str:
    waits = [e["majority_write_after_s"] for e in s["episodes"] if e["action"] == "partition"]
    if not waits:
        return "-"
    if any(w is None for w in waits):
        return "never during the fault"
    w = max(w for w in waits if w is not None)
    return "at once" if w < 0.25 else f"after {secs(w)}"


def _latency_cell(c: Mapping[str, Any] | None) -> str:
    lat = None if c is None else c.get("latency")
    if not lat:
        return "-"
    return f"{ms(lat['p50_ms'])} / {ms(lat['p99_ms'])}"


def _behind_cell(s: Mapping[str, Any]) -> str:
    divs = [e["divergence"] for e in s["episodes"]]
    if not divs:
        return "-"
    if not s["lag"]["t_s"]:
        return "not measured"
    most = max(d["max_missing_writes"] for d in divs)
    if not most:
        return "none"
    behind = max(d["max_behind_ms"] for d in divs) / 1000
    text = f"{plural(most, 'write')}, {secs(behind)} behind"
    if s["store"] == "raft":
        text += " (the minority: refused meanwhile)"
    return text


def _caught_up_cell(s: Mapping[str, Any]) -> str:
    healed = [e for e in s["episodes"] if e["end_s"] is not None]
    if not healed:
        return "-"
    if not s["lag"]["t_s"]:
        return "not measured"
    ttcs = [e["divergence"]["time_to_converge_s"] for e in healed]
    conv = (s.get("checkers") or {}).get("convergence") or {}
    unknown = "not measured" if conv.get("valid") is True else "not within the run"
    return ", ".join(unknown if t is None else f"in {secs(t)}" for t in ttcs)


def _stale_cell(s: Mapping[str, Any]) -> str:
    st = s["stale_reads"]
    if not st["reads_checked"]:
        return "-"
    what = "LOCAL reads" if st.get("read_functions") == ["read-local"] else "reads"
    return f"{st['stale']:,} of {st['reads_checked']:,} {what}"


def _lww_cell(s: Mapping[str, Any]) -> str:
    lww = s.get("lww")
    if lww is None:
        return "none (no last-writer-wins)" if s["store"] == "raft" else "-"
    n = int(lww["discarded"])
    text = f"{n:,} of {lww['acknowledged_writes']:,}"
    if lww["discards"]:
        text += "; e.g. " + discard_example(lww["discards"][0])
    return text


def _kept_cell(s: Mapping[str, Any]) -> str:
    parts: list[str] = []
    f, c = s.get("final_state"), s.get("counter")
    if f is not None:
        parts.append(
            f"registers: VIOLATION ({plural(len(f['violations']), 'key')})"
            if f["valid"] is False
            else "registers: yes"
        )
    if c is not None:
        parts.append(
            f"counters: VIOLATION ({c['lost']} lost)"
            if c["valid"] is False
            else "counters: " + ("exact" if c["exact"] else "within bounds")
        )
    return "; ".join(parts) or "-"


def key_rows(summary: Mapping[str, Any]) -> list[Row]:
    """The main side-by-side table (at most ten rows): label and one cell per store."""
    status = str(summary.get("status", "complete"))
    spec: list[tuple[str, Callable[[Any], str]]] = [
        ("Consistency checks", lambda s: _checks_cell(s, status)),
        (
            "Answered during the fault: majority side",
            lambda s: pct(_avail(s, "during", "majority")),
        ),
        ("Answered during the fault: minority side", _minority_cell),
        ("Majority accepted writes again", _writes_again),
        ("Latency p50 / p99 (answered requests)", lambda s: _latency_cell(s["overall"])),
        ("Most acknowledged writes a replica lacked", _behind_cell),
        ("Every replica caught up after the heal", _caught_up_cell),
        ("Stale reads", _stale_cell),
        ("Acknowledged writes discarded by LWW", _lww_cell),
        ("Acknowledged writes and increments kept", _kept_cell),
    ]
    return _rows(summary, spec)


# -- details ---------------------------------------------------------------------------------
def _fails(c: Mapping[str, Any] | None) -> str:
    if c is None or c["fail"] + c["info"] == 0:
        return "-"
    r = c["refusals"]
    parts = []
    if c["fail"]:
        parts.append(f"{c['fail']} refused, median {r['fail_median_ms']:.0f} ms")
    if c["info"]:
        med = r["info_median_ms"]
        parts.append(
            f"{c['info']} timed out" + (f", median {med:.0f} ms" if med is not None else "")
        )
    return "; ".join(parts)


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


def _avail_cell(phase: str, side: str) -> Callable[[Any], str]:
    return lambda s: pct(_avail(s, phase, side))


def detail_rows(summary: Mapping[str, Any]) -> list[Row]:
    """Every other side-by-side figure (the report's collapsed "all figures" table)."""
    spec: list[tuple[str, Callable[[Any], str]]] = [
        ("operations", lambda s: f"{s['operations']:,}")
    ]
    for phase, name in (("before", "before the fault"), ("after", "after the heal")):
        for side in SIDES:
            spec.append((f"answered {name}, {side} side", _avail_cell(phase, side)))
    spec += [
        ("answered, whole run", lambda s: pct(s["overall"]["availability"])),
        (
            "refusals during the fault, minority",
            lambda s: _fails(s["phases"]["during"].get("minority")),
        ),
        (
            "refusals during the fault, majority",
            lambda s: _fails(s["phases"]["during"].get("majority")),
        ),
        (
            "answered per second, whole run",
            lambda s: f"{s['overall']['throughput_ok_per_s'] or 0:.1f}",
        ),
        (
            "answered per second during the fault",
            lambda s: f"{s['phases']['during']['all']['throughput_ok_per_s'] or 0:.1f}",
        ),
        ("latency p95 (answered)", lambda s: ms((s["overall"].get("latency") or {}).get("p95_ms"))),
        (
            "replicas with identical state, share of samples before / during / after",
            lambda s: " / ".join(
                pct(s["digest_phases"][p]["agree_share"]) for p in ("before", "during", "after")
            ),
        ),
        ("identical state after the clients stopped", lambda s: secs(s["quiet_convergence_s"])),
        (
            "deletes acknowledged",
            lambda s: f"{s['deletes']['acknowledged']} / {s['deletes']['invoked']}",
        ),
        ("tombstones", lambda s: _tombstone_cell(s["tombstones"])),
    ]
    return _rows(summary, spec)
