"""Model registry: every architecture is built by name from one ModelConfig."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable

import torch

from .common import LMHeadModel, ModelConfig
from .gam import GAM
from .gam_assoc import GAMAssoc
from .mamba import Mamba
from .transformer import Transformer


@dataclass(frozen=True)
class ArchSpec:
    family: str
    build: Callable[[ModelConfig], LMHeadModel]
    description: str
    options: dict[str, tuple[str | int, ...]]  # config fields that select sub-variants, with their values
    reads: tuple[str, ...] = ()  # the ModelConfig fields this family reads beyond EVERY_FAMILY_READS


EVERY_FAMILY_READS = ("arch", "vocab_size", "block_size", "d_model", "n_layers", "dropout", "init", "init_std")
_GAM_READS = ("mix_dropout", "memory_slots", "conv_kernel")  # the ablations without one pathway drop its field

REGISTRY: dict[str, ArchSpec] = {
    "gam": ArchSpec("gam", lambda c: GAM(c, "gated"), "GAM: gated local conv + global memory (paper)", {}, _GAM_READS),
    "gam-sum": ArchSpec("gam", lambda c: GAM(c, "sum"), "GAM ablation: local + global, no gate", {}, _GAM_READS),
    "gam-global-only": ArchSpec("gam", lambda c: GAM(c, "global"), "GAM ablation: memory only", {},
                                ("mix_dropout", "memory_slots")),
    "gam-local-only": ArchSpec("gam", lambda c: GAM(c, "local"), "GAM ablation: causal conv only", {},
                               ("mix_dropout", "conv_kernel")),
    "gam-assoc": ArchSpec("gam-assoc", GAMAssoc, "GAM-Assoc (beyond the paper): GAM's gated local + global "
                          "pathways, the global one a causal delta-rule associative memory read by content",
                          {"assoc_conv": (0, 4)}, ("mix_dropout", "conv_kernel", "n_heads", "assoc_conv")),
    "transformer": ArchSpec("transformer", Transformer, "GPT-style pre-LN Transformer",
                            {"attention": ("naive", "sdpa")}, ("n_heads", "attention")),
    "mamba": ArchSpec("mamba", Mamba, "Mamba selective SSM", {"stack": ("paper", "standard")},
                      ("stack", "d_state", "d_conv", "expand", "scan")),
}


def unread_fields(arch: str) -> frozenset[str]:
    """The ModelConfig fields `arch` never reads: whatever their values, its runs are the same, so a
    resume and the paper tables' read-back ignore them (sweep run names: config.LEFT_OUT_WHERE_UNREAD).
    An unknown arch reads everything (the config check names it)."""
    spec = REGISTRY.get(arch)
    if spec is None:
        return frozenset()
    return frozenset(f.name for f in fields(ModelConfig)) - set(EVERY_FAMILY_READS) - set(spec.reads)


def read_fields_only(model: dict, arch: str) -> dict:
    """A to_dict(ModelConfig) (or a recorded one) less the fields `arch` never reads."""
    unread = unread_fields(arch)
    return {k: v for k, v in model.items() if k not in unread}


def build_model(cfg: ModelConfig, seed: int = 0, materialize: bool = True) -> LMHeadModel:
    """The model, built on the meta device (no memory, no random draws), then materialized on the CPU
    and initialised from `seed` (`LMHeadModel.init_weights`). materialize=False returns it on the
    meta device, for an engine that materializes it one unit at a time, sharded (deferred init)."""
    if cfg.arch not in REGISTRY:
        raise ValueError(f"unknown model.arch {cfg.arch!r}; choose one of {sorted(REGISTRY)}")
    with torch.device("meta"):
        model = REGISTRY[cfg.arch].build(cfg)
    if materialize:
        model.to_empty(device="cpu")
        model.init_weights(seed)
    return model


def variant_configs(base: ModelConfig) -> list[tuple[str, ModelConfig]]:
    """Every registered architecture and sub-variant, as (label, config) pairs."""
    out = []
    for arch, spec in REGISTRY.items():
        if not spec.options:
            out.append((arch, replace(base, arch=arch)))
        for field, values in spec.options.items():
            for value in values:
                out.append((f"{arch} ({field}={value})", replace(base, arch=arch, **{field: value})))
    return out


__all__ = ["REGISTRY", "ArchSpec", "LMHeadModel", "ModelConfig", "build_model", "read_fields_only", "unread_fields",
           "variant_configs"]
