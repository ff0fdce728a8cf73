"""The training loop. It knows nothing about how a step is executed: that is the engine's job."""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from ..config import RunConfig, dump_yaml, to_dict, validate
from ..data import ShardLoader, ShardSet
from ..data.cache import open_training_data
from ..eval.perplexity import evaluate
from ..models import build_model
from .checkpoint import save_checkpoint
from .engine import Engine, SingleEngine
from .metrics import MetricsLogger
from .perf import peak_flops
from .schedule import lr_at


@dataclass
class RunResult:
    run_dir: Path
    summary: dict
    model: torch.nn.Module
    data: ShardSet


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name} but no CUDA device is available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_run_dir(cfg: RunConfig) -> Path:
    name = cfg.train.run_name or f"{cfg.model.arch}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.train.out_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def train(cfg: RunConfig, log=print) -> RunResult:
    validate(cfg)
    device = resolve_device(cfg.train.device)
    data = open_training_data(cfg.data, cfg.model, log=log)

    seed_everything(cfg.train.seed)
    model = build_model(cfg.model)
    engine: Engine = SingleEngine(model, cfg.optim, device, cfg.train.precision, cfg.train.compile)
    t = cfg.train
    micro_batch = t.batch_size // t.grad_accum
    loader = ShardLoader(data, "train", micro_batch, seed=t.seed, rank=engine.rank, world_size=engine.world_size,
                         num_workers=cfg.data.num_workers)
    steps_per_epoch = loader.batches_per_epoch / t.grad_accum
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    tokens_per_step = t.batch_size * engine.world_size * cfg.model.block_size

    run_dir = make_run_dir(cfg)
    dump_yaml(cfg, run_dir / "config.yaml")
    metrics = MetricsLogger(run_dir, cfg.logging, to_dict(cfg), run_dir.name, enabled=engine.rank == 0)
    flops_per_token = model.flops_per_token(cfg.model.block_size)
    peak = peak_flops(device, t.peak_flops)
    n_params = model.num_parameters()
    log(f"{cfg.model.arch}: {n_params:,} parameters, {flops_per_token / 1e6:.1f} MFLOPs/token, {total_steps} steps "
        f"of {tokens_per_step:,} tokens ({total_steps / steps_per_epoch:.2f} epochs) on {device}; run dir {run_dir}")

    def run_eval(step: int) -> dict:
        result = evaluate(engine.model, data, "validation", micro_batch, device, engine.autocast, t.eval_batches)
        metrics.log({"step": step, **result})
        return result

    progress = None
    if t.progress and engine.rank == 0:
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, desc=cfg.model.arch, unit="step", dynamic_ncols=True)

    history: list[dict] = []
    train_seconds = 0.0
    window_tokens, window_start = 0, time.perf_counter()
    last_eval: dict = {}
    for step in range(total_steps):
        step_start = time.perf_counter()
        lr = lr_at(step, total_steps, cfg.optim)
        loss_sum = torch.zeros((), device=device)
        for _ in range(t.grad_accum):
            inputs, targets = loader.next_batch()
            loss_sum += engine.forward_backward(inputs, targets, 1.0 / t.grad_accum)
        grad_norm = engine.optimizer_step(lr)
        loss = loss_sum.item() / t.grad_accum
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {step}; lower optim.lr or check the data")
        train_seconds += time.perf_counter() - step_start
        window_tokens += tokens_per_step
        history.append({"step": step + 1, "loss": loss})
        if (step + 1) % t.log_interval == 0 or step + 1 == total_steps:
            elapsed = time.perf_counter() - window_start
            tps = window_tokens / elapsed
            record = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps,
                      "mfu": tps * flops_per_token / peak, "epoch": loader.epoch_progress,
                      "tokens": (step + 1) * tokens_per_step}
            metrics.log(record)
            window_tokens, window_start = 0, time.perf_counter()
            if progress is not None:
                progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
        if progress is not None:
            progress.update(1)
        if t.eval_interval and (step + 1) % t.eval_interval == 0 and step + 1 < total_steps:
            last_eval = run_eval(step + 1)
            window_start = time.perf_counter()  # keep eval time out of tokens/s
    if progress is not None:
        progress.close()
    last_eval = run_eval(total_steps)

    save_checkpoint(run_dir / "checkpoints" / f"step_{total_steps:08d}", engine.state_dict(),
                    {"step": total_steps, "tokens": total_steps * tokens_per_step, "loader": loader.state_dict(),
                     "data_fingerprint": data.fingerprint, "arch": cfg.model.arch})
    summary = {
        "arch": cfg.model.arch, "params": n_params, "flops_per_token": flops_per_token, "steps": total_steps,
        "tokens": total_steps * tokens_per_step, "train_seconds": train_seconds,
        "tokens_per_s": total_steps * tokens_per_step / train_seconds, "peak_flops": peak,
        "mfu": total_steps * tokens_per_step * flops_per_token / train_seconds / peak,
        "final_train_loss": history[-1]["loss"], **last_eval, "device": str(device),
        "data": str(data.path), "loss_curve": [h["loss"] for h in history],
    }
    import json

    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    metrics.close()
    return RunResult(run_dir, summary, engine.model, data)
