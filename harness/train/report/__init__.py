"""The ``caplab train`` report: what BSP, ASP and SSP did over the stores, from a run folder.

Theory of operation
-------------------
Layers (none imports a later one): :mod:`~harness.train.report.load` reads the run folder
``caplab train`` wrote into dataclasses, :mod:`~harness.train.report.figures` computes every
number, :mod:`~harness.train.report.verdict` puts them in words and
:mod:`~harness.train.report.render` writes summary.json, the plots and the page.
:func:`build_train_report` runs them in order and writes every file under a temporary name
first (then :func:`os.replace`), ``report.html`` last, so a folder with a report.html has a
complete report.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path

from harness.files import write_text_atomic
from harness.report.load import ReportError
from harness.train.report.figures import TrainFigures, compute_figures
from harness.train.report.load import is_train_run, load_train_run
from harness.train.report.render import PLOT_NAMES, draw_all, render_html, summary_doc
from harness.train.report.verdict import Verdict, verdict

SUMMARY_NAME = "summary.json"
HTML_NAME = "report.html"


@dataclass(frozen=True, kw_only=True)
class TrainReport:
    figures: TrainFigures
    verdict: Verdict
    summary_path: Path
    html_path: Path
    plot_paths: dict[str, Path]


def build_train_report(out: Path | str) -> TrainReport:
    """Read the train run folder ``out`` and write ``summary.json``, the plots and
    ``report.html`` (last) into it. :class:`ReportError` when ``out`` is not a train run or
    the run did not finish."""
    out = Path(out)
    run = load_train_run(out)
    if run.status != "complete":
        raise ReportError(f"{out}: the train run did not finish (status {run.status!r})")
    if not run.experiments:
        raise ReportError(f"{out}: the train run holds no experiment folder")
    figs = compute_figures(run)
    v = verdict(figs)
    plots: dict[str, Path] = {}
    for key, tmp in draw_all(out, figs, tmp=True).items():
        final = out / PLOT_NAMES[key]
        os.replace(tmp, final)
        plots[key] = final
    doc = summary_doc(figs, v, out, plots)
    summary_path = out / SUMMARY_NAME
    write_text_atomic(summary_path, json.dumps(doc, indent=2) + "\n")
    images = {
        key: "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode("ascii")
        for key, p in plots.items()
    }
    html_path = out / HTML_NAME
    write_text_atomic(html_path, render_html(doc, figs, v, images))
    return TrainReport(
        figures=figs, verdict=v, summary_path=summary_path, html_path=html_path, plot_paths=plots
    )


__all__ = [
    "HTML_NAME",
    "SUMMARY_NAME",
    "ReportError",
    "TrainReport",
    "build_train_report",
    "is_train_run",
]
