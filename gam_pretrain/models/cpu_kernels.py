"""Fused elementwise kernels for the fp32 CPU training step.

On CPU a training step at the paper config spends ~89% of its time in matmuls already running at
the machine's matmul peak; the rest is elementwise passes over (tokens x channels) buffers. The
kernels in csrc/cpu_kernels.cpp do in one pass what torch does in several:

  dropout_add   residual + dropout(x + bias)       the keep mask is recomputed in backward,
                                                   never stored
  gated_mix     residual + dropout(sigmoid(g_l) * local + sigmoid(g_g) * glob)   (GAM's mixer)
  bias_gelu     GELU(x + bias), with the bias gradient summed in the same backward pass
  causal_conv   depthwise causal conv over time, straight from (B, T, C) memory (no padded copy)
  layer_norm    LayerNorm with its weight and bias gradients summed in the same backward pass
  softmax_cross_entropy_rows   in-place exp of the logits + per-row loss, for the fused head

The library is compiled on first use with the system C++ compiler (`$CXX`, default g++;
-O3 -march=native, about 5 s) into a cache keyed by the source, the flags, the compiler and the
CPU (`$GAM_PRETRAIN_KERNEL_CACHE`, default ~/.cache/gam_pretrain/kernels), and loaded with ctypes.
It runs on the OpenMP runtime torch has loaded, with torch's thread count.

Every kernel has a torch reference implementation below: it is used when the library is not
available (no compiler, or GAM_PRETRAIN_CPU_KERNELS=0) and it is what the tests compare against.
Dropout masks are a counter hash of the element index keyed by one draw from torch's default
generator, so both paths draw the same masks, the masks do not depend on the thread count, and
`torch.manual_seed` / the checkpointed RNG state fix them (resumes stay exact). Same distribution as
nn.Dropout (keep with probability 1 - p, to 2^-24; kept values scaled by 1 / (1 - p)), not the same
random stream.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++17"]
DISABLE_ENV = "GAM_PRETRAIN_CPU_KERNELS"
CACHE_ENV = "GAM_PRETRAIN_KERNEL_CACHE"

_P, _I64, _U64, _U32, _F, _I = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32,
                                ctypes.c_float, ctypes.c_int)
_SIGNATURES = {
    "column_sum_chunks": ([], _I64),
    "bias_dropout_add_forward": ([_P, _P, _P, _P, _I64, _I64, _U64, _U32, _F, _I, _I], None),
    "bias_dropout_add_backward": ([_P, _P, _P, _P, _I64, _I64, _U64, _U32, _F, _I, _I], None),
    "gated_mix_forward": ([_P, _P, _P, _P, _P, _P, _I64, _I64, _U64, _U32, _F, _I, _I], None),
    "gated_mix_backward": ([_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _U64, _U32, _F, _I, _I], None),
    "bias_gelu_forward": ([_P, _P, _P, _P, _I64, _I64, _I], None),
    "bias_gelu_backward": ([_P, _P, _P, _P, _P, _I64, _I64, _I], None),
    "causal_conv_forward": ([_P, _P, _P, _P, _I64, _I64, _I64, _I64, _I], None),
    "causal_conv_backward": ([_P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I], None),
    "layer_norm_forward": ([_P, _P, _P, _P, _P, _P, _I64, _I64, _F, _I], None),
    "layer_norm_backward": ([_P, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I], None),
    "softmax_cross_entropy_forward": ([_P, _P, _P, _P, _I64, _I64, _I], None),
}


def _cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gam_pretrain" / "kernels"


def _cpu_signature() -> str:
    """What -march=native depends on: a library built on one node must not load on another CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({l for l in lines if l.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() + platform.machine()


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (the torch reference implementations are used instead)."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    compiler = os.environ.get("CXX", "g++")
    try:
        if shutil.which(compiler) is None:
            raise OSError(f"no C++ compiler {compiler!r} on PATH")
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
        key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_signature()])
                             .encode()).hexdigest()[:16]
        path = _cache_dir() / f"cpu_kernels-{key}.so"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
            build = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(partial)], capture_output=True, text=True)
            if build.returncode != 0:
                partial.unlink(missing_ok=True)
                raise OSError(f"{compiler} failed:\n{build.stderr[-2000:]}")
            os.replace(partial, path)  # atomic: concurrent builders each write their own partial file
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as err:
        warnings.warn(f"fused CPU kernels unavailable, using the slower torch path: {err}", stacklevel=2)
        return None
    for name, (argtypes, restype) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


