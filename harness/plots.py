"""Jepsen-style plots of a run (matplotlib, Agg backend, PNG files).

Every plot puts both stores one above the other on the run's single time axis (seconds
since the common t0) and shades the fault periods. :func:`draw_all` draws the five plots
of the report into the run folder and returns their paths by name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.patches import Patch

if TYPE_CHECKING:
    from harness.report import StoreData

COLORS = {"ok": "#2e9e44", "fail": "#d62728", "info": "#ff9f1c", "unsupported": "#b0b0b0"}
LABELS = {
    "ok": "ok",
    "fail": "fail (refused, not applied)",
    "info": "info (outcome unknown / timeout)",
    "unsupported": "not supported by the store",
}
FAULT_COLOR = "#f4a6a6"
STORE_TITLE = {"raft": "raft (CP)", "gossip": "gossip (AP)"}
DPI = 110


def _shade(ax: Axes, sd: StoreData, *, label: bool = True) -> None:
    for ep in sd.episodes:
        end = ep.end_s if ep.end_s is not None else sd.end_s
        ax.axvspan(ep.start_s, end, color=FAULT_COLOR, alpha=0.35, lw=0, zorder=0)
        if label:
            ax.text(
                ep.start_s,
                1.0,
                f" {ep.label}",
                transform=ax.get_xaxis_transform(),
                va="top",
                ha="left",
                fontsize=8,
                color="#8b1a1a",
            )


def _fault_patch() -> Patch:
    return Patch(facecolor=FAULT_COLOR, alpha=0.6, label="fault in force")


def _stack(n: int, height: float = 2.6) -> tuple[Figure, list[Axes]]:
    fig, axes = plt.subplots(
        n, 1, figsize=(11, 0.6 + height * n), sharex=True, squeeze=False, dpi=DPI
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
    grouped by node, coloured ok / fail / info."""
    from harness.report import classify

    fig, axes = _stack(len(data), height=3.0)
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
        segs: dict[str, list[list[tuple[float, float]]]] = {k: [] for k in COLORS}
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
                    LineCollection(lines, colors=COLORS[kind], linewidths=3.0, zorder=2)
                )
        _shade(ax, sd)
        ax.set_ylim(-0.6, max(0.6, len(nodes) - 0.4))
        ax.set_yticks(range(len(nodes)))
        ax.set_yticklabels(
            [f"{n} ({sd.node_side[n]})" if n in sd.node_side else n for n in nodes],
            fontsize=8,
        )
        ax.invert_yaxis()
        ax.set_title(f"{STORE_TITLE.get(store, store)}: operations per node", loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel("seconds since start")
    axes[-1].set_xlim(0, _xmax(data))
    handles = [Patch(color=COLORS[k], label=LABELS[k]) for k in COLORS] + [_fault_patch()]
    axes[0].legend(
        handles=handles,
        loc="upper right",
        fontsize=7,
        ncol=5,
        framealpha=0.9,
        bbox_to_anchor=(1.0, 1.32),
    )
    return _save(fig, path)


def latency(path: Path, data: Mapping[str, StoreData], summary: Mapping[str, Any]) -> Path:
    """Latency of every operation (log scale) at its invoke time, coloured by outcome;
    info ops are drawn at the time they gave up. Lines: ok p50 / p99 per bin."""
    from harness.report import classify

    fig, axes = _stack(len(data))
    for ax, (store, sd) in zip(axes, data.items(), strict=True):
        pts: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in COLORS}
        for op in sd.ops:
            end = sd.complete_s.get(op.index)
            if end is None:
                continue
            t0 = op.invoke_time / 1e9
            xs, ys = pts[classify(op)]
            xs.append(t0)
            ys.append(max(0.05, (end - t0) * 1000))
        for kind, (xs, ys) in pts.items():
            if xs:
                ax.scatter(
                    xs, ys, s=4, c=COLORS[kind], alpha=0.55, lw=0, label=LABELS[kind], zorder=2
                )
        ts = summary["stores"][store]["series"]
        mid = [t + ts["bin_s"] / 2 for t in ts["t_s"]]
        for key, style in (("p50_ms", "-"), ("p99_ms", "--")):
            ys2 = [math.nan if v is None else v for v in ts[key]]
            ax.plot(mid, ys2, style, color="#1f3b73", lw=1.2, label=f"ok {key[:3]}", zorder=3)
        _shade(ax, sd)
        ax.set_yscale("log")
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"{STORE_TITLE.get(store, store)}: latency", loc="left")
        ax.grid(alpha=0.3, which="both")
    axes[-1].set_xlabel("seconds since start")
    axes[-1].set_xlim(0, _xmax(data))
    axes[0].legend(loc="upper right", fontsize=7, ncol=3, markerscale=3, framealpha=0.9)
    return _save(fig, path)


