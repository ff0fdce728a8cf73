"""GAM-Assoc (beyond the paper): GAM's gated local and global pathways, with a global pathway that
writes the sequence into an associative memory causally and reads it by content.

The paper's global pathway reads a learned memory bank that is the same for every input, so it
mixes nothing across positions (gam.py). Here each head keeps a d x d matrix S (d = C / H) that the
tokens write into as they pass (the delta rule: a write replaces what S returned for that key
before, by beta_t of the way), and every position reads it with its query: O(T) time, a fixed-size
state, and a receptive field of the whole prefix. Per block, with h = LN(x):

    local            = depthwise causal conv1d(h), kernel k                  (GAM's local pathway)
    q_t, k_t, v_t    = split(Linear(C, 3C)(h_t)) per head; q_t, k_t scaled to unit length
    beta_t           = sigmoid(Linear(C, H)(h_t))                            write strength per head
    S_t              = S_{t-1} + beta_t (v_t - S_{t-1} k_t) k_t^T            S_0 = 0
    read_t           = RMSNorm(S_t q_t) per head                             all heads: (T, C)
    global           = Linear(C, C)(read)
    g_l, g_g         = split(Linear(C, 2C)(h))
    x = x + dropout(sigmoid(g_l) * local + sigmoid(g_g) * global)           (GAM's gated fusion)
    x = x + FFN(LN(x))

With `assoc_conv` = w > 0, q, k, v are SiLU(conv1d_w(Linear(C, 3C)(h))) instead: a second depthwise causal
conv over the projections (DeltaNet's short convolution), so a token's key can hold the tokens before it and
one layer can file "b follows a" under a's key; without it only the next layer's keys see earlier tokens,
through the local pathway. Measured at CPU scale with heads of 32 (README, "Results (beyond the paper)") it
learned recall with 16 pairs at T=256 in 1,500 steps where the block without it did not (seed 0), but was slower to
learn it elsewhere and worse on language modelling, so it is an option, off by default. (With heads of 64,
the sweep ladder's, and over seeds 0-2, the block without it learned that cell in 600 steps in two
seeds of three; with heads of 32 in one, at 0.154: too few seeds to rank the head sizes.)

`delta_rule` is that recurrence as written (the definition, and the decoding step); training runs
`delta_rule_chunked`, the same function computed a chunk at a time (DeltaNet's chunkwise form, Yang
et al. 2024): inside a chunk of c tokens the writes are folded into W = T (beta K) and
U = T (beta V) with T = (I + tril(diag(beta) K K^T, -1))^-1, so that

    O     = Q S^T + tril(Q K^T) (U - W S^T)          (S: the state at the chunk's start)
    S_new = S + (U - W S^T)^T K

and only the states between chunks are sequential: T/c steps of d x d matrices.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import CausalDepthwiseConv, FeedForward, LMHeadModel, ModelConfig, causal_conv_decode

CHUNK = 64  # tokens per chunk of the chunked form (its cost: T c d per head inside chunks, T d^2 across)


def delta_rule(q, k, v, beta, state=None):
    """The recurrence token by token: q, k, v (B, H, T, d), beta (B, H, T), state (B, H, d, d) or
    None (zeros). Returns (outputs S_t q_t (B, H, T, d), the last state)."""
    B, H, T, d = q.shape
    S = q.new_zeros(B, H, d, d) if state is None else state
    outs = []
    for t in range(T):
        k_t, v_t, b_t = k[:, :, t], v[:, :, t], beta[:, :, t, None]
        S = S + (b_t * (v_t - (S @ k_t[..., None]).squeeze(-1)))[..., None] * k_t[..., None, :]
        outs.append((S @ q[:, :, t, :, None]).squeeze(-1))
    return torch.stack(outs, dim=2), S


def delta_rule_chunked(q, k, v, beta, chunk: int = CHUNK):
    """`delta_rule` from a zero state, a chunk at a time (see the module docstring). Same shapes.
    Computed in at least float32 whatever the inputs' precision (the triangular solve has no bf16
    kernel, and the chunk's write corrections are sums bf16 would round away), returned in v's dtype."""
    dtype, work = v.dtype, torch.promote_types(v.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        out = _delta_rule_chunked(*(x.to(work) for x in (q, k, v, beta)), chunk)
    return out.to(dtype)


def _delta_rule_chunked(q, k, v, beta, chunk: int):
    B, H, T, d = q.shape
    chunk = min(chunk, T)
    pad = (-T) % chunk
    if pad:  # padded keys and betas of zero write nothing; their outputs are dropped
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        beta = F.pad(beta, (0, pad))
    n = (T + pad) // chunk
    q, k, v = (x.reshape(B, H, n, chunk, d) for x in (q, k, v))
    beta = beta.reshape(B, H, n, chunk, 1)
    strictly_lower = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril(-1)
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    A = ((beta * k) @ k.transpose(-1, -2)).masked_fill(~strictly_lower, 0)
    eye = torch.eye(chunk, dtype=q.dtype, device=q.device)
    T_inv = torch.linalg.solve_triangular(eye + A, eye.expand_as(A), upper=False, unitriangular=True)
    W, U = T_inv @ (beta * k), T_inv @ (beta * v)
    scores = (q @ k.transpose(-1, -2)).masked_fill(~lower, 0)
    S = q.new_zeros(B, H, d, d)
    outs = []
    # unbind, not x[:, :, i]: an indexed chunk's backward fills a zero tensor the size of all chunks, O(n^2) in all
    for q_i, k_i, U_i, W_i, scores_i in zip(*(x.unbind(2) for x in (q, k, U, W, scores))):
        new = U_i - W_i @ S.transpose(-1, -2)  # what each write adds, given S
        outs.append(q_i @ S.transpose(-1, -2) + scores_i @ new)
        S = S + new.transpose(-1, -2) @ k_i
    return torch.stack(outs, dim=2).reshape(B, H, n * chunk, d)[:, :, :T]


class GAMAssocBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C = cfg.d_model
        if C % cfg.n_heads:
            raise ValueError(f"d_model {C} is not divisible by n_heads {cfg.n_heads}")
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(C)
        self.conv = CausalDepthwiseConv(C, cfg.conv_kernel)
        self.qkv = nn.Linear(C, 3 * C, bias=False)
        self.qkv_conv = CausalDepthwiseConv(3 * C, cfg.assoc_conv) if cfg.assoc_conv else None
        self.write = nn.Linear(C, cfg.n_heads)  # beta
        self.read_norm = nn.RMSNorm(C // cfg.n_heads, eps=1e-5)
        self.out = nn.Linear(C, C, bias=False)
        self.gate = nn.Linear(C, 2 * C)
        self.mix_dropout = nn.Dropout(cfg.dropout) if cfg.mix_dropout else nn.Identity()
        self.ln2 = nn.LayerNorm(C)
        self.ffn = FeedForward(C, cfg.dropout)

    def forward(self, x: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        B, T, C = x.shape
        h = self.ln1(x)
        local = self.conv(h) if state is None else causal_conv_decode(self.conv, h, state, "h")
        qkv = self.qkv(h)
        if self.qkv_conv is not None:
            qkv = F.silu(self.qkv_conv(qkv) if state is None else causal_conv_decode(self.qkv_conv, qkv, state, "qkv"))
        q, k, v = qkv.view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        beta = torch.sigmoid(self.write(h)).transpose(1, 2)  # (B, H, T)
        if state is None:
            read = delta_rule_chunked(q, k, v, beta)
        else:  # decoding: the memory is the state (in at least float32, as the chunked form computes)
            work = torch.promote_types(v.dtype, torch.float32)
            read, state["S"] = delta_rule(*(t.to(work) for t in (q, k, v, beta)), state.get("S"))
            read = read.to(v.dtype)
        glob = self.out(self.read_norm(read).transpose(1, 2).reshape(B, T, C))
        g_local, g_global = torch.sigmoid(self.gate(h)).chunk(2, dim=-1)
        x = x + self.mix_dropout(g_local * local + g_global * glob)
        return x + self.ffn(self.ln2(x))

    def decode(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        return self.forward(x, state)


class GAMAssoc(LMHeadModel):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, learned_positions=True)
        self.blocks = nn.ModuleList(GAMAssocBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model)

    def receptive_field(self) -> int | None:
        """Tokens the output at t can depend on: every earlier one (None: unbounded)."""
        return None

    def forward_flops_breakdown(self, seq_len: int | None = None) -> dict[str, int]:
        c = self.cfg
        C, L, H, T = c.d_model, c.n_layers, c.n_heads, seq_len or c.block_size
        d = C // H
        chunk = min(CHUNK, T)
        return {
            "conv": L * 2 * C * c.conv_kernel,
            "qkv": L * 2 * C * 3 * C,
            "qkv_conv": L * 2 * 3 * C * c.assoc_conv,
            "write": L * 2 * C * H,
            # per head and token, chunked: the triangular solve's inputs (K K^T) and W, U (c d each, x3),
            # Q K^T and its product with the new values (c d each), Q S^T, W S^T and the state update (d^2 each);
            # the solve itself (about c^2) is not a matmul and not counted, as torch's flop counter does not
            "memory": L * H * 2 * (5 * chunk * d + 3 * d * d),
            "out": L * 2 * C * C,
            "gate": L * 2 * C * 2 * C,
            "ffn": L * 2 * 2 * C * 4 * C,
            "head": self.head_flops(),
        }
