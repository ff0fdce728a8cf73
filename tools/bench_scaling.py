"""Table 2: one block's forward + backward time and memory against sequence length, per model.

    python tools/bench_scaling.py --out results/bench_scaling_cpu.json            # CPU scale
    python tools/bench_scaling.py --gpu --out results/bench_scaling_h100.json     # paper scale
    python tools/bench_scaling.py --seq 256,512,1024,2048,4096,8192 --models gam,transformer-sdpa,mamba,gam-assoc \
        --out results/bench_scaling_assoc_cpu.json                                 # issue 19's lengths on CPU

For each sequence length, every model's block runs forward + backward on a (batch, T, width)
input, interleaved model by model, and the median of the repetitions is reported. Memory: peak
CUDA memory allocated during the step on a GPU; on CPU the bytes of the tensors autograd saves for
backward (activation memory, measured with saved-tensor hooks; CPU has no peak counter per step).
The growth exponent is the slope of log time against log T (least squares over all lengths and
over the upper half). The target: time(8192) / time(256) <= 1.15 x 32 for GAM, Mamba and GAM-Assoc.

Models: the paper's GAM block, the Transformer block with naive T x T attention (as the paper) and
with SDPA (flash attention on a GPU), the Mamba block of the standard stack (mamba-ssm's kernels
when importable on CUDA, else our PyTorch scan), and GAM-Assoc's block (beyond the paper: the
chunked delta rule, 64-token chunks).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from gam_pretrain.accel import apply_accel
from gam_pretrain.models import ModelConfig, build_model

MODELS = {
    "gam": dict(arch="gam"),
    "transformer-naive": dict(arch="transformer", attention="naive"),
    "transformer-sdpa": dict(arch="transformer", attention="sdpa"),
    "mamba": dict(arch="mamba", stack="standard"),
    "gam-assoc": dict(arch="gam-assoc"),
}


def make_block(name: str, width: int, heads: int, device: torch.device) -> torch.nn.Module:
    cfg = ModelConfig(d_model=width, n_layers=1, n_heads=heads, dropout=0.0, block_size=16384, **MODELS[name])
    torch.manual_seed(0)
    return apply_accel(build_model(cfg), "none", device).blocks[0].to(device)  # the scan model.scan picks


def saved_tensor_bytes(block, x) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x)
    return total


def measure(block, batch: int, seq: int, width: int, device, dtype, reps: int) -> dict:
    x = torch.randn(batch, seq, width, device=device, requires_grad=True)
    grad = torch.randn(batch, seq, width, device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with autocast:
            y = block(x)
        y.float().backward(grad)
        x.grad = None
        for p in block.parameters():
            p.grad = None

    step()  # warm-up (kernel selection, allocator)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated() - base
        kind = "peak CUDA memory allocated above the inputs"
    else:
        with autocast:
            memory = saved_tensor_bytes(block, x)
        kind = "bytes saved by autograd for backward"
    return {"ms": 1000 * statistics.median(times), "ms_all": [1000 * t for t in times], "memory_mb": memory / 2**20,
            "memory_kind": kind}


def growth_exponent(seqs: list[int], ms: list[float]) -> dict:
    x, y = np.log(seqs), np.log(ms)
    half = len(seqs) // 2
    return {"all": float(np.polyfit(x, y, 1)[0]),
            "upper_half": float(np.polyfit(x[half:], y[half:], 1)[0]) if len(seqs) - half >= 2 else None}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in result["models"].items():
        ok = [r for r in rows if "ms" in r]
        ax_t.plot([r["seq"] for r in ok], [r["ms"] for r in ok], "o-", label=name)
        ax_m.plot([r["seq"] for r in ok], [r["memory_mb"] for r in ok], "o-", label=name)
    seqs = result["seq_lens"]
    ax_t.plot(seqs, [result["models"]["gam"][0].get("ms", 1) * s / seqs[0] for s in seqs], "k:", lw=0.8, label="linear")
    ax_t.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="forward + backward (ms)",
             title=f"one block, batch {result['batch']}, width {result['width']}, {result['dtype']}")
    ax_m.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="memory (MB)", title=result["memory_kind"])
    ax_t.legend(fontsize=8)
    fig.suptitle(result["device"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="paper scale on CUDA: batch 16, width 512, bf16, T 256..8192")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repetition (CI)")
    parser.add_argument("--seq", default="", help="comma-separated lengths (default: 256..8192 GPU, 128..2048 CPU)")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    # the code that runs is the tree at the start (a long run outlives commits made meanwhile); -dirty: edited
    revision = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    gpu = args.gpu
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    if args.smoke:
        args.seq, args.batch, args.width, args.reps = args.seq or "32,64", args.batch or 1, args.width or 16, 1
    seqs = [int(s) for s in args.seq.split(",")] if args.seq else ([256, 512, 1024, 2048, 4096, 8192] if gpu
                                                                   else [128, 256, 512, 1024, 2048])
    batch = args.batch or (16 if gpu else 2)
    width = args.width or (512 if gpu else 128)
    heads = max(1, width // 64)
    names = args.models.split(",")
    blocks = {name: make_block(name, width, heads, device) for name in names}
    rows: dict[str, list[dict]] = {name: [] for name in names}
    for seq in seqs:
        for name in names:  # interleaved: every model at this length before the next length
            try:
                rows[name].append({"seq": seq, **measure(blocks[name], batch, seq, width, device, dtype, args.reps)})
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows[name].append({"seq": seq, "error": "out of memory"})
            print(name, rows[name][-1].get("ms", rows[name][-1].get("error")), flush=True)
    summary = {}
    for name, rs in rows.items():
        ok = [r for r in rs if "ms" in r]
        if len(ok) >= 2:
            summary[name] = {"exponent": growth_exponent([r["seq"] for r in ok], [r["ms"] for r in ok]),
                             "time_ratio_last_over_first": ok[-1]["ms"] / ok[0]["ms"],
                             "length_ratio": ok[-1]["seq"] / ok[0]["seq"]}
            summary[name]["within_1.15x_linear"] = summary[name]["time_ratio_last_over_first"] <= 1.15 * summary[name]["length_ratio"]
    device_name = torch.cuda.get_device_name() if gpu else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    result = {
        "benchmark": "bench_scaling", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git": revision,
        "command": "python tools/bench_scaling.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v not in (None, False, "")),
        "device": device_name, "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""), "batch": batch,
        "width": width, "heads": heads, "seq_lens": seqs, "reps": args.reps,
        "memory_kind": next((r["memory_kind"] for rs in rows.values() for r in rs if "memory_kind" in r), ""),
        "models": rows, "summary": summary,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    for name, s in summary.items():
        print(f"{name:18s} exponent {s['exponent']['all']:.2f} (upper half {s['exponent']['upper_half'] or math.nan:.2f}), "
              f"time x{s['time_ratio_last_over_first']:.1f} for length x{s['length_ratio']:.0f}")
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
