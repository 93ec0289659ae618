"""Layer 4 of the spectrum report: summary.json, the staleness plot and the HTML page.

Nothing here computes a figure: it lays out :class:`~harness.spectrum.matrix.Matrix` and
:class:`~harness.spectrum.verdict.Verdict`.
"""

from __future__ import annotations

import datetime as _dt
import html
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from harness.report.html import CSS_PATH
from harness.report.summary import commit_info, machine_info
from harness.spectrum.matrix import (
    CHECKER_NAMES,
    CHECKERS,
    PROMISES,
    Availability,
    Cell,
    Matrix,
)
from harness.spectrum.verdict import LEVEL_NAMES, Verdict

SCHEMA_VERSION = "caplab.spectrum/1"
PLOT_NAME = "staleness.png"
STORE_ROLES = {"raft": "raft (CP)", "gossip": "gossip (AP)"}
CHECKER_ABBREV = {
    "linearizable": "LIN",
    "bounded_staleness": "BS",
    "read_my_writes": "RMW",
    "monotonic_reads": "MR",
    "monotonic_writes": "MW",
    "writes_follow_reads": "WFR",
    "consistent_prefix": "CP",
}
LEGEND = ", ".join(f"{a} = {CHECKER_NAMES[k]}" for k, a in CHECKER_ABBREV.items())


# -- summary.json -------------------------------------------------------------------------
def _avail_json(av: Mapping[str, Mapping[str, Availability]]) -> dict[str, Any]:
    return {
        side: {kind: {"ok": a.ok, "total": a.total} for kind, a in kinds.items()}
        for side, kinds in av.items()
    }


def cell_json(c: Cell) -> dict[str, Any]:
    st = c.staleness
    return {
        "offered": c.offered,
        "refusal": c.refusal,
        "promises": sorted(PROMISES[c.level]),
        "promise_kept": c.kept,  # null: not offered, or nothing to judge
        "unchecked": list(c.unchecked),
        "reads": c.reads,
        "reads_ok": c.reads_ok,
        "failed_reads": c.refused_reasons,
        "unexplained_reads": c.unexplained,
        "anomalies": {
            name: {
                "count": a.count,
                "checked": a.checked,
                "promised": a.promised,
                "example": a.example,
            }
            for name, a in c.anomalies.items()
        },
        "read_latency_ms": None
        if c.latency_ms is None
        else {"p50": round(c.latency_ms[0], 3), "p99": round(c.latency_ms[1], 3)},
        "availability_during_partition": _avail_json(c.availability),
        "staleness": None
        if st is None
        else {
            "checked_bound_ms": c.bound_ms,
            "reads": st.reads,
            "stale_reads": st.stale,
            "ms": {
                "median": round(st.median_ms, 3),
                "p99": round(st.p99_ms, 3),
                "max": round(st.max_ms, 3),
            },
            "versions_behind": {
                "median": st.versions_behind_median,
                "p99": st.versions_behind_p99,
                "max": st.versions_behind_max,
            },
        },
    }


def summary_doc(
    m: Matrix, v: Verdict, run_dir: Path, scenario: Mapping[str, Any] | None
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "generated_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "run_dir": str(run_dir.resolve()),
        "machine": machine_info(),
        "commit": commit_info(),
        "scenario": dict(scenario or {}),
        "max_staleness_ms": m.bound_ms,
        "partition_s": list(m.partition_s) if m.partition_s else None,
        "levels": list(m.levels),
        "checkers": list(CHECKERS),
        "valid": v.ok,
        "verdict": {"headline": v.headline, "lines": v.lines},
        "stores": {
            s: {
                "converged": m.converged[s],
                "converged_after_stop_s": m.converge_s[s],
                "linearizability_checker": m.linearizable[s],
            }
            for s in m.stores
        },
        "matrix": {s: {lv: cell_json(c) for lv, c in m.cells[s].items()} for s in m.stores},
    }


