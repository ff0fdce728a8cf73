"""Reading prepared shards: a training loader whose sample order depends on the seed alone, with an
exact resume at any world size or worker count, and validation.

Each epoch, the shards are put in an order drawn from (seed, epoch), and inside each shard its
samples in an order drawn from (seed, epoch, shard): taken in that order they form one sequence
of the split's N samples, the same for every world size. Global batch g of the epoch is samples
[g*B, (g+1)*B) of that sequence (B = train.batch_size, the global batch; the last N mod B samples
are dropped). Rank r of W takes the r-th of W equal contiguous slices of it, cut into its
micro-batches. DataLoader workers take whole global batches (batch g from worker g mod workers)
and the loader re-emits them in order, so neither the world size nor the worker count changes
which samples a step trains on: only which rank computes which of them.

So the loader's state is a cursor (epoch, global batches consumed in it) plus the seed, the global
batch and the data it depends on; a resume recomputes where every worker stands, nothing is
replayed, and a resume at another world size or worker count continues the same sequence.

Every rank reads each shard its slices touch whole (its sha256 is checked before it is parsed),
so at W ranks the shards are read W times per epoch; a format with checksums per member would
let a rank read only its rows (a limitation stated in the README).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .prep import PrepError, data_file, read_checked_shard, read_data_file, read_manifest
from .remote import is_remote
from .tokenizer import tokenizer_from_bytes


class ShardSet:
    """A prepared data directory: manifest.json, tokenizer.json and the shards."""

    def __init__(self, path: str | Path):
        # a folder, or a URL (https://, http://, pipe:) whose files are read with retries (data/remote.py)
        self.path = str(path) if is_remote(str(path)) else Path(path)
        self.manifest = read_manifest(self.path)
        self.fingerprint = hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()

    @property
    def where(self) -> str:
        """The folder (absolute) or the URL: what a run records as its data."""
        return self.path if isinstance(self.path, str) else str(self.path.resolve())

    @property
    def vocab_size(self) -> int:
        return self.manifest["tokenizer"]["vocab_size"]

    @property
    def block_size(self) -> int:
        return self.manifest["block_size"]

    def tokenizer_bytes(self) -> bytes:
        """tokenizer.json as the shards were written with it (its bytes checked against the manifest)."""
        name = self.manifest["tokenizer"]["file"]
        try:
            data = read_data_file(self.path, name)
        except OSError as e:
            raise PrepError(f"{data_file(self.path, name)} cannot be read ({e.strerror or e}); "
                            f"run `gam-pretrain verify {self.path}`") from None
        if hashlib.sha256(data).hexdigest() != self.manifest["tokenizer"]["sha256"]:
            raise PrepError(f"{data_file(self.path, name)} does not match the manifest's sha256 (changed or corrupt); "
                            f"run `gam-pretrain verify {self.path}`")
        return data

    def tokenizer(self):
        """The tokenizer the shards were written with (its bytes checked against the manifest)."""
        return tokenizer_from_bytes(self.tokenizer_bytes(), data_file(self.path, self.manifest["tokenizer"]["file"]))

    def shards(self, split: str) -> list[dict]:
        if split not in self.manifest["splits"]:
            raise PrepError(f"{self.path} has no split {split!r}; it has {', '.join(self.manifest['splits'])}")
        return self.manifest["splits"][split]["shards"]

    def read(self, shard: dict) -> np.ndarray:
        """A shard's samples [n, block_size + 1]. Its bytes are read once and hashed before they are
        parsed, so a corrupt shard (or an id outside the vocabulary) never reaches a model."""
        return read_checked_shard(self.path, shard, self.manifest)


def _to_batch(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    batch = torch.from_numpy(rows.astype(np.int64))
    return batch[:, :-1], batch[:, 1:]


class _EpochOrder:
    """The epoch's sample sequence (pure arithmetic on the manifest): which samples of which shards
    sit at positions [lo, hi), and their ids (a sample's index in the split, in manifest order)."""

    def __init__(self, shards: list[dict], seed: int, epoch: int):
        self.seed, self.epoch = seed, epoch
        first_id = np.concatenate([[0], np.cumsum([s["samples"] for s in shards])])
        order = np.random.default_rng([seed, epoch]).permutation(len(shards))
        self.shards = [(int(i), shards[i], int(first_id[i])) for i in order]
        self.starts = np.concatenate([[0], np.cumsum([s["samples"] for _, s, _ in self.shards])])
        self.total = int(self.starts[-1])

    def rows(self, shard_set: ShardSet, lo: int, hi: int, cache: dict) -> tuple[np.ndarray, np.ndarray]:
        """Samples at positions [lo, hi) and their ids; `cache` keeps the last shard read (callers
        walk forward through the sequence, so each shard is read once per reader and epoch)."""
        parts, ids = [], []
        k = int(np.searchsorted(self.starts, lo, side="right") - 1)
        while lo < hi:
            index, shard, first_id = self.shards[k]
            begin, end = int(self.starts[k]), int(self.starts[k + 1])
            if cache.get("key") != (self.epoch, index):
                cache.clear()  # one shard at a time: a reader's memory does not grow with the corpus
                cache.update(key=(self.epoch, index), rows=shard_set.read(shard),
                             perm=np.random.default_rng([self.seed, self.epoch, index]).permutation(end - begin))
            take = cache["perm"][lo - begin : min(hi, end) - begin]
            parts.append(cache["rows"][take])
            ids.append(first_id + take)
            lo = min(hi, end)
            k += 1
        return np.concatenate(parts), np.concatenate(ids)


class _StepDataset(IterableDataset):
    """This rank's share of global batches first.. of one epoch, one item per optimizer step:
    (its micro-batches, the ids of its samples). A DataLoader worker w takes batches g = w mod workers."""

    def __init__(self, shard_set, order: _EpochOrder, layout: "LoaderLayout", first_batch: int, workers: int):
        self.shard_set, self.order, self.layout = shard_set, order, layout
        self.first_batch, self.workers = first_batch, workers

    def __iter__(self):
        info = get_worker_info()
        w = info.id if info is not None else 0
        lay, cache = self.layout, {}
        start = self.first_batch + (w - self.first_batch) % self.workers  # this worker's first g >= first_batch
        try:
            for g in range(start, lay.batches_per_epoch(self.order.total), self.workers):
                lo = g * lay.global_batch + lay.rank * lay.per_rank
                rows, ids = self.order.rows(self.shard_set, lo, lo + lay.per_rank, cache)
                micro = [_to_batch(rows[i : i + lay.micro_batch_size])
                         for i in range(0, lay.per_rank, lay.micro_batch_size)]
                yield w, (micro, ids)
        except PrepError as e:
            yield w, e  # re-raised by the reader: raised in a DataLoader worker, its one line would become a traceback


@dataclass(frozen=True)
class LoaderLayout:
    """This rank's cut of every global batch: rank `rank` of `world_size` takes per_rank sequences as
    micro-batches of micro_batch_size."""
    global_batch: int
    micro_batch_size: int
    rank: int = 0
    world_size: int = 1

    @property
    def per_rank(self) -> int:
        return self.global_batch // self.world_size

    def batches_per_epoch(self, samples: int) -> int:
        return samples // self.global_batch


class ShardLoader:
    """Training batches from one split, one optimizer step at a time: `next_step()` (this rank's
    micro-batches of the next global batch), `last_sample_ids`, `state_dict()`, `load_state_dict()`."""

    def __init__(self, shard_set: ShardSet, split: str, global_batch: int, seed: int, rank: int = 0,
                 world_size: int = 1, micro_batch_size: int = 0, num_workers: int = 0):
        if global_batch % world_size or (micro_batch_size and (global_batch // world_size) % micro_batch_size):
            raise ValueError(f"a global batch of {global_batch} does not cut into {world_size} rank(s) x "
                             f"micro-batches of {micro_batch_size}")
        self.shard_set, self.split, self.seed = shard_set, split, seed
        self.layout = LoaderLayout(global_batch, micro_batch_size or global_batch // world_size, rank, world_size)
        self.num_workers = num_workers
        self.shard_list = shard_set.shards(split)
        self.samples = sum(s["samples"] for s in self.shard_list)
        self.epoch, self.batches_in_epoch = 0, 0
        self.last_sample_ids = np.zeros(0, dtype=np.int64)
        if self.steps_per_epoch == 0:
            raise PrepError(f"split {split!r} has {self.samples} samples: too few for one global batch of "
                            f"{global_batch}; use a smaller train.batch_size")
        self._iterator = None

    @property
    def steps_per_epoch(self) -> int:
        return self.layout.batches_per_epoch(self.samples)

    @property
    def epoch_progress(self) -> float:
        return self.epoch + self.batches_in_epoch / self.steps_per_epoch

    def _start_epoch_iterator(self):
        order = _EpochOrder(self.shard_list, self.seed, self.epoch)
        workers = max(1, self.num_workers)
        dataset = _StepDataset(self.shard_set, order, self.layout, self.batches_in_epoch, workers)
        if self.num_workers == 0:
            return (item for _, item in dataset)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, prefetch_factor=4,
                            multiprocessing_context="fork")
        return _in_worker_order(iter(loader), self.batches_in_epoch % workers, workers)

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches of the next global batch (its ids in `last_sample_ids`)."""
        if self._iterator is None:
            self._iterator = self._start_epoch_iterator()
        item = next(self._iterator)
        if isinstance(item, PrepError):
            self._iterator = None
            raise item
        micro, ids = item  # through DataLoader workers, lists and tensors: the same types either way
        micro, self.last_sample_ids = [tuple(batch) for batch in micro], np.asarray(ids)
        self.batches_in_epoch += 1
        if self.batches_in_epoch == self.steps_per_epoch:
            self.epoch, self.batches_in_epoch = self.epoch + 1, 0
            self._iterator = None
        return micro

    def state_dict(self) -> dict:
        """The cursor, in terms that hold at any world size and worker count."""
        return {"epoch": self.epoch, "global_batches_in_epoch": self.batches_in_epoch, "seed": self.seed,
                "global_batch": self.layout.global_batch, "split": self.split,
                "data_fingerprint": self.shard_set.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        try:
            self._load_state_dict(state)
        except (KeyError, TypeError) as e:
            raise ValueError(f"cannot resume the data loader: its saved state is incomplete or garbled ({type(e).__name__}: "
                             f"{e}); start the run over (checkpoint.resume=never)") from None

    def _load_state_dict(self, state: dict) -> None:
        if "global_batch" not in state:
            state = _from_per_rank_state(state, self.layout.global_batch, self.samples)
        for key in ("seed", "global_batch", "split", "data_fingerprint"):
            mine = self.state_dict()[key]
            if state[key] != mine:
                raise ValueError(f"cannot resume the data loader: it was saved with {key}={state[key]!r}, this run "
                                 f"has {mine!r}. Resuming needs the same data, seed and global batch "
                                 "(train.batch_size); the world size and loader workers may change")
        self.epoch, self.batches_in_epoch = state["epoch"], state["global_batches_in_epoch"]
        self._iterator = None


def _from_per_rank_state(state: dict, global_batch: int, samples: int) -> dict:
    """A cursor saved by the loader before global batches (gam-pretrain 0.1). One process without
    loader workers read the same sequence in the same micro-batches, so its cursor carries over when
    it stands on a step boundary of the same epochs; the old per-rank streams of other layouts have
    no equivalent."""
    if state.get("world_size") != 1 or state.get("num_workers") != 0:
        raise ValueError(f"cannot resume the data loader: it was saved by gam-pretrain 0.1 with world_size="
                         f"{state.get('world_size')} and num_workers={state.get('num_workers')}, whose per-rank "
                         "sample streams this version does not reproduce; start the run over (checkpoint.resume=never)")
    micro, consumed = state["batch_size"], state["batches_in_epoch"]
    accum = global_batch // micro
    if global_batch % micro or consumed % accum or (samples // micro) % accum:
        raise ValueError(f"cannot resume the data loader: it was saved by gam-pretrain 0.1 with micro-batches of "
                         f"{micro} at {consumed} batches into the epoch, whose steps and epochs do not fall as this version's "
                         f"global batches of {global_batch} do; start the run over (checkpoint.resume=never)")
    return {"epoch": state["epoch"], "global_batches_in_epoch": consumed // accum,
            "seed": state["seed"], "global_batch": global_batch, "split": state["split"],
            "data_fingerprint": state["data_fingerprint"]}


def _in_worker_order(tagged, first_worker: int, workers: int):
    """Items tagged with their worker, re-emitted as worker first_worker, +1, +2, ... (mod W).

    The order then does not depend on how the DataLoader interleaves its workers (it restarts at
    worker 0, and skips exhausted ones), only on the plan.
    """
    buffered: list[list] = [[] for _ in range(workers)]
    want = first_worker
    for worker, item in tagged:
        buffered[worker].append(item)
        while buffered[want]:
            yield buffered[want].pop(0)
            want = (want + 1) % workers
    while buffered[want]:
        yield buffered[want].pop(0)
        want = (want + 1) % workers


def validation_batches(shard_set: ShardSet, split: str, batch_size: int, max_batches: int = 0):
    """Every sample of the split, in manifest order (the last batch may be smaller)."""
    pending, emitted = [], 0
    for shard in shard_set.shards(split):
        pending.append(shard_set.read(shard))
        joined = np.concatenate(pending)
        while len(joined) >= batch_size:
            if max_batches and emitted >= max_batches:
                return
            yield _to_batch(joined[:batch_size])
            emitted += 1
            joined = joined[batch_size:]
        pending = [joined] if len(joined) else []
    if pending and not (max_batches and emitted >= max_batches):
        yield _to_batch(np.concatenate(pending))
