"""DeepSpeed ZeRO stages 0-3 (stage 3 shards parameters too: the FSDP-style mode).

The DeepSpeed JSON is generated from our config (micro-batch, accumulation, clipping, ZeRO stage,
offload, bf16) and `engine.deepspeed_extra` (a JSON object) is merged over it. The optimizer is a
torch AdamW passed in by us (DeepSpeed's fused CPU/GPU Adam need a C++ build at first use).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from ...config import EngineConfig, OptimConfig
from ..distributed import DistInfo
from ..optim import build_adamw
from .base import Engine, apply_activation_checkpointing, autocast_for, uses_bf16

TAG = "deepspeed"


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(engine_cfg: EngineConfig, optim_cfg: OptimConfig, micro_batch: int, grad_accum: int,
                     world_size: int, bf16: bool) -> dict:
    zero = {"stage": engine_cfg.zero_stage}
    if engine_cfg.zero_stage == 3:
        zero["memory_efficient_linear"] = False  # else it patches F.linear for the whole process
    if engine_cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if engine_cfg.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": optim_cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
    }
    if engine_cfg.deepspeed_extra:
        cfg = deep_merge(cfg, json.loads(engine_cfg.deepspeed_extra))
    return cfg


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
    def __init__(self, model: nn.Module, optim_cfg: OptimConfig, device: torch.device, precision: str,
                 compile: bool, engine_cfg: EngineConfig, dist: DistInfo, micro_batch: int, grad_accum: int):
        import deepspeed

        if device.type == "cpu":
            # DeepSpeed JIT-compiles a shared-memory all-reduce (~1 min) used only for inference.
            import importlib

            # importlib, not `import deepspeed.comm.torch as m`: that form resolves to the torch
            # package that deepspeed.comm re-exports under the same name.
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        self.device, self.dist = device, dist
        model = model.to(device)
        if engine_cfg.activation_checkpointing:
            apply_activation_checkpointing(model)
        bf16 = uses_bf16(device, precision)
        self.config = deepspeed_config(engine_cfg, optim_cfg, micro_batch, grad_accum, dist.world_size, bf16)
        optimizer = build_adamw(model, optim_cfg)
        self.model, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config)
        if engine_cfg.zero_stage == 3 and not (engine_cfg.offload_optimizer or engine_cfg.offload_params):
            share_fp32_master_partitions(self.optimizer)
        if compile:
            self.model.compile()
        self._autocast = autocast_for(device, "fp32")  # DeepSpeed's bf16 mode casts the model itself
        self._grad_norm = 0.0

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def forward_backward(self, inputs, targets, loss_scale):
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        _, loss = self.model(inputs, targets, return_logits=False)
        self.model.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
        boundary = self.model.is_gradient_accumulation_boundary()
        self.model.step()  # a real optimizer step only at the accumulation boundary
        if boundary:
            norm = self.model.get_global_grad_norm()
            self._grad_norm = float(norm) if norm is not None else float("nan")
        return loss.detach().float()

    def optimizer_step(self) -> float:
        return self._grad_norm

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

    def eval_model(self) -> nn.Module:
        return self.model
