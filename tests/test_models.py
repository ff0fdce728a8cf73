import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from conftest import tiny_model_config
from gam_pretrain.models import REGISTRY, ModelConfig, build_model, variant_configs
from gam_pretrain.models.mamba import MambaMixer, SelectiveScan

PAPER_COUNTS = {
    "gam": 22_599_680,
    "transformer": 24_166_400,
    "gam-global-only": 19_435_520,
    "gam-sum": 19_447_808,
    "gam-local-only": 17_874_944,
}


@pytest.mark.parametrize("arch,expected", sorted(PAPER_COUNTS.items()))
def test_paper_parameter_counts(arch, expected):
    # ModelConfig's defaults are the paper's: vocab 10000, block 256, width 512, 6 layers, 512 slots, k 3, 8 heads.
    assert build_model(ModelConfig(arch=arch)).num_parameters() == expected


def test_paper_mamba_parameter_count():
    model = build_model(ModelConfig(arch="mamba", stack="paper", expand=3, d_state=16, d_conv=4))
    assert model.num_parameters() == 20_504_576
    # The paper's stack has no residuals or norms between mixers: blocks are bare mixers.
    assert all(isinstance(b, MambaMixer) for b in model.blocks)


def run_blocks(model, x):
    for block in model.blocks:
        x = block(x)
    return x


def test_tied_head_shares_the_embedding():
    model = build_model(tiny_model_config(arch="gam"))
    idx = torch.randint(0, 97, (2, 8))
    logits = model(idx)
    x = model.final_norm(run_blocks(model, model.tok_emb(idx) + model.pos_emb.weight[:8]))
    torch.testing.assert_close(logits, x @ model.tok_emb.weight.t())


def test_loss_paths_agree():
    """return_logits=False (the trainer's path, which keeps no logits) is the same loss as the logits
    path, ignored targets (-100) included."""
    torch.manual_seed(0)
    model = build_model(tiny_model_config(arch="gam"))
    idx, targets = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    targets[0, :3] = -100
    logits, loss = model(idx, targets)
    none, trainer_loss = model(idx, targets, return_logits=False)
    assert none is None
    torch.testing.assert_close(trainer_loss, loss)
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 97), targets.view(-1), ignore_index=-100))


def test_models_do_not_import_the_fast_paths():
    import subprocess
    import sys

    code = "import sys, gam_pretrain.models; print(sorted(m for m in sys.modules if m.startswith('gam_pretrain.')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "gam_pretrain.models.gam" in loaded and "accel" not in loaded


ALL_VARIANTS = variant_configs(tiny_model_config())


@pytest.mark.parametrize("label,cfg", ALL_VARIANTS, ids=[v[0] for v in ALL_VARIANTS])
def test_causality(label, cfg):
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    T = cfg.block_size
    idx = torch.randint(0, cfg.vocab_size, (2, T))
    out = model(idx)
    for t in (0, 5, T // 2, T - 2):
        changed = idx.clone()
        changed[:, t + 1 :] = torch.randint(0, cfg.vocab_size, (2, T - t - 1))
        out2 = model(changed)
        torch.testing.assert_close(out2[:, : t + 1], out[:, : t + 1], rtol=0, atol=1e-5)
        assert not torch.allclose(out2[:, t + 1 :], out[:, t + 1 :]), "later positions should react to changes"


def test_naive_and_sdpa_attention_agree():
    torch.manual_seed(0)
    naive = build_model(tiny_model_config(arch="transformer", attention="naive")).eval()
    sdpa = build_model(tiny_model_config(arch="transformer", attention="sdpa")).eval()
    sdpa.load_state_dict(naive.state_dict())
    idx = torch.randint(0, 97, (3, 32))
    torch.testing.assert_close(sdpa(idx), naive(idx), rtol=1e-5, atol=1e-5)


def test_naive_and_sdpa_attention_agree_in_training_with_dropout():
    """On CPU both draw the attention dropout from torch's generator the same way: same masks, same loss."""
    losses = []
    for attention in ("naive", "sdpa"):
        torch.manual_seed(0)
        model = build_model(tiny_model_config(arch="transformer", attention=attention, dropout=0.1))
        idx = torch.randint(0, 97, (3, 32))
        torch.manual_seed(1)
        losses.append(model(idx, idx, return_logits=False)[1])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)


