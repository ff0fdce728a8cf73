"""Checkpoint -> one safetensors file + config.json + tokenizer.json, from any engine, offline.

single/DDP read our torch file (weights_only); DeepSpeed merges its ZeRO partitions with
`zero_to_fp32`; FSDP2 reads the sharded torch.distributed.checkpoint folder into a full state
dict. None of them needs the world size the checkpoint was written with.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .models import ModelConfig, build_model
from .train.checkpoint import latest_checkpoint, read_trainer_state

WEIGHTS = "model.safetensors"


def resolve_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    if (path / "COMPLETE").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a complete checkpoint nor a run directory with one")
    return latest


def checkpoint_weights(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict]:
    state = read_trainer_state(ckpt)
    model_cfg = ModelConfig(**state["model"])
    kind = state["engine"]["kind"]
    if kind in ("single", "ddp"):
        weights = torch.load(ckpt / "model_optim.pt", map_location="cpu", weights_only=True)["model"]
    elif kind == "deepspeed":
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError:
            raise FileNotFoundError(f"{ckpt} is a DeepSpeed checkpoint; reading it needs DeepSpeed: "
                                    "pip install 'gam-pretrain[deepspeed]'") from None

        weights = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="deepspeed")
    elif kind == "fsdp2":
        import torch.distributed.checkpoint as dcp

        weights = build_model(model_cfg).state_dict()
        holder = {"model": weights}
        dcp.load(holder, checkpoint_id=str(ckpt / "dcp"), no_dist=True)
        weights = holder["model"]
    else:
        raise ValueError(f"unknown engine {kind!r} in {ckpt}")
    return {k: v.detach().float().contiguous() for k, v in weights.items()}, state


def export_checkpoint(path: str | Path, out_dir: str | Path) -> Path:
    from safetensors.torch import save_file

    ckpt = resolve_checkpoint(path)
    weights, state = checkpoint_weights(ckpt)
    model = build_model(ModelConfig(**state["model"]))
    model.load_state_dict(weights)  # strict: every parameter present and shaped right
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / WEIGHTS))
    config = {"model": state["model"], "step": state["step"], "tokens": state["tokens"],
              "data_fingerprint": state["data_fingerprint"], "data_path": state.get("data_path"),
              "checkpoint": str(ckpt.resolve()), "engine": state["engine"]["kind"]}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer = Path(state.get("data_path", "")) / "tokenizer.json"
    if tokenizer.is_file():
        shutil.copyfile(tokenizer, out / "tokenizer.json")
    return out


def load_export(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, config dict, tokenizer or None) from an export folder."""
    from safetensors.torch import load_file

    from .data.tokenizer import load_tokenizer

    path = Path(path)
    if not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"no {WEIGHTS} in {path}: not an export (run `gam-pretrain export` first)")
    config = json.loads((path / "config.json").read_text())
    model = build_model(ModelConfig(**config["model"]))
    model.load_state_dict(load_file(str(path / WEIGHTS)))
    tokenizer = load_tokenizer(path / "tokenizer.json") if (path / "tokenizer.json").is_file() else None
    return model.to(device).eval(), config, tokenizer
