"""Training-step throughput of the plain models and of each fast path (gam_pretrain.accel), side by side.

    python tools/bench_models.py --batch 8 --seq 256 --steps 5 --out results/bench_models_cpu.json

One run measures, interleaved round by round (order reversed every round, so drift hits all alike;
medians reported; a variant's timed step follows an untimed step of the same variant, as steps
follow each other in training):
  - a full training step (forward, backward, grad clip, fused AdamW step) of each variant: a model
    (`--models`) as built (the plain PyTorch model, labelled by its name) and after `apply_accel`
    with each kind in `--accels` (labelled name+kind; `none` differs from the plain model only for
    Mamba, which it gives the scan `model.scan` picks): tokens/s, and per kind the speedup over the
    plain model (ratio of medians, and the median over rounds of the ratio of the two steps of the
    same round);
  - the fp32 (bf16 on GPU) matmul peak of this machine (4096^3 matmuls, one sample per round; the
    best sample is the peak) and each variant's achieved model FLOP/s as a fraction of it;
  - for plain `gam`, a ceiling: the step's own matmuls (same shapes and strides, recorded during a
    step) replayed alone, once per round. Their time is what a step would take if every other op
    (norms, GELU, softmax, dropout, loss, optimizer) were free, so model FLOPs / (that time x peak)
    bounds the fraction of peak any fp32 implementation of this step can reach on this machine.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from gam_pretrain.accel import apply_accel
from gam_pretrain.config import OptimConfig
from gam_pretrain.models import ModelConfig, build_model
from gam_pretrain.train.optim import build_adamw, clip_grad_norm
from gam_pretrain.train.perf import matmul_peak_flops, tune_cpu_allocator

MODELS = {
    "gam": dict(arch="gam"),
    "transformer-sdpa": dict(arch="transformer", attention="sdpa"),
    "transformer-naive": dict(arch="transformer", attention="naive"),
    "mamba-standard": dict(arch="mamba", stack="standard"),
    "mamba-paper": dict(arch="mamba", stack="paper"),
}
ACCELS = ("auto", "none", "compile", "compile-graphs")


def make_step(cfg: ModelConfig, accel: str | None, device: torch.device, batch: int, seq: int, bf16: bool):
    """(step, training FLOPs per token): step() runs one training step of build_model(cfg) with the
    fast path `accel` applied (None: the plain model, as built)."""
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    flops = model.flops_per_token(seq)
    if accel is not None:
        model = apply_accel(model, accel, device)
    optimizer = build_adamw(model, OptimConfig(), fused=True)
    idx = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    x, y = idx[:, :-1], idx[:, 1:]

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            _, loss = model(x, y, return_logits=False)  # as the trainer calls it
        loss.backward()
        clip_grad_norm(model.parameters(), 1.0)  # as the single-process engine steps
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step, flops


def record_matmuls(step) -> list[tuple]:
    """(op, args) of every mm/addmm/bmm one step runs, backward included; tensors recorded as
    (shape, stride, device), other arguments as they are."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ops = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)
    calls: list[tuple] = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in ops:
                calls.append((func, [(a.shape, a.stride(), a.device) if isinstance(a, torch.Tensor) else a
                                     for a in args]))
            return func(*args, **(kwargs or {}))

    with Recorder():
        step()
    return calls


def prepare_replay(calls: list[tuple]):
    """(run, FLOPs): run() executes the recorded matmuls back to back on fresh random operands of the
    same shapes and strides and returns the seconds it took."""
    def materialize(a):
        if isinstance(a, tuple):
            shape, stride, device = a
            return torch.empty_strided(shape, stride, device=device).normal_()
        return a

    prepared = [(func, [materialize(a) for a in args]) for func, args in calls]
    flops = 0
    for func, args in prepared:
        x, w = args[-2:] if func != torch.ops.aten.bmm.default else args
        flops += 2 * x.shape[-2] * x.shape[-1] * w.shape[-1] * (x.shape[0] if x.dim() == 3 else 1)
    on_cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for _, args in prepared for a in args)
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)

    def run() -> float:
        sync()
        t0 = time.perf_counter()
        for func, args in prepared:
            func(*args)
        sync()
        return time.perf_counter() - t0

    return run, flops


