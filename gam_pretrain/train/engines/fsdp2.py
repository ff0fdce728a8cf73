"""PyTorch FSDP2: `fully_shard` on every block and the root; parameters, gradients and optimizer
state are sharded across ranks (DTensors). Checkpoints are torch.distributed.checkpoint (DCP)
folders: sharded on disk, loadable at another world size."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from ...config import RunConfig
from ..distributed import DistInfo
from .base import Engine, uses_bf16

DCP_DIR = "dcp"


class FSDP2Engine(Engine):
    def __init__(self, model: nn.Module, cfg: RunConfig, device: torch.device, dist: DistInfo):
        super().__init__(model, cfg, device, dist)
        kwargs = {}
        if uses_bf16(device, cfg.train.precision):
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in self.module.blocks:
            fully_shard(block, **kwargs)
        fully_shard(self.module, **kwargs)
        self.model = self.module
        self.optimizer = self.build_optimizer()

    def autocast(self):
        # in bf16 the policy already casts the parameters; autocast would only add casts
        return contextlib.nullcontext()

    def clip_gradients(self, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor across ranks

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
