"""``caplab demo``: the canonical CAP experiment on both stores, side by side, with a live
progress display, a side-by-side table at the end and the HTML report.

Theory of operation
-------------------
The runner (:func:`harness.runner.run_scenario`, store ``both``) runs in the main thread, so
Ctrl-C and SIGTERM reach it and it stops every node before returning. The runner has no
progress hook, so a :class:`Watcher` thread tails the files it writes: each store's
``history.jsonl`` (flushed every ~200 ms) gives operations per second (completions in the
last second of history time), ok/fail/info counts and the nemesis actions (the fault in
force); the phase follows from the elapsed time and those actions. Rendering uses a
``rich.live.Live`` display on a terminal and a plain line every few seconds otherwise.

When the run is over, :func:`harness.report.build_report` writes the report into the output
folder; the side-by-side table and the verdict (two columns: what CP gave up, what AP gave
up) are printed within 100 columns. The previous report in the folder stays until the new
one is complete (the report is written under temporary names and renamed into place); the
previous run's ``results.json`` goes at once, so an interrupted run is never mistaken for a
finished one (on Ctrl-C ``results.json`` says ``"status": "interrupted"``; ``caplab report``
then labels the report INTERRUPTED). Exit code: 0, also when a store gave up availability
or consistency as designed; 1 when a checker found a real violation (raft not linearizable,
increments lost, replicas not converged) or the run failed; 2 on usage errors; 130 when
interrupted.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import json
import random
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from harness.scenario import Scenario, ScenarioError, load_scenario, parse_duration

if TYPE_CHECKING:  # harness.report (matplotlib, hdrh) loads only when a demo runs
    from harness.report import Report

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SCENARIO = ROOT / "scenarios" / "majority-minority.yaml"
STORES = ("raft", "gossip")
WIDTH = 100  # the final printout fits in this many columns


class DemoUsageError(ValueError):
    """Bad demo arguments; exit code 2."""


# -- arguments ----------------------------------------------------------------------------
def parse_seconds(text: str) -> float:
    """``60`` / ``60s`` / ``1m`` / ``500ms`` -> seconds (positive; ValueError otherwise)."""
    t = text.strip()
    try:
        v = float(t)
    except ValueError:
        v = parse_duration(t)
    if not v > 0:
        raise ValueError(f"duration must be positive, got {text!r}")
    return v


def demo_scenario(path: Path, nodes: int | None, duration: float | None) -> Scenario:
    """Load ``path`` and apply ``--nodes`` / ``--duration`` (DemoUsageError when the
    result is not runnable)."""
    try:
        sc = load_scenario(path)
    except ScenarioError as e:
        raise DemoUsageError(str(e)) from None
    if nodes is not None:
        if not 3 <= nodes <= 15:
            raise DemoUsageError("--nodes must be between 3 and 15 (a partition needs a minority)")
        sc = dataclasses.replace(sc, nodes=nodes)
        _check_faults(sc)
    if duration is not None:
        sc = sc.with_duration(duration)
    return dataclasses.replace(sc, store="both")


def _check_faults(sc: Scenario) -> None:
    from harness.nemesis import make_partition

    ids = set(sc.node_ids)
    for f in sc.faults:
        named = [n for g in (f.groups or ()) for n in g]
        if f.target and f.target.startswith("n") and f.target[1:].isdigit():
            named.append(f.target)
        unknown = sorted(set(named) - ids)
        if unknown:
            raise DemoUsageError(
                f"{sc.path}: fault at {f.at:g}s names node(s) {', '.join(unknown)}, "
                f"but --nodes {sc.nodes} only has {', '.join(sc.node_ids)}"
            )
        if f.action == "partition" and f.shape is not None:
            try:
                make_partition(
                    f.shape, sc.node_ids, random.Random(0), groups=f.groups, node=sc.node_ids[0]
                )
            except ValueError as e:
                raise DemoUsageError(f"{sc.path}: {e} (with --nodes {sc.nodes})") from None


# -- watching the run -------------------------------------------------------------------
class HistoryTail:
    """Reads the complete JSON lines appended to a file since the last :meth:`poll`
    (a missing file yields nothing; a file that shrank is read again from the start)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self._partial = b""

    def poll(self) -> list[dict[str, Any]]:
        try:
            size = self.path.stat().st_size
        except OSError:
            return []
        if size < self.offset:
            self.offset, self._partial = 0, b""
        if size == self.offset:
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read(size - self.offset)
        self.offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        out: list[dict[str, Any]] = []
        for raw in lines:
            if raw.strip():
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError:
                    continue
                if isinstance(obj, dict):
                    out.append(obj)
        return out


