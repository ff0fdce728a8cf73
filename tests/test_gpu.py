"""GPU-only paths. Each test is skipped, with the reason, on a machine without CUDA."""
import pytest
import torch

from conftest import tiny_model_config
from gam_pretrain.models import build_model
from gam_pretrain.accel.scan import FastSelectiveScan
from gam_pretrain.train.engines import SingleEngine
from gam_pretrain.config import OptimConfig, RunConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("arch", ["gam", "transformer", "mamba", "gam-assoc"])
def test_bf16_training_steps_learn(arch):
    torch.manual_seed(0)
    cfg = RunConfig(model=tiny_model_config(arch=arch, d_model=64, block_size=64),
                    optim=OptimConfig(lr=3e-3, warmup_steps=0, schedule="constant"))
    engine = SingleEngine(build_model(cfg.model), cfg, torch.device("cuda"))
    data = torch.randint(0, 97, (8, 65))
    data[:, 1::2] = data[:, 0:-1:2]  # a learnable pattern: every odd token repeats its predecessor
    losses = [engine.train_step([(data[:, :-1], data[:, 1:])], step, 30).loss for step in range(30)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.5


def test_sdpa_runs_flash_attention_in_bf16():
    from torch.profiler import ProfilerActivity, profile

    model = build_model(tiny_model_config(arch="transformer", attention="sdpa", d_model=128, block_size=128)).cuda()
    idx = torch.randint(0, 97, (4, 128), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(idx)
        torch.cuda.synchronize()
    names = " ".join(e.key.lower() for e in prof.key_averages())
    assert "flash" in names, names[:2000]


def test_torch_scan_on_cuda_matches_cpu():
    torch.manual_seed(0)
    b, d, n, l = 2, 16, 8, 40
    args = [torch.randn(b, d, l), torch.randn(b, d, l), -torch.rand(d, n), torch.randn(b, n, l), torch.randn(b, n, l),
            torch.randn(d)]
    cpu = FastSelectiveScan()(*args, z=None, delta_bias=None, delta_softplus=True)
    gpu = FastSelectiveScan()(*[a.cuda() for a in args], z=None, delta_bias=None, delta_softplus=True)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)



@pytest.mark.parametrize("arch", ["gam", "transformer", "mamba", "gam-assoc"])
def test_fp32_forward_and_backward_on_cuda_match_cpu(arch, monkeypatch):
    """The shared pieces on CUDA (channels-last causal conv; the plain dropout and loss paths)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    model = build_model(tiny_model_config(arch=arch, scan="torch"))
    idx = torch.randint(0, 97, (2, 32))
    results = []
    for device in ("cpu", "cuda"):
        model.to(device).zero_grad()
        x = idx.to(device)
        logits = model(x).detach().cpu()
        _, loss = model(x, x, return_logits=False)
        loss.backward()
        results.append((logits, loss.detach().cpu(), [p.grad.to("cpu", copy=True) for p in model.parameters()]))
    (cpu_logits, cpu_loss, cpu_grads), (gpu_logits, gpu_loss, gpu_grads) = results
    torch.testing.assert_close(gpu_logits, cpu_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gpu_loss, cpu_loss, rtol=1e-5, atol=1e-5)
    for a, b in zip(gpu_grads, cpu_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
