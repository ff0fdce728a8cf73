"""Corpus -> tokenizer -> token arrays -> batches.

`prepare_corpus` turns a corpus into a cached, fingerprinted directory of token arrays plus the
tokenizer that made them; `BlockLoader` serves training batches from it with a resumable position.
"""
from .corpus import CORPORA, read_documents
from .loader import BlockLoader, validation_batches
from .prepared import PreparedData, prepare_corpus
from .tokenizer import SPECIAL_TOKENS, load_tokenizer, train_bpe

__all__ = [
    "CORPORA", "read_documents", "BlockLoader", "validation_batches", "PreparedData", "prepare_corpus",
    "SPECIAL_TOKENS", "load_tokenizer", "train_bpe",
]
