"""Mamba (Gu & Dao 2023) selective state-space baseline.

The mixer is mamba-ssm's `Mamba` block (in_proj -> causal depthwise conv -> SiLU -> selective scan,
gated by SiLU(z) -> out_proj), with its defaults: dt_rank = ceil(C/16), S4D-real A init, dt in
[1e-3, 1e-1]. Two stacks:

- `stack: paper`: what the GAM paper ran: embeddings + learned positions, then the mixers applied
  one after another with NO residual connections or norms between them, then a final LayerNorm.
- `stack: standard`: mamba-ssm's MambaLMHeadModel: x = x + Mamba(RMSNorm(x)) per layer, final
  RMSNorm, no positional embedding (the recurrence carries position). The fair baseline.

The scan has two implementations with one signature: a pure-PyTorch recurrence that trains on CPU
and any GPU, and mamba-ssm's fused CUDA kernel, used when the input is on CUDA and `mamba_ssm`
imports (`scan: auto`), or forced with `scan: cuda` / `scan: torch`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import Dropout, LayerNorm, LMHeadModel, ModelConfig, causal_depthwise_conv, inverse_softplus

try:  # optional fused kernels (pip install 'gam-pretrain[gpu]')
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _cuda_selective_scan
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _cuda_selective_scan = None


class _SelectiveScan(torch.autograd.Function):
    """The scan core, time-major: h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t ; y_t = C_t . h_t.

    delta, u: (l, b, d); A: (d, n); B, C: (l, b, n) -> y: (l, b, d); h_0 = 0.
    Forward and backward are explicit loops over time that do all per-step work on (b, d, n) slices,
    which stay in cache; only the states h_t are kept for backward. Left to autograd, the same
    loop costs a full-size gradient buffer per step (quadratic in l), and full-tensor passes
    (exp, products, reductions over (l, b, d, n)) are memory-bound: this is ~4x faster on CPU.
    """

    @staticmethod
    def forward(ctx, delta, u, A, B, C):
        delta_u = delta * u
        hs = delta.new_empty(delta.shape + (A.shape[1],))
        y = torch.empty_like(delta)
        h = torch.zeros_like(hs[0])
        for t in range(delta.shape[0]):
            decay = torch.exp(delta[t].unsqueeze(-1) * A)
            h = torch.addcmul(delta_u[t].unsqueeze(-1) * B[t].unsqueeze(1), decay, h, out=hs[t])
            torch.matmul(h, C[t].unsqueeze(-1), out=y[t].unsqueeze(-1))
        ctx.save_for_backward(delta, u, A, B, C, hs)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        delta, u, A, B, C, hs = ctx.saved_tensors
        delta_u = delta * u
        grad_delta, grad_delta_u = torch.empty_like(delta), torch.empty_like(delta)
        grad_B, grad_C, grad_A = torch.empty_like(B), torch.empty_like(C), torch.zeros_like(A)
        grad_h = torch.zeros_like(hs[0])  # dL/dh_t, carried backwards through time
        for t in range(delta.shape[0] - 1, -1, -1):
            grad_h.addcmul_(grad_y[t].unsqueeze(-1), C[t].unsqueeze(1))
            torch.matmul(grad_y[t].unsqueeze(1), hs[t], out=grad_C[t].unsqueeze(1))
            torch.matmul(grad_h, B[t].unsqueeze(-1), out=grad_delta_u[t].unsqueeze(-1))
            torch.matmul(delta_u[t].unsqueeze(1), grad_h, out=grad_B[t].unsqueeze(1))
            decay = torch.exp(delta[t].unsqueeze(-1) * A)
            if t > 0:  # decay_0 multiplies h_{-1} = 0, so it gets no gradient
                grad_log_decay = grad_h * hs[t - 1] * decay  # dL/d(delta_t A)
                grad_delta[t] = (grad_log_decay * A).sum(-1)
                grad_A.add_((grad_log_decay * delta[t].unsqueeze(-1)).sum(0))
            else:
                grad_delta[t].zero_()
            grad_h.mul_(decay)
        grad_delta.addcmul_(grad_delta_u, u)
        return grad_delta, grad_delta_u * delta, grad_A, grad_B, grad_C


def selective_scan_torch(u, delta, A, B, C, D, z=None, delta_bias=None, delta_softplus=True):
    """Selective scan in plain PyTorch, with mamba-ssm's `selective_scan_fn` signature.

    u, delta, z: (b, d, l); A: (d, n); B, C: (b, n, l); D: (d,). Returns y: (b, d, l).
    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t ;  y_t = C_t . h_t + D u_t ;  y *= silu(z).
    """
    dtype = u.dtype
    u, delta, B, C = u.float(), delta.float(), B.float(), C.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    # Time-major and contiguous, so every per-step slice in the scan is one dense block of memory.
    time_major = lambda x: x.permute(2, 0, 1).contiguous()  # noqa: E731
    y = _SelectiveScan.apply(time_major(delta), time_major(u), A.float().contiguous(), time_major(B), time_major(C))
    y = y.permute(1, 2, 0) + u * D.float()[:, None]  # (b, d, l)
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)


class MambaMixer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C = cfg.d_model
        self.d_inner = cfg.expand * C
        self.d_state = cfg.d_state
        self.dt_rank = math.ceil(C / 16)
        self.scan = cfg.scan
        self.in_proj = nn.Linear(C, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, cfg.d_conv, groups=self.d_inner, bias=True)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * cfg.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, cfg.d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, C, bias=False)

    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 1e-1, dt_floor: float = 1e-4) -> None:
        """mamba-ssm's initialisation of A, D and the dt projection."""
        with torch.no_grad():
            std = self.dt_rank**-0.5
            nn.init.uniform_(self.dt_proj.weight, -std, std)
            dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            self.dt_proj.bias.copy_(inverse_softplus(dt.clamp(min=dt_floor)))
            A = torch.arange(1, self.d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
            self.A_log.copy_(torch.log(A))
            self.D.fill_(1.0)

    def _scan_fn(self, x: torch.Tensor):
        if self.scan == "torch":
            return selective_scan_torch
        if self.scan == "cuda" and (_cuda_selective_scan is None or not x.is_cuda):
            raise RuntimeError("model.scan=cuda needs a CUDA device and `mamba_ssm` (pip install 'gam-pretrain[gpu]')")
        if x.is_cuda and _cuda_selective_scan is not None:
            return _cuda_selective_scan
        return selective_scan_torch

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (b, l, d_inner) each
        x = F.silu(causal_depthwise_conv(x, self.conv1d.weight, self.conv1d.bias))
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, self.dt_proj.weight)  # bias and softplus are applied inside the scan
        y = self._scan_fn(x)(
            x.transpose(1, 2).contiguous(),
            delta.transpose(1, 2).contiguous(),
            -torch.exp(self.A_log.float()),
            B.transpose(1, 2).contiguous(),
            C.transpose(1, 2).contiguous(),
            self.D.float(),
            z=z.transpose(1, 2).contiguous(),
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
        )
        return self.out_proj(y.transpose(1, 2))

    @torch.no_grad()
    def step(self, hidden_t, conv_state, ssm_state):
        """One token of the recurrence (as mamba-ssm's decoding step).

        hidden_t: (b, C); conv_state: (b, d_inner, d_conv); ssm_state: (b, d_inner, n).
        Returns (out_t, conv_state, ssm_state).
        """
        x, z = self.in_proj(hidden_t).chunk(2, dim=-1)
        conv_state = torch.cat([conv_state[:, :, 1:], x.unsqueeze(-1)], dim=-1)
        x = F.silu((conv_state * self.conv1d.weight.squeeze(1)).sum(-1) + self.conv1d.bias)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt))
        A = -torch.exp(self.A_log)
        ssm_state = ssm_state * torch.exp(dt.unsqueeze(-1) * A) + (dt * x).unsqueeze(-1) * B.unsqueeze(1)
        y = (ssm_state @ C.unsqueeze(-1)).squeeze(-1) + self.D * x
        return self.out_proj(y * F.silu(z)), conv_state, ssm_state


class ResidualMambaBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.RMSNorm(cfg.d_model, eps=1e-5)
        self.mixer = MambaMixer(cfg)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout.add_to(x, self.mixer(self.norm(x)))  # x + dropout(mixer(norm(x)))


class Mamba(LMHeadModel):
    def __init__(self, cfg: ModelConfig):
        paper = cfg.stack == "paper"
        super().__init__(cfg, learned_positions=paper)
        if paper:
            self.blocks = nn.ModuleList(MambaMixer(cfg) for _ in range(cfg.n_layers))
            self.final_norm = LayerNorm(cfg.d_model)
        else:
            self.blocks = nn.ModuleList(ResidualMambaBlock(cfg) for _ in range(cfg.n_layers))
            self.final_norm = nn.RMSNorm(cfg.d_model, eps=1e-5)
        self.init_weights()

    def mixers(self) -> list[MambaMixer]:
        return [m for m in self.modules() if isinstance(m, MambaMixer)]

    def _init_special(self) -> None:
        for mixer in self.mixers():
            mixer.reset_ssm_parameters()

    def forward_flops_breakdown(self, seq_len: int | None = None) -> dict[str, int]:
        c = self.cfg
        C, L, D = c.d_model, c.n_layers, c.expand * c.d_model
        R = math.ceil(C / 16)
        return {
            "in_proj": L * 2 * C * 2 * D,
            "conv": L * 2 * D * c.d_conv,
            "x_proj": L * 2 * D * (R + 2 * c.d_state),
            "dt_proj": L * 2 * R * D,
            "scan_readout": L * 2 * D * c.d_state,  # y_t = C_t . h_t, a contraction over the state
            "out_proj": L * 2 * D * C,
            "head": self.head_flops(),
        }

    def scan_flops_per_token(self) -> int:
        """Elementwise forward FLOPs of the scan recurrence per token (not in flops_per_token):
        exp(delta A), delta B u, and the state update, ~7 per state element."""
        c = self.cfg
        return c.n_layers * 7 * c.expand * c.d_model * c.d_state
