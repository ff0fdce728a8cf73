"""The memory ladder: the largest GAM each engine trains within a fixed RSS budget, 2 CPU ranks.

    python tools/bench_memory.py --out results/bench_memory_cpu.json     # + a .png beside it

For DDP, ZeRO-2, ZeRO-3 and FSDP2, each with and without activation checkpointing, and ZeRO-3 with
optimizer offload, it searches the GAM ladder (`gam-pretrain ladder`: depth = width / 64, 512
memory slots) for the widest model that builds (the engine's own init path: deferred for ZeRO-3
and FSDP2) and trains 3 steps (AdamW, fp32, 2 x 64 tokens per rank) on 2 gloo ranks with the
peak RSS of both ranks together within --budget-gib: widths double from 256 until a trial fails,
then bisect in steps of 64. A trial fails when it ends in an error or when a watcher, polling the
processes' memory (PSS: pages a rank shares with a forked child count once) every 10 ms, sees the
sum pass the budget (it then kills the trial, so an oversized model never takes the machine down).
Each passing trial records every rank's peak RSS (VmHWM) beside the analytic model-state bytes per
rank (16 bytes per parameter for fp32 AdamW: 4 weights, 4 gradients, 8 moments, divided as each
engine divides them).

On 2 cores a step of the largest models takes seconds; the whole ladder takes tens of minutes.

    python tools/bench_memory.py --gpu --out results/bench_memory_h200.json   # on a GPU machine

--gpu runs the same search on --world CUDA devices (default 1: every engine at one rank, so the
sharded engines shard nothing and what differs is activation checkpointing and ZeRO-3's offload of
the optimizer to host memory) in bf16 (autocast for DDP, DeepSpeed's bf16 mode, FSDP2's bf16
parameter policy; fp32 AdamW state in all of them, so 16 bytes per parameter still), 4 x 1024 tokens
per rank, widths from 1024 in steps of 128. A trial fits when it ends without an error and every
rank's peak of reserved device memory (torch.cuda.max_memory_reserved) is within --budget-gib per
device (default: the device's memory); the watcher then guards the host's memory only (--host-gib).
--budget-s stops the search of the remaining configs when the time is spent (what was found is kept).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

CONFIGS = {
    "ddp": ["engine.kind=ddp"],
    "ddp+ac": ["engine.kind=ddp", "engine.activation_checkpointing=true"],
    "zero2": ["engine.kind=deepspeed", "engine.zero_stage=2"],
    "zero2+ac": ["engine.kind=deepspeed", "engine.zero_stage=2", "engine.activation_checkpointing=true"],
    "zero3": ["engine.kind=deepspeed", "engine.zero_stage=3"],
    "zero3+ac": ["engine.kind=deepspeed", "engine.zero_stage=3", "engine.activation_checkpointing=true"],
    "zero3+offload": ["engine.kind=deepspeed", "engine.zero_stage=3", "engine.offload_optimizer=true"],
    "fsdp2": ["engine.kind=fsdp2"],
    "fsdp2+ac": ["engine.kind=fsdp2", "engine.activation_checkpointing=true"],
}


def analytic_bytes_per_rank(config: str, params: int, world: int) -> int:
    """fp32 AdamW model state per rank: weights 4, gradients 4, moments 8 bytes per parameter.
    ZeRO-2 keeps whole weights and an fp32 master partition beside its sharded gradients and moments."""
    if config.startswith("ddp"):
        return 16 * params
    if config.startswith("zero2"):
        return 4 * params + (4 + 8 + 4) * params // world
    return 16 * params // world  # ZeRO-3 (master partitions shared with the weights) and FSDP2


def worker(args) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist

    from gam_pretrain.config import load_config
    from gam_pretrain.train.distributed import init_distributed
    from gam_pretrain.train.engines import build_model_and_engine

    torch.set_num_threads(1)
    info = init_distributed("cuda" if args.gpu else "cpu")
    device = torch.device(f"cuda:{info.local_rank}" if args.gpu else "cpu")
    overrides = [f"model.d_model={args.width}", f"model.n_layers={max(2, args.width // 64)}", "model.dropout=0.0",
                 f"model.block_size={args.seq}", f"train.batch_size={args.world * args.batch}", "optim.warmup_steps=0",
                 f"train.precision={'bf16' if args.gpu else 'fp32'}", *CONFIGS[args.config]]
    cfg = load_config(None, overrides)
    engine = build_model_and_engine(cfg, device, info)
    gen = torch.Generator().manual_seed(info.rank)
    for step in range(3):
        tokens = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq + 1), generator=gen).to(device)
        engine.train_step([(tokens[:, :-1], tokens[:, 1:])], step, 3)
    peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    device_peak = [torch.cuda.max_memory_reserved(device), torch.cuda.max_memory_allocated(device)] if args.gpu else None
    peaks = [None] * info.world_size
    dist.all_gather_object(peaks, (peak, device_peak))
    if info.is_main:
        result = {"peak_rss_per_rank": [p[0] for p in peaks]}
        if args.gpu:
            result["peak_device_reserved_per_rank"] = [p[1][0] for p in peaks]
            result["peak_device_allocated_per_rank"] = [p[1][1] for p in peaks]
        Path(args.worker_out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # DeepSpeed's threads can abort an orderly interpreter exit


def memory_of_tree(pid: int) -> int:
    """Proportional set size (PSS) of a process and its descendants: pages shared between them
    count once. RSS would count them in each: a rank's forked child (DeepSpeed's ZeRO-3 ranks have
    one) shares all of the rank's pages copy-on-write, and summed RSS then reads twice the memory."""
    import psutil

    total = 0
    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            try:
                with open(f"/proc/{proc.pid}/smaps_rollup") as f:
                    total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
            except (OSError, StopIteration):
                try:
                    total += proc.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
    except psutil.NoSuchProcess:
        pass
    return total


