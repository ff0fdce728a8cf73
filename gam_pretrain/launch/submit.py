"""`gam-pretrain launch`: submit training or data prep to SLURM (or run it locally) with submitit.

Everything a job needs travels pickled (the resolved config, paths), never through the shell;
every value that does reach the sbatch script (job name, partition, folders, extra arguments) is
one line of text (config validation refuses control characters, and the renderer checks again)
and shell-quoted by the renderer. `--dry-run` prints the exact scripts and submits nothing.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
import shlex
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

from ..config import ConfigError, LaunchConfig, RunConfig, batch_layout, control_characters, to_dict
from ..data.prep import check_prep_config
from ..files import read_json, write_atomic
from .jobs import TrainJob, prep_finalize_job, prep_plan_job, prep_units_job

LAUNCH_RECORD = "launch.json"


class LaunchError(RuntimeError):
    """SLURM is absent or refused the job; the message carries what sbatch said."""


def parse_sbatch_args(args: list[str]) -> dict:
    out = {}
    for arg in args:
        if not arg.startswith("--") or len(arg) < 3:
            raise ConfigError(f"launch.sbatch_args entry {arg!r}: write sbatch options as --name=value or --flag")
        name, sep, value = arg[2:].partition("=")
        out[name] = value if sep else True
    return out


def slurm_parameters(launch: LaunchConfig, job_name: str, ntasks_per_node: int, extra: dict | None = None) -> dict:
    """submitit SlurmExecutor parameters: the sbatch options plus the job's environment set-up."""
    params = {"job_name": job_name, "nodes": launch.nodes, "ntasks_per_node": ntasks_per_node,
              "time": launch.time_minutes, "signal_delay_s": launch.signal_delay_s, "stderr_to_stdout": True,
              "array_parallelism": launch.array_parallelism,
              "setup": ["export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}", "export PYTHONUNBUFFERED=1",
                        *launch.setup]}
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(launch, key):
            params[key] = getattr(launch, key)
    if launch.gpus_per_node:
        params["gpus_per_node"] = launch.gpus_per_node
    if launch.cpus_per_task:
        params["cpus_per_task"] = launch.cpus_per_task
    if launch.mem_gb:
        params["mem"] = f"{int(launch.mem_gb * 1024)}M"
    additional = {"requeue": True, **(extra or {}), **parse_sbatch_args(launch.sbatch_args)}
    params["additional_parameters"] = additional
    return params


def check_script_values(params: dict, folder: Path, python: str) -> None:
    """Every value the renderer writes into the script is one line: a newline would leave its quoting
    (config validation names the key first; this also covers derived values such as folders)."""
    values = [("folder", str(folder)), ("launch.python", python), *params.items(),
              *params["additional_parameters"].items(),
              *((f"sbatch option {key}", key) for key in params["additional_parameters"])]
    for name, value in values:
        for line in value if isinstance(value, list) else [value]:
            if isinstance(line, str) and (bad := control_characters(line)):
                raise ConfigError(f"{name} holds control character(s) {', '.join(bad)}: {line!r}; every value "
                                  "written into an sbatch script must be one line")


NO_SBATCH = ("sbatch not found: SLURM is not installed here or not on PATH. "
             "Use --launch.cluster local to run on this machine, or launch from a SLURM login node.")


ACTIVATES = re.compile(r"(^|[\s;&|(])(source|\.)\s+(\S*/)?activate\b|\b(conda|mamba|micromamba)\s+activate\b")


def activates_environment(setup: list[str]) -> bool:
    """Whether a launch.setup line activates a Python environment (a venv's `source .../activate`,
    `conda activate`, ...): the job then runs the `python` that environment puts on PATH, not the
    absolute interpreter of the machine that launched it (launch.python overrides both)."""
    return any(ACTIVATES.search(line.split("#", 1)[0]) for line in setup)


def make_executor(launch: LaunchConfig, folder: Path, job_name: str, ntasks_per_node: int, extra: dict | None = None,
                  dry_run: bool = False):
    import submitit

    if launch.cluster == "local":
        if launch.nodes != 1:
            raise ConfigError("launch.cluster=local runs on this machine: launch.nodes must be 1")
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=launch.time_minutes, tasks_per_node=ntasks_per_node, nodes=1,
                                   gpus_per_node=launch.gpus_per_node)
        return executor
    if not dry_run and not shutil.which("sbatch"):
        raise LaunchError(NO_SBATCH)

    class RenderOnly(submitit.SlurmExecutor):
        """Renders the script on a machine without srun (dry runs); submitit refuses otherwise."""

        @classmethod
        def affinity(cls) -> int:
            return 1

    params = slurm_parameters(launch, job_name, ntasks_per_node, extra)
    check_script_values(params, folder, launch.python)
    python = shlex.quote(launch.python) if launch.python else ("python" if activates_environment(launch.setup) else None)
    executor = (RenderOnly if dry_run else submitit.SlurmExecutor)(folder=folder, python=python)
    executor.update_parameters(**params)
    return executor


def render_script(executor) -> str:
    """The sbatch script submitit would submit now (same code path as a real submission)."""
    if not hasattr(executor, "_make_submission_file_text"):
        return "# launch.cluster=local: no sbatch script; the job runs as local subprocesses\n"
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


