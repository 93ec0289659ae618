"""Layer 4a of the report: Jepsen-style plots of a run (matplotlib, Agg backend, PNG files).

Every plot puts both stores one above the other on the run's single time axis (seconds
since the common t0), with a shared y axis so the panels compare at a glance, and shades
the fault periods. One colour has one meaning in every plot: :data:`PALETTE`.
:func:`draw_all` draws the five plots into the given folder and returns their paths.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from harness.report.load import PHASES, StoreData, classify
from harness.report.words import pct

# One colour, one meaning, in every plot (and the HTML's badges follow the same idea).
PALETTE: dict[str, str] = {
    "ok": "#2e9e44",  # answered
    "refused": "#d62728",  # refused: definitely not applied
    "timeout": "#f28e00",  # outcome unknown (timed out); orange means this and only this
    "majority": "#1f5fbf",  # the majority side (blues)
    "minority": "#7b3fa0",  # the minority side (purples)
    "fault": "#9aa3ad",  # fault shading (grey, drawn light)
    "unsupported": "#b0b0b0",  # not offered by the store (hatched / dashed, never "lost")
    "line": "#1d2433",  # percentile lines
}
OUTCOME = {"ok": "ok", "fail": "refused", "info": "timeout", "unsupported": "unsupported"}
LABELS = {
    "ok": "ok",
    "fail": "refused (not applied)",
    "info": "outcome unknown (timed out)",
    "unsupported": "not supported by the store",
}
FAULT_ALPHA = 0.22
STORE_TITLE = {"raft": "raft (CP)", "gossip": "gossip (AP)"}
DPI = 110


def color(kind: str) -> str:
    """The palette colour of an outcome (ok/fail/info/unsupported) or a palette name."""
    return PALETTE[OUTCOME.get(kind, kind)]


def side_colors(nodes: Sequence[str], node_side: Mapping[str, str]) -> dict[str, str]:
    """One colour per node: majority nodes in blues, minority nodes in purples."""
    out: dict[str, str] = {}
    for side, cmap in (("majority", "Blues"), ("minority", "Purples")):
        group = [n for n in nodes if node_side.get(n, "majority") == side]
        cm = matplotlib.colormaps[cmap]
        for i, n in enumerate(group):
            out[n] = matplotlib.colors.to_hex(cm(0.55 + 0.4 * (i / max(1, len(group) - 1))))
    return out


def _shade(ax: Axes, sd: StoreData, *, label: bool = True) -> None:
    for ep in sd.episodes:
        end = ep.end_s if ep.end_s is not None else sd.end_s
        ax.axvspan(ep.start_s, end, color=PALETTE["fault"], alpha=FAULT_ALPHA, lw=0, zorder=0)
        if label:
            ax.text(
                ep.start_s,
                1.0,
                f" {ep.label}",
                transform=ax.get_xaxis_transform(),
                va="top",
                ha="left",
                fontsize=8,
                color="#3a4250",
            )


def _fault_patch() -> Patch:
    return Patch(facecolor=PALETTE["fault"], alpha=FAULT_ALPHA * 2, label="fault in force")


def _stack(n: int, height: float = 2.6, *, sharey: bool = True) -> tuple[Figure, list[Axes]]:
    fig, axes = plt.subplots(
        n, 1, figsize=(11, 0.6 + height * n), sharex=True, sharey=sharey, squeeze=False, dpi=DPI
    )
    return fig, [a for row in axes for a in row]


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def _xmax(data: Mapping[str, StoreData]) -> float:
    return max((sd.end_s for sd in data.values()), default=1.0) * 1.02


def timeline(path: Path, data: Mapping[str, StoreData]) -> Path:
    """Every client operation as a bar from invoke to completion, one lane per client,
    grouped by node, coloured by outcome (not supported: dashed grey)."""
    fig, axes = _stack(len(data), height=3.0, sharey=False)
    for ax, (store, sd) in zip(axes, data.items(), strict=True):
        sc = (sd.results or {}).get("scenario") or {}
        n_clients = int(sc.get("clients_per_node") or 0) * int(sc.get("nodes") or 0)
        modulus = n_clients if n_clients > 0 else 1 << 62  # client index = process % clients
        lanes_of: dict[str, list[int]] = {}
        for op in sd.ops:
            if op.node is not None and isinstance(op.process, int):
                lanes = lanes_of.setdefault(op.node, [])
                if op.process % modulus not in lanes:
                    lanes.append(op.process % modulus)
        segs: dict[str, list[list[tuple[float, float]]]] = {k: [] for k in OUTCOME}
        min_w = _xmax(data) / 350  # fast operations stay visible
        nodes = [n for n in sd.nodes if n in lanes_of]
        y_of_node = {n: i for i, n in enumerate(nodes)}
        for op in sd.ops:
            if op.node not in y_of_node or not isinstance(op.process, int):
                continue
            lanes = sorted(lanes_of[op.node])
            width = 0.7 / len(lanes)
            y = y_of_node[op.node] - 0.35 + width * (lanes.index(op.process % modulus) + 0.5)
            start = op.invoke_time / 1e9
            end = sd.complete_s.get(op.index, sd.end_s)
            if math.isinf(end):
                end = sd.end_s
            end = max(end, start + min_w)
            segs[classify(op)].append([(start, y), (end, y)])
        for kind, lines in segs.items():
            if lines:
                ax.add_collection(
                    LineCollection(
                        lines,
                        colors=color(kind),
                        linewidths=1.5 if kind == "unsupported" else 3.0,
                        linestyles="dotted" if kind == "unsupported" else "solid",
                        zorder=2,
                    )
                )
        _shade(ax, sd)
        ax.set_ylim(-0.6, max(0.6, len(nodes) - 0.4))
        ax.set_yticks(range(len(nodes)))
        ax.set_yticklabels(
            [f"{n} ({sd.node_side[n]})" if n in sd.node_side else n for n in nodes], fontsize=8
        )
        for tick, n in zip(ax.get_yticklabels(), nodes, strict=True):
            if n in sd.node_side:
                tick.set_color(PALETTE[sd.node_side[n]])
        ax.invert_yaxis()
        ax.set_title(f"{STORE_TITLE.get(store, store)}: operations per node", loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel("seconds since start")
    axes[-1].set_xlim(0, _xmax(data))
    handles: list[Any] = [Patch(color=color(k), label=LABELS[k]) for k in ("ok", "fail", "info")]
    handles.append(
        Line2D([], [], color=color("unsupported"), ls=":", lw=1.5, label=LABELS["unsupported"])
    )
    handles.append(_fault_patch())
    fig.legend(handles=handles, loc="upper right", fontsize=7, ncol=5, framealpha=0.9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def latency(path: Path, data: Mapping[str, StoreData], summary: Mapping[str, Any]) -> Path:
    """Latency of every operation (log scale, the same range for both stores) at its invoke
    time, coloured by outcome; lines: ok p50 / p99 per bin. Operations a store does not
    offer are left out."""
    fig, axes = _stack(len(data))
    for ax, (store, sd) in zip(axes, data.items(), strict=True):
        pts: dict[str, tuple[list[float], list[float]]] = {
            k: ([], []) for k in ("ok", "fail", "info")
        }
        for op in sd.ops:
            end = sd.complete_s.get(op.index)
            kind = classify(op)
            if end is None or kind not in pts:
                continue
            t0 = op.invoke_time / 1e9
            xs, ys = pts[kind]
            xs.append(t0)
            ys.append(max(0.05, (end - t0) * 1000))
        for kind, (xs, ys) in pts.items():
            if xs:
                ax.scatter(
                    xs, ys, s=4, c=color(kind), alpha=0.55, lw=0, label=LABELS[kind], zorder=2
                )
        ts = summary["stores"][store]["series"]
        mid = [t + ts["bin_s"] / 2 for t in ts["t_s"]]
        for key, style in (("p50_ms", "-"), ("p99_ms", "--")):
            ys2 = [math.nan if v is None else v for v in ts[key]]
            ax.plot(mid, ys2, style, color=PALETTE["line"], lw=1.2, label=f"ok {key[:3]}", zorder=3)
        _shade(ax, sd)
        ax.set_yscale("log")
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"{STORE_TITLE.get(store, store)}: latency", loc="left")
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="upper right", fontsize=7, ncol=5, markerscale=3, framealpha=0.9)
    axes[-1].set_xlabel("seconds since start")
    axes[-1].set_xlim(0, _xmax(data))
    return _save(fig, path)


def throughput(path: Path, data: Mapping[str, StoreData], summary: Mapping[str, Any]) -> Path:
    """Operations per second by outcome (stacked: ok, refused, timed out), per bin of invoke
    time, the same scale for both stores. Operations the store does not offer are not
    stacked (they are not lost): the title says how many there were."""
    fig, axes = _stack(len(data))
    for ax, (store, sd) in zip(axes, data.items(), strict=True):
        ts = summary["stores"][store]["series"]
        x = ts["t_s"]
        keys = [k for k in ("ok", "fail", "info") if any(ts[f"{k}_per_s"])]
        if keys:
            ax.stackplot(
                x,
                *[ts[f"{k}_per_s"] for k in keys],
                colors=[color(k) for k in keys],
                labels=[LABELS[k] for k in keys],
                step="post",
                alpha=0.85,
                zorder=2,
            )
        title = f"{STORE_TITLE.get(store, store)}: throughput"
        unsupported = summary["stores"][store]["overall"]["unsupported"]
        if unsupported:
            title += (
                f"  ({unsupported:,} requests for operations this store does not offer, "
                "e.g. CAS, not shown: not a loss)"
            )
        _shade(ax, sd)
        ax.set_ylabel("ops/s")
        ax.set_title(title, loc="left", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=7, ncol=4, framealpha=0.9)
    axes[-1].set_xlabel("seconds since start")
    axes[-1].set_xlim(0, _xmax(data))
    return _save(fig, path)


def divergence(path: Path, data: Mapping[str, StoreData], summary: Mapping[str, Any]) -> Path:
    """Per node, the acknowledged writes it has not seen yet (harness.divergence), over
    time; majority nodes in blues, minority nodes in purples; the same scale for both."""
    fig, axes = _stack(len(data), height=2.4)
    for ax, (store, sd) in zip(axes, data.items(), strict=True):
        lag = summary["stores"][store]["lag"]
        colors = side_colors(list(lag["missing"]), sd.node_side)
        for node, ys in lag["missing"].items():
            side = sd.node_side.get(node)
            ax.step(
                lag["t_s"],
                ys,
                where="post",
                color=colors.get(node, PALETTE["line"]),
                lw=1.3,
                label=f"{node} ({side})" if side else node,
                zorder=2,
            )
        if not lag["t_s"]:
            ax.text(
                0.5,
                0.5,
                "not measured (digests.jsonl has no per-node view of the writes)",
                transform=ax.transAxes,
                ha="center",
                va="center",
                fontsize=9,
                color="#5b6577",
            )
        _shade(ax, sd)
        ax.set_ylim(bottom=0)
        ax.set_ylabel("writes not yet seen")
        ax.set_title(
            f"{STORE_TITLE.get(store, store)}: acknowledged writes each replica has not seen",
            loc="left",
        )
        ax.grid(alpha=0.3)
        if lag["missing"]:
            ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=7, frameon=False)
    axes[-1].set_xlabel("seconds since start")
    axes[-1].set_xlim(0, _xmax(data))
    return _save(fig, path)


def availability(path: Path, summary: Mapping[str, Any], stores: Sequence[str]) -> Path:
    """Availability by phase (before / during / after) and side (majority / minority)."""
    fig, axes = plt.subplots(
        1, len(stores), figsize=(5.5 * len(stores), 3.4), squeeze=False, sharey=True, dpi=DPI
    )
    side_color = {
        "majority": PALETTE["majority"],
        "minority": PALETTE["minority"],
        "all": "#7f7f7f",
    }
    for ax, store in zip(axes[0], stores, strict=True):
        s = summary["stores"][store]
        groups = ["majority", "minority"] if s["node_sides"] else ["all"]
        width = 0.8 / len(groups)
        for j, side in enumerate(groups):
            xs, ys = [], []
            for i, phase in enumerate(PHASES):
                c = s["phases"][phase].get(side)
                if c is None or c.get("availability") is None:
                    continue
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(c["availability"] * 100)
            bars = ax.bar(xs, ys, width * 0.9, color=side_color[side], label=side)
            for b, y in zip(bars, ys, strict=True):
                ax.text(
                    b.get_x() + b.get_width() / 2, y + 1.5, pct(y / 100), ha="center", fontsize=8
                )
        ax.set_xticks(range(len(PHASES)))
        ax.set_xticklabels(["before fault", "during fault", "after heal"])
        ax.set_ylim(0, 132)
        ax.set_yticks([0, 20, 40, 60, 80, 100])
        ax.set_ylabel("answered ok (%)")
        ax.set_title(f"{STORE_TITLE.get(store, store)}: availability", loc="left")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(
            loc="upper center",
            fontsize=8,
            ncol=len(groups),
            frameon=False,
            title="side of the client's node",
            title_fontsize=7,
        )
    return _save(fig, path)


def draw_all(
    out: Path, data: Mapping[str, StoreData], summary: Mapping[str, Any], *, suffix: str = ""
) -> dict[str, Path]:
    """Draw every plot of the report into ``out`` (``<name><suffix>.png``); name -> path."""
    return {
        "timeline": timeline(out / f"timeline{suffix}.png", data),
        "latency": latency(out / f"latency{suffix}.png", data, summary),
        "throughput": throughput(out / f"throughput{suffix}.png", data, summary),
        "divergence": divergence(out / f"divergence{suffix}.png", data, summary),
        "availability": availability(out / f"availability{suffix}.png", summary, list(data)),
    }
