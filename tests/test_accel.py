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
from gam_pretrain.accel.scan import CudaSelectiveScan, FastSelectiveScan, _TimeMajorScan, cuda_selective_scan_fn
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


def test_fast_scan_matches_the_plain_scan():
    torch.manual_seed(0)
    b, d, n, l = 2, 5, 3, 9
    inputs = [torch.randn(b, d, l), torch.randn(b, d, l), -torch.rand(d, n), torch.randn(b, n, l),
              torch.randn(b, n, l), torch.randn(d), torch.randn(b, d, l), torch.randn(d)]
    results = []
    for scan in (SelectiveScan(), FastSelectiveScan()):
        leaves = [t.clone().requires_grad_() for t in inputs]
        u, delta, A, B, C, D, z, bias = leaves
        y = scan(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
        results.append([y.detach()] + [t.grad for t in leaves])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_model_scan_picks_the_scan():
    for scan in ("auto", "torch"):
        model = apply_accel(build_model(tiny_model_config(arch="mamba", scan=scan)), "none", CPU)
        assert all(type(m.selective_scan) is FastSelectiveScan for m in model.mixers())
    if cuda_selective_scan_fn is None or not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"model.scan=cuda needs a CUDA device and `mamba_ssm`"):
            apply_accel(build_model(tiny_model_config(arch="mamba", scan="cuda")), "none", CPU)


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
