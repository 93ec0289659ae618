"""``caplab spectrum``: every read guarantee on both stores through one partition, and
Terry's Table 2 measured from it.

Layers (none imports a later one): :mod:`~harness.spectrum.matrix` computes the cells from a
run folder (read by :mod:`harness.report.load`), :mod:`~harness.spectrum.verdict` puts them
in words, :mod:`~harness.spectrum.render` writes summary.json, the plot and the page, and
:mod:`~harness.spectrum.run` drives the run and the command line.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path

from harness.files import write_text_atomic
from harness.report.load import ReportError, load_run, read_json
from harness.spectrum.matrix import Matrix, compute_matrix
from harness.spectrum.render import PLOT_NAME, render_html, staleness_plot, summary_doc
from harness.spectrum.verdict import Verdict, verdict

SUMMARY_NAME = "summary.json"
HTML_NAME = "report.html"


@dataclass(frozen=True, kw_only=True)
class SpectrumReport:
    matrix: Matrix
    verdict: Verdict
    summary_path: Path
    html_path: Path
    plot_path: Path | None


def is_spectrum_run(out: Path | str) -> bool:
    """The run folder's scenario gave its clients read levels (a spectrum run)."""
    combined = read_json(Path(out) / "results.json") or {}
    scenario = combined.get("scenario")
    return isinstance(scenario, dict) and bool(scenario.get("read_levels"))


def build_spectrum_report(out: Path | str) -> SpectrumReport:
    """Read the run folder ``out`` and write ``summary.json`` (the matrix), ``staleness.png``
    and ``report.html`` (last; the plot embedded) into it."""
    out = Path(out)
    data = load_run(out)
    if not data:
        raise ReportError(f"{out}: no run here (expected raft/history.jsonl or gossip/...)")
    combined = read_json(out / "results.json") or {}
    if combined.get("status") != "complete":
        raise ReportError(f"{out}: the run did not finish (status {combined.get('status')!r})")
    scenario = combined.get("scenario") or {}
    bound = float(scenario.get("max_staleness_ms") or 1000)
    m = compute_matrix(data, bound)
    if not m.levels:
        raise ReportError(f"{out}: no client of this run picked a read level (read_levels)")
    v = verdict(m)
    doc = summary_doc(m, v, out, scenario)
    summary_path = out / SUMMARY_NAME
    write_text_atomic(summary_path, json.dumps(doc, indent=2) + "\n")
    tmp_plot = out / f".{PLOT_NAME}.tmp.png"
    staleness_plot(tmp_plot, m)
    plot_path = out / PLOT_NAME
    os.replace(tmp_plot, plot_path)
    html_path = out / HTML_NAME
    image = "data:image/png;base64," + base64.b64encode(plot_path.read_bytes()).decode("ascii")
    write_text_atomic(html_path, render_html(doc, m, v, image))
    return SpectrumReport(
        matrix=m, verdict=v, summary_path=summary_path, html_path=html_path, plot_path=plot_path
    )
