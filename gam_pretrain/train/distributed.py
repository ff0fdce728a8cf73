"""Process-group set-up from the launcher's environment: torchrun / deepspeed (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT) or SLURM srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the first
host of SLURM_JOB_NODELIST). gloo on CPU, nccl on GPU."""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: scontrol's expansion, else "gpu[07-10,12],cpu1" -> "gpu07"."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        match = re.match(r"([^,\[]*)(?:\[([^\],\-]*))?", nodelist)
        return match.group(1) + (match.group(2) or "")


def rendezvous_port(job_id: str | int) -> int:
    """The default MASTER_PORT of a SLURM job: every rank derives the same one from the job id, and
    jobs sharing a node rarely collide (an exported MASTER_PORT wins). Array ids ("123_4") count
    their digits."""
    digits = "".join(c for c in str(job_id) if c.isdigit()) or "0"
    return 20000 + int(digits) % 20000


def set_rank_environment(rank: int, world_size: int, local_rank: int, master_addr: str, job_id: str | int) -> None:
    """RANK/WORLD_SIZE/LOCAL_RANK for this process, MASTER_ADDR/PORT unless already exported."""
    env = os.environ
    env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(rank), str(world_size), str(local_rank)
    env.setdefault("MASTER_ADDR", master_addr)
    env.setdefault("MASTER_PORT", str(rendezvous_port(job_id)))


def env_dist_info() -> DistInfo:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        info = DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
        set_rank_environment(info.rank, info.world_size, info.local_rank,
                             first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")), env.get("SLURM_JOB_ID", "0"))
        return info
    return DistInfo()


def init_distributed(device_type: str) -> DistInfo:
    """Joins the process group when launched by torchrun/deepspeed/srun (even as a single rank,
    which FSDP2 and DeepSpeed need); a plain `python` run stays a single process without one."""
    info = env_dist_info()
    launched = "RANK" in os.environ and "MASTER_ADDR" in os.environ
    if (info.world_size > 1 or launched) and not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return info


def require_process_group(engine_kind: str) -> None:
    """ddp, fsdp2 and deepspeed run in the processes a launcher starts (even one: FSDP2 and DeepSpeed
    need its process group). A plain process would end in torch's raw 'environment variable RANK
    expected', or train as the single engine under another name."""
    if engine_kind in ("ddp", "fsdp2", "deepspeed") and not dist.is_initialized():
        raise ValueError(f"engine.kind={engine_kind} needs a distributed launch: run it under torchrun "
                         "(torchrun --nproc_per_node N -m gam_pretrain train ...), srun, or `gam-pretrain launch "
                         "train`; or use engine.kind=single")


def decided_on_main(decide, info: DistInfo, group=None):
    """decide() run on rank 0, its result returned on every rank (of `group`, default all). An error
    it raises is raised on every rank, so no rank goes on to a collective that rank 0 will never join."""
    result, error = None, None
    if info.is_main:
        try:
            result = decide()
        except Exception as e:  # noqa: BLE001 - whatever stops rank 0 must stop the others too
            if info.world_size == 1:
                raise
            error = e
    if info.world_size > 1:
        box = [result, error]
        dist.broadcast_object_list(box, src=0, group=group)
        result, error = box
    if error is not None:
        raise error
    return result


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)
