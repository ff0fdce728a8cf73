"""Corpus -> tokenizer -> WebDataset shards + manifest (prep) -> batches (shards).

`prep.run_prep` writes a shard directory from a Source; `shards.ShardSet` opens one;
`shards.ShardLoader` serves training batches with an exact resume; `shards.validation_batches`
reads a split in full.
"""
from .prep import PrepConfig, PrepError, run_prep, verify
from .shards import ShardLoader, ShardSet, validation_batches
from .sources import Source, SourceError, SourceSpec
from .tokenizer import SPECIAL_TOKENS, load_tokenizer, train_bpe

__all__ = [
    "PrepConfig", "PrepError", "run_prep", "verify", "ShardLoader", "ShardSet", "validation_batches", "Source",
    "SourceError", "SourceSpec", "SPECIAL_TOKENS", "load_tokenizer", "train_bpe",
]
