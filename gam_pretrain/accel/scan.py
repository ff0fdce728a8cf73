"""Faster Mamba scans, swapped in for the plain loop (`models.mamba.SelectiveScan`) by `model.scan`.

- `torch`: the same loop with a hand-written backward (`FastSelectiveScan`); any device.
- `cuda`: mamba-ssm's fused kernel (`CudaSelectiveScan`); needs CUDA and `mamba_ssm`.
- `auto`: `cuda` on a CUDA device when `mamba_ssm` imports, else `torch`.
"""
from __future__ import annotations

import torch

from ..models.mamba import SelectiveScan

try:  # optional fused kernels (pip install 'gam-pretrain[gpu]')
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as cuda_selective_scan_fn
except Exception:  # noqa: BLE001 - any import failure means "not available"
    cuda_selective_scan_fn = None


class _TimeMajorScan(torch.autograd.Function):
    """The scan core, time-major: h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t ; y_t = C_t . h_t.

    delta, u: (l, b, d); A: (d, n); B, C: (l, b, n) -> y: (l, b, d); h_0 = 0.
    Forward and backward are explicit loops over time that do all per-step work on (b, d, n) slices,
    which stay in cache; only the states h_t are kept for backward. Left to autograd, the loop keeps
    every step's intermediates and runs full-tensor passes that are memory-bound: this is several
    times faster on CPU.
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


class FastSelectiveScan(SelectiveScan):
    """SelectiveScan's function, with the time loop in `_TimeMajorScan`."""

    def recurrence(self, u, delta, A, B, C):
        # Time-major and contiguous, so every per-step slice in the loop is one dense block of memory.
        time_major = lambda x: x.permute(2, 0, 1).contiguous()  # noqa: E731
        y = _TimeMajorScan.apply(time_major(delta), time_major(u), A.contiguous(), time_major(B), time_major(C))
        return y.permute(1, 2, 0)  # (b, d, l)


class CudaSelectiveScan(SelectiveScan):
    """SelectiveScan's function, by mamba-ssm's fused CUDA kernel."""

    def forward(self, u, delta, A, B, C, D, z=None, delta_bias=None, delta_softplus=True):
        contiguous = lambda x: None if x is None else x.contiguous()  # noqa: E731
        return cuda_selective_scan_fn(contiguous(u), contiguous(delta), A, contiguous(B), contiguous(C), D,
                                      z=contiguous(z), delta_bias=delta_bias, delta_softplus=delta_softplus)


def scan_for(scan: str, device: torch.device) -> SelectiveScan:
    """The scan `model.scan` asks for on this device."""
    if scan == "cuda" and (cuda_selective_scan_fn is None or device.type != "cuda"):
        raise RuntimeError("model.scan=cuda needs a CUDA device and `mamba_ssm` (pip install 'gam-pretrain[gpu]')")
    if scan == "torch" or cuda_selective_scan_fn is None or device.type != "cuda":
        return FastSelectiveScan()
    return CudaSelectiveScan()
