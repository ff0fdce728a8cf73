"""Typed run configuration: dataclasses, YAML files and dotted overrides.

    cfg = load_config("configs/quickstart.yaml", ["--optim.lr", "1e-3", "train.max_steps=50"])

Every value has one home (a dataclass field below). An unknown key or a value of the wrong type
raises ConfigError naming the key and the valid choices; the CLI turns it into exit code 2.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .data.prep import PrepConfig
from .data.recipes import load_recipe, recipe_names
from .models import unread_fields
from .models.common import HEADED_ARCHS, ModelConfig


class ConfigError(ValueError):
    """A user-caused configuration error (bad key, bad type, bad value)."""


@dataclass
class DataConfig:
    dir: str = ""  # a prepared shard directory (`gam-pretrain prep`); empty: the recipe's prep in cache_dir
    recipe: str = "embedded"  # a recipe (gam_pretrain/data/recipes/) prepped with this run's block size and vocab
    tokenizer: str = ""  # recipe override: bpe-whitespace | bpe-bytelevel | bpe-paper | path/to/tokenizer.json
    tokenizer_splits: list[str] = field(default_factory=lambda: ["train"])  # splits the recipe's tokenizer is trained on; [all]: every split of the corpus (the paper's code)
    packing: Literal["separators", "paper"] = "separators"  # separators: <eos> between documents, windows overlap by one token; paper: no separators, non-overlapping chunks (see gam_pretrain/data/prep.py)
    cache_dir: str = "runs/data"  # where recipe preps live, one folder per prep config
    prep_if_missing: bool = False  # prep the recipe here when cache_dir lacks it; false: stop, naming the prep command
    prep_workers: int = 1  # worker processes for that prep
    num_workers: int = 0  # DataLoader workers per rank (the sample order does not depend on them)
    mixture: dict[str, float] = field(default_factory=dict)  # prepared folders or URLs -> weights: train on their weighted mixture (validation: the first); empty: data.dir or the recipe
    mixture_max_epochs: dict[str, float] = field(default_factory=dict)  # mixture source -> at most this many passes over its samples (a longer run is refused)
    log_sample_ids: bool = False  # append every step's sample ids to <run>/sample_ids/rank<r>.jsonl: an audit that each sample is trained on once per epoch, across resumes


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate (after warm-up)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW denominator epsilon
    weight_decay: float = 0.1  # AdamW's decoupled weight decay, on the parameters `decay` names
    decay: Literal["matrices", "all"] = "matrices"  # matrices: matrices and embeddings (never biases, norms or the SSM's A/D); all: every parameter, as the paper's AdamW(model.parameters())
    grad_clip: float = 1.0  # max global L2 norm; 0 disables
    warmup_steps: int = 100  # linear warm-up from lr / warmup_steps to lr
    warmup_from_zero: bool = False  # warm-up step s trains at lr * s / warmup_steps (step 0 at lr 0), as the paper's LambdaLR; false: lr * (s + 1) / warmup_steps
    schedule: Literal["cosine", "constant", "wsd"] = "cosine"  # after warm-up: cosine decay; constant lr; wsd: warm-up, stable (constant lr), then linear decay over the last decay_fraction of the steps
    min_lr_ratio: float = 0.0  # cosine and wsd decay to lr * min_lr_ratio
    decay_fraction: float = 0.2  # wsd: the fraction of the run's steps the final decay takes
    decay_start: int = 0  # wsd: the step the decay starts at (0: from decay_fraction); a cooldown branch (train.cooldown_from) sets it to the step it branches at


@dataclass
class TrainConfig:
    batch_size: int = 32  # GLOBAL batch: sequences per optimizer step over all ranks (it was per process in 0.1: see README "Global batch")
    grad_accum: int = 1  # micro-batches per optimizer step on each rank (used when micro_batch_size is 0)
    micro_batch_size: int = 0  # sequences per forward/backward on each rank; 0: batch_size / (world size x grad_accum). Set, it fixes memory and grad_accum follows from the world size
    epochs: float = 5.0  # used when max_steps is 0
    max_steps: int = 0  # optimizer steps of the whole run (0: from epochs); the schedule spans them
    stop_at_step: int = 0  # end this launch after that step with a checkpoint; the schedule still spans max_steps
    eval_interval: int = 500  # steps; 0 = only at the end
    eval_batches: int = 0  # 0 = the whole validation split
    eval_mean: Literal["tokens", "batches"] = "tokens"  # val loss: token-weighted mean; batches: the mean of each batch's mean loss (the paper's evaluate)
    log_interval: int = 10  # steps between metrics lines (metrics.jsonl, wandb, progress bar)
    cooldown_from: str = ""  # a checkpoint folder of a wsd run in its stable phase: this new run continues it (weights, optimizer, data position) and decays from that step to max_steps (a cooldown branch)
    profile_steps: list[int] = field(default_factory=list)  # [a, b]: a torch.profiler trace of steps a to b (1-based) in <run dir>/profile/
    seed: int = 1337  # seeds init, dropout and the data order
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    accel: Literal["auto", "none", "compile", "compile-graphs"] = "auto"  # fast path applied from outside the model (gam_pretrain/accel); compile-graphs: + CUDA graphs per block; auto: the fastest measured (none so far)
    out_dir: str = "runs"  # parent folder of run directories
    run_name: str = ""  # default: <arch>-<timestamp>
    peak_flops: float = 0.0  # for MFU; 0 = known GPU peak, or a measured fp32 matmul peak on CPU
    progress: bool = True  # rank 0 shows progress: a tqdm bar on a terminal, else one plain line per log interval (SLURM logs)



@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's global batch is cut: world_size ranks x grad_accum micro-batches of
    micro_batch_size sequences (derived by `batch_layout`, the single home of that arithmetic)."""
    global_batch: int
    world_size: int
    micro_batch_size: int
    grad_accum: int

    @property
    def per_rank(self) -> int:
        return self.micro_batch_size * self.grad_accum


