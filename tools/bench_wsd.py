"""One stable WSD run plus cooldown branches against one cosine run per token budget, at the tiny CPU scale.

    python tools/bench_wsd.py --out results/bench_wsd_cpu.json

Two sweeps over the same families, width, budgets and seeds (the tiny CPU sweep's settings:
configs/sweeps/tiny_cpu.yaml): `cooldowns: true` (every run wsd; per family and seed the largest
budget trains whole and the smaller ones branch from its checkpoints where their decay starts) and
the usual one cosine run per budget, every run with the same warm-up (--warmup). For each budget it reports the final validation loss over the
seeds (mean, standard deviation, range) of both, the difference of the means against the seeds'
spread, and the training FLOPs each sweep spent (steps it trained itself x tokens per step x FLOPs
per token). A wsd run of a budget is the same run whether trained whole or branched (tested:
tests/test_train.py), so the cooldown sweep's losses are also those of separate wsd runs.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

from gam_pretrain.sweep.runner import run_local
from gam_pretrain.sweep.spec import expand, load_spec
from gam_pretrain.train.summary import read_summary

REPO = Path(__file__).resolve().parent.parent


def sweep(work: Path, name: str, args, **fields) -> list[dict]:
    spec = yaml.safe_load((REPO / "configs" / "sweeps" / "tiny_cpu.yaml").read_text())
    spec.update(name=name, families=args.families, widths=[args.width], tokens=args.tokens, seeds=args.seeds,
                out_dir=str(work / name), **fields)
    spec["run"]["data"]["cache_dir"] = str(work / "data")
    # one warm-up for every run of both sweeps (a cooldown group warms up as its shortest run does)
    spec["run"]["optim"]["warmup_steps"] = args.warmup
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    loaded = load_spec(path)
    runs = expand(loaded)
    started = time.perf_counter()
    run_local(loaded, runs, parallel=args.parallel, log=lambda line: print(f"{name}: {line}", flush=True))
    seconds = time.perf_counter() - started
    out = []
    for run in runs:
        summary = read_summary(run.run_dir)
        record = run.describe()
        out.append({"family": run.family, "budget": run.budget, "seed": run.seed, "val_loss": summary["val_loss"],
                    "steps": record["steps"], "trained_steps": record["trained_steps"],
                    "flops": record["trained_steps"] * run.config.tokens_per_step() * record["flops_per_token"],
                    "branch_step": run.branch_step})
    print(f"{name}: {len(runs)} runs in {seconds:.0f} s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["gam", "transformer"])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--tokens", nargs="+", type=float, default=[30000, 60000, 90000, 120000])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1337, 1338, 1339])
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5, help="warm-up steps of every run (the shortest run's 10%%)")
    parser.add_argument("--out", default="results/bench_wsd.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_wsd-"))
    wsd = sweep(work, "wsd-cooldowns", args, cooldowns=True)
    cosine = sweep(work, "cosine-separate", args, cooldowns=False)
    table = []
    for family in args.families:
        for budget in args.tokens:
            row = {"family": family, "tokens": budget}
            for label, results in (("wsd", wsd), ("cosine", cosine)):
                losses = [r["val_loss"] for r in results if r["family"] == family and r["budget"] == budget]
                row[label] = {"mean": statistics.mean(losses), "std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
                              "min": min(losses), "max": max(losses), "losses": losses}
            row["difference"] = row["wsd"]["mean"] - row["cosine"]["mean"]
            spread = max(row["wsd"]["max"] - row["wsd"]["min"], row["cosine"]["max"] - row["cosine"]["min"])
            row["seed_range"] = spread
            row["within_seed_range"] = abs(row["difference"]) <= spread
            table.append(row)
            print(f"{family:12s} {budget:>8.0f} tokens  wsd {row['wsd']['mean']:.4f} +- {row['wsd']['std']:.4f}  "
                  f"cosine {row['cosine']['mean']:.4f} +- {row['cosine']['std']:.4f}  difference {row['difference']:+.4f}"
                  f"  seeds' range {spread:.4f}", flush=True)
    flops = {label: sum(r["flops"] for r in results) for label, results in (("wsd", wsd), ("cosine", cosine))}
    report = {"benchmark": "bench_wsd", "command": "python tools/bench_wsd.py " + " ".join(sys.argv[1:]),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.processor() or platform.machine(), "families": args.families, "width": args.width,
              "tokens": args.tokens, "seeds": args.seeds, "table": table, "training_flops": flops,
              "flops_ratio_wsd_over_cosine": flops["wsd"] / flops["cosine"],
              "runs": {"wsd": wsd, "cosine": cosine}}
    print(f"training FLOPs: wsd + cooldowns {flops['wsd']:.3g}, one cosine run per budget {flops['cosine']:.3g} "
          f"({flops['wsd'] / flops['cosine']:.2f}x)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
