"""Mamba (Gu & Dao 2023) selective state-space baseline.

The mixer is mamba-ssm's `Mamba` block (in_proj -> causal depthwise conv -> SiLU -> selective scan,
gated by SiLU(z) -> out_proj), with its defaults: dt_rank = ceil(C/16), S4D-real A init, dt in
[1e-3, 1e-1]. Two stacks:

- `stack: paper`: what the GAM paper ran: embeddings + learned positions, then the mixers applied
  one after another with NO residual connections or norms between them, then a final LayerNorm.
- `stack: standard`: mamba-ssm's MambaLMHeadModel: x = x + Mamba(RMSNorm(x)) per layer, final
  RMSNorm, no positional embedding (the recurrence carries position). The fair baseline.

The scan here is the recurrence written as a loop over time. gam_pretrain.accel swaps in a faster
one, chosen by `model.scan` (gam_pretrain/accel/scan.py): the same loop with a hand-written
backward (`torch`), a chunked scan (`chunked`), a Triton kernel (`triton`) or mamba-ssm's CUDA
kernel (`cuda`); `auto` takes the best the device has.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import CausalDepthwiseConv, LMHeadModel, ModelConfig


class SelectiveScan(nn.Module):
    """The selective scan as a loop over time, with mamba-ssm's `selective_scan_fn` signature:

        h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t ;  y_t = C_t . h_t + D u_t ;  y *= silu(z)

    u, delta, z: (b, d, l); A: (d, n); B, C: (b, n, l); D: (d,). Returns y: (b, d, l); h_0 = 0.
    A module of its own so that gam_pretrain.accel can swap in a faster scan (`model.scan`).
    """

    def forward(self, u, delta, A, B, C, D, z=None, delta_bias=None, delta_softplus=True):
        dtype = u.dtype
        u, delta, B, C = u.float(), delta.float(), B.float(), C.float()
        if delta_bias is not None:
            delta = delta + delta_bias.float()[:, None]
        if delta_softplus:
            delta = F.softplus(delta)
        y = self.recurrence(u, delta, A.float(), B, C) + u * D.float()[:, None]
        if z is not None:
            y = y * F.silu(z.float())
        return y.to(dtype)

    def recurrence(self, u, delta, A, B, C):
        """sum over the state of C_t h_t, h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t: (b, d, l)."""
        h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (b, d, n)
        ys = []
        # unbind, not indexing by t: the backward of x[..., t] is a zero tensor the size of x, per step
        for delta_t, u_t, B_t, C_t in zip(delta.unbind(-1), u.unbind(-1), B.unbind(-1), C.unbind(-1)):
            h = torch.exp(delta_t[:, :, None] * A) * h + (delta_t * u_t)[:, :, None] * B_t[:, None, :]
            ys.append((h @ C_t[:, :, None]).squeeze(-1))
        return torch.stack(ys, dim=-1)


class MambaMixer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C = cfg.d_model
        self.d_inner = cfg.expand * C
        self.d_state = cfg.d_state
        self.dt_rank = math.ceil(C / 16)
        self.in_proj = nn.Linear(C, 2 * self.d_inner, bias=False)
        self.conv1d = CausalDepthwiseConv(self.d_inner, cfg.d_conv)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * cfg.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, cfg.d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, C, bias=False)
        self.selective_scan = SelectiveScan()

    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 1e-1, dt_floor: float = 1e-4) -> None:
        """mamba-ssm's initialisation of A, D and the dt projection."""
        with torch.no_grad():
            std = self.dt_rank**-0.5
            nn.init.uniform_(self.dt_proj.weight, -std, std)
            dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
            A = torch.arange(1, self.d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
            self.A_log.copy_(torch.log(A))
            self.D.fill_(1.0)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (b, l, d_inner) each
        x = F.silu(self.conv1d(x))
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, self.dt_proj.weight)  # the scan adds the bias and applies softplus
        y = self.selective_scan(x.transpose(1, 2), delta.transpose(1, 2), -torch.exp(self.A_log.float()),
                                B.transpose(1, 2), C.transpose(1, 2), self.D.float(), z=z.transpose(1, 2),
                                delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        return self.out_proj(y.transpose(1, 2))

    def decode(self, hidden: torch.Tensor, state: dict) -> torch.Tensor:
        """The new tokens (b, l, C) one `step` at a time from the states in `state` (zeros at the start)."""
        if "conv" not in state:
            b = hidden.shape[0]
            state["conv"] = hidden.new_zeros(b, self.d_inner, self.conv1d.kernel_size[0])
            state["ssm"] = hidden.new_zeros(b, self.d_inner, self.d_state, dtype=torch.float32)
        outs = []
        for hidden_t in hidden.unbind(1):
            out_t, state["conv"], state["ssm"] = self.step(hidden_t, state["conv"], state["ssm"])
            outs.append(out_t)
        return torch.stack(outs, dim=1)

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
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.mixer(self.norm(x)))

    def decode(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        return x + self.mixer.decode(self.norm(x), state)


class Mamba(LMHeadModel):
    def __init__(self, cfg: ModelConfig):
        paper = cfg.stack == "paper"
        super().__init__(cfg, learned_positions=paper)
        if paper:
            self.blocks = nn.ModuleList(MambaMixer(cfg) for _ in range(cfg.n_layers))
            self.final_norm = nn.LayerNorm(cfg.d_model)
        else:
            self.blocks = nn.ModuleList(ResidualMambaBlock(cfg) for _ in range(cfg.n_layers))
            self.final_norm = nn.RMSNorm(cfg.d_model, eps=1e-5)

    def mixers(self) -> list[MambaMixer]:
        return [m for m in self.modules() if isinstance(m, MambaMixer)]

    def _init_special(self, unit: nn.Module) -> None:
        for mixer in unit.modules():
            if isinstance(mixer, MambaMixer):
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
