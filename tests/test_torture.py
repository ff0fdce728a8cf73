"""Torture: seeded random SIGKILLs during prep, training and checkpoint writes, and damaged newest
checkpoints, for the single engine and DDP (2 gloo processes), three perturbations each. Each ends in the uninterrupted result:
byte-identical shards, the same loss curve and the same final parameters.

GAM_TORTURE_SEED picks another sequence of perturbations (the seed is in every assertion message)."""
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from gam_pretrain.cli import main
from gam_pretrain.train.checkpoint import complete_checkpoints, verify_checkpoint

SEED = int(os.environ.get("GAM_TORTURE_SEED", "20261129"))
VICTIM = Path(__file__).parent / "dist" / "torture_victim.py"
ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def rng_for(name: str) -> np.random.Generator:
    return np.random.default_rng([SEED, zlib.crc32(name.encode())])


def file_hashes(folder: Path, skip=("prep_stats.json",)) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process and all its children (torchrun starts its ranks in sessions of their own)."""
    import psutil

    try:
        victims = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        victims = []
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> bool:
    """True when `condition()` holds; False if the process ended first."""
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            return condition()
        assert time.time() < deadline, f"seed {SEED}: timed out"
        time.sleep(0.005)
    return True


# ---- prep ----------------------------------------------------------------------------------------
PREP = ["prep", "embedded", "--prep.vocab_size", "512", "--prep.block_size", "32", "--prep.documents_per_unit", "1",
        "--prep.source.max_documents.train", "6", "--prep.source.max_documents.validation", "1", "--progress", "false"]


def test_prep_killed_at_random_moments_finishes_byte_identical(tmp_path):
    reference, victim = tmp_path / "reference", tmp_path / "victim"
    assert main([*PREP, "--out", str(reference)]) == 0
    rng, landed = rng_for("prep"), []
    moments = {  # where a kill lands: tokenizer training, between units, in the middle of the units
        "started": lambda: victim.exists() and any(victim.iterdir()),
        "planned": lambda: (victim / "plan.json").exists(),
        "some units": lambda: len(list((victim / ".units").glob("*.json"))) >= 3,
    }
    for attempt in range(3):
        moment = list(moments)[int(rng.integers(len(moments)))]
        delay = float(rng.uniform(0, 0.3))
        proc = subprocess.Popen([sys.executable, "-m", "gam_pretrain", *PREP, "--out", str(victim)], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        if wait_for(moments[moment], proc):
            time.sleep(delay)
        kill_group(proc)
        if not (victim / "manifest.json").exists():
            landed.append((moment, round(delay, 3)))
    assert landed, f"seed {SEED}: every kill came after prep had finished"
    print(f"seed {SEED}: prep killed at {landed}")
    assert main([*PREP, "--out", str(victim)]) == 0
    assert file_hashes(victim) == file_hashes(reference), f"seed {SEED}, kills {landed}"
    assert not [p for p in victim.rglob("*") if p.name.endswith(".tmp")]


# ---- training ------------------------------------------------------------------------------------
STEPS = 24


def train_args(data, out: Path, name: str, engine: str) -> list[str]:
    return ["train", "model.arch=gam", "model.vocab_size=512", "model.block_size=32", "model.d_model=32",
            "model.n_layers=2", "model.memory_slots=16", "model.dropout=0.1", f"data.dir={data.path}",
            "optim.lr=3e-3", "optim.warmup_steps=4", f"train.max_steps={STEPS}", "train.batch_size=4",
            "train.eval_batches=2", "train.eval_interval=0", "train.log_interval=4", f"train.out_dir={out}",
            f"train.run_name={name}", "train.progress=false", "logging.wandb=disabled",
            "checkpoint.interval_steps=2", "checkpoint.keep_last=2", f"engine.kind={engine}"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], engine: str, log: Path, extra_env: dict | None = None) -> subprocess.Popen:
    if engine == "single":
        cmd = [sys.executable, str(VICTIM), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(VICTIM), *args]
    return subprocess.Popen(cmd, env={**ENV, **(extra_env or {})}, stdout=open(log, "a"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def intact_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for step, path in complete_checkpoints(run_dir):
        try:
            verify_checkpoint(path)
            found.append((step, path))
        except (OSError, ValueError):
            pass
    return found


def damage_newest(run_dir: Path, how: str) -> str:
    """Damage the newest intact checkpoint the way a failing disk or a careless hand would."""
    step, newest = intact_checkpoints(run_dir)[-1]
    files = sorted(p for p in newest.iterdir() if p.is_file() and p.name not in ("COMPLETE", "trainer_state.json"))
    if how == "truncate weights":
        weights = max(files, key=lambda p: p.stat().st_size)
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return f"{how} {weights.name} of step {step}"
    if how == "delete a file":
        files[-1].unlink()
        return f"{how} ({files[-1].name}) of step {step}"
    (newest / "trainer_state.json").write_text('{"step": ')
    return f"{how} of step {step}"


PERTURBATIONS = ["kill at a checkpoint", "kill while saving", "damage the newest checkpoint"]
DAMAGE = ["truncate weights", "delete a file", "garble trainer_state.json"]


@pytest.mark.parametrize("engine", ["single", "ddp"])
def test_training_survives_random_kills_and_damaged_checkpoints(engine, prepared_small, tmp_path):
    rng = rng_for(f"train-{engine}")
    log = tmp_path / "victim.log"
    reference = launch(train_args(prepared_small, tmp_path, "reference", engine), engine, tmp_path / "reference.log")
    assert reference.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    run_dir = tmp_path / "victim"
    args = train_args(prepared_small, tmp_path, "victim", engine)
    done = []
    for attempt in range(3):
        saved = [step for step, _ in complete_checkpoints(run_dir)]
        what = PERTURBATIONS[int(rng.integers(len(PERTURBATIONS)))]
        if what == "damage the newest checkpoint" and len(intact_checkpoints(run_dir)) < 2:
            what = "kill at a checkpoint"  # keep one intact checkpoint to fall back to
        # saves still to come, in units of 2 steps; not the last two: a periodic save completes in the
        # background, so the newest COMPLETE can appear when the run is a step or two from its end
        first, last = max(saved, default=0) // 2 + 1, STEPS // 2 - 3
        if first > last and what != "damage the newest checkpoint":
            break
        step = 2 * int(rng.integers(first, last + 1)) if first <= last else 0
        if what == "damage the newest checkpoint":
            done.append(damage_newest(run_dir, DAMAGE[int(rng.integers(len(DAMAGE)))]))
        elif what == "kill while saving":
            when, rank = ["before", "after"][int(rng.integers(2))], int(rng.integers(2 if engine == "ddp" else 1))
            proc = launch(args, engine, log, {"GAM_KILL_IN_SAVE": f"{step}:{when}:{rank}"})
            proc.wait(timeout=600)
            kill_group(proc)
            done.append(f"{what} step {step} ({when} the engine's files, rank {rank})")
        else:
            delay = float(rng.uniform(0, 0.05))
            marker = run_dir / "checkpoints" / f"step_{step:08d}" / "COMPLETE"
            proc = launch(args, engine, log)
            if wait_for(marker.exists, proc):
                time.sleep(delay)
            kill_group(proc)
            done.append(f"{what} step {step} +{delay:.3f}s")
        assert not (run_dir / "summary.json").exists(), f"seed {SEED}: finished before {done[-1]}"
    print(f"seed {SEED}, {engine}: {done}")  # shown with pytest -s or on failure
    final = launch(args, engine, log)
    assert final.wait(timeout=600) == 0, f"seed {SEED}, {done}:\n" + log.read_text()[-3000:]
    got = json.loads((run_dir / "summary.json").read_text())
    want = json.loads((tmp_path / "reference" / "summary.json").read_text())
    assert got["loss_curve"] == want["loss_curve"], f"seed {SEED}: {done}"
    assert got["params_checksum"] == want["params_checksum"], f"seed {SEED}: {done}"
    assert not list((run_dir / "checkpoints").glob("*.partial")), f"seed {SEED}: {done}"


def test_a_kill_during_an_async_write_leaves_no_loadable_partial_checkpoint(prepared_small, tmp_path):
    """SIGKILL from the background thread of an async save, its engine file written and fsynced,
    files.json and COMPLETE not yet: the folder stays `.partial` (never loaded), the checkpoint before
    it stays intact, and a relaunch ends in the uninterrupted result."""
    reference = launch(train_args(prepared_small, tmp_path, "reference", "single"), "single", tmp_path / "ref.log")
    assert reference.wait(timeout=600) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    args = train_args(prepared_small, tmp_path, "victim", "single")
    note = tmp_path / "died-in"
    proc = launch(args, "single", tmp_path / "victim.log", {"GAM_KILL_IN_SAVE": "6:after", "GAM_KILL_NOTE": str(note)})
    assert proc.wait(timeout=600) == -signal.SIGKILL
    assert note.read_text().startswith("checkpoint")  # the async writer's thread, not the step loop
    run_dir = tmp_path / "victim"
    partial = run_dir / "checkpoints" / "step_00000006.partial"
    assert (partial / "model_optim.pt").is_file() and not (partial / "COMPLETE").exists()
    assert [step for step, _ in intact_checkpoints(run_dir)] == [2, 4] == [s for s, _ in complete_checkpoints(run_dir)]
    final = launch(args, "single", tmp_path / "victim.log")
    assert final.wait(timeout=600) == 0, (tmp_path / "victim.log").read_text()[-3000:]
    got = json.loads((run_dir / "summary.json").read_text())
    want = json.loads((tmp_path / "reference" / "summary.json").read_text())
    assert got["loss_curve"] == want["loss_curve"] and got["params_checksum"] == want["params_checksum"]
