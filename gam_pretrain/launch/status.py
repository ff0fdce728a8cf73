"""`gam-pretrain status RUN_DIR`: where a (launched) run stands, from its files plus SLURM's view.

Reads launch.json (job ids), attempts.jsonl (one line per start, preemption and finish, written by
the trainer), metrics.jsonl (step, tokens, tokens/s) and the checkpoints; asks `sacct` (or
`squeue`) for the jobs' states when SLURM is reachable.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from ..files import read_json
from ..train.checkpoint import complete_checkpoints
from ..train.summary import SUMMARY, read_summary
from .submit import LAUNCH_RECORD


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill mid-write
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """JobID -> state from sacct (falls back to squeue for running jobs); empty without SLURM."""
    states: dict[str, str] = {}
    if not job_ids:
        return states
    if shutil.which("sacct"):
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
                             capture_output=True, text=True)
        for line in out.stdout.splitlines():
            if "|" in line:
                job, state = line.split("|", 1)
                states[job] = state.split()[0] if state else "UNKNOWN"
    if not states and shutil.which("squeue"):
        out = subprocess.run(["squeue", "-h", "-o", "%i|%T", "-j", ",".join(job_ids)], capture_output=True, text=True)
        for line in out.stdout.splitlines():
            if "|" in line:
                job, state = line.split("|", 1)
                states[job] = state
    return states


def run_state(attempts: list[dict]) -> str:
    """From the last event in attempts.jsonl: finished, preempted at step N (checkpoint written,
    waiting for its requeue or a relaunch), started (running, or stopped without a record), not started."""
    last = attempts[-1].get("event") if attempts else None
    if last == "finished":
        return "finished"
    if last == "preempted":
        return f"preempted at step {attempts[-1].get('step')}"
    return "started" if any(a.get("event") == "start" for a in attempts) else "not started"


def run_status(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run directory {run_dir}")
    launches = read_json(run_dir / LAUNCH_RECORD) if (run_dir / LAUNCH_RECORD).is_file() else []
    attempts = _jsonl(run_dir / "attempts.jsonl")
    starts = [a for a in attempts if a.get("event") == "start"]
    steps = [m for m in _jsonl(run_dir / "metrics.jsonl") if "loss" in m and "step" in m]
    last = steps[-1] if steps else {}
    checkpoints = complete_checkpoints(run_dir)
    finished = bool(attempts) and attempts[-1].get("event") == "finished"
    total_steps = starts[-1]["total_steps"] if starts else None
    step = max(last.get("step", 0), checkpoints[-1][0] if checkpoints else 0)
    tokens_per_s = last.get("tokens_per_s")
    eta_s = None
    if total_steps and tokens_per_s and not finished:
        eta_s = (total_steps - step) * starts[-1]["tokens_per_step"] / tokens_per_s
    job_ids = [str(entry["job_id"]) for entry in launches if entry.get("cluster") == "slurm"]
    states = slurm_states(job_ids)
    summary = read_summary(run_dir) if finished and (run_dir / SUMMARY).is_file() else {}
    return {
        "run_dir": str(run_dir),
        "jobs": [{"job_id": j, "state": states.get(j, "unknown")} for j in job_ids],
        "state": run_state(attempts),
        "step": step, "total_steps": total_steps, "tokens": last.get("tokens"),
        "tokens_per_s": tokens_per_s, "eta_s": eta_s,
        "last_checkpoint": str(checkpoints[-1][1]) if checkpoints else None,
        "attempts": len(starts), "requeues": max(len(starts) - 1, 0),
        "preemptions": sum(1 for a in attempts if a.get("event") == "preempted"),
        "slurm_restart_count": max((a.get("slurm_restart_count", 0) for a in starts), default=0),
        "last_update_s_ago": time.time() - attempts[-1]["time"] if attempts else None,
        "val_loss": summary.get("val_loss"), "val_ppl": summary.get("val_ppl"),
    }


def format_status(s: dict) -> str:
    def dur(seconds):
        if seconds is None:
            return "-"
        h, rem = divmod(int(seconds), 3600)
        return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"

    jobs = ", ".join(f"{j['job_id']} {j['state']}" for j in s["jobs"]) or "none recorded (not launched with `launch`)"
    progress = f"{s['step']:,}" + (f" / {s['total_steps']:,}" if s["total_steps"] else "")
    lines = [
        f"run        {s['run_dir']}",
        f"jobs       {jobs}",
        f"state      {s['state']}",
        f"step       {progress}" + (f"  ({s['tokens']:,} tokens)" if s["tokens"] else ""),
        f"speed      {s['tokens_per_s']:,.0f} tokens/s" if s["tokens_per_s"] else "speed      -",
        f"eta        {dur(s['eta_s'])}",
        f"checkpoint {s['last_checkpoint'] or '-'}",
        f"attempts   {s['attempts']} ({s['requeues']} requeues/resumes, {s['preemptions']} preemption saves, "
        f"SLURM restart count {s['slurm_restart_count']})",
    ]
    if s["val_loss"] is not None:
        lines.append(f"result     val loss {s['val_loss']:.4f}, ppl {s['val_ppl']:.2f}")
    return "\n".join(lines)
