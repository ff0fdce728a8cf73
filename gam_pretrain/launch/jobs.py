"""What runs inside a job submitted by `gam-pretrain launch` (submitit pickles these callables).

A training job is one task per rank (srun starts them all; no torchrun in between, so SLURM's
`--signal` reaches every rank directly). On USR2 before the time limit, on preemption or on
SIGTERM, the trainer's synchronized save runs (train/preemption.py); then rank 0 requeues the job
with `scontrol requeue` and every rank exits without a result, so submitit keeps waiting and the
requeued job resumes from the latest complete checkpoint in the same run directory (and the same
wandb run). submitit's own signal handler is replaced: it would checkpoint inside the handler,
which cannot be synchronized across ranks.
"""
from __future__ import annotations

import os
import subprocess
import sys

from ..train.distributed import set_rank_environment
from ..train.preemption import EXIT_REQUEUE, Preempted, catch_early_signals


def _rank_environment() -> None:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from submitit's view of the job (SLURM or local)."""
    import submitit

    env = submitit.JobEnvironment()
    set_rank_environment(env.global_rank, env.num_tasks, env.local_rank, env.hostnames[0], env.job_id)


def slurm_job_id() -> str | None:
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def requeue_and_exit(max_requeues: int, step: int) -> None:
    """After the preemption checkpoint: rank 0 requeues the job; every rank exits without a result."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    code = EXIT_REQUEUE
    job_id = slurm_job_id()
    if os.environ.get("RANK", "0") == "0" and job_id:
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", 0))
        if restarts >= max_requeues:
            print(f"gam-pretrain: checkpoint at step {step} written, but the job was requeued {restarts} times "
                  f"(launch.max_requeues); not requeueing. Launch again to continue.", file=sys.stderr)
            code = 1
        else:
            out = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
            said = (out.stdout + out.stderr).strip()
            print(f"gam-pretrain: checkpoint at step {step} written; scontrol requeue {job_id}: "
                  f"{'ok' if out.returncode == 0 else said}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class TrainJob:
    """`gam-pretrain train` with a config dict, as a submitit job (one instance per rank)."""

    def __init__(self, cfg_dict: dict):
        self.cfg_dict = cfg_dict

    def __call__(self) -> dict:
        catch_early_signals()
        import torch.distributed as dist

        from ..config import config_from_dict, validate
        from ..train.loop import params_checksum, train

        _rank_environment()
        cfg = validate(config_from_dict(self.cfg_dict))
        try:
            result = train(cfg)
        except Preempted as e:
            requeue_and_exit(cfg.launch.max_requeues, e.step)
        # This rank's own full copy of the weights (every rank under DDP/ZeRO-1/2; rank 0 only when
        # sharded, where the call gathers): lets a caller check that replicas agree.
        local = result.engine.full_state_dict()
        out = {"rank": int(os.environ["RANK"]), "run_dir": str(result.run_dir),
               "local_params_checksum": params_checksum(local) if local else None,
               "summary": {k: v for k, v in result.summary.items() if k != "loss_curve"}}
        if dist.is_initialized():
            dist.destroy_process_group()
        return out


def prep_plan_job(cfg_dict: dict, out_dir: str) -> dict:
    from ..data.prep import plan_prep, prep_config_from_dict

    return plan_prep(prep_config_from_dict(cfg_dict), out_dir)["units"]


def prep_units_job(out_dir: str, task_index: int, task_count: int) -> int:
    from ..data.prep import run_units

    return run_units(out_dir, task_index, task_count)


def prep_finalize_job(out_dir: str) -> dict:
    from ..data.prep import finalize_prep

    manifest = finalize_prep(out_dir)
    return {split: {k: info[k] for k in ("documents", "samples", "tokens")} for split, info in manifest["splits"].items()}
