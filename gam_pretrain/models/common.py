"""Pieces every model family shares: the config, embeddings, tied LM head, loss, init, counting."""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
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


class Dropout(nn.Dropout):
    """nn.Dropout whose mask is drawn faster on CPU; elsewhere (CUDA, torch.compile) it is nn.Dropout.

    On CPU torch draws dropout masks with one serial Mersenne Twister (`bernoulli_`, ~6 ns per
    element on the 2-core reference machine: 5% of a GAM training step at the paper config). Here
    the uniforms come from numpy's PCG64, in two halves drawn on two threads, seeded by one draw
    from torch's default generator per call: `torch.manual_seed` and the checkpointed torch RNG
    state still fix every mask, so resumes stay exact. Same distribution as nn.Dropout (keep with
    probability 1 - p, to 2^-24; kept values scaled by 1 / (1 - p)), not the same random stream.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._cpu_mask(x):
            return super().forward(x)
        return x * cpu_keep_mask(x.shape, self.p).to(x.dtype)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """residual + dropout(x), one pass fewer on CPU (the mask multiply is fused into the add)."""
        if not self._cpu_mask(x):
            return residual + super().forward(x)
        return torch.addcmul(residual, x, cpu_keep_mask(x.shape, self.p).to(x.dtype))

    def _cpu_mask(self, x: torch.Tensor) -> bool:
        return (self.training and 0.0 < self.p < 1.0 and x.device.type == "cpu"
                and not torch.compiler.is_compiling())


_MASK_PARTS = 2  # fixed, not the thread count, so masks do not depend on the machine
_mask_pool: tuple[int, ThreadPoolExecutor] | None = None


def cpu_keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """float32 tensor of 0 and 1/(1-p), each entry kept with probability 1 - p."""
    global _mask_pool
    n = math.prod(shape)
    seed = int(torch.randint(0, 2**62, (1,)))
    mask = np.empty(n, dtype=np.float32)
    parts = np.array_split(mask, _MASK_PARTS)
    generators = [np.random.Generator(np.random.PCG64(s)) for s in np.random.SeedSequence(seed).spawn(_MASK_PARTS)]
    threshold, scale = np.float32(p), np.float32(1.0 / (1.0 - p))

    def fill(gen: np.random.Generator, part: np.ndarray) -> None:
        for chunk in np.array_split(part, max(1, part.size >> 16)):  # ~256 KB pieces stay in cache
            gen.random(out=chunk, dtype=np.float32)
            np.greater_equal(chunk, threshold, out=chunk, casting="unsafe")  # 1.0 where kept, else 0.0
            np.multiply(chunk, scale, out=chunk)

    if n < 1 << 16:
        for gen, part in zip(generators, parts):
            fill(gen, part)
    else:  # numpy releases the GIL in these loops: the halves are drawn in parallel
        if _mask_pool is None or _mask_pool[0] != os.getpid():  # a forked child needs its own thread
            _mask_pool = (os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="dropout-mask"))
        other = _mask_pool[1].submit(fill, generators[1], parts[1])
        fill(generators[0], parts[0])
        other.result()
    return torch.from_numpy(mask).view(shape)


class TiedHeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of x @ W^T against targets, with fewer passes over the (tokens x vocab) logits.

    Forward keeps only the log-probabilities. Backward forms softmax - onehot once and folds the 1/N
    of the mean into the two matmuls (their alpha) instead of torch's zero-filled NLL gradient, then
    log_softmax's backward: three fewer passes over a 2048 x 10000 fp32 buffer per step at the paper
    config on CPU. Same function and gradients up to float rounding. Also returns the
    log-probabilities (no gradient flows through them).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
        log_probs = torch.log_softmax(x @ weight.t(), dim=-1)
        loss = -log_probs.gather(1, targets[:, None]).mean()
        ctx.save_for_backward(x, weight, log_probs, targets)
        ctx.mark_non_differentiable(log_probs)
        return log_probs, loss

    @staticmethod
    def backward(ctx, _grad_log_probs, grad_loss):
        x, weight, log_probs, targets = ctx.saved_tensors
        scale = float(grad_loss) / targets.numel()
        grad_logits = torch.exp(log_probs)
        grad_logits.scatter_add_(1, targets[:, None], grad_logits.new_full((targets.numel(), 1), -1.0))
        grad_x = torch.addmm(x, grad_logits, weight, beta=0, alpha=scale)  # beta=0: x is only a shape
        grad_weight = torch.addmm(weight, grad_logits.t(), x, beta=0, alpha=scale)
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
        if (targets is not None and not return_logits and x.device.type == "cpu"
                and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling() and targets.min() >= 0):
            _, loss = TiedHeadCrossEntropy.apply(x.reshape(-1, x.shape[-1]), self.tok_emb.weight, targets.reshape(-1))
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


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Depthwise causal conv over time. x: (B, T, C); weight: (C, 1, k). Left-pads k-1 zeros.

    Run as a 2-D conv over (B, C, 1, T) in channels-last layout, which is x's own memory order:
    no transposed copies in or out (4x faster forward + backward on CPU than conv1d over a
    transposed x at the paper config).
    """
    k, channels = weight.shape[-1], x.shape[-1]
    padded = F.pad(x, (0, 0, k - 1, 0)).unsqueeze(1).permute(0, 3, 1, 2)  # (B, C, 1, T + k - 1) channels-last
    y = F.conv2d(padded, weight.unsqueeze(2), bias, groups=channels)
    return y.permute(0, 2, 3, 1).squeeze(1)


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


def ceil_div(a: int, b: int) -> int:
    return math.ceil(a / b)
