"""Layer 4b of the report: one self-contained HTML page (CSS inline, images as data URIs, no
script) from the summary, the plots and the scenario text."""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.report.load import PHASES, SIDES
from harness.report.tables import detail_rows, key_rows
from harness.report.words import pct, secs

CSS_PATH = Path(__file__).resolve().parents[1] / "templates" / "report.css"
PLOT_ORDER = ("timeline", "availability", "latency", "throughput", "divergence")
CAPTIONS = {
    "timeline": "Every client operation as a bar from invocation to completion, one lane "
    "per client, grouped by the node it talks to (its side during the partition in "
    "brackets). Green: ok. Red: refused (definitely not applied). Orange: outcome unknown "
    "(timed out). Dotted grey: an operation the store does not offer. Grey band: the fault.",
    "availability": "Share of requests answered ok, before the fault, during it and after "
    "the heal, for clients of the majority-side (blue) and minority-side (purple) nodes.",
    "latency": "Latency of each operation (log scale, the same for both stores) at the time "
    "it was invoked; lines: median and 99th percentile of ok operations per half second. "
    "Refusals that fail fast sit low; operations that hang until the deadline sit at the top.",
    "throughput": "Operations per second by outcome (stacked), per half second, the same "
    "scale for both stores. Requests for operations a store does not offer (CAS on gossip) "
    "are not drawn: they are not lost, the store says it does not do them.",
    "divergence": "For each node, how many acknowledged writes it had not seen yet, sampled "
    "every ~100 ms (majority nodes in blues, minority nodes in purples; the same scale for "
    "both stores). Near zero before the fault, rising while it is in force, falling after "
    "the heal. On raft the minority falls behind but refuses requests meanwhile.",
}


