"""The fused CPU kernels (gam_pretrain/models/cpu_kernels.py) against their torch reference
implementations: same values, same gradients, same dropout masks, whatever the thread count."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model_config
from gam_pretrain.models import build_model, cpu_kernels

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None, reason="no C++ compiler: the kernels are not built")


def _run(fn, inputs, grad_seed=0):
    """fn(*inputs) and the gradients of every input that requires them, for one fixed output gradient."""
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t for t in inputs]
    torch.manual_seed(1234)  # dropout masks are drawn from torch's generator
    out = fn(*inputs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed))
    out.backward(grad)
    return out.detach(), [t.grad for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]


def _kernel_vs_reference(monkeypatch, fn, inputs, rtol=1e-5, atol=1e-6):
    fused = _run(fn, inputs)
    with monkeypatch.context() as m:
        m.setattr(cpu_kernels, "library", lambda: None)
        reference = _run(fn, inputs)
    torch.testing.assert_close(fused[0], reference[0], rtol=rtol, atol=atol)
    assert len(fused[1]) == len(reference[1])
    for a, b in zip(fused[1], reference[1]):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    return fused


@pytest.mark.parametrize("with_residual,with_bias,p", [(True, True, 0.3), (False, False, 0.3), (True, False, 0.0)])
def test_bias_dropout_add_matches_reference(monkeypatch, with_residual, with_bias, p):
    x = torch.randn(3, 37, 24, requires_grad=True)
    residual = torch.randn(3, 37, 24, requires_grad=True) if with_residual else None
    bias = torch.randn(24, requires_grad=True) if with_bias else None
    out, _ = _kernel_vs_reference(monkeypatch, lambda r, x, b: cpu_kernels.bias_dropout_add(r, x, b, p),
                                  [residual, x, bias])
    if p > 0:
        dropped = (out - (residual if with_residual else 0)).eq(0).float().mean().item()
        assert 0.2 < dropped < 0.4


def test_gated_mix_matches_reference(monkeypatch):
    C = 40
    inputs = [torch.randn(2, 33, C, requires_grad=True), torch.randn(2, 33, 2 * C, requires_grad=True),
              torch.randn(2 * C, requires_grad=True), torch.randn(2, 33, C, requires_grad=True),
              torch.randn(2, 33, C, requires_grad=True)]
    for p in (0.0, 0.25):
        _kernel_vs_reference(monkeypatch, lambda r, g, b, lo, gl: cpu_kernels.gated_mix(r, g, b, lo, gl, p), inputs)


def test_bias_gelu_matches_torch_gelu(monkeypatch):
    x = (torch.randn(50, 70) * 4).requires_grad_()  # covers the tails of erf
    bias = torch.randn(70, requires_grad=True)
    # erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7): GELU within |x| * 1e-7 of torch's
    _kernel_vs_reference(monkeypatch, cpu_kernels.bias_gelu, [x, bias], atol=2e-6)


def test_layer_norm_matches_torch(monkeypatch):
    x = (torch.randn(3, 29, 48) * 3 + 1).requires_grad_()
    weight, bias = torch.randn(48, requires_grad=True), torch.randn(48, requires_grad=True)
    _kernel_vs_reference(monkeypatch, lambda x, w, b: cpu_kernels.layer_norm(x, w, b, 1e-5), [x, weight, bias],
                         atol=1e-5)


@pytest.mark.parametrize("k,with_bias", [(3, True), (4, True), (1, False)])
def test_causal_conv_matches_torch_conv(k, with_bias):
    x = torch.randn(3, 19, 24, requires_grad=True)
    weight = torch.randn(24, 1, k, requires_grad=True)
    bias = torch.randn(24, requires_grad=True) if with_bias else None

    def torch_conv(x, weight, bias):
        return F.conv1d(F.pad(x.transpose(1, 2), (k - 1, 0)), weight, bias, groups=24).transpose(1, 2)

    fused = _run(cpu_kernels.causal_conv, [x, weight, bias])
    reference = _run(torch_conv, [x, weight, bias])
    torch.testing.assert_close(fused[0], reference[0])
    for a, b in zip(fused[1], reference[1]):
        torch.testing.assert_close(a, b)


def test_softmax_cross_entropy_rows(monkeypatch):
    logits = torch.randn(64, 300) * 5
    logits[3, 7] = 120.0  # a confident row: loss ~0, softmax saturates
    targets = torch.randint(0, 300, (64,))
    targets[3] = 7
    expected = F.cross_entropy(logits, targets, reduction="none")
    softmax = torch.softmax(logits, dim=-1)
    for use_library in (True, False):
        work = logits.clone()
        with monkeypatch.context() as m:
            if not use_library:  # the torch reference
                m.setattr(cpu_kernels, "library", lambda: None)
            loss, inv_sum = cpu_kernels.softmax_cross_entropy_rows(work, targets)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(work * inv_sum[:, None], softmax, rtol=1e-5, atol=1e-7)


def test_dropout_masks_equal_the_reference_hash_and_are_independent_of_threads():
    """The kernel's in-line mask is the reference hash exactly; nothing depends on the thread count
    (bias gradients are summed over fixed row chunks, not per thread)."""
    p = 0.1
    torch.manual_seed(7)
    mask = cpu_kernels.MaskParams(p)
    x = torch.ones(5, 1000)
    out = cpu_kernels._BiasDropoutAdd.apply(None, x, None, mask)
    assert torch.equal(out, mask.reference(x.shape))
    kept = (out != 0).float()
    assert abs(kept.mean().item() - (1 - p)) < 0.01
    assert abs(torch.corrcoef(torch.stack([kept.flatten()[:-1], kept.flatten()[1:]]))[0, 1].item()) < 0.03

    inputs = [torch.randn(4, 50, 16), torch.randn(4, 50, 32), torch.randn(32), torch.randn(4, 50, 16),
              torch.randn(4, 50, 16)]
    for t in inputs:
        t.requires_grad_()
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_run(lambda r, g, b, lo, gl: cpu_kernels.gated_mix(r, g, b, lo, gl, 0.2), inputs))
    finally:
        torch.set_num_threads(threads)
    for out, grads in results[1:]:
        assert torch.equal(out, results[0][0])
        assert all(torch.equal(a, b) for a, b in zip(grads, results[0][1]))


@pytest.mark.parametrize("arch", ["gam", "transformer", "mamba"])
def test_models_train_the_same_with_or_without_the_built_kernels(monkeypatch, arch):
    """A machine without a compiler runs the reference implementations: the same masks and the same
    function, so a run (or a resume) moves between the two paths without a jump."""
    cfg = tiny_model_config(arch=arch, dropout=0.2)
    model = build_model(cfg).train()
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    targets = torch.randint(0, cfg.vocab_size, (2, 16))

    def loss_and_grads():
        model.zero_grad()
        torch.manual_seed(0)
        _, loss = model(idx, targets, return_logits=False)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    fused = loss_and_grads()
    with monkeypatch.context() as m:
        m.setattr(cpu_kernels, "library", lambda: None)
        reference = loss_and_grads()
    torch.testing.assert_close(fused[0], reference[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(fused[1], reference[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_failed_build_falls_back_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv(cpu_kernels.CACHE_ENV, str(tmp_path / "cache"))
    cpu_kernels.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="fused CPU kernels unavailable"):
            assert cpu_kernels.library() is None
    finally:
        cpu_kernels.library.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monkeypatch.delenv("CXX")
        assert cpu_kernels.library() is not None  # builds into the fresh cache
    assert list((tmp_path / "cache").glob("cpu_kernels-*.so"))
    cpu_kernels.library.cache_clear()
    monkeypatch.delenv(cpu_kernels.CACHE_ENV)
    assert cpu_kernels.library() is not None


def test_plain_torch_uses_torch_modules_only():
    from gam_pretrain.models.common import Dropout

    drop = Dropout(0.5)
    x = torch.randn(1000)
    torch.manual_seed(0)
    with cpu_kernels.plain_torch():
        plain = drop(x)
    torch.manual_seed(0)
    assert torch.equal(plain, F.dropout(x, 0.5))


def test_dropout_of_one_drops_everything():
    from gam_pretrain.models.common import Dropout

    drop, x, residual = Dropout(1.0), torch.randn(4, 8), torch.randn(4, 8)
    assert torch.equal(drop(x), torch.zeros_like(x))
    assert torch.equal(drop.add_to(residual, x, torch.randn(8)), residual)
    gates, bias = torch.randn(4, 16), torch.randn(16)
    assert torch.equal(cpu_kernels.gated_mix(residual, gates, bias, x, x, 1.0), residual)
