"""The training loop. It knows nothing about how a step is executed: that is the engine's job."""
from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import math
import os
import random
import resource
import socket
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist

from ..accel import apply_accel
from ..config import ConfigError, OptimConfig, RunConfig, batch_layout, dump_yaml, to_dict, validate, without_later_defaults
from ..data import ShardLoader, ShardSet
from ..data.cache import check_data_available, open_mixture_sources, open_training_data
from ..data.mixture import MixtureLoader
from ..eval.perplexity import evaluate
from ..models import build_model
from .checkpoint import (
    CheckpointError, CheckpointMismatchError, Checkpointer, find_resume_checkpoint, load_checkpoint, verify_checkpoint,
)
from .distributed import DistInfo, barrier, decided_on_main, init_distributed, require_process_group
from .engines import Engine, build_model_and_engine, model_state_bytes
from .metrics import MetricsLogger, duration, progress_line
from .perf import StepProfiler, peak_flops
from .preemption import Preempted, PreemptionFlag
from .schedule import decay_start
from .summary import SUMMARY, read_summary, write_summary

LOCK = ".lock"


@dataclass
class RunResult:
    run_dir: Path
    summary: dict
    model: torch.nn.Module
    data: ShardSet
    engine: Engine


def resolve_device(name: str, dist: DistInfo | None = None) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank if dist else 0)
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name} but no CUDA device is available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_run_dir(cfg: RunConfig, dist: DistInfo) -> Path:
    # Under SLURM the default name comes from the job id, which a requeued job keeps: it resumes there.
    job = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ.get("SLURM_JOB_ID"))
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    default = f"slurm{job}" + (f"_{task}" if task else "") if job else datetime.now().strftime("%Y%m%d-%H%M%S")
    name = cfg.train.run_name or f"{cfg.model.arch}-{default}"
    if dist.world_size > 1:  # every rank must use rank 0's name
        box = [name]
        tdist.broadcast_object_list(box, src=0)
        name = box[0]
    run_dir = Path(cfg.train.out_dir) / name
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    return run_dir


def _lock(run_dir: Path, log):
    """An exclusive, non-blocking flock on <run_dir>/.lock (released when the file is closed, or by
    the kernel when the process dies). Returns the open file, or None where the filesystem has no locks."""
    f = open(run_dir / LOCK, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ValueError(f"run dir {run_dir} is in use by another training process (it holds {run_dir / LOCK}); "
                         "wait for it to finish, or train into another train.run_name") from None
    except OSError as e:
        f.close()
        log(f"warning: cannot lock {run_dir / LOCK} ({e.strerror}): nothing stops a second run sharing this dir")
        return None
    return f


@contextlib.contextmanager
def run_dir_lock(run_dir: Path, dist: DistInfo, log):
    """Rank 0 holds the run directory's lock while train() works in it: a second run into the same
    directory is refused, on every rank, instead of interleaving its checkpoints and logs."""
    held = []
    decided_on_main(lambda: held.append(_lock(run_dir, log)), dist)
    try:
        yield
    finally:
        for f in held:
            if f is not None:
                f.close()


def count_total_steps(t, steps_per_epoch: float) -> int:
    """The schedule's length: train.max_steps, else train.epochs worth of steps; never below 1."""
    return t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))


