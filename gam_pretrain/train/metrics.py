"""Metrics sinks: metrics.jsonl in the run directory and Weights & Biases (offline by default)."""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from ..config import LoggingConfig


class MetricsLogger:
    """Writes one JSON object per call to metrics.jsonl and mirrors it to wandb. Rank 0 only."""

    def __init__(self, run_dir: Path, cfg: LoggingConfig, config_dict: dict, name: str, enabled: bool = True):
        self.enabled = enabled
        self._wandb = None
        if not enabled:
            return
        self._file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if cfg.wandb != "disabled":
            import wandb

            id_file = run_dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
            id_file.write_text(run_id)
            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(
                project=cfg.wandb_project, entity=cfg.wandb_entity or None, name=name, id=run_id, resume="allow",
                dir=str(run_dir), mode=cfg.wandb, config=config_dict,
                settings=wandb.Settings(console="off", x_disable_stats=True),
            )

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=record.get("step"))

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
