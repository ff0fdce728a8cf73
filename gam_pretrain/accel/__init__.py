"""Fast paths, applied to a plain model from outside (as torchtitan applies float8 and compile).

    model = apply_accel(build_model(cfg.model), cfg.train.accel, device)

runs right after the model is built and before an engine wraps it. Kinds (`train.accel`):

  none     the model as built (no compile).
  compile  regional torch.compile: each `model.blocks[i]` compiled in place (parameter names and
           the state dict unchanged); the Mamba scan is left out of the compiled regions.
  compile-graphs  the same with mode="reduce-overhead": each block's kernels replayed as a CUDA
           graph, for launch-bound sizes (the paper's 22M setting); on a CPU, as compile.
  auto     what measured fastest (see `resolve`).

Whatever the kind, Mamba mixers get the scan `model.scan` asks for (scan.py): a PyTorch loop with
a hand-written backward, a chunked scan, a Triton kernel or mamba-ssm's CUDA kernel, in place of the
model file's autograd loop (the same function; tests/test_accel.py).

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

KINDS = ("auto", "none", "compile", "compile-graphs")


def resolve(kind: str) -> str:
    """The kind `auto` stands for; other kinds are returned as they are, once checked.

    auto is `none` everywhere, from tools/bench_models.py at the paper config:
    - CPU: regional compile measured 0.91x-0.95x the plain fp32 step on 2 cores
      (results/bench_models_cpu.json): the step is matmul-bound.
    - CUDA: not measured yet. Whole-model compile of an older GAM ran the bf16 step 1.36x faster on
      an H200 (results/bench_models_h200.json), but regional compile under every engine (DeepSpeed
      ZeRO-3's parameter hooks inside compiled regions included) has not run on a GPU; until it
      has, `compile` is an explicit choice. Mamba's step is its scan, which compile leaves out.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown train.accel {kind!r}; choose one of {list(KINDS)}")
    return "none" if kind == "auto" else kind


def apply_accel(model: nn.Module, kind: str, device: torch.device) -> nn.Module:
    """`model` with the fast path `kind` applied (in place), and the Mamba scan `model.scan` picks."""
    device = torch.device(device)
    kind = resolve(kind)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, SelectiveScan):
                scan = scan_for(model.cfg.scan, device)
                if kind != "none":  # hundreds of tiny steps: slow to trace, and nothing to fuse across
                    scan.forward = torch.compiler.disable(scan.forward)
                setattr(parent, name, scan)
    if kind != "none":
        mode = "reduce-overhead" if kind == "compile-graphs" and device.type == "cuda" else None
        for block in model.blocks:
            block.compile(mode=mode)
    return model


__all__ = ["KINDS", "apply_accel", "resolve"]