def record_attempt(run_dir: Path, event: dict) -> None:
    """One line per start, preemption and finish in attempts.jsonl (read by `gam-pretrain status`)."""
    env = os.environ
    record = {"time": time.time(), "host": socket.gethostname(), "slurm_job_id": env.get("SLURM_JOB_ID"),
              "slurm_restart_count": int(env.get("SLURM_RESTART_COUNT", 0)), **event}
    with open(run_dir / "attempts.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def params_checksum(state_dict: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state_dict):
        h.update(name.encode())
        h.update(state_dict[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gather_floats(value: float, device: torch.device, dist: DistInfo) -> list[float]:
    if dist.world_size == 1:
        return [value]
    out = [torch.zeros(1, device=device) for _ in range(dist.world_size)]
    tdist.all_gather(out, torch.tensor([value], device=device))
    return [float(t) for t in out]


def agree(flags: list[bool], device: torch.device, dist: DistInfo) -> list[bool]:
    """Each flag true on every rank if true on any (one small collective per step boundary)."""
    if dist.world_size == 1:
        return flags
    t = torch.tensor([float(f) for f in flags], device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]


# what a cooldown branch keeps of the stable run's optimizer settings (its schedule, length and decay
# may differ: the branch decays from where it starts)
BRANCH_KEEPS = ("lr", "warmup_steps", "warmup_from_zero", "decay")


def cooldown_branch(path: Path, log) -> tuple[Path, dict]:
    """The checkpoint a cooldown branch starts from and its trainer state, refused in one line unless
    it is a complete checkpoint of a constant or wsd run taken in its stable phase (at the full rate)."""
    if not (path / "COMPLETE").is_file():
        raise CheckpointError(f"train.cooldown_from {path} is not a complete checkpoint folder (a run's "
                              "checkpoints/step_N)")
    state = verify_checkpoint(path, log)
    optim = state.get("optim") or {}
    if optim.get("schedule") not in ("constant", "wsd"):
        raise CheckpointMismatchError(f"train.cooldown_from {path}: its run's schedule is {optim.get('schedule')!r}; "
                                      "branch from a constant or wsd run")
    stable = OptimConfig(**{k: v for k, v in optim.items() if k in OptimConfig.__dataclass_fields__})
    step = state["step"]
    end = decay_start(state["total_steps"], stable) if stable.schedule == "wsd" else state["total_steps"]
    if not stable.warmup_steps <= step <= end:
        raise CheckpointMismatchError(f"train.cooldown_from {path}: step {step} is not in its run's stable phase "
                                      f"(steps {stable.warmup_steps} to {end})")
    return path, state


def train(cfg: RunConfig, log=print) -> RunResult:
    validate(cfg)
    probe = resolve_device(cfg.train.device)
    dist = init_distributed(probe.type)
    require_process_group(cfg.engine.kind)
    device = resolve_device(cfg.train.device, dist)
    say = log if dist.is_main else (lambda *a, **k: None)
    check_data_available(cfg.data, cfg.model)
    # rank 0 opens (and, with data.prep_if_missing, preps) and checks the data; its error stops every rank
    data = decided_on_main(lambda: open_training_data(cfg.data, cfg.model, log=say), dist)

    if cfg.train.cooldown_from:  # its decay start is set below, once the branch point is known
        cfg = copy.deepcopy(cfg)

    seed_everything(cfg.train.seed)
    engine = build_model_and_engine(cfg, device, dist, accel=lambda m: apply_accel(m, cfg.train.accel, device))
    shape = build_model(cfg.model, materialize=False)  # counted on the meta device: no memory
    n_params = shape.num_parameters()
    flops_per_token = shape.flops_per_token(cfg.model.block_size)
    t = cfg.train
    layout = batch_layout(t, dist.world_size)
    if cfg.data.mixture:
        # rank 0 opened and checked each source with the data; here every rank opens them (an error
        # on rank 0 stops every rank)
        sources = decided_on_main(lambda: open_mixture_sources(cfg.data), dist)
        loader = MixtureLoader(sources, cfg.data.mixture, "train", layout.global_batch, seed=t.seed, rank=dist.rank,
                               world_size=dist.world_size, micro_batch_size=layout.micro_batch_size,
                               max_epochs=cfg.data.mixture_max_epochs)
    else:
        loader = ShardLoader(data, "train", layout.global_batch, seed=t.seed, rank=dist.rank,
                             world_size=dist.world_size, micro_batch_size=layout.micro_batch_size,
                             num_workers=cfg.data.num_workers)
    steps_per_epoch = loader.steps_per_epoch
    total_steps = count_total_steps(t, steps_per_epoch)
    if cfg.data.mixture:
        loader.check_caps(total_steps)
    block = cfg.model.block_size

    def tokens_by_source(step: int) -> dict:
        return {"tokens_by_source": {name: n * block for name, n in loader.samples_by_source(step).items()}} \
            if cfg.data.mixture else {}
    tokens_per_step = cfg.tokens_per_step()
    # validation reads the same sequences at every world size: eval_batches batches of the one-rank
    # micro-batch, in batches of this run's micro-batch (memory), or of the one-rank micro-batch itself
    # where the mean is over batches (eval_mean=batches), so that the value does not depend on the cut
    one_rank_micro = batch_layout(t, 1).micro_batch_size
    eval_batch = one_rank_micro if t.eval_mean == "batches" else layout.micro_batch_size
    eval_batches = t.eval_batches * (one_rank_micro // eval_batch)
    run_dir = make_run_dir(cfg, dist)
    with run_dir_lock(run_dir, dist, say):
        # rank 0 verifies the candidates (hashing their files once) and every rank gets its choice
        found = decided_on_main(lambda: find_resume_checkpoint(run_dir, cfg.checkpoint.resume, log=say), dist)
        branch = None
        if cfg.train.cooldown_from and not found:  # a branch resumed from its own checkpoint needs no other
            branch = decided_on_main(lambda: cooldown_branch(Path(cfg.train.cooldown_from), say), dist)
            if branch[1]["step"] >= total_steps:
                raise ConfigError(f"train.cooldown_from {branch[0]} is at step {branch[1]['step']}, not before this "
                                  f"run's last step {total_steps} (train.max_steps)")
            if cfg.optim.decay_start not in (0, branch[1]["step"]):
                raise ConfigError(f"'optim.decay_start' is {cfg.optim.decay_start}, but train.cooldown_from branches "
                                  f"at step {branch[1]['step']}: leave optim.decay_start unset")
            cfg.optim.decay_start = branch[1]["step"]  # the engine's schedule reads it (the same config object)
        elif cfg.train.cooldown_from and not cfg.optim.decay_start:
            cfg.optim.decay_start = found[1].get("optim", {}).get("decay_start", 0)
        o = cfg.optim
        if o.schedule == "wsd" and o.decay_start and not o.warmup_steps <= o.decay_start < total_steps:
            raise ConfigError(f"'optim.decay_start' {o.decay_start} must lie between the warm-up's end "
                              f"({o.warmup_steps}) and the last step ({total_steps})")
        # what a resume must keep; the world size and the micro-batches may change (see data/shards.py)
        fingerprints = {"data_fingerprint": loader.fingerprint if cfg.data.mixture else data.fingerprint, "model": to_dict(cfg.model),
                        "engine": to_dict(cfg.engine), "global_batch": layout.global_batch,
                        # what the learning-rate schedule depends on: a resume must not change it
                        "total_steps": total_steps, "optim": {"lr": o.lr, "warmup_steps": o.warmup_steps,
                                                              "warmup_from_zero": o.warmup_from_zero, "decay": o.decay,
                                                              "schedule": o.schedule, "min_lr_ratio": o.min_lr_ratio,
                                                              **without_later_defaults(
                                                                  {"decay_fraction": o.decay_fraction,
                                                                   "decay_start": o.decay_start}, "optim.")}}
        resume_from = found[0] if found else None
        start_step, history, train_seconds = 0, [], 0.0
        if found:
            state = load_checkpoint(resume_from, engine, dist, found[1], expect=fingerprints)
            loader.load_state_dict(state["loader"])
            start_step, history, train_seconds = state["step"], state["history"], state["train_seconds"]
            if start_step == total_steps and (run_dir / SUMMARY).is_file():
                say(f"{run_dir} has finished already ({run_dir / SUMMARY}); nothing to do")
                return RunResult(run_dir, read_summary(run_dir), engine.eval_model(), data, engine)
            say(f"resumed from {resume_from} at step {start_step}")
        elif branch:
            path, state = branch
            # the stable run's state, checked against this run's: the same data, model, engine and global
            # batch, and the optimizer settings a branch keeps (its length and decay are its own)
            kept = {**fingerprints, "optim": {k: fingerprints["optim"][k] for k in BRANCH_KEEPS}}
            seen = {**state, "total_steps": total_steps, "optim": {k: state["optim"].get(k) for k in BRANCH_KEEPS}}
            load_checkpoint(path, engine, dist, seen, expect=kept)
            loader.load_state_dict(state["loader"])
            start_step, history, train_seconds = state["step"], state["history"], state["train_seconds"]
            say(f"cooldown branch from {path}: steps {start_step + 1}-{total_steps} decay to "
                f"{o.lr * o.min_lr_ratio:g}")
        if dist.is_main:
            dump_yaml(cfg, run_dir / "config.yaml")
            record_attempt(run_dir, {"event": "start", "start_step": start_step, "total_steps": total_steps,
                                     "tokens_per_step": tokens_per_step, "world_size": dist.world_size,
                                     "resumed_from": str(resume_from) if resume_from else None,
                                     **({"branched_from": str(branch[0])} if branch else {})})
        metrics = MetricsLogger(run_dir, cfg.logging, to_dict(cfg), run_dir.name, enabled=dist.is_main,
                                resume_step=start_step)
        peak = peak_flops(device, t.peak_flops)
        say(f"{cfg.model.arch}: {n_params:,} parameters, {flops_per_token / 1e6:.1f} MFLOPs/token, {total_steps} "
            f"steps of {tokens_per_step:,} tokens ({total_steps / steps_per_epoch:.2f} epochs) on {dist.world_size} x "
            f"{device}, engine {cfg.engine.kind}, global batch {layout.global_batch} = {dist.world_size} ranks x "
            f"{layout.grad_accum} x {layout.micro_batch_size}; run dir {run_dir}")

        def trainer_state(step: int) -> dict:
            return {"step": step, "tokens": step * tokens_per_step, "loader": loader.state_dict(),
                    "history": history, "train_seconds": train_seconds, "arch": cfg.model.arch, "params": n_params,
                    "data_path": data.where, "world_size": dist.world_size,
                    "micro_batch_size": layout.micro_batch_size, "grad_accum": layout.grad_accum, **fingerprints}

        c = cfg.checkpoint
        checkpointer = Checkpointer(run_dir, engine, dist, c.keep_last, c.keep_every, c.async_save, c.keep_steps)

        def checkpoint(step: int, blocking: bool = False) -> Path:
            return checkpointer.save(step, trainer_state(step), blocking=blocking)

        def run_eval(step: int) -> dict:
            result = evaluate(engine.eval_model(), data, "validation", eval_batch, device, engine.autocast, eval_batches,
                              mean=t.eval_mean)
            metrics.log({"step": step, **result})
            return result

        progress = None
        # a terminal gets a bar; a log file (a SLURM job's stdout) one plain line per log interval
        plain_lines = t.progress and not sys.stdout.isatty()
        if t.progress and dist.is_main and not plain_lines:
            from tqdm.auto import tqdm

            progress = tqdm(total=total_steps, initial=start_step, desc=cfg.model.arch, unit="step",
                            dynamic_ncols=True)

        sample_log = None
        if cfg.data.log_sample_ids:
            (run_dir / "sample_ids").mkdir(exist_ok=True)
            sample_log = open(run_dir / "sample_ids" / f"rank{dist.rank:05d}.jsonl", "a", buffering=1)  # a line at a time
        preemption = PreemptionFlag()
        profiler = StepProfiler(t.profile_steps, run_dir, dist.rank, device, say)
        last_save = time.monotonic()
        window_tokens, window_steps, window_start = 0, 0, time.perf_counter()
        try:
            for step in range(start_step, total_steps):
                profiler.before(step + 1)
                step_start = time.perf_counter()
                batches = loader.next_step()
                if sample_log is not None:
                    sample_log.write(json.dumps({"step": step + 1, "ids": loader.last_sample_ids.tolist()}) + "\n")
                step_result = engine.train_step(batches, step, total_steps)
                loss = step_result.loss
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {step + 1}; lower optim.lr or check the "
                                             "data")
                train_seconds += time.perf_counter() - step_start
                window_tokens += tokens_per_step
                window_steps += 1
                history.append(loss)
                done = step + 1
                profiler.after(done)
                if done % t.log_interval == 0 or done == total_steps:
                    window_seconds = time.perf_counter() - window_start
                    tps = window_tokens / window_seconds
                    mem = gather_floats(memory_mb(device), device, dist)
                    metrics.log({"step": done, "loss": loss, "lr": step_result.lr,
                                 "grad_norm": step_result.grad_norm, "tokens_per_s": tps,
                                 "mfu": tps * flops_per_token / peak, "epoch": loader.epoch_progress,
                                 "tokens": done * tokens_per_step, "memory_mb": mem, **tokens_by_source(done)})
                    if plain_lines:
                        say(progress_line(done, total_steps, loss, step_result.lr, tps, tps * flops_per_token / peak,
                                          (total_steps - done) * window_seconds / window_steps))
                    window_tokens, window_steps, window_start = 0, 0, time.perf_counter()
                    if progress is not None:
                        progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
                if progress is not None:
                    progress.update(1)
                if t.eval_interval and done % t.eval_interval == 0 and done < total_steps:
                    run_eval(done)
                    window_start = time.perf_counter()
                if done == total_steps:
                    break
                due_steps = (bool(c.interval_steps) and done % c.interval_steps == 0) or done in c.keep_steps
                due_time = bool(c.interval_minutes) and time.monotonic() - last_save >= 60 * c.interval_minutes
                preempt, due_time = agree([preemption.requested, due_time], device, dist)
                if due_steps or due_time or preempt:
                    checkpoint(done, blocking=preempt)  # a periodic save writes in the background
                    last_save = time.monotonic()
                if preempt:
                    say(f"preemption signal: checkpoint at step {done} written; exiting for requeue")
                    if dist.is_main:
                        record_attempt(run_dir, {"event": "preempted", "step": done, "signal": preemption.name})
                    raise Preempted(done)
                if done == t.stop_at_step:
                    if not (due_steps or due_time):
                        checkpoint(done)
                    checkpointer.close()
                    say(f"stopped at step {done} (train.stop_at_step); resume to continue")
                    metrics.close()
                    return RunResult(run_dir, {"stopped_at": done, "loss_curve": history}, engine.eval_model(), data,
                                     engine)
        except BaseException:
            with contextlib.suppress(Exception):  # a save in flight completes; the first error is the one raised
                checkpointer.close()
            raise
        finally:
            profiler.close()
            preemption.restore()
            if sample_log is not None:
                sample_log.close()
            if progress is not None:
                progress.close()

        # the final checkpoint first: a failure in the final eval must not cost the run's compute
        final = checkpoint(total_steps, blocking=True) if start_step < total_steps else resume_from
        checkpointer.close()
        last_eval = run_eval(total_steps)
        full = engine.full_state_dict()
        state_bytes = gather_floats(float(model_state_bytes(engine)), device, dist)
        summary = {
            "arch": cfg.model.arch, "params": n_params, "flops_per_token": flops_per_token, "steps": total_steps,
            "tokens": total_steps * tokens_per_step, "train_seconds": train_seconds,
            # train_seconds adds up every attempt's training time (it is checkpointed), so count every step
            "tokens_per_s": total_steps * tokens_per_step / max(train_seconds, 1e-9),
            "peak_flops": peak,
            "mfu": total_steps * tokens_per_step * flops_per_token / max(train_seconds, 1e-9) / peak,
            "final_train_loss": history[-1] if history else float("nan"), **last_eval, "device": str(device),
            "world_size": dist.world_size, "engine": cfg.engine.kind, "data": str(data.path),
            "model_state_bytes_per_rank": [int(b) for b in state_bytes],
            "checkpoint": str(final), "params_checksum": params_checksum(full) if dist.is_main else None,
            "loss_curve": history, **tokens_by_source(total_steps),
            # a cooldown branch: the steps before it were the stable run's (its compute is theirs)
            **({"branch_step": cfg.optim.decay_start, "branched_from": cfg.train.cooldown_from}
               if cfg.train.cooldown_from else {}),
        }
        if dist.is_main:
            write_summary(run_dir, summary)
            record_attempt(run_dir, {"event": "finished", "step": total_steps})
        metrics.close()
        say(f"{cfg.model.arch}: finished {total_steps} steps, {summary['tokens']:,} tokens in {duration(train_seconds)} "
            f"({summary['tokens_per_s']:,.0f} tokens/s); validation loss {last_eval['val_loss']:.4f}, perplexity "
            f"{last_eval['val_ppl']:.2f}; run dir {run_dir}")
        return RunResult(run_dir, summary, engine.eval_model(), data, engine)
