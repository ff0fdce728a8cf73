"""Data prep throughput and memory against the ecosystem's baseline, on real English.

    python tools/bench_data.py --out results/bench_data_cpu.json        # + a .png beside it

The corpus: the reStructuredText sources of the Linux kernel's documentation as Debian ships them
(`apt-get install linux-doc-6.1`: /usr/share/doc/linux-doc-6.1/html/_sources/**/*.rst.txt, about
3,200 files and 24 MB), copied until the corpus reaches --corpus-mb (so the text repeats: said in
the JSON). Two shapes of the same bytes, one document per file:
- many: the files as they are (thousands of small files);
- few: the same text joined into files of 16 MB (fewer than 1,000 large files).

Each measured command runs in a fresh process and is timed whole (imports included):
- ours: `run_prep` (what `gam-pretrain prep` runs) with 1 and with 2 workers, block 256, the same
  trained tokenizer given as a file;
- baseline: `datasets.load_dataset("text", sample_by="document")` + `map(batched=True,
  num_proc=1)` that encodes with `tokenizers`' `encode_batch`, appends <eos> to each document and
  packs each batch into windows of 257 uint16 ids (the usual group_texts), the same tokenizer. Run
  as a user would (the tokenizers library's own threads on) and with TOKENIZERS_PARALLELISM=false
  (one thread, as each of our workers).
Rounds alternate the order; medians of tokens/s and of peak RSS (the largest of the process and
its worker processes, VmHWM). The memory curve: our prep (2 workers, shape few) at each of
--memory-mb, peak RSS per worker process.

--loader adds the earlier loader measurement (ShardLoader vs GAM's training consumption).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

SOURCES = "/usr/share/doc/linux-doc-6.1/html/_sources/**/*.rst.txt"
BLOCK = 256
LARGE_FILE = 16 << 20


# ---- children (each a fresh process) --------------------------------------------------------------
def peak_rss() -> dict:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"peak_rss_main": own, "peak_rss_workers": children, "peak_rss_per_process": max(own, children)}


def child_ours(args) -> dict:
    from gam_pretrain.data import PrepConfig, SourceSpec, run_prep

    spec = SourceSpec(kind="files", splits={"train": args.files})
    cfg = PrepConfig(source=spec, splits=["train"], tokenizer=args.tokenizer, block_size=BLOCK, samples_per_shard=2048)
    manifest = run_prep(cfg, args.work, workers=args.workers, log=lambda *a: None, progress=False)
    return {"tokens": manifest["splits"]["train"]["tokens"], "units": manifest["splits"]["train"]["units"]}


def child_baseline(args) -> dict:
    import datasets
    import numpy as np
    from tokenizers import Tokenizer

    from gam_pretrain.data.tokenizer import eos_id

    datasets.disable_progress_bars()
    tokenizer = Tokenizer.from_file(args.tokenizer)
    eos = eos_id(tokenizer)
    files = sorted(glob.glob(args.files, recursive=True))

    def pack(batch):
        ids = []
        for encoding in tokenizer.encode_batch(batch["text"], add_special_tokens=False):
            ids.extend(encoding.ids)
            ids.append(eos)
        tokens = np.asarray(ids, dtype=np.uint16)
        n = max(0, (len(tokens) - 1) // BLOCK)
        windows = np.lib.stride_tricks.sliding_window_view(tokens, BLOCK + 1)[::BLOCK][:n] if n else []
        return {"input_ids": list(windows)}

    ds = datasets.load_dataset("text", data_files={"train": files}, sample_by="document", split="train",
                               cache_dir=str(Path(args.work) / "hf-cache"))
    packed = ds.map(pack, batched=True, remove_columns=["text"], num_proc=1)
    return {"tokens": len(packed) * (BLOCK + 1)}


# ---- the parent ---------------------------------------------------------------------------------
def run_child(kind: str, files: str, tokenizer: Path, work: Path, workers: int = 1, env: dict | None = None) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cmd = [sys.executable, __file__, "--child", kind, "--files", files, "--tokenizer", str(tokenizer),
           "--work", str(work / "out"), "--workers", str(workers)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    shutil.rmtree(work, ignore_errors=True)
    return {**result, "seconds": seconds, "tokens_per_s": result["tokens"] / seconds}


def build_corpus(root: Path, megabytes: int, base: list[Path]) -> dict:
    """Shapes many and few of about `megabytes` of the base text (repeated as needed)."""
    target = megabytes * 1_000_000
    many, few = root / "many", root / "few"
    many.mkdir(parents=True)
    few.mkdir(parents=True)
    written, copy = 0, 0
    big, big_index, big_size = None, 0, 0
    while written < target:
        for path in base:
            data = path.read_bytes()
            out = many / f"copy{copy:03d}" / path.relative_to(Path(SOURCES.split("**")[0]))
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
            if big is None or big_size >= LARGE_FILE:
                if big:
                    big.close()
                big, big_size = open(few / f"part{big_index:04d}.txt", "wb"), 0
                big_index += 1
            big.write(data + b"\n\n")
            big_size += len(data) + 2
            written += len(data)
            if written >= target:
                break
        copy += 1
    big.close()
    return {"bytes": written, "repeats_of_the_base": round(written / sum(p.stat().st_size for p in base), 2),
            "files_many": sum(1 for _ in many.rglob("*.txt")), "files_few": big_index,
            "globs": {"many": str(many / "**" / "*.txt"), "few": str(few / "*.txt")}}


def train_tokenizer(work: Path, base_glob: str) -> Path:
    from gam_pretrain.data import PrepConfig, SourceSpec, run_prep

    cfg = PrepConfig(source=SourceSpec(kind="files", splits={"train": base_glob}), splits=["train"],
                     tokenizer="bpe-whitespace", vocab_size=10000, block_size=BLOCK)
    run_prep(cfg, work / "tokenizer", workers=2, log=lambda *a: None, progress=False)
    return work / "tokenizer" / "tokenizer.json"


def measure_loader(args, result: dict) -> None:
    import torch

    from gam_pretrain.accel import apply_accel
    from gam_pretrain.config import RunConfig, TrainConfig
    from gam_pretrain.data import PrepConfig, ShardLoader, ShardSet, SourceSpec, run_prep
    from gam_pretrain.models import build_model
    from gam_pretrain.train.engines import SingleEngine

    work = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    try:
        cfg = PrepConfig(source=SourceSpec(kind="embedded"), tokenizer="bpe-bytelevel", vocab_size=10000,
                         block_size=256, documents_per_unit=1, samples_per_shard=1024)
        run_prep(cfg, work / "data", workers=2, log=lambda *a: None, progress=False)
        shards = ShardSet(work / "data")
        loader_result = {}
        for num_workers in (0, 2):
            loader = ShardLoader(shards, "train", 8, seed=0, num_workers=num_workers)
            loader.next_step()
            t0 = time.perf_counter()
            for _ in range(300):
                loader.next_step()
            loader_result[f"num_workers_{num_workers}_tokens_per_s"] = 300 * 8 * 256 / (time.perf_counter() - t0)
        run = RunConfig(train=TrainConfig(precision="fp32"))
        cpu = torch.device("cpu")
        engine = SingleEngine(apply_accel(build_model(run.model), run.train.accel, cpu), run, cpu)
        loader = ShardLoader(shards, "train", 8, seed=0)
        engine.train_step(loader.next_step(), 0, 1)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            engine.train_step(loader.next_step(), 0, 1)
            times.append(time.perf_counter() - t0)
        consumption = 8 * 256 / statistics.median(times)
        loader_result["gam_paper_training_tokens_per_s"] = consumption
        best = max(v for k, v in loader_result.items() if k.startswith("num_workers"))
        loader_result["loader_vs_consumption"] = best / consumption
        result["loader"] = loader_result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def plot(result: dict, path: Path) -> None:
    """Throughput (when measured) and the memory curve: the largest worker and the main process."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = bool(result["throughput"]) + bool(result["memory"])
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    if result["throughput"]:
        left = axes[0][0]
        names = list(result["throughput"]["few"])
        for i, shape in enumerate(("many", "few")):
            values = [result["throughput"][shape][n]["tokens_per_s"] / 1e6 for n in names]
            left.bar([j + 0.4 * i for j in range(len(names))], values, width=0.4, label=f"{shape} files")
        left.set_xticks([j + 0.2 for j in range(len(names))], [n.replace("_", "\n") for n in names], fontsize=7)
        left.set_ylabel("million tokens / s")
        left.set_title(f"prep of {result['corpus']['bytes'] / 1e6:.0f} MB, 2 CPU cores")
        left.legend()
    if not result["memory"]:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        return
    right = axes[0][-1]
    sizes = sorted(result["memory"], key=float)
    for key, label in (("peak_rss_workers", "largest worker"), ("peak_rss_main", "main process")):
        if all(key in result["memory"][s] for s in sizes):
            right.plot([float(s) for s in sizes], [result["memory"][s][key] / 2**20 for s in sizes], "o-", label=label)
    right.set_xscale("log")
    right.set_ylim(bottom=0)
    right.set_xlabel("corpus MB")
    right.set_ylabel("peak RSS (MiB)")
    right.set_title("our prep, 2 workers, 16 MB files")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus-mb", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--memory-mb", type=int, nargs="*", default=[10, 100, 1000])
    parser.add_argument("--loader", action="store_true", help="also the loader vs training consumption")
    parser.add_argument("--memory-only", action="store_true", help="only the memory curve (no throughput rounds)")
    parser.add_argument("--replot", metavar="JSON", help="only draw the PNG of a JSON this tool wrote")
    parser.add_argument("--out", default="results/bench_data_cpu.json")
    parser.add_argument("--child", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--files", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.replot:
        return plot(json.loads(Path(args.replot).read_text()), Path(args.replot).with_suffix(".png"))
    if args.child:
        result = (child_ours if args.child == "ours" else child_baseline)(args)
        print(json.dumps({**result, **peak_rss()}))
        return
    base = sorted(Path(p) for p in glob.glob(SOURCES, recursive=True))
    if not base:
        raise SystemExit(f"no file matches {SOURCES}: install the corpus with `apt-get install linux-doc-6.1`")
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        tokenizer = train_tokenizer(work, SOURCES)
        corpus = build_corpus(work / "corpus", args.corpus_mb if not args.memory_only else 1, base)
        commands = {
            "ours_1_worker": dict(kind="ours", workers=1),
            "ours_2_workers": dict(kind="ours", workers=2),
            "baseline_num_proc_1": dict(kind="baseline"),
            "baseline_num_proc_1_one_thread": dict(kind="baseline", env={"TOKENIZERS_PARALLELISM": "false"}),
        }
        samples = {shape: {name: [] for name in commands} for shape in ("many", "few")}
        for r in range(0 if args.memory_only else args.rounds):
            for shape in ("many", "few"):
                for name in (list(commands) if r % 2 == 0 else list(reversed(commands))):
                    got = run_child(files=corpus["globs"][shape], tokenizer=tokenizer, work=work / "run", **commands[name])
                    samples[shape][name].append(got)
                    print(f"round {r} {shape:4s} {name:32s} {got['tokens_per_s']:12,.0f} tokens/s  "
                          f"peak {got['peak_rss_per_process'] / 2**20:6.0f} MiB  [{got['seconds']:.1f} s]", flush=True)
        throughput = {} if args.memory_only else {shape: {name: {key: statistics.median(s[key] for s in runs)
                                     for key in ("tokens_per_s", "seconds", "tokens", "peak_rss_per_process")}
                              | {"rounds": runs} for name, runs in by_name.items()}
                      for shape, by_name in samples.items()}
        ratios = {} if args.memory_only else {shape: {
            "ours_1_vs_baseline": t["ours_1_worker"]["tokens_per_s"] / t["baseline_num_proc_1"]["tokens_per_s"],
            "ours_1_vs_baseline_one_thread": (t["ours_1_worker"]["tokens_per_s"]
                                              / t["baseline_num_proc_1_one_thread"]["tokens_per_s"]),
            "ours_2_vs_ours_1": t["ours_2_workers"]["tokens_per_s"] / t["ours_1_worker"]["tokens_per_s"]}
            for shape, t in throughput.items()}
        shutil.rmtree(work / "corpus")
        memory = {}
        for megabytes in args.memory_mb:
            sized = build_corpus(work / f"memory-{megabytes}", megabytes, base)
            shutil.rmtree(work / f"memory-{megabytes}" / "many")
            got = run_child("ours", sized["globs"]["few"], tokenizer, work / "run", workers=2)
            memory[str(megabytes)] = {**got, "corpus": sized}
            print(f"memory {megabytes:5d} MB: peak {got['peak_rss_per_process'] / 2**20:.0f} MiB per process "
                  f"[{got['seconds']:.1f} s]", flush=True)
            shutil.rmtree(work / f"memory-{megabytes}")
        peaks = [m["peak_rss_per_process"] for m in memory.values()]
        worker_peaks = [m["peak_rss_workers"] for m in memory.values()]
        result = {"benchmark": "bench_data", "command": "python " + " ".join(sys.argv),
                  "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "machine": platform.machine(), "cpus": os.cpu_count(),
                  "corpus": {**{k: v for k, v in corpus.items() if k != "globs"}, "base": SOURCES,
                             "note": "the base text repeated to reach the size"},
                  "block_size": BLOCK, "tokenizer": "bpe-whitespace, 10,000 tokens, trained on the base once",
                  "throughput": throughput, "ratios": ratios, "memory": memory,
                  "memory_max_over_min": max(peaks) / min(peaks) if peaks else None,
                  "memory_workers_max_over_min": max(worker_peaks) / min(worker_peaks) if worker_peaks else None}
        if args.loader:
            measure_loader(args, result)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    print(json.dumps({key: result[key] for key in ("ratios", "memory_max_over_min", "memory_workers_max_over_min")}, indent=1))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
