"""Where documents come from: the embedded corpus, local files, or any Hugging Face dataset.

A Source yields the documents (strings) of one split in a fixed order and can start at any
document index, so the prep's work units ("documents [a, b) of split s") can be processed by any
worker, in any order, with the same result.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import gzip
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterator, Literal

from ..files import first_line
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
    exclude: dict[str, list[str]] = field(default_factory=dict)  # files: split -> globs of files its globs match but it leaves out
    missing_hint: str = ""  # files: appended to the error when a glob matches nothing (how to install the corpus)


def spec_identity(spec: SourceSpec) -> dict:
    """What the documents depend on: the spec, less the install hint, and less `exclude` when empty
    (the value every source had before the field existed, so older fingerprints stay valid)."""
    identity = dataclasses.asdict(spec)
    del identity["missing_hint"]
    if not identity["exclude"]:
        del identity["exclude"]
    return identity


@functools.lru_cache(maxsize=4)
def _embedded_documents(split: str) -> list[str]:
    """The embedded corpus is small (5 MB): parse a split once per process, not once per work unit."""
    path = EMBEDDED_DIR / f"{split}.jsonl.gz"
    if not path.is_file():
        raise SourceError(f"the embedded corpus has no split {split!r} (splits: train, validation)")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def _flat(values) -> list:
    return [v for value in values for v in (value if isinstance(value, (list, tuple)) else [value])]


def _text(value, where: str, field_: str) -> str:
    if not isinstance(value, str):
        try:
            shown = json.dumps(value)[:40]  # as the JSONL file writes it (null, 5, [...])
        except TypeError:  # bytes and other values JSON has no word for
            shown = repr(value)[:40]
        raise SourceError(f"{where}: field {field_!r} is {shown} ({type(value).__name__}), not text")
    return value


MIN_UNITS = 64


def _cut_in_bytes(data: bytes, at: int) -> int:
    """The first position after a newline at or past `at` (len(data) when there is none)."""
    found = data.find(b"\n", max(at - 1, 0))
    return len(data) if found < 0 else found + 1


def _cut_in_file(path: Path, at: int) -> int:
    try:
        with open(path, "rb") as f:
            f.seek(max(at - 1, 0))
            skipped = f.readline()
            return max(at - 1, 0) + len(skipped)
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e.strerror or e}") from None


PART_LINES = 4096  # lines of a one-document text read at once


def _line_parts(f, lines: int | None) -> Iterator[tuple[str, bool]]:
    """A text stream in parts of `lines` lines (None: whole), each with True when it is the last;
    an empty stream is one empty part (the empty document it is)."""
    if lines is None:
        yield f.read(), True
        return
    part = "".join(islice(f, lines))
    while True:
        following = "".join(islice(f, lines))
        yield part, not following
        if not following:
            return
        part = following


class _ByteRange(io.RawIOBase):
    """Bytes [position, position + length) of an open binary file (length -1: to its end)."""

    def __init__(self, f, length: int):
        self.f, self.left = f, length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer)
        if self.left >= 0:
            view = view[:self.left]
        n = self.f.readinto(view) if len(view) else 0
        if self.left >= 0:
            self.left -= n
        return n


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
                hint = f"; {self.spec.missing_hint}" if self.spec.missing_hint else ""
                raise SourceError(f"split {split!r}: no file matches {pattern!r}{hint}")
            files.extend(Path(m) for m in matched)
        left_out = {os.path.realpath(m) for pattern in self.spec.exclude.get(split, [])
                    for m in glob.glob(os.path.expanduser(pattern), recursive=True)}
        kept = [f for f in files if os.path.realpath(f) not in left_out]
        if not kept:
            raise SourceError(f"split {split!r}: every file its globs match is excluded")
        return kept

    def _file_documents(self, path: Path) -> Iterator[str]:
        name = path.name.removesuffix(".gz")
        opener = gzip.open if path.name.endswith(".gz") else open
        try:
            if name.endswith(".parquet"):
                yield from self._parquet_documents(path)
            else:
                with opener(path, "rt", encoding="utf-8", errors="replace") as f:
                    yield from self._text_documents(f, path)
        except (OSError, EOFError) as e:
            raise SourceError(f"cannot read {path}: {e}") from None

    def _text_documents(self, f, path: Path, where: str = "") -> Iterator[str]:
        """The documents of an open text stream of a JSONL or text file (`where`: which bytes of it)."""
        if path.name.removesuffix(".gz").endswith((".jsonl", ".json")):
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield self._jsonl_text(line, f"{path}{where}:{lineno}")
        elif self.spec.txt_documents == "lines":
            yield from (line.rstrip("\n") for line in f if line.strip())
        else:
            yield f.read()

    def _jsonl_text(self, line: str, where: str) -> str:
        """The text field of one JSONL line; `where` is file:line."""
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise SourceError(f"{where}: not valid JSON ({e.msg} at character {e.pos + 1}); each line must be one "
                              "JSON object (JSON Lines)") from None
        if not isinstance(record, dict):
            raise SourceError(f"{where}: a JSON {type(record).__name__}, not an object with a "
                              f"{self.spec.text_field!r} field (JSON Lines)")
        if self.spec.text_field not in record:
            raise SourceError(f"{where}: no field {self.spec.text_field!r} (fields: {', '.join(record)}); "
                              "set prep.source.text_field")
        return _text(record[self.spec.text_field], where, self.spec.text_field)

    def _parquet_documents(self, path: Path) -> Iterator[str]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        field_ = self.spec.text_field
        try:
            columns = pq.read_schema(path).names
            if field_ not in columns:
                raise SourceError(f"{path}: no column {field_!r} (columns: {', '.join(columns)}); "
                                  "set prep.source.text_field")
            texts = pq.read_table(path, columns=[field_]).column(field_).to_pylist()
        except pa.ArrowException as e:
            raise SourceError(f"cannot read {path} as parquet: {e}") from None
        for row, text in enumerate(texts):
            yield _text(text, f"{path}: row {row}", field_)

    def _files(self, split, start, stop):
        docs = (d for path in self._split_files(split) for d in self._file_documents(path))
        return islice(docs, start, stop)

    def _hf_name(self) -> str:
        files = f" from {', '.join(map(str, _flat(self.spec.data_files.values())))}" if self.spec.data_files else ""
        return f"dataset {self.spec.path!r}" + (f" (config {self.spec.name})" if self.spec.name else "") + files

    def _hf_dataset(self, split):
        import datasets

        expr = self.spec.splits.get(split)
        if expr is None:
            raise SourceError(f"no dataset split configured for {split!r}; configured: {', '.join(self.spec.splits)}")
        try:
            return datasets.load_dataset(self.spec.path, self.spec.name, split=expr, streaming=self.spec.streaming,
                                         data_files=self.spec.data_files, revision=self.spec.revision)
        except ConnectionError as e:  # datasets' "Couldn't reach ... on the Hub", offline mode included
            raise SourceError(f"cannot load {self._hf_name()}: the Hugging Face Hub could not be reached and it is not "
                              f"in the local cache ({first_line(e)}); run once with network access, or unset "
                              "HF_DATASETS_OFFLINE / HF_HUB_OFFLINE") from None
        except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
            raise SourceError(f"cannot load {self._hf_name()}, split {expr!r}: {first_line(e)}") from None
        except datasets.exceptions.DatasetGenerationError as e:  # a garbled file: the cause says what is wrong
            raise SourceError(f"cannot read {self._hf_name()}: {first_line(e.__cause__ or e)}") from None

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
                raise SourceError(f"{self._hf_name()} has no column {field_!r} (columns: {', '.join(ds.column_names)}); "
                                  "set prep.source.text_field")
            stop = len(ds) if stop is None else min(stop, len(ds))
            rows = (ds[i] for i in range(start, stop)) if start < stop else iter(())
        try:
            for index, row in enumerate(rows, start):
                if field_ not in row:
                    raise SourceError(f"{self._hf_name()}, row {index}: no column {field_!r} (columns: "
                                      f"{', '.join(row)}); set prep.source.text_field")
                yield _text(row[field_], f"{self._hf_name()}, row {index}", field_)
        except SourceError:
            raise
        except ValueError as e:  # streaming reads lazily: a garbled file shows up here (pyarrow raises ValueErrors)
            raise SourceError(f"cannot read {self._hf_name()}: {first_line(e)}") from None

    # ---- work units by bytes ------------------------------------------------------------------
    def byte_units(self, split: str, unit_bytes: int) -> list[list[list]]:
        """The split cut into work units of about `unit_bytes` of text (less for a corpus of fewer than
        MIN_UNITS units), for embedded and files sources.

        A unit is a list of pieces [item, start, end]: bytes [start, end) of one item (a file's path,
        or an embedded document's index), end -1 for the rest of it. Small items are grouped; a large
        one is cut, each cut just after a newline (found by seeking), so every cut is a document
        boundary in JSONL and line-per-document text, and a line boundary inside a one-document file
        (the tokenizer is given a document line by line: a cut there changes no token). Compressed
        (.gz) and parquet files cannot be cut without reading them whole: each is whole in a unit.
        """
        items = list(self._unit_items(split))
        # a corpus of less than 64 units' bytes is cut into 64 smaller units (1 MiB at least), so that
        # the last units do not leave workers idle; the cut depends on the corpus alone, never on
        # the number of workers
        unit_bytes = max(min(unit_bytes, sum(size for _, size, _ in items) // MIN_UNITS), min(unit_bytes, 1 << 20))
        units: list[list[list]] = []
        current: list[list] = []
        filled = 0

        def close():
            nonlocal current, filled
            if current:
                units.append(current)
            current, filled = [], 0

        for item, size, cut_after_newline in items:
            start = 0
            while size - start > unit_bytes - filled and cut_after_newline is not None:
                cut = cut_after_newline(start + unit_bytes - filled)
                if cut >= size:
                    break
                current.append([item, start, cut])
                close()
                start = cut
            if start < size or not size:
                current.append([item, start, -1])
                filled += size - start
            if filled >= unit_bytes:
                close()
        close()
        return units

    def _unit_items(self, split: str):
        """(item, bytes, cut finder or None) per item of the split, in the source's order."""
        if self.spec.kind == "embedded":
            for index, doc in enumerate(_embedded_documents(split)):
                data = doc.encode()
                yield index, len(data), functools.partial(_cut_in_bytes, data)
            return
        if self.spec.kind != "files":
            raise SourceError("work units by bytes need an embedded or files source; set prep.documents_per_unit")
        for path in self._split_files(split):
            whole = path.name.endswith((".gz", ".parquet"))
            try:
                size = path.stat().st_size
            except OSError as e:
                raise SourceError(f"cannot read {path}: {e.strerror or e}") from None
            yield str(path), size, None if whole else functools.partial(_cut_in_file, path)

    def piece_documents(self, split: str, piece: list, whole: bool = False) -> Iterator[tuple[str, bool]]:
        """The text of one piece of a unit as (text, ends a document) pairs, in order. Read as a
        stream: a one-document text comes in parts of PART_LINES lines (cut after a newline: prep
        encodes text line by line, so the cut changes no token), so a worker holds one part, never
        a whole piece or file; `whole`: the piece's text at once (what tokenizer training reads)."""
        item, start, end = piece
        if self.spec.kind == "embedded":
            data = _embedded_documents(split)[item].encode()
            yield data[start:None if end < 0 else end].decode(), end < 0
            return
        path = Path(item)
        if path.name.removesuffix(".gz").endswith(".parquet"):
            for doc in self._file_documents(path):
                yield doc, True
            return
        try:
            with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as f:
                f.seek(start)
                # decoded as the whole file is (universal newlines, replacement characters)
                text = io.TextIOWrapper(io.BufferedReader(_ByteRange(f, end - start if end >= 0 else -1)),
                                        encoding="utf-8", errors="replace")
                where = f" (from byte {start}), line" if start or end >= 0 else ""
                if path.name.removesuffix(".gz").endswith((".jsonl", ".json")) or self.spec.txt_documents == "lines":
                    for doc in self._text_documents(text, path, where):
                        yield doc, True
                    return
                for part, last in _line_parts(text, None if whole else PART_LINES):
                    yield part, last and end < 0
        except (OSError, EOFError) as e:
            raise SourceError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None

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
        h = hashlib.sha256(json.dumps(spec_identity(self.spec), sort_keys=True, default=str).encode())
        for split in splits:
            if self.spec.kind == "embedded":
                h.update((EMBEDDED_DIR / f"{split}.jsonl.gz").read_bytes())
            elif self.spec.kind == "files":
                for path in self._split_files(split):
                    h.update(path.name.encode())
                    with open(path, "rb") as f:  # in blocks: a corpus file can be larger than memory
                        while block := f.read(1 << 20):
                            h.update(block)
            elif not self.spec.streaming:
                h.update(self._hf_dataset(split)._fingerprint.encode())
        return h.hexdigest()
