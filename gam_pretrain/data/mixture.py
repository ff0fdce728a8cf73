"""A weighted mixture of prepared shard sets (`data.mixture: {folder or URL: weight}`).

Global batch g takes from source s the samples [C_s(g), C_s(g+1)) of that source's own endless
sequence (its epochs one after another, each in the order `ShardLoader` draws from the seed), where
C_s(g) = floor(w_s * g * B) for every source but the heaviest, which takes the rest of each batch. So
every prefix of the run holds each source in its share to within one sample (the heaviest within
one per source), nothing is random in the proportions, and the state is the step alone. The batch's
samples are then shuffled with a generator drawn from (seed, g) and rank r of W takes the r-th of W
slices, as in `ShardLoader`; the world size changes which rank computes a sample, not which samples
a step trains on.

Sources must share the tokenizer (sha256), block size and dtype. `data.mixture_max_epochs` caps how
many times a source's samples may be repeated; a run that would pass a cap is refused before its
first step. A mixture is read in the training process (no DataLoader workers).
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

from .prep import PrepError
from .shards import LoaderLayout, ShardSet, _EpochOrder, _to_batch

MIX_STREAM = 0x4D4958  # "MIX": the generator of the within-batch shuffle, apart from the sources' orders


def source_seed(seed: int, index: int) -> int:
    """Each source's order is drawn from its own seed, a function of the run's seed and its place."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "little")


def check_compatible(sources: dict[str, ShardSet]) -> None:
    names = list(sources)
    first = sources[names[0]].manifest
    for name in names[1:]:
        other = sources[name].manifest
        for key, what in ((("tokenizer", "sha256"), "tokenizer"), (("block_size",), "block size"),
                          (("dtype",), "token dtype")):
            mine, theirs = first, other
            for k in key:
                mine, theirs = mine[k], theirs[k]
            if mine != theirs:
                raise PrepError(f"data.mixture: {name} has another {what} than {names[0]} ({theirs!r} vs {mine!r}); "
                                "a mixture's sources must be prepped with one tokenizer and block size")


