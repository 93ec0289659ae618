"""Layer 4 of the train report: summary.json, the four plots and the HTML page.

Theory of operation
-------------------
Nothing here computes a figure: it lays out :class:`~.figures.TrainFigures` and
:class:`~.verdict.Verdict`. :func:`summary_doc` is every number as JSON; the plots follow
:mod:`harness.report.plots` (matplotlib Agg, PNG, the same palette; the partition window
shaded grey; majority workers in blues, minority workers in purples) and each mode keeps one
colour (:data:`MODE_COLORS`) in every plot; a plot with nothing to show is not drawn.
:func:`render_html` is one self-contained page: the verdict, the table of experiments, then
the plots (as data URIs) with a one-line caption each.
"""

from __future__ import annotations

import datetime as _dt
import html
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from harness.report.html import CSS_PATH
from harness.report.plots import DPI, FAULT_ALPHA, PALETTE, side_colors
from harness.report.summary import commit_info, machine_info
from harness.report.words import pct
from harness.train.report.figures import (
    MERGE_FACTOR,
    MODES,
    Dist,
    ExperimentFigures,
    PartitionFigures,
    TrainFigures,
)
from harness.train.report.verdict import MODE_NAMES, Verdict

SCHEMA_VERSION = "caplab.train.summary/1"
PLOT_NAMES = {
    "accuracy": "accuracy.png",
    "throughput": "throughput.png",
    "staleness": "staleness.png",
    "partition": "partition.png",
}
# One colour per mode in every plot, none of them a colour the CAP report gives a meaning.
MODE_COLORS = {"bsp": "#17becf", "asp": "#e377c2", "ssp": "#8c564b"}
MODE_STYLE = {"bsp": "-", "asp": ":", "ssp": "--"}
STORE_ROLES = {"raft": "raft (CP)", "gossip": "gossip (AP)"}
CAPTIONS = {
    "accuracy": "Held-out accuracy of worker 0's parameters on the clean runs, one line per "
    "mode, against wall time (left) and against its completed steps (right); dashed: the "
    "target.",
    "throughput": "Steps per second of each worker, grouped by experiment (colour: mode); "
    "the hatched bar with a red edge is the straggler.",
    "staleness": "How many updates of other workers a worker's parameters lacked when it "
    "read them (ASP and SSP), all steps of all workers of each experiment; dashed: the "
    "median.",
    "partition": "Top: each worker's completed steps over time in the BSP/SSP partition "
    "experiments (majority workers blue, minority purple). Bottom: the largest distance "
    "between two nodes' ASP parameters (dashed: 1.5x its median before the partition, the "
    "'merged' line). Grey: the partition.",
}


# -- summary.json -------------------------------------------------------------------------
def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(x, nd)


def dist_json(d: Dist | None) -> dict[str, Any] | None:
    if d is None:
        return None
    return {
        "n": d.n,
        "median": _r(d.median),
        "p99": _r(d.p99),
        "max": _r(d.max),
        "histogram": {str(k): v for k, v in d.histogram.items()},
    }


def partition_json(p: PartitionFigures | None) -> dict[str, Any] | None:
    if p is None:
        return None
    return {
        "start_s": p.start_s,
        "end_s": p.end_s,
        "minority_workers": list(p.minority_workers),
        "stall_s": _r(p.stall.length_s),
        "stall_from_s": _r(p.stall.from_s),
        "stall_to_s": _r(p.stall.to_s),
        "resumed_after_heal_s": _r(p.resumed_after_heal_s),
        "majority_steps": p.majority_steps,
        "minority_steps": p.minority_steps,
        "divergence_max": _r(p.divergence_max),
        "divergence_before": _r(p.divergence_before),
        "merged_after_s": _r(p.merged_after_s),
        "divergence": [[t, d] for t, d in p.divergence],
    }


