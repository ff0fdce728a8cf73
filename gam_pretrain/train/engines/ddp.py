"""DistributedDataParallel: full replicas, gradients averaged with all-reduce."""
from __future__ import annotations

import contextlib

import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from .single import SingleEngine


class DDPEngine(SingleEngine):
    def _wrap(self, module: nn.Module) -> nn.Module:
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)

    def forward_backward(self, inputs, targets, loss_scale):
        self._micro = getattr(self, "_micro", 0) + 1
        # all-reduce only on the last micro-batch of an accumulation (loss_scale = 1 / accumulation)
        last = self._micro >= round(1 / loss_scale)
        context = contextlib.nullcontext() if last else self.model.no_sync()
        with context:
            loss = super().forward_backward(inputs, targets, loss_scale)
        if last:
            self._micro = 0
        return loss
