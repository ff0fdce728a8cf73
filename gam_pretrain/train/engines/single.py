"""One process: CPU or one GPU. DDP reuses it with the model wrapped."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ...config import EngineConfig, OptimConfig
from ..distributed import DistInfo
from ..optim import build_adamw, clip_grad_norm
from ..perf import tune_cpu_allocator
from .base import Engine, apply_activation_checkpointing, autocast_for

WEIGHTS = "model_optim.pt"


class SingleEngine(Engine):
    def __init__(self, model: nn.Module, optim_cfg: OptimConfig, device: torch.device, precision: str = "auto",
                 compile: bool = False, engine_cfg: EngineConfig | None = None, dist: DistInfo | None = None):
        self.device, self.dist, self.optim_cfg = device, dist or DistInfo(), optim_cfg
        if device.type == "cpu":
            tune_cpu_allocator()
        self.module = model.to(device)
        if engine_cfg is not None and engine_cfg.activation_checkpointing:
            apply_activation_checkpointing(self.module)
        self.model = self._wrap(self.module)
        self.optimizer = build_adamw(self.module, optim_cfg, fused=self.dist.world_size == 1)
        self._autocast = autocast_for(device, precision)
        self._forward = torch.compile(self.model) if compile else self.model

    def _wrap(self, module: nn.Module) -> nn.Module:
        return module

    def eval_model(self) -> nn.Module:
        return self.module

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def forward_backward(self, inputs, targets, loss_scale):
        inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
        with self._autocast():
            _, loss = self._forward(inputs, targets, return_logits=False)
        (loss * loss_scale).backward()
        return loss.detach()

    def optimizer_step(self) -> float:
        clip = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0 else float("inf")
        grad_norm = clip_grad_norm(self.module.parameters(), clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def save(self, directory: Path) -> None:
        if self.dist.is_main:  # the weights and optimizer state are identical on every rank
            torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()},
                       directory / WEIGHTS)

    def load(self, directory: Path) -> None:
        state = torch.load(directory / WEIGHTS, map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu() for k, v in self.module.state_dict().items()}