def experiment_json(e: ExperimentFigures) -> dict[str, Any]:
    s = e.straggler
    return {
        "mode": e.mode,
        "store": e.store,
        "condition": e.condition,
        "status": e.status,
        "error": e.error,
        "duration_s": e.duration_s,
        "staleness_bound": e.staleness_bound,
        "workers": [
            {
                "worker": w.worker,
                "node": w.node,
                "steps": w.steps,
                "steps_per_s": _r(w.steps_per_s),
                "final_acc": _r(w.final_acc),
                "final_loss": _r(w.final_loss),
                "curve": [[c.t, c.step, c.acc, c.loss] for c in w.curve],
            }
            for w in e.workers
        ],
        "total_steps": e.total_steps,
        "total_steps_per_s": _r(e.total_steps_per_s),
        "final_acc": {"mean": _r(e.final_acc_mean), "worker0": _r(e.final_acc_w0)},
        "final_loss": {"mean": _r(e.final_loss_mean), "worker0": _r(e.final_loss_w0)},
        "target_accuracy": e.target,
        "time_to_target_s": _r(e.time_to_target_s),
        "steps_to_target": e.steps_to_target,
        "staleness": dist_json(e.staleness),
        "age_ms": dist_json(e.age_ms),
        "read_missed": dist_json(e.read_missed),
        "digests": None
        if e.digests is None
        else {
            "checked": e.digests.checked,
            "disagreeing": list(e.digests.disagreeing),
            "agree": not e.digests.disagreeing,
        },
        "lead": None
        if e.lead is None
        else {"max": e.lead.max_lead, "bound": e.lead.bound, "within_bound": e.lead.ok},
        "straggler": None
        if s is None
        else {
            "worker": s.worker,
            "factor": s.factor,
            "steps_per_s": _r(s.steps_per_s),
            "others_median_steps_per_s": _r(s.others_median_steps_per_s),
            "staleness_median": s.staleness_median,
        },
        "partition": partition_json(e.partition),  # progress left out: every step's time
        "wait_share": _r(e.wait_share),
    }


def summary_doc(
    f: TrainFigures, v: Verdict, run_dir: Path, plots: Mapping[str, Path]
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "generated_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "run_dir": str(run_dir.resolve()),
        "machine": machine_info(),
        "commit": commit_info(),
        "config": f.config,
        "experiments": {name: experiment_json(e) for name, e in f.experiments.items()},
        "straggler_effect": {
            m: {
                "clean_steps_per_s": _r(x.clean_steps_per_s),
                "straggler_steps_per_s": _r(x.straggler_steps_per_s),
                "slowdown": _r(x.slowdown),
            }
            for m, x in f.straggler_effect.items()
        },
        "verdict": {"headline": v.headline, "lines": v.lines, "violations": v.violations},
        "plots": {k: p.name for k, p in plots.items()},
    }


# -- plots ----------------------------------------------------------------------------------
def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=DPI)
    plt.close(fig)
    return path


def accuracy_plot(path: Path, f: TrainFigures) -> Path | None:
    """Held-out accuracy of worker 0 (or the first worker) on the clean runs."""
    exps = [e for m in MODES if (e := f.get(m, "clean")) is not None]
    curves = [(e, next((w.curve for w in e.workers if w.curve), ())) for e in exps]
    curves = [(e, c) for e, c in curves if c]
    if not curves:
        return None
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for e, c in curves:
        kw = {"color": MODE_COLORS.get(e.mode, PALETTE["line"]), "lw": 1.6, "marker": "."}
        ax_t.plot([p.t for p in c], [p.acc for p in c], label=MODE_NAMES.get(e.mode), **kw)
        ax_s.plot([p.step for p in c], [p.acc for p in c], **kw)
    for ax in (ax_t, ax_s):
        ax.axhline(f.target, color=PALETTE["line"], ls="--", lw=1)
        ax.grid(alpha=0.3)
    ax_t.text(
        0.01,
        f.target,
        f"target {pct(f.target)}",
        va="bottom",
        fontsize=8,
        color="#444",
        transform=ax_t.get_yaxis_transform(),
    )
    ax_t.set_ylabel("held-out accuracy")
    ax_t.set_xlabel("wall time (s)")
    ax_s.set_xlabel("steps completed (worker 0)")
    ax_t.set_title("accuracy vs time (clean)")
    ax_s.set_title("accuracy vs steps (clean)")
    ax_t.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def throughput_plot(path: Path, f: TrainFigures) -> Path | None:
    exps = [e for e in f.experiments.values() if e.workers]
    if not exps:
        return None
    fig, ax = plt.subplots(figsize=(11, 3.8))
    width = 0.8 / max(len(e.workers) for e in exps)
    for i, e in enumerate(exps):
        slow = None if e.straggler is None else e.straggler.worker
        for j, w in enumerate(e.workers):
            x = i - 0.4 + width * (j + 0.5)
            is_slow = w.worker == slow
            ax.bar(
                x,
                w.steps_per_s,
                width * 0.9,
                color=MODE_COLORS.get(e.mode, PALETTE["line"]),
                hatch="//" if is_slow else None,
                edgecolor=PALETTE["refused"] if is_slow else "white",
                linewidth=1.2 if is_slow else 0.5,
            )
            if is_slow:
                ax.text(x, w.steps_per_s, "straggler", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(exps)))
    ax.set_xticklabels([e.name for e in exps], rotation=20, fontsize=8)
    ax.set_ylabel("steps/s per worker")
    ax.grid(axis="y", alpha=0.3)
    handles = [
        Patch(color=MODE_COLORS[m], label=MODE_NAMES[m])
        for m in MODES
        if any(e.mode == m for e in exps)
    ]
    ax.legend(handles=handles, fontsize=8, loc="upper right")
    return _save(fig, path)


