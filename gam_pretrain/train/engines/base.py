"""Engines: how one optimizer step runs on the hardware. The loop only talks to this interface.

    result = engine.train_step(batches, step, total_steps)  # one optimizer step over its micro-batches
    result.loss, result.grad_norm, result.lr                  # mean loss over micro-batches and ranks
    engine.stage_save(directory)(group) / engine.load(directory)  # collective: every rank calls them
    engine.full_state_dict()                                   # whole fp32 weights (rank 0 gets them)
    engine.eval_model() / engine.autocast                      # what evaluation runs through

Engines: single (CPU or one GPU), ddp, deepspeed (ZeRO 0-3), fsdp2. Built by `build_engine`; each
takes (model, cfg, device, dist). `Engine.train_step` is shared; subclasses override the pieces that
differ: wrapping in their constructor, `gradient_sync`, `forward_backward`, `clip_gradients`,
`optimizer_step`, and checkpointing.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ...config import RunConfig
from ..distributed import DistInfo, all_reduce_mean
from ..optim import build_adamw, clip_grad_norm
from ..perf import MAP_EACH_BUFFER, REUSE_THE_HEAP, tune_cpu_allocator
from ..schedule import lr_at

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, targets) of one micro-batch


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean over the step's micro-batches and all ranks
    grad_norm: float  # global gradient norm before clipping
    lr: float


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


def is_on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


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
    """Owns one optimizer step: learning rate, the micro-batches' forward and backward (gradients
    synchronized on the last one only), clipping, the optimizer step, and the loss across ranks.

    A subclass constructor calls `super().__init__` (device placement, activation checkpointing),
    then wraps `self.module` and sets `self.model` (what the forward runs through) and `self.optimizer`.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer  # DeepSpeed's wrapper for the deepspeed engine

    def __init__(self, model: nn.Module, cfg: RunConfig, device: torch.device, dist: DistInfo):
        self.cfg, self.device, self.dist = cfg, device, dist
        if device.type == "cpu":
            tune_cpu_allocator(MAP_EACH_BUFFER if self.partitions_state(cfg) else REUSE_THE_HEAP)
        if is_on_meta(model):
            if not self.defers_init(cfg):
                raise ValueError(f"{type(self).__name__} cannot materialize a model built on the meta device")
            self.module = model  # the subclass materializes it, sharded
        else:
            self.module = model.to(device)
        if cfg.engine.activation_checkpointing:
            apply_activation_checkpointing(self.module)

    @classmethod
    def partitions_state(cls, cfg: RunConfig) -> bool:
        """Whether ranks hold different parts of the model state. Such engines map each CPU buffer
        of 1 MB and more on its own (perf.MAP_EACH_BUFFER): what they gather, flatten and free every
        step goes back to the OS instead of fragmenting the heap."""
        return cls.defers_init(cfg)

    @staticmethod
    def defers_init(cfg: RunConfig) -> bool:
        """Whether this engine takes the model on the meta device and materializes, initialises and
        shards it one init unit at a time (`materialize_sharded`), so no rank holds the whole model."""
        return False

    def materialize_sharded(self, shard_unit) -> None:
        """Deferred init: each init unit (LMHeadModel.init_units) materialized on the CPU, initialised
        from (train.seed, its name) exactly as the single-process init does, then handed to
        `shard_unit(name, unit)`, which keeps this rank's share. One unit is whole at a time (the
        units outside the blocks stay whole until the engine shards the root)."""
        # while units come and go, each tensor of 1 MB and more is mapped on its own: a freed whole
        # unit goes back to the OS instead of leaving holes in the heap that shards do not fill
        # (measured, GAM 109M at 2 ranks: 0.79-1.04x the model's bytes per rank with heap holes)
        tune_cpu_allocator(mmap_threshold=MAP_EACH_BUFFER)
        for name, unit in self.module.init_units():
            unit.to_empty(device="cpu", recurse=True)
            self.module.init_unit(name, unit, self.cfg.train.seed)
            shard_unit(name, unit)
        if self.device.type != "cpu":  # CPU training keeps MAP_EACH_BUFFER (see __init__)
            tune_cpu_allocator(mmap_threshold=32 << 20)  # glibc's largest default threshold

    def build_optimizer(self, fused: bool = False) -> torch.optim.AdamW:
        return build_adamw(self.module, self.cfg.optim, fused=fused)

    def train_step(self, batches: list[Batch], step: int, total_steps: int) -> StepResult:
        """One optimizer step (0-based `step` of `total_steps`) over this rank's micro-batches."""
        lr = lr_at(step, total_steps, self.cfg.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_scale = 1.0 / len(batches)
        loss_sum = torch.zeros((), device=self.device)
        for i, (inputs, targets) in enumerate(batches):
            last = i == len(batches) - 1
            inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            torch.compiler.cudagraph_mark_step_begin()  # train.accel=compile-graphs: the last replay's outputs are done with
            with self.gradient_sync(last):
                loss_sum += self.forward_backward(inputs, targets, loss_scale)
        grad_norm = self.optimizer_step()
        loss = float(all_reduce_mean(loss_sum / len(batches)))
        return StepResult(loss, grad_norm, lr)

    def gradient_sync(self, enabled: bool):
        """Context for one micro-batch: synchronize gradients across ranks in its backward or not."""
        return contextlib.nullcontext()

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor, loss_scale: float) -> torch.Tensor:
        """Forward + backward of one micro-batch; returns its unscaled loss (detached, fp32)."""
        with self.autocast():
            _, loss = self.model(inputs, targets, return_logits=False)
        (loss * loss_scale).backward()
        return loss.detach().float()

    def optimizer_step(self) -> float:
        """Clip, step, zero grads; returns the global gradient norm before clipping."""
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = self.clip_gradients(clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def clip_gradients(self, max_norm: float) -> float:
        """Scale gradients to a global norm of at most max_norm; returns the norm before."""
        return float(clip_grad_norm(self.module.parameters(), max_norm))

    def autocast(self):
        return autocast_for(self.device, self.cfg.train.precision)()

    def eval_model(self) -> nn.Module:
        """The module to evaluate through (same forward as training, no grad)."""
        return self.model

    @abstractmethod
    def stage_save(self, directory: Path) -> Callable[[object], None]:
        """Snapshot this rank's share of the state into memory now (collective), and return the
        function that writes it into `directory`, durably (fsynced): run at once, or later in a
        background thread, with its collectives only on the process group it is given (None: the
        default group). The snapshot is all a training step waits for under an async save."""

    @abstractmethod
    def load(self, directory: Path) -> None: ...

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights as plain CPU tensors (complete on rank 0; collective)."""
