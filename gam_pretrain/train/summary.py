"""<run>/summary.json: a finished run's result, written whole or not at all. Its presence marks the
run finished (sweeps skip it, `status` reports it), so a reader must never see half of one."""
from __future__ import annotations

import json
from pathlib import Path

from ..files import read_json, write_atomic

SUMMARY = "summary.json"


def write_summary(run_dir: Path, summary: dict) -> Path:
    path = Path(run_dir) / SUMMARY
    write_atomic(path, json.dumps(summary, indent=2))
    return path


def read_summary(path: str | Path) -> dict:
    """A summary.json (or the one in a run directory); a missing, truncated or garbled file raises
    one line naming it (FileNotFoundError / ValueError)."""
    path = Path(path)
    if path.is_dir():
        path = path / SUMMARY
    summary = read_json(path)
    if not isinstance(summary, dict):
        raise ValueError(f"{path} is not a run summary (a JSON object)")
    return summary
