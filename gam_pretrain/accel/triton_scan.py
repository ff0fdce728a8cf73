"""The selective scan as a Triton kernel: one program per (batch row, block of channels) runs the
recurrence over time with its (channels x state) block of h in registers, as mamba-ssm's CUDA kernel
does, without a CUDA build (Triton ships with CUDA PyTorch; `TRITON_INTERPRET=1` runs it on a CPU,
which the tests do).

    h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t ;  y_t = C_t . h_t          (h_0 = 0)

Inputs are time-major, as in scan.py: delta, u: (l, b, d); A: (d, n); B, C: (l, b, n).

Forward keeps the state every CHUNK steps (l/CHUNK states per row: small). Backward walks the chunks
from the last: it recomputes the chunk's states from the kept one into a scratch buffer of CHUNK
states per program, then runs the adjoint recurrence back through the chunk,

    g_t = C_t gy_t + exp(delta_{t+1} A) g_{t+1}      (dL/dh_t)

and from g_t and h_{t-1}: dL/d(delta_t u_t) = g_t . B_t, dL/dB_t = sum_d g_t delta_t u_t,
dL/dC_t = sum_d gy_t h_t, dL/d(delta_t A) = g_t h_{t-1} exp(delta_t A). Sums over channel blocks
(dB, dC) and batch rows (dA) are written per program and added up in PyTorch: no atomics, so the
gradients are the same on every run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 64  # steps between kept states
BLOCK_D = 32  # channels per program


@triton.jit
def _scan_forward(delta_ptr, u_ptr, A_ptr, B_ptr, C_ptr, y_ptr, kept_ptr,
                  length, batch, d, n, chunks,
                  CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    row, block = tl.program_id(0).to(tl.int64), tl.program_id(1)  # int64 offsets: b d n l passes 2^31
    ds = block * BLOCK_D + tl.arange(0, BLOCK_D)
    ns = tl.arange(0, BLOCK_N)
    d_ok, n_ok = ds < d, ns < n
    A = tl.load(A_ptr + ds[:, None] * n + ns[None, :], mask=d_ok[:, None] & n_ok[None, :], other=0.0)
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for t in range(length):
        at = (t * batch + row) * d + ds
        delta = tl.load(delta_ptr + at, mask=d_ok, other=0.0)
        u = tl.load(u_ptr + at, mask=d_ok, other=0.0)
        B = tl.load(B_ptr + (t * batch + row) * n + ns, mask=n_ok, other=0.0)
        C = tl.load(C_ptr + (t * batch + row) * n + ns, mask=n_ok, other=0.0)
        h = tl.exp(delta[:, None] * A) * h + (delta * u)[:, None] * B[None, :]
        tl.store(y_ptr + at, tl.sum(h * C[None, :], axis=1), mask=d_ok)
        if (t + 1) % CHUNK == 0 and t + 1 < length:
            k = (t + 1) // CHUNK - 1  # the state after chunk k, entering chunk k + 1
            tl.store(kept_ptr + ((k * batch + row) * d + ds[:, None]) * n + ns[None, :], h,
                     mask=d_ok[:, None] & n_ok[None, :])


@triton.jit
def _scan_backward(delta_ptr, u_ptr, A_ptr, B_ptr, C_ptr, gy_ptr, kept_ptr, scratch_ptr,
                   g_delta_ptr, g_u_ptr, g_A_ptr, g_B_ptr, g_C_ptr,
                   length, batch, d, n, chunks, blocks,
                   CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    row, block = tl.program_id(0).to(tl.int64), tl.program_id(1)  # int64 offsets: b d n l passes 2^31
    ds = block * BLOCK_D + tl.arange(0, BLOCK_D)
    ns = tl.arange(0, BLOCK_N)
    d_ok, n_ok = ds < d, ns < n
    tile_ok = d_ok[:, None] & n_ok[None, :]
    tile = ds[:, None] * n + ns[None, :]
    A = tl.load(A_ptr + tile, mask=tile_ok, other=0.0)
    scratch = scratch_ptr + (row * blocks + block) * CHUNK * BLOCK_D * BLOCK_N \
        + tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + ns[None, :]
    g = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    g_A = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for back in range(chunks):
        k = chunks - 1 - back
        first = k * CHUNK
        if k > 0:
            h = tl.load(kept_ptr + ((k - 1) * batch + row) * d * n + tile, mask=tile_ok, other=0.0)
        else:
            h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        # the chunk's states again, from the one kept before it: scratch[s] = h_{first + s - 1}
        for s in range(CHUNK):
            t = first + s
            if t < length:
                tl.store(scratch + s * BLOCK_D * BLOCK_N, h)
                at = (t * batch + row) * d + ds
                delta = tl.load(delta_ptr + at, mask=d_ok, other=0.0)
                u = tl.load(u_ptr + at, mask=d_ok, other=0.0)
                B = tl.load(B_ptr + (t * batch + row) * n + ns, mask=n_ok, other=0.0)
                h = tl.exp(delta[:, None] * A) * h + (delta * u)[:, None] * B[None, :]
        tl.debug_barrier()
        # back through the chunk: h holds h_t on entry to each step
        for back_s in range(CHUNK):
            s = CHUNK - 1 - back_s
            t = first + s
            if t < length:
                h_before = tl.load(scratch + s * BLOCK_D * BLOCK_N)
                at = (t * batch + row) * d + ds
                delta = tl.load(delta_ptr + at, mask=d_ok, other=0.0)
                u = tl.load(u_ptr + at, mask=d_ok, other=0.0)
                gy = tl.load(gy_ptr + at, mask=d_ok, other=0.0)
                B = tl.load(B_ptr + (t * batch + row) * n + ns, mask=n_ok, other=0.0)
                C = tl.load(C_ptr + (t * batch + row) * n + ns, mask=n_ok, other=0.0)
                partial = ((t * blocks + block) * batch + row) * n + ns  # per channel block, summed outside
                tl.store(g_C_ptr + partial, tl.sum(gy[:, None] * h, axis=0), mask=n_ok)
                g += gy[:, None] * C[None, :]
                g_delta_u = tl.sum(g * B[None, :], axis=1)
                tl.store(g_B_ptr + partial, tl.sum(g * (delta * u)[:, None], axis=0), mask=n_ok)
                decay = tl.exp(delta[:, None] * A)
                g_log_decay = g * h_before * decay
                tl.store(g_delta_ptr + at, tl.sum(g_log_decay * A, axis=1) + g_delta_u * u, mask=d_ok)
                tl.store(g_u_ptr + at, g_delta_u * delta, mask=d_ok)
                g_A += g_log_decay * delta[:, None]
                g = g * decay
                h = h_before
        tl.debug_barrier()
    tl.store(g_A_ptr + row * d * n + tile, g_A, mask=tile_ok)


class TritonScan(torch.autograd.Function):
    """delta, u: (l, b, d); A: (d, n); B, C: (l, b, n) -> y: (l, b, d), all fp32 and contiguous."""

    @staticmethod
    def forward(ctx, delta, u, A, B, C, chunk: int = CHUNK):
        assert all(x.dtype == torch.float32 and x.is_contiguous() for x in (delta, u, A, B, C))
        length, batch, d = delta.shape
        n = A.shape[1]
        chunks = triton.cdiv(length, chunk)
        y = torch.empty_like(delta)
        kept = delta.new_empty(max(chunks - 1, 1), batch, d, n)
        grid = (batch, triton.cdiv(d, BLOCK_D))
        _scan_forward[grid](delta, u, A, B, C, y, kept, length, batch, d, n, chunks,
                            CHUNK=chunk, BLOCK_D=BLOCK_D, BLOCK_N=triton.next_power_of_2(n))
        ctx.save_for_backward(delta, u, A, B, C, kept)
        ctx.chunk = chunk
        return y

    @staticmethod
    def backward(ctx, grad_y):
        delta, u, A, B, C, kept = ctx.saved_tensors
        length, batch, d = delta.shape
        n = A.shape[1]
        chunk = ctx.chunk
        chunks, blocks, block_n = triton.cdiv(length, chunk), triton.cdiv(d, BLOCK_D), triton.next_power_of_2(n)
        scratch = delta.new_empty(batch * blocks * chunk * BLOCK_D * block_n)
        g_delta, g_u = torch.empty_like(delta), torch.empty_like(u)
        g_A = delta.new_empty(batch, d, n)
        g_B, g_C = (delta.new_empty(length, blocks, batch, n) for _ in range(2))
        _scan_backward[(batch, blocks)](delta, u, A, B, C, grad_y.contiguous(), kept, scratch,
                                        g_delta, g_u, g_A, g_B, g_C, length, batch, d, n, chunks, blocks,
                                        CHUNK=chunk, BLOCK_D=BLOCK_D, BLOCK_N=block_n)
        return g_delta, g_u, g_A.sum(0), g_B.sum(1), g_C.sum(1), None
