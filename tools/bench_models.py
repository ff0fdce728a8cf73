"""Training-step throughput of every family at the paper config, against the fp32 matmul peak.

    python tools/bench_models.py --batch 8 --seq 256 --steps 5 --out tools/results/bench_models_cpu.json

One run measures, side by side (interleaved round by round, medians reported; in each round a
model's timed step follows an untimed step of the same model, as in training):
  - the fp32 (bf16 on GPU) matmul peak of this machine (4096^3 matmuls: a sample after every timed
    step; the best sample is the peak);
  - a full training step (forward, backward, grad clip, AdamW step) of each model: tokens/s and the
    achieved model FLOP/s (analytic training FLOPs per token x tokens/s) as a fraction of that peak
    (median step against the best sample), and the median over rounds of each step against the
    peak sample taken right after it (the machine's speed drifts by several percent between minutes);
  - `gam-compiled`: our GAM under torch.compile (inductor fuses the elementwise work);
  - the same step for `paper-transcription`: the paper's GAM written plainly
    (gam_pretrain/models/reference.py) with an unfused torch AdamW over all parameters;
  - for `gam`, a ceiling: the step's own matmuls (same shapes and strides, recorded during a step)
    replayed alone, once per round. Their time is what a step would take if every other op (norms, GELU, softmax,
    dropout, loss, optimizer) were free, so model FLOPs / (that time x peak) bounds the fraction
    of peak any fp32 implementation of this step can reach on this machine. (On a GPU at the paper
    size the replay is bound by kernel launches, not by the matmuls, so the ceiling says little there.)
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from gam_pretrain.config import OptimConfig
from gam_pretrain.models import ModelConfig, build_model
from gam_pretrain.models.reference import PaperGAM
from gam_pretrain.train.optim import build_adamw, clip_grad_norm
from gam_pretrain.train.perf import matmul_peak_flops, tune_cpu_allocator

MODELS = {
    "gam": dict(arch="gam"),
    "gam-compiled": dict(arch="gam"),
    "paper-transcription": dict(arch="gam"),
    "transformer-sdpa": dict(arch="transformer", attention="sdpa"),
    "transformer-naive": dict(arch="transformer", attention="naive"),
    "mamba-standard": dict(arch="mamba", stack="standard"),
    "mamba-paper": dict(arch="mamba", stack="paper"),
}


def make_step(name: str, cfg: ModelConfig, device: torch.device, batch: int, seq: int, bf16: bool):
    torch.manual_seed(0)
    if name == "paper-transcription":
        model = PaperGAM(cfg).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                      foreach=False, fused=False)
        clip = torch.nn.utils.clip_grad_norm_
    else:
        model = build_model(cfg).to(device)
        optimizer = build_adamw(model, OptimConfig(), fused=True)
        clip = clip_grad_norm  # as the single-process engine steps
    forward = torch.compile(model) if name.endswith("-compiled") else model
    kwargs = {} if name == "paper-transcription" else {"return_logits": False}  # as the trainer calls it
    idx = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    x, y = idx[:, :-1], idx[:, 1:]

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            _, loss = forward(x, y, **kwargs)
        loss.backward()
        clip(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    flops = build_model(cfg).flops_per_token(seq) if name != "paper-transcription" else None
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
    parser.add_argument("--steps", type=int, default=8, help="timed steps per model (after 2 warm-up steps)")
    parser.add_argument("--untimed-per-round", type=int, default=1,
                        help="steps each model runs, untimed, right before its timed step in a round")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="tools/results/bench_models.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        tune_cpu_allocator()  # as the trainer does; process-wide, so every model below gets it
    bf16 = device.type == "cuda"
    names = args.models.split(",")
    cfgs = {n: ModelConfig(block_size=max(256, args.seq), **MODELS[n]) for n in names}

    steps, flops = {}, {}
    for name in names:
        steps[name], flops[name] = make_step(name, cfgs[name], device, args.batch, args.seq, bf16)
        for _ in range(2):
            steps[name]()
    if "paper-transcription" in flops:
        flops["paper-transcription"] = build_model(cfgs["paper-transcription"]).flops_per_token(args.seq)
    peak_dtype = torch.bfloat16 if bf16 else torch.float32
    peaks = [matmul_peak_flops(device, n=4096, repeats=3, dtype=peak_dtype)]
    replay, gemm_flops = prepare_replay(record_matmuls(steps["gam"])) if "gam" in steps else (None, 0)
    times: dict[str, list[float]] = {n: [] for n in names}
    step_peaks: dict[str, list[float]] = {n: [] for n in names}
    replay_times = []
    # Interleaved, order reversed every round, so drift hits all alike. The timed step follows an
    # untimed step of the same model, as steps follow each other in training (not a step of
    # another model or the peak sample, which leave its memory cold), and is followed by a peak
    # sample (and, for GAM, the replay of its matmuls), so each step has a peak measured beside it.
    for round_ in range(args.steps):
        for name in names if round_ % 2 == 0 else names[::-1]:
            for _ in range(args.untimed_per_round):
                steps[name]()
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
            if name == "gam" and replay is not None:
                replay_times.append(replay())
            step_peaks[name].append(matmul_peak_flops(device, n=4096, repeats=1, dtype=peak_dtype))
    peaks += [p for name in names for p in step_peaks[name]]
    peak = max(peaks)
    tokens = args.batch * args.seq
    results = {}
    for name in names:
        median = statistics.median(times[name])
        tps = tokens / median
        results[name] = {"median_step_s": median, "step_times_s": times[name], "tokens_per_s": tps,
                         "train_flops_per_token": flops[name], "achieved_flops": tps * flops[name],
                         "fraction_of_peak": tps * flops[name] / peak,
                         # each step against the peak sample of its own round: drift cancels within a round
                         "fraction_of_peak_paired_median": statistics.median(
                             tokens * flops[name] / (t * p) for t, p in zip(times[name], step_peaks[name])),
                         "peak_samples_beside_steps_flops": step_peaks[name]}
    if replay is not None:
        gemm_seconds = statistics.median(replay_times)
        results["gam"]["matmuls_alone"] = {
            "seconds_per_step": gemm_seconds, "seconds_per_round": replay_times, "matmul_flops_per_step": gemm_flops,
            "fraction_of_peak_ceiling": tokens * flops["gam"] / gemm_seconds / peak,
            "share_of_gam_step": gemm_seconds / results["gam"]["median_step_s"],
            "share_of_gam_step_paired_median": statistics.median(r / t for r, t in zip(replay_times, times["gam"])),
        }
    for name in ("gam", "gam-compiled"):
        if name in results and "paper-transcription" in results:
            results[name]["speedup_vs_paper_transcription"] = (
                results[name]["tokens_per_s"] / results["paper-transcription"]["tokens_per_s"])
            # the same, from the two steps of each round (run back to back): drift cancels within a pair
            results[name]["speedup_vs_paper_transcription_paired_median"] = statistics.median(
                p / t for p, t in zip(times["paper-transcription"], times[name]))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        rev = ""
    report = {
        "benchmark": "bench_models", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_revision": rev, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "batch": args.batch, "seq": args.seq,
        "precision": "bf16 autocast" if bf16 else "fp32", "untimed_steps_per_round": args.untimed_per_round,
        "matmul_peak_flops": peak,
        "peak_samples_flops": peaks, "models": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"matmul peak {peak / 1e9:.1f} GFLOP/s ({report['precision']}, {report['threads']} threads)")
    for name, r in results.items():
        extra = f"  {r['speedup_vs_paper_transcription']:.3f}x transcription" if "speedup_vs_paper_transcription" in r else ""
        print(f"{name:22s} {r['tokens_per_s']:9.0f} tok/s  {r['fraction_of_peak']:.3f} of peak "
              f"({r['fraction_of_peak_paired_median']:.3f} paired with a peak sample each){extra}")
        if "matmuls_alone" in r:
            g = r["matmuls_alone"]
            print(f"{'':22s} its matmuls alone: {g['seconds_per_step']:.3f} s = {g['share_of_gam_step']:.1%} of the step "
                  f"({g['share_of_gam_step_paired_median']:.1%} paired); ceiling {g['fraction_of_peak_ceiling']:.3f} of peak")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
