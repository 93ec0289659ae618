"""The summary document (``summary.json``): every store's figures, the run's status, the
machine and commit, and the verdict; validated against ``harness/summary_schema.json``."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness.report.figures import store_summary
from harness.report.load import ReportError, StoreData, load_run, read_json, run_status
from harness.report.verdict import verdict_parts, verdict_text, violations

SUMMARY_SCHEMA_VERSION = 2
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "summary_schema.json"


def machine_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count() or 0,
    }


def commit_info(repo: Path | None = None) -> dict[str, Any] | None:
    """``git rev-parse HEAD`` and whether the tree is dirty; None without git or a repo."""
    cwd = repo or Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return {"sha": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def build_summary(
    out_dir: Path | str, data: Mapping[str, StoreData] | None = None
) -> dict[str, Any]:
    """Read a run folder (or use ``data`` read from it) and compute the summary document
    (not written)."""
    out = Path(out_dir)
    data = load_run(out) if data is None else data
    if not data:
        raise ReportError(f"{out}: no run here (expected raft/history.jsonl or gossip/...)")
    combined = read_json(out / "results.json") or {}
    status = run_status(out)
    scenario = combined.get("scenario")
    if not isinstance(scenario, dict):
        first = next((sd.results for sd in data.values() if sd.results), None) or {}
        scenario = first.get("scenario") if isinstance(first.get("scenario"), dict) else {}
    complete = status == "complete"
    stores = {s: store_summary(sd, complete=complete) for s, sd in data.items()}
    summary: dict[str, Any] = {
        "schema_version": SUMMARY_SCHEMA_VERSION,
        "generated_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "run_dir": str(out.resolve()),
        "status": status,
        "t0_unix_ns": combined.get("t0_unix_ns"),
        "machine": machine_info(),
        "commit": commit_info(),
        "scenario": scenario or {},
        "stores": stores,
    }
    summary["violations"] = violations(summary)
    summary["valid"] = not summary["violations"]
    parts = verdict_parts(summary)
    summary["verdict_parts"] = parts
    summary["verdict"] = verdict_text(parts)
    return summary


def load_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return schema


def validate_summary(doc: Mapping[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` when ``doc`` does not match the schema."""
    import jsonschema

    jsonschema.validate(instance=doc, schema=load_schema(), cls=jsonschema.Draft202012Validator)
