"""GPU throughput at real sizes, one prepared script for one GPU (about 8 minutes on an H200).

    python tools/bench_gpu.py --out results/bench_gpu_h200.json             # + a .png beside it
    python tools/bench_gpu.py --smoke --device cpu --out /tmp/bench_gpu.json  # the same code at toy sizes

Every case is a full bf16-autocast training step (forward, backward, clip, fused AdamW) of a model
built by the package and given its fast path by `apply_accel` from outside, as `train` runs it:
2 warm-up steps (compilation happens there), then --steps timed steps; the median is reported as
tokens/s, MFU (the family's own FLOPs per token, models/*.py, over the GPU's dense bf16 peak) and
peak memory. Cases, in this order (the script stops starting new cases past --budget-s and says
which it skipped):

1. scan: the paper setting (width 512, 6 layers, T 256, batch 32, vocab 10k), Mamba (standard
   stack) with each scan: `torch` (the sequential loop), `chunked`, `triton`, `cuda` (mamba-ssm,
   when installed). Target: the best >= 20x `torch`.
2. paper: GAM at the paper setting, plain, compiled, and compiled with CUDA graphs
   (`compile-graphs`), and the Transformer (SDPA, compiled). Target: GAM >= 0.25 MFU with graphs.
3. memory_read: GAM's global read softmax(h M^T) M as two matmuls and a softmax against
   F.scaled_dot_product_attention(h, M, M, scale=1) (one shared key/value set), forward and
   backward, bf16, at width 2048 and T 2048.
4. ladder: the rungs of width 2048, 1024 and 512 (gam_pretrain.sweep.ladder: GAM, Transformer with
   SDPA, Mamba standard with the fastest scan of section 1), each compiled by regions, T 2048; and at width 2048,
   T 8192 for all three. Targets: GAM >= 45% MFU at width 2048; GAM >= the Transformer at T 2048
   and >= 1.5x at T 8192; Mamba >= 0.3x the Transformer at T 2048.

Each case runs in a fresh process: a kernel fault or a hang costs that case alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch._dynamo
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import make_step  # noqa: E402  (tools/ is not a package)

from gam_pretrain.accel.scan import resolve_scan, scan_unavailable  # noqa: E402
from gam_pretrain.models import ModelConfig  # noqa: E402
from gam_pretrain.sweep.ladder import rung_config  # noqa: E402
from gam_pretrain.train.perf import peak_flops  # noqa: E402

PAPER = dict(d_model=512, n_layers=6, n_heads=8, block_size=256, vocab_size=10000)
FULL = {"paper_batch": 32, "widths": [2048, 1024, 512], "seq": 2048, "long_seq": 8192,
        "batch": {512: 8, 1024: 8, 2048: 4}, "long_batch": 1, "read": (8, 2048, 2048, 512)}
SMOKE = {"paper_batch": 2, "widths": [64, 32], "seq": 64, "long_seq": 128,
         "batch": {32: 2, 64: 2}, "long_batch": 1, "read": (2, 64, 64, 16)}


def cases(sizes: dict, smoke: bool, ladder_scan: str = "auto") -> list[dict]:
    paper = ModelConfig(**(PAPER if not smoke else dict(PAPER, d_model=64, n_layers=2, n_heads=2, block_size=32,
                                                          vocab_size=512)))
    seq = paper.block_size
    found = []
    for scan in ("torch", "chunked", "triton", "cuda"):
        found.append(dict(section="scan", name=f"mamba-{scan}", cfg=dataclasses.replace(
            paper, arch="mamba", stack="standard", scan=scan), accel="none", batch=sizes["paper_batch"], seq=seq))
    for name, arch, accel in (("gam", "gam", "none"), ("gam", "gam", "compile"), ("gam", "gam", "compile-graphs"),
                              ("transformer-sdpa", "transformer", "compile")):
        found.append(dict(section="paper", name=f"{name}+{accel}", cfg=dataclasses.replace(
            paper, arch=arch, attention="sdpa"), accel=accel, batch=sizes["paper_batch"], seq=paper.block_size))
    found.append(dict(section="memory_read", name="memory_read"))
    for width in sizes["widths"]:
        for long in ((False, True) if width == max(sizes["widths"]) else (False,)):
            seq = sizes["long_seq"] if long else sizes["seq"]
            base = ModelConfig(vocab_size=paper.vocab_size, block_size=seq)
            for family in ("gam", "transformer", "mamba"):
                found.append(dict(section="ladder", name=f"{family}-d{width}-T{seq}", family=family, width=width,
                                  cfg=dataclasses.replace(rung_config(family, width, base), scan=ladder_scan),
                                  accel="compile", seq=seq,
                                  batch=sizes["long_batch"] if long else sizes["batch"][width]))
    return found


def measure(case: dict, device: torch.device, steps: int, peak: float) -> dict:
    cfg = case["cfg"]
    if cfg.arch == "mamba" and (why := scan_unavailable(cfg.scan, device)):
        return {"skipped": why}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        step, flops = make_step(cfg, case["accel"], device, case["batch"], case["seq"], bf16=device.type == "cuda")
        for _ in range(2):
            torch.compiler.cudagraph_mark_step_begin()
            step()
        warm = time.perf_counter() - t0
        times = []
        for _ in range(steps):
            torch.compiler.cudagraph_mark_step_begin()  # as the engines do before each micro-batch
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    except torch.OutOfMemoryError as e:
        return {"skipped": f"out of memory: {str(e).splitlines()[0]}"}
    except Exception as e:  # noqa: BLE001 - one failing case must not cost the rest of a one-shot GPU run
        return {"skipped": f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    finally:
        step = None
        torch._dynamo.reset()  # compiled code of this case's model is not kept for the next
    seconds = statistics.median(times)
    tokens = case["batch"] * case["seq"]
    got = {"tokens_per_s": tokens / seconds, "step_s": seconds, "steps_s": times, "warmup_s": warm,
           "flops_per_token": flops, "mfu": tokens / seconds * flops / peak, "tokens_per_step": tokens}
    if cfg.arch == "mamba":
        got["scan"] = resolve_scan(cfg.scan, device)
    if device.type == "cuda":
        got["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return got


def memory_read(device: torch.device, shape: tuple, steps: int) -> dict:
    """softmax(h M^T) M two ways, forward + backward, median seconds."""
    batch, seq, width, slots = shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    h = torch.randn(batch, seq, width, device=device, dtype=dtype, requires_grad=True)
    M = (torch.randn(slots, width, device=device, dtype=dtype) * width**-0.5).requires_grad_()
    ways = {"matmuls": lambda: torch.softmax(h @ M.t(), dim=-1) @ M,
            "sdpa": lambda: F.scaled_dot_product_attention(h.unsqueeze(1), M.expand(batch, 1, slots, width),
                                                           M.expand(batch, 1, slots, width), scale=1.0).squeeze(1)}
    out, grad = {}, torch.randn(batch, seq, width, device=device, dtype=dtype)
    reference = ways["matmuls"]()
    for name, way in ways.items():
        err = (way() - reference).abs().max().item()
        times = []
        for i in range(steps + 2):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            way().backward(grad)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t)
        out[name] = {"seconds": statistics.median(times), "max_abs_difference_from_matmuls": err}
    out["sdpa_speedup"] = out["matmuls"]["seconds"] / out["sdpa"]["seconds"]
    out["shape"] = dict(zip(("batch", "seq", "width", "slots"), shape))
    return out


def targets(results: dict) -> dict:
    """The issue's targets, from the measured cases (None where a case is missing)."""
    def tps(name):
        return results.get(name, {}).get("tokens_per_s")

    def ratio(a, b):
        return tps(a) / tps(b) if tps(a) and tps(b) else None

    best_scan = max((n for n in ("mamba-chunked", "mamba-triton", "mamba-cuda") if tps(n)), key=tps, default=None)
    ladder = [r for r in results.values() if r.get("section") == "ladder" and "tokens_per_s" in r]
    widest = max((r["width"] for r in ladder), default=None)
    seqs = sorted({r["seq"] for r in ladder if r["width"] == widest})
    at = {(r["family"], r["seq"]): r for r in ladder if r["width"] == widest}
    gam_graphs = results.get("gam+compile-graphs", {})
    out = {"best_parallel_scan": best_scan,
           "best_parallel_scan_over_sequential": ratio(best_scan, "mamba-torch") if best_scan else None,
           "paper_gam_mfu_with_graphs": gam_graphs.get("mfu")}
    if widest and seqs:
        def fam(family, seq):
            return at.get((family, seq), {}).get("tokens_per_s")
        short, long = seqs[0], seqs[-1]
        out.update({"width": widest, "gam_mfu": at.get(("gam", short), {}).get("mfu"),
                    "gam_over_transformer_short": fam("gam", short) / fam("transformer", short)
                    if fam("gam", short) and fam("transformer", short) else None,
                    "gam_over_transformer_long": fam("gam", long) / fam("transformer", long)
                    if long != short and fam("gam", long) and fam("transformer", long) else None,
                    "mamba_over_transformer_short": fam("mamba", short) / fam("transformer", short)
                    if fam("mamba", short) and fam("transformer", short) else None,
                    "short_seq": short, "long_seq": long})
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ladder = [r for r in report["cases"].values() if r.get("section") == "ladder" and "tokens_per_s" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for family, marker in (("gam", "o"), ("transformer", "s"), ("mamba", "^")):
        for seq, style in ((report["sizes"]["seq"], "-"), (report["sizes"]["long_seq"], "--")):
            points = sorted((r["width"], r["tokens_per_s"], r["mfu"]) for r in ladder
                            if r["family"] == family and r["seq"] == seq)
            if points:
                left.plot([p[0] for p in points], [p[1] for p in points], style, marker=marker, label=f"{family} T={seq}")
                right.plot([p[0] for p in points], [p[2] for p in points], style, marker=marker, label=f"{family} T={seq}")
    left.set(xscale="log", yscale="log", xlabel="width (ladder rung)", ylabel="tokens/s (training step)")
    right.set(xscale="log", xlabel="width (ladder rung)", ylabel="MFU (own FLOPs count, bf16 peak)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{report['device']}: bf16 training steps, regional compile (tools/bench_gpu.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_case(args, case: dict, device: torch.device, peak: float) -> dict:
    """One case, in this process (the child)."""
    if case["section"] == "memory_read":
        return memory_read(device, (SMOKE if args.smoke else FULL)["read"], args.steps)
    if args.smoke:  # compiling takes minutes on a CPU; tests/test_accel.py checks the compiled blocks
        case["accel"] = "none"
    return measure(case, device, args.steps, peak)


def in_child(args, name: str, peak: float, ladder_scan: str) -> dict:
    """A case in a fresh process: a kernel fault (sticky for a CUDA context) or a hang costs that case
    alone; the inductor cache on disk still serves every process."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "case.json"
        command = [sys.executable, __file__, "--case", name, "--case-out", str(result), "--device", args.device,
                   "--steps", str(args.steps), "--peak", str(peak), "--ladder-scan", ladder_scan] \
            + (["--paper-batch", str(args.paper_batch)] if args.paper_batch else []) \
            + (["--smoke"] if args.smoke else [])
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.case_timeout_s)
        except subprocess.TimeoutExpired:
            return {"skipped": f"failed: no result within {args.case_timeout_s:.0f} s"}
        if done.returncode or not result.is_file():
            tail = [line for line in done.stderr.splitlines() if line.strip()][-1:] or ["no output"]
            return {"skipped": f"failed: exit {done.returncode}: {tail[0][:300]}"}
        return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/bench_gpu.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case (after 2 warm-up steps)")
    parser.add_argument("--budget-s", type=float, default=300, help="no case starts after this many seconds")
    parser.add_argument("--case-timeout-s", type=float, default=150, help="a case that takes longer is recorded as failed")
    parser.add_argument("--smoke", action="store_true", help="toy sizes, nothing compiled: checks the script, measures nothing")
    parser.add_argument("--only", default="", help="comma-separated sections to run (scan,paper,memory_read,ladder)")
    parser.add_argument("--paper-batch", type=int, help="sequences per step at the paper setting (default 32; less on a CPU)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # child: run this case only
    parser.add_argument("--case-out", help=argparse.SUPPRESS)
    parser.add_argument("--peak", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--ladder-scan", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    sizes = dict(SMOKE if args.smoke else FULL)
    if args.paper_batch:
        sizes["paper_batch"] = args.paper_batch
    if args.case:
        case = next(c for c in cases(sizes, args.smoke, args.ladder_scan) if c["name"] == args.case)
        Path(args.case_out).write_text(json.dumps(run_case(args, case, device, args.peak)))
        return
    sections = set(args.only.split(",")) if args.only else {"scan", "paper", "memory_read", "ladder"}
    peak = peak_flops(device)
    start = time.perf_counter()
    report = {"benchmark": "bench_gpu", "command": "python " + " ".join(sys.argv),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "smoke": args.smoke, "peak_flops": peak,
              "sizes": {k: sizes[k] for k in ("seq", "long_seq", "paper_batch")}, "cases": {}, "skipped_for_time": []}
    try:
        report["git"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        report["targets"] = targets(report["cases"])
        report["elapsed_s"] = time.perf_counter() - start
        out.write_text(json.dumps(report, indent=1))

    ladder_scan = "auto"
    for case in cases(sizes, args.smoke):
        if case["section"] not in sections:
            continue
        if time.perf_counter() - start > args.budget_s:
            report["skipped_for_time"].append(case["name"])
            continue
        if case["section"] == "ladder" and ladder_scan == "auto":
            # the ladder's Mamba runs the fastest scan the scan section measured
            measured = {c["name"].removeprefix("mamba-"): c["tokens_per_s"] for c in report["cases"].values()
                        if c.get("section") == "scan" and "tokens_per_s" in c and c["name"] != "mamba-torch"}
            ladder_scan = max(measured, key=measured.get) if measured else "auto"
            report["ladder_scan"] = ladder_scan
        got = in_child(args, case["name"], peak, ladder_scan)
        if case["section"] == "memory_read":
            report["memory_read"] = got
            print(f"[{time.perf_counter() - start:5.0f}s] memory_read {json.dumps(got)}", flush=True)
            save()
            continue
        keep = {k: v for k, v in case.items() if k != "cfg"}
        report["cases"][case["name"]] = {**keep, "arch": case["cfg"].arch, **got}
        if case["section"] == "ladder" and case["family"] == "mamba":
            report["cases"][case["name"]]["scan_asked"] = ladder_scan
        summary = (f"{got['tokens_per_s']:12,.0f} tokens/s  MFU {got['mfu']:.3f}  warm-up {got['warmup_s']:.0f}s"
                   + (f"  {got['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in got else "")
                   if "tokens_per_s" in got else got["skipped"])
        print(f"[{time.perf_counter() - start:5.0f}s] {case['section']:7s} {case['name']:28s} {summary}", flush=True)
        save()
    save()
    print(json.dumps(report["targets"], indent=1))
    if any(c.get("section") == "ladder" for c in report["cases"].values()):
        try:
            plot(report, out.with_suffix(".png"))
        except Exception as e:  # noqa: BLE001 - the JSON is written; a plot failure must not hide it
            print(f"no plot: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
