"""Running a sweep: locally (one run after another, or N at a time) or as a SLURM job array.

Each run is a plain training run in its content-addressed directory, so the trainer's own
machinery does the bookkeeping: a finished run has summary.json and is skipped; an interrupted
one resumes from its latest complete checkpoint (`checkpoint.resume: auto`).
"""
from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import time
from pathlib import Path

from ..config import config_from_dict, to_dict
from ..files import read_json, write_atomic
from ..train.checkpoint import complete_checkpoints
from ..train.summary import SUMMARY, read_summary
from .spec import SweepRun, SweepSpec

RUN_RECORD = "sweep_run.json"


def run_state(run: SweepRun) -> dict:
    run_dir = run.run_dir
    if (run_dir / SUMMARY).is_file():
        summary = read_summary(run_dir)
        return {"state": "done", "step": summary.get("steps"), "val_loss": summary.get("val_loss")}
    checkpoints = complete_checkpoints(run_dir)
    if checkpoints:
        return {"state": "partial", "step": checkpoints[-1][0], "val_loss": None}
    return {"state": "pending", "step": 0, "val_loss": None}


def write_run_record(run: SweepRun) -> None:
    """What `fit` reads besides summary.json: family, width, budget, parameters, FLOPs per token."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run.run_dir / RUN_RECORD, json.dumps(run.describe(), indent=1))


def write_records(spec: SweepSpec, runs: list[SweepRun]) -> None:
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "sweep.json", json.dumps({"name": spec.name, "runs": [r.describe() for r in runs]}, indent=1))
    for run in runs:
        write_run_record(run)


def prepare_data(spec: SweepSpec, runs: list[SweepRun], log=print) -> None:
    """Prep (or check) the data once, before runs start in parallel or on other machines."""
    from ..data.cache import open_training_data

    if runs:  # every run of a sweep shares its data settings and tokenizer
        open_training_data(runs[0].config.data, runs[0].config.model, log=log)


def _train_one(cfg_dict: dict, threads: int) -> tuple[str, str]:
    import torch

    from ..train.loop import train

    torch.set_num_threads(threads)
    started = time.perf_counter()
    result = train(config_from_dict(cfg_dict), log=lambda *a, **k: None)
    return str(result.run_dir), finished(result.summary, time.perf_counter() - started)


def finished(summary: dict, seconds: float) -> str:
    """A finished run in a few words: its steps, validation loss and this attempt's time."""
    return f"{summary['steps']} steps, val loss {summary['val_loss']:.4f}, {seconds:.0f} s"


def phases(todo: list[SweepRun]) -> list[list[SweepRun]]:
    """The runs in the order they can train: the runs cooldown branches start from (and every other
    run) first, then the branches."""
    return [phase for phase in ([r for r in todo if r.branch_of is None], [r for r in todo if r.branch_of is not None])
            if phase]


