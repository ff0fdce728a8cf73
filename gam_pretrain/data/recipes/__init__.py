"""Corpus recipes: one module per corpus, each defining RECIPE, a gam_pretrain.data.prep.PrepConfig.

    gam-pretrain prep wikitext2 --out data/wikitext2 --workers 8 --prep.vocab_size 8000
"""
from __future__ import annotations

import copy
import importlib
import pkgutil

from ..prep import PrepConfig


def recipe_names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def load_recipe(name: str) -> PrepConfig:
    """A fresh copy of the recipe's PrepConfig (callers may change it)."""
    if name not in recipe_names():
        raise ValueError(f"unknown data recipe {name!r}; recipes: {', '.join(recipe_names())}")
    return copy.deepcopy(importlib.import_module(f"{__name__}.{name}").RECIPE)
