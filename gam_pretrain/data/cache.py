"""The training side of data: open a shard directory, or prep a recipe into a cache on first use,
and refuse data that does not fit the model."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from .prep import run_prep
from .shards import ShardSet


class DataMismatchError(ValueError):
    """The prepared data does not fit the model config (vocabulary, block size)."""


def check_fits(data: ShardSet, vocab_size: int, block_size: int) -> None:
    if data.vocab_size > vocab_size:
        raise DataMismatchError(
            f"the tokenizer of {data.path} has {data.vocab_size} tokens but model.vocab_size is {vocab_size}; "
            f"set model.vocab_size={data.vocab_size} (or larger)"
        )
    if data.block_size != block_size:
        raise DataMismatchError(
            f"the shards in {data.path} are packed for block_size {data.block_size} but model.block_size is "
            f"{block_size}; set model.block_size={data.block_size} or prep again with --block-size {block_size}"
        )


def open_training_data(data_cfg, model_cfg, log=print) -> ShardSet:
    if data_cfg.dir:
        data = ShardSet(data_cfg.dir)
    else:
        from data_prep import load_recipe

        recipe = load_recipe(data_cfg.recipe)
        prep_cfg = dataclasses.replace(recipe, block_size=model_cfg.block_size, vocab_size=model_cfg.vocab_size,
                                       tokenizer=data_cfg.tokenizer or recipe.tokenizer)
        key = hashlib.sha256(json.dumps(dataclasses.asdict(prep_cfg), sort_keys=True).encode()).hexdigest()[:12]
        out = Path(data_cfg.cache_dir) / f"{data_cfg.recipe}-{key}"
        if not (out / "manifest.json").is_file():
            run_prep(prep_cfg, out, workers=data_cfg.prep_workers, log=log, progress=False)
        data = ShardSet(out)
    check_fits(data, model_cfg.vocab_size, model_cfg.block_size)
    return data
