"""Engines behind one interface (see base.py); `build_engine` picks one from the config."""
from __future__ import annotations

import torch
import torch.nn as nn

from ...config import RunConfig
from ..distributed import DistInfo
from .base import Engine, autocast_for, model_state_bytes
from .single import SingleEngine


def build_engine(cfg: RunConfig, model: nn.Module, device: torch.device, dist: DistInfo) -> Engine:
    kind, t = cfg.engine.kind, cfg.train
    if kind != "single" and dist.world_size == 1 and kind == "ddp":
        kind = "single"  # DDP of one process is the single engine
    if kind == "single":
        if dist.world_size > 1:
            raise ValueError(f"engine.kind=single cannot run {dist.world_size} processes; use ddp, deepspeed or fsdp2")
        return SingleEngine(model, cfg.optim, device, t.precision, t.compile, cfg.engine, dist)
    if kind == "ddp":
        from .ddp import DDPEngine

        return DDPEngine(model, cfg.optim, device, t.precision, t.compile, cfg.engine, dist)
    if kind == "fsdp2":
        from .fsdp2 import FSDP2Engine

        return FSDP2Engine(model, cfg.optim, device, t.precision, t.compile, cfg.engine, dist)
    from .zero import DeepSpeedEngine

    return DeepSpeedEngine(model, cfg.optim, device, t.precision, t.compile, cfg.engine, dist,
                           micro_batch=t.batch_size // t.grad_accum, grad_accum=t.grad_accum)


__all__ = ["Engine", "SingleEngine", "autocast_for", "build_engine", "model_state_bytes"]
