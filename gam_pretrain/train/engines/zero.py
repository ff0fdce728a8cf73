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
from ...files import first_line
from ..checkpoint import CheckpointError, load_torch_file
from ..distributed import DistInfo
from .base import Batch, Engine, StepResult, uses_bf16

TAG = "deepspeed"


def deepspeed_safe_globals() -> list:
    """The classes DeepSpeed pickles into its checkpoint files besides tensors and plain data (found
    in ZeRO 0-3 checkpoints, fp32 and bf16): plain records whose construction runs no code.
    DynamicLossScaler is what fp16 (through engine.deepspeed_extra) stores in LossScaler's place."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class _TorchWithSafeLoad:
    """The torch module as zero_to_fp32 sees it while we merge: the same, except that load() is
    weights_only with DeepSpeed's allow-list (zero_to_fp32 calls torch.load(weights_only=False))."""

    def __init__(self, allowed: list):
        self.allowed = allowed

    def __getattr__(self, name):
        return getattr(torch, name)

    def load(self, f, map_location=None, weights_only=None, **kwargs):
        return load_torch_file(f, map_location=map_location, allowed=self.allowed, **kwargs)


def read_zero_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The whole fp32 model merged from a ZeRO checkpoint's partitions by DeepSpeed's zero_to_fp32,
    offline and at any world size; nothing in the files can run code."""
    from deepspeed.utils import zero_to_fp32

    if not list((checkpoint / TAG).glob("*_optim_states.pt")):
        # ZeRO stage 0 partitions nothing (zero_to_fp32 reads stages 1-3): the module's weights as
        # they are, in the precision they trained in (bf16 ones keep their fp32 masters elsewhere)
        states = load_torch_file(checkpoint / TAG / "mp_rank_00_model_states.pt", allowed=deepspeed_safe_globals())
        if not isinstance(states, dict) or not isinstance(states.get("module"), dict):
            raise CheckpointError(f"{checkpoint / TAG / 'mp_rank_00_model_states.pt'} holds no model weights")
        return states["module"]
    zero_to_fp32.torch = _TorchWithSafeLoad(deepspeed_safe_globals())
    try:
        return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=TAG)
    except CheckpointError:
        raise
    except Exception as e:  # a checkpoint that loads but is not what zero_to_fp32 expects
        raise CheckpointError(f"{checkpoint / TAG} is not a readable ZeRO checkpoint ({first_line(e)})") from None
    finally:
        zero_to_fp32.torch = torch


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
        # DeepSpeed reads every file through its checkpoint engine's load(), which calls
        # torch.load(weights_only=False): for this call only, that method reads weights_only.
        files = self.model.checkpoint_engine
        allowed = deepspeed_safe_globals()
        files.load = lambda path, map_location=None: load_torch_file(path, map_location, allowed)
        try:
            path, _ = self.model.load_checkpoint(str(directory), tag=TAG, load_module_strict=True,
                                                 load_optimizer_states=True, load_lr_scheduler_states=False)
        finally:
            del files.load  # the class's own method again
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory}")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        if self.config["zero_optimization"]["stage"] == 3:
            import deepspeed

            params = list(self.model.module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                return {k: v.detach().float().cpu().clone() for k, v in self.model.module.state_dict().items()}
        return {k: v.detach().float().cpu() for k, v in self.model.module.state_dict().items()}
