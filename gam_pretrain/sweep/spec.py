"""Sweep specs (YAML) and their expansion into runs with content-addressed run directories.

    name: tiny-cpu
    base: ../quickstart.yaml        # optional run config the `run:` section is applied over
    run: {data: {...}, train: {batch_size: 8}, ...}   # any run-config keys (all sections)
    families: [gam, transformer, mamba]
    widths: [16, 24, 32]            # ladder rungs (gam_pretrain/sweep/ladder.py)
    tokens: [20000, 40000]          # token budgets ... or
    flops: [1.0e11, 3.0e11]         # isoFLOP budgets: each rung trains C / (FLOPs per token) tokens
    lr: {rule: scaled, value: 3.0e-3, base_width: 64}   # constant | scaled (value * base_width / width) | grid
    seeds: [1337]
    cooldowns: false                # true: wsd; per family, width, lr and seed one run at the largest budget,
                                    # every smaller budget a cooldown branch of it (see SweepSpec.cooldowns)
    out_dir: runs/sweeps/tiny-cpu

A run's directory name ends in a hash of everything that shapes its result (model, data, optimizer,
schedule, steps, seed, engine), so running a spec again finds its finished runs (skipped) and
interrupted ones (resumed from their checkpoints), and a changed spec gets new directories.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config import (ConfigError, RunConfig, apply_dict, check_plain_text, read_yaml_mapping, to_dict, validate,
                      without_later_defaults)
from ..train.checkpoint import checkpoint_dir
from ..train.schedule import decay_start
from .ladder import FAMILIES, Rung, measure, rung_config


@dataclass
class LrRule:
    rule: Literal["constant", "scaled", "grid"] = "scaled"  # how each run's lr is chosen
    value: float = 3e-4  # constant: the lr; scaled: the lr at base_width
    base_width: int = 512  # scaled: lr = value * base_width / width
    grid: list[float] = field(default_factory=list)  # grid: every run at every lr (the best per point is fitted)


@dataclass
class SweepSpec:
    name: str = "sweep"  # names the output folder and the job array
    base: str = ""  # a run config YAML (relative to the spec file) under the `run` section
    run: RunConfig = field(default_factory=RunConfig)
    families: list[str] = field(default_factory=lambda: list(FAMILIES))  # model families (ladder.py)
    widths: list[int] = field(default_factory=lambda: [64, 128, 256])  # ladder rungs by width
    tokens: list[float] = field(default_factory=list)  # token budgets per run (or flops, not both)
    flops: list[float] = field(default_factory=list)  # isoFLOP budgets: each rung trains C / (FLOPs per token) tokens
    lr: LrRule = field(default_factory=LrRule)
    seeds: list[int] = field(default_factory=lambda: [1337])  # every point once per seed
    out_dir: str = ""  # default: runs/sweeps/<name>
    checkpoints_per_run: int = 4  # a checkpoint every 1/k of a run's steps (for resuming)
    warmup_fraction: float = 0.1  # warm-up = min(run.optim.warmup_steps, this fraction of the run)
    cooldowns: bool = False  # every run wsd (run.optim.decay_fraction); per family, width, lr and seed the largest budget trains whole and keeps a checkpoint where each smaller budget's decay starts, and each smaller budget is a cooldown branch from there (train.cooldown_from): its stable phase is not trained again


@dataclass
class SweepRun:
    index: int
    family: str
    width: int
    budget_kind: str  # tokens | flops
    budget: float
    lr: float
    seed: int
    rung: Rung
    config: RunConfig
    run_id: str
    branch_of: int | None = None  # cooldowns: the index of the run this one branches from (it trains after it)
    branch_step: int = 0  # cooldowns: the step it branches at

    @property
    def run_dir(self) -> Path:
        return Path(self.config.train.out_dir) / self.config.train.run_name

    def describe(self) -> dict:
        return {"index": self.index, "family": self.family, "width": self.width, "budget_kind": self.budget_kind,
                "budget": self.budget, "lr": self.lr, "seed": self.seed, "run_id": self.run_id,
                "params": self.rung.params, "non_embedding_params": self.rung.non_embedding_params,
                "flops_per_token": self.rung.flops_per_token, "steps": self.config.train.max_steps,
                "tokens": self.config.train.max_steps * self.config.tokens_per_step(),
                # the steps this run trains itself: a cooldown branch starts where its stable run's decay would
                "trained_steps": self.config.train.max_steps - self.branch_step,
                **({"branch_of": self.branch_of, "branch_step": self.branch_step} if self.branch_of is not None else {})}


def load_spec(path: str | Path) -> SweepSpec:
    path = Path(path)
    data = read_yaml_mapping(path, "sweep spec")
    spec = SweepSpec()
    base = data.pop("base", "")
    if base:
        base_path = path.parent / base  # an absolute base stays absolute
        apply_dict(spec.run, read_yaml_mapping(base_path, f"{path}: base config"), source=str(base_path))
        spec.base = str(base_path)
    apply_dict(spec, data, source=str(path))
    if not spec.out_dir:
        spec.out_dir = str(Path("runs") / "sweeps" / spec.name)
    return check_spec(spec)


def check_spec(spec: SweepSpec) -> SweepSpec:
    check_plain_text(spec)  # name and out_dir become folders and job names in sbatch scripts
    unknown = [f for f in spec.families if f not in FAMILIES]
    if unknown:
        raise ConfigError(f"unknown families {unknown}; valid: {', '.join(FAMILIES)}")
    if bool(spec.tokens) == bool(spec.flops):
        raise ConfigError("a sweep sets exactly one of 'tokens' (token budgets) or 'flops' (isoFLOP budgets)")
    if any(b <= 0 for b in spec.tokens + spec.flops):
        raise ConfigError("budgets must be positive")
    if not spec.widths or not spec.families or not spec.seeds:
        raise ConfigError("a sweep needs at least one family, width and seed")
    if spec.lr.rule == "grid" and not spec.lr.grid:
        raise ConfigError("lr.rule 'grid' needs lr.grid: [values]")
    for family in spec.families:
        for w in spec.widths:
            try:
                rung_config(family, w)
            except ValueError as e:
                raise ConfigError(f"widths: {e}") from None
    validate(spec.run)
    return spec


def learning_rates(spec: SweepSpec, width: int) -> list[float]:
    if spec.lr.rule == "grid":
        return list(spec.lr.grid)
    if spec.lr.rule == "scaled":
        return [spec.lr.value * spec.lr.base_width / width]
    return [spec.lr.value]


def content_hash(cfg: RunConfig, extra: dict | None = None) -> str:
    """Everything that shapes the result; not where it is written, how it is logged or launched (and
    `extra`: what else the run must hold, such as a stable run's branch checkpoints)."""
    key = without_later_defaults(to_dict(cfg))  # sweeps expanded before a setting existed keep their names
    key.update(extra or {})
    for section, names in {"train": ("out_dir", "run_name", "progress", "log_interval", "peak_flops", "device", "accel"),
                           "data": ("cache_dir", "prep_if_missing", "prep_workers", "num_workers", "log_sample_ids")}.items():
        for name in names:
            key[section].pop(name, None)
    for section in ("launch", "logging", "checkpoint"):
        key.pop(section, None)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def _label(kind: str, budget: float) -> str:
    exponent = int(math.floor(math.log10(budget)))
    return f"{'T' if kind == 'tokens' else 'C'}{budget / 10 ** exponent:.3g}e{exponent}"


def expand(spec: SweepSpec) -> list[SweepRun]:
    kind, budgets = ("tokens", spec.tokens) if spec.tokens else ("flops", spec.flops)
    runs: list[SweepRun] = []
    for family in spec.families:
        for width in spec.widths:
            rung = measure(family, rung_config(family, width, spec.run.model))
            for budget in budgets:
                tokens = budget if kind == "tokens" else budget / rung.flops_per_token
                for lr in learning_rates(spec, width):
                    for seed in spec.seeds:
                        cfg = copy.deepcopy(spec.run)
                        cfg.model = rung.config
                        steps = max(1, round(tokens / cfg.tokens_per_step()))
                        cfg.train = dataclasses.replace(cfg.train, max_steps=steps, seed=seed, progress=False,
                                                        out_dir=str(Path(spec.out_dir) / "runs"))
                        warmup = min(cfg.optim.warmup_steps, max(1, int(spec.warmup_fraction * steps)))
                        cfg.optim = dataclasses.replace(cfg.optim, lr=lr, warmup_steps=warmup)
                        cfg.checkpoint = dataclasses.replace(
                            cfg.checkpoint, interval_steps=max(1, steps // max(spec.checkpoints_per_run, 1)),
                            resume="auto")
                        runs.append(SweepRun(len(runs), family, width, kind, budget, lr, seed, rung, cfg, ""))
    branches = cooldown_branches(runs) if spec.cooldowns else {}
    for run in sorted(runs, key=lambda r: r.index in branches):  # a branch names the run it branches from
        hashed = run.config
        if run.index in branches:
            stable, run.branch_step = branches[run.index]
            run.branch_of = stable.index
            run.config.train.cooldown_from = str(checkpoint_dir(stable.run_dir, run.branch_step))
            hashed = copy.deepcopy(run.config)  # the branch point by content, not by where the sweep is written
            hashed.train.cooldown_from = f"{stable.run_id}/{run.branch_step}"
        # a stable run holds the checkpoints its branches start from: another set of branches, another run
        branch_steps = run.config.checkpoint.keep_steps
        run.run_id = content_hash(hashed, {"cooldown_branch_steps": branch_steps} if branch_steps else None)
        run.config.train.run_name = (f"{run.family}-d{run.width}-{_label(kind, run.budget)}-lr{run.lr:.3g}-s{run.seed}-"
                                     f"{run.run_id}")
    return runs


def cooldown_branches(runs: list[SweepRun]) -> dict[int, tuple[SweepRun, int]]:
    """cooldowns: makes every run wsd, and returns {index of a branch: (the run it branches from, the
    step it branches at)}. In each (family, width, lr, seed) the run of the most steps trains whole and
    keeps a checkpoint at each branch step; every other run branches where its own decay starts. All of
    a group warm up as its shortest run does, so that every branch starts in the stable phase."""
    groups: dict[tuple, list[SweepRun]] = {}
    for run in runs:
        groups.setdefault((run.family, run.width, run.lr, run.seed), []).append(run)
    branches = {}
    for group in groups.values():
        warmup = min(r.config.optim.warmup_steps for r in group)
        for run in group:
            run.config.optim = dataclasses.replace(run.config.optim, schedule="wsd", warmup_steps=warmup)
        stable = max(group, key=lambda r: r.config.train.max_steps)
        keep = set()
        for run in group:
            steps = run.config.train.max_steps
            if steps == stable.config.train.max_steps:
                continue  # the stable run itself, or a budget that rounds to its length: trained whole
            step = decay_start(steps, run.config.optim)
            if step <= warmup:
                raise ConfigError(f"cooldowns: the {run.budget_kind} budget {run.budget:g} of {run.family} width "
                                  f"{run.width} is {steps} steps, too short to branch after the {warmup}-step warm-up; "
                                  "drop it or raise the budgets")
            branches[run.index] = (stable, step)
            keep.add(step)
        stable.config.checkpoint = dataclasses.replace(stable.config.checkpoint, keep_steps=sorted(keep))
    return branches
