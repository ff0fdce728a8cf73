"""GPT-style pre-LN Transformer baseline.

`attention: naive` materialises the T x T masked softmax, as the paper's baseline does (its memory
grows quadratically with length). `attention: sdpa` computes the same function with
torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient kernels on GPU):
the fair baseline.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import FeedForward, LMHeadModel, ModelConfig


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model {cfg.d_model} is not divisible by n_heads {cfg.n_heads}")
        self.n_heads = cfg.n_heads
        self.attention = cfg.attention
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        if state is not None:  # decoding: attend over the cached keys and values as well (KV cache)
            if "k" in state:
                k, v = torch.cat([state["k"], k], dim=2), torch.cat([state["v"], v], dim=2)
            state["k"], state["v"] = k, v
            past = k.shape[2] - T
            visible = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
            return self.proj(y.transpose(1, 2).reshape(B, T, C))
        if self.attention == "sdpa":
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
            )
        else:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
            y = self.attn_dropout(torch.softmax(scores, dim=-1)) @ v
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ffn = FeedForward(cfg.d_model, cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.ffn(self.ln2(x))

    def decode(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), state)
        return x + self.ffn(self.ln2(x))


class Transformer(LMHeadModel):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, learned_positions=True)
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model)

    def forward_flops_breakdown(self, seq_len: int | None = None) -> dict[str, int]:
        c = self.cfg
        C, L, T = c.d_model, c.n_layers, seq_len or c.block_size
        return {
            "qkv": L * 2 * C * 3 * C,
            "attention": L * 2 * 2 * T * C,  # QK^T and AV over the full T x T (no causal discount)
            "proj": L * 2 * C * C,
            "ffn": L * 2 * 2 * C * 4 * C,
            "head": self.head_flops(),
        }
