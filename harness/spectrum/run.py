"""``caplab spectrum --out DIR``: run the spectrum scenario on both stores, then the report.

The scenario (default ``scenarios/spectrum.yaml``) gives every read level its clients on
one cluster per store, so that all levels live through the same partition at the same
moment. ``--nodes`` / ``--duration`` / ``--short`` rebuild the fault timeline for the new
size: the last ``(nodes - 1) // 2`` nodes (a strict minority) run their clocks 2 s behind
for the whole run and are cut off from 30% to 75% of the duration. ``--short`` (3 nodes,
14 s) is the form ``make test`` runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from harness.report.load import ReportError
from harness.scenario import Fault, Scenario, ScenarioError, load_scenario
from harness.spectrum import SpectrumReport, build_spectrum_report
from harness.spectrum.render import CHECKER_ABBREV, LEGEND
from harness.spectrum.verdict import LEVEL_NAMES, plain

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SCENARIO = ROOT / "scenarios" / "spectrum.yaml"
EXIT_OK, EXIT_BROKEN, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
SHORT_NODES, SHORT_DURATION = 3, 14.0
SKEW_MS = -2000


class SpectrumUsageError(ValueError):
    """Bad arguments; exit code 2."""


def timeline(nodes: int, duration: float) -> tuple[Fault, ...]:
    """The spectrum's faults for ``nodes`` nodes and ``duration`` s (module docstring)."""
    ids = [f"n{i + 1}" for i in range(nodes)]
    cut = (nodes - 1) // 2  # a strict minority
    groups = (tuple(ids[: nodes - cut]), tuple(ids[nodes - cut :]))
    start, end = round(0.3 * duration, 1), round(0.75 * duration, 1)
    skews = tuple(Fault(0.0, "clock-skew", target=n, skew_ms=SKEW_MS) for n in groups[1])
    return (
        *skews,
        Fault(start, "partition", shape="groups", groups=groups),
        Fault(end, "heal"),
    )


def spectrum_scenario(
    path: Path, *, nodes: int | None, duration: float | None, short: bool, seed: int | None
) -> Scenario:
    try:
        sc = load_scenario(path)
    except ScenarioError as e:
        raise SpectrumUsageError(str(e)) from None
    if not sc.read_levels:
        raise SpectrumUsageError(f"{path}: no read_levels: nothing to compare")
    if short:
        nodes = nodes or SHORT_NODES
        duration = duration or SHORT_DURATION
    if nodes is not None or duration is not None:
        n = nodes or sc.nodes
        if not 3 <= n <= 15:
            raise SpectrumUsageError(
                "--nodes must be between 3 and 15 (a partition needs a minority)"
            )
        d = duration or sc.duration
        if d < 6:
            raise SpectrumUsageError("--duration must be at least 6 s (before, during, after)")
        faults = timeline(n, d)
        part, heal = faults[-2], faults[-1]
        minority = ", ".join((part.groups or ((), ()))[1])
        sc = dataclasses.replace(
            sc,
            nodes=n,
            duration=d,
            faults=faults,
            description=f"{len(sc.read_levels)} read levels; {minority}: clocks 2 s behind, "
            f"cut off {part.at:g}-{heal.at:g} s.",
        )
    if seed is not None:
        sc = dataclasses.replace(sc, seed=seed)
    return dataclasses.replace(sc, store="both")


def terminal_table(report: SpectrumReport) -> Table:
    """One row per (level, store): promise, minority availability, staleness, anomalies."""
    m = report.matrix
    t = Table(title="the consistency spectrum, measured", show_lines=False)
    for name, justify in (
        ("guarantee", "left"),
        ("store", "left"),
        ("promise", "left"),
        ("minority: sticky / roaming", "right"),
        ("stale max", "right"),
        ("anomalies (permitted)", "left"),
    ):
        t.add_column(name, justify=justify)  # type: ignore[arg-type]
    for lv in m.levels:
        for i, s in enumerate(m.stores):
            c = m.cells[s][lv]
            name = LEVEL_NAMES[lv] if i == 0 else ""
            if not c.offered:
                t.add_row(name, s, "[dim]refused[/]", "", "", "")
                continue
            promise = {True: "[green]kept[/]", False: "[red]BROKEN[/]", None: "[yellow]?[/]"}[
                c.kept
            ]
            found = " ".join(f"{CHECKER_ABBREV[k]} {c.anomalies[k].count}" for k in c.permitted)
            minority = c.availability.get("minority", {})
            share = " / ".join(
                f"{100 * a.ok / a.total:.0f}%" if (a := minority.get(k)) and a.total else "-"
                for k in ("sticky", "roaming")
            )
            st = c.staleness
            stale = "-" if st is None else f"{st.max_ms / 1000:.1f} s"
            t.add_row(name, s, promise, share, stale, found or "none")
    t.caption = LEGEND
    return t


