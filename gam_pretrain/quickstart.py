"""The quickstart: GAM, Transformer (SDPA) and Mamba (standard stack) trained side by side on the
embedded corpus for the same token budget, then a Table-1-style comparison."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np

from .config import RunConfig
from .eval.generate import generate
from .train.loop import train

QUICKSTART_MODELS = [
    ("GAM", {"arch": "gam"}),
    ("Transformer (sdpa)", {"arch": "transformer", "attention": "sdpa"}),
    ("Mamba (standard)", {"arch": "mamba", "stack": "standard"}),
]
PROMPT = "ROMEO.\n"


def split_targets(shard_set, split: str) -> np.ndarray:
    """Every target token of a split (sample positions 1..block), as the loss sees them."""
    return np.concatenate([shard_set.read(shard)[:, 1:].ravel() for shard in shard_set.shards(split)])


def unigram_perplexity(train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int) -> float:
    """Perplexity of the validation tokens under add-one-smoothed train unigram frequencies."""
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(math.exp(-log_probs[val_tokens].mean()))


def markdown_table(rows: list[dict], unigram_ppl: float) -> str:
    lines = ["| model | params | train s | tokens/s | MFU | val loss | val PPL |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['train_seconds']:.0f} | {r['tokens_per_s']:,.0f} "
                     f"| {r['mfu']:.2f} | {r['val_loss']:.3f} | {r['val_ppl']:.1f} |")
    lines.append(f"| unigram reference | - | - | - | - | {math.log(unigram_ppl):.3f} | {unigram_ppl:.1f} |")
    return "\n".join(lines)


def plot_losses(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        curve = np.asarray(r["loss_curve"])
        window = 10
        smooth = np.convolve(curve, np.ones(window) / window, mode="valid") if len(curve) > window else curve
        ax.plot(np.arange(len(smooth)) + (len(curve) - len(smooth)) + 1, smooth, label=r["model"])
        ax.scatter([len(curve)], [r["val_loss"]], marker="x")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (10-step mean); x = final val loss")
    ax.set_title("gam-pretrain quickstart: embedded Shakespeare corpus")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_quickstart(base: RunConfig, log=print) -> dict:
    out_dir = Path(base.train.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, samples = [], {}
    data = None
    for label, model_overrides in QUICKSTART_MODELS:
        cfg = copy.deepcopy(base)
        for key, value in model_overrides.items():
            setattr(cfg.model, key, value)
        cfg.train.run_name = cfg.model.arch
        log(f"\n=== {label} ===")
        run = train(cfg, log=log)
        data = run.data
        tokenizer = data.tokenizer()
        ids = generate(run.model, tokenizer.encode(PROMPT).ids, max_new_tokens=60, block_size=cfg.model.block_size,
                       seed=cfg.train.seed, device=next(run.model.parameters()).device)
        samples[label] = PROMPT + tokenizer.decode(ids)
        results.append({"model": label, "run_dir": str(run.run_dir), **run.summary})
    unigram_ppl = unigram_perplexity(split_targets(data, "train"), split_targets(data, "validation"), data.vocab_size)
    table = markdown_table(results, unigram_ppl)
    plot_losses(results, out_dir / "loss_curves.png")
    report = {"results": results, "unigram_val_ppl": unigram_ppl, "samples": samples,
              "tokens_per_model": results[0]["tokens"]}
    (out_dir / "results.json").write_text(json.dumps(report, indent=2))
    (out_dir / "results.md").write_text(
        f"# Quickstart results\n\nEach model saw {results[0]['tokens']:,} training tokens.\n\n{table}\n\n"
        + "\n".join(f"## {k}\n\n```\n{v}\n```\n" for k, v in samples.items())
    )
    log(f"\nEach model saw {results[0]['tokens']:,} training tokens of the embedded Shakespeare corpus.\n")
    log(table)
    for label, text in samples.items():
        log(f"\n--- sample: {label} ---\n{text}")
    log(f"\nwrote {out_dir / 'results.md'}, {out_dir / 'results.json'}, {out_dir / 'loss_curves.png'}")
    return report
