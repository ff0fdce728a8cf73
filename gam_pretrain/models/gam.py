"""Gated Associative Memory (GAM), Acharya 2025 (arXiv 2509.00605).

Per block, with h = LN(x):
    local  = depthwise causal conv1d(h), kernel k (k-1 zeros padded on the left)
    global = softmax(h M^T) M              M: learned memory bank (slots x C), no 1/sqrt(C) scaling
    g_l, g_g = split(Linear(C, 2C)(h))
    x = x + dropout(sigmoid(g_l) * local + sigmoid(g_g) * global)   (that dropout only with mix_dropout)
    x = x + FFN(LN(x))                    FFN: C -> 4C -> C with GELU, then dropout

The memory bank does not depend on the input, so the only mixing across positions is the conv:
the output at t sees at most 1 + L(k-1) tokens (L layers).

Table 3 ablations are variants of the mixer: "gated" (the model above), "sum" (local + global,
no gate), "global" (memory only, no gate, no conv), "local" (conv only, no gate, no memory).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from .common import CausalDepthwiseConv, FeedForward, LMHeadModel, ModelConfig, causal_conv_decode

Mixing = Literal["gated", "sum", "global", "local"]


class GAMBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, mixing: Mixing = "gated"):
        super().__init__()
        C = cfg.d_model
        self.mixing = mixing
        self.ln1 = nn.LayerNorm(C)
        self.conv = CausalDepthwiseConv(C, cfg.conv_kernel) if mixing != "global" else None
        self.memory = nn.Parameter(torch.empty(cfg.memory_slots, C)) if mixing != "local" else None
        self.gate = nn.Linear(C, 2 * C) if mixing == "gated" else None
        self.mix_dropout = nn.Dropout(cfg.dropout) if cfg.mix_dropout else nn.Identity()
        self.ln2 = nn.LayerNorm(C)
        self.ffn = FeedForward(C, cfg.dropout)

    def forward(self, x: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        h = self.ln1(x)
        if self.conv is None:
            local = None
        elif state is None:
            local = self.conv(h)
        else:  # decoding: the conv's left context is the last k - 1 normalized inputs (the memory read needs none)
            local = causal_conv_decode(self.conv, h, state, "h")
        glob = torch.softmax(h @ self.memory.t(), dim=-1) @ self.memory if self.memory is not None else None
        if self.mixing == "gated":
            g_local, g_global = torch.sigmoid(self.gate(h)).chunk(2, dim=-1)
            mixed = g_local * local + g_global * glob
        elif self.mixing == "sum":
            mixed = local + glob
        else:
            mixed = local if local is not None else glob
        x = x + self.mix_dropout(mixed)
        return x + self.ffn(self.ln2(x))

    def decode(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        return self.forward(x, state)


class GAM(LMHeadModel):
    def __init__(self, cfg: ModelConfig, mixing: Mixing = "gated"):
        super().__init__(cfg, learned_positions=True)
        self.mixing = mixing
        self.blocks = nn.ModuleList(GAMBlock(cfg, mixing) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model)

    def _init_special(self, unit: nn.Module) -> None:
        for block in unit.modules():
            if not isinstance(block, GAMBlock) or block.memory is None:
                continue
            if self.cfg.init == "torch-default":
                nn.init.xavier_uniform_(block.memory)  # the paper's code
            else:
                nn.init.normal_(block.memory, std=self.cfg.init_std)

    def receptive_field(self) -> int:
        """Tokens the output at t can depend on (t itself included)."""
        if self.mixing == "global":
            return 1
        return 1 + self.cfg.n_layers * (self.cfg.conv_kernel - 1)

    def forward_flops_breakdown(self, seq_len: int | None = None) -> dict[str, int]:
        c = self.cfg
        C, L = c.d_model, c.n_layers
        return {
            "conv": L * 2 * C * c.conv_kernel if self.mixing != "global" else 0,
            "memory": L * 4 * c.memory_slots * C if self.mixing != "local" else 0,
            "gate": L * 2 * C * 2 * C if self.mixing == "gated" else 0,
            "ffn": L * 2 * 2 * C * 4 * C,
            "head": self.head_flops(),
        }