# -- the plot -------------------------------------------------------------------------------
def staleness_plot(path: Path, m: Matrix) -> Path:
    """Per store, every ok read of each level that returned an overwritten value, as a dot
    at its staleness (jittered within the level's lane, log scale), and the share of the
    level's reads that were stale; refused levels are labelled."""
    n = len(m.stores)
    fig, axes = plt.subplots(1, n, figsize=(5.8 * n, 1.0 + 0.55 * len(m.levels)), squeeze=False)
    labels = [LEVEL_NAMES[lv] for lv in m.levels]
    rng = random.Random(0)
    top = max(
        (c.staleness.max_ms for cells in m.cells.values() for c in cells.values() if c.staleness),
        default=1.0,
    )
    xmax = max(top, m.bound_ms) * 1.5
    for ax, store in zip(axes[0], m.stores, strict=True):
        cells = m.cells[store]
        ys = list(range(len(m.levels)))[::-1]  # strongest at the top
        for y, lv in zip(ys, m.levels, strict=True):
            c = cells[lv]
            st = c.staleness
            if not c.offered or st is None or not st.reads:
                text = "not offered" if not c.offered else "no read answered"
                ax.text(1.2, y, text, va="center", color="#777")
                continue
            stale = [x for x in st.staleness_ms if x > 0]
            ax.scatter(
                stale,
                [y + rng.uniform(-0.28, 0.28) for _ in stale],
                s=7,
                alpha=0.45,
                color="#d62728" if lv in ("strong", "bounded_staleness") else "#3182bd",
                linewidths=0,
            )
            share = 100 * len(stale) / st.reads
            ax.text(
                1.01,
                y,
                f"{share:.0f}% of {st.reads}",
                va="center",
                ha="left",
                fontsize=8,
                color="#444",
                transform=ax.get_yaxis_transform(),
            )
        ax.axvline(m.bound_ms, color="#999", ls="--", lw=1)
        ax.text(
            m.bound_ms,
            len(m.levels) - 0.45,
            f" {m.bound_ms:.0f} ms",
            color="#666",
            fontsize=8,
            va="bottom",
        )
        ax.set_xscale("log")
        ax.set_xlim(1, xmax)
        ax.set_yticks(ys)
        ax.set_yticklabels(labels if ax is axes[0][0] else [""] * len(labels))
        ax.set_ylim(-0.7, len(m.levels) - 0.2)
        ax.set_title(f"{STORE_ROLES.get(store, store)}: stale reads")
        ax.set_xlabel("how long before the read its value had been overwritten (ms)")
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
    return path


# -- HTML -----------------------------------------------------------------------------------
def esc(x: object) -> str:
    return html.escape(str(x), quote=True)


def _pct(a: Availability | None) -> str:
    if a is None or not a.total:
        return "-"
    return f"{100 * a.ok / a.total:.0f}%"


def _ms(x: float) -> str:
    if x >= 1000:
        return f"{x / 1000:.1f} s"
    return f"{x:.0f}" if x >= 10 or x == 0 else f"{x:.1f}"


def _promise_cell(c: Cell) -> str:
    if not c.offered:
        return '<td class="muted" title="{}">refused</td>'.format(esc(c.refusal or ""))
    if c.kept is None:
        why = "; ".join(c.unchecked) or "no read was answered"
        return f'<td class="warn" title="{esc(why)}">not measured</td>'
    if not c.kept:
        return '<td class="bad">BROKEN</td>'
    return '<td class="good">kept</td>'


def _anomalies_text(c: Cell) -> str:
    if not c.offered:
        return "-"
    found = [f"{CHECKER_ABBREV[k]} {c.anomalies[k].count}" for k in c.permitted]
    broken = [f"{CHECKER_ABBREV[k]} {c.anomalies[k].count}" for k in c.broken]
    parts = [f'<b class="bad">{esc(b)}</b>' for b in broken] + [esc(f) for f in found]
    return ", ".join(parts) if parts else "none"