def throughput(path: Path, data: Mapping[str, StoreData], summary: Mapping[str, Any]) -> Path:
    """Operations per second by outcome (stacked), per bin of invoke time."""

    fig, axes = _stack(len(data))
    for ax, (store, sd) in zip(axes, data.items(), strict=True):
        ts = summary["stores"][store]["series"]
        x = ts["t_s"]
        keys = [k for k in ("ok", "fail", "info", "unsupported") if any(ts[f"{k}_per_s"])]
        ax.stackplot(
            x,
            *[ts[f"{k}_per_s"] for k in keys],
            colors=[COLORS[k] for k in keys],
            labels=[LABELS[k] for k in keys],
            step="post",
            alpha=0.85,
            zorder=2,
        )
        _shade(ax, sd)
        ax.set_ylabel("ops/s")
        ax.set_title(f"{STORE_TITLE.get(store, store)}: throughput", loc="left")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=7, ncol=4, framealpha=0.9)
    axes[-1].set_xlabel("seconds since start")
    axes[-1].set_xlim(0, _xmax(data))
    return _save(fig, path)


def divergence(path: Path, data: Mapping[str, StoreData]) -> Path:
    """Distinct replica digests per sample (1 = all replicas hold the same state)."""
    from harness.report import distinct

    fig, axes = _stack(len(data), height=2.2)
    for ax, (store, sd) in zip(axes, data.items(), strict=True):
        t = [s["time_ns"] / 1e9 for s in sd.samples]
        d = [distinct(s) for s in sd.samples]
        miss = [sum(1 for v in s["digests"].values() if v is None) for s in sd.samples]
        if t:
            ax.step(t, d, where="post", color="#1f3b73", lw=1.3, label="distinct digests")
            if any(miss):
                ax.step(
                    t,
                    miss,
                    where="post",
                    color="#999999",
                    lw=1,
                    ls=":",
                    label="nodes not answering",
                )
        _shade(ax, sd)
        ax.set_ylim(0, max(2, len(sd.nodes)) + 0.5)
        ax.set_ylabel("distinct states")
        ax.set_title(
            f"{STORE_TITLE.get(store, store)}: replica divergence (1 = all agree)", loc="left"
        )
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=7)
    axes[-1].set_xlabel("seconds since start")
    axes[-1].set_xlim(0, _xmax(data))
    return _save(fig, path)


def availability(path: Path, summary: Mapping[str, Any], stores: Sequence[str]) -> Path:
    """Availability by phase (before / during / after) and side (majority / minority)."""
    from harness.report import PHASES, SIDES

    fig, axes = plt.subplots(
        1, len(stores), figsize=(5.5 * len(stores), 3.4), squeeze=False, dpi=DPI
    )
    side_color = {"majority": "#1f77b4", "minority": "#ff7f0e", "all": "#7f7f7f"}
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
                    b.get_x() + b.get_width() / 2, y + 1.5, f"{y:.0f}%", ha="center", fontsize=8
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
        _ = SIDES
    return _save(fig, path)


def draw_all(
    out: Path, data: Mapping[str, StoreData], summary: Mapping[str, Any]
) -> dict[str, Path]:
    """Draw every plot of the report into ``out``; name -> path."""
    return {
        "timeline": timeline(out / "timeline.png", data),
        "latency": latency(out / "latency.png", data, summary),
        "throughput": throughput(out / "throughput.png", data, summary),
        "divergence": divergence(out / "divergence.png", data),
        "availability": availability(out / "availability.png", summary, list(data)),
    }
