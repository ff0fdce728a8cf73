"""Sampling from a causal LM, with each block's decoding state (`LMHeadModel.decode`: the
Transformer's keys and values, GAM's last k - 1 normalized conv inputs, Mamba's conv and SSM states)
so that each new token costs one position, not the whole window. `use_cache=False` recomputes the
window for every token instead (the reference the cached path is tested against).

The model sees at most `block_size` tokens, as in training: once the text is longer, each new
token is computed from the last block_size tokens, positions restarting at 0 (the window slides).
Then every position moves with each token and no state carries over: both modes run the full
forward over the window. A Mamba prompt is fed one `step` at a time (its scan keeps no final state),
so a long Mamba prompt costs a Python loop over its tokens."""
from __future__ import annotations

import torch

from ..models.common import DecodeCache


def check_prompt(model, prompt_ids: list[int], top_k: int) -> None:
    if not prompt_ids:
        raise ValueError("the prompt is empty (it encodes to no tokens); give at least one character (the "
                         "default prompt is a newline)")
    vocab = getattr(getattr(model, "cfg", None), "vocab_size", None)
    if vocab and not all(0 <= i < vocab for i in prompt_ids):
        raise ValueError(f"the prompt holds token ids outside the model's vocabulary of {vocab}: is tokenizer.json "
                         "the one the model was trained with?")
    if top_k < 0:
        raise ValueError(f"top_k (--top-k) must be 0 (no limit) or positive, got {top_k}")


def next_token(logits: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator) -> torch.Tensor:
    """(B, 1) token ids from the last position's logits (B, V): argmax at temperature 0, else sampled."""
    logits = logits.float().cpu()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int, block_size: int, temperature: float = 0.8,
             top_k: int = 50, seed: int = 0, device: torch.device | str = "cpu", use_cache: bool = True,
             stop=None) -> list[int]:
    """max_new_tokens token ids after the prompt (fewer when `stop(ids so far)` turns true); temperature 0 is greedy."""
    check_prompt(model, prompt_ids, top_k)
    was_training = model.training
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    cache, fed = DecodeCache(len(model.blocks)), 0  # fed: tokens of idx the cache has seen
    for _ in range(max_new_tokens):
        if not use_cache or idx.shape[1] > block_size:
            logits = model(idx[:, -block_size:])[:, -1]
        else:
            logits = model.decode(idx[:, fed:], cache)[:, -1]
            fed = idx.shape[1]
        nxt = next_token(logits, temperature, top_k, gen)
        idx = torch.cat([idx, nxt.to(idx.device)], dim=1)
        if stop is not None and stop(idx[0, len(prompt_ids):].tolist()):
            break
    model.train(was_training)
    return idx[0, len(prompt_ids):].tolist()
