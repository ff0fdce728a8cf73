"""Generation speed with each family's decoding state against recomputing the window per token.

    python tools/bench_generate.py --out results/bench_generate_cpu.json

Each model (the paper's Table 1 width: 512 wide, 6 layers, vocabulary 10k, block 256; randomly
initialised, which does not change the cost) generates --new tokens greedily after a --prompt-token
prompt, once with `generate(..., use_cache=True)` and once with `use_cache=False`, alternating, and
the median over --reps is reported as tokens/s, with the speedup and whether both gave the same
tokens. Mamba runs the plain sequential scan in both modes (what an export runs).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from gam_pretrain.eval.generate import generate
from gam_pretrain.models import ModelConfig, build_model

MODELS = {
    "gam": dict(arch="gam"),
    "transformer-sdpa": dict(arch="transformer", attention="sdpa"),
    "mamba-standard": dict(arch="mamba", stack="standard"),
    "mamba-paper": dict(arch="mamba", stack="paper"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new", type=int, default=240, help="new tokens (prompt + new = the block: no sliding)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default="results/bench_generate.json")
    args = parser.parse_args()
    report = {"benchmark": "bench_generate", "command": "python tools/bench_generate.py " + " ".join(sys.argv[1:]),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new, "reps": args.reps, "models": {}}
    prompt = torch.randint(0, 10000, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    for name in args.models:
        model = build_model(ModelConfig(**MODELS[name], dropout=0.0), seed=0).eval()
        times = {True: [], False: []}
        tokens = {}
        for _ in range(args.reps):
            for use_cache in (True, False):
                started = time.perf_counter()
                tokens[use_cache] = generate(model, prompt, args.new, model.cfg.block_size, temperature=0,
                                             use_cache=use_cache)
                times[use_cache].append(time.perf_counter() - started)
        cached, recompute = (args.new / statistics.median(times[c]) for c in (True, False))
        report["models"][name] = {"tokens_per_s_cached": cached, "tokens_per_s_recompute": recompute,
                                  "speedup": cached / recompute, "same_tokens": tokens[True] == tokens[False],
                                  "seconds_cached": times[True], "seconds_recompute": times[False]}
        print(f"{name:18s} cached {cached:8.1f} tok/s  recompute {recompute:8.1f} tok/s  {cached / recompute:5.1f}x"
              f"  same tokens: {tokens[True] == tokens[False]}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