def run_local(spec: SweepSpec, runs: list[SweepRun], parallel: int = 1, log=print) -> list[SweepRun]:
    """Trains every run that is not done (cooldown branches after the runs they branch from);
    returns those it trained."""
    todo = [r for phase in phases([r for r in runs if run_state(r)["state"] != "done"]) for r in phase]
    log(f"sweep {spec.name}: {len(runs)} runs, {len(runs) - len(todo)} done, {len(todo)} to train "
        f"({parallel} at a time)")
    if not todo:
        return []
    prepare_data(spec, todo, log=log)
    if parallel <= 1:
        from ..train.loop import train

        for i, run in enumerate(todo, 1):
            state = run_state(run)
            log(f"[{i}/{len(todo)}] {run.config.train.run_name}"
                + (f" (resuming at step {state['step']})" if state["state"] == "partial" else ""))
            started = time.perf_counter()
            result = train(run.config, log=lambda *a, **k: None)
            log(f"[{i}/{len(todo)}] done: {finished(result.summary, time.perf_counter() - started)}")
        return todo
    threads = max(1, (os.cpu_count() or 1) // parallel)
    context = multiprocessing.get_context("spawn")  # no forking of a process that already holds torch threads
    done = 0
    with concurrent.futures.ProcessPoolExecutor(parallel, mp_context=context) as pool:
        for phase in phases(todo):
            futures = {pool.submit(_train_one, to_dict(r.config), threads): r for r in phase}
            for future in concurrent.futures.as_completed(futures):
                done += 1
                run_dir, what = future.result()
                log(f"[{done}/{len(todo)}] {Path(run_dir).name} done: {what}")
    return todo


def run_array_job(cfg_dict: dict) -> dict:
    """One run as one task of a submitit job array (preemption/requeue as for `launch train`)."""
    from ..launch.jobs import TrainJob

    return TrainJob(cfg_dict)()


def run_slurm(spec: SweepSpec, runs: list[SweepRun], dry_run: bool = False, log=print):
    """The runs that are not done, as one job array (`launch.array_parallelism` at a time)."""
    from ..launch.submit import make_executor, map_array, render_script, submit_to_slurm

    todo = [r for r in runs if run_state(r)["state"] != "done"]
    launch = spec.run.launch
    folder = Path(launch.folder) if launch.folder else Path(spec.out_dir) / "slurm"
    executor = make_executor(launch, folder, launch.job_name or f"sweep-{spec.name}", launch.ranks_per_node,
                             dry_run=dry_run)
    if dry_run:
        if hasattr(executor, "parameters"):
            executor.parameters["map_count"] = max(len(todo), 1)
        log(render_script(executor), end="")
        return []
    log(f"sweep {spec.name}: {len(runs)} runs, {len(runs) - len(todo)} done, {len(todo)} submitted as a job array")
    if not todo:
        return []
    prepare_data(spec, todo, log=log)
    record = Path(spec.out_dir) / "launch.json"
    jobs, after = [], None
    for phase in phases(todo):  # cooldown branches: a second array, started when the first has finished
        if after:
            executor.update_parameters(additional_parameters={**executor.parameters["additional_parameters"],
                                                              "dependency": f"afterok:{after}",
                                                              "kill-on-invalid-dep": "yes"})
        submitted = submit_to_slurm("sweep job array",
                                    lambda: map_array(executor, run_array_job, [to_dict(r.config) for r in phase]))
        after = str(submitted[0].job_id).split("_")[0]
        entries = read_json(record) if record.is_file() else []
        entries.append({"array_job_id": after, "runs": [r.config.train.run_name for r in phase]})
        write_atomic(record, json.dumps(entries, indent=1))
        log(f"submitted job array {after} ({len(phase)} tasks){' after ' + jobs[0].job_id.split('_')[0] if jobs else ''}"
            f"; logs in {folder}")
        jobs += submitted
    return jobs


def format_status(spec: SweepSpec, runs: list[SweepRun]) -> str:
    states = [run_state(r) for r in runs]
    counts = {k: sum(s["state"] == k for s in states) for k in ("done", "partial", "pending")}
    lines = [f"sweep {spec.name} in {spec.out_dir}: {len(runs)} runs - {counts['done']} done, "
             f"{counts['partial']} partial, {counts['pending']} pending",
             f"{'#':>3} {'family':12s} {'width':>5s} {'params':>12s} {'budget':>10s} {'lr':>9s} {'seed':>5s} "
             f"{'state':8s} {'step':>12s} {'val loss':>9s}"]
    for run, s in zip(runs, states):
        loss = f"{s['val_loss']:.4f}" if s["val_loss"] is not None else "-"
        lines.append(f"{run.index:>3d} {run.family:12s} {run.width:>5d} {run.rung.params:>12,d} {run.budget:>10.3g} "
                     f"{run.lr:>9.3g} {run.seed:>5d} {s['state']:8s} {s['step']:>6d}/{run.config.train.max_steps:<5d} "
                     f"{loss:>9s}")
    return "\n".join(lines)