def run_spectrum(
    scenario: Scenario,
    out: Path,
    console: Console,
    runner: Callable[[Scenario, str, Path], Any] | None = None,
) -> int:
    from harness.demo import clean_out, mark_unfinished

    if runner is None:
        from harness.runner import run_scenario

        runner = run_scenario
    out.mkdir(parents=True, exist_ok=True)
    clean_out(out)
    started = time.monotonic()
    console.print(
        f"[bold]caplab spectrum[/]: {len(scenario.read_levels)} read levels on raft and gossip, "
        f"{scenario.nodes} nodes each, {scenario.duration:g} s; output in {out.resolve()}",
        highlight=False,
    )
    for f in scenario.faults:
        console.print(f"  {f.describe()}", highlight=False)
    try:
        console.print("running ...")
        runner(scenario, "both", out)
        console.print("checking every level against every guarantee ...")
        report = build_spectrum_report(out)
    except KeyboardInterrupt:
        mark_unfinished(out, "interrupted")
        console.print("[red]interrupted; every node was stopped[/]")
        return EXIT_INTERRUPTED
    except (RuntimeError, TimeoutError, OSError, ReportError) as e:
        mark_unfinished(out, "failed")
        console.print(f"[red]caplab spectrum: the run failed: {e}[/]", highlight=False)
        return EXIT_BROKEN
    console.print(terminal_table(report))
    console.print(plain(report.verdict, report.matrix.stores), highlight=False, soft_wrap=True)
    console.print(
        f"report: {report.html_path.resolve()}  ({time.monotonic() - started:.0f} s in all)",
        highlight=False,
        soft_wrap=True,
    )
    return EXIT_OK if report.verdict.ok else EXIT_BROKEN


def add_spectrum(sub: Any) -> None:
    p = sub.add_parser(
        "spectrum",
        help="every read guarantee on both stores through one partition: Terry's Table 2, measured",
    )
    p.add_argument("--out", default="spectrum-out", help="output folder (default: spectrum-out)")
    p.add_argument(
        "--scenario",
        default=str(DEFAULT_SCENARIO),
        metavar="FILE",
        help="scenario file (default: scenarios/spectrum.yaml)",
    )
    p.add_argument("--nodes", type=int, default=None, help="nodes per store (default: 5)")
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="SECONDS",
        help="workload duration in seconds (default: the scenario's, 32)",
    )
    p.add_argument(
        "--short",
        action="store_true",
        help=f"{SHORT_NODES} nodes, {SHORT_DURATION:g} s (the form `make test` runs)",
    )
    p.add_argument("--seed", type=int, default=None, help="workload seed (default: the file's)")
    p.add_argument(
        "--insecure", action="store_true", help="no TLS between the nodes (default: mutual TLS)"
    )
    p.set_defaults(func=_cmd_spectrum)


def _cmd_spectrum(args: argparse.Namespace) -> int:
    import functools

    console = Console()
    try:
        sc = spectrum_scenario(
            Path(args.scenario),
            nodes=args.nodes,
            duration=args.duration,
            short=args.short,
            seed=args.seed,
        )
    except SpectrumUsageError as e:
        console.print(f"caplab: error: {e}", style="red", highlight=False)
        return EXIT_USAGE
    runner = None
    if args.insecure:
        from harness.runner import run_scenario

        runner = functools.partial(run_scenario, secure=False)
    return run_spectrum(sc, Path(args.out), console, runner)


REGISTRARS = [add_spectrum]
