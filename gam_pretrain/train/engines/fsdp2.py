"""PyTorch FSDP2: `fully_shard` on every block and the root; parameters, gradients and optimizer
state are sharded across ranks (DTensors). Checkpoints are torch.distributed.checkpoint (DCP)
folders: sharded on disk, loadable at another world size."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from ...config import EngineConfig, OptimConfig
from ..distributed import DistInfo
from ..optim import build_adamw
from .base import Engine, apply_activation_checkpointing, autocast_for, uses_bf16

DCP_DIR = "dcp"


class FSDP2Engine(Engine):
    def __init__(self, model: nn.Module, optim_cfg: OptimConfig, device: torch.device, precision: str,
                 compile: bool, engine_cfg: EngineConfig, dist: DistInfo):
        self.device, self.dist, self.optim_cfg = device, dist, optim_cfg
        model = model.to(device)
        if engine_cfg.activation_checkpointing:
            apply_activation_checkpointing(model)
        bf16 = uses_bf16(device, precision)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        kwargs = {"mp_policy": policy} if policy else {}
        for block in model.blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        self.model = model
        self.optimizer = build_adamw(model, optim_cfg)
        # the policy already casts parameters to bf16; autocast would only add casts
        self._autocast = autocast_for(device, "fp32" if bf16 else precision)
        self._forward = torch.compile(model) if compile else model

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def forward_backward(self, inputs, targets, loss_scale):
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        with self._autocast():
            _, loss = self._forward(inputs, targets, return_logits=False)
        (loss * loss_scale).backward()
        return loss.detach().float()

    def optimizer_step(self) -> float:
        clip = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def save(self, directory: Path) -> None:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory / DCP_DIR))

    def load(self, directory: Path) -> None:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(directory / DCP_DIR))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.float() for k, v in sd.items()}
