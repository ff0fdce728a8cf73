"""BPE tokenizers trained with Hugging Face `tokenizers`.

- `bpe-whitespace`: the paper's tokenizer (github.com/rishiraj/gam, benchmark.py): split on
  whitespace and punctuation, then BPE with no end-of-word suffix. Decoding cannot restore the
  original spacing: tokens come back separated by single spaces, also inside a word split into
  several tokens.
- `bpe-paper`: the paper's tokenizer exactly, special tokens included: `bpe-whitespace` with
  [UNK] [PAD] [SOS] [EOS] (ids 0-3) and [UNK] for unknown characters.
- `bpe-bytelevel`: GPT-2 style byte-level BPE; never produces <unk> and decodes text exactly.

Training is deterministic: the same texts give the same tokenizer.json in every process. That is
why neither kind has an end-of-word suffix or a continuing-subword prefix: `tokenizers` numbers
such affixed tokens in hash-map order, which differs per process, and breaks ties between equally
frequent merges by token id, so the ids and even the merges would differ between two runs
(huggingface/tokenizers#1794). Without affixes every initial token is a character of the sorted
alphabet, and ties break the same way every time.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Literal

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..files import first_line

SPECIAL_TOKENS = ["<unk>", "<pad>", "<eos>"]
PAPER_SPECIAL_TOKENS = ["[UNK]", "[PAD]", "[SOS]", "[EOS]"]  # github.com/rishiraj/gam benchmark.py
TokenizerKind = Literal["bpe-whitespace", "bpe-bytelevel", "bpe-paper"]


def train_bpe(texts: Iterable[str], vocab_size: int, kind: TokenizerKind) -> Tokenizer:
    if kind in ("bpe-whitespace", "bpe-paper"):
        specials = PAPER_SPECIAL_TOKENS if kind == "bpe-paper" else SPECIAL_TOKENS
        tok = Tokenizer(models.BPE(unk_token=specials[0]))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
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


EOS_CANDIDATES = ("<eos>", "<|endoftext|>", "</s>", "[EOS]")


def eos_id(tokenizer: Tokenizer) -> int | None:
    """The document separator: the first of EOS_CANDIDATES the vocabulary has."""
    for token in EOS_CANDIDATES:
        if (i := tokenizer.token_to_id(token)) is not None:
            return i
    return None


def tokenizer_from_bytes(data: bytes, path: str | Path) -> Tokenizer:
    """A tokenizers JSON document; garbled bytes raise one line naming `path`."""
    try:
        return Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions
        raise ValueError(f"{path} is not a tokenizers JSON file (truncated or garbled?): {first_line(e)}") from None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A `tokenizers` JSON file, or a directory with a GPT-2 style byte-level BPE (vocab.json + merges.txt)."""
    path = Path(path)
    if path.is_dir() and (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        try:
            tok = Tokenizer(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions
            raise ValueError(f"{path}: vocab.json + merges.txt do not load as a BPE: {first_line(e)}") from None
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return tok
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer not found: {path} (a tokenizer.json, or a folder with vocab.json + merges.txt)")
    return tokenizer_from_bytes(path.read_bytes(), path)
