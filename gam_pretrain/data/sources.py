"""Where documents come from: the embedded corpus, local files, or any Hugging Face dataset.

A Source yields the documents (strings) of one split in a fixed order and can start at any
document index, so the prep's work units ("documents [a, b) of split s") can be processed by any
worker, in any order, with the same result.
"""
from __future__ import annotations

import functools
import glob
import gzip
import hashlib
import json
import os
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterator, Literal

from .corpus import EMBEDDED_DIR


class SourceError(ValueError):
    """A user-caused problem with a corpus source (missing file or split, empty corpus, ...)."""


@dataclass
class SourceSpec:
    """What to read. `kind`: embedded | files | hf.

    - embedded: the Shakespeare corpus shipped in the package (splits train, validation).
    - files: `splits` maps split -> glob(s) of local .txt/.jsonl/.json/.parquet(.gz) files; txt files
      are one document per file unless `txt_documents: lines` (one per non-empty line).
    - hf: `datasets.load_dataset(path, name, split=..., streaming=...)`; `path` may be a Hub name
      (wikitext, roneneldan/TinyStories), a local dataset directory, or a builder (json, parquet, text)
      with `data_files`. `splits` maps our split name -> the dataset's split expression
      (e.g. validation: "train[:5000]").
    """

    kind: Literal["embedded", "files", "hf"] = "embedded"  # embedded | files (local globs) | hf (datasets)
    path: str = ""  # hf: dataset name, local dataset dir, or builder (json, parquet, text)
    name: str | None = None  # hf: dataset config name (wikitext-2-raw-v1)
    splits: dict[str, str | list[str]] = field(default_factory=lambda: {"train": "train", "validation": "validation"})  # our split -> files: a glob or a list of globs; hf: a split expression
    text_field: str = "text"  # the field that holds a document's text (jsonl, parquet, hf)
    streaming: bool = False  # hf: stream instead of downloading the whole dataset
    data_files: dict[str, list[str]] | None = None  # hf builders: split -> files
    revision: str | None = None  # hf: dataset revision (a commit, for reproducibility)
    txt_documents: Literal["file", "lines"] = "file"  # files: a .txt file is one document, or one per non-empty line
    max_documents: dict[str, int] = field(default_factory=dict)  # split -> at most this many documents (TinyStories: 50k / 5k)


@functools.lru_cache(maxsize=4)
def _embedded_documents(split: str) -> list[str]:
    """The embedded corpus is small (5 MB): parse a split once per process, not once per work unit."""
    path = EMBEDDED_DIR / f"{split}.jsonl.gz"
    if not path.is_file():
        raise SourceError(f"the embedded corpus has no split {split!r} (splits: train, validation)")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


class Source:
    def __init__(self, spec: SourceSpec):
        self.spec = spec
        if spec.kind not in ("embedded", "files", "hf"):
            raise SourceError(f"unknown source kind {spec.kind!r}; choose embedded, files or hf")

    # ---- documents -------------------------------------------------------------------------
    def documents(self, split: str, start: int = 0, stop: int | None = None) -> Iterator[str]:
        """Documents [start, stop) of `split`, in the source's fixed order."""
        cap = self.spec.max_documents.get(split)
        if cap is not None:
            stop = cap if stop is None else min(stop, cap)
        if stop is not None and start >= stop:
            return iter(())
        reader = {"embedded": self._embedded, "files": self._files, "hf": self._hf}[self.spec.kind]
        return reader(split, start, stop)

    def _embedded(self, split, start, stop):
        return iter(_embedded_documents(split)[start:stop])

    def _split_files(self, split) -> list[Path]:
        patterns = self.spec.splits.get(split)
        if patterns is None:
            raise SourceError(f"no files configured for split {split!r}; configured: {', '.join(self.spec.splits)}")
        files: list[Path] = []
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            matched = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
            if not matched:
                raise SourceError(f"split {split!r}: no file matches {pattern!r}")
            files.extend(Path(m) for m in matched)
        return files

    def _file_documents(self, path: Path) -> Iterator[str]:
        name = path.name.removesuffix(".gz")
        opener = gzip.open if path.name.endswith(".gz") else open
        try:
            if name.endswith(".parquet"):
                import pyarrow.parquet as pq

                table = pq.read_table(path, columns=[self.spec.text_field])
                yield from table.column(self.spec.text_field).to_pylist()
            elif name.endswith((".jsonl", ".json")):
                with opener(path, "rt", encoding="utf-8", errors="replace") as f:
                    for lineno, line in enumerate(f, 1):
                        if line.strip():
                            record = json.loads(line)
                            if self.spec.text_field not in record:
                                raise SourceError(f"{path}:{lineno}: no field {self.spec.text_field!r} "
                                                  f"(fields: {', '.join(record)}); set the text field")
                            yield record[self.spec.text_field]
            else:
                with opener(path, "rt", encoding="utf-8", errors="replace") as f:
                    if self.spec.txt_documents == "lines":
                        yield from (line.rstrip("\n") for line in f if line.strip())
                    else:
                        yield f.read()
        except (OSError, json.JSONDecodeError, EOFError) as e:
            raise SourceError(f"cannot read {path}: {e}") from None

    def _files(self, split, start, stop):
        docs = (d for path in self._split_files(split) for d in self._file_documents(path))
        return islice(docs, start, stop)

    def _hf_dataset(self, split):
        import datasets

        expr = self.spec.splits.get(split)
        if expr is None:
            raise SourceError(f"no dataset split configured for {split!r}; configured: {', '.join(self.spec.splits)}")
        try:
            return datasets.load_dataset(self.spec.path, self.spec.name, split=expr, streaming=self.spec.streaming,
                                         data_files=self.spec.data_files, revision=self.spec.revision)
        except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
            raise SourceError(f"cannot load dataset {self.spec.path!r} (config {self.spec.name}, split {expr!r}): {e}") from None

    def _hf(self, split, start, stop):
        ds = self._hf_dataset(split)
        field_ = self.spec.text_field
        if self.spec.streaming:
            ds = ds.skip(start)
            if stop is not None:
                ds = ds.take(stop - start)
            rows = iter(ds)
        else:
            if field_ not in ds.column_names:
                raise SourceError(f"dataset has no column {field_!r} (columns: {', '.join(ds.column_names)})")
            stop = len(ds) if stop is None else min(stop, len(ds))
            rows = (ds[i] for i in range(start, stop)) if start < stop else iter(())
        for row in rows:
            yield row[field_]

    # ---- sizes and identity ----------------------------------------------------------------
    def num_documents(self, split: str) -> int | None:
        """Documents in the split, or None when only a full pass can tell (streaming)."""
        cap = self.spec.max_documents.get(split)
        if self.spec.kind == "hf" and not self.spec.streaming:
            n = len(self._hf_dataset(split))
        elif self.spec.kind == "hf":
            return cap
        else:
            n = sum(1 for _ in self.documents(split))
        return n if cap is None else min(n, cap)

    def fingerprint(self, splits: list[str]) -> str:
        """Content hash for local data; dataset fingerprints (or the request, when streaming) for hf."""
        h = hashlib.sha256(json.dumps(self.spec.__dict__, sort_keys=True, default=str).encode())
        for split in splits:
            if self.spec.kind == "embedded":
                h.update((EMBEDDED_DIR / f"{split}.jsonl.gz").read_bytes())
            elif self.spec.kind == "files":
                for path in self._split_files(split):
                    h.update(path.name.encode())
                    h.update(path.read_bytes())
            elif not self.spec.streaming:
                h.update(self._hf_dataset(split)._fingerprint.encode())
        return h.hexdigest()