@dataclasses.dataclass(slots=True)
class StoreProgress:
    """Live figures of one store, from its history events."""

    store: str
    ok: int = 0
    fail: int = 0
    info: int = 0
    last_time_s: float = 0.0
    fault: str | None = None  # the fault in force, in words
    faults_seen: int = 0
    healed_at_s: float | None = None
    final_reads: bool = False  # the runner's final reads began (the clients have stopped)
    recent: collections.deque[float] = dataclasses.field(
        default_factory=collections.deque
    )  # completion times (s) of the last second

    def feed(self, ev: dict[str, Any]) -> None:
        t = float(ev.get("time", 0)) / 1e9
        self.last_time_s = max(self.last_time_s, t)
        kind = ev.get("type")
        if ev.get("process") == "nemesis":
            if kind == "ok":
                self._nemesis(str(ev.get("f")), ev.get("value"), t)
            return
        proc = ev.get("process")
        if isinstance(proc, int) and proc >= 1_000_000:
            self.final_reads = True
            return
        if not isinstance(proc, int) or kind == "invoke":
            return
        err = str(ev.get("error") or "")
        if kind == "fail" and err.startswith("FAILED_PRECONDITION"):
            return  # an operation the store does not offer (CAS on gossip): not counted
        if kind == "ok" or (kind == "fail" and err.startswith("compare")):
            self.ok += 1  # a failed compare is an answer
        elif kind == "fail":
            self.fail += 1
        else:
            self.info += 1
        self.recent.append(t)

    def _nemesis(self, f: str, value: object, t: float) -> None:
        desc = value if isinstance(value, dict) else {}
        if f == "partition":
            sides = desc.get("sides") or {}
            minority = sorted(n for n, s in sides.items() if s == "minority")
            self.fault = f"partition {desc.get('shape', '')}".strip()
            if minority:
                self.fault += f" (minority: {', '.join(minority)})"
            self.faults_seen += 1
        elif f in ("kill", "pause"):
            self.fault = f"{f} {', '.join(map(str, desc.get('nodes') or []))}"
            self.faults_seen += 1
        elif f == "clock-skew" and desc.get("skew_ms"):
            self.fault = f"clock skew {desc.get('skew_ms')} ms"
            self.faults_seen += 1
        elif f in ("heal", "restart", "resume", "clock-skew"):
            self.fault = None
            self.healed_at_s = t

    def ops_per_s(self, now_s: float | None = None) -> float:
        """Completions per second over the last second before ``now_s`` (default: the
        latest history time)."""
        now = self.last_time_s if now_s is None else max(now_s, self.last_time_s)
        while self.recent and self.recent[0] < now - 1.0:
            self.recent.popleft()
        return float(len(self.recent))


