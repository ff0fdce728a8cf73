"""Data pipeline throughput: prep with 1 vs 2 workers, and loader speed vs what training consumes.

    python tools/bench_data.py --out results/bench_data_cpu.json

- prep: the embedded corpus (5 MB of text, one work unit per play) tokenized and sharded at block
  256 with a fixed byte-level BPE (trained once, outside the timing), alternately with 1 and 2
  workers, `--rounds` times each; median tokens/s and the ratio.
- loader: ShardLoader batches of 8 x 256 tokens (num_workers 0 and 2) vs the training consumption
  rate of GAM at the paper setting (batch 8 x 256, full training step) on the same machine.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from gam_pretrain.accel import apply_accel
from gam_pretrain.config import RunConfig, TrainConfig
from gam_pretrain.data import PrepConfig, ShardLoader, ShardSet, SourceSpec, run_prep
from gam_pretrain.models import build_model
from gam_pretrain.train.engines import SingleEngine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--loader-batches", type=int, default=300)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--out", default="results/bench_data.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    quiet = dict(log=lambda *a: None, progress=False)
    try:
        base = PrepConfig(source=SourceSpec(kind="embedded"), tokenizer="bpe-bytelevel", vocab_size=10000,
                          block_size=256, documents_per_unit=1, samples_per_shard=1024)
        run_prep(base, work / "tok", workers=2, **quiet)  # trains the tokenizer once
        cfg = PrepConfig(**{**base.__dict__, "tokenizer": str(work / "tok" / "tokenizer.json")})
        prep: dict[int, list[float]] = {1: [], 2: []}
        for r in range(args.rounds):
            for workers in (1, 2) if r % 2 == 0 else (2, 1):
                out = work / f"prep-{workers}-{r}"
                t0 = time.perf_counter()
                manifest = run_prep(cfg, out, workers=workers, **quiet)
                seconds = time.perf_counter() - t0
                tokens = sum(s["tokens"] for s in manifest["splits"].values())
                prep[workers].append(tokens / seconds)
                if r:
                    shutil.rmtree(out)
        prep_result = {f"workers_{w}_tokens_per_s": statistics.median(v) for w, v in prep.items()}
        prep_result["samples_tokens_per_s"] = {str(w): v for w, v in prep.items()}
        prep_result["speedup_2_vs_1"] = prep_result["workers_2_tokens_per_s"] / prep_result["workers_1_tokens_per_s"]

        shards = ShardSet(work / "prep-1-0")
        loader_result = {}
        for num_workers in (0, 2):
            loader = ShardLoader(shards, "train", 8, seed=0, num_workers=num_workers)
            loader.next_step()
            t0 = time.perf_counter()
            for _ in range(args.loader_batches):
                loader.next_step()
            loader_result[f"num_workers_{num_workers}_tokens_per_s"] = (
                args.loader_batches * 8 * 256 / (time.perf_counter() - t0))

        cfg = RunConfig(train=TrainConfig(precision="fp32"))  # the paper's model, as the trainer runs it here
        cpu = torch.device("cpu")
        engine = SingleEngine(apply_accel(build_model(cfg.model), cfg.train.accel, cpu), cfg, cpu)
        loader = ShardLoader(shards, "train", 8, seed=0)
        engine.train_step(loader.next_step(), 0, 1)
        times = []
        for _ in range(args.train_steps):
            t0 = time.perf_counter()
            engine.train_step(loader.next_step(), 0, 1)
            times.append(time.perf_counter() - t0)
        consumption = 8 * 256 / statistics.median(times)
        loader_result["gam_paper_training_tokens_per_s"] = consumption
        best = max(v for k, v in loader_result.items() if k.startswith("num_workers"))
        loader_result["loader_vs_consumption"] = best / consumption
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"benchmark": "bench_data", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "prep": prep_result, "loader": loader_result}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