def escape(x: object) -> str:
    return html.escape(str(x), quote=True)


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], cls: str = "") -> str:
    """An HTML table in a horizontally scrolling container (never clipped)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)

    def td(c: object) -> str:
        text = escape(c)
        mark = ' class="bad"' if str(c).startswith("VIOLATION") else ""
        return f"<td{mark}>{text}</td>"

    body = "".join("<tr>" + "".join(td(c) for c in r) + "</tr>" for r in rows)
    return (
        f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def verdict_html(summary: Mapping[str, Any]) -> str:
    """The verdict: headline, violations first (red), then one column per store."""
    parts = summary["verdict_parts"]
    status = parts["status"]
    out = [
        f'<section id="verdict" class="verdict {escape(status)}">',
        f'<h2 id="verdict-status">{escape(parts["headline"])}</h2>',
    ]
    if parts["note"]:
        out.append(f'<p class="note-strong">{escape(parts["note"])}</p>')
    if parts["violations"]:
        label = "Found in the partial history" if status != "violation" else "Violations"
        out.append(
            f'<div class="violations"><b>{escape(label)}:</b><ul>'
            + "".join(f"<li>{escape(v)}</li>" for v in parts["violations"])
            + "</ul></div>"
        )
    cols = []
    for col in parts["columns"]:
        cols.append(
            f'<div class="col" id="verdict-{escape(col["store"])}"><h3>{escape(col["title"])}'
            "</h3><ul>" + "".join(f"<li>{escape(x)}</li>" for x in col["lines"]) + "</ul></div>"
        )
    out.append(f'<div class="columns">{"".join(cols)}</div></section>')
    return "\n".join(out)


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
                    phase,
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
    headers = [
        "phase",
        "side",
        "ok",
        "refused",
        "timed out",
        "not supported",
        "answered",
        "ms to refuse (median)",
        "ms to time out (median)",
        "ok/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
    ]
    spans = ", ".join(
        f"{ph} {s['phases'][ph]['start_s']:.1f}-{s['phases'][ph]['end_s']:.1f} s" for ph in PHASES
    )
    parts.append(f'<p class="note">Phases: {escape(spans)}.</p>')
    parts.append(table(headers, rows, "num wrap-head"))
    if s["episodes"]:
        parts.append("<h4>Fault periods</h4>")
        erows = []
        for e in s["episodes"]:
            d = e["divergence"]
            minority = [n for n, v in e["sides"].items() if v == "minority"]
            sides = f"minority: {', '.join(sorted(minority))}" if minority else ""
            erows.append(
                [
                    e["label"],
                    f"{e['start_s']:.2f}",
                    "-" if e["end_s"] is None else f"{e['end_s']:.2f}",
                    secs(e["duration_s"]),
                    sides or "-",
                    "none"
                    if e["majority_write_after_s"] is None
                    else secs(e["majority_write_after_s"]),
                    "none"
                    if e["minority_write_after_s"] is None
                    else secs(e["minority_write_after_s"]),
                    d["max_missing_writes"],
                    secs(d["max_behind_ms"] / 1000),
                    secs(d["time_to_converge_s"]),
                ]
            )
        parts.append(
            table(
                [
                    "fault",
                    "start s",
                    "end s",
                    "length",
                    "sides",
                    "first majority write acknowledged after",
                    "first minority write acknowledged after",
                    "most writes a node lacked",
                    "oldest missing write",
                    "all caught up after the heal",
                ],
                erows,
                "num wrap-head",
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
    lww = s.get("lww")
    if lww and lww["discards"]:
        shown = lww["discards"][:20]
        parts.append(
            f"<h4>Acknowledged writes discarded by last-writer-wins ({len(lww['discards'])}"
            f"{', first 20' if len(lww['discards']) > 20 else ''})</h4><ul>"
            + "".join(f"<li>{escape(d.get('description') or d)}</li>" for d in shown)
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


def nodes_per_store(summary: Mapping[str, Any]) -> str:
    """From the scenario, else counted from the histories (an interrupted run)."""
    n = (summary.get("scenario") or {}).get("nodes")
    if n:
        return str(n)
    counts = sorted({len(s["nodes"]) for s in summary["stores"].values()})
    return "/".join(map(str, counts)) if counts else "?"


def render_html(summary: Mapping[str, Any], images: Mapping[str, str], scenario_text: str) -> str:
    """One self-contained HTML page (CSS inline, images as data URIs, no script)."""
    css = CSS_PATH.read_text(encoding="utf-8")
    sc = summary.get("scenario") or {}
    stores = list(summary["stores"])
    title = f"caplab report: {sc.get('name', 'run')}"
    key_table = table(["", *stores], [[label, *cells] for label, cells in key_rows(summary)], "key")
    more = table(["", *stores], [[label, *cells] for label, cells in detail_rows(summary)], "key")
    figs = []
    for name in PLOT_ORDER:
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
    workload = sc.get("workload", "?")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title><style>{css}</style></head>
<body><main>
<header><h1>{escape(title)}</h1>
<p class="sub">{escape(sc.get("description", ""))}<br>
{escape(nodes_per_store(summary))} nodes per store · workload {escape(workload)} ·
faults: {escape(faults)} · generated {escape(summary["generated_at"])}<br>
<span id="peer-security">{escape(peer_security(summary))}</span></p></header>
{verdict_html(summary)}
<section><h2>Side by side</h2>{key_table}
<p class="note">Answered = ok / (ok + refused + timed out) of client requests, by the side
the client's node was on during the partition. A failed compare-and-swap counts as an
answer; operations a store does not offer (CAS on gossip) are left out. "Writes a replica
lacked": acknowledged writes a node had not yet applied or received.</p>
<details><summary>All figures side by side</summary>{more}</details></section>
<section><h2>Plots</h2>{"".join(figs)}</section>
<section><h2>Details</h2><details><summary>Per store: phases, fault periods, checkers,
files</summary>{details}</details></section>
<section><h2>Scenario</h2><details><summary>Scenario file</summary>
<pre>{escape(scenario_text)}</pre></details></section>
<footer>Run folder {escape(summary["run_dir"])} · {escape(commit_text)} ·
{escape(m["platform"])}, Python {escape(m["python"])}, {escape(m["cpu_count"])} CPUs ·
<a href="summary.json">summary.json</a> · <a href="results.json">results.json</a></footer>
</main></body></html>
"""