def submit_to_slurm(what: str, fn):
    if not shutil.which("sbatch"):
        raise LaunchError(NO_SBATCH)
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - submitit raises its own and subprocess errors; all mean "SLURM said no"
        said = str(e).strip()
        raise LaunchError(f"SLURM refused the {what}: {said}") from None


def map_array(executor, fn, *iterables):
    """executor.map_array, keeping launch.python: submitit 1.5 builds a fresh SlurmExecutor for the
    array and would fall back to this process's interpreter (unlike the dry run's script)."""
    module = sys.modules[type(executor).__module__]
    original = module.SlurmExecutor
    module.SlurmExecutor = functools.partial(original, python=executor.python)
    try:
        return executor.map_array(fn, *iterables)
    finally:
        module.SlurmExecutor = original


def _record(run_dir: Path, entry: dict) -> None:
    path = run_dir / LAUNCH_RECORD
    records = read_json(path) if path.is_file() else []
    if not isinstance(records, list):
        raise ValueError(f"{path} is not a list of launches (garbled?)")
    records.append(entry)
    write_atomic(path, json.dumps(records, indent=1))


def launch_train(cfg: RunConfig, dry_run: bool = False, log=print):
    """Submit one training run; returns the submitit job (None for a dry run)."""
    if not cfg.train.run_name:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, run_name=f"{cfg.model.arch}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"))
    launch = cfg.launch
    if cfg.engine.kind != "single":
        batch_layout(cfg.train, launch.world_size)  # refused here, not after the queue wait
    run_dir = Path(cfg.train.out_dir) / cfg.train.run_name
    folder = Path(launch.folder) if launch.folder else run_dir / "slurm"
    ntasks = launch.ranks_per_node
    executor = make_executor(launch, folder, launch.job_name or cfg.train.run_name, ntasks, dry_run=dry_run)
    if dry_run:
        log(render_script(executor), end="")
        return None
    if launch.cluster == "local":
        job = executor.submit(TrainJob(to_dict(cfg)))
    else:
        job = submit_to_slurm("training job", lambda: executor.submit(TrainJob(to_dict(cfg))))
    run_dir.mkdir(parents=True, exist_ok=True)
    _record(run_dir, {"job_id": str(job.job_id), "cluster": launch.cluster, "submitted": time.time(),
                      "folder": str(folder.resolve()), "nodes": launch.nodes, "tasks_per_node": ntasks,
                      "kind": "train"})
    log(f"submitted job {job.job_id} ({launch.nodes} node(s) x {ntasks} task(s)); logs in {folder}; "
        f"follow it with: gam-pretrain status {run_dir}")
    return job


def launch_prep(prep_cfg, out_dir: str | Path, launch: LaunchConfig, dry_run: bool = False, log=print):
    """Prep as three SLURM jobs: plan (tokenizer + unit counts) -> an array of `launch.array_tasks`
    unit tasks -> finalize (manifest). Returns [plan, array jobs..., finalize] (None for a dry run)."""
    out_dir = Path(out_dir)
    folder = Path(launch.folder) if launch.folder else out_dir / ".slurm"
    name = launch.job_name or f"prep-{out_dir.name}"
    single = dataclasses.replace(launch, nodes=1, tasks_per_node=1)
    n = launch.array_tasks
    if n < 1:
        raise ConfigError(f"launch.array_tasks must be at least 1, got {n}")
    check_prep_config(prep_cfg)  # here, not first in the plan job an hour later

    def executor(suffix: str, dependency: str | None):
        extra = {"dependency": dependency, "kill-on-invalid-dep": "yes"} if dependency else None
        return make_executor(single, folder, f"{name}-{suffix}", 1, extra, dry_run=dry_run)

    cfg_dict = dataclasses.asdict(prep_cfg)
    if dry_run:
        array = executor("units", "afterok:PLAN_JOB_ID")
        if hasattr(array, "parameters"):
            array.parameters["map_count"] = n  # what submitit's map_array sets on its copy of the executor
        for title, ex in (("plan", executor("plan", None)), (f"units (array of {n})", array),
                          ("finalize", executor("finalize", "afterok:UNITS_ARRAY_JOB_ID"))):
            log(f"# ---- {title} ----\n{render_script(ex)}", end="")
        return None
    if launch.cluster == "local":
        plan = executor("plan", None).submit(prep_plan_job, cfg_dict, str(out_dir))
        plan.result()
        units = [executor("units", None).submit(prep_units_job, str(out_dir), i, n) for i in range(n)]
        [u.result() for u in units]
        return [plan, *units, executor("finalize", None).submit(prep_finalize_job, str(out_dir))]
    plan = submit_to_slurm("prep plan job", lambda: executor("plan", None).submit(prep_plan_job, cfg_dict, str(out_dir)))
    units = submit_to_slurm("prep units array", lambda: map_array(executor("units", f"afterok:{plan.job_id}"),
                                                           prep_units_job, [str(out_dir)] * n, list(range(n)), [n] * n))
    array_id = str(units[0].job_id).split("_")[0]
    final = submit_to_slurm("prep finalize job", lambda: executor("finalize", f"afterok:{array_id}").submit(
        prep_finalize_job, str(out_dir)))
    log(f"submitted prep of {out_dir}: plan {plan.job_id} -> units array {array_id} ({n} tasks) -> finalize "
        f"{final.job_id}; logs in {folder}")
    return [plan, *units, final]
