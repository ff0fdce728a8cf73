"""Cluster launch against a real SLURM (started by the `slurm_cluster` fixture): the sbatch
template, `gam-pretrain launch` on two nodes, preemption and time-limit requeues that resume
exactly, a prep job array, SLURM's refusals, quoting. Plus the parts that need no SLURM: golden
sbatch scripts (--dry-run), the local cluster, and the error without SLURM."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
PY = sys.executable


def tiny_config(tmp_path: Path, data_dir: Path, name: str = "tiny.yaml", **train) -> Path:
    cfg = {
        "model": {"arch": "gam", "vocab_size": 512, "block_size": 32, "d_model": 32, "n_layers": 2,
                  "memory_slots": 16, "dropout": 0.0},
        "data": {"dir": str(data_dir)},
        "train": {"batch_size": 8, "max_steps": 30, "eval_batches": 2, "log_interval": 10, "progress": False,
                  "out_dir": str(tmp_path / "runs"), **train},
        "logging": {"wandb": "disabled"},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*args, timeout=300, env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "gam_pretrain", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.3):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "attempts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def reached(run_dir: Path, step: int) -> bool:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return False
    return any(json.loads(line).get("step", 0) >= step for line in path.read_text().splitlines() if line.strip())


def job_id_of(run_dir: Path) -> str:
    return json.loads((run_dir / "launch.json").read_text())[-1]["job_id"]


def sacct(job_id: str, field: str = "State") -> str:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", field, "-j", job_id], capture_output=True, text=True)
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""


# ---- no SLURM needed ----------------------------------------------------------------------------
GOLDEN_ARGS = [
    "--train.out_dir", "/runs", "--train.run_name", "golden", "--launch.python", "/opt/venv/bin/python",
    "--launch.nodes", "2", "--launch.gpus_per_node", "4", "--launch.cpus_per_task", "8", "--launch.mem_gb", "200",
    "--launch.partition", "gpu", "--launch.account", "proj-42", "--launch.qos", "high", "--launch.constraint", "a100",
    "--launch.time_minutes", "1440", "--launch.job_name", "it's $(touch /tmp/x) \"run\"",
    "--launch.sbatch_args", '["--exclusive", "--comment=a b; $(rm -rf /)"]', "--launch.setup", '["module load cuda/12"]',
]


@pytest.mark.parametrize("what", ["train", "prep"])
def test_dry_run_scripts_match_golden_files(what, tmp_path):
    if what == "train":
        args = ["launch", "train", "--dry-run", *GOLDEN_ARGS]
    else:
        args = ["launch", "prep", "wikitext103", "--out", "/data/wt103", "--dry-run", "--launch.array_tasks", "32",
                "--launch.array_parallelism", "8", "--launch.python", "/opt/venv/bin/python", "--launch.partition", "cpu"]
    out = cli(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    golden = GOLDEN / f"launch_{what}.sbatch"
    if os.environ.get("GAM_UPDATE_GOLDEN") == "1":
        golden.write_text(out.stdout)
    assert out.stdout == golden.read_text(), f"rendered script differs from {golden} (GAM_UPDATE_GOLDEN=1 rewrites it)"
    assert not list(tmp_path.iterdir()), "a dry run must not create files"


def test_golden_train_script_quotes_user_values():
    script = (GOLDEN / "launch_train.sbatch").read_text()
    # Every user-supplied value sits inside single quotes; bash parses the lines back to the raw text.
    assert "#SBATCH --job-name='it'\"'\"'s $(touch /tmp/x) \"run\"'" in script
    assert "#SBATCH --comment='a b; $(rm -rf /)'" in script
    assert "#SBATCH --exclusive" in script and "#SBATCH --nodes=2" in script and "#SBATCH --gpus-per-node=4" in script
    assert "#SBATCH --ntasks-per-node=4" in script, "one task per GPU by default"
    assert "#SBATCH --signal=USR2@120" in script and "#SBATCH --requeue" in script


def test_launch_without_slurm_says_so(tmp_path, prepared_small):
    cfg = tiny_config(tmp_path, prepared_small.path)
    env = dict(os.environ, PATH=str(Path(PY).parent))  # the venv's python only: no sbatch
    out = cli("launch", "train", "--config", cfg, env=env)
    assert out.returncode == 1
    assert "sbatch not found" in out.stderr and "--launch.cluster local" in out.stderr
    assert out.stderr.count("\n") <= 2, "one clear message, no traceback"


def test_launch_local_cluster_trains(tmp_path, prepared_small):
    cfg = tiny_config(tmp_path, prepared_small.path, run_name="local")
    out = cli("launch", "train", "--config", cfg, "--launch.cluster", "local", "--wait")
    assert out.returncode == 0, out.stderr[-3000:]
    (result,) = json.loads(out.stdout.strip().splitlines()[-1])
    summary = json.loads((tmp_path / "runs" / "local" / "summary.json").read_text())
    assert result["summary"]["params_checksum"] == summary["params_checksum"] == result["local_params_checksum"]
    assert summary["steps"] == 30


def test_bad_sbatch_args_are_a_config_error(tmp_path, prepared_small):
    cfg = tiny_config(tmp_path, prepared_small.path)
    out = cli("launch", "train", "--config", cfg, "--dry-run", "--launch.sbatch_args", '["exclusive"]')
    assert out.returncode == 2 and "--name=value" in out.stderr


# ---- real SLURM ---------------------------------------------------------------------------------
@pytest.mark.slurm
def test_sbatch_template_trains_and_keeps_arguments_as_text(slurm_cluster, prepared_small, tmp_path):
    cfg = tiny_config(tmp_path, prepared_small.path)
    marker = tmp_path / "pwned"  # the job runs in tmp_path: a relative `touch` would land here
    name = "a b 'c' \"d\" $(touch pwned) `touch pwned`"  # a run name is one folder name: no '/'
    out = subprocess.run(["sbatch", "--wait", "--parsable", "-o", str(tmp_path / "job-%j.out"),
                          str(REPO / "slurm" / "train.sbatch"), "--config", str(cfg), "--train.run_name", name],
                         env=dict(os.environ, GAM_PYTHON=PY), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    logs = "".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    assert out.returncode == 0, out.stderr + logs[-3000:]
    run = tmp_path / "runs" / name
    assert json.loads((run / "summary.json").read_text())["steps"] == 30
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["run_name"] == name
    assert not marker.exists(), "a value reached a shell"


@pytest.mark.slurm
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs DeepSpeed (pip install -e '.[deepspeed]')")
def test_launch_two_nodes_zero2_ranks_agree(slurm_cluster, prepared_small, tmp_path):
    cfg = tiny_config(tmp_path, prepared_small.path, run_name="zero2")
    out = cli("launch", "train", "--config", cfg, "--engine.kind", "deepspeed", "--engine.zero_stage", "2",
              "--launch.nodes", "2", "--wait", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert sorted(r["rank"] for r in results) == [0, 1]
    summary = next(r["summary"] for r in results if r["rank"] == 0)
    assert summary["world_size"] == 2 and summary["engine"] == "deepspeed" and summary["steps"] == 30
    assert {r["local_params_checksum"] for r in results} == {summary["params_checksum"]}, "ranks disagree"
    job = job_id_of(tmp_path / "runs" / "zero2")
    assert sacct(job, "NodeList") == "gamci[1-2]"


@pytest.mark.slurm
def test_preempted_and_timed_out_jobs_requeue_and_end_like_an_uninterrupted_run(slurm_cluster, prepared_small,
                                                                                  tmp_path):
    """Two submitit jobs at once, one per node: one preempted by a job in the higher-priority
    partition, one reaching its time limit (shortened while it runs, so SLURM's --signal fires).
    Both save, requeue, resume and must end with the parameters and loss curve of a plain run."""
    # SLURM checks time limits every 30 s: the signal must come before the first attempt ends. Its
    # steps are paced (tests/slurm_pacing: 40 ms of sleep each, 2 minutes for the whole run) so that it
    # lasts without loading the cores; requeued attempts and the reference run at full speed.
    steps = 3000
    cfg = tiny_config(tmp_path, prepared_small.path, max_steps=steps, eval_interval=0)
    runs = tmp_path / "runs"
    reference = subprocess.Popen([PY, "-m", "gam_pretrain", "train", "--config", str(cfg), "--train.run_name", "ref"],
                                 env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
    pacing = json.dumps([f"export PYTHONPATH={Path(__file__).parent / 'slurm_pacing'}", "export GAM_TEST_STEP_SLEEP_S=0.04"])
    try:
        for name, node in (("preempted", "gamci1"), ("timed-out", "gamci2")):
            out = cli("launch", "train", "--config", cfg, "--train.run_name", name, "--launch.setup", pacing,
                      "--launch.sbatch_args", json.dumps(["--exclusive", f"--nodelist={node}"]))
            assert out.returncode == 0, out.stderr[-3000:]
        preempted, timed_out = runs / "preempted", runs / "timed-out"

        wait_for(lambda: reached(preempted, 300), 120, "the first job to train")
        urgent = subprocess.run(["sbatch", "--parsable", "-p", "urgent", "-w", "gamci1", "--exclusive",
                                 "-o", "/dev/null", "--wrap", "sleep 1"], capture_output=True, text=True)
        assert urgent.returncode == 0, urgent.stderr

        wait_for(lambda: reached(timed_out, 300), 120, "the second job to train")
        job = job_id_of(timed_out)
        subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=1"], check=True)
        wait_for(lambda: any(e["event"] == "preempted" for e in events(timed_out)), 90,
                 "the time-limit signal (SLURM checks time limits every 30 s)")
        subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=60"], check=True)  # let the requeued attempt finish

        for run in (preempted, timed_out):
            wait_for(lambda run=run: sacct(job_id_of(run)) in ("COMPLETED", "FAILED", "CANCELLED"), 480,
                     f"{run.name} to end")
            assert sacct(job_id_of(run)) == "COMPLETED", "".join(p.read_text()[-2000:] for p in (run / "slurm").glob("*.out"))
        assert reference.wait(timeout=240) == 0, reference.stderr.read()[-3000:]
    except BaseException:
        subprocess.run(["scancel", "--user", str(os.getuid())], capture_output=True)
        raise
    finally:
        reference.kill()

    expected = json.loads((runs / "ref" / "summary.json").read_text())
    for run in (preempted, timed_out):
        log = events(run)
        assert [e["event"] for e in log][:3] == ["start", "preempted", "start"], log
        assert log[1]["signal"] == "SIGUSR2" and 0 < log[1]["step"] < steps
        assert log[2]["slurm_restart_count"] >= 1 and log[2]["start_step"] == log[1]["step"]
        summary = json.loads((run / "summary.json").read_text())
        assert summary["params_checksum"] == expected["params_checksum"], f"{run.name}: final parameters differ"
        assert summary["loss_curve"] == expected["loss_curve"], f"{run.name}: loss curve differs"

    status = cli("status", preempted, "--json")
    assert status.returncode == 0, status.stderr
    s = json.loads(status.stdout)
    assert s["state"] == "finished" and s["step"] == steps and s["requeues"] >= 1 and s["preemptions"] >= 1
    assert s["jobs"] == [{"job_id": job_id_of(preempted), "state": "COMPLETED"}] and s["last_checkpoint"].endswith(f"step_{steps:08d}")
    assert s["slurm_restart_count"] >= 1


@pytest.mark.slurm
def test_prep_job_array_writes_the_same_manifest_as_local_prep(slurm_cluster, prepared_small, tmp_path):
    out_dir = tmp_path / "prep"
    out = cli("launch", "prep", "embedded", "--out", out_dir, "--prep.tokenizer", "bpe-bytelevel",
              "--prep.vocab_size", "512", "--prep.block_size", "32", "--prep.documents_per_unit", "4",
              "--prep.samples_per_shard", "1024",
              "--launch.array_tasks", "3", "--wait", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (out_dir / "manifest.json").read_bytes() == (prepared_small.path / "manifest.json").read_bytes()
    accounting = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobName,State"], capture_output=True, text=True)
    units = [line for line in accounting.stdout.splitlines() if line.startswith("prep-prep-units|")]
    assert len(units) == 3 and all(u.endswith("COMPLETED") for u in units), units
    assert cli("verify", out_dir).returncode == 0


@pytest.mark.slurm
def test_slurm_refusals_are_reported_with_slurms_words(slurm_cluster, prepared_small, tmp_path):
    cfg = tiny_config(tmp_path, prepared_small.path)
    out = cli("launch", "train", "--config", cfg, "--launch.partition", "nosuch")
    assert out.returncode == 1
    assert "SLURM refused the training job" in out.stderr and "invalid partition" in out.stderr.lower()
    out = cli("launch", "train", "--config", cfg, "--launch.nodes", "3")
    assert out.returncode == 1
    assert "SLURM refused" in out.stderr and "node" in out.stderr.lower()
    assert out.stderr.count("\n") <= 3, out.stderr


@pytest.mark.slurm
def test_launch_quotes_names_and_status_reports_the_run(slurm_cluster, prepared_small, tmp_path):
    marker = tmp_path / "pwned"  # launched from tmp_path, so a relative `touch` would land here too
    name = "run $(touch pwned) 'q' \"dq\""  # a run name is one folder name: no '/'
    cfg = tiny_config(tmp_path, prepared_small.path, run_name=name)
    out = cli("launch", "train", "--config", cfg, "--launch.job_name", f"job `touch {marker}` 'x'", "--wait",
              cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "runs" / name
    assert not marker.exists(), "a value reached a shell"
    assert sacct(job_id_of(run), "JobName") == f"job `touch {marker}` 'x'"
    status = cli("status", run)
    assert status.returncode == 0, status.stderr
    assert "COMPLETED" in status.stdout and "30 / 30" in status.stdout and "finished" in status.stdout


def test_a_setup_line_that_activates_an_environment_runs_its_python(tmp_path):
    """launch.setup sourcing a venv (or conda activate) makes srun run that environment's `python`;
    other setup lines keep the launcher's interpreter, and launch.python wins over both."""
    from gam_pretrain.config import LaunchConfig
    from gam_pretrain.launch.submit import make_executor, render_script

    def srun_line(**launch) -> str:
        script = render_script(make_executor(LaunchConfig(**launch), tmp_path, "job", 1, dry_run=True))
        return next(line for line in script.splitlines() if line.startswith("srun "))

    assert " python -u -m submitit" in srun_line(setup=["source ~/gam/.venv/bin/activate"])
    assert " python -u -m submitit" in srun_line(setup=["module load cuda/12", "conda activate gam"])
    assert f" {sys.executable} -u -m submitit" in srun_line(setup=["module load cuda/12"])
    assert f" {sys.executable} -u -m submitit" in srun_line(setup=["# source venv/bin/activate", "source deactivate"])
    assert " /opt/py/bin/python -u -m submitit" in srun_line(setup=["conda activate gam"], python="/opt/py/bin/python")