_torch_ops_only = False


def applies_to(x: torch.Tensor) -> bool:
    """Whether these kernels (or their reference implementations) take over for x: fp32 on CPU,
    outside torch.compile and `plain_torch()`. Elsewhere the models use plain torch ops (nn.Dropout)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not _torch_ops_only
            and not torch.compiler.is_compiling())


@contextlib.contextmanager
def plain_torch():
    """Run the models with plain torch ops on CPU too (e.g. for torch's FLOP counter, which cannot
    see inside these kernels). Dropout then draws nn.Dropout's masks."""
    global _torch_ops_only
    previous, _torch_ops_only = _torch_ops_only, True
    try:
        yield
    finally:
        _torch_ops_only = previous


# ---- dropout masks -----------------------------------------------------------------------------
_M32 = 0xFFFFFFFF


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """a * c mod 2^32 for int64 a in [0, 2^32), without overflowing int64."""
    return (a * (c & 0xFFFF) + (((a * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


class MaskParams:
    """One dropout call's mask: keep element i when hash(seed, i) >> 8 >= threshold."""

    def __init__(self, p: float):
        self.active = p > 0.0
        self.seed = int(torch.randint(0, 2**62, (1,))) if self.active else 0  # one draw from torch's generator
        self.threshold = math.ceil(p * 2**24) if self.active else 0
        self.scale = (1.0 / (1.0 - p) if p < 1.0 else 0.0) if self.active else 1.0  # p = 1 keeps nothing

    def args(self) -> tuple:
        return self.seed, self.threshold, self.scale, int(self.active)

    def reference(self, shape: torch.Size) -> torch.Tensor:
        """The mask as a float32 tensor of 0 and 1/(1-p) (what the kernels compute in-line)."""
        n = math.prod(shape)
        if n >= 2**32:
            raise ValueError(f"dropout over {n} elements: the mask hash counts only 2^32")
        if not self.active:
            return torch.ones(shape)
        i = torch.arange(n, dtype=torch.int64)
        h = _mix32(_mix32((_mul32(i, 0x9E3779B1) + (self.seed & _M32)) & _M32) ^ ((self.seed >> 32) & _M32))
        return torch.where((h >> 8) >= self.threshold, self.scale, 0.0).to(torch.float32).view(shape)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _rows_cols(x: torch.Tensor) -> tuple[int, int]:
    return x.numel() // x.shape[-1], x.shape[-1]


# ---- residual + dropout(x + bias) --------------------------------------------------------------
class _BiasDropoutAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, residual, x, bias, mask: MaskParams):
        x = x.contiguous()
        out = torch.empty_like(x)
        residual = None if residual is None else residual.contiguous()
        library().bias_dropout_add_forward(_ptr(residual), _ptr(x), _ptr(bias), _ptr(out), *_rows_cols(x),
                                           *mask.args(), torch.get_num_threads())
        ctx.mask, ctx.shape = mask, x.shape
        ctx.has_residual, ctx.has_bias = residual is not None, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        grad_x = torch.empty_like(grad)
        rows, cols = _rows_cols(grad)
        lib = library()
        grad_bias = grad.new_empty(cols) if ctx.has_bias else None
        scratch = grad.new_empty(lib.column_sum_chunks() * cols) if ctx.has_bias else None
        lib.bias_dropout_add_backward(_ptr(grad), _ptr(grad_x), _ptr(grad_bias), _ptr(scratch), rows, cols,
                                      *ctx.mask.args(), torch.get_num_threads())
        return (grad if ctx.has_residual else None), grad_x, grad_bias, None


def bias_dropout_add(residual: torch.Tensor | None, x: torch.Tensor, bias: torch.Tensor | None,
                     p: float) -> torch.Tensor:
    """residual + dropout(x + bias) with dropout probability p (0: no dropout); residual and bias
    may be None. The caller passes p = 0 outside training."""
    mask = MaskParams(p)
    if library() is not None:
        return _BiasDropoutAdd.apply(residual, x, bias, mask)
    y = x if bias is None else x + bias
    y = y * mask.reference(x.shape) if mask.active else y
    return y if residual is None else residual + y


# ---- GAM's gated mix ---------------------------------------------------------------------------
class _GatedMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, residual, gates, gate_bias, local, glob, mask: MaskParams):
        residual, gates, local, glob = (t.contiguous() for t in (residual, gates, local, glob))
        out = torch.empty_like(residual)
        library().gated_mix_forward(_ptr(residual), _ptr(gates), _ptr(gate_bias), _ptr(local), _ptr(glob),
                                    _ptr(out), *_rows_cols(residual), *mask.args(), torch.get_num_threads())
        ctx.save_for_backward(gates, gate_bias, local, glob)
        ctx.mask = mask
        return out

    @staticmethod
    def backward(ctx, grad):
        gates, gate_bias, local, glob = ctx.saved_tensors
        grad = grad.contiguous()
        grad_gates, grad_local, grad_glob = torch.empty_like(gates), torch.empty_like(local), torch.empty_like(glob)
        grad_gate_bias = torch.empty_like(gate_bias)
        lib = library()
        rows, channels = _rows_cols(local)
        scratch = grad.new_empty(lib.column_sum_chunks() * 2 * channels)
        lib.gated_mix_backward(_ptr(grad), _ptr(gates), _ptr(gate_bias), _ptr(local), _ptr(glob), _ptr(grad_gates),
                               _ptr(grad_gate_bias), _ptr(grad_local), _ptr(grad_glob), _ptr(scratch), rows, channels,
                               *ctx.mask.args(), torch.get_num_threads())
        return grad, grad_gates, grad_gate_bias, grad_local, grad_glob, None


def gated_mix(residual: torch.Tensor, gates: torch.Tensor, gate_bias: torch.Tensor, local: torch.Tensor,
              glob: torch.Tensor, p: float) -> torch.Tensor:
    """residual + dropout(sigmoid(g_l) * local + sigmoid(g_g) * glob), [g_l | g_g] = gates + gate_bias
    (gates: (..., 2C) before the gate's bias; the rest (..., C))."""
    mask = MaskParams(p)
    if library() is not None:
        return _GatedMix.apply(residual, gates, gate_bias, local, glob, mask)
    g_local, g_global = torch.sigmoid(gates + gate_bias).chunk(2, dim=-1)
    mixed = g_local * local + g_global * glob
    return residual + (mixed * mask.reference(mixed.shape) if mask.active else mixed)


# ---- GELU(x + bias) ----------------------------------------------------------------------------
class _BiasGELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        x = x.contiguous()
        out, deriv = torch.empty_like(x), torch.empty_like(x)
        library().bias_gelu_forward(_ptr(x), _ptr(bias), _ptr(out), _ptr(deriv), *_rows_cols(x),
                                    torch.get_num_threads())
        ctx.save_for_backward(deriv)  # GELU'(x + bias), in place of x: backward is then a multiply
        return out

    @staticmethod
    def backward(ctx, grad):
        (deriv,) = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x, grad_bias = torch.empty_like(deriv), grad.new_empty(deriv.shape[-1])
        lib = library()
        rows, cols = _rows_cols(deriv)
        scratch = grad.new_empty(lib.column_sum_chunks() * cols)
        lib.bias_gelu_backward(_ptr(grad), _ptr(deriv), _ptr(grad_x), _ptr(grad_bias), _ptr(scratch),
                               rows, cols, torch.get_num_threads())
        return grad_x, grad_bias


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU(x + bias), exact (erf) form."""
    if library() is not None:
        return _BiasGELU.apply(x, bias)
    return F.gelu(x + bias)


# ---- depthwise causal conv ---------------------------------------------------------------------
class _CausalConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        x = x.contiguous()
        wt = weight.reshape(weight.shape[0], -1).t().contiguous()  # (k, C): contiguous over channels
        out = torch.empty_like(x)
        library().causal_conv_forward(_ptr(x), _ptr(wt), _ptr(bias), _ptr(out), *x.shape, wt.shape[0],
                                      torch.get_num_threads())
        ctx.save_for_backward(x, wt)
        ctx.weight_shape, ctx.has_bias = weight.shape, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, wt = ctx.saved_tensors
        grad = grad.contiguous()
        lib = library()
        k, channels = wt.shape
        grad_x, grad_params = torch.empty_like(x), x.new_empty(k + 1, channels)  # weight rows, then bias
        scratch = x.new_empty(lib.column_sum_chunks() * (k + 1) * channels)
        lib.causal_conv_backward(_ptr(grad), _ptr(x), _ptr(wt), _ptr(grad_x), _ptr(grad_params), _ptr(scratch),
                                 *x.shape, k, torch.get_num_threads())
        grad_bias = grad_params[k] if ctx.has_bias else None
        return grad_x, grad_params[:k].t().reshape(ctx.weight_shape), grad_bias


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """Depthwise causal conv of x (B, T, C) with weight (C, 1, k), or None when the kernels are not
    built (the caller then runs its torch path)."""
    return _CausalConv.apply(x, weight, bias) if library() is not None else None


# ---- LayerNorm ---------------------------------------------------------------------------------
class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps: float):
        x = x.contiguous()
        rows, cols = _rows_cols(x)
        out, mean, rstd = torch.empty_like(x), x.new_empty(rows), x.new_empty(rows)
        library().layer_norm_forward(_ptr(x), _ptr(weight), _ptr(bias), _ptr(out), _ptr(mean), _ptr(rstd), rows, cols,
                                     eps, torch.get_num_threads())
        ctx.save_for_backward(x, mean, rstd, weight)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, mean, rstd, weight = ctx.saved_tensors
        grad = grad.contiguous()
        rows, cols = _rows_cols(x)
        grad_x, grad_params = torch.empty_like(x), x.new_empty(2, cols)  # weight, then bias
        lib = library()
        scratch = x.new_empty(lib.column_sum_chunks() * 2 * cols)
        lib.layer_norm_backward(_ptr(grad), _ptr(x), _ptr(mean), _ptr(rstd), _ptr(weight), _ptr(grad_x),
                                _ptr(grad_params), _ptr(scratch), rows, cols, torch.get_num_threads())
        return grad_x, grad_params[0], grad_params[1], None


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim with an affine weight and bias."""
    if library() is not None:
        return _LayerNorm.apply(x, weight, bias, eps)
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


# ---- cross-entropy rows ------------------------------------------------------------------------
def softmax_cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: logits (N, V) become exp(logits - row max). Returns (per-row loss, 1 / row sum of
    that exp), so softmax = logits * inv_sum. No autograd (TiedHeadCrossEntropy's helper)."""
    rows, vocab = logits.shape
    lib = library()
    if lib is not None and logits.is_contiguous():
        loss, inv_sum, targets = logits.new_empty(rows), logits.new_empty(rows), targets.contiguous()
        lib.softmax_cross_entropy_forward(_ptr(logits), _ptr(targets), _ptr(loss), _ptr(inv_sum),
                                          rows, vocab, torch.get_num_threads())
        return loss, inv_sum
    row_max = logits.amax(dim=1, keepdim=True)
    target_logit = logits.gather(1, targets[:, None])
    total = logits.sub_(row_max).exp_().sum(dim=1, keepdim=True)
    return (row_max + total.log() - target_logit).squeeze(1), total.reciprocal().squeeze(1)
