"""Metrics sinks: metrics.jsonl in the run directory and Weights & Biases (offline by default)."""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from ..config import LoggingConfig


class MetricsLogger:
    """Writes one JSON object per call to metrics.jsonl and mirrors it to wandb and TensorBoard. Rank 0 only."""

    def __init__(self, run_dir: Path, cfg: LoggingConfig, config_dict: dict, name: str, enabled: bool = True,
                 resume_step: int = 0):
        self.enabled = enabled
        self._wandb = self._tensorboard = None
        if not enabled:
            return
        if cfg.tensorboard:  # config validation made sure tensorboard is installed
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run drops what an earlier attempt logged after its checkpoint (it logs those steps again)
            self._tensorboard = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step or None,
                                              flush_secs=10)
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
        if self._tensorboard is not None:
            for tag, value in scalars(record):
                self._tensorboard.add_scalar(tag, value, global_step=record.get("step"))

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def scalars(record: dict, prefix: str = ""):
    """(tag, number) for every number in a metrics record: lists by index (memory per rank), dicts by key."""
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if key == "step" and not prefix:
            continue
        if isinstance(value, dict):
            yield from scalars(value, f"{tag}/")
        elif isinstance(value, list):
            yield from scalars({f"rank{i}": v for i, v in enumerate(value)}, f"{tag}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield tag, float(value)


def duration(seconds: float) -> str:
    """3h05m, 4m12s, 37s."""
    seconds = int(round(max(seconds, 0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_line(step: int, total: int, loss: float, lr: float, tokens_per_s: float, mfu: float,
                  eta_seconds: float) -> str:
    """One plain line per log interval, for a log file (a SLURM job's stdout has no terminal)."""
    return (f"step {step}/{total} | loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s:,.0f} tokens/s | "
            f"MFU {mfu:.3f} | ETA {duration(eta_seconds)}")
