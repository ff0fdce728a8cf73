"""Reading prepared shards: a training loader with an exact, arithmetic resume, and validation.

Each epoch, the shards are put in an order drawn from (seed, epoch), and the samples they hold,
taken in that order, form one sequence of N samples. That sequence is cut into S = world_size x
max(1, num_workers) equal contiguous ranges, one per stream (a DataLoader worker of one rank);
a range may start or end inside a shard, so ranks and workers get equal shares and each reads
only the shards its range touches. Inside a shard the samples are visited in an order drawn from
(seed, epoch, shard). Every stream yields the same number of whole batches per epoch
(floor(N / S / batch), the remainder is dropped), and a rank's batches alternate over its workers
exactly as torch's DataLoader returns them (batch j from worker j mod W).

So the loader's state is (epoch, batches consumed in the epoch) plus the settings it depends on,
and a resume recomputes where every worker stands: nothing is replayed. Resuming with another
world size, worker count, batch size or seed is refused (the stream would differ); a run that
must change them starts a new epoch plan from a fresh loader.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .prep import PrepError, read_checked_shard, read_manifest
from .tokenizer import tokenizer_from_bytes


class ShardSet:
    """A prepared data directory: manifest.json, tokenizer.json and the shards."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.fingerprint = hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self.manifest["tokenizer"]["vocab_size"]

    @property
    def block_size(self) -> int:
        return self.manifest["block_size"]

    def tokenizer_bytes(self) -> bytes:
        """tokenizer.json as the shards were written with it (its bytes checked against the manifest)."""
        path = self.path / self.manifest["tokenizer"]["file"]
        try:
            data = path.read_bytes()
        except OSError as e:
            raise PrepError(f"{path} cannot be read ({e.strerror or e}); run `gam-pretrain verify {self.path}`") from None
        if hashlib.sha256(data).hexdigest() != self.manifest["tokenizer"]["sha256"]:
            raise PrepError(f"{path} does not match the manifest's sha256 (changed or corrupt); "
                            f"run `gam-pretrain verify {self.path}`")
        return data

    def tokenizer(self):
        """The tokenizer the shards were written with (its bytes checked against the manifest)."""
        return tokenizer_from_bytes(self.tokenizer_bytes(), self.path / self.manifest["tokenizer"]["file"])

    def shards(self, split: str) -> list[dict]:
        if split not in self.manifest["splits"]:
            raise PrepError(f"{self.path} has no split {split!r}; it has {', '.join(self.manifest['splits'])}")
        return self.manifest["splits"][split]["shards"]

    def read(self, shard: dict) -> np.ndarray:
        """A shard's samples [n, block_size + 1]. Its bytes are read once and hashed before they are
        parsed, so a corrupt shard (or an id outside the vocabulary) never reaches a model."""
        return read_checked_shard(self.path / shard["path"], shard, self.manifest, self.path)


