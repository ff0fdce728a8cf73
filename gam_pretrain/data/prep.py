"""Data prep: corpus -> tokenizer -> work units -> WebDataset tar shards -> manifest.json.

Layout of an output directory:

    tokenizer.json                 the tokenizer (trained on the train split, or copied in)
    plan.json                      the config and each split's number of work units
    <split>-<unit>-<k>.tar         shards: WebDataset tars of samples_per_shard packed sequences
    .units/<split>-<unit>.json     completion record of one work unit (its shards and their hashes)
    manifest.json                  written last: every shard with samples, tokens and sha256

A work unit is "documents [u*D, (u+1)*D) of one split". Units are independent and deterministic,
so 1 worker or N workers, one run or a killed run finished later, give byte-identical shards.
Each shard is written under a temporary name and renamed when complete; a unit's record is
written after its shards; a unit with a valid record is skipped when prep runs again.

Three phases, run in one process by `run_prep` or as SLURM jobs (`gam-pretrain launch prep`):
plan (once: tokenizer + unit counts), units (any number of tasks, task i takes units i, i+n, ...),
finalize (once: manifest.json from the unit records).

The plan checks everything it can before it writes anything (the config's values, that each split
opens and is not empty, that a tokenizer file loads), so a mistake leaves no trace and the corrected
command runs. Then it records the config in .prep_config.json (with the sha256 of a tokenizer given
as a file); a folder holding prep files of another config, or of a config it cannot establish, is
refused. plan.json records the sha256 of the folder's tokenizer.json, and the later phases refuse a
tokenizer.json that differs from it.

Packing, `packing: separators` (the default): a unit's documents are tokenized, joined with an
<eos> token after each, and cut into windows of block_size + 1 tokens that overlap by one token
(window i starts at i * block_size). The last partial window of each unit is dropped (fewer than
block_size tokens per unit).
`packing: paper` (the paper's code): a split's documents are tokenized and joined WITHOUT separators
into one stream, cut into non-overlapping chunks of block_size + 1 tokens (chunk i starts at
i * (block_size + 1)), and the remainder at the split's end is dropped. The chunks run across the
whole split, so each split is one work unit and one shard (no parallelism within a split; fine at the
paper's corpus sizes), and the loader's shuffle of that one shard is a uniform permutation of all
chunks, as the paper's DataLoader(shuffle=True). Text that was not valid UTF-8 is decoded with U+FFFD replacement
characters; their count is recorded per split in the manifest.
"""
from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import io
import itertools
import json
import math
import multiprocessing
import os
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

from .. import files
from ..files import sha256_file
from .remote import PLAIN_NAME, file_url, is_remote, read_remote
from .sources import Source, SourceSpec, spec_identity
from .tokenizer import EOS_CANDIDATES, eos_id, load_tokenizer, train_bpe

FORMAT = "gam-pretrain-shards"
# 1: one tar member per sample (a 512-byte header and padding to 512 for each: 3-4x the token bytes).
# 2: a member `<split>-<unit>-<k>-<j>.input_ids.npy` holds an (n, block_size + 1) array of up to
#    MEMBER_BYTES; a member is to WebDataset one example, whose rows are the samples.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MEMBER_BYTES = 4 << 20
UNIT_DIR = ".units"
SAMPLE_FIELD = "input_ids.npy"


class PrepError(RuntimeError):
    """Prep cannot go on (empty corpus, full disk, bad tokenizer, ...): one clear message."""


@dataclass
class PrepConfig:
    source: SourceSpec = field(default_factory=SourceSpec)
    splits: list[str] = field(default_factory=lambda: ["train", "validation"])  # splits to write (train first)
    tokenizer: str = "bpe-whitespace"  # bpe-whitespace | bpe-bytelevel | bpe-paper (trained on tokenizer_splits) | path/to/tokenizer.json
    vocab_size: int = 10000  # for a trained tokenizer
    tokenizer_splits: list[str] = field(default_factory=lambda: ["train"])  # splits a trained tokenizer learns from; [all]: every split the source has (the paper's code)
    tokenizer_train_documents: int = 0  # train documents the tokenizer learns from; 0 = the whole train split
    tokenizer_train_bytes: int = 0  # at most this many bytes of text the tokenizer learns from (the first of its splits); 0 = no limit
    block_size: int = 256  # tokens per training sample (each window holds block_size + 1)
    packing: Literal["separators", "paper"] = "separators"  # separators: <eos> after each document, windows overlap by one token; paper: no separators, non-overlapping chunks over the whole split
    unit_bytes: int = 16 << 20  # bytes of text per work unit (the unit of parallelism, memory and resume)
    documents_per_unit: int = 0  # > 0: work units of this many documents instead of unit_bytes; 0 = by bytes (hf sources: 1000)
    samples_per_shard: int = 2048  # samples per tar shard


TRAINED_TOKENIZERS = ("bpe-whitespace", "bpe-bytelevel", "bpe-paper")
PACKINGS = ("separators", "paper")
# fields added after preps were first recorded, with the value every older prep had: left out of a
# prep's recorded identity at that value, so older prep folders and cache keys stay valid
_ADDED_SINCE = {"tokenizer_splits": ["train"], "packing": "separators", "tokenizer_train_bytes": 0}
POSITIVE_KEYS = ("block_size", "unit_bytes", "samples_per_shard")
HF_DOCUMENTS_PER_UNIT = 1000  # an hf source's units when documents_per_unit is 0 (its bytes are not known up front)