class Watcher:
    """Tails both stores' histories under ``out`` and renders the progress."""

    def __init__(self, out: Path, scenario: Scenario, clock: Callable[[], float] = time.monotonic):
        self.out = out
        self.scenario = scenario
        self.clock = clock
        self.started = clock()
        self.t0: float | None = None  # wall time when the first history appeared
        self.tails = {s: HistoryTail(out / s / "history.jsonl") for s in scenario.stores}
        self.stores = {s: StoreProgress(s) for s in scenario.stores}
        self.finished = False
        self.reporting = False

    def poll(self) -> None:
        for store, tail in self.tails.items():
            events = tail.poll()
            if events and self.t0 is None:
                self.t0 = self.clock() - float(events[0].get("time", 0)) / 1e9
            for ev in events:
                self.stores[store].feed(ev)

    @property
    def elapsed(self) -> float:
        return 0.0 if self.t0 is None else self.clock() - self.t0

    def phase(self) -> str:
        """What the run is doing, always starting with one of: ``starting nodes``,
        ``running``, ``checking``, ``writing the report``."""
        if self.reporting:
            return "writing the report"
        if self.t0 is None:
            waited = self.clock() - self.started
            return (
                f"starting nodes: {len(self.stores)} x {self.scenario.nodes}, waiting for "
                f"them to accept writes ({waited:.0f} s)"
            )
        if any(p.final_reads for p in self.stores.values()):
            return "checking: final reads, then the checkers"
        if self.elapsed >= self.scenario.duration:
            return "checking: clients stopped; healing, waiting for the replicas to converge"
        faults = [p.fault for p in self.stores.values() if p.fault]
        if faults:
            return f"running: fault in force: {faults[0]}"
        if any(p.healed_at_s is not None for p in self.stores.values()):
            return "running: healed, replicas catching up"
        return "running: no fault yet"

    def render(self) -> Group:
        sc = self.scenario
        head = Text.assemble(
            ("caplab demo ", "bold"),
            f"{sc.name}: ",
            (self.phase(), "bold yellow"),
            f"   elapsed {min(self.elapsed, 9999):5.1f} s / {sc.duration:g} s",
        )
        table = Table(box=None, pad_edge=False)
        for col in ("store", "ops/s", "ok", "fail", "info", "fault in force"):
            table.add_column(
                col, justify="right" if col in ("ops/s", "ok", "fail", "info") else "left"
            )
        for p in self.stores.values():
            table.add_row(
                p.store,
                f"{p.ops_per_s(self.elapsed):.0f}",
                str(p.ok),
                f"[red]{p.fail}[/]" if p.fail else "0",
                f"[yellow]{p.info}[/]" if p.info else "0",
                p.fault or "-",
            )
        return Group(head, table)

    def line(self) -> str:
        """Two short lines (within 100 columns): the phase, then the stores' figures."""
        stores = " | ".join(
            f"{p.store}: {p.ops_per_s(self.elapsed):.0f} ops/s ok={p.ok} fail={p.fail} "
            f"info={p.info}"
            for p in self.stores.values()
        )
        return f"[{self.elapsed:5.1f}s] {self.phase()}\n          {stores}"


class _Display(threading.Thread):
    """Polls the watcher every ``interval`` s and shows it (Live on a terminal)."""

    def __init__(self, watcher: Watcher, console: Console, interval: float = 0.5) -> None:
        super().__init__(name="caplab-demo-progress", daemon=True)
        self.watcher = watcher
        self.console = console
        self.interval = interval
        self.stop = threading.Event()

    def run(self) -> None:
        w = self.watcher
        if self.console.is_terminal:
            with Live(
                w.render(), console=self.console, refresh_per_second=4, transient=False
            ) as live:
                while not self.stop.wait(self.interval):
                    w.poll()
                    live.update(w.render())
                w.poll()
                live.update(w.render())
            return
        last_phase, last_print = "", 0.0
        while not self.stop.wait(self.interval):
            w.poll()
            phase = w.phase()
            now = w.clock()
            what = phase.split(" (")[0]  # not the counter of seconds waited
            if what != last_phase or now - last_print >= 5.0:
                self.console.print(w.line(), highlight=False, soft_wrap=True)
                last_phase, last_print = what, now


# -- the command ----------------------------------------------------------------------------
def clean_out(out: Path) -> None:
    """Remove what a previous run left in ``out`` that would be mistaken for this run's:
    the store folders (the runner replaces them anyway) and ``results.json``. The previous
    report (report.html, summary.json, plots) stays until the new one replaces it."""
    for s in STORES:
        if (out / s).is_dir():
            shutil.rmtree(out / s)
    (out / "results.json").unlink(missing_ok=True)


def mark_unfinished(out: Path, status: str = "interrupted") -> None:
    """Say in ``results.json`` that the run did not finish (``interrupted`` or ``failed``),
    unless the runner already did."""
    path = out / "results.json"
    if not path.exists():
        with contextlib.suppress(OSError):
            path.write_text(json.dumps({"status": status}) + "\n", encoding="utf-8")


def side_by_side(report: Report, width: int = WIDTH) -> Table:
    """The final table: one column per store (fits in ``width`` <= :data:`WIDTH` columns)."""
    from harness.report import key_rows

    summary = report.summary
    width = min(width, WIDTH)
    table = Table(title="caplab demo: side by side", title_justify="left", width=width)
    table.add_column("", ratio=9, overflow="fold")
    for s in summary["stores"]:
        table.add_column(s, ratio=8, overflow="fold")
    for label, cells in key_rows(summary):
        styled = [f"[bold red]{c}[/]" if c.startswith("VIOLATION") else c for c in cells]
        table.add_row(label, *styled)
    return table


