"""What a model can see and recall.

Receptive field: how far back the output at position t depends on the input, measured as the
gradient of the logits at t with respect to the token embeddings at every s <= t (float64, eval
mode). A GAM's memory bank is the same for every input, so its only cross-token path is the causal
conv: the field is exactly 1 + L(k-1) tokens. Attention and the SSM scan see the whole prefix.

Associative recall (multi-query associative recall, Arora et al. 2023 "Zoology" style): a sequence
holds n key-value pairs, then the keys again in a shuffled order; the model must output each key's
value after seeing the key. Accuracy is measured on those answer positions only. Recalling a value
needs a path from the query back to wherever its pair was, which a fixed receptive field cannot
provide once the pairs lie beyond it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..accel import apply_accel
from ..models import ModelConfig, build_model


# ---- receptive field ----------------------------------------------------------------------------
def input_gradient_profile(model: torch.nn.Module, seq_len: int, position: int, seed: int = 0) -> torch.Tensor:
    """|d logits[position] / d embedding[s]| for every s (zero beyond `position` by causality)."""
    model = model.double().eval()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, model.cfg.vocab_size, (1, seq_len), generator=g)
    captured = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured["emb"] = output

    handle = model.tok_emb.register_forward_hook(keep)
    try:
        logits = model(idx)
        direction = torch.randn(logits.shape[-1], generator=g, dtype=logits.dtype)
        (logits[0, position] @ direction).backward()
    finally:
        handle.remove()
    return captured["emb"].grad[0].norm(dim=-1)


def receptive_field(model: torch.nn.Module, seq_len: int | None = None, position: int | None = None) -> int:
    """Number of tokens (position included) whose embedding changes the output at `position`."""
    seq_len = seq_len or model.cfg.block_size
    position = seq_len - 1 if position is None else position
    profile = input_gradient_profile(model, seq_len, position)
    nonzero = torch.nonzero(profile[: position + 1] > 0).flatten()
    return int(position - nonzero.min() + 1) if nonzero.numel() else 0


# ---- associative recall -------------------------------------------------------------------------
@dataclass
class RecallTask:
    seq_len: int = 64
    pairs: int = 8  # key-value pairs stored (each queried once)
    vocab: int = 128  # keys from [2, vocab/2), values from [vocab/2, vocab); 0 = filler, 1 = unused

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.vocab // 2
        if 4 * self.pairs > self.seq_len:
            raise ValueError(f"{self.pairs} pairs and their queries need {4 * self.pairs} tokens > seq_len {self.seq_len}")
        if self.pairs > half - 2:
            raise ValueError(f"{self.pairs} distinct keys do not fit a vocabulary of {self.vocab}")
        inputs = torch.zeros(batch_size, self.seq_len, dtype=torch.long)
        targets = torch.full((batch_size, self.seq_len), -100, dtype=torch.long)
        for b in range(batch_size):
            keys = torch.randperm(half - 2, generator=generator)[: self.pairs] + 2
            values = torch.randint(half, self.vocab, (self.pairs,), generator=generator)
            inputs[b, 0 : 2 * self.pairs : 2] = keys
            inputs[b, 1 : 2 * self.pairs : 2] = values
            order = torch.randperm(self.pairs, generator=generator)
            start = self.seq_len - 2 * self.pairs  # queries at the end, after a filler gap
            inputs[b, start::2] = keys[order]
            inputs[b, start + 1 :: 2] = values[order]
            targets[b, start : self.seq_len : 2] = values[order]  # predict the value from its key
        return inputs, targets


def train_recall(arch_cfg: ModelConfig, task: RecallTask, steps: int = 300, batch_size: int = 32, lr: float = 3e-3,
                 seed: int = 0, eval_batches: int = 8, device: str = "cpu") -> dict:
    torch.manual_seed(seed)
    model = apply_accel(build_model(arch_cfg), "none", device).to(device)  # Mamba: the scan model.scan picks
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    model.train()
    for step in range(steps):
        inputs, targets = (t.to(device) for t in task.batch(batch_size, g))
        for group in opt.param_groups:  # short warm-up, then cosine
            group["lr"] = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        logits = model(inputs)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    correct = total = 0
    eval_g = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for _ in range(eval_batches):
            inputs, targets = (t.to(device) for t in task.batch(batch_size, eval_g))
            predicted = model(inputs).argmax(-1)
            mask = targets != -100
            correct += int((predicted[mask] == targets[mask]).sum())
            total += int(mask.sum())
    return {"accuracy": correct / total, "chance": 1 / (task.vocab - task.vocab // 2), "final_train_loss": loss.item(),
            "seconds": time.perf_counter() - started, "params": model.num_parameters()}
