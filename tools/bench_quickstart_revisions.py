"""The quickstart's tokens/s at two git revisions, side by side in one run.

    python tools/bench_quickstart_revisions.py af023af HEAD --rounds 2 --steps 80 \
        --out results/bench_quickstart_revisions_cpu.json
    python tools/bench_quickstart_revisions.py af023af HEAD --steps 12 --out results/...paper.json \
        --set model.vocab_size=10000 model.block_size=256 model.d_model=512 model.n_layers=6 ...

Each revision is checked out into a temporary worktree and runs `python -m gam_pretrain quickstart`
with its own configs/quickstart.yaml, a shortened `train.max_steps`, no intermediate evals and any
`--set` overrides (keys both revisions know), in a
fresh process (its own prepped data, shared across its rounds). Rounds alternate the order of the
revisions (A B, B A, ...), so a machine that slows down during the run charges both alike. Per model:
the median tokens/s over rounds of each revision, and the ratio B / A. Losses are reported too: they
show whether the two revisions trained the same function (they differ where dropout masks do).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


def run_quickstart(tree: Path, work: Path, steps: int, round_index: int, overrides: list[str]) -> list[dict]:
    out = work / f"runs-{round_index}"
    command = [sys.executable, "-m", "gam_pretrain", "quickstart", "--config", str(tree / "configs" / "quickstart.yaml"),
               f"train.max_steps={steps}", "train.eval_interval=0", "train.progress=false", "logging.wandb=disabled",
               f"train.out_dir={out}", f"data.cache_dir={work / 'data'}", *overrides]
    env = {**os.environ, "PYTHONPATH": str(tree), "WANDB_MODE": "disabled"}
    subprocess.run(command, cwd=work, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    results = json.loads((out / "results.json").read_text())["results"]
    return [{k: r[k] for k in ("model", "tokens_per_s", "final_train_loss", "val_loss")} for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev_a")
    parser.add_argument("rev_b")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--out", default="results/bench_quickstart_revisions.json")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for both")
    args = parser.parse_args()
    revisions = {"a": git("rev-parse", "--short", args.rev_a), "b": git("rev-parse", "--short", args.rev_b)}
    scratch = Path(tempfile.mkdtemp(prefix="bench-quickstart-"))
    runs: dict[str, list[list[dict]]] = {"a": [], "b": []}
    try:
        trees = {}
        for key, rev in revisions.items():
            trees[key] = scratch / f"tree-{key}"
            git("worktree", "add", "--detach", str(trees[key]), rev)
            (scratch / f"work-{key}").mkdir()
        for r in range(args.rounds):
            for key in ("a", "b") if r % 2 == 0 else ("b", "a"):
                runs[key].append(run_quickstart(trees[key], scratch / f"work-{key}", args.steps, r, args.set))
                print(f"round {r} {revisions[key]}: " + ", ".join(f"{x['model']} {x['tokens_per_s']:,.0f} tok/s"
                                                               for x in runs[key][-1]), flush=True)
    finally:
        for key in ("a", "b"):
            subprocess.run(["git", "worktree", "remove", "--force", str(scratch / f"tree-{key}")], cwd=REPO,
                           capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)
    models = [row["model"] for row in runs["a"][0]]
    table = []
    for i, model in enumerate(models):
        a = statistics.median(rnd[i]["tokens_per_s"] for rnd in runs["a"])
        b = statistics.median(rnd[i]["tokens_per_s"] for rnd in runs["b"])
        table.append({"model": model, f"tokens_per_s_{revisions['a']}": a, f"tokens_per_s_{revisions['b']}": b,
                      "ratio_b_over_a": b / a, "val_loss_a": runs["a"][0][i]["val_loss"],
                      "val_loss_b": runs["b"][0][i]["val_loss"]})
    report = {"benchmark": "bench_quickstart_revisions", "command": " ".join(["python", *sys.argv]),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "revisions": revisions,
              "steps": args.steps, "rounds": args.rounds, "overrides": args.set, "models": table, "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
