"""Checkpoint -> one safetensors file + config.json + tokenizer.json, from any engine, offline.

The checkpoint's files are checked against its files.json first. single/DDP read our torch file
(weights_only); DeepSpeed merges its ZeRO partitions with `zero_to_fp32` (its loads made
weights_only); FSDP2 reads the sharded torch.distributed.checkpoint folder (metadata through a
restricted unpickler). None of them needs the world size the checkpoint was written with, and
nothing in a checkpoint can run code.

config.json records the sha256 of model.safetensors and tokenizer.json; `load_export` checks them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .data import ShardSet
from .data.remote import is_remote
from .files import first_line, read_json, sha256_file, write_atomic
from .models import ModelConfig, build_model
from .train.checkpoint import CheckpointError, latest_checkpoint, load_torch_file, verify_checkpoint

WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
CONFIG = "config.json"


class ExportError(ValueError):
    """A damaged export folder (a file whose sha256 is not the one config.json records, or garbled)."""


def resolve_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    if (path / "COMPLETE").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a complete checkpoint nor a run directory with one")
    return latest


def model_config(state: dict, source: Path) -> ModelConfig:
    try:
        return ModelConfig(**state["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source} holds no valid model config ({first_line(e)})") from None


def checkpoint_weights(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict]:
    state = verify_checkpoint(ckpt)
    model_cfg = model_config(state, ckpt / "trainer_state.json")
    kind = state["engine"].get("kind")
    if kind in ("single", "ddp"):
        saved = load_torch_file(ckpt / "model_optim.pt")
        weights = saved.get("model") if isinstance(saved, dict) else None
        if not isinstance(weights, dict):
            raise CheckpointError(f"{ckpt / 'model_optim.pt'} holds no model weights")
    elif kind == "deepspeed":
        try:
            from .train.engines.zero import read_zero_weights
            import deepspeed  # noqa: F401
        except ImportError:
            raise FileNotFoundError(f"{ckpt} is a DeepSpeed checkpoint; reading it needs DeepSpeed: "
                                    "pip install 'gam-pretrain[deepspeed]'") from None
        weights = read_zero_weights(ckpt)
    elif kind == "fsdp2":
        from .train.engines.fsdp2 import DCP_DIR, load_dcp

        holder = {"model": build_model(model_cfg).state_dict()}
        load_dcp(holder, ckpt / DCP_DIR, no_dist=True)
        weights = holder["model"]
    else:
        raise CheckpointError(f"unknown engine {kind!r} in {ckpt / 'trainer_state.json'}")
    return {k: v.detach().float().contiguous() for k, v in weights.items()}, state


def load_weights(model: torch.nn.Module, weights: dict, source: Path) -> None:
    """Strict: every parameter present and shaped right, else one line naming `source`."""
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"the weights in {source} do not fit the model it describes ({first_line(e)})") from None


def export_checkpoint(path: str | Path, out_dir: str | Path) -> Path:
    from safetensors.torch import save_file

    ckpt = resolve_checkpoint(path)
    weights, state = checkpoint_weights(ckpt)
    load_weights(build_model(model_config(state, ckpt)), weights, ckpt)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # each file replaced whole; config.json, with the others' hashes, last
    partial = out / f".{WEIGHTS}.{os.getpid()}.tmp"
    try:
        with open(partial, "wb"):
            usual_mode = partial.stat().st_mode & 0o777  # what this umask gives a new file
        save_file(weights, str(partial))
        os.chmod(partial, usual_mode)  # safetensors writes 0600; an export is meant to be shared
        os.replace(partial, out / WEIGHTS)
    finally:
        partial.unlink(missing_ok=True)
    sha256 = {WEIGHTS: sha256_file(out / WEIGHTS)}
    (out / TOKENIZER).unlink(missing_ok=True)  # never leave an earlier export's tokenizer beside these weights
    recorded = str(state.get("data_path") or "")
    if recorded.startswith(("http://", "https://")) or (recorded and not is_remote(recorded)
                                                        and (Path(recorded) / "manifest.json").is_file()):
        data = ShardSet(state["data_path"])
        write_atomic(out / TOKENIZER, data.tokenizer_bytes())  # checked against the data's manifest
        sha256[TOKENIZER] = sha256_file(out / TOKENIZER)
    config = {"model": state["model"], "step": state["step"], "tokens": state.get("tokens"),
              "data_fingerprint": state.get("data_fingerprint"), "data_path": state.get("data_path"),
              "checkpoint": str(ckpt.resolve()), "engine": state["engine"]["kind"], "sha256": sha256}
    write_atomic(out / CONFIG, json.dumps(config, indent=2))
    return out


def check_export_files(path: Path, config: dict) -> None:
    """Every file config.json records against its sha256 (exports before hashes were recorded: none)."""
    recorded = config.get("sha256", {})
    if not isinstance(recorded, dict):
        raise ExportError(f"{path / CONFIG} is garbled ('sha256' is not an object)")
    for name, digest in sorted(recorded.items()):
        if name not in (WEIGHTS, TOKENIZER):
            raise ExportError(f"{path / CONFIG} lists an unexpected file {name!r}")
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is missing (listed in {CONFIG})")
        if sha256_file(path / name) != digest:
            raise ExportError(f"{path / name} is damaged: its sha256 differs from the one in {CONFIG}")


def load_export(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, config dict, tokenizer or None) from an export folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .data.tokenizer import load_tokenizer

    path = Path(path)
    if not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"no {WEIGHTS} in {path}: not an export (run `gam-pretrain export` first)")
    config = read_json(path / CONFIG)
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ExportError(f"{path / CONFIG} has no model config (garbled or not an export)")
    check_export_files(path, config)
    model = build_model(model_config(config, path / CONFIG))
    try:
        weights = load_file(str(path / WEIGHTS))
    except SafetensorError as e:
        raise ExportError(f"{path / WEIGHTS} is damaged or truncated ({first_line(e)})") from None
    load_weights(model, weights, path / WEIGHTS)
    tokenizer = None
    if (path / TOKENIZER).is_file() and ("sha256" not in config or TOKENIZER in config["sha256"]):
        try:
            tokenizer = load_tokenizer(path / TOKENIZER)
        except Exception as e:  # the tokenizers library raises its own untyped exceptions
            raise ExportError(f"{path / TOKENIZER} could not be read ({first_line(e)})") from None
    return model.to(device).eval(), config, tokenizer
