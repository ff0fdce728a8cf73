"""How long a checkpoint stalls the step loop: synchronous saves against async ones, same state.

    python tools/bench_checkpoint.py --out results/bench_checkpoint_cpu.json

Launches itself under torchrun with 2 processes (gloo, CPU). For DDP, ZeRO-3 and FSDP2 it builds
GAM at width 768 x 16 layers (109M parameters), trains one step (so AdamW's state exists), then
saves the same state alternately with checkpoint.async_save off and on, into the same run folder
(the Checkpointer of gam_pretrain/train/checkpoint.py, as the training loop calls it). It records,
per save, how long `save()` blocked the caller and how long until the checkpoint was complete
(COMPLETE written and the folder renamed, every rank's files fsynced and hashed). Medians over
`--repeats` saves of each kind; the ratio is async blocking / sync blocking.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

ENGINES = {
    "ddp": ["engine.kind=ddp"],
    "zero3": ["engine.kind=deepspeed", "engine.zero_stage=3"],
    "fsdp2": ["engine.kind=fsdp2"],
}


def worker(args) -> None:
    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist

    from gam_pretrain.config import load_config
    from gam_pretrain.train.checkpoint import Checkpointer
    from gam_pretrain.train.distributed import init_distributed
    from gam_pretrain.train.engines import build_model_and_engine

    torch.set_num_threads(1)
    info = init_distributed("cpu")
    model_args = [f"model.d_model={args.width}", f"model.n_layers={args.layers}", f"model.vocab_size={args.vocab}",
                  f"model.block_size={args.seq}", "model.dropout=0.0", f"train.batch_size={2 * args.batch}",
                  "optim.warmup_steps=0", "optim.schedule=constant", "train.seed=0"]
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(info.rank))
    result = {}
    for name in args.engines:
        cfg = load_config(None, model_args + ENGINES[name])
        engine = build_model_and_engine(cfg, torch.device("cpu"), info)
        engine.train_step([(tokens[:, :-1], tokens[:, 1:])], step=0, total_steps=1)
        root = Path(args.dir) / name
        times = {"sync": {"blocked_s": [], "complete_s": []}, "async": {"blocked_s": [], "complete_s": []}}
        for r in range(2 * args.repeats):
            kind = "async" if r % 2 else "sync"
            saver = Checkpointer(root, engine, info, keep_last=1, async_save=kind == "async")
            dist.barrier()
            t0 = time.perf_counter()
            saver.save(r + 1, {"step": r + 1})
            blocked = time.perf_counter() - t0
            saver.close()
            dist.barrier()
            times[kind]["blocked_s"].append(blocked)
            times[kind]["complete_s"].append(time.perf_counter() - t0)
        blocked = [[None] * info.world_size for _ in range(2)]
        dist.all_gather_object(blocked[0], times["sync"]["blocked_s"])
        dist.all_gather_object(blocked[1], times["async"]["blocked_s"])
        files = sorted((p for p in (root / "checkpoints").rglob("*") if p.is_file()), key=lambda p: str(p))
        if info.is_main:
            sync_block = statistics.median(max(ranks) for ranks in zip(*blocked[0]))
            async_block = statistics.median(max(ranks) for ranks in zip(*blocked[1]))
            result[name] = {
                "checkpoint_bytes": sum(p.stat().st_size for p in files),
                "sync_blocked_median_s": sync_block,
                "async_blocked_median_s": async_block,
                "sync_complete_median_s": statistics.median(times["sync"]["complete_s"]),
                "async_complete_median_s": statistics.median(times["async"]["complete_s"]),
                "async_blocked_vs_sync": async_block / sync_block,
                "samples": times,
            }
        del engine, saver
        dist.barrier()
    if info.is_main:
        from gam_pretrain.models import build_model

        params = build_model(load_config(None, model_args).model, materialize=False).num_parameters()
        Path(args.worker_out).write_text(json.dumps({"params": params, "engines": result}))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=10000)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--dir", default="", help="where the checkpoints go (default: a temporary folder)")
    parser.add_argument("--out", default="results/bench_checkpoint.json")
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_out:
        return worker(args)
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench_checkpoint-"))
    tmp = Path(args.out).with_suffix(".worker.json")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           __file__, *sys.argv[1:], "--dir", str(work), "--worker-out", str(tmp)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    inner = json.loads(tmp.read_text())
    tmp.unlink()
    report = {"benchmark": "bench_checkpoint", "command": "python tools/bench_checkpoint.py " + " ".join(sys.argv[1:]),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "world_size": 2,
              "backend": "gloo", "config": vars(args) | {"worker_out": None, "dir": None}, **inner}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"GAM {inner['params']:,} parameters, world 2, CPU")
    for name, r in inner["engines"].items():
        print(f"{name:6s} {r['checkpoint_bytes'] / 2**30:5.2f} GiB  sync blocks {r['sync_blocked_median_s']:6.2f} s, "
              f"async blocks {r['async_blocked_median_s']:6.2f} s ({r['async_blocked_vs_sync']:.2f}x), complete after "
              f"{r['async_complete_median_s']:6.2f} s")


if __name__ == "__main__":
    main()
