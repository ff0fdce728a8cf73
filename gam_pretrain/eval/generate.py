"""Sampling from a causal LM (recomputes the window each token: simple, and the same for every family)."""
from __future__ import annotations

import torch


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int, block_size: int, temperature: float = 0.8,
             top_k: int = 50, seed: int = 0, device: torch.device | str = "cpu") -> list[int]:
    if not prompt_ids:
        raise ValueError("the prompt is empty (it encodes to no tokens); give at least one character (the "
                         "default prompt is a newline)")
    vocab = getattr(getattr(model, "cfg", None), "vocab_size", None)
    if vocab and not all(0 <= i < vocab for i in prompt_ids):
        raise ValueError(f"the prompt holds token ids outside the model's vocabulary of {vocab}: is tokenizer.json "
                         "the one the model was trained with?")
    if top_k < 0:
        raise ValueError(f"top_k (--top-k) must be 0 (no limit) or positive, got {top_k}")
    was_training = model.training
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        logits = model(idx[:, -block_size:])[:, -1, :].float().cpu() / max(temperature, 1e-6)
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1, None]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)
        idx = torch.cat([idx, nxt.to(idx.device)], dim=1)
    model.train(was_training)
    return idx[0, len(prompt_ids):].tolist()