def main_table(m: Matrix) -> str:
    """Terry's Table 2, measured: one row per level, a column group per store."""
    head1 = "<th rowspan=2>guarantee</th>" + "".join(
        f'<th colspan=6 class="group">{esc(STORE_ROLES.get(s, s))}</th>' for s in m.stores
    )
    sub = (
        "<th>promise</th><th>anomalies found (permitted)</th><th>read p50 / p99 ms</th>"
        "<th>minority: sticky / roaming</th><th>stale ms: median / p99 / max</th>"
        "<th>versions behind: median / p99 / max</th>"
    )
    rows = []
    for lv in m.levels:
        tds = [f"<th>{esc(LEVEL_NAMES[lv])}</th>"]
        for s in m.stores:
            c = m.cells[s][lv]
            tds.append(_promise_cell(c))
            tds.append(f"<td>{_anomalies_text(c)}</td>")
            if not c.offered:
                tds.append('<td class="muted" colspan=4>FAILED_PRECONDITION: not offered</td>')
                continue
            lat = (
                "-" if c.latency_ms is None else f"{_ms(c.latency_ms[0])} / {_ms(c.latency_ms[1])}"
            )
            minority = c.availability.get("minority", {})
            st = c.staleness
            tds.append(f"<td>{lat}</td>")
            tds.append(f"<td>{_pct(minority.get('sticky'))} / {_pct(minority.get('roaming'))}</td>")
            if st is None:
                tds.append("<td>-</td><td>-</td>")
            else:
                tds.append(
                    f"<td>{_ms(st.median_ms)} / {_ms(st.p99_ms)} / {_ms(st.max_ms)}</td>"
                    f"<td>{st.versions_behind_median:g} / {st.versions_behind_p99:g} / "
                    f"{st.versions_behind_max}</td>"
                )
        rows.append("<tr>" + "".join(tds) + "</tr>")
    return (
        '<div class="scroll"><table class="matrix"><thead>'
        f"<tr>{head1}</tr><tr>{sub * len(m.stores)}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def anomaly_grid(m: Matrix, store: str) -> str:
    """Counts per (level, checker) for one store; promised cells outlined."""
    head = "<th>guarantee</th>" + "".join(f"<th>{esc(CHECKER_NAMES[k])}</th>" for k in CHECKERS)
    rows = []
    for lv in m.levels:
        c = m.cells[store][lv]
        tds = [f"<th>{esc(LEVEL_NAMES[lv])}</th>"]
        for k in CHECKERS:
            a = c.anomalies.get(k)
            if a is None:
                tds.append('<td class="muted">-</td>')
                continue
            cls = (
                "bad"
                if a.promised and a.count
                else "good"
                if a.promised
                else ("warn" if a.count else "")
            )
            mark = " ✓" if a.promised and not a.count else ""
            title = esc(a.example or f"{a.checked} checked")
            tds.append(f'<td class="{cls}" title="{title}">{a.count}{mark}</td>')
        rows.append("<tr>" + "".join(tds) + "</tr>")
    return (
        f'<div class="scroll"><table class="grid"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def examples(m: Matrix, store: str) -> str:
    items = []
    for lv in m.levels:
        c = m.cells[store][lv]
        for k, a in c.anomalies.items():
            if a.count and a.example:
                cls = ' class="bad"' if a.promised else ""
                items.append(
                    f"<li{cls}><b>{esc(LEVEL_NAMES[lv])}</b>, {esc(CHECKER_NAMES[k])} "
                    f"({a.count}): {esc(a.example)}</li>"
                )
    return "<ul class=examples>" + "".join(items) + "</ul>" if items else "<p>none</p>"


EXTRA_CSS = """
table.matrix td, table.grid td { text-align: center; }
table.matrix th.group { text-align: center; border-bottom: 1px solid #ccc; }
td.good { color: #1a7f37; font-weight: 600; }
td.warn { color: #b35900; font-weight: 600; }
td.muted { color: #888; }
.bad { color: #c62828; font-weight: 600; }
ul.examples li { margin: 0.3em 0; font-size: 0.9em; }
.headline.ok { color: #1a7f37; } .headline.broken { color: #c62828; }
"""


def render_html(summary: Mapping[str, Any], m: Matrix, v: Verdict, plot: str | None) -> str:
    css = CSS_PATH.read_text(encoding="utf-8") + EXTRA_CSS
    sc = summary.get("scenario") or {}
    commit = summary.get("commit") or {}
    lines = "".join(
        f"<h3>{esc(STORE_ROLES.get(s, s) if s != 'broken' else 'broken promises')}</h3><ul>"
        + "".join(f"<li>{esc(x)}</li>" for x in v.lines[s])
        + "</ul>"
        for s in [*(["broken"] if "broken" in v.lines else []), *m.stores]
        if s in v.lines
    )
    grids = "".join(
        f"<h3>{esc(STORE_ROLES.get(s, s))}</h3>{anomaly_grid(m, s)}"
        f"<details><summary>one example of each anomaly</summary>{examples(m, s)}</details>"
        for s in m.stores
    )
    img = (
        f'<img src="{esc(plot)}" alt="staleness per guarantee" style="max-width:100%">'
        if plot
        else ""
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>caplab spectrum: {esc(sc.get("name", ""))}</title><style>{css}</style></head>
<body><main>
<h1>The consistency spectrum, measured</h1>
<p class="meta">{esc(sc.get("description", ""))} ·
bounded staleness asked for {m.bound_ms:.0f} ms · commit {esc(str(commit.get("sha", "?"))[:10])}
{"(dirty)" if commit.get("dirty") else ""}</p>
<h2 class="headline {"ok" if v.ok else "broken"}">{esc(v.headline)}</h2>
{lines}
<h2>Terry's Table 2, measured</h2>
<p>One row per read guarantee, the same workload and partition for all. <b>promise</b>:
the checkers of what the level guarantees found nothing (<i>refused</i>: the store does not
offer it). <b>anomalies found</b>: violations of guarantees the level does not promise (what
it permits, measured). <b>minority</b>: share of reads answered on the cut-off side during the
partition, for clients that stayed with their node / that moved between nodes.
<b>stale</b>: how long before the read its value had been overwritten. Anomalies: {LEGEND}
(LIN counts reads of a value already overwritten when the read began; BS is judged against
the bound the store claims).</p>
{main_table(m)}
<h2>Anomalies per checker</h2>
<p>Counts of reads (or writes) each checker flags, per level. ✓: promised and none found;
orange: permitted anomalies; red: a broken promise. Hover a count for an example.</p>
{grids}
<h2>Staleness per guarantee</h2>
<p>Box: median and quartiles of how stale each level's answered reads were; whiskers: 1st
and 99th percentiles; red dot: the maximum. Dashed: the bound BOUNDED_STALENESS asked for.</p>
{img}
<p class="meta">summary.json holds every number of this page.</p>
</main></body></html>
"""


__all__: Sequence[str] = (
    "SCHEMA_VERSION",
    "cell_json",
    "render_html",
    "staleness_plot",
    "summary_doc",
)
