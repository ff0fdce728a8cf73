"""The fast paths of gam_pretrain.accel against the plain models they are applied to.

The Mamba scans are compared with dropout on: the model's nn.Dropout calls are the same with either
scan, so one seed gives the same masks and the same losses. `compile` is compared with dropout = 0:
inductor generates its own dropout code, whose masks are not nn.Dropout's stream.
"""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_model_config
from gam_pretrain.accel import apply_accel, resolve
from gam_pretrain.accel.scan import (ChunkedSelectiveScan, CudaSelectiveScan, FastSelectiveScan, TritonScan,
                                     TritonSelectiveScan, _TimeMajorScan, cuda_selective_scan_fn, resolve_scan)
from gam_pretrain.models import build_model
from gam_pretrain.models.mamba import SelectiveScan

CPU = torch.device("cpu")


def loss_logits_grads(model, idx, targets):
    model.zero_grad()
    torch.manual_seed(1)
    logits = model(idx)
    torch.manual_seed(2)
    _, loss = model(idx, targets, return_logits=False)
    loss.backward()
    return loss.detach(), logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_training_step(plain, fast, atol):
    idx, targets = torch.randint(0, 97, (3, 32)), torch.randint(0, 97, (3, 32))
    (loss, logits, grads), (fast_loss, fast_logits, fast_grads) = (loss_logits_grads(m, idx, targets)
                                                                  for m in (plain, fast))
    torch.testing.assert_close(fast_loss, loss, rtol=1e-5, atol=atol)
    torch.testing.assert_close(fast_logits, logits, rtol=1e-5, atol=atol)
    assert fast_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=atol, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gam", "mamba"])
def test_compile_matches_the_plain_model(arch):
    """mamba: the compiled blocks call the scan, which is left out of the compiled regions."""
    torch.manual_seed(0)
    plain = build_model(tiny_model_config(arch=arch, n_layers=1))
    fast = apply_accel(copy.deepcopy(plain), "compile", CPU)
    assert fast.state_dict().keys() == plain.state_dict().keys()  # compiled in place: no _orig_mod
    assert_same_training_step(plain, fast, atol=1e-5)


@pytest.mark.parametrize("stack", ["standard", "paper"])
def test_scan_swap_matches_the_plain_model_with_dropout(stack):
    torch.manual_seed(0)
    plain = build_model(tiny_model_config(arch="mamba", stack=stack, dropout=0.2))
    fast = apply_accel(copy.deepcopy(plain), "none", CPU)
    assert all(type(m.selective_scan) is FastSelectiveScan for m in fast.mixers())
    assert fast.state_dict().keys() == plain.state_dict().keys()
    assert_same_training_step(plain, fast, atol=1e-6)


def test_auto_and_the_checks_of_each_kind():
    gam = build_model(tiny_model_config(arch="gam"))
    assert resolve("auto") == "none"  # measured: regional compile is slower on CPU; unmeasured on GPUs
    assert resolve("compile") == "compile"
    with pytest.raises(ValueError, match="unknown train.accel 'cpu-kernels'"):
        apply_accel(gam, "cpu-kernels", CPU)
    assert apply_accel(gam, "auto", CPU) is gam and not any(b._compiled_call_impl for b in gam.blocks)


def test_time_major_scan_gradients():
    torch.manual_seed(0)
    l, b, d, n = 6, 2, 3, 4
    args = (torch.rand(l, b, d, dtype=torch.double), torch.randn(l, b, d, dtype=torch.double),
            -torch.rand(d, n, dtype=torch.double), torch.randn(l, b, n, dtype=torch.double),
            torch.randn(l, b, n, dtype=torch.double))
    assert torch.autograd.gradcheck(_TimeMajorScan.apply, tuple(a.requires_grad_() for a in args))


def scan_outputs_and_grads(scans, b=2, d=5, n=3, l=9, delta_scale=1.0, seed=0):
    """y and every input's gradient, per scan, from the same inputs and output gradient."""
    torch.manual_seed(seed)
    inputs = [torch.randn(b, d, l), delta_scale * torch.randn(b, d, l), -torch.rand(d, n) * n, torch.randn(b, n, l),
              torch.randn(b, n, l), torch.randn(d), torch.randn(b, d, l), delta_scale * torch.randn(d)]
    grad_y = torch.randn(b, d, l, generator=torch.Generator().manual_seed(seed + 1))
    results = []
    for scan in scans:
        leaves = [t.clone().requires_grad_() for t in inputs]
        u, delta, A, B, C, D, z, bias = leaves
        y = scan(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True)
        y.backward(grad_y)
        results.append([y.detach()] + [t.grad for t in leaves])
    return results