def _to_batch(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    batch = torch.from_numpy(rows.astype(np.int64))
    return batch[:, :-1], batch[:, 1:]


class _EpochPlan:
    """Which samples every stream reads in one epoch (pure arithmetic on the manifest)."""

    def __init__(self, shards: list[dict], seed: int, epoch: int, streams: int, batch_size: int):
        self.seed, self.epoch, self.batch_size = seed, epoch, batch_size
        order = np.random.default_rng([seed, epoch]).permutation(len(shards))
        self.shards = [(int(i), shards[i]) for i in order]
        self.starts = np.concatenate([[0], np.cumsum([s["samples"] for _, s in self.shards])])
        total = int(self.starts[-1])
        self.per_stream = total // streams
        self.batches_per_stream = self.per_stream // batch_size

    def stream_batches(self, shard_set: ShardSet, stream: int, first_batch: int) -> Iterator[np.ndarray]:
        """Batches first_batch.. of one stream, read shard by shard."""
        lo = stream * self.per_stream + first_batch * self.batch_size
        hi = stream * self.per_stream + self.batches_per_stream * self.batch_size
        pending: list[np.ndarray] = []
        have = 0
        k = int(np.searchsorted(self.starts, lo, side="right") - 1)
        while lo < hi:
            index, shard = self.shards[k]
            begin, end = int(self.starts[k]), int(self.starts[k + 1])
            perm = np.random.default_rng([self.seed, self.epoch, index]).permutation(end - begin)
            take = perm[lo - begin : min(hi, end) - begin]
            rows = shard_set.read(shard)[take]
            pending.append(rows)
            have += len(rows)
            lo = min(hi, end)
            k += 1
            while have >= self.batch_size:
                joined = np.concatenate(pending)
                yield joined[: self.batch_size]
                rest = joined[self.batch_size :]
                pending, have = ([rest] if len(rest) else []), len(rest)


class _StreamDataset(IterableDataset):
    def __init__(self, shard_set, plan, rank, workers, first_batch_of_worker):
        self.shard_set, self.plan, self.rank, self.workers = shard_set, plan, rank, workers
        self.first_batch_of_worker = first_batch_of_worker

    def __iter__(self):
        info = get_worker_info()
        w = info.id if info is not None else 0
        stream = self.rank * self.workers + w
        try:
            for rows in self.plan.stream_batches(self.shard_set, stream, self.first_batch_of_worker[w]):
                yield w, _to_batch(rows)
        except PrepError as e:
            yield w, e  # re-raised by the reader: raised in a DataLoader worker, its one line would become a traceback


class ShardLoader:
    """Training batches from one split: `next_batch()`, `state_dict()`, `load_state_dict()`."""

    def __init__(self, shard_set: ShardSet, split: str, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0):
        self.shard_set, self.split = shard_set, split
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.workers = max(1, num_workers)
        self.shard_list = shard_set.shards(split)
        self.epoch, self.batches_in_epoch = 0, 0
        plan = self._plan(0)
        if plan.batches_per_stream == 0:
            total = int(plan.starts[-1])
            raise PrepError(f"split {split!r} has {total} samples: too few for {world_size} rank(s) x "
                            f"{self.workers} worker(s) x batch {batch_size}; use a smaller batch or fewer workers")
        self._iterator = None

    def _plan(self, epoch: int) -> _EpochPlan:
        return _EpochPlan(self.shard_list, self.seed, epoch, self.world_size * self.workers, self.batch_size)

    @property
    def batches_per_epoch(self) -> int:
        return self._plan(self.epoch).batches_per_stream * self.workers

    @property
    def epoch_progress(self) -> float:
        return self.epoch + self.batches_in_epoch / self.batches_per_epoch

    def _start_epoch_iterator(self):
        plan = self._plan(self.epoch)
        k = self.batches_in_epoch
        first = [(k - w + self.workers - 1) // self.workers for w in range(self.workers)]  # #{j < k : j % W == w}
        dataset = _StreamDataset(self.shard_set, plan, self.rank, self.workers, first)
        if self.num_workers == 0:
            return (batch for _, batch in dataset)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, prefetch_factor=4,
                            multiprocessing_context="fork")
        return _in_worker_order(iter(loader), k % self.workers, self.workers)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._iterator is None:
            self._iterator = self._start_epoch_iterator()
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.epoch, self.batches_in_epoch = self.epoch + 1, 0
            self._iterator = self._start_epoch_iterator()
            batch = next(self._iterator)
        if isinstance(batch, PrepError):
            self._iterator = None
            raise batch
        self.batches_in_epoch += 1
        if self.batches_in_epoch == self.batches_per_epoch:
            self.epoch, self.batches_in_epoch = self.epoch + 1, 0
            self._iterator = None
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch, "seed": self.seed,
                "batch_size": self.batch_size, "world_size": self.world_size, "num_workers": self.num_workers,
                "split": self.split, "data_fingerprint": self.shard_set.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "batch_size", "world_size", "num_workers", "split", "data_fingerprint"):
            mine = self.state_dict()[key]
            if state[key] != mine:
                raise ValueError(
                    f"cannot resume the data loader: it was saved with {key}={state[key]!r}, this run has {mine!r}. "
                    "Resuming needs the same data, seed, batch size, world size and loader workers."
                )
        self.epoch, self.batches_in_epoch = state["epoch"], state["batches_in_epoch"]
        self._iterator = None


def _in_worker_order(tagged, first_worker: int, workers: int):
    """Batches tagged with their worker, re-emitted as worker first_worker, +1, +2, ... (mod W).

    The order then does not depend on how the DataLoader interleaves its workers (it restarts at
    worker 0, and skips exhausted ones), only on the plan.
    """
    buffered: list[list] = [[] for _ in range(workers)]
    want = first_worker
    for worker, batch in tagged:
        buffered[worker].append(batch)
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
