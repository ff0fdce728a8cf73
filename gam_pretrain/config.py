"""Typed run configuration: dataclasses, YAML files and dotted overrides.

    cfg = load_config("configs/quickstart.yaml", ["--optim.lr", "1e-3", "train.max_steps=50"])

Every value has one home (a dataclass field below). An unknown key or a value of the wrong type
raises ConfigError naming the key and the valid choices; the CLI turns it into exit code 2.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .models.common import ModelConfig


class ConfigError(ValueError):
    """A user-caused configuration error (bad key, bad type, bad value)."""


@dataclass
class DataConfig:
    dir: str = ""  # a prepared shard directory (`gam-pretrain prep`); empty: prep `recipe` into cache_dir
    recipe: str = "embedded"  # a data_prep recipe, prepped on first use with this run's block size and vocab
    tokenizer: str = ""  # recipe override: bpe-whitespace | bpe-bytelevel | path/to/tokenizer.json
    cache_dir: str = "runs/data"
    prep_workers: int = 1
    num_workers: int = 0  # DataLoader workers per rank


@dataclass
class OptimConfig:
    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # on matrices and embeddings; never on biases, norms or the SSM's A/D
    grad_clip: float = 1.0  # max global L2 norm; 0 disables
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio


@dataclass
class TrainConfig:
    batch_size: int = 32  # sequences per optimizer step (per process), split into grad_accum micro-batches
    grad_accum: int = 1
    epochs: float = 5.0  # used when max_steps is 0
    max_steps: int = 0
    stop_at_step: int = 0  # end this launch after that step with a checkpoint; the schedule still spans max_steps
    eval_interval: int = 500  # steps; 0 = only at the end
    eval_batches: int = 0  # 0 = the whole validation split
    log_interval: int = 10
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    out_dir: str = "runs"
    run_name: str = ""  # default: <arch>-<timestamp>
    peak_flops: float = 0.0  # for MFU; 0 = known GPU peak, or a measured fp32 matmul peak on CPU
    progress: bool = True


@dataclass
class EngineConfig:
    kind: Literal["single", "ddp", "deepspeed", "fsdp2"] = "single"
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
    resume: str = "auto"  # auto: latest complete checkpoint in the run dir | never | a checkpoint path


@dataclass
class LoggingConfig:
    wandb: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "gam-pretrain"
    wandb_entity: str = ""


@dataclass
class LaunchConfig:
    """Where and how `gam-pretrain launch` submits (submitit); the trainer itself never reads it."""
    cluster: Literal["slurm", "local"] = "slurm"  # local: a subprocess on this machine (no SLURM)
    folder: str = ""  # submitit's job files and logs; default: <run dir>/slurm
    job_name: str = ""  # default: the run name
    nodes: int = 1
    tasks_per_node: int = 0  # ranks per node; 0 = gpus_per_node, or 1 without GPUs
    gpus_per_node: int = 0
    cpus_per_task: int = 0  # 0: the cluster's default; sets OMP_NUM_THREADS in the job
    mem_gb: float = 0.0  # per node; 0: the cluster's default
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    time_minutes: int = 240  # wall-clock limit of one attempt; the run requeues itself at the limit
    signal_delay_s: int = 120  # USR2 this long before the limit: time for the synchronized save
    max_requeues: int = 50  # attempts after the first (preemptions + time-outs)
    array_tasks: int = 16  # prep: array tasks that share the work units
    array_parallelism: int = 16  # array tasks running at once
    sbatch_args: list[str] = field(default_factory=list)  # extra sbatch options, "--name=value" or "--flag"
    setup: list[str] = field(default_factory=list)  # shell lines run before srun (module load, source venv): shell code by design
    python: str = ""  # interpreter on the compute nodes; default: the one running `launch`


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


# ---- reading and writing ------------------------------------------------------------------------
def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, base: Any = None) -> RunConfig:
    cfg = base if base is not None else RunConfig()
    if path is not None:
        apply_dict(cfg, read_yaml_mapping(path), source=str(path))
    for key, value in parse_overrides(overrides or []):
        set_value(cfg, key, yaml.safe_load(value) if value != "" else "", source="command line")
    return cfg


def config_from_dict(data: dict) -> RunConfig:
    """A RunConfig from `to_dict` output (a resolved config carried into a job)."""
    cfg = RunConfig()
    apply_dict(cfg, data, source="a saved config")
    return cfg


def apply_dict(cfg: Any, data: dict, prefix: str = "", source: str = "") -> None:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            apply_dict(cfg, value, prefix=dotted + ".", source=source)
        else:
            set_value(cfg, dotted, value, source=source)


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """Accepts `--a.b value`, `--a.b=value` and `a.b=value`."""
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
        out.append((key, value))
        i += 1
    return out


def set_value(cfg: Any, dotted: str, value: Any, source: str = "") -> None:
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
        obj = getattr(obj, name)
        if not dataclasses.is_dataclass(obj):
            raise ConfigError(f"'{path}'{where} is a value, not a section; it has no key '{parts[depth + 1]}'")


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


def validate(cfg: RunConfig) -> RunConfig:
    """Checks values that are well-typed but impossible; raises ConfigError."""
    from .models import REGISTRY

    if cfg.model.arch not in REGISTRY:
        raise ConfigError(f"invalid value {cfg.model.arch!r} for 'model.arch'; valid choices: {', '.join(REGISTRY)}")
    positive = {
        "model.vocab_size": cfg.model.vocab_size, "model.block_size": cfg.model.block_size,
        "model.d_model": cfg.model.d_model, "model.n_layers": cfg.model.n_layers,
        "model.memory_slots": cfg.model.memory_slots, "model.conv_kernel": cfg.model.conv_kernel,
        "model.n_heads": cfg.model.n_heads, "train.batch_size": cfg.train.batch_size,
        "train.grad_accum": cfg.train.grad_accum, "train.log_interval": cfg.train.log_interval,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"'{key}' must be positive, got {value}")
    if cfg.model.arch == "transformer" and cfg.model.d_model % cfg.model.n_heads:
        raise ConfigError(f"'model.d_model' ({cfg.model.d_model}) must be divisible by 'model.n_heads' ({cfg.model.n_heads})")
    if cfg.train.batch_size % cfg.train.grad_accum:
        raise ConfigError(f"'train.batch_size' ({cfg.train.batch_size}) must be divisible by 'train.grad_accum' "
                          f"({cfg.train.grad_accum})")
    if not 0.0 <= cfg.model.dropout < 1.0:
        raise ConfigError(f"'model.dropout' must be in [0, 1), got {cfg.model.dropout}")
    if not 0 <= cfg.engine.zero_stage <= 3:
        raise ConfigError(f"'engine.zero_stage' must be 0, 1, 2 or 3, got {cfg.engine.zero_stage}")
    if cfg.engine.deepspeed_extra:
        import json

        try:
            if not isinstance(json.loads(cfg.engine.deepspeed_extra), dict):
                raise ValueError("not an object")
        except ValueError as e:
            raise ConfigError(f"'engine.deepspeed_extra' must be a JSON object: {e}") from None
    if cfg.train.max_steps <= 0 and cfg.train.epochs <= 0:
        raise ConfigError("set 'train.max_steps' or 'train.epochs' to a positive value")
    return cfg