def verdict_block(report: Report, width: int = WIDTH) -> Group:
    """The verdict: headline, violations first (red), one column per store (fits in
    ``width`` <= :data:`WIDTH` columns)."""
    width = min(width, WIDTH)
    parts = report.summary["verdict_parts"]
    style = {"violation": "bold red", "ok": "bold green"}.get(parts["status"], "bold yellow")
    items: list[Any] = [Text(parts["headline"], style=style)]
    if parts["note"]:
        items.append(Text(parts["note"], style="yellow"))
    for v in parts["violations"]:
        items.append(Text(f"- {v}", style="bold red"))
    cols = Table.grid(padding=(0, 2), expand=False)
    cells = []
    for col in parts["columns"]:
        cols.add_column(width=width // max(1, len(parts["columns"])) - 2, overflow="fold")
        lines = "\n".join(f"- {x}" for x in col["lines"])
        cells.append(Text.assemble((col["title"], "bold"), "\n", lines))
    if cells:
        cols.add_row(*cells)
        items.append(cols)
    return Group(*items)


def run_demo(
    scenario: Scenario,
    out: Path,
    console: Console,
    runner: Callable[[Scenario, str, Path], Any] | None = None,
) -> int:
    """Run ``scenario`` on both stores into ``out``, show progress, build the report."""
    from harness.report import ReportError, build_report

    if runner is None:
        from harness.runner import run_scenario

        runner = run_scenario
    out.mkdir(parents=True, exist_ok=True)
    clean_out(out)
    console.print(
        f"[bold]caplab demo[/]: {scenario.name} on raft and gossip, {scenario.nodes} nodes each, "
        f"{scenario.duration:g} s of workload; output in {out.resolve()}"
    )
    if scenario.description:
        console.print(f"  {scenario.description}", highlight=False)
    watcher = Watcher(out, scenario)
    display = _Display(watcher, console)
    display.start()
    started = time.monotonic()
    try:
        runner(scenario, "both", out)
        watcher.reporting = True
        report = build_report(out)
    except KeyboardInterrupt:
        display.stop.set()
        display.join()
        mark_unfinished(out, "interrupted")
        console.print(
            "[red]interrupted; every node was stopped[/] (the previous report, if any, is "
            f"unchanged; `caplab report {out}` shows what was recorded)",
            highlight=False,
        )
        return EXIT_INTERRUPTED
    except (RuntimeError, TimeoutError, OSError, ReportError) as e:
        display.stop.set()
        display.join()
        mark_unfinished(out, "failed")
        console.print(f"[red]caplab demo: the run failed: {e}[/]", highlight=False)
        return EXIT_FAILED
    display.stop.set()
    display.join()
    console.print(side_by_side(report, console.width))
    console.print(verdict_block(report, console.width))
    console.print(
        f"report: {report.html_path.resolve()}  ({time.monotonic() - started:.0f} s in all)",
        highlight=False,
        soft_wrap=True,
    )
    if not report.valid:
        console.print("[bold red]a checker found a violation (see the report)[/]")
        return EXIT_FAILED
    return EXIT_OK


def add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="both stores side by side through a partition; live progress and a report"
    )
    p.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    p.add_argument("--nodes", type=int, default=None, help="nodes per store (default: 5)")
    p.add_argument(
        "--duration", default=None, metavar="SECONDS", help="workload duration (e.g. 60, 20s)"
    )
    p.add_argument(
        "--scenario",
        default=str(DEFAULT_SCENARIO),
        metavar="FILE",
        help="scenario file (default: scenarios/majority-minority.yaml)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS between the nodes (default: mutual TLS, certificates made in OUT)",
    )
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    console = Console()
    try:
        duration = None if args.duration is None else parse_seconds(args.duration)
        scenario = demo_scenario(Path(args.scenario), args.nodes, duration)
    except (ValueError, DemoUsageError) as e:
        console.print(f"caplab: error: {e}", style="red", highlight=False)
        return EXIT_USAGE
    runner = None
    if args.insecure:
        from harness.runner import run_scenario

        runner = functools.partial(run_scenario, secure=False)
    return run_demo(scenario, Path(args.out), console, runner)


def main(argv: Sequence[str] | None = None) -> int:  # pragma: no cover - convenience
    from caplab.cli import main as cli_main

    return cli_main(["demo", *(argv or [])])


def _add_report(sub: Any) -> None:
    from harness.report import add_report

    add_report(sub)


REGISTRARS = [add_demo, _add_report]