def batch_layout(t: "TrainConfig", world_size: int) -> BatchLayout:
    """train.batch_size (global) over `world_size` ranks; a batch that does not divide is refused in one line."""
    b = t.batch_size
    if b % world_size:
        raise ConfigError(f"'train.batch_size' ({b}, the global batch) does not divide among {world_size} ranks; "
                          f"use a multiple of {world_size} or another number of ranks")
    per_rank = b // world_size
    if t.micro_batch_size:
        if per_rank % t.micro_batch_size:
            raise ConfigError(f"'train.micro_batch_size' ({t.micro_batch_size}) does not divide the {per_rank} "
                              f"sequences each of {world_size} ranks takes of 'train.batch_size' ({b})")
        return BatchLayout(b, world_size, t.micro_batch_size, per_rank // t.micro_batch_size)
    if per_rank % t.grad_accum:
        raise ConfigError(f"'train.grad_accum' ({t.grad_accum}) does not divide the {per_rank} sequences each of "
                          f"{world_size} ranks takes of 'train.batch_size' ({b})")
    return BatchLayout(b, world_size, per_rank // t.grad_accum, t.grad_accum)


@dataclass
class EngineConfig:
    kind: Literal["single", "ddp", "deepspeed", "fsdp2"] = "single"  # how a step runs across processes
    zero_stage: int = 2  # deepspeed: 0-3 (3 = fully sharded, FSDP-style)
    offload_optimizer: bool = False  # deepspeed: optimizer state in CPU memory
    offload_params: bool = False  # deepspeed ZeRO-3: parameters in CPU memory
    activation_checkpointing: bool = False  # recompute each block in backward
    deepspeed_extra: str = ""  # JSON object merged into the generated DeepSpeed config


@dataclass
class CheckpointConfig:
    interval_steps: int = 0  # save every N steps (0: off)
    interval_minutes: float = 0.0  # and/or every M minutes (0: off)
    keep_last: int = 2  # complete checkpoints kept, newest first
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of K, forever (0: none)
    keep_steps: list[int] = field(default_factory=list)  # also save a checkpoint at each of these steps and keep it (a sweep's cooldown branch points)
    async_save: bool = True  # periodic saves write in a background thread: a step waits only for each rank's in-memory snapshot of its state (the final and preemption saves block)
    resume: str = "auto"  # auto: latest complete checkpoint in the run dir | never | a checkpoint path


@dataclass
class LoggingConfig:
    wandb: Literal["offline", "online", "disabled"] = "offline"  # wandb mode (offline: synced later with `wandb sync`)
    wandb_project: str = "gam-pretrain"  # wandb project name
    wandb_entity: str = ""  # wandb team or user; empty: your default
    tensorboard: bool = False  # also write TensorBoard event files to <run dir>/tensorboard (pip install 'gam-pretrain[tensorboard]')


@dataclass
class LaunchConfig:
    """Where and how `gam-pretrain launch` submits (submitit); the trainer itself never reads it."""
    cluster: Literal["slurm", "local"] = "slurm"  # local: a subprocess on this machine (no SLURM)
    folder: str = ""  # submitit's job files and logs; default: <run dir>/slurm
    job_name: str = ""  # default: the run name
    nodes: int = 1  # nodes of one training job
    tasks_per_node: int = 0  # ranks per node; 0 = gpus_per_node, or 1 without GPUs (see ranks_per_node)
    gpus_per_node: int = 0  # GPUs requested per node (--gpus-per-node)
    cpus_per_task: int = 0  # 0: the cluster's default; sets OMP_NUM_THREADS in the job
    mem_gb: float = 0.0  # per node; 0: the cluster's default
    partition: str = ""  # SLURM partition; empty: the cluster default
    account: str = ""  # SLURM account to charge; empty: your default
    qos: str = ""  # SLURM quality of service; empty: the default
    constraint: str = ""  # SLURM node feature constraint (--constraint)
    time_minutes: int = 240  # wall-clock limit of one attempt; the run requeues itself at the limit
    signal_delay_s: int = 120  # USR2 this long before the limit: time for the synchronized save
    max_requeues: int = 50  # attempts after the first (preemptions + time-outs)
    array_tasks: int = 16  # prep: array tasks that share the work units
    array_parallelism: int = 16  # array tasks running at once
    sbatch_args: list[str] = field(default_factory=list)  # extra sbatch options, "--name=value" or "--flag"
    setup: list[str] = field(default_factory=list)  # shell lines run before srun (module load, source venv): shell code by design
    python: str = ""  # interpreter on the compute nodes; default: `python` when a setup line activates an environment (source .../activate, conda activate), else the one running `launch`

    @property
    def ranks_per_node(self) -> int:
        """Training processes per node: tasks_per_node, else one per GPU, else one."""
        return self.tasks_per_node or max(self.gpus_per_node, 1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def tokens_per_step(self) -> int:
        """Tokens one optimizer step trains on, over all ranks (train.batch_size is the global batch)."""
        return self.train.batch_size * self.model.block_size


@dataclass
class PrepCommand:
    """`gam-pretrain prep`: a corpus into a shard directory. A recipe gives the base of `prep.*`."""
    recipe: str = ""  # a recipe in gam_pretrain/data/recipes/ (embedded, wikitext2, ...); empty: prep.* alone
    out: str = ""  # output directory; running again resumes it
    prep: PrepConfig = field(default_factory=PrepConfig)
    workers: int = 1  # tokenizer worker processes
    progress: bool = True  # a progress bar
    phase: Literal["all", "plan", "units", "finalize"] = "all"  # one phase only: job arrays plan once, run units in every task, finalize once
    task_index: int = 0  # units phase: this task's index (SLURM_ARRAY_TASK_ID)
    task_count: int = 1  # units phase: the number of tasks sharing the units


@dataclass
class LaunchPrepCommand:
    """`gam-pretrain launch prep`: the same prep as SLURM jobs (plan -> unit array -> finalize)."""
    recipe: str = ""  # a recipe in gam_pretrain/data/recipes/ (embedded, wikitext2, ...); empty: prep.* alone
    out: str = ""  # output directory, on storage every node can write
    prep: PrepConfig = field(default_factory=PrepConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


def load_prep_command(cls: type, path: str | Path | None, overrides: list[str]) -> Any:
    """A prep command config: the recipe's PrepConfig as the base of `prep.*`, then the YAML file,
    then the overrides (read twice: the first pass only finds the recipe)."""
    data = read_yaml_mapping(path) if path is not None else {}
    probe = cls()
    apply_dict(probe, data, source=str(path))
    apply_overrides(probe, overrides)
    if probe.recipe and probe.recipe not in recipe_names():
        raise ConfigError(f"invalid value {probe.recipe!r} for 'recipe'; valid choices: {', '.join(recipe_names())}")
    cmd = cls(prep=load_recipe(probe.recipe)) if probe.recipe else cls()
    apply_dict(cmd, data, source=str(path))
    apply_overrides(cmd, overrides)
    if not cmd.out:
        raise ConfigError("set 'out': the output directory (--out DIR)")
    check_plain_text(cmd)
    return cmd


# Run settings added after runs were first recorded (checkpoint fingerprints, sweep run names), with
# the value every older run had: left out at that value, so older records still match.
ADDED_SINCE_FIRST_RUNS = {"model.init": "gpt2", "model.mix_dropout": True, "optim.decay": "matrices",
                          "optim.warmup_from_zero": False, "data.tokenizer_splits": ["train"],
                          "data.packing": "separators", "train.eval_mean": "tokens",
                          "train.micro_batch_size": 0, "data.mixture": {}, "data.mixture_max_epochs": {},
                          "train.profile_steps": [], "optim.decay_fraction": 0.2, "optim.decay_start": 0,
                          "train.cooldown_from": "", "model.assoc_conv": 0}


# Model settings left out of a run's identity at any value where its family never reads them (a
# Transformer is the same run at any model.assoc_conv). Older unread settings (model.mix_dropout, ...)
# are not here: sweep run names have held their values, and those names must keep finding their runs.
LEFT_OUT_WHERE_UNREAD = ("model.assoc_conv",)


def without_later_defaults(d: dict, prefix: str = "") -> dict:
    """A (section of a) to_dict(cfg), less ADDED_SINCE_FIRST_RUNS keys at their old values, and less
    the LEFT_OUT_WHERE_UNREAD keys the model's family never reads."""
    unread = unread_fields(d["arch"]) if prefix == "model." and "arch" in d else frozenset()
    return {k: without_later_defaults(v, f"{prefix}{k}.") if isinstance(v, dict) else v for k, v in d.items()
            if ADDED_SINCE_FIRST_RUNS.get(f"{prefix}{k}", object()) != v
            and not (k in unread and f"{prefix}{k}" in LEFT_OUT_WHERE_UNREAD)}


# ---- reading and writing ------------------------------------------------------------------------
def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(resolved_yaml(cfg))


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{p}: not valid YAML: {where}{problem}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a text file ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, base: Any = None) -> RunConfig:
    """`base` (default RunConfig()), then the YAML file at `path`, then the dotted overrides."""
    cfg = base if base is not None else RunConfig()
    if path is not None:
        apply_dict(cfg, read_yaml_mapping(path), source=str(path))
    apply_overrides(cfg, overrides or [])
    return cfg


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Dotted command-line overrides onto any config dataclass; values are read as YAML."""
    for key, value in parse_overrides(overrides):
        parsed = read_value(value)
        try:
            set_value(cfg, key, parsed, source="command line")
        except ConfigError as error:
            if not isinstance(parsed, (dict, list)):
                raise
            try:  # a text key given JSON, e.g. engine.deepspeed_extra='{"zero_optimization": {...}}'
                set_value(cfg, key, value, source="command line")
            except ConfigError:
                raise error from None
    return cfg


def read_value(text: str) -> Any:
    """A command-line value as YAML (7, 1e-3, true, [a, b], {train: x}); text that is not valid
    YAML (a glob like *.txt, a brace pattern) stays the text it is."""
    if text == "":
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def config_from_dict(data: dict) -> RunConfig:
    """A RunConfig from `to_dict` output (a resolved config carried into a job)."""
    cfg = RunConfig()
    apply_dict(cfg, data, source="a saved config")
    return cfg


def apply_dict(cfg: Any, data: dict, prefix: str = "", source: str = "") -> None:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and _is_section(cfg, dotted):
            apply_dict(cfg, value, prefix=dotted + ".", source=source)
        else:
            set_value(cfg, dotted, value, source=source)


def _is_section(cfg: Any, dotted: str) -> bool:
    """Whether `dotted` names a nested dataclass (a mapping there sets its keys one by one) rather
    than a dict-valued key (a mapping there replaces the whole dict). Unknown keys count as
    sections, so set_value reports them with the valid choices."""
    obj = cfg
    for name in dotted.split("."):
        if not dataclasses.is_dataclass(obj):
            return False
        fields = {f.name for f in dataclasses.fields(obj)}
        if name not in fields:
            return True
        hint = typing.get_type_hints(type(obj))[name]
        if typing.get_origin(hint) is dict:
            return False
        obj = getattr(obj, name)
    return dataclasses.is_dataclass(obj)


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """Accepts `--a.b value`, `--a.b=value` and `a.b=value`; `-` in a key reads as `_`."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            arg = arg[2:]
            if "=" in arg:
                key, value = arg.split("=", 1)
            elif i + 1 < len(args):
                key, value = arg, args[i + 1]
                i += 1
            else:
                raise ConfigError(f"override --{arg} has no value")
        elif "=" in arg:
            key, value = arg.split("=", 1)
        else:
            raise ConfigError(f"cannot read override {arg!r}: use --section.key VALUE or section.key=VALUE")
        out.append((key.replace("-", "_"), value))
        i += 1
    return out


def set_value(cfg: Any, dotted: str, value: Any, source: str = "") -> None:
    """Sets one key. A key one level below a dict-valued field sets that entry (source.splits.train=...)."""
    where = f" (from {source})" if source else ""
    parts = dotted.split(".")
    obj = cfg
    for depth, name in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(obj)}
        path = ".".join(parts[: depth + 1])
        if name not in fields:
            scope = ".".join(parts[:depth]) or "the top level"
            raise ConfigError(f"unknown config key '{path}'{where}; valid keys in {scope}: {', '.join(fields)}")
        hint = typing.get_type_hints(type(obj))[name]
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(hint):
                raise ConfigError(f"'{path}'{where} is a section; set one of its keys: "
                                  + ", ".join(f"{path}.{f.name}" for f in dataclasses.fields(hint)))
            setattr(obj, name, coerce(value, hint, path + where))
            return
        dict_hint = _dict_hint(hint)
        if dict_hint is not None and depth == len(parts) - 2:
            entries = dict(getattr(obj, name) or {})
            entries[parts[-1]] = coerce(value, typing.get_args(dict_hint)[1], dotted + where)
            setattr(obj, name, entries)
            return
        obj = getattr(obj, name)
        if not dataclasses.is_dataclass(obj):
            raise ConfigError(f"'{path}'{where} is a value, not a section; it has no key '{parts[depth + 1]}'")


def _dict_hint(hint: Any) -> Any:
    """dict[K, V] from `dict[K, V]` or `dict[K, V] | None`, else None."""
    if typing.get_origin(hint) is dict:
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next((a for a in typing.get_args(hint) if typing.get_origin(a) is dict), None)
    return None


def coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"invalid value {value!r} for '{key}'; valid choices: {', '.join(map(str, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is list:
        (item,) = typing.get_args(hint)
        items = value if isinstance(value, list) else [value]
        return [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(items)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"invalid value {value!r} for '{key}': expected a mapping such as {{train: ...}}")
        key_type, value_type = typing.get_args(hint)
        return {coerce(k, key_type, key): coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise ConfigError(f"invalid value {value!r} for '{key}': expected {hint.__name__}")


MUST_BE_POSITIVE = ("model.vocab_size", "model.block_size", "model.d_model", "model.n_layers", "model.memory_slots",
                    "model.conv_kernel", "model.n_heads", "train.batch_size", "train.grad_accum", "train.log_interval")
MAY_BE_ZERO = ("train.max_steps", "train.epochs", "train.stop_at_step", "train.eval_interval", "train.eval_batches",
               "optim.warmup_steps", "optim.grad_clip", "optim.weight_decay", "optim.min_lr_ratio", "optim.eps",
               "optim.decay_start", "checkpoint.interval_steps", "checkpoint.interval_minutes", "checkpoint.keep_last",
               "checkpoint.keep_every", "model.assoc_conv", "train.micro_batch_size", "data.num_workers", "data.prep_workers", "launch.nodes",
               "launch.tasks_per_node", "launch.gpus_per_node", "launch.cpus_per_task", "launch.mem_gb",
               "launch.time_minutes", "launch.signal_delay_s", "launch.max_requeues")


def value_at(cfg: Any, dotted: str) -> Any:
    return functools.reduce(getattr, dotted.split("."), cfg)


def validate(cfg: RunConfig) -> RunConfig:
    """Checks values that are well-typed but impossible; raises ConfigError."""
    from .models import REGISTRY

    if cfg.model.arch not in REGISTRY:
        raise ConfigError(f"invalid value {cfg.model.arch!r} for 'model.arch'; valid choices: {', '.join(REGISTRY)}")
    if not cfg.data.dir and cfg.data.recipe not in recipe_names():
        raise ConfigError(f"invalid value {cfg.data.recipe!r} for 'data.recipe'; valid choices: "
                          f"{', '.join(recipe_names())} (or set data.dir to a prepared folder)")
    for key in MUST_BE_POSITIVE:
        if not value_at(cfg, key) > 0:
            raise ConfigError(f"'{key}' must be positive, got {value_at(cfg, key)}")
    if cfg.model.arch in HEADED_ARCHS and cfg.model.d_model % cfg.model.n_heads:
        raise ConfigError(f"'model.d_model' ({cfg.model.d_model}) must be divisible by 'model.n_heads' ({cfg.model.n_heads})")
    steps = cfg.train.profile_steps
    if steps and not (len(steps) == 2 and all(isinstance(s, int) for s in steps) and 1 <= steps[0] <= steps[1]):
        raise ConfigError(f"'train.profile_steps' must be [first, last] steps with 1 <= first <= last (or []), got {steps}")
    t = cfg.train
    if t.micro_batch_size and t.grad_accum != 1:
        raise ConfigError(f"set only one of 'train.micro_batch_size' ({t.micro_batch_size}) and 'train.grad_accum' "
                          f"({t.grad_accum}): with a micro-batch size, the accumulation follows from the world size")
    batch_layout(t, 1)  # what divides over any number of ranks divides over one
    if not 0.0 <= cfg.model.dropout < 1.0:
        raise ConfigError(f"'model.dropout' must be in [0, 1), got {cfg.model.dropout}")
    if t.accel == "compile-graphs" and (cfg.engine.kind != "single" or batch_layout(t, 1).grad_accum != 1
                                        or cfg.engine.activation_checkpointing):
        # a replay overwrites the buffers autograd kept as .grad, so accumulation would read overwritten
        # gradients (pytorch/pytorch#96693); sharding engines move parameters between steps
        raise ConfigError("'train.accel' compile-graphs runs with engine.kind single, one micro-batch per step and no "
                          "activation checkpointing; choose compile")
    if cfg.model.arch == "mamba" and cfg.model.scan in ("cuda", "triton") and (
            importlib.util.find_spec("mamba_ssm" if cfg.model.scan == "cuda" else "triton") is None
            or cfg.train.device.startswith("cpu")):
        needs = "mamba-ssm (pip install 'gam-pretrain[gpu]')" if cfg.model.scan == "cuda" else "Triton (CUDA PyTorch brings it)"
        raise ConfigError(f"'model.scan' {cfg.model.scan} needs a CUDA device and {needs}; choose auto, torch or chunked")
    if cfg.engine.kind == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("'engine.kind' deepspeed needs DeepSpeed: pip install 'gam-pretrain[deepspeed]' "
                          "(or choose ddp or fsdp2, which need only torch)")
    if not 0 <= cfg.engine.zero_stage <= 3:
        raise ConfigError(f"'engine.zero_stage' must be 0, 1, 2 or 3, got {cfg.engine.zero_stage}")
    if cfg.engine.deepspeed_extra:
        try:
            extra = json.loads(cfg.engine.deepspeed_extra)
            if not isinstance(extra, dict):
                raise ValueError("not an object")
        except ValueError as e:
            raise ConfigError(f"'engine.deepspeed_extra' must be a JSON object: {e}") from None
        if isinstance(extra.get("checkpoint"), dict) and extra["checkpoint"].get("load_universal"):
            # DeepSpeed reads universal checkpoints with torch.load(weights_only=False): code in a file would run
            raise ConfigError("'engine.deepspeed_extra' sets checkpoint.load_universal, which unpickles arbitrary "
                              "objects; gam-pretrain refuses it (resume from our own checkpoints)")
    for key in MAY_BE_ZERO:
        if not value_at(cfg, key) >= 0:  # also refuses NaN
            raise ConfigError(f"'{key}' must be zero or positive, got {value_at(cfg, key)}")
    if not cfg.optim.lr > 0 or not math.isfinite(cfg.optim.lr):
        raise ConfigError(f"'optim.lr' must be a positive number, got {cfg.optim.lr}")
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(cfg.optim, key) < 1.0:
            raise ConfigError(f"'optim.{key}' must be in [0, 1), got {getattr(cfg.optim, key)}")
    if cfg.optim.min_lr_ratio > 1:
        raise ConfigError(f"'optim.min_lr_ratio' must be at most 1, got {cfg.optim.min_lr_ratio}")
    if cfg.logging.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("logging.tensorboard needs the tensorboard package: pip install 'gam-pretrain[tensorboard]', "
                          "or set logging.tensorboard=false")
    if any(step <= 0 for step in cfg.checkpoint.keep_steps):
        raise ConfigError(f"'checkpoint.keep_steps' must hold positive steps, got {cfg.checkpoint.keep_steps}")
    if not 0 < cfg.optim.decay_fraction <= 1:
        raise ConfigError(f"'optim.decay_fraction' must be in (0, 1], got {cfg.optim.decay_fraction}")
    for key, value in (("optim.decay_start", cfg.optim.decay_start), ("train.cooldown_from", cfg.train.cooldown_from)):
        if value and cfg.optim.schedule != "wsd":
            raise ConfigError(f"'{key}' needs optim.schedule=wsd (the schedule is {cfg.optim.schedule!r})")
    if cfg.train.max_steps <= 0 and cfg.train.epochs <= 0:
        raise ConfigError("set 'train.max_steps' or 'train.epochs' to a positive value")
    if cfg.train.max_steps and cfg.train.stop_at_step > cfg.train.max_steps:
        raise ConfigError(f"'train.stop_at_step' ({cfg.train.stop_at_step}) is beyond 'train.max_steps' "
                          f"({cfg.train.max_steps})")
    check_run_name(cfg.train.run_name)
    check_plain_text(cfg)
    return cfg


def check_run_name(name: str, key: str = "train.run_name") -> None:
    """A run name is one folder inside train.out_dir: never a path that leaves it."""
    if name and (name in (".", "..") or "/" in name or "\\" in name):
        raise ConfigError(f"'{key}' must be a plain folder name (no '/', '\\', '.' or '..'), got {name!r}")


def control_characters(text: str) -> list[str]:
    return sorted({repr(c) for c in text if ord(c) < 32 or ord(c) == 127})


def check_plain_text(cfg: Any, prefix: str = "") -> None:
    """No config string may hold a control character: values reach sbatch scripts, file names and
    logs, where a newline would end its quoting and start a line of shell."""
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_plain_text(value, f"{key}.")
            continue
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(item, str) and (bad := control_characters(item)):
                where = f"'{key}'" + (f" entry {i}" if isinstance(value, list) else "")
                raise ConfigError(f"{where} holds control character(s) {', '.join(bad)}; values must be one "
                                  f"line of plain text, got {item!r}")


# ---- help: every key with its type, default and meaning ------------------------------------------
@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """The trailing `# comment` of each field in a dataclass's source: the key's one-line meaning."""
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return {}
    comments = {}
    for line in lines:
        match = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
        if match:
            comments[match.group(1)] = match.group(2).strip()
    return comments


def type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "|".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return "|".join(type_name(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def key_table(cfg: Any, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, current value, meaning) for every leaf key of a config dataclass."""
    rows = []
    hints = typing.get_type_hints(type(cfg))
    comments = field_comments(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(key_table(value, f"{prefix}{f.name}."))
        else:
            shown = json.dumps(value) if not isinstance(value, str) or not value else value
            rows.append((f"{prefix}{f.name}", type_name(hints[f.name]), shown, comments.get(f.name, "")))
    return rows


def format_key_table(cfg: Any) -> str:
    """The keys of `--help`: one line each, `--key TYPE (default) meaning`."""
    rows = key_table(cfg)
    width = max(len(k) + len(t) for k, t, _, _ in rows) + 4
    return "\n".join(f"  {f'--{k} {t}':<{width}} ({v}) {m}".rstrip() for k, t, v, m in rows)


def resolved_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
