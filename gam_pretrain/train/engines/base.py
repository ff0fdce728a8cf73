"""Engines: how one training step runs on the hardware. The loop only talks to this interface.

    engine.set_lr(lr)                                            # once per optimizer step, first
    loss = engine.forward_backward(inputs, targets, loss_scale)   # once per micro-batch
    grad_norm = engine.optimizer_step()                          # once per optimizer step, last
    engine.save(directory) / engine.load(directory)             # collective: every rank calls them
    engine.full_state_dict()                                     # whole fp32 weights (rank 0 gets them)
    engine.model                                                 # the module the forward runs through

Engines: single (CPU or one GPU), ddp, deepspeed (ZeRO 0-3), fsdp2. Built by `build_engine`.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path

import torch
import torch.nn as nn

from ..distributed import DistInfo


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast when asked (auto = bf16 on CUDA, fp32 on CPU), else a no-op context."""
    if uses_bf16(device, precision):
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def uses_bf16(device: torch.device, precision: str) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every block's activations in backward (applied from outside the model)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        forward = block.forward
        block.forward = lambda *args, _f=forward: checkpoint(_f, *args, use_reentrant=False)


def model_state_bytes(engine: "Engine") -> int:
    """Bytes of parameters + optimizer state this rank holds, counting each storage once.

    DDP holds everything; ZeRO-1/2 shard the optimizer state (plus an fp32 master partition);
    ZeRO-3 and FSDP2 shard the parameters too. Gradients and activations are not counted.
    """
    seen, total = set(), 0

    def add(t) -> None:
        nonlocal total
        if not isinstance(t, torch.Tensor):
            return
        if hasattr(t, "to_local"):  # FSDP2 DTensor: this rank's shard
            t = t.to_local()
        if hasattr(t, "ds_tensor"):  # DeepSpeed ZeRO-3: this rank's partition
            t = t.ds_tensor
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key[1] and key not in seen:
            seen.add(key)
            total += key[1]

    for p in getattr(engine.model, "module", engine.model).parameters():
        add(p)
    optimizer = engine.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed wraps the torch optimizer
    for group in inner.param_groups:
        for p in group["params"]:
            add(p)
    for state in inner.state.values():
        for value in state.values():
            add(value)
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):  # DeepSpeed masters
        for t in getattr(optimizer, name, None) or []:
            add(t)
    return total


class Engine(ABC):
    model: nn.Module
    optimizer: torch.optim.Optimizer  # DeepSpeed's wrapper for the deepspeed engine
    device: torch.device
    dist: DistInfo

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    @abstractmethod
    def set_lr(self, lr: float) -> None: ...

    @abstractmethod
    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor, loss_scale: float) -> torch.Tensor:
        """Forward + backward of one micro-batch; returns this rank's unscaled loss (detached)."""

    @abstractmethod
    def optimizer_step(self) -> float:
        """Clip, step, zero grads; returns the global gradient norm before clipping."""

    @abstractmethod
    def save(self, directory: Path) -> None: ...

    @abstractmethod
    def load(self, directory: Path) -> None: ...

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights as plain CPU tensors (complete on rank 0; collective)."""

    def autocast(self):
        return self._autocast()

    def eval_model(self) -> nn.Module:
        """The module to evaluate through (same forward as training, no grad)."""
        return self.model
