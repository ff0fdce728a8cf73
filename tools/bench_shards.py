"""Shard bytes against token bytes: format 2 (rows of samples per tar member) beside format 1 (one
member per sample), on the embedded corpus's train split, for several block sizes.

    python tools/bench_shards.py --out results/bench_shards.json

Each block size is prepped once (format 2, as `gam-pretrain prep` writes it, with one tokenizer
trained first and given to every prep); format 1's bytes are those of the same samples written one
per member with the same tar writer. Overhead = (shard bytes - token bytes) / shard bytes.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from gam_pretrain.data import PrepConfig, ShardSet, SourceSpec, run_prep
from gam_pretrain.data.prep import npy_bytes, tar_bytes


def measure(data: ShardSet, split: str) -> dict:
    shards = data.shards(split)
    itemsize = np.dtype(data.manifest["dtype"]).itemsize
    token_bytes = sum(s["tokens"] for s in shards) * itemsize
    compact = sum((data.path / s["path"]).stat().st_size for s in shards)
    per_sample = sum(len(tar_bytes([(f"{split}-{i:07d}.input_ids.npy", npy_bytes(row))
                                    for i, row in enumerate(data.read(s))])) for s in shards)
    return {"samples": sum(s["samples"] for s in shards), "shards": len(shards), "token_bytes": token_bytes,
            "format2_bytes": compact, "format2_overhead": (compact - token_bytes) / compact,
            "format1_bytes": per_sample, "format1_overhead": (per_sample - token_bytes) / per_sample,
            "format1_over_format2": per_sample / compact}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[64, 128, 256, 512, 2048])
    parser.add_argument("--out", default="results/bench_shards.json")
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = dict(source=SourceSpec(kind="embedded"), tokenizer="bpe-bytelevel", vocab_size=8192,
                    splits=["train"], documents_per_unit=1000, samples_per_shard=2048)
        first = Path(tmp) / "tokenizer"
        run_prep(PrepConfig(**base, block_size=64), first, log=lambda *a: None, progress=False)
        base["tokenizer"] = str(first / "tokenizer.json")
        for block in args.blocks:
            out = Path(tmp) / f"block{block}"
            run_prep(PrepConfig(**base, block_size=block), out, log=lambda *a: None, progress=False)
            rows[block] = measure(ShardSet(out), "train")
            r = rows[block]
            print(f"block {block:5d}: {r['samples']:7,d} samples in {r['shards']} shards; overhead format 2 "
                  f"{100 * r['format2_overhead']:.2f}%, format 1 {100 * r['format1_overhead']:.1f}% "
                  f"({r['format1_over_format2']:.2f}x the bytes)")
    result = {"benchmark": "bench_shards", "command": "python " + " ".join(sys.argv),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
              "corpus": "embedded (train split), byte-level BPE with 8192 tokens (uint16)",
              "samples_per_shard": base["samples_per_shard"], "blocks": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
