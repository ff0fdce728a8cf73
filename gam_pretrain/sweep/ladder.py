"""Model-size ladders: one rule turns a width into a full config for each family.

The rule (also in the README):
- width d (d_model) picks the rung; depth L = max(2, d / 64) (aspect ratio d / L = 64 from 128 up);
- Transformer: heads = max(1, d / 64) (head size 64 from 64 up), SDPA attention;
- GAM: the same L; 512 memory slots per layer (the paper's value at every size), conv kernel 3;
- GAM-Assoc (beyond the paper): GAM's L and conv, and the Transformer's heads (head size 64 from 64
  up) as its delta-rule memory heads (each a 64 x 64 state);
- Mamba: 2L blocks of the standard (residual, pre-norm) stack, expand 2, d_state 16, d_conv 4 -
  a Mamba block holds about half the parameters of a Transformer block, as in mamba-ssm's ladders.
Parameters are counted on the meta device (nothing allocated) and FLOPs per token come from each
family's own matmul count (models/*.py), not 6N.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..models import ModelConfig, build_model
from ..models.common import HEADED_ARCHS

FAMILIES = ("gam", "transformer", "mamba", "gam-assoc")  # each family is also the name of its registry architecture
# widths from ~1M parameters (vocab 10k) to past 1B; smaller ones exist for CPU-scale tests
WIDTHS = [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048]


@dataclass(frozen=True)
class Rung:
    family: str
    width: int
    config: ModelConfig
    params: int
    non_embedding_params: int
    flops_per_token: int

    @property
    def name(self) -> str:
        return f"{self.family}-d{self.width}"


HEAD_SIZE = 64  # the Transformer's heads and gam-assoc's memory heads: width / 64 of them, at least one


def rung_config(family: str, width: int, base: ModelConfig | None = None) -> ModelConfig:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    if width < 8 or width % 8:
        raise ValueError(f"width {width} must be a positive multiple of 8")
    base = base or ModelConfig()
    depth = max(2, width // 64)
    cfg = dataclasses.replace(base, arch=family, d_model=width, n_layers=depth)
    heads = max(1, width // HEAD_SIZE)
    if family in HEADED_ARCHS and width % heads:
        raise ValueError(f"width {width} does not divide into its {heads} heads of about 64 ({family})")
    if family == "transformer":
        cfg = dataclasses.replace(cfg, n_heads=heads, attention="sdpa")
    elif family == "gam-assoc":
        cfg = dataclasses.replace(cfg, n_heads=heads)
    elif family == "mamba":
        cfg = dataclasses.replace(cfg, n_layers=2 * depth, stack="standard", expand=2, d_state=16, d_conv=4)
    return cfg


def measure(family: str, cfg: ModelConfig) -> Rung:
    model = build_model(cfg, materialize=False)
    params = model.num_parameters()
    embedding = sum(p.numel() for name, p in model.named_parameters() if "emb" in name.split(".")[0])
    return Rung(family, cfg.d_model, cfg, params, params - embedding, model.flops_per_token(cfg.block_size))


def ladder(family: str, widths: list[int] | None = None, base: ModelConfig | None = None) -> list[Rung]:
    return [measure(family, rung_config(family, w, base)) for w in (widths or WIDTHS)]