def staleness_plot(path: Path, f: TrainFigures) -> Path | None:
    exps = [e for e in f.experiments.values() if e.staleness is not None]
    if not exps:
        return None
    cols = min(3, len(exps))
    rows = math.ceil(len(exps) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(11, 0.4 + 2.9 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(exps) :]:
        ax.set_visible(False)
    for ax, e in zip(flat, exps, strict=False):
        st = e.staleness
        assert st is not None
        h = st.histogram
        ax.bar(list(h), list(h.values()), 0.8, color=MODE_COLORS.get(e.mode, PALETTE["line"]))
        ax.axvline(st.median, color=PALETTE["line"], ls="--", lw=1)
        lo = min(min(h), 0)
        ax.set_xlim(lo - 0.7, max(max(h), lo + 4) + 0.7)  # at least 0..4: integer ticks
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{e.name}: median {st.median:g}, p99 {st.p99:g}", fontsize=9)
        ax.set_xlabel("staleness (updates)", fontsize=8)
        ax.set_ylabel("steps", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _shade(ax: Any, p: PartitionFigures) -> None:
    ax.axvspan(p.start_s, p.end_s, color=PALETTE["fault"], alpha=FAULT_ALPHA, lw=0, zorder=0)


def partition_plot(path: Path, f: TrainFigures) -> Path | None:
    parts = [
        (e, e.partition)
        for e in f.experiments.values()
        if e.condition == "partition" and e.partition is not None
    ]
    sync = [(e, p) for e, p in parts if e.mode != "asp"]
    asp = [(e, p) for e, p in parts if e.mode == "asp" and p.divergence]
    if not sync and not asp:
        return None
    n = int(bool(sync)) + int(bool(asp))
    fig, axes = plt.subplots(n, 1, figsize=(11, 0.6 + 3.0 * n), sharex=True, squeeze=False)
    row = 0
    if sync:
        ax = axes[row][0]
        row += 1
        for e, p in sync:
            names = [str(w) for w in sorted(p.progress)]
            colors = side_colors(names, {str(w): "minority" for w in p.minority_workers})
            for w, pts in sorted(p.progress.items()):
                ax.step(
                    [t for t, _ in pts],
                    [s for _, s in pts],
                    where="post",
                    color=colors[str(w)],
                    ls=MODE_STYLE.get(e.mode, "-"),
                    lw=1.4,
                )
        _shade(ax, sync[0][1])
        ax.set_ylabel("steps completed")
        ax.set_title("BSP / SSP under the partition: each worker's steps")
        handles: list[Any] = [
            Line2D([], [], color="#555", ls=MODE_STYLE[m], label=MODE_NAMES[m])
            for m in MODES
            if any(e.mode == m for e, _ in sync)
        ]
        handles += [
            Line2D([], [], color=PALETTE["majority"], label="majority worker"),
            Line2D([], [], color=PALETTE["minority"], label="minority worker"),
            Patch(facecolor=PALETTE["fault"], alpha=FAULT_ALPHA * 2, label="partition"),
        ]
        ax.legend(handles=handles, fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
    if asp:
        ax = axes[row][0]
        for e, p in asp:
            ax.plot(
                [t for t, _ in p.divergence],
                [d for _, d in p.divergence],
                color=MODE_COLORS["asp"],
                lw=1.5,
                marker=".",
                label=e.name,
            )
            if p.divergence_before is not None:
                ax.axhline(
                    MERGE_FACTOR * p.divergence_before, color=PALETTE["line"], ls="--", lw=0.8
                )
        _shade(ax, asp[0][1])
        ax.set_ylabel("parameter distance (L2)")
        ax.set_title("ASP: largest distance between two nodes' parameters")
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
    axes[-1][0].set_xlabel("seconds since the experiment's start")
    return _save(fig, path)


def draw_all(folder: Path, f: TrainFigures, *, tmp: bool = False) -> dict[str, Path]:
    """Draw every plot with something to show into ``folder`` (as ``.<name>.tmp`` files
    with ``tmp``, for the caller to move into place)."""
    drawers = {
        "accuracy": accuracy_plot,
        "throughput": throughput_plot,
        "staleness": staleness_plot,
        "partition": partition_plot,
    }
    out = {}
    for key, draw in drawers.items():
        name = f".{PLOT_NAMES[key]}.tmp" if tmp else PLOT_NAMES[key]
        path = draw(folder / name, f)
        if path is not None:
            out[key] = path
    return out


# -- HTML -----------------------------------------------------------------------------------
def esc(x: object) -> str:
    return html.escape(str(x), quote=True)


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} s"


def _fault_cell(e: ExperimentFigures) -> str:
    p = e.partition
    if p is None:
        return "-"
    if e.mode == "asp":
        if p.divergence_max is None:
            return f"maj {p.majority_steps} / min {p.minority_steps} steps"
        merged = "not merged" if p.merged_after_s is None else f"merged +{p.merged_after_s:.1f} s"
        return f"distance {p.divergence_max:.3g}, {merged}"
    return f"stall {p.stall.length_s:.1f} s"


def experiments_table(f: TrainFigures) -> str:
    heads = [
        "experiment",
        "mode",
        "store",
        "condition",
        "steps/s",
        "final accuracy",
        "time to target",
        "staleness median / p99",
        "wait share",
        "stall or divergence",
    ]
    rows = []
    for e in f.experiments.values():
        st = e.staleness
        bad = (e.digests is not None and e.digests.disagreeing) or (
            e.lead is not None and not e.lead.ok
        )
        name = esc(e.name) + (' <b class="bad">VIOLATION</b>' if bad else "")
        if e.status != "complete":
            name += f' <span class="badge bad">{esc(e.status)}</span>'
        target = (
            f"{e.time_to_target_s:.1f} s ({e.steps_to_target} steps)"
            if e.time_to_target_s is not None
            else "never"
            if e.final_acc_mean is not None
            else "-"  # no accuracy measured
        )
        cells = [
            MODE_NAMES.get(e.mode, e.mode),
            STORE_ROLES.get(e.store, e.store),
            e.condition,
            f"{e.total_steps_per_s:.1f}",
            "-" if e.final_acc_mean is None else pct(e.final_acc_mean),
            target,
            "-" if st is None else f"{st.median:g} / {st.p99:g}",
            pct(e.wait_share),
            _fault_cell(e),
        ]
        rows.append(f"<tr><td>{name}</td>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{esc(h)}</th>" for h in heads)
    return (
        '<div class="scroll"><table class="num wrap-head"><thead>'
        f"<tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
    )


def verdict_html(v: Verdict) -> str:
    parts = [
        f'<section id="verdict" class="verdict {"" if v.ok else "violation"}">',
        f'<h2 id="verdict-status">{esc(v.headline)}</h2>',
    ]
    if v.violations:
        parts.append(
            '<div class="violations"><b>Violations:</b><ul>'
            + "".join(f"<li>{esc(x)}</li>" for x in v.violations)
            + "</ul></div>"
        )
    parts.append("<ul>" + "".join(f"<li>{esc(x)}</li>" for x in v.lines) + "</ul></section>")
    return "\n".join(parts)


EXTRA_CSS = """
main { max-width: 1000px; }
.bad { color: #9b1c1c; font-weight: 600; }
.verdict > ul { padding-left: 20px; margin: 4px 0; }
.verdict > ul li { margin: 3px 0; }
"""


def render_html(
    summary: Mapping[str, Any], f: TrainFigures, v: Verdict, images: Mapping[str, str]
) -> str:
    """The page; ``images``: plot key -> data URI."""
    css = CSS_PATH.read_text(encoding="utf-8") + EXTRA_CSS
    cfg = summary.get("config") or {}
    commit = summary.get("commit") or {}
    meta = (
        f"{cfg.get('workers', '?')} workers on {cfg.get('nodes', '?')} nodes · "
        f"lr {cfg.get('lr', '?')} · batch {cfg.get('batch', '?')} · "
        f"{cfg.get('duration_s', '?')} s per experiment · seed {cfg.get('seed', '?')} · "
        f"commit {esc(str(commit.get('sha', '?'))[:10])}"
        + (" (dirty)" if commit.get("dirty") else "")
    )
    figures = "".join(
        f'<figure id="plot-{esc(k)}"><img src="{esc(uri)}" alt="{esc(k)}">'
        f"<figcaption>{esc(CAPTIONS.get(k, ''))}</figcaption></figure>"
        for k, uri in images.items()
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>caplab train: BSP, ASP and SSP over the stores</title><style>{css}</style></head>
<body><main>
<h1>Training over a replicated store: BSP, ASP, SSP</h1>
<p class="sub">Softmax regression on the 8x8 digits; workers exchange gradients and
parameters only through the store. {esc(meta)}</p>
{verdict_html(v)}
<h2>Experiments</h2>
<p class="note">steps/s: all workers together. Final accuracy: held-out, mean over workers.
Time to target: when the median worker first reached {esc(pct(f.target))}. Staleness:
updates of other workers acknowledged before a gradient was pushed that the parameters it was
computed on lacked. Wait share: the part of each step spent off the compute (the store's
round trips, the barrier or the clock wait, refusals and retries).</p>
{experiments_table(f)}
<h2>Plots</h2>
{figures}
<footer>summary.json holds every number of this page. Generated
{esc(summary.get("generated_at", ""))}.</footer>
</main></body></html>
"""
