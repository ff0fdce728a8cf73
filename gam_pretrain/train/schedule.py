"""Learning-rate schedule: linear warm-up, then cosine decay, a constant rate, or warmup-stable-decay
(WSD: constant, then a linear decay over the last steps; a cooldown branch decays from the step it
branches at, so one stable run serves many token budgets)."""
from __future__ import annotations

import math

from ..config import OptimConfig


def decay_start(total_steps: int, cfg: OptimConfig) -> int:
    """wsd: the first step of the decay (optim.decay_start, else the last decay_fraction of the steps)."""
    if cfg.decay_start:
        return cfg.decay_start
    return max(cfg.warmup_steps, total_steps - max(1, round(cfg.decay_fraction * total_steps)))


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """LR for optimizer step `step` (0-based). Warm-up reaches cfg.lr at step warmup_steps - 1, or
    with warmup_from_zero (the paper's LambdaLR) starts at 0 and reaches cfg.lr at step warmup_steps."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step if cfg.warmup_from_zero else step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    min_lr = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        start = decay_start(total_steps, cfg)
        if step < start:
            return cfg.lr
        # step start trains at the full rate and the last step (total_steps - 1) at 1/length of it, as
        # the warm-up's first step does: no step is spent at min_lr when min_lr is 0
        length = max(1, total_steps - start)
        return min_lr + (cfg.lr - min_lr) * (1.0 - (step - start) / length)
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1.0 + math.cos(math.pi * progress))
