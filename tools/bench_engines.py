"""Per-rank model-state memory and step time of every engine at world size 2 (CPU, gloo).

    python tools/bench_engines.py --out results/bench_engines_cpu.json

Launches itself under torchrun with 2 processes. For DDP, ZeRO-0/1/2/3 and FSDP2 it builds the
same GAM, runs warm-up steps, then times training steps (forward, backward, clip, AdamW) on
synthetic tokens, engines interleaved step by step; and it counts, on each rank, the bytes of
parameters + optimizer state that rank holds (unique storages: DDP and ZeRO-0 hold everything,
ZeRO-1/2 shard the optimizer state, ZeRO-3 and FSDP2 shard parameters too).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

ENGINES = {
    "ddp": ["engine.kind=ddp"],
    "zero0": ["engine.kind=deepspeed", "engine.zero_stage=0"],
    "zero1": ["engine.kind=deepspeed", "engine.zero_stage=1"],
    "zero2": ["engine.kind=deepspeed", "engine.zero_stage=2"],
    "zero3": ["engine.kind=deepspeed", "engine.zero_stage=3"],
    "fsdp2": ["engine.kind=fsdp2"],
}


def worker(args) -> None:
    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist

    from gam_pretrain.config import load_config
    from gam_pretrain.models import build_model
    from gam_pretrain.train.distributed import init_distributed
    from gam_pretrain.train.engines import build_engine, model_state_bytes

    torch.set_num_threads(1)
    info = init_distributed("cpu")
    model_args = [f"model.d_model={args.width}", f"model.n_layers={args.layers}", f"model.vocab_size={args.vocab}",
                  f"model.block_size={args.seq}", f"model.memory_slots={args.width}", "model.dropout=0.0",
                  f"train.batch_size={args.batch}", "optim.warmup_steps=0", "optim.schedule=constant"]
    engines = {}
    for name, overrides in ENGINES.items():
        cfg = load_config(None, model_args + overrides)
        torch.manual_seed(0)
        engines[name] = build_engine(cfg, build_model(cfg.model), torch.device("cpu"), info)
    gen = torch.Generator().manual_seed(info.rank)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step(engine):
        engine.train_step([(x, y)], step=0, total_steps=1)

    for engine in engines.values():
        for _ in range(2):
            step(engine)
    times = {name: [] for name in engines}
    names = list(engines)
    for r in range(args.steps):
        for name in names if r % 2 == 0 else names[::-1]:
            dist.barrier()
            t0 = time.perf_counter()
            step(engines[name])
            dist.barrier()
            times[name].append(time.perf_counter() - t0)
    state_bytes = {}
    for name, engine in engines.items():
        mine = torch.tensor([float(model_state_bytes(engine))])
        everyone = [torch.zeros(1) for _ in range(info.world_size)]
        dist.all_gather(everyone, mine)
        state_bytes[name] = [int(t) for t in everyone]
    if info.is_main:
        n_params = build_model(load_config(None, model_args).model).num_parameters()
        ddp_time = statistics.median(times["ddp"])
        result = {name: {"median_step_s": statistics.median(times[name]), "step_times_s": times[name],
                         "step_time_vs_ddp": statistics.median(times[name]) / ddp_time,
                         "model_state_bytes_per_rank": state_bytes[name],
                         "model_state_vs_ddp": max(state_bytes[name]) / max(state_bytes["ddp"])}
                  for name in engines}
        Path(args.worker_out).write_text(json.dumps({"params": n_params, "engines": result}))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default="results/bench_engines.json")
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_out:
        return worker(args)
    tmp = Path(args.out).with_suffix(".worker.json")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           __file__, *sys.argv[1:], "--worker-out", str(tmp)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    inner = json.loads(tmp.read_text())
    tmp.unlink()
    report = {"benchmark": "bench_engines", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.processor() or platform.machine(), "world_size": 2, "backend": "gloo",
              "threads_per_rank": 1, "precision": "fp32", "config": vars(args) | {"worker_out": None}, **inner}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"GAM {inner['params']:,} parameters, world 2, CPU")
    for name, r in inner["engines"].items():
        print(f"{name:6s} step {r['median_step_s'] * 1000:7.1f} ms ({r['step_time_vs_ddp']:.2f}x DDP)   "
              f"model state/rank {max(r['model_state_bytes_per_rank']) / 2**20:7.1f} MiB ({r['model_state_vs_ddp']:.2f}x DDP)")


if __name__ == "__main__":
    main()