class MixtureLoader:
    """The `ShardLoader` interface over several shard sets: next_step, last_sample_ids (a source's
    ids offset by the samples of the sources before it), state_dict, load_state_dict, and per-source
    counts (`samples_by_source`)."""

    def __init__(self, sources: dict[str, ShardSet], weights: dict[str, float], split: str, global_batch: int,
                 seed: int, rank: int = 0, world_size: int = 1, micro_batch_size: int = 0,
                 max_epochs: dict[str, float] | None = None):
        if global_batch % world_size or (micro_batch_size and (global_batch // world_size) % micro_batch_size):
            raise ValueError(f"a global batch of {global_batch} does not cut into {world_size} rank(s) x "
                             f"micro-batches of {micro_batch_size}")
        if not sources or set(weights) != set(sources):
            raise ValueError("data.mixture needs a weight for every source")
        for name, weight in weights.items():
            if not weight > 0:
                raise ValueError(f"data.mixture: the weight of {name} must be positive, got {weight!r}")
        check_compatible(sources)
        self.names = list(sources)
        self.sources = [sources[n] for n in self.names]
        total = sum(weights.values())
        self.weights = np.array([weights[n] / total for n in self.names])
        self.heaviest = int(np.argmax(self.weights))
        if global_batch < len(self.names) * (len(self.names) - 1) and len(self.names) > 1:
            raise ValueError(f"data.mixture of {len(self.names)} sources needs a global batch of at least "
                             f"{len(self.names) * (len(self.names) - 1)}")
        self.split, self.seed = split, seed
        self.layout = LoaderLayout(global_batch, micro_batch_size or global_batch // world_size, rank, world_size)
        self.shard_lists = [s.shards(split) for s in self.sources]
        self.samples = [sum(sh["samples"] for sh in shards) for shards in self.shard_lists]
        for name, n in zip(self.names, self.samples):
            if n == 0:
                raise PrepError(f"data.mixture: {name} has no {split} samples")
        self.offsets = np.concatenate([[0], np.cumsum(self.samples)[:-1]])
        self.max_epochs = dict(max_epochs or {})
        unknown = set(self.max_epochs) - set(self.names)
        if unknown:
            raise ValueError(f"data.mixture_max_epochs names {', '.join(sorted(unknown))}, which data.mixture does not")
        self.step = 0
        self.last_sample_ids = np.zeros(0, dtype=np.int64)
        self._caches = [{} for _ in self.sources]
        self.fingerprint = hashlib.sha256(json.dumps(
            [[n, s.fingerprint, float(w)] for n, s, w in zip(self.names, self.sources, self.weights)]).encode()).hexdigest()

    @property
    def steps_per_epoch(self) -> int:
        """Steps to read as many samples as the sources hold together."""
        return max(1, sum(self.samples) // self.layout.global_batch)

    @property
    def epoch_progress(self) -> float:
        return self.step / self.steps_per_epoch

    def samples_before(self, step: int) -> np.ndarray:
        """Samples each source gave to the global batches before `step`."""
        given = np.floor(self.weights * step * self.layout.global_batch).astype(np.int64)
        given[self.heaviest] = 0
        given[self.heaviest] = step * self.layout.global_batch - given.sum()
        return given

    def samples_by_source(self, step: int | None = None) -> dict[str, int]:
        return dict(zip(self.names, map(int, self.samples_before(self.step if step is None else step))))

    def check_caps(self, total_steps: int) -> None:
        """Refuses, before the first step, a run that would repeat a source more than its cap."""
        needed = self.samples_before(total_steps)
        for name, cap in self.max_epochs.items():
            i = self.names.index(name)
            if needed[i] > cap * self.samples[i]:
                raise PrepError(f"data.mixture: {name} would be read {needed[i] / self.samples[i]:.2f} times in "
                                f"{total_steps} steps, over its data.mixture_max_epochs of {cap}; lower its weight "
                                "or the run's steps")

    def _rows(self, i: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions [lo, hi) of source i's endless sequence (its epochs one after another)."""
        rows, ids, n = [], [], self.samples[i]
        while lo < hi:
            epoch, start = divmod(lo, n)
            stop = min(hi - epoch * n, n)
            order = _EpochOrder(self.shard_lists[i], source_seed(self.seed, i), epoch)
            r, idx = order.rows(self.sources[i], start, stop, self._caches[i])
            rows.append(r)
            ids.append(idx + self.offsets[i])
            lo = epoch * n + stop
        return (np.concatenate(rows), np.concatenate(ids)) if rows else (None, None)

    def next_step(self):
        lay, g = self.layout, self.step
        before, after = self.samples_before(g), self.samples_before(g + 1)
        parts = [self._rows(i, int(before[i]), int(after[i])) for i in range(len(self.sources)) if after[i] > before[i]]
        rows = np.concatenate([r for r, _ in parts])
        ids = np.concatenate([i for _, i in parts])
        perm = np.random.default_rng([self.seed, MIX_STREAM, g]).permutation(lay.global_batch)
        mine = perm[lay.rank * lay.per_rank: (lay.rank + 1) * lay.per_rank]
        rows, self.last_sample_ids = rows[mine], ids[mine]
        self.step += 1
        return [_to_batch(rows[i: i + lay.micro_batch_size]) for i in range(0, lay.per_rank, lay.micro_batch_size)]

    def state_dict(self) -> dict:
        return {"mixture_step": self.step, "seed": self.seed, "global_batch": self.layout.global_batch,
                "split": self.split, "data_fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if "mixture_step" not in state:
            raise ValueError("cannot resume the data loader: the checkpoint was written by a run without data.mixture")
        for key in ("seed", "global_batch", "split", "data_fingerprint"):
            if state.get(key) != self.state_dict()[key]:
                raise ValueError(f"cannot resume the data loader: it was saved with {key}={state.get(key)!r}, this run "
                                 f"has {self.state_dict()[key]!r} (the mixture's sources and weights, the seed and the "
                                 "global batch must stay; the world size may change)")
        self.step = int(state["mixture_step"])
