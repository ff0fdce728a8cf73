"""DeepSpeed ZeRO stages 0-3 (stage 3 shards parameters too: the FSDP-style mode).

The DeepSpeed JSON is generated from our config (micro-batch, accumulation, clipping, ZeRO stage,
offload, bf16) and `engine.deepspeed_extra` (a JSON object) is merged over it. The optimizer is a
torch AdamW passed in by us (DeepSpeed's fused CPU/GPU Adam need a C++ build at first use).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.nn as nn

from ...config import RunConfig
from ..distributed import DistInfo
from .base import Batch, Engine, StepResult, uses_bf16

TAG = "deepspeed"


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(cfg: RunConfig, world_size: int, bf16: bool) -> dict:
    stage, t = cfg.engine.zero_stage, cfg.train
    zero = {"stage": stage}
    if stage == 3:
        zero["memory_efficient_linear"] = False  # else it patches F.linear for the whole process
    if cfg.engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.engine.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
    }
    if cfg.engine.deepspeed_extra:
        ds = deep_merge(ds, json.loads(cfg.engine.deepspeed_extra))
    return ds


def share_fp32_master_partitions(optimizer) -> int:
    """Make ZeRO-3's fp32 master partitions the parameter partitions themselves when both are fp32.

    DeepSpeed means to do this (stage3.py `_create_fp32_partitions`: "we don't need another copy of
    the weights") but its test compares `tensor.device` with the accelerator's device *name*, a
    string, which is never equal, so fp32 training keeps a second fp32 copy of every partition. With
    one storage, the optimizer updates the partition in place and DeepSpeed's copy back after the
    step copies a tensor onto itself. Returns the number of bytes freed.
    """
    freed = 0
    for params, master in zip(optimizer.fp16_partitioned_groups_flat, optimizer.fp32_partitioned_groups_flat):
        if params is None or master.untyped_storage().data_ptr() == params.untyped_storage().data_ptr():
            continue
        if params.dtype != master.dtype or params.device != master.device or params.shape != master.shape:
            continue  # bf16 parameters need their fp32 master
        if master in optimizer.optimizer.state:
            continue  # state already keyed and built on the copy: leave it alone
        freed += master.numel() * master.element_size()
        master.data = params.data
    return freed


class DeepSpeedEngine(Engine):
    """DeepSpeed runs backward and step() on every micro-batch itself: it scales the loss by
    1 / gradient_accumulation_steps, reduces gradients and clips and steps on the boundary."""

    def __init__(self, model: nn.Module, cfg: RunConfig, device: torch.device, dist: DistInfo):
        import deepspeed

        if device.type == "cpu":
            # DeepSpeed JIT-compiles a shared-memory all-reduce (~1 min) used only for inference.
            import importlib

            # importlib, not `import deepspeed.comm.torch as m`: that form resolves to the torch
            # package that deepspeed.comm re-exports under the same name.
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        super().__init__(model, cfg, device, dist)
        self.config = deepspeed_config(cfg, dist.world_size, uses_bf16(device, cfg.train.precision))
        self.model, self.optimizer, _, _ = deepspeed.initialize(model=self.module, optimizer=self.build_optimizer(),
                                                                config=self.config)
        offload = cfg.engine.offload_optimizer or cfg.engine.offload_params
        if cfg.engine.zero_stage == 3 and not offload:
            share_fp32_master_partitions(self.optimizer)

    def train_step(self, batches: list[Batch], step: int, total_steps: int) -> StepResult:
        # DeepSpeed scales every micro-batch's loss by 1 / gradient_accumulation_steps from its config
        if len(batches) != self.config["gradient_accumulation_steps"]:
            raise ValueError(f"DeepSpeed was configured for {self.config['gradient_accumulation_steps']} micro-batches "
                             f"per step (train.grad_accum) and got {len(batches)}")
        return super().train_step(batches, step, total_steps)

    def autocast(self):
        return contextlib.nullcontext()  # DeepSpeed's bf16 mode casts the model itself

    @contextlib.contextmanager
    def gradient_sync(self, enabled: bool):
        # the boundary micro-batch reduces gradients and steps: ours, not DeepSpeed's micro-step counter
        self.model.set_gradient_accumulation_boundary(enabled)
        yield

    def forward_backward(self, inputs, targets, loss_scale):
        _, loss = self.model(inputs, targets, return_logits=False)
        self.model.backward(loss)  # scaled by DeepSpeed (see train_step), not by loss_scale
        self.model.step()  # clips and steps on the boundary micro-batch only
        return loss.detach().float()

    def optimizer_step(self) -> float:
        # DeepSpeed already stepped inside the last micro-batch's `step()`; report the norm it clipped with
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def save(self, directory: Path) -> None:
        self.model.save_checkpoint(str(directory), tag=TAG, save_latest=False)

    def load(self, directory: Path) -> None:
        path, _ = self.model.load_checkpoint(str(directory), tag=TAG, load_module_strict=True,
                                             load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory}")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        if self.config["zero_optimization"]["stage"] == 3:
            import deepspeed

            params = list(self.model.module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                return {k: v.detach().float().cpu().clone() for k, v in self.model.module.state_dict().items()}
        return {k: v.detach().float().cpu() for k, v in self.model.module.state_dict().items()}