def test_gam_block_equations_by_hand():
    """One GAM block against the equations written out element by element."""
    torch.manual_seed(0)
    cfg = tiny_model_config(arch="gam", d_model=8, memory_slots=5)
    block = build_model(cfg).blocks[0].eval()
    x = torch.randn(1, 6, 8)
    h = torch.nn.functional.layer_norm(x, (8,), block.ln1.weight, block.ln1.bias)
    w = block.conv.weight[:, 0, :]  # (C, k)
    k = w.shape[1]
    local = torch.zeros_like(h)
    for t in range(6):
        for j in range(k):  # tap j sees position t - (k - 1) + j; positions before 0 are zero padding
            s = t - (k - 1) + j
            if s >= 0:
                local[0, t] += w[:, j] * h[0, s]
        local[0, t] += block.conv.bias
    M = block.memory
    glob = torch.stack([torch.softmax(M @ h[0, t], dim=0) @ M for t in range(6)]).unsqueeze(0)
    gates = h @ block.gate.weight.t() + block.gate.bias
    x1 = x + torch.sigmoid(gates[..., :8]) * local + torch.sigmoid(gates[..., 8:]) * glob
    expected = x1 + block.ffn(torch.nn.functional.layer_norm(x1, (8,), block.ln2.weight, block.ln2.bias))
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["gam", "gam-sum", "gam-local-only", "gam-global-only"])
def test_gam_receptive_field_equals_theory(arch):
    cfg = tiny_model_config(arch=arch, n_layers=3, conv_kernel=3, block_size=24)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    rf = model.receptive_field()
    assert rf == (1 if arch == "gam-global-only" else 1 + 3 * 2)
    emb = model.tok_emb(torch.randint(0, 97, (1, 24))).detach().requires_grad_(True)
    x = emb + model.pos_emb.weight[:24]
    out = model.final_norm(run_blocks(model, x))
    t = 20
    probe = torch.randn(cfg.d_model)  # not .sum(): a LayerNorm output's sum has zero gradient
    (grad,) = torch.autograd.grad((out[0, t] * probe).sum(), emb)
    depends = [s for s in range(24) if grad[0, s].abs().max() > 0]
    assert depends == list(range(t - rf + 1, t + 1))


def test_mamba_scan_matches_step_by_step_recurrence():
    torch.manual_seed(0)
    cfg = tiny_model_config(arch="mamba", d_model=16, d_state=8, expand=2)
    mixer = MambaMixer(cfg)
    mixer.reset_ssm_parameters()
    x = torch.randn(2, 12, 16)
    full = mixer(x)
    conv_state = torch.zeros(2, mixer.d_inner, cfg.d_conv)
    ssm_state = torch.zeros(2, mixer.d_inner, cfg.d_state)
    steps = []
    for t in range(12):
        y, conv_state, ssm_state = mixer.step(x[:, t], conv_state, ssm_state)
        steps.append(y)
    torch.testing.assert_close(full, torch.stack(steps, dim=1), rtol=1e-4, atol=1e-5)


