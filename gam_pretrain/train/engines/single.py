"""One process: CPU or one GPU. DDP reuses it with the model wrapped."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ...config import RunConfig
from ...files import first_line
from ..checkpoint import CheckpointError, load_torch_file, save_durably, snapshot
from ..distributed import DistInfo
from .base import Engine

WEIGHTS = "model_optim.pt"


class SingleEngine(Engine):
    def __init__(self, model: nn.Module, cfg: RunConfig, device: torch.device, dist: DistInfo | None = None):
        super().__init__(model, cfg, device, dist or DistInfo())
        self.model = self._wrap(self.module)
        self.optimizer = self.build_optimizer(fused=self.dist.world_size == 1)

    def _wrap(self, module: nn.Module) -> nn.Module:
        return module

    def eval_model(self) -> nn.Module:
        return self.module

    def stage_save(self, directory: Path):
        if not self.dist.is_main:  # the weights and optimizer state are identical on every rank
            return lambda group: None
        state = snapshot({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()})
        return lambda group: save_durably(state, directory / WEIGHTS)

    def load(self, directory: Path) -> None:
        state = load_torch_file(directory / WEIGHTS, map_location=self.device)
        try:
            self.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # intact file, other contents
            raise CheckpointError(f"{directory / WEIGHTS} does not fit this model ({first_line(e)})") from None

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu() for k, v in self.module.state_dict().items()}
