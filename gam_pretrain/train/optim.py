"""AdamW with the usual decay split (matrices and embeddings decay; biases, norms, A_log and D do
not), or, with optim.decay=all, the paper's: every parameter decays."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import OptimConfig

NO_DECAY_NAMES = ("A_log", "D")


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 partition's data is flat: its shape is ds_shape
        if not decay_all and (ndim < 2 or name.split(".")[-1] in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(model: nn.Module, cfg: OptimConfig, fused: bool = False) -> torch.optim.AdamW:
    """fused=True: one kernel per tensor (CPU and CUDA, torch >= 2.4), for the single-process engine.
    The distributed engines use the default multi-tensor (foreach) update, the same arithmetic in
    DDP, ZeRO and FSDP2, so their fp32 loss curves agree bit for bit."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.decay == "all"), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, fused=fused or None)


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (same total norm, same scaling), minus its multiply of every
    gradient by 1.0 when the norm is within max_norm: bit-identical (x * 1.0 == x) and one pass over
    the gradients fewer on most steps. Reads the coefficient on the host (the engines read the norm
    for logging anyway)."""
    params = [p for p in parameters if p.grad is not None]
    if not hasattr(torch.nn.utils, "get_total_norm"):  # torch < 2.6
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if float(max_norm / (norm + 1e-6)) < 1.0:  # torch's coefficient, before its clamp to 1
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm
