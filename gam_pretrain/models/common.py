"""Pieces every model family shares: the config, embeddings, tied LM head, loss, init, counting."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cpu_kernels


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


class Dropout(nn.Dropout):
    """nn.Dropout whose CPU fp32 path runs the fused kernels of `cpu_kernels` (masks from a counter
    hash keyed by torch's generator, recomputed in backward; see that module). Elsewhere (CUDA,
    other dtypes, torch.compile) it is nn.Dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and 0.0 < self.p < 1.0 and cpu_kernels.applies_to(x)):
            return super().forward(x)
        return cpu_kernels.bias_dropout_add(None, x, None, self.p)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """residual + dropout(x + bias), in one pass on CPU."""
        if not cpu_kernels.applies_to(x) or self.active_p >= 1.0:
            return residual + super().forward(x if bias is None else x + bias)
        return cpu_kernels.bias_dropout_add(residual, x, bias, self.active_p)

    @property
    def active_p(self) -> float:
        """The drop probability this call applies: p in training, 0 in eval."""
        return self.p if self.training else 0.0


class TiedHeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of x @ W^T against targets, with one pass over the (tokens x vocab) logits.

    Forward turns the logits, in place, into E = exp(logits - row max) and keeps E and each row's
    1 / sum(E). The gradient (softmax - onehot) / N is never formed: with D = diag(1 / sum(E)),
        dL/dx = (D E W - W[targets]) / N,    dL/dW = (E^T (D x) - onehot^T x) / N,
    so backward is the two matmuls plus work on (tokens x width) tensors. torch's path makes five
    more passes over the 2048 x 10000 fp32 logits per step at the paper config. Same function and
    gradients up to float rounding.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
        exp_logits = x @ weight.t()
        row_loss, inv_sum = cpu_kernels.softmax_cross_entropy_rows(exp_logits, targets)
        ctx.save_for_backward(x, weight, exp_logits, inv_sum, targets)
        return row_loss.mean()

    @staticmethod
    def backward(ctx, grad_loss):
        x, weight, exp_logits, inv_sum, targets = ctx.saved_tensors
        scale = float(grad_loss) / targets.numel()
        row_scale = (inv_sum * scale)[:, None]
        grad_x = torch.mm(exp_logits, weight).mul_(row_scale).sub_(weight[targets], alpha=scale)
        grad_weight = torch.mm(exp_logits.t(), x * row_scale).index_add_(0, targets, x, alpha=-scale)
        return grad_x, grad_weight, None


class LMHeadModel(nn.Module):
    """Token (+ optional learned position) embedding -> family blocks -> final norm -> tied head.

    Subclasses build `self.blocks` (applied in order by `mix`) and `self.final_norm`.
    """

    def __init__(self, cfg: ModelConfig, learned_positions: bool = True):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model) if learned_positions else None
        self.emb_dropout = Dropout(cfg.dropout)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """Everything between the embedding dropout and the final norm."""
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, return_logits: bool = True):
        """Returns logits (B, T, V); with targets, returns (logits, mean cross-entropy).

        return_logits=False (what the trainer asks for) returns (None, loss) and lets a CPU step
        compute the head and the loss together (`TiedHeadCrossEntropy`).
        """
        T = idx.shape[1]
        if T > self.cfg.block_size and self.pos_emb is not None:
            raise ValueError(f"sequence length {T} exceeds block_size {self.cfg.block_size}")
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb.weight[:T]
        x = self.final_norm(self.mix(self.emb_dropout(x)))
        if (targets is not None and not return_logits and cpu_kernels.applies_to(x)
                and not torch.is_autocast_enabled("cpu") and targets.min() >= 0):
            loss = TiedHeadCrossEntropy.apply(x.reshape(-1, x.shape[-1]), self.tok_emb.weight, targets.reshape(-1))
            return None, loss
        logits = F.linear(x, self.tok_emb.weight)  # tied head
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return (logits if return_logits else None), loss

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


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm; on CPU (fp32) one fused kernel each way (`cpu_kernels.layer_norm`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_kernels.applies_to(x) and self.weight is not None and self.bias is not None:
            return cpu_kernels.layer_norm(x, self.weight, self.bias, self.eps)
        return super().forward(x)


class CausalDepthwiseConv(nn.Conv1d):
    """Depthwise causal conv over time on (B, T, C) inputs, kernel k (weight (C, 1, k), with bias)."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__(channels, channels, kernel_size, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return causal_depthwise_conv(x, self.weight, self.bias)


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Depthwise causal conv over time. x: (B, T, C); weight: (C, 1, k). Left-pads k-1 zeros.

    fp32 on CPU: the fused kernel (`cpu_kernels.causal_conv`). Otherwise a 2-D conv over
    (B, C, 1, T) in channels-last layout, which is x's own memory order: no transposed copies in
    or out (4x faster forward + backward on CPU than conv1d over a transposed x).
    """
    if cpu_kernels.applies_to(x) and (fused := cpu_kernels.causal_conv(x, weight, bias)) is not None:
        return fused
    k, channels = weight.shape[-1], x.shape[-1]
    padded = F.pad(x, (0, 0, k - 1, 0)).unsqueeze(1).permute(0, 3, 1, 2)  # (B, C, 1, T + k - 1) channels-last
    y = F.conv2d(padded, weight.unsqueeze(2), bias, groups=channels)
    return y.permute(0, 2, 3, 1).squeeze(1)


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


def ceil_div(a: int, b: int) -> int:
    return math.ceil(a / b)
