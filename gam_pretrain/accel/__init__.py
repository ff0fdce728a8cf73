"""Fast paths, applied to a plain model from outside (as torchtitan applies float8 and compile).

    model = apply_accel(build_model(cfg.model), cfg.train.accel, device)

runs right after the model is built and before an engine wraps it. Kinds (`train.accel`):

  none     the plain model.
  compile  regional torch.compile: each `model.blocks[i]` compiled in place (parameter names and
           the state dict unchanged); the Mamba scan is left out of the compiled regions.
  auto     what measured fastest on the device (see `resolve`).

Whatever the kind, Mamba mixers get the scan `model.scan` asks for (scan.py): mamba-ssm's CUDA
kernel or a PyTorch loop with a hand-written backward, in place of the plain autograd loop.

There is no CPU kernel path any more: fused C++ kernels for the fp32 CPU step (LayerNorm, bias +
GELU, bias + dropout + residual, GAM's gated mix, the causal conv, the tied head + cross-entropy)
measured within noise of the plain model (0.98x, 0.98x and 1.06x its speed over three runs at the
paper config; results/bench_models_cpu_kernels.json): the matmuls are ~84% of a CPU step.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..models.mamba import SelectiveScan
from .scan import scan_for

KINDS = ("auto", "none", "compile")


def resolve(kind: str, model: nn.Module, device: torch.device) -> str:
    """The kind `auto` stands for on this device; other kinds are returned as they are, once checked.

    auto, from tools/bench_models.py at the paper config (results/bench_models_*.json):
    - CPU: `none`. Regional compile measured 0.88x-0.97x the plain fp32 step on a 2-core CPU
      (the step is matmul-bound; inductor's fused elementwise code does not pay for its overhead).
    - CUDA: `compile`. torch.compile of GAM ran the bf16 step 1.36x faster than the plain model on
      an H200 (results/bench_models_h200.json). Except for Mamba: its step is the scan, which
      compile leaves out, so `none` spares the compile time.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown train.accel {kind!r}; choose one of {list(KINDS)}")
    if kind != "auto":
        return kind
    if device.type == "cuda" and not any(isinstance(m, SelectiveScan) for m in model.modules()):
        return "compile"
    return "none"


def apply_accel(model: nn.Module, kind: str, device: torch.device) -> nn.Module:
    """`model` with the fast path `kind` applied (in place), and the Mamba scan `model.scan` picks."""
    device = torch.device(device)
    kind = resolve(kind, model, device)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, SelectiveScan):
                scan = scan_for(model.cfg.scan, device)
                if kind == "compile":  # hundreds of tiny steps: slow to trace, and nothing to fuse across
                    scan.forward = torch.compiler.disable(scan.forward)
                setattr(parent, name, scan)
    if kind == "compile":
        for block in model.blocks:
            block.compile()
    return model


__all__ = ["KINDS", "apply_accel", "resolve"]