def test_selective_scan_matches_naive_loop():
    torch.manual_seed(0)
    b, d, n, l = 2, 5, 3, 9
    u, delta, z = torch.randn(b, d, l), torch.randn(b, d, l), torch.randn(b, d, l)
    A, B, C, D = -torch.rand(d, n), torch.randn(b, n, l), torch.randn(b, n, l), torch.randn(d)
    bias = torch.randn(d)
    y = SelectiveScan()(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True)
    dt = torch.nn.functional.softplus(delta + bias[:, None])
    h = torch.zeros(b, d, n)
    expected = torch.zeros(b, d, l)
    for t in range(l):
        h = torch.exp(dt[:, :, t, None] * A) * h + dt[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        expected[:, :, t] = (h * C[:, None, :, t]).sum(-1) + D * u[:, :, t]
    expected = expected * torch.nn.functional.silu(z)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def _counted_forward_flops(model, T):
    idx = torch.randint(0, model.cfg.vocab_size, (2, T))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(idx)
    return counter.get_total_flops() / (2 * T)


@pytest.mark.parametrize("label,cfg", ALL_VARIANTS, ids=[v[0] for v in ALL_VARIANTS])
def test_analytic_flops_match_flop_counter(label, cfg):
    model = build_model(cfg)
    analytic = sum(model.forward_flops_breakdown(cfg.block_size).values())
    if cfg.arch == "transformer" and cfg.attention == "sdpa":
        # The flop counter has no formula for the CPU flash kernel; sdpa computes the naive function.
        naive = build_model(tiny_model_config(arch="transformer", attention="naive"))
        assert analytic == _counted_forward_flops(naive, cfg.block_size)
    else:
        assert analytic == _counted_forward_flops(model, cfg.block_size)


@pytest.mark.parametrize("arch", ["gam-global-only", "transformer"])
def test_training_flops_are_three_forwards(arch):
    # Depthwise convs are left out: torch's counter prices their input gradient as a dense conv.
    cfg = tiny_model_config(arch=arch, attention="naive")
    model = build_model(cfg)
    idx = torch.randint(0, 97, (2, 32))
    with FlopCounterMode(display=False) as counter:
        model(idx, idx)[1].backward()
    assert counter.get_total_flops() == model.flops_per_token(32) * 2 * 32


def test_registry_lists_all_families():
    assert {spec.family for spec in REGISTRY.values()} == {"gam", "gam-assoc", "transformer", "mamba"}
    labels = [label for label, _ in variant_configs(ModelConfig())]
    assert "mamba (stack=paper)" in labels and "transformer (attention=naive)" in labels
    assert all(math.isfinite(build_model(c).flops_per_token()) for _, c in variant_configs(tiny_model_config()))


# a second valid value of every ModelConfig field a family might not read
OTHER_VALUES = {"mix_dropout": False, "memory_slots": 8, "conv_kernel": 2, "n_heads": 4, "assoc_conv": 4,
                "attention": "naive", "stack": "paper", "d_state": 8, "d_conv": 2, "expand": 3, "scan": "chunked"}


@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_fields_a_family_does_not_read_change_nothing(arch):
    """unread_fields (left out of run identities) is exact: setting any of them to another value
    builds the same parameters and gives the same training-mode logits, dropout included."""
    from dataclasses import fields, replace

    from gam_pretrain.models import unread_fields

    base = replace(tiny_model_config(), arch=arch, dropout=0.1, d_model=32, n_heads=2)
    assert set(OTHER_VALUES) | {"arch", "vocab_size", "block_size", "d_model", "n_layers", "dropout", "init",
                                "init_std"} == {f.name for f in fields(ModelConfig)}
    idx = torch.randint(0, base.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))

    def logits(cfg):
        model = build_model(cfg, seed=3).train()
        torch.manual_seed(5)
        return model(idx), {k: v.shape for k, v in model.state_dict().items()}

    want, shapes = logits(base)
    for name in sorted(unread_fields(arch)):
        got, got_shapes = logits(replace(base, **{name: OTHER_VALUES[name]}))
        assert got_shapes == shapes and torch.equal(got, want), name
    read = sorted(set(OTHER_VALUES) - unread_fields(arch) - {"scan", "attention"})  # same function, other kernels
    assert read and all(not torch.equal(logits(replace(base, **{name: OTHER_VALUES[name]}))[0], want)
                        for name in read), read


