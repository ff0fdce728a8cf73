"""Tokenized corpora cached on disk: tokenizer.json + <split>.bin (flat token ids) + meta.json.

The directory name is a fingerprint of everything that determines its bytes (corpus bytes,
tokenizer kind, vocab size), so a second run with the same settings reuses it and a change makes
a new one. It is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .corpus import SPLITS, corpus_fingerprint, read_documents
from .tokenizer import TokenizerKind, load_tokenizer, train_bpe

FORMAT_VERSION = 1


@dataclass
class PreparedData:
    path: Path
    meta: dict

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def tokens(self, split: str) -> np.ndarray:
        return np.memmap(self.path / f"{split}.bin", dtype=np.dtype(self.meta["dtype"]), mode="r")

    def tokenizer(self):
        return load_tokenizer(self.path / "tokenizer.json")

    @classmethod
    def open(cls, path: str | Path) -> "PreparedData":
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"not a prepared data directory (no meta.json): {path}")
        return cls(path, json.loads(meta_file.read_text()))


def _encode_documents(tokenizer, docs, eos_id: int) -> list[int]:
    ids: list[int] = []
    for doc in docs:
        lines = doc.splitlines(keepends=True)
        for enc in tokenizer.encode_batch(lines, add_special_tokens=False):
            ids.extend(enc.ids)
        ids.append(eos_id)  # document separator
    return ids


def prepare_corpus(corpus: str, tokenizer_kind: TokenizerKind, vocab_size: int, cache_dir: str | Path,
                   log=print) -> PreparedData:
    key = json.dumps(
        {"corpus": corpus_fingerprint(corpus), "tokenizer": tokenizer_kind, "vocab": vocab_size, "v": FORMAT_VERSION},
        sort_keys=True,
    )
    fingerprint = hashlib.sha256(key.encode()).hexdigest()
    final = Path(cache_dir) / f"{corpus}-{tokenizer_kind}-{vocab_size}-{fingerprint[:12]}"
    if (final / "meta.json").is_file():
        return PreparedData.open(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        log(f"training {tokenizer_kind} tokenizer (vocab {vocab_size}) on {corpus}/train ...")
        tokenizer = train_bpe(read_documents(corpus, "train"), vocab_size, tokenizer_kind)
        tokenizer.save(str(tmp / "tokenizer.json"))
        actual_vocab = tokenizer.get_vocab_size()
        dtype = np.uint16 if actual_vocab <= np.iinfo(np.uint16).max + 1 else np.int32
        counts = {}
        for split in SPLITS:
            ids = np.asarray(_encode_documents(tokenizer, read_documents(corpus, split), tokenizer.token_to_id("<eos>")),
                             dtype=dtype)
            ids.tofile(tmp / f"{split}.bin")
            counts[split] = int(ids.size)
            log(f"  {split}: {ids.size:,} tokens")
        meta = {"format_version": FORMAT_VERSION, "corpus": corpus, "tokenizer": tokenizer_kind,
                "vocab_size": actual_vocab, "dtype": np.dtype(dtype).name, "tokens": counts,
                "fingerprint": fingerprint}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        os.replace(tmp, final) if not final.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PreparedData.open(final)
