"""Learning-rate schedule: linear warm-up, then cosine (or constant) decay."""
from __future__ import annotations

import math

from ..config import OptimConfig


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """LR for optimizer step `step` (0-based). Warm-up reaches cfg.lr at step warmup_steps - 1, or
    with warmup_from_zero (the paper's LambdaLR) starts at 0 and reaches cfg.lr at step warmup_steps."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step if cfg.warmup_from_zero else step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1.0 + math.cos(math.pi * progress))
