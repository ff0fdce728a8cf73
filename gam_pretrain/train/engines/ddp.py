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

    def gradient_sync(self, enabled: bool):
        # gradients of the other micro-batches accumulate locally; the last one's backward all-reduces the sum
        return contextlib.nullcontext() if enabled else self.model.no_sync()
