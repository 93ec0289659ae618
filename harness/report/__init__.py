"""The side-by-side report of a run folder: ``summary.json``, plots and ``report.html``.

Theory of operation
-------------------
The report is built in layers, each importing only the ones before it:

1. :mod:`.load` reads a run folder back (histories, digest samples, results.json, the
   fault episodes, whether the run finished);
2. :mod:`.figures` computes every figure of one store (availability by phase and side,
   refusals, latency, the replica lag of :mod:`harness.divergence`, the checkers'
   figures, run through :mod:`harness.checks` when results.json is missing);
3. :mod:`.verdict` turns the figures into the verdict (violations first; two columns,
   what CP gave up and what AP gave up), :mod:`.tables` into the side-by-side tables;
   :mod:`.summary` assembles ``summary.json`` (validated against
   ``harness/summary_schema.json``);
4. :mod:`.plots` draws the PNGs, :mod:`.html` writes the page.

:func:`build_report` writes everything into the run folder under temporary names and
renames them into place (``os.replace``) only once all are written: a failed or aborted
build leaves the previous report as it was. ``caplab report RUN_DIR`` rebuilds it.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.report.figures import store_summary
from harness.report.load import STORES, ReportError, StoreData, load_run
from harness.report.summary import (
    SUMMARY_SCHEMA_VERSION,
    build_summary,
    commit_info,
    machine_info,
    validate_summary,
)
from harness.report.tables import detail_rows, key_rows
from harness.report.verdict import verdict, verdict_parts, violations
from harness.report.words import pct, plural, secs

PLOTS = ("timeline", "latency", "throughput", "divergence", "availability")
REPORT_FILES = ("report.html", "summary.json", *(f"{p}.png" for p in PLOTS))

__all__ = [
    "PLOTS",
    "REGISTRARS",
    "REPORT_FILES",
    "STORES",
    "SUMMARY_SCHEMA_VERSION",
    "Report",
    "ReportError",
    "StoreData",
    "add_report",
    "build_report",
    "build_summary",
    "commit_info",
    "detail_rows",
    "key_rows",
    "load_run",
    "machine_info",
    "pct",
    "plural",
    "secs",
    "store_summary",
    "validate_summary",
    "verdict",
    "verdict_parts",
    "violations",
]


@dataclass(slots=True)
class Report:
    """What :func:`build_report` wrote."""

    out_dir: Path
    summary: dict[str, Any]
    html_path: Path
    summary_path: Path
    plots: dict[str, Path] = field(default_factory=dict)

    @property
    def valid(self) -> bool:
        """False when a checker found a real violation."""
        return bool(self.summary["valid"])

    @property
    def status(self) -> str:
        """``ok`` | ``violation`` | ``interrupted`` | ``failed``."""
        return str(self.summary["verdict_parts"]["status"])

    @property
    def verdict(self) -> str:
        return str(self.summary["verdict"])


def _scenario_text(scenario: dict[str, Any]) -> str:
    f = scenario.get("file")
    for cand in (Path(str(f)) if f else None, Path.cwd() / str(f) if f else None):
        if cand is not None and cand.is_file():
            try:
                return cand.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                break
    return json.dumps(dict(scenario), indent=2)


def build_report(out_dir: Path | str) -> Report:
    """(Re)build ``summary.json``, the plots and ``report.html`` in the run folder. Every
    file is written under a temporary name first and renamed into place when all are
    complete (report.html last), so an error leaves the previous report untouched."""
    from harness.report import html, plots

    out = Path(out_dir)
    data = load_run(out)
    summary = build_summary(out, data)
    tag = f".tmp-{os.getpid()}"
    written: list[tuple[Path, Path]] = []  # (temporary, final)
    try:
        tmp_plots = plots.draw_all(out, data, summary, suffix=tag)
        paths = {k: out / f"{k}.png" for k in tmp_plots}
        written += [(tmp_plots[k], paths[k]) for k in tmp_plots]
        summary["plots"] = {k: p.name for k, p in paths.items()}
        validate_summary(summary)
        summary_path = out / "summary.json"
        tmp_summary = out / f"summary{tag}.json"
        tmp_summary.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        written.append((tmp_summary, summary_path))
        images = {k: base64.b64encode(p.read_bytes()).decode("ascii") for k, p in tmp_plots.items()}
        html_path = out / "report.html"
        tmp_html = out / f"report{tag}.html"
        tmp_html.write_text(
            html.render_html(summary, images, _scenario_text(summary["scenario"])),
            encoding="utf-8",
        )
        written.append((tmp_html, html_path))
    except BaseException:
        for tmp, _ in written:
            with contextlib.suppress(OSError):
                tmp.unlink()
        for p in out.glob(f"*{tag}.*"):
            with contextlib.suppress(OSError):
                p.unlink()
        raise
    for tmp, final in written:  # report.html last: a complete report or the previous one
        os.replace(tmp, final)
    return Report(out, summary, html_path, summary_path, paths)


# -- CLI: caplab report ------------------------------------------------------------------
def add_report(sub: Any) -> None:
    p = sub.add_parser("report", help="(re)build report.html, plots and summary.json of a run")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    """Exit 0: the run finished and no checker found a violation; 1: a violation, or the
    run did not finish (interrupted / failed); 2: not a run folder."""
    from harness.history import HistoryError
    from harness.spectrum import build_spectrum_report, is_spectrum_run  # (lazy: above us)

    if is_spectrum_run(args.run_dir):  # its own report: Terry's table, not the CAP demo's
        try:
            spec = build_spectrum_report(Path(args.run_dir))
        except (ReportError, HistoryError) as e:
            print(f"caplab: {e}", file=sys.stderr)
            return 2 if isinstance(e, ReportError) else 1
        print(spec.verdict.headline)
        print(f"report: {spec.html_path.resolve()}")
        return 0 if spec.verdict.ok else 1
    try:
        rep = build_report(Path(args.run_dir))
    except (ReportError, HistoryError) as e:
        print(f"caplab: {e}", file=sys.stderr)
        return 2 if isinstance(e, ReportError) else 1
    print(rep.verdict)
    print(f"report: {rep.html_path.resolve()}")
    return 0 if rep.status == "ok" else 1


REGISTRARS = [add_report]
