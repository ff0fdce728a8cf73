"""Pieces every model family shares: the config, embeddings, tied LM head, loss, init, counting."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F


HEADED_ARCHS = ("transformer", "gam-assoc")  # architectures whose n_heads splits d_model


@dataclass
class ModelConfig:
    """One config for every family; each family reads the fields it needs.

    Defaults are the paper's Table 1 setting (vocab 10k, block 256, width 512, 6 layers).
    """

    arch: str = "gam"  # a registry name: see `gam-pretrain models`
    vocab_size: int = 10000  # tokens in the vocabulary (embedding and tied head rows)
    block_size: int = 256  # longest sequence; rows of the learned position embedding
    d_model: int = 512  # width C of the residual stream
    n_layers: int = 6  # blocks
    dropout: float = 0.1  # probability, on the embedding, every residual branch and the attention weights
    mix_dropout: bool = True  # GAM: dropout on the fused local/global branch too (false: as the paper's code, which has none there)
    # GAM
    memory_slots: int = 512  # GAM: rows of each block's learned memory bank M
    conv_kernel: int = 3  # GAM: width k of the depthwise causal conv
    # Transformer
    n_heads: int = 8  # Transformer: attention heads; gam-assoc: memory heads (d_model must divide by it)
    assoc_conv: int = 0  # gam-assoc: width of a causal depthwise conv (and SiLU) over q, k, v before the memory; 0: none
    attention: Literal["naive", "sdpa"] = "sdpa"  # Transformer: naive: the T x T softmax, as the paper; sdpa: same function, fused kernels
    # Mamba
    stack: Literal["paper", "standard"] = "standard"  # Mamba: paper: bare mixers, as the paper ran; standard: pre-norm residual blocks
    d_state: int = 16  # Mamba: SSM state size n per channel
    d_conv: int = 4  # Mamba: width of the depthwise causal conv
    expand: int = 3  # Mamba: inner width d_inner = expand * d_model
    scan: Literal["auto", "torch", "chunked", "triton", "cuda"] = "auto"  # Mamba scan, installed by gam_pretrain.accel: torch (sequential), chunked, triton, cuda (mamba-ssm); auto: cuda, else chunked on CUDA; torch on CPU
    # Initialisation
    init: Literal["gpt2", "torch-default"] = "gpt2"  # gpt2: N(0, init_std) weights, zero biases; torch-default: PyTorch's module defaults, as the paper's code (xavier-uniform memory, mamba-ssm's dt/A/D)
    init_std: float = 0.02  # init gpt2: std of the N(0, std) init of linear and embedding weights and GAM's memory


class FeedForward(nn.Sequential):
    """C -> 4C -> GELU -> C, then dropout. Parameter names ffn.0.*, ffn.2.*."""

    def __init__(self, d_model: int, dropout: float):
        super().__init__(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model),
                         nn.Dropout(dropout))


class CausalDepthwiseConv(nn.Conv1d):
    """Depthwise conv over time on (B, T, C) inputs, with k - 1 zeros padded on the left (causal)."""

    def __init__(self, channels: int, kernel_size: int, bias: bool = True):
        super().__init__(channels, channels, kernel_size, groups=channels, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As a 2-D conv over (B, C, 1, T) in channels-last layout, which is x's own memory order: no
        # transposed copies in or out (4x faster forward + backward on CPU than conv1d on x.transpose).
        k = self.kernel_size[0]
        padded = F.pad(x, (0, 0, k - 1, 0)).unsqueeze(1).permute(0, 3, 1, 2)
        y = F.conv2d(padded, self.weight.unsqueeze(2), self.bias, groups=self.groups)
        return y.permute(0, 2, 3, 1).squeeze(1)


def unit_seed(seed: int, name: str) -> int:
    """The seed of one init unit's random stream: a function of the run's seed and the unit's name."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy, in fp32 whatever the logits' dtype; targets of -100 are ignored."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten())


class DecodeCache:
    """What decoding keeps between calls: the tokens seen so far, and one dict of state per block
    (each family's `decode` fills its own: the conv's last inputs, attention keys and values, SSM
    states)."""

    def __init__(self, n_layers: int):
        self.length = 0
        self.layers: list[dict] = [{} for _ in range(n_layers)]


