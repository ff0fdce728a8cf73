"""Faster Mamba scans, swapped in for the plain loop (`models.mamba.SelectiveScan`) by `model.scan`.

- `torch`: the sequential loop with a hand-written backward (`FastSelectiveScan`); any device.
- `chunked`: the recurrence in chunks, about 3 sqrt(l) sequential steps (`ChunkedSelectiveScan`);
  any device, plain PyTorch.
- `triton`: a Triton kernel, the state in registers (`TritonSelectiveScan`, triton_scan.py); CUDA
  and the `triton` package (CUDA PyTorch brings it).
- `cuda`: mamba-ssm's fused kernel (`CudaSelectiveScan`); needs CUDA and `mamba_ssm`.
- `auto`: on CUDA, `cuda` when `mamba_ssm` imports, else `chunked` (`triton` joins when it has run on
  a GPU: tools/bench_gpu.py); on a CPU, `torch` (the fastest there: results/bench_scan_cpu.json).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.utils.checkpoint

from ..models.mamba import SelectiveScan

try:  # optional fused kernels (pip install 'gam-pretrain[gpu]')
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as cuda_selective_scan_fn
except Exception:  # noqa: BLE001 - any import failure means "not available"
    cuda_selective_scan_fn = None
try:  # Triton comes with CUDA PyTorch
    from .triton_scan import TritonScan
except Exception:  # noqa: BLE001 - any import failure means "not available"
    TritonScan = None



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


def chunked_recurrence(delta, u, A, B, C, chunk: int):
    """The scan core in chunks, time-major as _TimeMajorScan: delta, u: (l, b, d); A: (d, n);
    B, C: (l, b, n) -> y: (l, b, d); h_0 = 0.

    Time is cut into l/chunk chunks. (1) Every chunk runs the recurrence from a zero state, all
    chunks at once, `chunk` steps of one (chunks, b, d, n) update. (2) A pass over the chunks carries
    the states across: H_c = P_{c-1} H_{c-1} + (chunk c-1's end state), P the product of a chunk's
    decays. (3) Each step adds the carried state's share, C_t . (exp(S_t) H_c), S_t the decays' log
    summed since the chunk began. 2 chunk + l/chunk sequential steps instead of l. Every exponent
    is a sum of delta * A <= 0, so nothing overflows at any length (the log-space cumsum forms that
    divide by cumulative decays do). Only y and the carried states are kept: memory O(l b d), not
    O(l b d n).
    """
    length, b, d = delta.shape
    n = A.shape[1]
    chunks = -(-length // chunk)
    pad = chunks * chunk - length

    def by_chunk(x):  # (l, b, k) -> (chunk, chunks, b, k); padding steps have delta 0: decay 1, input 0
        return torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)).view(chunks, chunk, b, -1).transpose(0, 1)

    delta, u, B, C = by_chunk(delta), by_chunk(u), by_chunk(B), by_chunk(C)
    delta_u = delta * u
    h = delta.new_zeros(chunks, b, d, n)
    log_decay_sum = torch.zeros_like(h)
    ys = []
    for q in range(chunk):
        log_decay = delta[q].unsqueeze(-1) * A
        log_decay_sum = log_decay_sum + log_decay
        h = torch.exp(log_decay) * h + delta_u[q].unsqueeze(-1) * B[q].unsqueeze(-2)
        ys.append((h * C[q].unsqueeze(-2)).sum(-1))  # not a matmul: autocast would take it to bf16
    chunk_decay = torch.exp(log_decay_sum)  # (chunks, b, d, n)
    carried = [h.new_zeros(b, d, n)]
    for c in range(chunks - 1):
        carried.append(chunk_decay[c] * carried[-1] + h[c])
    carried = torch.stack(carried)  # state entering each chunk
    log_decay_sum = torch.zeros_like(h)
    for q in range(chunk):
        log_decay_sum = log_decay_sum + delta[q].unsqueeze(-1) * A
        ys[q] = ys[q] + (torch.exp(log_decay_sum) * carried * C[q].unsqueeze(-2)).sum(-1)
    y = torch.stack(ys)  # (chunk, chunks, b, d)
    return y.transpose(0, 1).reshape(chunks * chunk, b, d)[:length]


class ChunkedSelectiveScan(SelectiveScan):
    """SelectiveScan's function, in chunks (`chunked_recurrence`): about 3 sqrt(l) sequential steps
    instead of l, each over a whole (chunks, b, d, n) state. Backward recomputes the forward
    (activation checkpointing of the scan alone): what autograd would keep of the steps is
    O(l b d n), the size of every state of the sequence."""

    def __init__(self, chunk: int | None = None):
        super().__init__()
        self.chunk = chunk

    def recurrence(self, u, delta, A, B, C):
        length = u.shape[-1]
        chunk = self.chunk or max(1, math.isqrt(length))
        time_major = lambda x: x.permute(2, 0, 1)  # noqa: E731
        core = functools.partial(chunked_recurrence, chunk=chunk)
        if torch.is_grad_enabled():
            y = torch.utils.checkpoint.checkpoint(core, time_major(delta), time_major(u), A, time_major(B),
                                                  time_major(C), use_reentrant=False)
        else:
            y = core(time_major(delta), time_major(u), A, time_major(B), time_major(C))
        return y.permute(1, 2, 0)


class CudaSelectiveScan(SelectiveScan):
    """SelectiveScan's function, by mamba-ssm's fused CUDA kernel."""

    def forward(self, u, delta, A, B, C, D, z=None, delta_bias=None, delta_softplus=True):
        contiguous = lambda x: None if x is None else x.contiguous()  # noqa: E731
        return cuda_selective_scan_fn(contiguous(u), contiguous(delta), A, contiguous(B), contiguous(C), D,
                                      z=contiguous(z), delta_bias=delta_bias, delta_softplus=delta_softplus)


class TritonSelectiveScan(SelectiveScan):
    """SelectiveScan's function, by the Triton kernel of triton_scan.py."""

    def recurrence(self, u, delta, A, B, C):
        time_major = lambda x: x.permute(2, 0, 1).contiguous()  # noqa: E731
        y = TritonScan.apply(time_major(delta), time_major(u), A.contiguous(), time_major(B), time_major(C))
        return y.permute(1, 2, 0)


def scan_unavailable(scan: str, device: torch.device) -> str | None:
    """Why `model.scan` cannot run on this device, or None."""
    if scan == "cuda" and (cuda_selective_scan_fn is None or device.type != "cuda"):
        return "model.scan=cuda needs a CUDA device and `mamba_ssm` (pip install 'gam-pretrain[gpu]')"
    if scan == "triton" and (TritonScan is None or device.type != "cuda"):
        return "model.scan=triton needs a CUDA device and the `triton` package (CUDA PyTorch brings it)"
    return None


def resolve_scan(scan: str, device: torch.device) -> str:
    """The scan `model.scan` stands for on this device (auto resolved)."""
    if scan != "auto":
        return scan
    if device.type != "cuda":
        return "torch"
    # `triton` is not chosen by auto until the kernel has run and been measured on a GPU (tools/bench_gpu.py)
    return "cuda" if cuda_selective_scan_fn is not None else "chunked"


def scan_for(scan: str, device: torch.device) -> SelectiveScan:
    """The scan `model.scan` asks for on this device."""
    if (why := scan_unavailable(scan, device)) is not None:
        raise RuntimeError(why)
    return {"torch": FastSelectiveScan, "chunked": ChunkedSelectiveScan, "triton": TritonSelectiveScan,
            "cuda": CudaSelectiveScan}[resolve_scan(scan, device)]()
