"""Our models as an lm-evaluation-harness LM (`lm_eval`'s Python API), for `gam-pretrain evaluate`.

The three request types, batched:
- loglikelihood(context, continuation): the continuation's summed log-probability and whether it
  is the greedy continuation, from one forward over the last block_size + 1 tokens of context +
  continuation (sequences are right-padded in a batch: the models are causal, so padding after a
  sequence never reaches its positions);
- loglikelihood_rolling(text): the whole text's log-probability, in the harness's disjoint windows
  of block_size tokens (each predicting its tokens from up to block_size of context, the first from
  the end-of-text token);
- generate_until(context, {until, max_gen_toks, temperature, do_sample}): decoding with state
  (`eval/generate.py`), greedy unless asked to sample, cut at the first stop string.
"""
from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ..data.tokenizer import eos_id
from .generate import generate


class GamPretrainLM(TemplateLM):
    def __init__(self, model, tokenizer, batch_size: int = 16, device: str | torch.device = "cpu",
                 max_gen_toks: int = 256):
        super().__init__()
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self._device = torch.device(device)
        self.max_gen_toks = max_gen_toks
        self.block_size = model.cfg.block_size
        eot = eos_id(tokenizer)
        if eot is None:
            raise ValueError("the tokenizer has no end-of-text token (one of <eos>, <|endoftext|>, </s>, [EOS]): "
                             "the harness needs one to score texts from their start")
        self._eot = eot

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return "gam-pretrain"

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        return self._eot

    @property
    def max_length(self) -> int:
        return self.block_size

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False).ids  # as prep encodes

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    @torch.no_grad()
    def _log_probs(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(summed log-probability of `target`, whether it is the argmax at every position) for each
        (context, target) token pair, in batches; the input is cut to the last block_size tokens."""
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            inputs = [(pairs[i][0] + pairs[i][1])[-(self.block_size + 1):][:-1] for i in batch]
            width = max(len(x) for x in inputs)
            ids = torch.tensor([x + [0] * (width - len(x)) for x in inputs], device=self.device)
            log_probs = F.log_softmax(self.model(ids).float(), dim=-1)
            for row, i in enumerate(batch):
                target = pairs[i][1]
                end = len(inputs[row])
                positions = log_probs[row, end - len(target):end]
                wanted = torch.tensor(target, dtype=torch.long, device=self.device)
                total = positions.gather(1, wanted[:, None]).sum().item()
                results[i] = (total, bool((positions.argmax(dim=-1) == wanted).all()))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = self._log_probs([(context, continuation) for _, context, continuation in requests])
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (text,) in (request.args for request in requests):
            windows = [make_disjoint_window(window) for window in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.block_size,
                context_len=1)]
            total = sum(log_prob for log_prob, _ in self._log_probs(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in (request.args for request in requests):
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = kwargs.pop("max_gen_toks", self.max_gen_toks)
            temperature = float(kwargs.pop("temperature", 1.0)) if kwargs.pop("do_sample", False) else 0.0
            prompt = self.tok_encode(context) or [self.prefix_token_id]

            def stopped(ids: list[int]) -> bool:
                return ids[-1] == self.eot_token_id or any(stop and stop in self.tok_decode(ids) for stop in until)

            ids = generate(self.model, prompt, max_new, self.block_size, temperature=temperature, top_k=0,
                           device=self.device, stop=stopped)
            if self.eot_token_id in ids:
                ids = ids[:ids.index(self.eot_token_id)]
            text = self.tok_decode(ids)
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


def task_manager(tasks: list[str], include_path: str | None = None):
    """lm_eval's TaskManager (the harness's tasks, plus the YAMLs in `include_path`), with every name
    in `tasks` checked: an unknown one is one line."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    if not tasks:
        raise ValueError("--tasks names no task (comma-separated lm_eval task names)")
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {', '.join(unknown)} (lm_eval's task names, or YAMLs in "
                         "--include-path)")
    return manager


def evaluate_tasks(model, tokenizer, tasks: list[str], manager, batch_size: int = 16, device: str = "cpu",
                   limit: int | None = None, num_fewshot: int | None = None, log_samples: bool = False) -> dict:
    """lm_eval.simple_evaluate over our model, on tasks a `task_manager` checked."""
    from lm_eval import simple_evaluate

    with contextlib.redirect_stdout(sys.stderr):  # the harness prints progress notes; stdout is for results
        return simple_evaluate(model=GamPretrainLM(model, tokenizer, batch_size=batch_size, device=device),
                               tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                               log_samples=log_samples, batch_size=batch_size, device=device)
