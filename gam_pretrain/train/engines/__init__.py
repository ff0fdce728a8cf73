"""Engines behind one interface (see base.py); `build_engine` picks one from the config."""
from __future__ import annotations

import torch
import torch.nn as nn

from ...config import RunConfig
from ..distributed import DistInfo
from .base import Batch, Engine, StepResult, model_state_bytes
from .single import SingleEngine


def build_engine(cfg: RunConfig, model: nn.Module, device: torch.device, dist: DistInfo) -> Engine:
    kind = cfg.engine.kind
    if kind == "ddp" and dist.world_size == 1:
        kind = "single"  # DDP of one process is the single engine
    if kind == "single":
        if dist.world_size > 1:
            raise ValueError(f"engine.kind=single cannot run {dist.world_size} processes; use ddp, deepspeed or fsdp2")
        return SingleEngine(model, cfg, device, dist)
    if kind == "ddp":
        from .ddp import DDPEngine

        return DDPEngine(model, cfg, device, dist)
    if kind == "fsdp2":
        from .fsdp2 import FSDP2Engine

        return FSDP2Engine(model, cfg, device, dist)
    from .zero import DeepSpeedEngine

    return DeepSpeedEngine(model, cfg, device, dist)


__all__ = ["Batch", "Engine", "SingleEngine", "StepResult", "build_engine", "model_state_bytes"]