def check_prep_config(cfg: PrepConfig) -> None:
    """Refuses values no prep can use, naming the key, before anything is written."""
    for key in POSITIVE_KEYS + (("vocab_size",) if cfg.tokenizer in TRAINED_TOKENIZERS else ()):
        value = getattr(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise PrepError(f"prep.{key} must be a positive integer, got {value!r}")
    for key, zero in (("tokenizer_train_documents", "the whole train split"), ("tokenizer_train_bytes", "no limit"),
                      ("documents_per_unit", "units by bytes")):
        value = getattr(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise PrepError(f"prep.{key} must be 0 ({zero}) or more, got {value!r}")
    if not cfg.splits:
        raise PrepError("prep.splits is empty; name the splits to write (train, validation)")
    if len(set(cfg.splits)) != len(cfg.splits):
        raise PrepError(f"prep.splits names a split twice: {cfg.splits}")
    if not cfg.tokenizer:
        raise PrepError("prep.tokenizer is empty; use bpe-whitespace, bpe-bytelevel, bpe-paper or a path to a tokenizer.json")
    if cfg.packing not in PACKINGS:
        raise PrepError(f"prep.packing must be one of {', '.join(PACKINGS)}, got {cfg.packing!r}")
    if cfg.tokenizer in TRAINED_TOKENIZERS:
        if not cfg.tokenizer_splits or not all(isinstance(x, str) and x for x in cfg.tokenizer_splits):
            raise PrepError(f"prep.tokenizer_splits must name the splits the tokenizer learns from, got {cfg.tokenizer_splits!r}")
        if len(set(cfg.tokenizer_splits)) != len(cfg.tokenizer_splits):
            raise PrepError(f"prep.tokenizer_splits names a split twice: {cfg.tokenizer_splits}")
        if "all" in cfg.tokenizer_splits and cfg.tokenizer_splits != ["all"]:
            raise PrepError(f"prep.tokenizer_splits: [all] stands alone (every split of the source), got {cfg.tokenizer_splits}")


def tokenizer_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65536 else "int32"


def _write_atomic(path: Path, data: bytes) -> None:
    try:
        files.write_atomic(path, data)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise PrepError(f"disk full while writing {path}; free space and run prep again (finished units are kept)") from None
        raise PrepError(f"cannot write {path}: {e.strerror or e}") from None


def read_json(path: Path):
    """A JSON file written by prep; a missing or garbled one raises one line naming it."""
    try:
        return files.read_json(path)
    except (OSError, ValueError) as e:
        raise PrepError(str(e)) from None


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A deterministic tar (fixed mtime, owner and mode: equal content gives equal bytes), ended by
    the two zero blocks and no more: `tarfile` pads an archive to 10 KiB, a few percent of a small
    shard, and readers need no such padding."""
    parts = []
    for name, data in members:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
        parts += [info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"), data, bytes(-len(data) % tarfile.BLOCKSIZE)]
    parts.append(bytes(2 * tarfile.BLOCKSIZE))
    return b"".join(parts)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


# ---- one work unit ------------------------------------------------------------------------------
ENCODE_LINES = 4096  # lines encoded at once: a worker's memory follows this, not a document's size


def _encode(tokenizer, doc: str, dtype) -> Iterator[np.ndarray]:
    # encode_batch_fast (tokenizers >= 0.20): the same ids, without the character offsets
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    lines = doc.splitlines(keepends=True)
    for first in range(0, len(lines), ENCODE_LINES):
        ids: list[int] = []
        for enc in encode(lines[first:first + ENCODE_LINES], add_special_tokens=False):
            ids.extend(enc.ids)
        yield np.asarray(ids, dtype=dtype)


class _ShardWriter:
    """Packs a unit's token stream into samples and writes each shard once its samples are there,
    so a worker holds one shard's tokens, not the unit's.

    Sample i is tokens[i * stride : i * stride + block + 1]: windows that overlap by one token
    (stride = block), or the paper's disjoint chunks (stride = block + 1, one shard per split)."""

    def __init__(self, out_dir: Path, split: str, unit: int, block: int, stride: int, per_shard: int | None, dtype):
        self.out_dir, self.split, self.unit = out_dir, split, unit
        self.block, self.stride, self.per_shard, self.dtype = block, stride, per_shard, dtype
        self.overlap = block + 1 - stride  # tokens a sample shares with the next
        self.pending: list[np.ndarray] = []
        self.held = self.tokens = 0
        self.shards: list[dict] = []

    def add(self, tokens: np.ndarray) -> None:
        self.pending.append(tokens)
        self.held += len(tokens)
        self.tokens += len(tokens)
        while self.per_shard and self.held >= self.per_shard * self.stride + self.overlap:
            held = np.concatenate(self.pending)
            self._write(held, self.per_shard)
            rest = held[self.per_shard * self.stride:].copy()  # a copy: the written shard's tokens are freed
            self.pending, self.held = [rest], len(rest)

    def finish(self) -> list[dict]:
        held = np.concatenate(self.pending) if self.pending else np.zeros(0, self.dtype)
        n = max(0, (len(held) - self.overlap) // self.stride)
        if n:
            self._write(held, n)
        self.pending, self.held = [], 0
        return self.shards

    def _write(self, tokens: np.ndarray, n: int) -> None:
        rows = np.lib.stride_tricks.sliding_window_view(tokens, self.block + 1)[::self.stride][:n]
        per_member = max(1, MEMBER_BYTES // (self.dtype.itemsize * (self.block + 1)))
        k = len(self.shards)
        stem = f"{self.split}-{self.unit:05d}-{k:03d}"
        data = tar_bytes([(f"{stem}-{j:03d}.{SAMPLE_FIELD}", npy_bytes(rows[first:first + per_member]))
                          for j, first in enumerate(range(0, n, per_member))])
        _write_atomic(self.out_dir / f"{stem}.tar", data)
        self.shards.append({"path": f"{stem}.tar", "samples": n, "tokens": n * (self.block + 1),
                            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})


@functools.lru_cache(maxsize=2)
def _cached_tokenizer(path: str):
    tokenizer = load_tokenizer(path)
    # a tokenizer.json may carry padding or truncation settings: pad ids or cut lines have no place
    # in packed text, and padding would depend on which lines are encoded together
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def _finished_record(record_path: Path, out_dir: Path, pieces: str | None) -> dict | None:
    """A unit's record when the unit is complete (record readable, of the bytes the plan now gives
    the unit, every shard there at its size)."""
    try:
        record = read_json(record_path)
        if record.get("format_version") != FORMAT_VERSION:
            return None  # written by an older gam-pretrain: its shards are written again in this format
        if record.get("pieces_sha256") != pieces:
            return None  # planned again over changed files: the unit's bytes are others now
        complete = all((out_dir / s["path"]).is_file() and (out_dir / s["path"]).stat().st_size == s["bytes"]
                       for s in record["shards"])
    except (PrepError, KeyError, TypeError):
        return None  # a garbled record: the unit is done again
    return record if complete else None


def process_unit(cfg: PrepConfig, out_dir: Path, split: str, unit: int) -> dict:
    """Tokenize, pack and write one unit; returns its record. Skips a unit already complete."""
    record_path = out_dir / UNIT_DIR / f"{split}-{unit:05d}.json"
    pieces = unit_pieces(cfg, out_dir, split, unit)
    pieces_sha256 = hashlib.sha256(json.dumps(pieces).encode()).hexdigest() if pieces is not None else None
    if record_path.is_file() and (record := _finished_record(record_path, out_dir, pieces_sha256)) is not None:
        return record
    tokenizer = _cached_tokenizer(str(out_dir / "tokenizer.json"))
    paper = cfg.packing == "paper"
    eos = eos_id(tokenizer)
    if eos is None and not paper:
        raise PrepError(f"the tokenizer has none of {EOS_CANDIDATES}; documents are separated by one, add it")
    dtype = np.dtype(tokenizer_dtype(tokenizer.get_vocab_size()))
    block = cfg.block_size
    writer = _ShardWriter(out_dir, split, unit, block, block + 1 if paper else block,
                          None if paper else cfg.samples_per_shard, dtype)
    documents = replaced = 0
    for doc, ends_document in unit_documents(cfg, out_dir, split, unit):
        documents += ends_document
        replaced += doc.count("\ufffd")
        if paper:  # each row encoded whole, as its code does (line splitting breaks at \x1c-\x1e too)
            writer.add(np.asarray(tokenizer.encode(doc, add_special_tokens=False).ids, dtype=dtype))
        else:
            for tokens in _encode(tokenizer, doc, dtype):
                writer.add(tokens)
            if ends_document:
                writer.add(np.array([eos], dtype=dtype))
    shards = writer.finish()
    record = {"format_version": FORMAT_VERSION, "pieces_sha256": pieces_sha256, "split": split, "unit": unit,
              "documents": documents, "tokens": writer.tokens,
              "replaced_characters": replaced, "shards": shards}
    _write_atomic(record_path, json.dumps(record, indent=1).encode())
    return record


def documents_per_unit(cfg: PrepConfig) -> int:
    """Documents per unit where units count documents (hf sources, or prep.documents_per_unit > 0)."""
    return cfg.documents_per_unit or HF_DOCUMENTS_PER_UNIT


def units_by_bytes(cfg: PrepConfig, split: str) -> bool:
    return (cfg.packing != "paper" and cfg.documents_per_unit == 0 and cfg.source.kind != "hf"
            and split not in cfg.source.max_documents)


@functools.lru_cache(maxsize=4)
def _planned_pieces(plan_path: str, mtime_ns: int) -> dict:
    return read_json(Path(plan_path)).get("pieces", {})


def unit_pieces(cfg: PrepConfig, out_dir: Path, split: str, unit: int) -> list | None:
    """The unit's byte ranges from plan.json (units by bytes), else None."""
    if not units_by_bytes(cfg, split):
        return None
    plan = out_dir / "plan.json"
    return _planned_pieces(str(plan), plan.stat().st_mtime_ns)[split][unit]


def unit_documents(cfg: PrepConfig, out_dir: Path, split: str, unit: int):
    """A unit's text as (text, ends a document) pairs: its pieces from plan.json (units by bytes),
    or its documents (units of documents; packing: paper, the whole split)."""
    source = Source(cfg.source)
    if cfg.packing == "paper":
        return ((doc, True) for doc in source.documents(split))
    if units_by_bytes(cfg, split):
        pieces = unit_pieces(cfg, out_dir, split, unit)
        return (part for piece in pieces for part in source.piece_documents(split, piece))
    n = documents_per_unit(cfg)
    return ((doc, True) for doc in source.documents(split, unit * n, (unit + 1) * n))


def _unit_worker(args):
    cfg_dict, out_dir, split, unit = args
    return process_unit(prep_config_from_dict(cfg_dict), Path(out_dir), split, unit)


# ---- the whole prep ---------------------------------------------------------------------------
def is_trained(cfg: PrepConfig) -> bool:
    return cfg.tokenizer in TRAINED_TOKENIZERS


def tokenizer_file_sha256(path: Path) -> str:
    """The content hash of a tokenizer given by path (a tokenizer.json, or vocab.json + merges.txt)."""
    h = hashlib.sha256()
    for file in [path / "vocab.json", path / "merges.txt"] if path.is_dir() else [path]:
        h.update(file.read_bytes())
    return h.hexdigest()


def check_tokenizer_file(cfg: PrepConfig) -> str:
    """A tokenizer given by path loads and has a separator; returns its sha256."""
    path = Path(cfg.tokenizer)
    if not path.exists():
        raise PrepError(f"tokenizer file not found: {path} (or use bpe-whitespace / bpe-bytelevel)")
    try:
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise PrepError(f"{path} is not a tokenizers JSON file or a vocab.json + merges.txt folder: {e}") from None
    if eos_id(tokenizer) is None and cfg.packing != "paper":
        raise PrepError(f"the tokenizer {path} has none of {EOS_CANDIDATES}; documents are separated by one "
                        "(packing: paper needs none)")
    return tokenizer_file_sha256(path)


def _split_is_empty(source: Source, split: str) -> bool:
    return next(iter(source.documents(split, 0, 1)), None) is None


def tokenizer_splits(cfg: PrepConfig) -> list[str]:
    """The splits a trained tokenizer learns from: prep.tokenizer_splits, with [all] resolved to
    every split the source defines."""
    return list(cfg.source.splits) if cfg.tokenizer_splits == ["all"] else list(cfg.tokenizer_splits)


def count_units(cfg: PrepConfig, source: Source, log=print) -> tuple[dict[str, int | None], dict[str, list]]:
    """Each split's number of work units (None: open-ended, streaming), and the pieces of each unit
    of the splits cut by bytes; an empty split is refused."""
    if is_trained(cfg) and "train" not in cfg.splits and _split_is_empty(source, "train"):
        raise PrepError("split 'train' of the corpus is empty: nothing to train a tokenizer on")
    if is_trained(cfg):
        for split in tokenizer_splits(cfg):
            if split not in cfg.source.splits:
                raise PrepError(f"prep.tokenizer_splits names split {split!r}, which the corpus does not have "
                                f"(splits: {', '.join(cfg.source.splits)})")
            if split not in cfg.splits and _split_is_empty(source, split):
                raise PrepError(f"split {split!r} of the corpus (in prep.tokenizer_splits) is empty")
    units: dict[str, int | None] = {}
    pieces: dict[str, list] = {}
    for split in cfg.splits:
        if units_by_bytes(cfg, split):
            pieces[split] = source.byte_units(split, cfg.unit_bytes)
            # the first piece is read (and parsed) now: a bad file there stops the plan before it writes
            if not pieces[split] or next(iter(source.piece_documents(split, pieces[split][0][0])), None) is None:
                raise PrepError(f"split {split!r} of the corpus is empty")
            units[split] = len(pieces[split])
            log(f"{split}: {units[split]} units of about {cfg.unit_bytes:,} bytes")
            continue
        n_docs = source.num_documents(split)
        if n_docs == 0 or (n_docs is None and _split_is_empty(source, split)):
            raise PrepError(f"split {split!r} of the corpus is empty")
        if cfg.packing == "paper":
            units[split] = 1  # the chunks run across the whole split
        else:
            units[split] = math.ceil(n_docs / documents_per_unit(cfg)) if n_docs is not None else None
        where = ("1 unit (packing: paper)" if cfg.packing == "paper" else
                 f"{units[split] if n_docs is not None else 'open-ended'} units of {documents_per_unit(cfg)} documents")
        log(f"{split}: {n_docs if n_docs is not None else 'unknown number of'} documents in {where}")
    return units, pieces


def prep_artifacts(out_dir: Path) -> list[str]:
    """The files in out_dir that a prep wrote (what a prep of another config must not mix with)."""
    if not out_dir.is_dir():
        return []
    found = [name for name in ("manifest.json", "plan.json", "tokenizer.json") if (out_dir / name).exists()]
    found += sorted(p.name for p in out_dir.glob("*.tar"))
    found += sorted(f"{UNIT_DIR}/{p.name}" for p in (out_dir / UNIT_DIR).glob("*.json"))
    return found


def check_prep_folder(out_dir: Path, record: dict) -> None:
    """Refuses a folder whose prep files come from another config, or from one it cannot establish.
    A folder without prep files takes any config (a failed or killed start leaves nothing to mix)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise PrepError(f"{out_dir} is a file, not a folder; use another --out")
    found = prep_artifacts(out_dir)
    if not found:
        return
    config_file = out_dir / ".prep_config.json"
    if not config_file.is_file():
        raise PrepError(f"{out_dir} holds prep files ({', '.join(found[:3])}) but no .prep_config.json, so their "
                        "configuration cannot be established; use another --out")
    try:
        recorded = read_json(config_file)
    except PrepError as e:
        raise PrepError(f"{e}; the configuration of the prep in {out_dir} cannot be established; use another --out") from None
    if not isinstance(recorded, dict):
        recorded = {}
    if recorded != record:
        changed = sorted(k for k in recorded.keys() | record.keys() if recorded.get(k) != record.get(k))
        names = ", ".join("the content of the tokenizer file" if k == "tokenizer_file_sha256" else f"prep.{k}"
                          for k in changed)
        raise PrepError(f"{out_dir} holds a prep with a different configuration (differs in {names}); "
                        "use another --out")


def prepare_tokenizer(cfg: PrepConfig, out_dir: Path, source: Source, log=print) -> None:
    target = out_dir / "tokenizer.json"
    if target.is_file():
        return
    if is_trained(cfg):
        limit = cfg.tokenizer_train_documents or None
        splits = tokenizer_splits(cfg)
        log(f"training {cfg.tokenizer} tokenizer (vocab {cfg.vocab_size}) on split(s) {', '.join(splits)} ...")
        texts = itertools.chain.from_iterable(_tokenizer_texts(cfg, source, split, limit) for split in splits)
        if cfg.tokenizer_train_bytes:
            texts = _first_bytes(texts, cfg.tokenizer_train_bytes)
        tokenizer = train_bpe(texts, cfg.vocab_size, cfg.tokenizer)
        if tokenizer.get_vocab_size() == 0:
            raise PrepError(f"split(s) {', '.join(splits)} are empty: nothing to train a tokenizer on")
    else:
        tokenizer = load_tokenizer(Path(cfg.tokenizer))  # checked by check_tokenizer_file
    _write_atomic(target, tokenizer.to_str().encode())


def _tokenizer_texts(cfg: PrepConfig, source: Source, split: str, limit: int | None):
    """What a trained tokenizer reads of a split: its documents, or, for a split cut by bytes, its
    units' pieces (a document larger than memory is then never read whole)."""
    if units_by_bytes(cfg, split) and not (limit and split == "train"):
        return (text for unit in source.byte_units(split, cfg.unit_bytes) for piece in unit
                for text, _ in source.piece_documents(split, piece, whole=True))
    return source.documents(split, 0, limit if split == "train" else None)


def _first_bytes(texts, limit: int):
    """The texts up to `limit` bytes of UTF-8 in all (the last one cut short, at a character)."""
    left = limit
    for text in texts:
        data = text.encode()
        if len(data) >= left:
            yield data[:left].decode(errors="ignore")
            return
        left -= len(data)
        yield text


def prep_identity(cfg: PrepConfig) -> dict:
    """The prep's identity: its config, less fields added later that hold the value older preps had
    (and the source's, see spec_identity)."""
    identity = {k: v for k, v in dataclasses.asdict(cfg).items() if not (k in _ADDED_SINCE and v == _ADDED_SINCE[k])}
    if not any(units_by_bytes(cfg, split) for split in cfg.splits):
        # units of documents (every prep before units by bytes): the count they use, no bytes
        identity["documents_per_unit"] = documents_per_unit(cfg)
        del identity["unit_bytes"]
    identity["source"] = spec_identity(cfg.source)
    return identity




def prep_config_from_dict(d: dict) -> PrepConfig:
    return PrepConfig(source=SourceSpec(**d["source"]), **{k: v for k, v in d.items() if k != "source"})


def plan_prep(cfg: PrepConfig, out_dir: str | Path, log=print) -> dict:
    """Phase 1 (once): check the config and the input, record the config, train or copy the
    tokenizer, count each split's units. Writes plan.json; the units phase (any number of tasks)
    and finalize read it. Nothing is written before every check has passed."""
    out_dir = Path(out_dir)
    check_prep_config(cfg)
    cfg_dict = json.loads(json.dumps(prep_identity(cfg)))
    record = dict(cfg_dict)
    if not is_trained(cfg):
        record["tokenizer_file_sha256"] = check_tokenizer_file(cfg)  # the same path with new content is another prep
    check_prep_folder(out_dir, record)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker; workers are the parallelism
    source = Source(cfg.source)
    units, pieces = count_units(cfg, source, log=log)
    try:
        (out_dir / UNIT_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrepError(f"cannot create {out_dir / UNIT_DIR}: {e.strerror or e}") from None
    _write_atomic(out_dir / ".prep_config.json", json.dumps(record, indent=1).encode())
    prepare_tokenizer(cfg, out_dir, source, log=log)
    if (out_dir / "plan.json").is_file():
        read_plan(out_dir)  # an earlier plan of this prep: its tokenizer must still be the folder's
    plan = {"config": cfg_dict, "units": units, "tokenizer_sha256": sha256_file(out_dir / "tokenizer.json"),
            "pieces": pieces}
    _write_atomic(out_dir / "plan.json", json.dumps(plan, indent=1).encode())
    return plan


def read_plan(out_dir: str | Path) -> tuple[PrepConfig, dict[str, int | None]]:
    """The plan's config and unit counts, after checking that tokenizer.json is the one it planned with."""
    out_dir = Path(out_dir)
    path = out_dir / "plan.json"
    if not path.is_file():
        raise PrepError(f"no plan.json in {out_dir}: run the plan phase first (`gam-pretrain prep ... --phase plan`)")
    plan = read_json(path)
    try:
        cfg, units = prep_config_from_dict(plan["config"]), plan["units"]
    except (KeyError, TypeError) as e:
        raise PrepError(f"{path} is not a prep plan ({e}); run the plan phase again in another --out") from None
    expected = plan.get("tokenizer_sha256")
    tokenizer = out_dir / "tokenizer.json"
    if expected and (not tokenizer.is_file() or sha256_file(tokenizer) != expected):
        raise PrepError(f"{tokenizer} is missing or not the tokenizer this prep was planned with (plan.json records "
                        "another sha256); shards of two tokenizers must not mix: use another --out")
    return cfg, units


def run_units(out_dir: str | Path, task_index: int = 0, task_count: int = 1, workers: int = 1,
              progress: bool = False) -> int:
    """Phase 2: the units of every split whose number is task_index modulo task_count (one task of
    a job array, or all of them with 0 of 1). Finished units are skipped. Returns units processed."""
    if not 0 <= task_index < task_count:
        raise PrepError(f"task index {task_index} is outside 0..{task_count - 1}")
    out_dir = Path(out_dir)
    cfg, units = read_plan(out_dir)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return _run_units(prep_identity(cfg), cfg, out_dir, units, workers, progress, task_index, task_count)


def finalize_prep(out_dir: str | Path, log=print) -> dict:
    """Phase 3 (once, after every unit): the manifest from the unit records."""
    out_dir = Path(out_dir)
    cfg, units = read_plan(out_dir)
    records: dict[str, list[dict]] = {}
    for split, n in units.items():
        records[split] = []
        unit = 0
        while n is None or unit < n:
            path = out_dir / UNIT_DIR / f"{split}-{unit:05d}.json"
            if not path.is_file():
                raise PrepError(f"unit {unit} of split {split!r} is not done yet ({path.name} missing); "
                                "run the units phase again (finished units are kept)")
            record = read_json(path)
            if record.get("format_version") != FORMAT_VERSION:
                raise PrepError(f"unit {unit} of split {split!r} ({path.name}) was written by an older gam-pretrain; "
                                "run the units phase again (it writes such units anew)")
            if record["documents"] or record["tokens"] or unit == 0:  # a unit inside a document ends none
                records[split].append(record)
            if n is None and record["documents"] < documents_per_unit(cfg):
                break
            unit += 1
        if sum(r["tokens"] for r in records[split]) == 0:
            raise PrepError(f"split {split!r} produced no tokens (empty documents?)")
    vocab_size = load_tokenizer(out_dir / "tokenizer.json").get_vocab_size()
    manifest = build_manifest(cfg, prep_identity(cfg), records, sha256_file(out_dir / "tokenizer.json"), vocab_size,
                              Source(cfg.source))
    _write_atomic(out_dir / "manifest.json", json.dumps(manifest, indent=1).encode())
    for stale in [*out_dir.glob(".*.tmp"), *(out_dir / UNIT_DIR).glob(".*.tmp")]:
        if not files.writer_alive(stale):
            stale.unlink(missing_ok=True)  # left by a writer killed mid-write
    for split, info in manifest["splits"].items():
        log(f"{split}: {info['documents']:,} documents -> {info['samples']:,} samples of {cfg.block_size + 1} tokens "
            f"in {len(info['shards'])} shards ({info['replaced_characters']} replaced characters)")
    return manifest


def run_prep(cfg: PrepConfig, out_dir: str | Path, workers: int = 1, log=print, progress: bool = True) -> dict:
    """All three phases in this process (units through a pool of `workers`)."""
    out_dir = Path(out_dir)
    started = time.perf_counter()
    plan_prep(cfg, out_dir, log=log)
    run_units(out_dir, 0, 1, workers=workers, progress=progress)
    manifest = finalize_prep(out_dir, log=log)
    seconds = time.perf_counter() - started
    total_tokens = sum(s["tokens"] for s in manifest["splits"].values())
    stats = {"seconds": seconds, "workers": workers, "tokens": total_tokens, "tokens_per_s": total_tokens / seconds}
    _write_atomic(out_dir / "prep_stats.json", json.dumps(stats, indent=1).encode())
    log(f"wrote {out_dir / 'manifest.json'} in {seconds:.1f}s ({stats['tokens_per_s']:,.0f} tokens/s)")
    return manifest


def _run_units(cfg_dict, cfg, out_dir, units: dict[str, int | None], workers, progress,
               task_index: int = 0, task_count: int = 1) -> int:
    """This task's units of all splits through one pool (no barrier between splits). Splits of
    unknown size (streaming) go last, in waves, until a unit comes back short."""
    from tqdm.auto import tqdm

    mine = range(task_index, 1 << 40, task_count)
    known = [(split, u) for split, n in units.items() if n is not None for u in range(task_index, n, task_count)]
    bar = tqdm(total=len(known), desc="prep", unit="unit", disable=not progress)
    tokens, done, t0 = 0, 0, time.perf_counter()

    def collect(record):
        nonlocal tokens, done
        tokens += record["tokens"]
        done += 1
        bar.update(1)
        bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):,.0f}")

    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    run = pool.imap_unordered if pool else map
    try:
        for record in run(_unit_worker, [(cfg_dict, str(out_dir), split, u) for split, u in known]):
            collect(record)
        for split in (s for s, n in units.items() if n is None):
            first, wave_size = 0, max(workers, 1) * 4
            while True:
                wave = list(run(_unit_worker, [(cfg_dict, str(out_dir), split, mine[i])
                                               for i in range(first, first + wave_size)]))
                for record in wave:
                    collect(record)
                if any(r["documents"] < documents_per_unit(cfg) for r in wave):
                    break
                first += wave_size
    finally:
        if pool:
            pool.terminate()
        bar.close()
    return done


def build_manifest(cfg, cfg_dict, records, tokenizer_sha, vocab_size, source) -> dict:
    splits = {}
    for split, recs in records.items():
        shards = [s for r in recs for s in r["shards"]]
        splits[split] = {
            "shards": [{k: s[k] for k in ("path", "samples", "tokens", "sha256")} for s in shards],
            "samples": sum(s["samples"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
            "documents": sum(r["documents"] for r in recs), "units": len(recs),
            "replaced_characters": sum(r["replaced_characters"] for r in recs),
        }
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "block_size": cfg.block_size, "sample_length": cfg.block_size + 1,
        "sample_field": SAMPLE_FIELD, "dtype": tokenizer_dtype(vocab_size),
        "tokenizer": {"file": "tokenizer.json", "sha256": tokenizer_sha, "vocab_size": vocab_size,
                      "kind": cfg.tokenizer if cfg.tokenizer.startswith("bpe-") else "file"},
        "source_fingerprint": source.fingerprint(cfg.splits),
        "prep": cfg_dict, "splits": splits,
    }


def verify(out_dir: str | Path, log=print) -> dict:
    """Re-hash every shard against the manifest and read every sample. Each problem is logged on
    its own line; then one PrepError line counts them and names the first."""
    manifest = read_manifest(out_dir)
    vocab_size = manifest["tokenizer"]["vocab_size"]
    problems = []
    name = manifest["tokenizer"]["file"]
    try:
        if hashlib.sha256(read_data_file(out_dir, name)).hexdigest() != manifest["tokenizer"]["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest (changed or corrupt)")
    except OSError:
        problems.append(f"{name}: missing")
    stats = {}
    for split, info in manifest["splits"].items():
        token_counts = np.zeros(vocab_size, dtype=np.int64)
        for shard in info["shards"]:
            try:
                samples = read_checked_shard(out_dir, shard, manifest)
            except PrepError as e:
                problems.append(str(e))
                continue
            token_counts += np.bincount(samples.ravel(), minlength=vocab_size)
        stats[split] = {"shards": len(info["shards"]), "samples": info["samples"], "tokens": info["tokens"],
                        "distinct_tokens": int((token_counts > 0).sum())}
        log(f"{split}: {len(info['shards'])} shards, {info['samples']:,} samples, {info['tokens']:,} tokens, "
            f"{stats[split]['distinct_tokens']:,} distinct token ids")
    if problems:
        for problem in problems:
            log(f"problem: {problem}")
        raise PrepError(f"verify failed for {out_dir}: {len(problems)} problem(s); first: {problems[0]}")
    log("all shards match the manifest")
    return stats


MANIFEST_KEYS = ("block_size", "sample_length", "sample_field", "dtype", "tokenizer", "splits")


def data_file(location: str | Path, name: str) -> str:
    """Where file `name` of a shard set is: a path in a local folder, or its URL."""
    return file_url(str(location), name) if is_remote(str(location)) else str(Path(location) / name)


def read_data_file(location: str | Path, name: str) -> bytes:
    """A file of a shard set, local or at a URL (read again on dropped connections); OSError if not."""
    if is_remote(str(location)):
        return read_remote(str(location), name)
    return (Path(location) / name).read_bytes()


def read_manifest(out_dir: str | Path) -> dict:
    try:
        path = data_file(out_dir, "manifest.json")
    except OSError as e:  # a URL that names no file
        raise PrepError(str(e)) from None
    if is_remote(str(out_dir)):
        try:
            manifest = json.loads(read_data_file(out_dir, "manifest.json"))
        except OSError as e:
            raise PrepError(f"no manifest.json at {out_dir}: {e}") from None
        except ValueError as e:
            raise PrepError(f"{path} is not valid JSON ({e})") from None
    else:
        if not Path(path).is_file():
            raise PrepError(f"no manifest.json in {out_dir}: prep has not finished there")
        manifest = read_json(Path(path))
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PrepError(f"{path} is not a gam-pretrain shard manifest")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise PrepError(f"{path} has shard format version {manifest.get('format_version')!r}; this gam-pretrain "
                        f"reads versions {', '.join(map(str, READABLE_VERSIONS))}: update gam-pretrain or prep again")
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    tokenizer = manifest.get("tokenizer")
    missing += [f"tokenizer.{k}" for k in ("file", "sha256", "vocab_size")
                if not isinstance(tokenizer, dict) or k not in tokenizer]
    if missing or not isinstance(manifest["splits"], dict):
        raise PrepError(f"{path} is incomplete (no {', '.join(missing) or 'splits mapping'}); prep again")
    shard_fields = {"path": str, "samples": int, "tokens": int, "sha256": str}
    for split, info in manifest["splits"].items():
        shards = info.get("shards") if isinstance(info, dict) else None
        if not isinstance(shards, list) or not all(
                isinstance(shard, dict) and all(isinstance(shard.get(k), t) for k, t in shard_fields.items())
                and PLAIN_NAME.fullmatch(shard["path"]) for shard in shards):
            raise PrepError(f"{path}: split {split!r} is garbled (each shard needs a plain file name, samples, tokens "
                            "and sha256); prep again")
    try:
        np.dtype(manifest["dtype"])
    except TypeError:
        raise PrepError(f"{path}: dtype {manifest['dtype']!r} is not a NumPy dtype; prep again") from None
    if not PLAIN_NAME.fullmatch(str(tokenizer["file"])):
        raise PrepError(f"{path}: tokenizer.file {tokenizer['file']!r} is not a plain file name; prep again")
    return manifest


def read_checked_shard(data_dir: str | Path, shard: dict, manifest: dict) -> np.ndarray:
    """A shard's samples as one array, read once (from a folder or a URL): its bytes are hashed and
    compared with the manifest before they are parsed, and every token id is checked against the
    vocabulary."""
    hint = f"run `gam-pretrain verify {data_dir}`"
    path = data_file(data_dir, shard["path"])
    try:
        data = read_data_file(data_dir, shard["path"])
    except OSError as e:
        raise PrepError(f"shard {path} cannot be read ({e.strerror or e}); {hint}") from None
    if hashlib.sha256(data).hexdigest() != shard["sha256"]:
        raise PrepError(f"shard {path} does not match the manifest's sha256 (corrupt, truncated or changed); {hint}")
    rows = parse_shard(data, path, manifest)
    if len(rows) != shard["samples"]:
        raise PrepError(f"shard {path} holds {len(rows)} samples, the manifest says {shard['samples']}; {hint}")
    check_token_ids(rows, manifest["tokenizer"]["vocab_size"], path, hint)
    return rows


def check_token_ids(rows: np.ndarray, vocab_size: int, path: Path, hint: str) -> None:
    """An id outside the vocabulary would index past the model's embedding: refuse it at load."""
    if rows.size == 0:
        return
    low, high = int(rows.min()), int(rows.max())
    if low < 0 or high >= vocab_size:
        bad = high if high >= vocab_size else low
        raise PrepError(f"shard {path} holds token id {bad}, outside the vocabulary of {vocab_size} tokens; {hint}")


def parse_shard(data: bytes, path: Path, manifest: dict) -> np.ndarray:
    """The samples of a shard's bytes, in order, as one [n, sample_length] array; `path` names it in
    errors. Format 2 stores rows of samples per member, format 1 one sample per member."""
    length, dtype, version = manifest["sample_length"], np.dtype(manifest["dtype"]), manifest["format_version"]
    arrays = []
    header = b""  # format 1 stores every sample with the same .npy header: parse it once
    suffix = "." + manifest["sample_field"]
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if not member.name.endswith(suffix):
                    continue
                raw = tar.extractfile(member).read()
                if version == 1 and header and raw.startswith(header):
                    array = np.frombuffer(raw, dtype=dtype, offset=len(header))
                else:
                    array = np.load(io.BytesIO(raw), allow_pickle=False)
                    header = raw[: len(raw) - array.nbytes]
                if array.dtype != dtype or array.shape[-1:] != (length,) or array.ndim != (1 if version == 1 else 2):
                    want = f"({length},)" if version == 1 else f"(rows, {length})"
                    raise PrepError(f"shard {path}: member {member.name} holds {array.dtype} {array.shape}, expected "
                                    f"{dtype} {want}; run `gam-pretrain verify`")
                arrays.append(array.reshape(-1, length))
    except (tarfile.TarError, OSError, ValueError, EOFError) as e:
        raise PrepError(f"shard {path} is corrupt or truncated ({e}); run `gam-pretrain verify`") from None
    return np.concatenate(arrays) if arrays else np.zeros((0, length), dtype=dtype)
