"""Batches of contiguous blocks from a flat token array, with a resumable position.

The token stream is cut the way the paper cut WikiText: concatenate everything, then take
non-overlapping windows of block_size + 1 tokens (inputs and next-token targets share all but one
token; sample i starts at i * block_size). Each epoch visits every window once in an order drawn
from (seed, epoch). The loader's whole state is (epoch, position, seed, world_size): a resume is
arithmetic, not a replay.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


class BlockLoader:
    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_samples = (len(tokens) - 1) // block_size
        if self.num_samples < batch_size * world_size:
            raise ValueError(
                f"the training split has {self.num_samples} blocks of {block_size + 1} tokens, fewer than one "
                f"global batch ({batch_size} x {world_size}); use a smaller batch or block size"
            )
        self.epoch = 0
        self.position = 0  # samples of the current epoch already handed out, summed over ranks
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def _take(self, n: int) -> np.ndarray:
        picked = []
        while n > 0:
            chunk = self._order[self.position : self.position + n]
            picked.append(chunk)
            self.position += len(chunk)
            n -= len(chunk)
            if self.position == self.num_samples:
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
        return np.concatenate(picked)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        global_batch = self._take(self.batch_size * self.world_size)
        mine = global_batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return self._gather(mine)

    def _gather(self, sample_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        starts = sample_ids * self.block_size
        rows = np.stack([self.tokens[s : s + self.block_size + 1] for s in starts]).astype(np.int64)
        batch = torch.from_numpy(rows)
        return batch[:, :-1], batch[:, 1:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    @property
    def epoch_progress(self) -> float:
        return self.epoch + self.position / self.num_samples

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "world_size": self.world_size,
                "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_samples"):
            if state[key] != getattr(self, key):
                raise ValueError(f"loader state was saved with {key}={state[key]}, this run has {getattr(self, key)}")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._epoch_order(self.epoch)


def validation_batches(tokens: np.ndarray, block_size: int, batch_size: int,
                       max_batches: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The whole split in order (the last batch may be smaller); max_batches > 0 stops early."""
    num_samples = (len(tokens) - 1) // block_size
    for b, start in enumerate(range(0, num_samples, batch_size)):
        if max_batches and b >= max_batches:
            return
        ids = np.arange(start, min(start + batch_size, num_samples))
        rows = np.stack([tokens[i * block_size : i * block_size + block_size + 1] for i in ids]).astype(np.int64)
        batch = torch.from_numpy(rows)
        yield batch[:, :-1], batch[:, 1:]