def causal_conv_decode(conv: "CausalDepthwiseConv", x: torch.Tensor, state: dict, key: str) -> torch.Tensor:
    """The causal conv of the new inputs x (B, T, C), its left context the last k - 1 inputs seen
    (state[key]; zeros at the start, as the full forward's padding), which it then updates."""
    k = conv.kernel_size[0]
    past = state.get(key)
    if past is None:
        past = x.new_zeros(x.shape[0], k - 1, x.shape[2])
    window = torch.cat([past, x], dim=1)
    state[key] = window[:, window.shape[1] - (k - 1):]
    y = F.conv2d(window.unsqueeze(1).permute(0, 3, 1, 2), conv.weight.unsqueeze(2), conv.bias, groups=conv.groups)
    return y.permute(0, 2, 3, 1).squeeze(1)


class LMHeadModel(nn.Module):
    """Token (+ optional learned position) embedding -> family blocks -> final norm -> tied head.

    Subclasses build `self.blocks` (applied in order) and `self.final_norm`.
    """

    def __init__(self, cfg: ModelConfig, learned_positions: bool = True):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model) if learned_positions else None
        self.emb_dropout = nn.Dropout(cfg.dropout)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, return_logits: bool = True):
        """Logits (B, T, V); with targets, (logits, mean cross-entropy), or (None, loss) with
        return_logits=False (what the trainer asks for: the loss without keeping the logits)."""
        T = idx.shape[1]
        if T > self.cfg.block_size and self.pos_emb is not None:
            raise ValueError(f"sequence length {T} exceeds block_size {self.cfg.block_size}")
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb.weight[:T]
        x = self.emb_dropout(x)
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.final_norm(x), self.tok_emb.weight)  # tied head
        if targets is None:
            return logits
        return (logits if return_logits else None), cross_entropy(logits, targets)

    def decode(self, idx: torch.Tensor, cache: "DecodeCache") -> torch.Tensor:
        """Logits (B, T, V) of the tokens `idx` that follow the `cache.length` tokens already seen,
        from each block's state in `cache` (which it updates): the full forward's logits at those
        positions, at the cost of the new tokens only. A prompt goes in whole, then one token at a time."""
        start, T = cache.length, idx.shape[1]
        if start + T > self.cfg.block_size and self.pos_emb is not None:
            raise ValueError(f"decoding past block_size {self.cfg.block_size}: start again from the window")
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb.weight[start:start + T]
        for block, state in zip(self.blocks, cache.layers):
            x = block.decode(x, state)
        cache.length += T
        return F.linear(self.final_norm(x), self.tok_emb.weight)

    def init_units(self) -> list[tuple[str, nn.Module]]:
        """The pieces the model is initialised in: the modules outside the blocks, then each block.

        Each unit draws from its own random stream, keyed by the run's seed and the unit's name
        (`unit_seed`), so its values do not depend on what else is materialized: deferred init
        (FSDP2, ZeRO-3) builds the model on the meta device and materializes, initialises and shards
        one unit at a time, and gets the weights of the single-process init bit for bit."""
        if list(self.parameters(recurse=False)):
            raise TypeError(f"{type(self).__name__} holds parameters outside its submodules; init units miss them")
        outside = [(name, module) for name, module in self.named_children() if name != "blocks"]
        return outside + [(f"blocks.{i}", block) for i, block in enumerate(self.blocks)]

    def init_weights(self, seed: int = 0) -> None:
        """Every unit (`init_units`), each from the stream (seed, its name)."""
        for name, unit in self.init_units():
            self.init_unit(name, unit, seed)

    @torch.no_grad()
    def init_unit(self, name: str, unit: nn.Module, seed: int) -> None:
        """`init: gpt2`: N(0, init_std) for linear/embedding weights, zero biases, PyTorch's defaults for
        the rest (norms, convs). `init: torch-default`: every module's own reset_parameters (PyTorch's
        defaults: kaiming-uniform linear and conv weights with their uniform biases, N(0, 1) position
        embeddings), and the tied token embedding initialised as the head nn.Linear(C, V) it is in the
        paper's code, U(+-1/sqrt(C)). Families then initialise their special parameters
        (`_init_special`). The global random state is left as it was."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(unit_seed(seed, name))
            for module in unit.modules():
                if self.cfg.init == "gpt2" and isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
                    if getattr(module, "bias", None) is not None:
                        nn.init.zeros_(module.bias)
                elif hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            if self.cfg.init == "torch-default" and unit is self.tok_emb:
                nn.init.kaiming_uniform_(self.tok_emb.weight, a=math.sqrt(5))  # nn.Linear's own weight init
            self._init_special(unit)

    def _init_special(self, unit: nn.Module) -> None:
        pass

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
