"""Receptive field and associative recall of every family (gam_pretrain/eval/diagnostics.py).

    python tools/diagnostics.py --head-size 32 --out results/diagnostics_cpu.json      # ~10 min on 2 cores
    python tools/diagnostics.py --seq-lens 128,256 --families transformer,gam-assoc --steps 600 --seeds 3 \
        --out /tmp/recall_grid.json        # ~2 hours on one core (results/ holds it split in three files)
    python tools/diagnostics.py --smoke --out /tmp/diag.json                  # seconds

Files whose recall rows have no n_heads were made before --head-size, at head size 32: their
commands reproduce them with --head-size 32 added.

Writes JSON and a PNG (same name): (a) the measured receptive field against GAM's theory
1 + L(k-1) for several depths and kernels, plus each family's input-gradient profile; (b)
multi-query associative recall accuracy per family at several sequence lengths and key counts,
and for each (length, pairs) whether gam-assoc reached the Transformer's accuracy (issue 19).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

from gam_pretrain.eval.diagnostics import RecallTask, input_gradient_profile, receptive_field, train_recall
from gam_pretrain.models import ModelConfig, build_model
from gam_pretrain.sweep.ladder import HEAD_SIZE  # at RECALL_WIDTH: one head, one 64 x 64 memory

FAMILIES = {
    "gam": dict(arch="gam"),
    "gam-assoc": dict(arch="gam-assoc"),
    "transformer": dict(arch="transformer", attention="sdpa"),
    "mamba": dict(arch="mamba", stack="standard", expand=2),
}
RECALL_WIDTH = 64  # d_model of every recall model (2 layers)


def receptive_fields(seq_len: int, widths: int) -> dict:
    rows = []
    for layers in (1, 2, 4, 6):
        for kernel in (3, 5):
            for name, arch in FAMILIES.items():
                cfg = ModelConfig(vocab_size=64, block_size=seq_len, d_model=widths, n_layers=layers, conv_kernel=kernel,
                                  memory_slots=16, n_heads=2, d_state=4, dropout=0.0, **arch)
                torch.manual_seed(0)
                measured = receptive_field(build_model(cfg), seq_len)
                theory = min(1 + layers * (kernel - 1), seq_len) if name == "gam" else seq_len
                rows.append({"family": name, "layers": layers, "kernel": kernel, "measured": measured,
                             "theory": theory, "equal": measured == theory})
    profiles = {}
    for name, arch in FAMILIES.items():
        cfg = ModelConfig(vocab_size=64, block_size=seq_len, d_model=widths, n_layers=6, memory_slots=16, n_heads=2,
                          d_state=4, dropout=0.0, **arch)
        torch.manual_seed(0)
        profiles[name] = input_gradient_profile(build_model(cfg), seq_len, seq_len - 1).tolist()
    return {"seq_len": seq_len, "rows": rows, "profiles_6_layers_k3": profiles}


def recall(seq_lens: list[int], pairs: list[int], steps: int, width: int, layers: int, families: list[str],
           device: str = "cpu", seeds: int = 1, head_size: int = HEAD_SIZE, rows: list[dict] | None = None,
           after_each=lambda: None) -> list[dict]:
    """Appends a row per (length, pairs, family, seed) to `rows`, calling after_each() after every one.
    A seed sets the model's init and its batches; seed 0 alone is what one-seed runs measured. The
    headed families (Transformer, gam-assoc) get width / head_size heads."""
    rows = [] if rows is None else rows
    for seq_len in seq_lens:
        for n in pairs:
            task = RecallTask(seq_len=seq_len, pairs=n, vocab=128)
            for seed in range(seeds):
                for name in families:
                    arch = FAMILIES[name]
                    cfg = ModelConfig(vocab_size=task.vocab, block_size=seq_len, d_model=width, n_layers=layers,
                                      memory_slots=64, n_heads=max(1, width // head_size), d_state=16, dropout=0.0,
                                      **arch)
                    result = train_recall(cfg, task, steps=steps, seed=seed, device=device)
                    rows.append({"family": name, "seq_len": seq_len, "pairs": n, "seed": seed, "n_heads": cfg.n_heads,
                                 **result})
                    print(f"recall {name:12s} T={seq_len:4d} pairs={n:3d} seed {seed}: accuracy {result['accuracy']:.3f} "
                          f"(chance {result['chance']:.3f}) in {result['seconds']:.0f}s", flush=True)
                    after_each()
    return rows


def cell_accuracies(rows: list[dict]) -> dict[tuple[str, int, int], list[float]]:
    """(family, length, pairs) -> its accuracy at every seed run, in seed order."""
    out: dict[tuple[str, int, int], list[float]] = {}
    for r in sorted(rows, key=lambda r: r.get("seed", 0)):
        out.setdefault((r["family"], r["seq_len"], r["pairs"]), []).append(r["accuracy"])
    return out


def assoc_against_transformer(rows: list[dict]) -> list[dict]:
    """Per (length, pairs) where both ran at the same seeds: both mean accuracies over those seeds (same
    steps and width), each seed's, and whether gam-assoc's mean is at least the Transformer's."""
    acc = cell_accuracies(rows)
    out = []
    for (family, T, n), transformer in acc.items():
        assoc = acc.get(("gam-assoc", T, n), [])
        if family != "transformer" or len(assoc) != len(transformer):
            continue
        mean_assoc, mean_transformer = sum(assoc) / len(assoc), sum(transformer) / len(transformer)
        out.append({"seq_len": T, "pairs": n, "seeds": len(assoc), "gam_assoc": mean_assoc,
                    "transformer": mean_transformer, "gam_assoc_per_seed": assoc, "transformer_per_seed": transformer,
                    "at_least_transformer": mean_assoc >= mean_transformer})
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_p, ax_r) = plt.subplots(1, 2, figsize=(11, 4))
    rf = result["receptive_field"]
    T = rf["seq_len"]
    for name, profile in rf["profiles_6_layers_k3"].items():
        distance = list(range(T - 1, -1, -1))
        ax_p.plot(distance, [max(v, 1e-30) for v in profile], label=name)
    ax_p.axvline(12, color="grey", ls=":", lw=0.8)
    ax_p.text(12.5, 1e-20, "GAM theory: 1 + 6 x 2 = 13 tokens", fontsize=7)
    ax_p.set(yscale="log", xlabel="distance back from the output position", ylabel="|d logit / d input embedding|",
             title="input-gradient profile, 6 layers, kernel 3", ylim=(1e-30, None))
    ax_p.legend(fontsize=8)
    acc = cell_accuracies(result["recall"])
    for name in sorted({r["family"] for r in result["recall"]}, key=list(FAMILIES).index):
        cells = [(T, n, a) for (family, T, n), a in acc.items() if family == name]
        labels = [f"T{T}/{n}kv" for T, n, _ in cells]
        means = [sum(a) / len(a) for _, _, a in cells]
        spread = [[m - min(a) for m, (_, _, a) in zip(means, cells)], [max(a) - m for m, (_, _, a) in zip(means, cells)]]
        ax_r.errorbar(labels, means, yerr=spread, fmt="o-", capsize=3, label=name)
    if result["recall"]:
        ax_r.axhline(result["recall"][0]["chance"], color="grey", ls=":", lw=0.8, label="chance")
    ax_r.set(ylim=(0, 1.05), xlabel="sequence length / key-value pairs", ylabel="query accuracy (mean, min-max over seeds)",
             title="multi-query associative recall")
    ax_r.tick_params(axis="x", rotation=45, labelsize=7)
    ax_r.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and a few steps (CI)")
    parser.add_argument("--steps", type=int, default=600, help="training steps per recall model")
    parser.add_argument("--families", default=",".join(FAMILIES), help="recall: which families")
    parser.add_argument("--device", default="cpu", help="recall: cpu or cuda (the receptive field is measured on CPU)")
    parser.add_argument("--pairs", default="4,8,16", help="recall: key-value pair counts")
    parser.add_argument("--seq-lens", default="64,128", help="recall: sequence lengths")
    parser.add_argument("--seeds", type=int, default=1, help="recall: train every cell with seeds 0..N-1")
    parser.add_argument("--head-size", type=int, default=HEAD_SIZE,
                        help="recall: the Transformer's and gam-assoc's head size (the sweep ladder's; files made "
                             "before this option used 32)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: train every cell with at least one seed")
    if args.head_size < 1 or RECALL_WIDTH % args.head_size:
        parser.error(f"--head-size {args.head_size}: it must divide the recall models' width, {RECALL_WIDTH}")
    # the code that runs is the tree at the start (a long run outlives commits made meanwhile); -dirty: edited
    revision = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    torch.manual_seed(0)
    rf = receptive_fields(seq_len=24, widths=8) if args.smoke else receptive_fields(seq_len=64, widths=16)
    rec: list[dict] = []
    result = {
        "benchmark": "diagnostics", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git": revision,
        "command": "python tools/diagnostics.py" + (" --smoke" if args.smoke else
                                                     f" --steps {args.steps} --families {args.families} --device {args.device} --pairs {args.pairs}"
                                                     f" --seq-lens {args.seq_lens} --seeds {args.seeds} --head-size {args.head_size}"),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else
        f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
        "receptive_field": rf, "recall": rec,
        "gam_receptive_field_equals_theory": all(r["equal"] for r in rf["rows"] if r["family"] == "gam"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every recall cell: a run cut by a time limit keeps what it measured
        result["gam_assoc_against_transformer"] = assoc_against_transformer(rec)
        out.write_text(json.dumps(result, indent=1))

    if args.smoke:
        recall([16], [2], steps=5, width=16, layers=1, families=list(FAMILIES), rows=rec, after_each=save)
    else:
        recall([int(t) for t in args.seq_lens.split(",")], [int(p) for p in args.pairs.split(",")], steps=args.steps,
               width=RECALL_WIDTH, layers=2, families=args.families.split(","), device=args.device, seeds=args.seeds,
               head_size=args.head_size, rows=rec, after_each=save)
    save()
    plot(result, out.with_suffix(".png"))
    bad = [r for r in rf["rows"] if not r["equal"]]
    print(f"receptive field: {len(rf['rows']) - len(bad)}/{len(rf['rows'])} equal to theory"
          + (f"; differ: {bad}" if bad else ""))
    for row in result["gam_assoc_against_transformer"]:
        print(f"T={row['seq_len']} pairs={row['pairs']} ({row['seeds']} seeds): gam-assoc {row['gam_assoc']:.3f} vs transformer "
              f"{row['transformer']:.3f}" + ("" if row["at_least_transformer"] else "  (below the Transformer)"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
