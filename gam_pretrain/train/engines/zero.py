"""DeepSpeed ZeRO stages 0-3 (stage 3 shards parameters too: the FSDP-style mode).

The DeepSpeed JSON is generated from our config (micro-batch, accumulation, clipping, ZeRO stage,
offload, bf16) and `engine.deepspeed_extra` (a JSON object) is merged over it. The optimizer is a
torch AdamW passed in by us (DeepSpeed's fused CPU/GPU Adam need a C++ build at first use).
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import torch
import torch.nn as nn

from ...config import RunConfig, batch_layout
from ...files import first_line
from ..checkpoint import CheckpointError, load_torch_file, save_durably, snapshot
from ..distributed import DistInfo
from .base import Batch, Engine, StepResult, is_on_meta, uses_bf16

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
    weights_only with DeepSpeed's allow-list (zero_to_fp32 calls torch.load(weights_only=False)).

    With `moment` set (exp_avg or exp_avg_sq), each optimizer file's fp32 partitions are replaced by
    that Adam moment's partitions, which have the same flat layout: zero_to_fp32 then merges the
    moment into whole per-parameter tensors exactly as it merges the weights."""

    def __init__(self, allowed: list, moment: str | None = None):
        self.allowed, self.moment = allowed, moment

    def __getattr__(self, name):
        return getattr(torch, name)

    def load(self, f, map_location=None, weights_only=None, **kwargs):
        state = load_torch_file(f, map_location=map_location, allowed=self.allowed, **kwargs)
        if self.moment and str(f).endswith("_optim_states.pt"):
            _moment_as_fp32_groups(state, self.moment, f)
        return state


def _moment_as_fp32_groups(state: dict, moment: str, where) -> None:
    osd = state["optimizer_state_dict"]
    stage3 = "fp32_flat_groups" in osd
    base = osd["optimizer_state_dict" if stage3 else "base_optimizer_state"]
    if not isinstance(base, dict):
        raise CheckpointError(f"{where} holds ZeRO's elastic optimizer layout, which this reader does not merge")
    ids = [pid for group in base["param_groups"] for pid in group["params"]]  # one flat tensor per (sub-)group
    osd["fp32_flat_groups" if stage3 else "single_partition_of_fp32_groups"] = [base["state"][i][moment] for i in ids]


def zero_checkpoint_step(checkpoint: Path) -> torch.Tensor:
    """The Adam step count of a ZeRO checkpoint (every flat group shares it)."""
    files = sorted((checkpoint / TAG).glob("*_optim_states.pt"))
    osd = load_torch_file(files[0], allowed=deepspeed_safe_globals())["optimizer_state_dict"]
    base = osd.get("optimizer_state_dict", osd.get("base_optimizer_state"))
    first = base["param_groups"][0]["params"][0]
    return base["state"][first]["step"]


def zero_checkpoint_ranks(checkpoint: Path) -> int:
    """How many data-parallel ranks wrote a ZeRO checkpoint (0 for stage 0, which partitions nothing)."""
    return len(list((checkpoint / TAG).glob("*_optim_states.pt")))


