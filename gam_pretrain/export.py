"""Checkpoint -> a folder Hugging Face transformers loads, from any engine, offline.

model.safetensors (our weight names), config.json (`model_type` gam_pretrain and an `auto_map` to
modeling_gam_pretrain.py: hf_modeling.py with gam_pretrain/models pasted in, so the folder needs no
gam_pretrain), tokenizer.json with tokenizer_config.json and special_tokens_map.json, and
generation_config.json. Paths inside are relative to the folder (the checkpoint, the data).

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
MODELING = "modeling_gam_pretrain.py"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
HASHED = (WEIGHTS, TOKENIZER, MODELING, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, GENERATION_CONFIG)


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


def modeling_source() -> str:
    """hf_modeling.py with its import of `.models` replaced by the model files themselves: one
    self-contained module, the equations exactly as they trained."""
    package = Path(__file__).parent
    parts = ["# Written by gam-pretrain's export: gam_pretrain/hf_modeling.py with gam_pretrain/models pasted in.\n"
             "from __future__ import annotations\n"]
    families = sorted(p.name for p in (package / "models").glob("*.py") if p.name not in ("common.py", "__init__.py"))
    for name in ("common.py", *families, "__init__.py"):  # what they share, each family, the registry
        lines = (package / "models" / name).read_text().splitlines()
        if any(line.startswith("from .") and line.rstrip().endswith("(") for line in lines):
            raise RuntimeError(f"models/{name} imports across lines: export.modeling_source pastes one-line imports only")
        kept = [line for line in lines if not line.startswith(("from __future__", "from ."))]
        parts.append(f"\n# ---- gam_pretrain/models/{name} ----\n" + "\n".join(kept) + "\n")
    wrapper = (package / "hf_modeling.py").read_text()
    if "\nfrom .models import REGISTRY, ModelConfig\n" not in wrapper:
        raise RuntimeError("hf_modeling.py no longer imports `.models` as export.modeling_source expects")
    wrapper = "\n".join(line for line in wrapper.splitlines()
                        if not line.startswith(("from __future__", "from .models import")))
    parts.append("\n# ---- gam_pretrain/hf_modeling.py ----\n" + wrapper + "\n")
    return "".join(parts)


def hf_config(model: dict, eos: int | None) -> dict:
    """The Hugging Face keys of config.json (GamPretrainConfig derives the usual names from `model`)."""
    return {"model_type": "gam_pretrain", "architectures": ["GamPretrainForCausalLM"],
            "auto_map": {"AutoConfig": "modeling_gam_pretrain.GamPretrainConfig",
                         "AutoModelForCausalLM": "modeling_gam_pretrain.GamPretrainForCausalLM"},
            "model": model, "torch_dtype": "float32", "use_cache": False,
            **({"eos_token_id": eos} if eos is not None else {})}


def tokenizer_configs(tokenizer_bytes: bytes, block_size: int) -> tuple[dict, dict]:
    """tokenizer_config.json and special_tokens_map.json for `AutoTokenizer` (a fast tokenizer over
    tokenizer.json), naming the special tokens the vocabulary has."""
    from .data.tokenizer import EOS_CANDIDATES, tokenizer_from_bytes

    tok = tokenizer_from_bytes(tokenizer_bytes, TOKENIZER)
    specials = {}
    for role, names in (("eos_token", EOS_CANDIDATES), ("unk_token", ("<unk>", "[UNK]")),
                        ("pad_token", ("<pad>", "[PAD]")), ("bos_token", ("[SOS]",))):
        found = next((n for n in names if tok.token_to_id(n) is not None), None)
        if found:
            specials[role] = found
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
              "clean_up_tokenization_spaces": False, **specials}
    return config, specials


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
    for name in (TOKENIZER, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP):
        (out / name).unlink(missing_ok=True)  # never leave an earlier export's tokenizer beside these weights
    write_atomic(out / MODELING, modeling_source())
    write_atomic(out / GENERATION_CONFIG, json.dumps({"use_cache": False}, indent=2))  # no Cache: see hf_modeling
    recorded = str(state.get("data_path") or "")
    eos = None
    if recorded.startswith(("http://", "https://")) or (recorded and not is_remote(recorded)
                                                        and (Path(recorded) / "manifest.json").is_file()):
        from .data.tokenizer import eos_id, tokenizer_from_bytes

        tokenizer_bytes = ShardSet(state["data_path"]).tokenizer_bytes()  # checked against the data's manifest
        write_atomic(out / TOKENIZER, tokenizer_bytes)
        tokenizer_config, special_tokens = tokenizer_configs(tokenizer_bytes, state["model"]["block_size"])
        write_atomic(out / TOKENIZER_CONFIG, json.dumps(tokenizer_config, indent=2))
        write_atomic(out / SPECIAL_TOKENS_MAP, json.dumps(special_tokens, indent=2))
        eos = eos_id(tokenizer_from_bytes(tokenizer_bytes, out / TOKENIZER))
    if recorded and not is_remote(recorded):  # a shared export names no absolute path
        recorded = os.path.relpath(Path(recorded).resolve(), out.resolve())
    sha256 = {name: sha256_file(out / name) for name in HASHED if (out / name).is_file()}
    config = {**hf_config(state["model"], eos), "step": state["step"], "tokens": state.get("tokens"),
              "data_fingerprint": state.get("data_fingerprint"), "data_path": recorded or None,
              "checkpoint": os.path.relpath(ckpt.resolve(), out.resolve()), "engine": state["engine"]["kind"],
              "sha256": sha256}
    write_atomic(out / CONFIG, json.dumps(config, indent=2))
    return out


def check_export_files(path: Path, config: dict) -> None:
    """Every file config.json records against its sha256 (exports before hashes were recorded: none)."""
    recorded = config.get("sha256", {})
    if not isinstance(recorded, dict):
        raise ExportError(f"{path / CONFIG} is garbled ('sha256' is not an object)")
    for name, digest in sorted(recorded.items()):
        if name not in HASHED:
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
