"""Validation loss and perplexity over a whole split: the token-weighted mean cross-entropy, or with
mean="batches" the mean of the batches' mean losses (the paper's evaluate; its last batch may be
smaller, so its tokens weigh more)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data.shards import validation_batches


@torch.no_grad()
def evaluate(model, shard_set, split: str, batch_size: int, device, autocast, max_batches: int = 0,
             mean: str = "tokens") -> dict:
    was_training = model.training
    model.eval()
    total_loss, total_tokens, batch_means = 0.0, 0, []
    for inputs, targets in validation_batches(shard_set, split, batch_size, max_batches):
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast():
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")
        total_loss += loss.item()
        total_tokens += targets.numel()
        batch_means.append(loss.item() / targets.numel())
    model.train(was_training)
    if mean == "batches":
        value = sum(batch_means) / max(len(batch_means), 1)
    else:
        value = total_loss / max(total_tokens, 1)
    return {"val_loss": value, "val_ppl": math.exp(min(value, 50.0)), "val_tokens": total_tokens}