def test_bench_records_every_matmul_of_a_training_step():
    """tools/bench_models.py's matmul replay (the fraction-of-peak ceiling) sees exactly the analytic
    training FLOPs, less the conv (not a matmul)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    from bench_models import make_step, record_matmuls, replay_matmuls

    cfg = tiny_model_config(arch="gam")
    step, flops_per_token = make_step(cfg, None, torch.device("cpu"), batch=2, seq=cfg.block_size, bf16=False)
    seconds, flops = replay_matmuls(record_matmuls(step), repeats=1)
    conv = build_model(cfg).forward_flops_breakdown()["conv"]
    assert seconds > 0 and flops == (flops_per_token - 3 * conv) * 2 * cfg.block_size


DECODE_VARIANTS = variant_configs(ModelConfig(vocab_size=97, block_size=24, d_model=32, n_layers=3, n_heads=4,
                                             dropout=0.0, d_state=4))


@pytest.mark.parametrize("label,cfg", DECODE_VARIANTS, ids=[v[0] for v in DECODE_VARIANTS])
def test_decoding_with_state_equals_the_full_forward(label, cfg):
    """A prompt then one token at a time through `decode` (KV cache, GAM's conv inputs, Mamba's
    states) gives the full forward's logits; generation with it gives the recompute's tokens, greedy
    and sampled, also after the text outgrows the block and the window slides."""
    from gam_pretrain.eval.generate import generate
    from gam_pretrain.models.common import DecodeCache

    model = build_model(cfg, seed=1).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    cache = DecodeCache(len(model.blocks))
    with torch.no_grad():
        steps = [model.decode(idx[:, :7], cache), model.decode(idx[:, 7:10], cache)]  # a chunk after a state too
        steps += [model.decode(idx[:, t:t + 1], cache) for t in range(10, 20)]
        torch.testing.assert_close(torch.cat(steps, dim=1), model(idx), rtol=0, atol=1e-5)
    assert cache.length == 20
    for temperature in (0.0, 1.0):
        cached = generate(model, [1, 2, 3], 30, cfg.block_size, temperature=temperature, seed=3)
        recomputed = generate(model, [1, 2, 3], 30, cfg.block_size, temperature=temperature, seed=3, use_cache=False)
        assert cached == recomputed and len(cached) == 30


def test_gam_assoc_chunked_memory_is_the_delta_rule():
    """The chunked form computes the delta rule's recurrence, outputs and every input's gradient, for
    lengths that do and do not fill whole chunks (float64: to rounding)."""
    from gam_pretrain.models.gam_assoc import delta_rule, delta_rule_chunked

    gen = torch.Generator().manual_seed(0)
    B, H, T, d = 2, 3, 37, 8
    q, k = (F.normalize(torch.randn(B, H, T, d, generator=gen, dtype=torch.float64), dim=-1) for _ in range(2))
    v = torch.randn(B, H, T, d, generator=gen, dtype=torch.float64)
    beta = torch.rand(B, H, T, generator=gen, dtype=torch.float64)
    inputs = [x.requires_grad_() for x in (q, k, v, beta)]
    want, _ = delta_rule(*inputs)
    weights = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    want_grads = torch.autograd.grad((want * weights).sum(), inputs)
    for chunk in (4, 8, 64):
        got = delta_rule_chunked(*inputs, chunk=chunk)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        for g, w in zip(torch.autograd.grad((got * weights).sum(), inputs), want_grads):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


def test_gam_assoc_sees_the_whole_prefix_where_gam_sees_its_conv_field():
    """Changing the first token changes GAM-Assoc's last output; GAM's (2 layers, k=3: 5 tokens) not."""
    idx = torch.randint(0, 97, (1, 32), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    changed[0, 0] = (idx[0, 0] + 1) % 97
    for arch, reaches in (("gam-assoc", True), ("gam", False)):
        model = build_model(tiny_model_config(arch=arch), seed=1).eval()
        with torch.no_grad():
            moved = (model(changed)[0, -1] - model(idx)[0, -1]).abs().max().item()
        assert (moved > 1e-6) == reaches, (arch, moved)
    assert build_model(tiny_model_config(arch="gam-assoc")).receptive_field() is None


def test_gam_assoc_runs_in_bf16_parameters_and_under_autocast():
    """bf16 weights (FSDP2's and DeepSpeed's bf16 modes) and bf16 autocast both run: the memory is
    computed in float32 (no bf16 triangular solve), and the logits stay near the float32 model's."""
    cfg = tiny_model_config(arch="gam-assoc")
    model = build_model(cfg, seed=1).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(idx)
        halved = build_model(cfg, seed=1).to(torch.bfloat16).eval()(idx)
    for got in (autocast, halved):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, rtol=0, atol=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.train()(idx, idx)[1].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
