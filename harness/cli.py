"""Harness subcommands of the ``caplab`` CLI: ``run`` and ``check``.

``caplab/cli.py`` calls every function of :data:`REGISTRARS` with its subparsers object.
Exit codes: 0 ok; 1 a checker found a violation, or the run failed (one line, no
traceback); 2 usage (bad arguments, invalid scenario file).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _err(msg: str) -> None:
    print(f"caplab: {msg}", file=sys.stderr)


# -- run ----------------------------------------------------------------------------
def add_run(sub: Any) -> None:
    p = sub.add_parser(
        "run", help="run a scenario (faults + workload) against one or both stores and check it"
    )
    p.add_argument("scenario", metavar="SCENARIO.yaml")
    p.add_argument(
        "--store", choices=["raft", "gossip", "both"], default=None, help="default: the file's"
    )
    p.add_argument("--out", default=None, help="output directory (default: runs/NAME-TIME)")
    p.add_argument(
        "--duration", default=None, help="override the scenario's duration (e.g. 20s, 1m)"
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS between the nodes (default: mutual TLS, certificates made in OUT)",
    )
    p.set_defaults(func=_cmd_run)


def _fmt_avail(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("availability") is None:
        return "-"
    return f"{entry['availability'] * 100:.0f}%"


def _fmt_verdict(v: object) -> str:
    if v is True:
        return "[green]ok[/]"
    if v is False:
        return "[red]VIOLATION[/]"
    return "measured" if v is None else f"[yellow]{v}[/]"


def _latency_cell(r: Mapping[str, Any], q: str) -> str:
    lat = r["latency"]["all"]
    return f"{lat[q]:.1f} ms" if q in lat else "-"


def _convergence_cell(r: Mapping[str, Any]) -> str:
    c = r["digests"]["first_agreement_after_heal_s"]
    return "-" if c is None else f"{c:.2f} s"


def print_summary(results: Mapping[str, Mapping[str, Any]], out_dir: Path) -> None:
    """A table: one column per store."""
    from rich.console import Console
    from rich.table import Table

    stores = list(results)
    table = Table(title=f"caplab run: {out_dir}")
    table.add_column("")
    for s in stores:
        table.add_column(s)

    def row(label: str, cells: list[str]) -> None:
        table.add_row(label, *cells)

    rs = [results[s] for s in stores]
    row("verdict", [_fmt_verdict(r["valid"]) for r in rs])
    for c in sorted({c for r in rs for c in r["checkers"]}):
        row(
            f"  {c}",
            [
                _fmt_verdict(r["checkers"][c].get("valid")) if c in r["checkers"] else "-"
                for r in rs
            ],
        )
    row("operations", [str(r["operations"]) for r in rs])
    for phase in ("before", "during", "after"):
        row(f"availability {phase}", [_fmt_avail(r["availability"]["phases"][phase]) for r in rs])
    for side in ("majority", "minority"):
        row(f"availability {side}", [_fmt_avail(r["availability"]["sides"].get(side)) for r in rs])
    for q in ("p50_ms", "p95_ms", "p99_ms"):
        row(f"latency {q[:3]}", [_latency_cell(r, q) for r in rs])
    row("throughput ok/s", [str(r["throughput"]["ok_per_s"]) for r in rs])
    row(
        "distinct digests (fault)",
        [str(r["digests"]["max_distinct_digests_during"]) for r in rs],
    )
    row("first agreement after heal", [_convergence_cell(r) for r in rs])
    row(
        "converged for good after heal",
        [
            "-"
            if r["checkers"].get("convergence", {}).get("time_to_converge_s") is None
            else f"{r['checkers']['convergence']['time_to_converge_s']:.2f} s"
            for r in rs
        ],
    )
    row(
        "converged after stop",
        [
            "never"
            if r["timings"]["convergence_after_stop_s"] is None
            else f"{r['timings']['convergence_after_stop_s']:.2f} s"
            for r in rs
        ],
    )
    Console().print(table)


def _cmd_run(args: argparse.Namespace) -> int:
    from harness.runner import run_scenario
    from harness.scenario import ScenarioError, load_scenario, parse_duration

    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as e:
        _err(f"error: {e}")
        return EXIT_USAGE
    if args.duration is not None:
        try:
            d = parse_duration(args.duration)
        except ValueError as e:
            _err(f"error: --duration: {e}")
            return EXIT_USAGE
        if d <= 0:
            _err("error: --duration must be positive")
            return EXIT_USAGE
        scenario = scenario.with_duration(d)
    store = args.store or scenario.store
    out = Path(args.out or f"runs/{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        result = run_scenario(scenario, store, out, secure=not args.insecure)
    except KeyboardInterrupt:
        _err("interrupted; every node was stopped")
        return 130
    except (RuntimeError, TimeoutError, OSError) as e:
        _err(f"run failed: {e}")
        return EXIT_FAILED
    print_summary(result.stores, out)
    print(f"results: {result.results_path}")
    from harness.report import build_report

    rep = build_report(out)
    print(f"report: {rep.html_path}")
    if result.valid is False:
        _err("a checker found a violation (see results.json)")
        return EXIT_FAILED
    return EXIT_OK


# -- check --------------------------------------------------------------------------
def add_check(sub: Any) -> None:
    p = sub.add_parser("check", help="check a recorded history")
    p.add_argument("history", metavar="HISTORY.jsonl")
    p.add_argument("--model", choices=["register", "counter"], required=True)
    p.add_argument("--timeout", type=float, default=60.0, help="search budget in seconds")
    p.set_defaults(func=_cmd_check)


def _cmd_check(args: argparse.Namespace) -> int:
    from harness.history import HistoryError, pair_operations, read_history

    try:
        ops = pair_operations(read_history(args.history))
    except HistoryError as e:
        _err(str(e))
        return EXIT_FAILED
    if args.model == "register":
        return _check_register(ops, args.timeout)
    return _check_counter(ops)


def _check_register(ops: Any, timeout: float) -> int:
    from harness.checker.linearizable import check_register, describe, fmt_time

    res = check_register(ops, timeout_s=timeout)
    print(res.summary())
    cex = res.counterexample
    if cex is not None:
        print(f"counterexample on key {cex.key!r}:")
        print("  linearizable prefix (last 10):")
        for op in cex.prefix[-10:]:
            print(f"    {fmt_time(op.invoke_time)}  p{op.process}@{op.node}  {describe(op)}")
        print(f"  register then holds: {cex.state!r}")
        op = cex.op
        print(
            f"  cannot place: {describe(op)} by p{op.process}@{op.node} "
            f"[{fmt_time(op.invoke_time)} .. {fmt_time(op.complete_time)}]"
        )
        for c in cex.concurrent[:10]:
            print(f"  concurrent:   {describe(c)} by p{c.process}@{c.node}")
        print(f"  reason: {cex.reason}")
    return EXIT_FAILED if res.valid is False else EXIT_OK


def _check_counter(ops: Any) -> int:
    """Final reads are the runner's (processes from FINAL_READ_PROCESS on), if any."""
    from harness.checks import counter_verdict

    verdict = counter_verdict(ops)
    print(verdict["summary"])
    return EXIT_FAILED if verdict["valid"] is False else EXIT_OK


REGISTRARS = [add_run, add_check]