def read_zero_weights(checkpoint: Path, moment: str | None = None) -> dict[str, torch.Tensor]:
    """The whole fp32 model (or, with `moment`, that Adam moment per parameter) merged from a ZeRO
    checkpoint's partitions by DeepSpeed's zero_to_fp32, offline and at any world size; nothing in
    the files can run code."""
    from deepspeed.utils import zero_to_fp32

    if not zero_checkpoint_ranks(checkpoint):
        # ZeRO stage 0 partitions nothing (zero_to_fp32 reads stages 1-3): the module's weights as
        # they are, in the precision they trained in (bf16 ones keep their fp32 masters elsewhere)
        states = load_torch_file(checkpoint / TAG / "mp_rank_00_model_states.pt", allowed=deepspeed_safe_globals())
        if not isinstance(states, dict) or not isinstance(states.get("module"), dict):
            raise CheckpointError(f"{checkpoint / TAG / 'mp_rank_00_model_states.pt'} holds no model weights")
        return states["module"]
    zero_to_fp32.torch = _TorchWithSafeLoad(deepspeed_safe_globals(), moment)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a report of every merge
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
    stage, layout = cfg.engine.zero_stage, batch_layout(cfg.train, world_size)
    zero = {"stage": stage}
    if stage == 3:
        zero["memory_efficient_linear"] = False  # else it patches F.linear for the whole process
        # Hugging Face's "auto" sizes for ZeRO-3 from the hidden size, in place of DeepSpeed's fixed
        # defaults (a 5e8-element reduce bucket: 2 GB in fp32, touched up to the whole gradient
        # before the first reduce). Measured at GAM 187M on 2 CPU ranks: 0.4 GiB less per rank.
        # DeepSpeed's default reuse distance and live-parameter cap (1e9 elements each) keep every
        # gathered block from the forward until its backward, for any model under 1e9 parameters: a
        # whole model per rank. Here a block (about 12 hidden^2) is released after its forward, and
        # prefetching stops at two blocks gathered. Peak per rank 2.75 -> 2.31 GiB at GAM 187M.
        hidden = cfg.model.d_model
        zero.update(reduce_bucket_size=hidden * hidden, stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
                    stage3_param_persistence_threshold=10 * hidden,
                    stage3_max_reuse_distance=hidden * hidden, stage3_max_live_parameters=24 * hidden * hidden)
    if cfg.engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.engine.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    ds = {
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        "train_batch_size": layout.global_batch,
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


def set_zero3_partition(optimizer, param, value: torch.Tensor, moment: str | None) -> None:
    """This rank's partition of a ZeRO-3 parameter's fp32 master (moment None) or Adam moment, from
    the whole value. DeepSpeed's own setter (safe_set_full_*) reads past the end of the value for
    the last rank of a parameter whose size does not divide by the world size: its partitions are
    padded. Here the padding is zero."""
    part, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=moment)
    flat = value.flatten()
    start = part.numel() * optimizer._get_param_partition_rank(param)
    have = max(0, min(part.numel(), flat.numel() - start))
    part.data[:have].copy_(flat[start:start + have])
    part.data[have:].zero_()


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
        if is_on_meta(self.module):  # deferred init (ZeRO-3): each unit partitioned as soon as it is initialised
            # zero.Init checks the batch keys against a world size of its own: give it the others only
            partition = {k: v for k, v in self.config.items() if k != "train_batch_size"}
            self.materialize_sharded(lambda name, unit: deepspeed.zero.Init(
                module=unit, config_dict_or_path=partition, mem_efficient_linear=False))
        # ZeRO-3 steps one flat partition: the fused AdamW makes no whole-partition temporaries (the
        # unfused update's sqrt and divide each copy it: +0.28 GiB per rank at GAM 187M on 2 ranks)
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=self.module, optimizer=self.build_optimizer(fused=cfg.engine.zero_stage == 3), config=self.config)
        offload = cfg.engine.offload_optimizer or cfg.engine.offload_params
        if cfg.engine.zero_stage == 3 and not offload:
            share_fp32_master_partitions(self.optimizer)

    @staticmethod
    def defers_init(cfg: RunConfig) -> bool:
        return cfg.engine.zero_stage == 3

    @classmethod
    def partitions_state(cls, cfg: RunConfig) -> bool:
        return cfg.engine.zero_stage >= 1

    def train_step(self, batches: list[Batch], step: int, total_steps: int) -> StepResult:
        # DeepSpeed scales every micro-batch's loss by 1 / gradient_accumulation_steps from its config
        if len(batches) != self.config["gradient_accumulation_steps"]:
            raise ValueError(f"DeepSpeed was configured for {self.config['gradient_accumulation_steps']} micro-batches "
                             f"per step and got {len(batches)}")
        return super().train_step(batches, step, total_steps)

    def autocast(self):
        return contextlib.nullcontext()  # DeepSpeed's bf16 mode casts the model itself

    @contextlib.contextmanager
    def gradient_sync(self, enabled: bool):
        # the boundary micro-batch reduces gradients and steps: ours, not DeepSpeed's micro-step counter
        self.model.set_gradient_accumulation_boundary(enabled)
        yield

    def forward_backward(self, inputs, targets, loss_scale):
        # through backward too: activation checkpointing recomputes a block's forward there
        with self.linears_save_parameters():
            _, loss = self.model(inputs, targets, return_logits=False)
            self.model.backward(loss)  # scaled by DeepSpeed (see train_step), not by loss_scale
        self.model.step()  # clips and steps on the boundary micro-batch only
        return loss.detach().float()

    @contextlib.contextmanager
    def linears_save_parameters(self):
        """Under ZeRO-3, every `F.linear` of the forward saves its parameter for backward, not a view of it.

        Plain `F.linear` saves `weight.t()`, a view: when ZeRO-3 releases a layer's gathered weight
        after its forward, the view keeps the whole gathered storage alive until backward, so every
        rank ends the forward holding the full model (+0.75 GiB per rank at GAM 187M on 2 ranks,
        +2.4 GiB at 601M). DeepSpeed's `memory_efficient_linear` fixes this by replacing
        `torch.nn.functional.linear` for the rest of the process (and every model in it); here the
        same autograd function is swapped in for our forward and backward only.
        """
        if self.config["zero_optimization"]["stage"] != 3:
            yield
            return
        from deepspeed.runtime.zero.linear import zero3_linear_wrap

        plain, torch.nn.functional.linear = torch.nn.functional.linear, zero3_linear_wrap
        try:
            yield
        finally:
            torch.nn.functional.linear = plain

    def optimizer_step(self) -> float:
        # DeepSpeed already stepped inside the last micro-batch's `step()`; report the norm it clipped with
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def stage_save(self, directory: Path):
        # DeepSpeed assembles each rank's files (its own partitions) through its checkpoint engine's
        # save(): for this call, that method keeps a snapshot of what it is given instead of writing
        captured = []
        files = self.model.checkpoint_engine
        files.save = lambda state_dict, path: captured.append((snapshot(state_dict), path))
        try:
            self.model.save_checkpoint(str(directory), tag=TAG, save_latest=False)
        finally:
            del files.save  # the class's own method again

        def write(group) -> None:
            for state, path in captured:
                save_durably(state, Path(path))
        return write

    def load(self, directory: Path) -> None:
        saved_ranks = zero_checkpoint_ranks(directory)
        if saved_ranks and saved_ranks != self.dist.world_size:
            return self.load_resharded(directory)
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

    def load_resharded(self, directory: Path) -> None:
        """A checkpoint written by another number of ranks: its weights and Adam moments merged whole
        per parameter (read_zero_weights), then each rank keeps its own partition of them (DeepSpeed's
        safe_set_full_* API for ZeRO-1/2, set_zero3_partition for ZeRO-3). Each rank holds the merged state while it loads (CPU memory:
        3x the fp32 model), which a same-size resume never does."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        merged = {"weights": read_zero_weights(directory)}
        for moment in ("exp_avg", "exp_avg_sq"):
            merged[moment] = read_zero_weights(directory, moment)
        step = zero_checkpoint_step(directory)
        optimizer, stage3 = self.optimizer, self.config["zero_optimization"]["stage"] == 3
        # the fp32 partitions Adam steps; its state is created lazily at the first step: create it here
        flats = optimizer.fp32_partitioned_groups_flat if stage3 else optimizer.single_partition_of_fp32_groups
        for flat in flats:
            state = optimizer.optimizer.state[flat]
            for moment in ("exp_avg", "exp_avg_sq"):
                state.setdefault(moment, torch.zeros_like(flat, memory_format=torch.preserve_format))
            state["step"] = step.clone()
        if not stage3:
            optimizer._hp_optimizer_states_linked = False
            optimizer._lazy_init_hp_params_optimizer_state()  # map each parameter's fragment of the state just made
        for name, param in self.model.module.named_parameters():
            if any(name not in values for values in merged.values()):
                raise CheckpointError(f"{directory / TAG} has no parameter {name} (another model?)")
            if merged["weights"][name].shape != getattr(param, "ds_shape", param.shape):
                raise CheckpointError(f"{directory / TAG}: {name} has shape {tuple(merged['weights'][name].shape)}, "
                                      "this model's differs")
            for moment in (None, "exp_avg", "exp_avg_sq"):
                value = merged[moment or "weights"][name].to(self.device)
                if stage3:
                    set_zero3_partition(optimizer, param, value, moment)
                elif moment is None:
                    safe_set_full_fp32_param(param, value)
                else:
                    safe_set_full_optimizer_state(param, value, moment)
        if stage3:
            for params, master in zip(optimizer.fp16_partitioned_groups_flat, optimizer.fp32_partitioned_groups_flat):
                params.data.copy_(master.data)  # a no-op where the two share storage (fp32)
        else:
            optimizer.update_lp_params()  # the module's replicas from the fp32 partitions

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        if self.config["zero_optimization"]["stage"] == 3:
            import deepspeed

            # a forward (evaluation's last) can leave the next parameters' prefetch in flight, which
            # GatheredParameters cannot re-partition: wait for those and release every gathered one
            self.model.empty_partition_cache()
            params = list(self.model.module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                return {k: v.detach().float().cpu().clone() for k, v in self.model.module.state_dict().items()}
        return {k: v.detach().float().cpu() for k, v in self.model.module.state_dict().items()}
