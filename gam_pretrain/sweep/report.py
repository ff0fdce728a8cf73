"""`gam-pretrain fit`: collect a sweep's finished runs, fit each family's law, compare families,
write fit.json and three PNG plots."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..files import read_json, write_atomic
from ..train.summary import SUMMARY, read_summary
from .fit import FitError, compute_optimal, fit_law, flops_model, isoflop_minimum
from .runner import RUN_RECORD


def collect(sweep_dir: str | Path, params: str = "non_embedding") -> list[dict]:
    """One point per (family, width, budget): the best learning rate, then the mean over seeds (and
    the seeds' spread: sample standard deviation, min, max)."""
    runs = []
    for record in sorted(Path(sweep_dir).glob(f"runs/*/{RUN_RECORD}")):
        summary_file = record.parent / SUMMARY
        if not summary_file.is_file():
            continue
        run = read_json(record)
        summary = read_summary(summary_file)
        if not math.isfinite(summary.get("val_loss", float("nan"))):
            continue
        run["val_loss"] = summary["val_loss"]
        run["tokens"] = summary["tokens"]
        runs.append(run)
    best: dict[tuple, float] = {}
    for r in runs:  # best lr per (family, width, budget, seed)
        key = (r["family"], r["width"], r["budget_kind"], r["budget"], r["seed"])
        best[key] = min(best.get(key, float("inf")), r["val_loss"])
    by_point: dict[tuple, list[float]] = defaultdict(list)
    meta = {}
    for r in runs:
        key = (r["family"], r["width"], r["budget_kind"], r["budget"])
        if best[key + (r["seed"],)] == r["val_loss"]:
            by_point[key].append(r["val_loss"])
            meta[key] = r
    points = []
    for key, losses in sorted(by_point.items()):
        r = meta[key]
        n = r["non_embedding_params"] if params == "non_embedding" else r["params"]
        points.append({"family": r["family"], "width": r["width"], "budget_kind": r["budget_kind"], "budget": r["budget"],
                       "N": n, "D": r["tokens"], "C": r["flops_per_token"] * r["tokens"],
                       "flops_per_token": r["flops_per_token"], "loss": float(np.mean(losses)), "seeds": len(losses),
                       "loss_std": float(np.std(losses, ddof=1)) if len(losses) > 1 else 0.0,
                       "loss_min": float(min(losses)), "loss_max": float(max(losses))})
    return points


def compare_measured(points: list[dict]) -> list[dict]:
    """Per (budget, width) that more than one family ran: each family's measured loss, the lowest, and
    whether it is separated: its worst seed below every other family's best seed (a single seed
    separates nothing)."""
    groups: dict[tuple, dict] = defaultdict(dict)
    for p in points:
        groups[(p["budget_kind"], p["budget"], p["width"])][p["family"]] = p
    rows = []
    for (kind, budget, width), by_family in sorted(groups.items()):
        if len(by_family) < 2:
            continue
        best = min(by_family, key=lambda f: by_family[f]["loss"])
        separated = all(p["seeds"] > 1 and by_family[best]["loss_max"] < p["loss_min"]
                        for f, p in by_family.items() if f != best) and by_family[best]["seeds"] > 1
        rows.append({"budget_kind": kind, "budget": budget, "width": width, "best": best, "separated": separated,
                     "loss": {f: {k: p[k] for k in ("loss", "loss_std", "loss_min", "loss_max", "seeds")}
                              for f, p in by_family.items()}})
    return rows


def fit_sweep(points: list[dict], bootstrap: int = 100, extrapolate_decades: float = 2.0) -> dict:
    if not points:
        raise FitError("no finished runs to fit: run the sweep first (`gam-pretrain sweep SPEC`)")
    families = sorted({p["family"] for p in points})
    c_min, c_max = min(p["C"] for p in points), max(p["C"] for p in points)
    budgets = [float(c) for c in np.logspace(math.log10(c_min), math.log10(c_max) + extrapolate_decades, 7)]
    result = {"budgets": budgets, "families": {}, "params": "N", "comparison": [], "largest_run_C": c_max,
              "measured": compare_measured(points)}
    for family in families:
        pts = [p for p in points if p["family"] == family]
        N, D, L = (np.array([p[k] for p in pts], dtype=float) for k in ("N", "D", "loss"))
        entry: dict = {"points": pts}
        try:
            fitted = fit_law(N, D, L, bootstrap=bootstrap, what=family)
        except FitError as e:
            entry["error"] = str(e)
            result["families"][family] = entry
            continue
        sizes = sorted({(p["N"], p["flops_per_token"]) for p in pts})
        flops = flops_model([s[0] for s in sizes], [s[1] for s in sizes]) if len(sizes) >= 2 else (6.0, 1.0)
        optimal = []
        for c in budgets:
            best = compute_optimal(fitted["law"], c, flops)
            boot = [compute_optimal(law, c, flops) for law in fitted["bootstrap_laws"]]
            for key in ("N", "D", "loss"):
                values = [b[key] for b in boot]
                best[f"{key}_interval"] = [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if values else None
            best["C"] = c
            optimal.append(best)
        isoflop = []
        if all(p["budget_kind"] == "flops" for p in pts):
            for budget in sorted({p["budget"] for p in pts}):
                group = [p for p in pts if p["budget"] == budget]
                minimum = isoflop_minimum([p["N"] for p in group], [p["loss"] for p in group])
                isoflop.append({"C": budget, "minimum": minimum, "runs": len(group)})
        warnings = []
        law = fitted["law"]
        if not (0.0 < law.alpha < 3.0 and 0.0 < law.beta < 3.0):
            warnings.append(f"exponent outside (0, 3) (alpha {law.alpha:.3g}, beta {law.beta:.3g}): too few or too noisy "
                            "points for a law; add sizes, budgets or seeds")
        if law.E < 0.1 * float(L.min()):
            warnings.append(f"E = {law.E:.3g} is far below every loss seen: the irreducible term is not identified")
        outside = [k for k, (lo, hi) in fitted["intervals"].items() if not lo <= getattr(law, k) <= hi]
        if outside:
            warnings.append(f"fitted {', '.join(outside)} outside the bootstrap interval (percentile "
                            f"method, {len(fitted['bootstrap_laws'])} resamples): the resamples' fits disagree with the "
                            "full fit; the law is not stable (add points, or more --bootstrap)")
        entry["warnings"] = warnings
        entry.update({"law": fitted["law"].as_dict(), "intervals": fitted["intervals"], "flops_per_token_model":
                      {"c": flops[0], "gamma": flops[1]}, "rms_log_residual": fitted["rms_log_residual"],
                      "compute_optimal": optimal, "isoflop_minima": isoflop})
        result["families"][family] = entry
    fitted_families = [f for f, e in result["families"].items() if "law" in e]
    if not fitted_families:
        raise FitError("no family could be fitted:\n  " + "\n  ".join(e["error"] for e in result["families"].values()))
    for i, c in enumerate(budgets):
        losses = {f: result["families"][f]["compute_optimal"][i]["loss"] for f in fitted_families}
        result["comparison"].append({"C": c, "loss": losses, "best": min(losses, key=losses.get),
                                     "extrapolated": c > c_max * 1.0001})
    return result


def format_report(result: dict) -> str:
    lines = []
    for family, entry in result["families"].items():
        if "error" in entry:
            lines.append(f"{family}: {entry['error']}")
            continue
        law, iv = entry["law"], entry["intervals"]

        def show(k, fmt="{:.3g}"):
            interval = f" [{fmt.format(iv[k][0])}, {fmt.format(iv[k][1])}]" if iv else ""
            return f"{k}={fmt.format(law[k])}{interval}"

        lines.append(f"{family}: L = E + A/N^alpha + B/D^beta  {show('E')} {show('A')} {show('B')} "
                     f"{show('alpha')} {show('beta')}  (rms log residual {entry['rms_log_residual']:.4f}, "
                     f"{len(entry['points'])} points)")
        lines += [f"  warning: {w}" for w in entry["warnings"]]
        lines.append(f"  {'compute C':>10s} {'N*':>10s} {'95% interval':>23s} {'D*':>10s} {'95% interval':>23s} {'loss':>7s}"
                     "  (intervals: percentile bootstrap)")
        for o, row in zip(entry["compute_optimal"], result["comparison"]):
            ni = f"[{o['N_interval'][0]:.3g}, {o['N_interval'][1]:.3g}]" if o["N_interval"] else "-"
            di = f"[{o['D_interval'][0]:.3g}, {o['D_interval'][1]:.3g}]" if o["D_interval"] else "-"
            lines.append(f"  {o['C']:>10.3g} {o['N']:>10.3g} {ni:>23s} {o['D']:>10.3g} {di:>23s} {o['loss']:>7.3f}"
                         + ("  extrapolated" if row["extrapolated"] else ""))
        for iso in entry["isoflop_minima"]:
            m = iso["minimum"]
            where = "no minimum inside the sizes run" if not m else \
                f"N_opt {m['N']:.3g}, loss {m['loss']:.3f}{'' if m['inside_range'] else ' (outside the sizes run)'}"
            lines.append(f"  isoFLOP C={iso['C']:.3g}: {where}")
    if result.get("measured"):
        lines.append("measured: lowest validation loss per budget and width (mean over seeds [min, max]; "
                     "separated = its worst seed beats every other family's best)")
        for row in result["measured"]:
            losses = ", ".join(f"{f} {v['loss']:.3f}" + (f" [{v['loss_min']:.3f}, {v['loss_max']:.3f}]" if v["seeds"] > 1 else "")
                               for f, v in sorted(row["loss"].items(), key=lambda kv: kv[1]["loss"]))
            lines.append(f"  {row['budget_kind']} {row['budget']:<9.3g} width {row['width']:<5d} best: {row['best']:12s} "
                         f"{'separated' if row['separated'] else 'within the spread':17s} {losses}")
    lines.append("best family per compute budget (predicted loss at the compute-optimal size):")
    for row in result["comparison"]:
        losses = ", ".join(f"{f} {v:.3f}" for f, v in row["loss"].items())
        tag = "extrapolated" if row["extrapolated"] else "in range"
        lines.append(f"  C={row['C']:<9.3g} {tag:12s} best: {row['best']:12s} {losses}")
    return "\n".join(lines)


def write_outputs(result: dict, out_dir: str | Path) -> list[Path]:
    from .plots import plot_all

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "fit.json", json.dumps(result, indent=1))
    return [out_dir / "fit.json", *plot_all(result, out_dir)]