def assert_same_scan(results, rtol=1e-5, atol=1e-5):
    names = ["y", "u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    for reference, other in zip(results[0], results[1]):
        assert torch.isfinite(other).all()
        torch.testing.assert_close(other, reference, rtol=rtol, atol=atol, msg=names.pop(0))


def test_fast_scan_matches_the_plain_scan():
    assert_same_scan(scan_outputs_and_grads([SelectiveScan(), FastSelectiveScan()]))


@pytest.mark.parametrize("l, chunk", [(9, None), (16, 4), (37, 8), (37, 64), (1, None)])
def test_chunked_scan_matches_the_sequential_scan(l, chunk):
    """Lengths that the chunk divides, that it does not, shorter than one chunk, and one step."""
    assert_same_scan(scan_outputs_and_grads([SelectiveScan(), ChunkedSelectiveScan(chunk)], l=l))


def test_chunked_scan_stays_finite_and_exact_at_8192_steps_of_fast_decay():
    """delta ~ softplus(4 x N(0, 1)) and A down to -16 (mamba's d_state 16): a chunk's summed log
    decay reaches thousands below zero, which forms that divide by cumulative decays overflow on."""
    results = scan_outputs_and_grads([FastSelectiveScan(), ChunkedSelectiveScan()], b=1, d=3, n=16, l=8192,
                                     delta_scale=4.0)
    assert_same_scan(results, rtol=1e-4, atol=1e-4)


def check_triton_scan(device: str) -> None:
    """TritonScan against the sequential scan in fp32 on `device`: several chunks, a partial last
    chunk, channel blocks cut by the mask, a state size below its power of two, and one step."""
    for l, b, d, n, chunk in [(10, 2, 5, 3, 4), (8, 1, 40, 16, 4), (13, 2, 33, 4, 64), (1, 1, 3, 2, 4),
                              (40, 2, 65, 12, 16)]:
        torch.manual_seed(l)
        inputs = [torch.rand(l, b, d), torch.randn(l, b, d), -torch.rand(d, n) * 3, torch.randn(l, b, n),
                  torch.randn(l, b, n)]
        grad_y = torch.randn(l, b, d)
        results = []
        for scan in (_TimeMajorScan.apply, lambda *a: TritonScan.apply(*a, chunk)):
            leaves = [t.to(device).requires_grad_() for t in inputs]
            y = scan(*leaves)
            y.backward(grad_y.to(device))
            results.append([y.detach().cpu()] + [t.grad.cpu() for t in leaves])
        for name, want, got in zip(["y", "delta", "u", "A", "B", "C"], *results):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"{name} at l={l} d={d} n={n} chunk={chunk}")


def test_triton_scan_matches_the_sequential_scan_under_the_interpreter():
    """The kernel as Triton's interpreter runs it on the CPU (TRITON_INTERPRET=1 is read when the
    kernel is defined, hence a fresh process)."""
    if TritonScan is None:
        pytest.skip("the triton package is not installed (make test installs it on Linux x86-64)")
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = "from test_accel import check_triton_scan; check_triton_scan('cpu'); print('triton scan ok')"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "triton scan ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_scan_matches_the_sequential_scan_on_a_gpu():
    if TritonScan is None:
        pytest.skip("needs the triton package")
    check_triton_scan("cuda")


def test_model_scan_picks_the_scan():
    for scan, kind in (("auto", FastSelectiveScan), ("torch", FastSelectiveScan), ("chunked", ChunkedSelectiveScan)):
        model = apply_accel(build_model(tiny_model_config(arch="mamba", scan=scan)), "none", CPU)
        assert all(type(m.selective_scan) is kind for m in model.mixers())
    with pytest.raises(RuntimeError, match=r"model.scan=cuda needs a CUDA device and `mamba_ssm`"):
        apply_accel(build_model(tiny_model_config(arch="mamba", scan="cuda")), "none", CPU)
    with pytest.raises(RuntimeError, match=r"model.scan=triton needs a CUDA device and the `triton` package"):
        apply_accel(build_model(tiny_model_config(arch="mamba", scan="triton")), "none", CPU)
    cuda = torch.device("cuda")
    expected = "cuda" if cuda_selective_scan_fn is not None else "chunked"  # triton: not until measured on a GPU
    assert resolve_scan("auto", cuda) == expected and resolve_scan("auto", CPU) == "torch"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("scan", ["chunked", "triton"])
def test_parallel_scans_match_the_sequential_scan_on_a_gpu_in_bf16(scan):
    """A Mamba under bf16 autocast on the GPU (d_inner 80: a partial channel block; d_state 12: below
    its power of two): the scans run in fp32 inside, so the chunked and Triton scans give the
    sequential scan's loss, and gradients within 1% in relative norm."""
    if scan == "triton" and TritonScan is None:
        pytest.skip("needs the triton package")
    torch.manual_seed(0)
    cuda = torch.device("cuda")
    cfgs = [tiny_model_config(arch="mamba", d_model=40, d_state=12, scan=kind, block_size=256) for kind in ("torch", scan)]
    a, b = (apply_accel(build_model(cfg).cuda(), "none", cuda) for cfg in cfgs)
    assert all(type(m.selective_scan) is {"chunked": ChunkedSelectiveScan, "triton": TritonSelectiveScan}[scan]
               for m in b.mixers())
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 97, (4, 256), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        la, lb = a(idx, idx)[1], b(idx, idx)[1]
    torch.testing.assert_close(lb.float(), la.float(), rtol=1e-3, atol=1e-3)
    la.backward()
    lb.backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert (pb.grad - pa.grad).norm() <= 1e-2 * pa.grad.norm() + 1e-6, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mamba_cuda_kernel_matches_torch_scan():
    pytest.importorskip("mamba_ssm", reason="needs mamba-ssm (pip install 'gam-pretrain[gpu]')")
    torch.manual_seed(0)
    cuda = torch.device("cuda")
    cfg_torch = tiny_model_config(arch="mamba", d_model=64, scan="torch", block_size=64)
    cfg_cuda = tiny_model_config(arch="mamba", d_model=64, scan="cuda", block_size=64)
    a = apply_accel(build_model(cfg_torch).cuda(), "none", cuda)
    b = apply_accel(build_model(cfg_cuda).cuda(), "none", cuda)
    assert all(type(m.selective_scan) is CudaSelectiveScan for m in b.mixers())
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 97, (4, 64), device="cuda")
    la, lb = a(idx, idx)[1], b(idx, idx)[1]
    torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4)
    la.backward()
    lb.backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-3, atol=1e-4, msg=name)
