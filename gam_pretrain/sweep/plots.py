"""The fit's three figures: loss vs compute with each family's fitted frontier, isoFLOP curves,
and compute-optimal N* and D* against compute (with bootstrap bands)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .fit import Law

COLORS = {"gam": "tab:blue", "transformer": "tab:orange", "mamba": "tab:green", "gam-assoc": "tab:red"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def shade_extrapolation(ax, result: dict) -> None:
    """Grey over the compute beyond the largest run: what the law says there is extrapolated."""
    beyond = [row["C"] for row in result["comparison"] if row["extrapolated"]]
    if beyond:
        ax.axvspan(result["largest_run_C"], max(beyond), color="grey", alpha=0.12, lw=0, label="extrapolated")


def plot_all(result: dict, out_dir: Path) -> list[Path]:
    plt = _plt()
    paths = []
    fitted = {f: e for f, e in result["families"].items() if "law" in e}

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family, entry in result["families"].items():
        pts = entry["points"]
        ax.scatter([p["C"] for p in pts], [p["loss"] for p in pts], s=18, alpha=0.7,
                   color=COLORS.get(family), label=f"{family} runs")
        if family in fitted:
            opt = entry["compute_optimal"]
            ax.plot([o["C"] for o in opt], [o["loss"] for o in opt], color=COLORS.get(family),
                    label=f"{family} fitted frontier")
    shade_extrapolation(ax, result)
    ax.set(xscale="log", yscale="log", xlabel="training compute C (FLOPs, architecture-aware)",
           ylabel="validation loss", title="Loss vs compute")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "loss_vs_compute.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, max(len(result["families"]), 1), figsize=(4.5 * max(len(result["families"]), 1), 4),
                             squeeze=False)
    for ax, (family, entry) in zip(axes[0], result["families"].items()):
        pts = entry["points"]
        groups = sorted({(p["budget_kind"], p["budget"]) for p in pts})
        cmap = plt.get_cmap("viridis")
        for i, (kind, budget) in enumerate(groups):
            group = sorted((p for p in pts if p["budget"] == budget), key=lambda p: p["N"])
            color = cmap(i / max(len(groups) - 1, 1))
            label = f"{'C' if kind == 'flops' else 'D'}={budget:.2g}"
            ax.plot([p["N"] for p in group], [p["loss"] for p in group], "o", color=color, label=label)
            if family in fitted:
                law = Law(**entry["law"])
                n = np.logspace(np.log10(group[0]["N"]) - 0.3, np.log10(group[-1]["N"]) + 0.3, 100)
                if kind == "flops":
                    c, gamma = entry["flops_per_token_model"]["c"], entry["flops_per_token_model"]["gamma"]
                    d = budget / (c * n ** gamma)
                else:
                    d = np.full_like(n, budget)
                ax.plot(n, law.loss(n, d), "-", color=color, lw=1)
        losses = [p["loss"] for p in pts]
        span = max(losses) - min(losses) or 0.1
        ax.set_ylim(min(losses) - 0.5 * span, max(losses) + 0.5 * span)  # a wild fit must not hide the points
        for iso in entry.get("isoflop_minima", []):
            if iso["minimum"]:
                ax.axvline(iso["minimum"]["N"], color="grey", lw=0.6, ls=":")
        ax.set(xscale="log", xlabel="parameters N", ylabel="validation loss",
               title=f"{family}: {'isoFLOP' if groups and groups[0][0] == 'flops' else 'fixed-token'} curves")
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "isoflop.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, (ax_n, ax_d) = plt.subplots(1, 2, figsize=(10, 4))
    for family, entry in fitted.items():
        opt = entry["compute_optimal"]
        c = [o["C"] for o in opt]
        for ax, key in ((ax_n, "N"), (ax_d, "D")):
            ax.plot(c, [o[key] for o in opt], color=COLORS.get(family), label=family)
            if opt[0][f"{key}_interval"]:
                ax.fill_between(c, [o[f"{key}_interval"][0] for o in opt], [o[f"{key}_interval"][1] for o in opt],
                                color=COLORS.get(family), alpha=0.2)
    for ax in (ax_n, ax_d):
        shade_extrapolation(ax, result)
    ax_n.set(xscale="log", yscale="log", xlabel="compute C", ylabel="compute-optimal N*", title="Fitted frontier: N*")
    ax_d.set(xscale="log", yscale="log", xlabel="compute C", ylabel="compute-optimal D* (tokens)",
             title="Fitted frontier: D*")
    ax_n.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "frontier.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
