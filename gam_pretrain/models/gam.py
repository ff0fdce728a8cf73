"""Gated Associative Memory (GAM), Acharya 2025 (arXiv 2509.00605).

Per block, with h = LN(x):
    local  = depthwise causal conv1d(h), kernel k (k-1 zeros padded on the left)
    global = softmax(h M^T) M              M: learned memory bank (slots x C), no 1/sqrt(C) scaling
    g_l, g_g = split(Linear(C, 2C)(h))
    x = x + sigmoid(g_l) * local + sigmoid(g_g) * global
    x = x + FFN(LN(x))                    FFN: C -> 4C -> C with GELU

The memory bank does not depend on the input, so the only mixing across positions is the conv:
the output at t sees at most 1 + L(k-1) tokens (L layers).

Table 3 ablations are variants of the mixer: "gated" (the model above), "sum" (local + global,
no gate), "global" (memory only, no gate, no conv), "local" (conv only, no gate, no memory).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cpu_kernels
from .common import CausalDepthwiseConv, Dropout, LayerNorm, LMHeadModel, ModelConfig

Mixing = Literal["gated", "sum", "global", "local"]


class LinearGELU(nn.Linear):
    """GELU(Linear(x)), exact GELU. On CPU (fp32) the bias add and the GELU are one fused kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_kernels.applies_to(x):
            return cpu_kernels.bias_gelu(F.linear(x, self.weight), self.bias)
        return F.gelu(super().forward(x))


class LinearDropoutAdd(nn.Linear):
    """Linear(x), or with a residual and a dropout: residual + dropout(Linear(x)), where on CPU (fp32)
    the bias, the dropout and the add are one fused kernel."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                dropout: Dropout | None = None) -> torch.Tensor:
        if residual is None:
            return super().forward(x)
        if cpu_kernels.applies_to(x):
            return dropout.add_to(residual, F.linear(x, self.weight), self.bias)
        return dropout.add_to(residual, super().forward(x))


class FeedForward(nn.Sequential):
    def __init__(self, d_model: int, dropout: float):
        # the Identity holds GELU's old place, so parameter names stay those of
        # (Linear, GELU, Linear, Dropout): ffn.0.*, ffn.2.*
        super().__init__(LinearGELU(d_model, 4 * d_model), nn.Identity(), LinearDropoutAdd(4 * d_model, d_model),
                         Dropout(dropout))

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """residual + FFN(x)."""
        up, _, down, dropout = self
        return down(up(x), residual, dropout)


class GatedMix(nn.Linear):
    """GAM's gates g_l, g_g = Linear(C, 2C)(h) and the mix they drive:
        residual + dropout(sigmoid(g_l) * local + sigmoid(g_g) * glob)
    On CPU (fp32) everything after the matmul (the gate's bias, the sigmoids, the mix, the dropout
    and the residual add) is one fused kernel."""

    def __init__(self, d_model: int):
        super().__init__(d_model, 2 * d_model)

    def forward(self, h, local, glob, residual, dropout: Dropout) -> torch.Tensor:
        if cpu_kernels.applies_to(h):
            return cpu_kernels.gated_mix(residual, F.linear(h, self.weight), self.bias, local, glob, dropout.active_p)
        g_local, g_global = torch.sigmoid(super().forward(h)).chunk(2, dim=-1)
        return dropout.add_to(residual, torch.addcmul(g_local * local, g_global, glob))


class GAMBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, mixing: Mixing = "gated"):
        super().__init__()
        C = cfg.d_model
        self.mixing = mixing
        self.ln1 = LayerNorm(C)
        self.conv = CausalDepthwiseConv(C, cfg.conv_kernel) if mixing != "global" else None
        self.memory = nn.Parameter(torch.empty(cfg.memory_slots, C)) if mixing != "local" else None
        self.gate = GatedMix(C) if mixing == "gated" else None
        self.mix_dropout = Dropout(cfg.dropout)
        self.ln2 = LayerNorm(C)
        self.ffn = FeedForward(C, cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        local = self.conv(h) if self.conv is not None else None
        glob = torch.softmax(h @ self.memory.t(), dim=-1) @ self.memory if self.memory is not None else None
        if self.mixing == "gated":
            x = self.gate(h, local, glob, x, self.mix_dropout)
        else:
            mixed = local + glob if self.mixing == "sum" else (local if local is not None else glob)
            x = self.mix_dropout.add_to(x, mixed)  # x + dropout(mixed)
        return self.ffn.add_to(x, self.ln2(x))  # x + FFN(LN(x))


class GAM(LMHeadModel):
    def __init__(self, cfg: ModelConfig, mixing: Mixing = "gated"):
        super().__init__(cfg, learned_positions=True)
        self.mixing = mixing
        self.blocks = nn.ModuleList(GAMBlock(cfg, mixing) for _ in range(cfg.n_layers))
        self.final_norm = LayerNorm(cfg.d_model)
        self.init_weights()

    def _init_special(self) -> None:
        for block in self.blocks:
            if block.memory is not None:
                nn.init.normal_(block.memory, std=self.cfg.init_std)

    def receptive_field(self) -> int:
        """Tokens the output at t can depend on (t itself included)."""
        if self.mixing == "global":
            return 1
        return 1 + self.cfg.n_layers * (self.cfg.conv_kernel - 1)

    def forward_flops_breakdown(self, seq_len: int | None = None) -> dict[str, int]:
        c = self.cfg
        C, L = c.d_model, c.n_layers
        out = {
            "conv": L * 2 * C * c.conv_kernel if self.mixing != "global" else 0,
            "memory": L * 4 * c.memory_slots * C if self.mixing != "local" else 0,
            "gate": L * 2 * C * 2 * C if self.mixing == "gated" else 0,
            "ffn": L * 2 * 2 * C * 4 * C,
            "head": self.head_flops(),
        }
        return out
