"""Layer 3 of the report: the verdict, computed from the summary's figures.

Two short columns, "CP (raft) gave up ..." and "AP (gossip) gave up ...", three lines each
with the key numbers. Real checker failures (violations) come first; a run that did not
finish is INTERRUPTED, never a violation by itself: what it has not done yet (heal,
convergence, final reads) is not judged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from harness.report.words import pct, plural, secs

STATUS_HEADLINE = {
    "violation": "VIOLATION FOUND",
    "interrupted": "INTERRUPTED",
    "failed": "RUN DID NOT FINISH",
    "ok": "Verdict",
}
TITLES = {"raft": "CP (raft) gave up availability", "gossip": "AP (gossip) gave up consistency"}


def _last_line(text: object) -> str:
    lines = str(text or "").strip().splitlines()
    return lines[-1].strip() if lines else ""


def violations(summary: Mapping[str, Any]) -> list[str]:
    """One line per checker that found a real violation (empty: none), in plain words."""
    out: list[str] = []
    for store, s in summary["stores"].items():
        for name, c in sorted(s["checkers"].items()):
            if not isinstance(c, dict) or c.get("valid") is not False:
                continue
            if name == "linearizable":
                why = (c.get("counterexample") or {}).get("reason") or _last_line(c.get("summary"))
                text = "NOT linearizable" + (f" ({why})" if why else "")
            elif name == "counter":
                lost = (s.get("counter") or {}).get("lost", 0)
                text = (
                    f"counters out of bounds ({plural(int(lost), 'acknowledged increment')} lost)"
                )
            elif name == "final_state":
                v = [str(x) for x in c.get("violations") or []]
                text = (
                    f"replicas did not end with the last acknowledged write of "
                    f"{plural(len(v), 'key')}" + (f" ({v[0]})" if v else "")
                )
            elif name == "tombstones":
                text = (
                    f"tombstones not all collected within {secs(float(c.get('waited_s', 0)))} "
                    "after the run"
                )
            elif name == "convergence":
                text = "replicas did not converge to one state after the heal"
            else:
                detail = _last_line(c.get("summary"))
                text = f"{name} failed" + (f" ({detail})" if detail else "")
            out.append(f"{store}: {text}")
    return out


def _refusal_style(c: Mapping[str, Any] | None) -> str:
    if c is None or (c["fail"] + c["info"]) == 0:
        return ""
    r = c["refusals"]
    if c["fail"] >= c["info"] and r["fail_median_ms"] is not None:
        return f"failing fast, median {r['fail_median_ms']:.0f} ms"
    if r["info_median_ms"] is not None:
        return f"mostly timing out after {r['info_median_ms'] / 1000:.1f} s"
    return "mostly without any answer"


def _partitions(s: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [e for e in s["episodes"] if e["action"] == "partition"]


def raft_lines(s: Mapping[str, Any]) -> list[str]:
    """Three lines: the minority, the majority, linearizability (+ stale LOCAL reads)."""
    out: list[str] = []
    eps = s["episodes"]
    part = _partitions(s)
    minority = s["phases"]["during"].get("minority")
    majority = s["phases"]["during"].get("majority")
    if not eps:
        out.append(f"no fault: answered {pct(s['overall']['availability'])} of requests")
    elif part and minority is not None:
        refused = None if minority["availability"] is None else 1 - minority["availability"]
        dur = sum(e["duration_s"] for e in part)
        notes = [_refusal_style(minority)]
        if minority["ok"] and minority["ok"] == minority.get("ok_local_reads"):
            notes.append("it answered only LOCAL reads")
        note = "; ".join(n for n in notes if n)
        out.append(
            f"minority refused {pct(refused)} of requests for {secs(dur)}"
            + (f" ({note})" if note else "")
        )
    else:
        during = s["phases"]["during"]["all"]
        labels = ", ".join(e["label"] for e in eps)
        out.append(f"answered {pct(during['availability'])} of requests during {labels}")
    if part and majority is not None:
        waits = [e["majority_write_after_s"] for e in part]
        if any(w is None for w in waits):
            out.append("majority acknowledged no write during the fault")
        elif max(waits) >= 0.25:
            out.append(
                f"majority unavailable for {secs(max(waits))} during the election "
                f"({pct(majority['availability'])} answered during the fault)"
            )
        else:
            out.append(f"majority kept accepting writes ({pct(majority['availability'])} answered)")
    lin: object = (s.get("linearizable") or {}).get("valid")
    lin_words: dict[object, str] = {
        True: "histories linearizable",
        False: "histories NOT linearizable",
        "unknown": "linearizability unknown (the check ran out of time)",
    }
    lin_text = lin_words.get(lin, "no register history to check")
    stale = s.get("stale_reads") or {}
    if stale.get("reads_checked"):
        lin_text += f"; {stale['stale']} of {stale['reads_checked']} LOCAL reads stale"
    out.append(lin_text)
    return out


def gossip_lines(s: Mapping[str, Any]) -> list[str]:
    """Three lines: availability, how far replicas fell behind, convergence and LWW."""
    out: list[str] = []
    eps = s["episodes"]
    if not eps:
        out.append(f"no fault: answered {pct(s['overall']['availability'])} of requests")
    else:
        maj = s["phases"]["during"].get("majority")
        mino = s["phases"]["during"].get("minority")
        if maj is not None and mino is not None:
            a, b = maj["availability"], mino["availability"]
            out.append(
                f"answered {pct(a)} on both sides"
                if pct(a) == pct(b)
                else f"answered {pct(a)} on the majority, {pct(b)} on the minority"
            )
        else:
            out.append(f"answered {pct(s['phases']['during']['all']['availability'])}")
    divs = [e["divergence"] for e in eps]
    most = max((d["max_missing_writes"] for d in divs), default=0)
    behind = max((d["max_behind_ms"] for d in divs), default=0.0)
    measured = bool(s["lag"]["t_s"])
    if eps and not measured:
        out.append("replica lag not measured (digests.jsonl has no per-node view)")
    elif eps and most:
        out.append(
            f"replicas diverged by up to {plural(most, 'acknowledged write')}, "
            f"{secs(behind / 1000)} behind"
        )
    elif eps:
        out.append("replicas never fell behind")
    third: list[str] = []
    healed = [e for e in eps if e["end_s"] is not None]
    ttcs = [e["divergence"]["time_to_converge_s"] for e in healed]
    if healed and measured:
        conv = (s.get("checkers") or {}).get("convergence") or {}
        if any(t is None for t in ttcs) and conv.get("valid") is True:
            # one state at the end, but no sample after a heal saw every node answer with
            # its view (a Dump timed out, too many keys to dump, or the run ended)
            third.append("converged (the time after the heal was not measured)")
        elif any(t is None for t in ttcs):
            third.append("did NOT converge after the heal")
        else:
            third.append(f"converged {secs(max(t for t in ttcs if t is not None))} after the heal")
    lww = s.get("lww")
    if lww is not None:
        n = int(lww["discarded"])
        third.append(f"{plural(n, 'acknowledged write')} discarded by LWW")
    if third:
        out.append("; ".join(third))
    return out


def status_of(summary: Mapping[str, Any]) -> str:
    """``violation`` | ``interrupted`` | ``failed`` | ``ok`` (what the headline says). A
    run that did not finish is reported as such even if its partial history shows a
    violation (listed under the headline)."""
    run = summary.get("status", "complete")
    if run in ("interrupted", "failed"):
        return str(run)
    return "violation" if summary.get("violations") else "ok"


def verdict_parts(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The verdict as data: status, headline, violations, and one column per store."""
    stores = summary["stores"]
    bad = list(summary.get("violations") or violations(summary))
    status = status_of({**summary, "violations": bad})
    columns = []
    for name, fn in (("raft", raft_lines), ("gossip", gossip_lines)):
        if name in stores:
            columns.append({"store": name, "title": TITLES[name], "lines": fn(stores[name])})
    note = ""
    if status == "interrupted":
        note = (
            "The run was interrupted before it finished: the figures cover the partial "
            "history; convergence, final state and tombstones were not checked."
        )
    elif status == "failed":
        note = "The run failed before it finished: the figures cover the partial history."
    return {
        "status": status,
        "headline": STATUS_HEADLINE[status],
        "note": note,
        "violations": bad,
        "columns": columns,
    }


def verdict_text(parts: Mapping[str, Any]) -> str:
    """The verdict in plain words (violations first), one paragraph."""
    out: list[str] = []
    if parts["status"] in ("interrupted", "failed"):
        out.append(f"{parts['headline']}: {parts['note']}")
    if parts["violations"]:
        out.append("VIOLATION: " + "; ".join(parts["violations"]) + ".")
    for col in parts["columns"]:
        out.append(f"{col['title']}: " + "; ".join(col["lines"]) + ".")
    return " ".join(out)


def verdict(summary: Mapping[str, Any]) -> str:
    """The verdict in plain words, computed from ``summary``."""
    return verdict_text(verdict_parts(summary))