def trial(config: str, width: int, args, work: Path) -> dict:
    from gam_pretrain.models import build_model
    from gam_pretrain.sweep.ladder import rung_config

    params = build_model(rung_config("gam", width), materialize=False).num_parameters()
    out = work / f"{config}-{width}.json"
    out.unlink(missing_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.world), "--master_port",
           str(port), __file__, "--config", config, "--width", str(width), "--seq", str(args.seq), "--batch",
           str(args.batch), "--world", str(args.world), "--worker-out", str(out), *(["--gpu"] if args.gpu else [])]
    budget = args.budget_gib * 2**30
    host_budget = args.host_gib * 2**30 if args.gpu else budget
    started = time.perf_counter()
    with open(work / f"{config}-{width}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    seen, over = 0, False
    while proc.poll() is None:
        seen = max(seen, memory_of_tree(proc.pid))
        if seen > host_budget:
            over = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            break
        if time.perf_counter() - started > args.trial_timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            break
        time.sleep(0.01)
    result = {"width": width, "depth": max(2, width // 64), "params": params, "seconds": time.perf_counter() - started,
              "max_polled_pss_sum": seen, "analytic_state_bytes_per_rank": analytic_bytes_per_rank(config, params, args.world)}
    if over:
        return {**result, "fits": False, "why": f"host memory (PSS) of the ranks passed {host_budget / 2**30:.1f} GiB"}
    if proc.returncode != 0 or not out.exists():
        text = (work / f"{config}-{width}.log").read_text()
        why = "device out of memory" if "out of memory" in text.lower() else (text.strip().splitlines() or [""])[-1]
        return {**result, "fits": False, "why": f"exit {proc.returncode}: {why[-300:]}"}
    measured = json.loads(out.read_text())
    if args.gpu:
        device_peaks = measured["peak_device_reserved_per_rank"]
        fits = max(device_peaks) <= budget
        return {**result, **measured, "fits": fits,
                **({} if fits else {"why": f"peak reserved device memory {max(device_peaks) / 2**30:.1f} GiB"})}
    peaks = measured["peak_rss_per_rank"]
    fits = sum(peaks) <= budget
    return {**result, **measured, "fits": fits, **({} if fits else {"why": f"peak RSS sum {sum(peaks) / 2**30:.1f} GiB"})}


def search(config: str, args, work: Path, say) -> dict:
    trials = []

    def run(width: int) -> bool:
        t = trial(config, width, args, work)
        trials.append(t)
        say(f"{config:14s} width {width:5d} ({t['params'] / 1e6:7.1f}M) {'fits' if t['fits'] else 'no: ' + t['why']}"
            f" [{t['seconds']:.0f} s]")
        return t["fits"]

    lo, hi, width = 0, 0, args.start_width
    while True:
        if run(width):
            lo, width = width, 2 * width
        else:
            hi = width
            break
    if lo == 0:
        return {"trials": trials, "largest": None}
    while hi - lo > args.width_step:
        mid = (lo + hi) // 2 // args.width_step * args.width_step
        if run(mid):
            lo = mid
        else:
            hi = mid
    largest = next(t for t in trials if t["width"] == lo)
    return {"trials": trials, "largest": largest}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpu, world = report.get("gpu", False), report["world_size"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for config, found in report["configs"].items():
        fits = sorted((t for t in found["trials"] if t["fits"]), key=lambda t: t["params"])
        if not fits:
            continue
        x = [t["params"] / 1e6 for t in fits]
        peak_key = "peak_device_reserved_per_rank" if gpu else "peak_rss_per_rank"
        line, = ax.plot(x, [max(t[peak_key]) / 2**30 for t in fits], "o-", label=f"{config} (peak)")
        ax.plot(x, [t["analytic_state_bytes_per_rank"] / 2**30 for t in fits], ":", color=line.get_color())
    ax.axhline(report["budget_gib"] / (1 if gpu else world), color="gray", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("GAM parameters (millions)")
    ax.set_ylabel("GiB per rank")
    where = f"{world} {report.get('device', 'GPU')} rank(s), bf16" if gpu else f"{world} CPU ranks"
    ax.set_title(f"Peak {'reserved device memory' if gpu else 'RSS'} per rank (solid) vs fp32 AdamW state (dotted), "
                 f"{where}, budget {report['budget_gib']:.0f} GiB{' per device' if gpu else ''}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--gpu", action="store_true", help="CUDA devices, bf16 (defaults below in brackets)")
    parser.add_argument("--world", type=int, help="ranks (2 [1])")
    parser.add_argument("--budget-gib", type=float,
                        help="CPU: both ranks' RSS together (18); GPU: reserved memory per device [the device's]")
    parser.add_argument("--host-gib", type=float, default=100.0, help="GPU: the watcher's limit on host memory")
    parser.add_argument("--start-width", type=int, help="(256 [1024])")
    parser.add_argument("--width-step", type=int, help="bisection step (64 [128])")
    parser.add_argument("--seq", type=int, help="tokens per sequence (64 [1024])")
    parser.add_argument("--batch", type=int, help="sequences per rank per step (2 [4])")
    parser.add_argument("--trial-timeout", type=float, default=900)
    parser.add_argument("--budget-s", type=float, default=0, help="stop starting configs after this long (0: never)")
    parser.add_argument("--out", default="results/bench_memory.json")
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--summarize", metavar="JSON",
                        help="only (re)write the summary and PNG of a report whose run was stopped after some configs")
    args = parser.parse_args()
    for key, cpu, gpu in [("world", 2, 1), ("start_width", 256, 1024), ("width_step", 64, 128), ("seq", 64, 1024),
                          ("batch", 2, 4)]:
        if getattr(args, key) is None:
            setattr(args, key, gpu if args.gpu else cpu)
    if args.worker_out:
        return worker(args)
    if args.summarize:
        path = Path(args.summarize)
        report = json.loads(path.read_text())
        report["summarized_by"] = "python tools/bench_memory.py " + " ".join(sys.argv[1:])
        return summarize(report, path)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_memory-"))  # each trial's log and result (kept, for a failed trial's why)
    print(f"trial logs in {work}", flush=True)
    report = {"benchmark": "bench_memory", "command": "python tools/bench_memory.py " + " ".join(sys.argv[1:]),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "world_size": args.world,
              "gpu": args.gpu, "tokens_per_rank_step": args.batch * args.seq, "configs": {}}
    if args.gpu:
        import torch

        props = torch.cuda.get_device_properties(0)
        report["device"] = props.name
        args.budget_gib = args.budget_gib or props.total_memory / 2**30
        report["precision"] = "bf16"
    args.budget_gib = args.budget_gib or 18.0
    report["budget_gib"] = args.budget_gib
    started = time.perf_counter()
    for config in args.configs:
        if args.budget_s and time.perf_counter() - started > args.budget_s:
            print(f"{config}: not searched, --budget-s {args.budget_s:.0f} spent", flush=True)
            continue
        report["configs"][config] = search(config, args, work, lambda line: print(line, flush=True))
        out.write_text(json.dumps(report, indent=2))  # after each engine: a long run keeps what it found
    summarize(report, out)


def summarize(report: dict, out: Path) -> None:
    """The largest model per config and its ratio to DDP's, into the report, its PNG and stdout."""
    largest = {c: (f["largest"] or {}).get("params", 0) for c, f in report["configs"].items()}
    ddp = max(largest.get("ddp", 0), largest.get("ddp+ac", 0))
    report["largest_params"] = largest
    if ddp:
        report["largest_vs_ddp"] = {c: p / ddp for c, p in largest.items()}
    out.write_text(json.dumps(report, indent=2))
    plot(report, out.with_suffix(".png"))
    for config, params in largest.items():
        print(f"{config:14s} largest {params / 1e6:8.1f}M" + (f" ({params / ddp:.2f}x DDP)" if ddp else ""))


if __name__ == "__main__":
    main()