def replay_matmuls(calls: list[tuple], repeats: int = 3) -> tuple[float, float]:
    """(seconds, FLOPs) of the recorded matmuls run back to back, best of `repeats`."""
    run, flops = prepare_replay(calls)
    return min(run() for _ in range(repeats)), flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (after 2 warm-up steps)")
    parser.add_argument("--untimed-per-round", type=int, default=1,
                        help="steps each variant runs, untimed, right before its timed step in a round")
    parser.add_argument("--models", default="gam,transformer-sdpa",
                        help="comma-separated subset of " + ",".join(MODELS))
    parser.add_argument("--accels", default="compile",
                        help="apply_accel kinds to measure against each plain model, of " + ",".join(ACCELS))
    parser.add_argument("--skip", default="",
                        help="comma-separated model:accel pairs to leave out, e.g. transformer-sdpa:compile")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="results/bench_models.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        tune_cpu_allocator()  # as the trainer does; process-wide, so every variant below gets it
    bf16 = device.type == "cuda"
    accels = [None] + args.accels.split(",")
    skipped = set(filter(None, args.skip.split(",")))
    variants = [(m, a) for m in args.models.split(",") for a in accels if f"{m}:{a}" not in skipped]
    label = lambda m, a: m if a is None else f"{m}+{a}"  # noqa: E731

    steps, flops = {}, {}
    for model_name, accel in variants:
        cfg = ModelConfig(block_size=max(256, args.seq), **MODELS[model_name])
        name = label(model_name, accel)
        steps[name], flops[name] = make_step(cfg, accel, device, args.batch, args.seq, bf16)
        t0 = time.perf_counter()
        for _ in range(2):
            steps[name]()
        print(f"{name}: warm-up {time.perf_counter() - t0:.1f} s", flush=True)
    names = list(steps)
    peak_dtype = torch.bfloat16 if bf16 else torch.float32
    peaks = [matmul_peak_flops(device, n=4096, repeats=2, dtype=peak_dtype)]
    replay, gemm_flops = prepare_replay(record_matmuls(steps["gam"])) if "gam" in steps else (None, 0)
    times: dict[str, list[float]] = {n: [] for n in names}
    replay_times = []
    for round_ in range(args.steps):
        for name in names if round_ % 2 == 0 else names[::-1]:
            for _ in range(args.untimed_per_round):
                steps[name]()
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
            if name == "gam" and replay is not None:
                replay_times.append(replay())
        peaks.append(matmul_peak_flops(device, n=4096, repeats=1, dtype=peak_dtype))
    peak = max(peaks)
    tokens = args.batch * args.seq
    results = {}
    for name in names:
        median = statistics.median(times[name])
        tps = tokens / median
        results[name] = {"median_step_s": median, "min_step_s": min(times[name]), "step_times_s": times[name],
                         "tokens_per_s": tps, "train_flops_per_token": flops[name],
                         "achieved_flops": tps * flops[name], "fraction_of_peak": tps * flops[name] / peak}
    for model_name, accel in variants:
        if accel is not None:
            plain, fast = times[model_name], times[label(model_name, accel)]
            results[label(model_name, accel)]["speedup_vs_plain"] = statistics.median(plain) / statistics.median(fast)
            # the same from the two steps of each round (run close together): drift mostly cancels within a round
            results[label(model_name, accel)]["speedup_vs_plain_paired_median"] = statistics.median(
                p / f for p, f in zip(plain, fast))
    if replay is not None:
        gemm_seconds = statistics.median(replay_times)
        results["gam"]["matmuls_alone"] = {
            "seconds_per_step": gemm_seconds, "seconds_per_round": replay_times, "matmul_flops_per_step": gemm_flops,
            "fraction_of_peak_ceiling": tokens * flops["gam"] / gemm_seconds / peak,
            "share_of_gam_step": gemm_seconds / results["gam"]["median_step_s"],
        }
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        rev = ""
    report = {
        "benchmark": "bench_models", "command": "python " + " ".join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git_revision": rev,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "batch": args.batch, "seq": args.seq,
        "precision": "bf16 autocast" if bf16 else "fp32", "untimed_steps_per_round": args.untimed_per_round,
        "matmul_peak_flops": peak, "peak_samples_flops": peaks, "models": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"matmul peak {peak / 1e9:.1f} GFLOP/s ({report['precision']}, {report['threads']} threads)")
    for name, r in results.items():
        extra = (f"  {r['speedup_vs_plain']:.3f}x plain ({r['speedup_vs_plain_paired_median']:.3f}x paired)"
                 if "speedup_vs_plain" in r else "")
        print(f"{name:28s} median {r['median_step_s']:.3f} s  min {r['min_step_s']:.3f} s  {r['tokens_per_s']:7.0f} tok/s"
              f"  {r['fraction_of_peak']:.3f} of peak{extra}")
        if "matmuls_alone" in r:
            g = r["matmuls_alone"]
            print(f"{'':28s} its matmuls alone: {g['seconds_per_step']:.3f} s = {g['share_of_gam_step']:.1%} of the step; "
                  f"ceiling {g['fraction_of_peak_ceiling']:.3f} of peak")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
