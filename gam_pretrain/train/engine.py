"""Engines: how one training step runs on the hardware. The loop only talks to this interface.

    loss = engine.forward_backward(inputs, targets, loss_scale)   # once per micro-batch
    grad_norm = engine.optimizer_step(lr)                         # once per optimizer step
    engine.state_dict() / engine.load_state_dict(state)           # for checkpoints
    engine.model                                                  # the plain nn.Module (eval, export)

This file holds the interface and the single-process engine (CPU or one GPU). The distributed
engines (DDP, DeepSpeed ZeRO, FSDP2) implement the same methods.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod

import torch
import torch.nn as nn

from ..config import OptimConfig
from .optim import build_adamw
from .perf import tune_cpu_allocator


class Engine(ABC):
    model: nn.Module
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @abstractmethod
    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor, loss_scale: float) -> torch.Tensor:
        """Forward + backward of one micro-batch; returns the unscaled loss (detached)."""

    @abstractmethod
    def optimizer_step(self, lr: float) -> float:
        """Clip, step, zero grads; returns the global gradient norm before clipping."""

    @abstractmethod
    def state_dict(self) -> dict: ...

    @abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

    def autocast(self):
        return contextlib.nullcontext()


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast when asked (auto = bf16 on CUDA, fp32 on CPU), else a no-op context."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


class SingleEngine(Engine):
    def __init__(self, model: nn.Module, optim_cfg: OptimConfig, device: torch.device,
                 precision: str = "auto", compile: bool = False):
        self.device = device
        if device.type == "cpu":
            tune_cpu_allocator()
        self.model = model.to(device)
        self.optim_cfg = optim_cfg
        self.optimizer = build_adamw(self.model, optim_cfg, device)
        self._autocast = autocast_for(device, precision)
        self._forward = torch.compile(self.model) if compile else self.model

    def autocast(self):
        return self._autocast()

    def forward_backward(self, inputs, targets, loss_scale):
        inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
        with self._autocast():
            _, loss = self._forward(inputs, targets)
        (loss * loss_scale).backward()
        return loss.detach()

    def optimizer_step(self, lr: float) -> float:
        clip = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
