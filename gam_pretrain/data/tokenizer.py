"""BPE tokenizers trained with Hugging Face `tokenizers`.

- `bpe-whitespace`: the paper's choice: split on whitespace and punctuation, then BPE. Decoding
  cannot restore the original spacing (words come back separated by single spaces).
- `bpe-bytelevel`: GPT-2 style byte-level BPE; never produces <unk> and decodes text exactly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Literal

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<unk>", "<pad>", "<eos>"]
TokenizerKind = Literal["bpe-whitespace", "bpe-bytelevel"]


def train_bpe(texts: Iterable[str], vocab_size: int, kind: TokenizerKind) -> Tokenizer:
    if kind == "bpe-whitespace":
        tok = Tokenizer(models.BPE(unk_token="<unk>", end_of_word_suffix="</w>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.decoder = decoders.BPEDecoder(suffix="</w>")
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, end_of_word_suffix="</w>", show_progress=False
        )
    elif kind == "bpe-bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


EOS_CANDIDATES = ("<eos>", "<|endoftext|>", "</s>")


def eos_id(tokenizer: Tokenizer) -> int | None:
    """The document separator: the first of EOS_CANDIDATES the vocabulary has."""
    for token in EOS_CANDIDATES:
        if (i := tokenizer.token_to_id(token)) is not None:
            return i
    return None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A `tokenizers` JSON file, or a directory with a GPT-2 style byte-level BPE (vocab.json + merges.txt)."""
    path = Path(path)
    if path.is_dir() and (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        tok = Tokenizer(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return tok
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer not found: {path} (a tokenizer.json, or a folder with vocab.json + merges.txt)")
    return Tokenizer.from_file(str(path))
