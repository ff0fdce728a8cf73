"""Corpora the project can read without a network: the embedded Shakespeare works."""
from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path
from typing import Iterator

EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "corpus"
CORPORA = {"embedded": EMBEDDED_DIR}
SPLITS = ("train", "validation")


def _split_file(corpus: str, split: str) -> Path:
    if corpus not in CORPORA:
        raise FileNotFoundError(f"unknown corpus {corpus!r}; available: {', '.join(CORPORA)}")
    if split not in SPLITS:
        raise FileNotFoundError(f"corpus {corpus!r} has no split {split!r}; splits: {', '.join(SPLITS)}")
    path = CORPORA[corpus] / f"{split}.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"corpus file missing: {path} (is the package installed from a full checkout?)")
    return path


def read_documents(corpus: str, split: str) -> Iterator[str]:
    """Yields each document's text, in the file's (fixed) order."""
    with gzip.open(_split_file(corpus, split), "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def corpus_fingerprint(corpus: str) -> str:
    h = hashlib.sha256()
    for split in SPLITS:
        h.update(_split_file(corpus, split).read_bytes())
    return h.hexdigest()
