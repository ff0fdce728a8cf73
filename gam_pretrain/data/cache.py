"""The training side of data: open a shard directory or a recipe's prep in the cache (prepping it
only when asked), and refuse data that does not fit the model."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
from pathlib import Path

from .prep import PrepConfig, is_trained, prep_identity, run_prep, tokenizer_file_sha256
from .recipes import load_recipe
from .shards import ShardSet


class DataMissingError(FileNotFoundError):
    """The run's recipe has not been prepared, and data.prep_if_missing is off."""


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
            f"{block_size}; set model.block_size={data.block_size} or prep again with --prep.block_size {block_size}"
        )


def check_prepped_as_asked(data: ShardSet, data_cfg) -> None:
    """A folder given as data.dir must have been prepped as the run's data settings say (its packing,
    the splits its tokenizer learned from, a tokenizer kind the run names): the paper's recipe on a
    separators prep, say, would otherwise train silently on the wrong chunks."""
    prep = data.manifest.get("prep") or {}
    pairs = [("packing", prep.get("packing", "separators"), data_cfg.packing),
             ("tokenizer_splits", prep.get("tokenizer_splits", ["train"]), list(data_cfg.tokenizer_splits))]
    if is_trained(PrepConfig(tokenizer=data_cfg.tokenizer)):
        pairs.append(("tokenizer", prep.get("tokenizer"), data_cfg.tokenizer))
    for key, recorded, wanted in pairs:
        if recorded != wanted:
            raise DataMismatchError(f"{data.path} was prepped with prep.{key}={recorded!r} but the run has "
                                    f"data.{key}={wanted!r}; set data.{key} to match, or prep the data again with "
                                    f"--prep.{key} {json.dumps(wanted) if isinstance(wanted, list) else wanted}")


TRAINING_SPLITS = ("train", "validation")  # training reads train and always ends with an eval on validation


def check_training_splits(data: ShardSet) -> None:
    """Refuses data without a non-empty train and validation split, or with a damaged validation
    shard, before any compute is spent (train shards are checked as they are read)."""
    splits = data.manifest["splits"]
    for split in TRAINING_SPLITS:
        if not splits.get(split, {}).get("samples"):
            have = ", ".join(f"{name} ({info.get('samples', 0)} samples)" for name, info in splits.items()) or "none"
            lack = f"no samples in its {split!r} split" if split in splits else f"no {split!r} split"
            raise DataMismatchError(f"{data.path} has {lack} (splits: {have}); training reads train and ends with "
                                    "an eval on validation: prep both (--prep.splits '[train, validation]')")
    for shard in data.shards("validation"):  # read (hashed, ids checked) now, not first at the final eval
        data.read(shard)


def recipe_prep(data_cfg, model_cfg) -> tuple[PrepConfig, Path]:
    """The prep config a run's recipe implies (the run's block size and vocabulary), and the folder
    in data.cache_dir that holds it: one folder per distinct prep config (and tokenizer file content)."""
    recipe = load_recipe(data_cfg.recipe)
    prep_cfg = dataclasses.replace(recipe, block_size=model_cfg.block_size, vocab_size=model_cfg.vocab_size,
                                   tokenizer=data_cfg.tokenizer or recipe.tokenizer, packing=data_cfg.packing,
                                   tokenizer_splits=list(data_cfg.tokenizer_splits))
    identity = prep_identity(prep_cfg)
    if not is_trained(prep_cfg) and Path(prep_cfg.tokenizer).exists():  # a missing one is named by the prep
        identity["tokenizer_file_sha256"] = tokenizer_file_sha256(Path(prep_cfg.tokenizer))
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return prep_cfg, Path(data_cfg.cache_dir) / f"{data_cfg.recipe}-{key}"


def prep_command(recipe: str, prep_cfg: PrepConfig, out: Path) -> str:
    """The `gam-pretrain prep` command line that writes `prep_cfg` for `recipe` into `out`."""
    base = load_recipe(recipe)
    changed = [f"--prep.{name} {shlex.quote(json.dumps(value) if isinstance(value, list) else str(value))}"
               for name in ("tokenizer", "vocab_size", "block_size", "packing", "tokenizer_splits")
               if (value := getattr(prep_cfg, name)) != getattr(base, name)]
    return " ".join(["gam-pretrain prep", recipe, "--out", shlex.quote(str(out)), *changed])


def check_data_available(data_cfg, model_cfg) -> None:
    """Raises DataMissingError, naming the prep command, when the run's recipe is neither prepared
    nor to be prepped here (data.prep_if_missing). Cheap: every rank can call it."""
    if data_cfg.dir or data_cfg.mixture or data_cfg.prep_if_missing:
        return
    prep_cfg, out = recipe_prep(data_cfg, model_cfg)
    if not (out / "manifest.json").is_file():
        raise DataMissingError(
            f"no prepared data for recipe {data_cfg.recipe!r} in {out}; prepare it first with "
            f"`{prep_command(data_cfg.recipe, prep_cfg, out)}` (or set data.prep_if_missing=true "
            f"to prep in this process, or data.dir to a prepared folder)")


def open_mixture_sources(data_cfg) -> dict[str, ShardSet]:
    """data.mixture's shard sets, each checked as data.dir is (prepped as the run's data.* ask)."""
    from .mixture import check_compatible

    sources = {}
    for location in data_cfg.mixture:
        sources[location] = ShardSet(location)
        check_prepped_as_asked(sources[location], data_cfg)
    check_compatible(sources)
    return sources


def open_training_data(data_cfg, model_cfg, log=print) -> ShardSet:
    """data.dir, or the recipe's prep in data.cache_dir. A missing prep runs here only with
    data.prep_if_missing (the quickstart sets it): a cluster job never starts an hours-long prep
    on rank 0 by surprise."""
    if data_cfg.mixture:  # the first source stands for the mixture here (they share tokenizer and block size)
        sources = open_mixture_sources(data_cfg)
        data = sources[next(iter(sources))]
    elif data_cfg.dir:
        data = ShardSet(data_cfg.dir)
        check_prepped_as_asked(data, data_cfg)
    else:
        check_data_available(data_cfg, model_cfg)
        prep_cfg, out = recipe_prep(data_cfg, model_cfg)
        if not (out / "manifest.json").is_file():
            run_prep(prep_cfg, out, workers=data_cfg.prep_workers, log=log, progress=False)
        data = ShardSet(out)
    check_training_splits(data)
    check_fits(data, model_cfg.vocab_size, model_cfg.block_size)
    return data
