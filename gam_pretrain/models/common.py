"""Pieces every model family shares: the config, embeddings, tied LM head, loss, init, counting."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    """One config for every family; each family reads the fields it needs.

    Defaults are the paper's Table 1 setting (vocab 10k, block 256, width 512, 6 layers).
    """

    arch: str = "gam"  # a registry name: see `gam-pretrain models`
    vocab_size: int = 10000
    block_size: int = 256
    d_model: int = 512
    n_layers: int = 6
    dropout: float = 0.1
    # GAM
    memory_slots: int = 512
    conv_kernel: int = 3
    # Transformer
    n_heads: int = 8
    attention: Literal["naive", "sdpa"] = "sdpa"
    # Mamba
    stack: Literal["paper", "standard"] = "standard"
    d_state: int = 16
    d_conv: int = 4
    expand: int = 3
    scan: Literal["auto", "torch", "cuda"] = "auto"
    # Initialisation
    init_std: float = 0.02


class LMHeadModel(nn.Module):
    """Token (+ optional learned position) embedding -> family blocks -> final norm -> tied head.

    Subclasses build `self.blocks` (applied in order by `mix`) and `self.final_norm`.
    """

    def __init__(self, cfg: ModelConfig, learned_positions: bool = True):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model) if learned_positions else None
        self.emb_dropout = nn.Dropout(cfg.dropout)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """Everything between the embedding dropout and the final norm."""
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Returns logits (B, T, V); with targets, returns (logits, mean cross-entropy)."""
        T = idx.shape[1]
        if T > self.cfg.block_size and self.pos_emb is not None:
            raise ValueError(f"sequence length {T} exceeds block_size {self.cfg.block_size}")
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb.weight[:T]
        x = self.final_norm(self.mix(self.emb_dropout(x)))
        logits = F.linear(x, self.tok_emb.weight)  # tied head
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    # ---- initialisation -------------------------------------------------------------------
    def init_weights(self) -> None:
        """GPT-2 style: N(0, init_std) for linear/embedding weights, zero biases.

        Families re-initialise their special parameters afterwards (see `_init_special`).
        """
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        self._init_special()

    def _init_special(self) -> None:
        pass

    # ---- accounting -----------------------------------------------------------------------
    def num_parameters(self) -> int:
        """Unique trainable parameters (the tied head counts once)."""
        return sum(p.numel() for p in self.parameters())

    def forward_flops_breakdown(self, seq_len: int | None = None) -> dict[str, int]:
        """Forward FLOPs per token of every matmul/conv, by component (2 FLOPs per MAC)."""
        raise NotImplementedError

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training (forward + backward) matmul FLOPs per token: 3x the forward count.

        This is the convention MFU and scaling-law compute use (PaLM appendix B); elementwise work
        (softmax, norms, the Mamba scan) is not counted. Attention is counted over the full T x T.
        """
        return 3 * sum(self.forward_flops_breakdown(seq_len).values())

    def head_flops(self) -> int:
        return 2 * self.cfg.d_model * self.cfg.vocab_size


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Depthwise causal conv over time. x: (B, T, C); weight: (C, 1, k). Left-pads k-1 zeros."""
    k = weight.shape[-1]
    y = F.conv1d(F.pad(x.transpose(1, 2), (k - 1, 0)), weight, bias, groups=x.shape[-1])
    return y.transpose(1, 2)


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


def ceil_div(a: int, b: int) -> int:
    return math.ceil(a / b)
