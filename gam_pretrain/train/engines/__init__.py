"""Engines behind one interface (see base.py); `build_engine` picks one from the config."""
from __future__ import annotations

import torch
import torch.nn as nn

from ...config import RunConfig
from ...models import build_model
from ..distributed import DistInfo
from .base import Batch, Engine, StepResult, model_state_bytes
from .single import SingleEngine


def engine_class(cfg: RunConfig, world_size: int) -> type[Engine]:
    kind = cfg.engine.kind
    if kind == "ddp" and world_size == 1:
        kind = "single"  # DDP of one process is the single engine
    if kind == "single":
        if world_size > 1:
            raise ValueError(f"engine.kind=single cannot run {world_size} processes; use ddp, deepspeed or fsdp2")
        return SingleEngine
    if kind == "ddp":
        from .ddp import DDPEngine

        return DDPEngine
    if kind == "fsdp2":
        from .fsdp2 import FSDP2Engine

        return FSDP2Engine
    from .zero import DeepSpeedEngine

    return DeepSpeedEngine


def build_model_and_engine(cfg: RunConfig, device: torch.device, dist: DistInfo, accel=None) -> Engine:
    """The model of cfg.model initialised from train.seed, under the engine cfg.engine asks for.
    Engines that shard parameters (FSDP2, ZeRO-3) get it on the meta device and materialize it one
    unit at a time (deferred init); the others get it whole. `accel(model)` is applied in between.
    The global random state afterwards is the same either way (the init draws from its own streams)."""
    cls = engine_class(cfg, dist.world_size)
    model = build_model(cfg.model, seed=cfg.train.seed, materialize=not cls.defers_init(cfg))
    if accel is not None:
        model = accel(model)
    return cls(model, cfg, device, dist)


def build_engine(cfg: RunConfig, model: nn.Module, device: torch.device, dist: DistInfo) -> Engine:
    """An engine around a model already built (whole)."""
    return engine_class(cfg, dist.world_size)(model, cfg, device, dist)


__all__ = ["Batch", "Engine", "SingleEngine", "StepResult", "build_engine", "build_model_and_engine", "engine_class",
           "model_state_bytes"]
