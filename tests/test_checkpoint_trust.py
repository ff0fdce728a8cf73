"""Checkpoints and exports from an untrusted or damaged source: nothing in them runs code, damage is
refused in one line naming the file, auto-resume falls back to the newest intact checkpoint, a
resume never rewrites what a run already finished; and the run's other edges (lock, run name,
launcher, NaN, status, generate)."""
import hashlib
import importlib.util
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_model_config
from gam_pretrain.config import load_config
from gam_pretrain.train.checkpoint import (
    CheckpointError, CheckpointMismatchError, complete_checkpoints, seal, verify_checkpoint,
)
from gam_pretrain.train.loop import train
from test_train import tiny_run_overrides

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


class Payload:
    """Unpickling this runs `touch marker`: what a hostile checkpoint file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def overrides(tmp_path, data, name, steps, *extra):
    # a given peak_flops skips measuring the CPU's matmul peak (a second per run)
    return [*tiny_run_overrides(tmp_path, data, steps=steps), "train.eval_batches=1", "train.eval_interval=0",
            "train.peak_flops=1e11", f"train.run_name={name}", *extra]


def run(tmp_path, data, name, steps, *extra, log=lambda *a: None):  # ~0.5 s for a few steps
    return train(load_config(None, overrides(tmp_path, data, name, steps, *extra)), log=log)


def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def cli(argv, capsys) -> tuple[int, str]:
    """`gam-pretrain ARGV` in this process: (exit status, stderr). A traceback would escape main()."""
    from gam_pretrain.cli import main

    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


def the_one_line(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("gam-pretrain: error: "), (code, err)
    return lines[0]


def one_line_error(argv, capsys) -> str:
    return the_one_line(*cli(argv, capsys))


def fake_checkpoint(root: Path, engine: str) -> Path:
    """A checkpoint folder made by hand: a trainer_state.json naming `engine`, nothing else yet."""
    ckpt = root / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    state = {"step": 1, "loader": {}, "history": [1.0], "train_seconds": 1.0, "tokens": 1, "data_fingerprint": "x",
             "model": {"arch": "gam", **{k: v for k, v in vars(tiny_model_config()).items() if k != "arch"}},
             "engine": {"kind": engine}}
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    return ckpt


# ---- 1. nothing in a checkpoint runs code --------------------------------------------------------
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="DeepSpeed is not installed")
def test_export_of_a_crafted_deepspeed_checkpoint_refuses_it_without_running_it(tmp_path, capsys):
    marker = tmp_path / "pwned"
    ckpt = fake_checkpoint(tmp_path / "run", "deepspeed")
    (ckpt / "deepspeed").mkdir()
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        torch.save({"payload": Payload(marker)}, ckpt / "deepspeed" / name)
    seal(ckpt, 1)  # whoever crafts a checkpoint can write a matching files.json too
    code, err = cli(["export", str(ckpt), "--out", str(tmp_path / "export")], capsys)
    assert not marker.exists() and not (tmp_path / "export").exists()
    line = the_one_line(code, err)
    assert str(ckpt / "deepspeed") in line and "_states.pt" in line and "posix.system" in line, line


def test_export_of_crafted_dcp_metadata_refuses_it_without_running_it(tmp_path, capsys):
    marker = tmp_path / "pwned"
    ckpt = fake_checkpoint(tmp_path / "run", "fsdp2")
    (ckpt / "dcp").mkdir()
    (ckpt / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    seal(ckpt, 1)
    code, err = cli(["export", str(ckpt), "--out", str(tmp_path / "export")], capsys)
    assert not marker.exists()
    line = the_one_line(code, err)
    assert str(ckpt / "dcp" / ".metadata") in line and "posix.system" in line, line


def test_dcp_values_are_read_weights_only(tmp_path):
    """DCP pickles non-tensor values (the optimizer's hyper-parameters) with torch.save; its default
    planner reads them with weights_only=False."""
    import torch.distributed.checkpoint as dcp

    from gam_pretrain.train.engines.fsdp2 import load_dcp

    marker = tmp_path / "pwned"
    dcp.save({"w": torch.ones(3), "lr": 0.5, "hook": Payload(marker)}, checkpoint_id=str(tmp_path / "dcp"),
             no_dist=True)
    plain = {"w": torch.zeros(3), "lr": 0.0}
    load_dcp(plain, tmp_path / "dcp", no_dist=True)  # tensors and plain values load
    assert plain["lr"] == 0.5 and plain["w"].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp \(value of hook\).*posix\.system"):
        load_dcp({"hook": None}, tmp_path / "dcp", no_dist=True)
    assert not marker.exists()


CRAFTED_RESUME = """
import json, os, shutil, sys
from pathlib import Path
import torch
from gam_pretrain.config import load_config
from gam_pretrain.train.checkpoint import seal
from gam_pretrain.train.loop import train


class Payload:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))


def resume(overrides):
    try:
        train(load_config(None, overrides), log=lambda *a: None)
        return "resumed"
    except ValueError as e:
        return str(e)


results = {}
for name, overrides, victims in json.loads(sys.argv[1]):
    train(load_config(None, overrides + ["train.stop_at_step=1"]), log=lambda *a: None)
    ckpt = Path([o.split("=", 1)[1] for o in overrides if o.startswith("train.out_dir=")][0]) / name / \\
        "checkpoints" / "step_00000001"
    for victim in victims:  # one crafted file at a time, the others intact
        original = (ckpt / victim).read_bytes()
        if victim.endswith(".pt"):
            torch.save({"payload": Payload()}, ckpt / victim)
        else:
            (ckpt / victim).write_bytes(__import__("pickle").dumps(Payload()))
        results[f"{name} {victim} unsealed"] = resume(overrides)
        seal(ckpt, 1)  # the crafter rewrites files.json to match
        results[f"{name} {victim}"] = resume(overrides)
        (ckpt / victim).write_bytes(original)
        seal(ckpt, 1)
    results[f"{name} intact"] = resume(overrides)  # the allow-list lets a real checkpoint through
print(json.dumps(results))
sys.stdout.flush()
os._exit(0)
"""


def test_resume_of_crafted_deepspeed_and_fsdp2_files_refuses_them_without_running_them(tmp_path, prepared_small):
    """One launch (a process group of one, as torchrun would set up), several checks: each engine
    saves a checkpoint, then each of its state files in turn is replaced by a pickle that would
    create a marker file."""
    marker = tmp_path / "pwned"
    runs = [["fsdp2", overrides(tmp_path, prepared_small, "fsdp2", 2, "engine.kind=fsdp2"), ["dcp/.metadata"]]]
    if HAS_DEEPSPEED:
        runs.append(["zero1", overrides(tmp_path, prepared_small, "zero1", 2, "engine.kind=deepspeed",
                                        "engine.zero_stage=1"),
                     ["deepspeed/mp_rank_00_model_states.pt", "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt"]])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CRAFTED_RESUME, json.dumps(runs), str(marker)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not marker.exists(), results
    for name, _, victims in runs:
        ckpt = tmp_path / name / "checkpoints" / "step_00000001"
        for victim in victims:
            unsealed, crafted = results[f"{name} {victim} unsealed"], results[f"{name} {victim}"]
            assert f"{ckpt / victim} is damaged: its sha256 differs" in unsealed, unsealed
            assert str(ckpt / victim) in crafted and "posix.system" in crafted and "\n" not in crafted, crafted
        assert results[f"{name} intact"] == "resumed"


# ---- 1. files.json: every file checked before anything is read --------------------------------------
def test_every_checkpoint_carries_a_manifest_checked_before_it_is_loaded(tmp_path, prepared_small):
    run(tmp_path, prepared_small, "r", 2)
    ckpt = tmp_path / "r" / "checkpoints" / "step_00000002"
    listed = json.loads((ckpt / "files.json").read_text())["sha256"]
    assert sorted(listed) == ["model_optim.pt", "rng_rank00000.pt", "trainer_state.json"]
    assert "files.json" in (ckpt / "COMPLETE").read_text()
    pristine = {p.name: p.read_bytes() for p in ckpt.iterdir()}

    def damaged(change) -> str:
        for name, raw in pristine.items():
            (ckpt / name).write_bytes(raw)
        change()
        with pytest.raises(CheckpointError) as e:
            verify_checkpoint(ckpt)
        return str(e.value)

    weights = ckpt / "model_optim.pt"
    flip = bytearray(pristine["model_optim.pt"])
    flip[len(flip) // 2] ^= 1
    assert damaged(lambda: weights.write_bytes(bytes(flip))).startswith(f"{weights} is damaged")
    assert damaged(lambda: weights.write_bytes(pristine["model_optim.pt"][:100])).startswith(f"{weights} is damaged")
    assert damaged(lambda: weights.unlink()).startswith(f"{weights} is missing")
    assert damaged(lambda: (ckpt / "notes.txt").write_text("hi")).startswith(f"{ckpt / 'notes.txt'} is not part")
    assert damaged(lambda: (ckpt / "files.json").unlink()).startswith(f"{ckpt / 'files.json'} is missing")
    (ckpt / "notes.txt").unlink()
    # an explicit resume of a damaged checkpoint: one line naming the file, before anything is loaded
    damaged(lambda: weights.write_bytes(pristine["model_optim.pt"][:100]))
    with pytest.raises(CheckpointError, match=f"^{weights} is damaged"):
        run(tmp_path, prepared_small, "other", 4, f"checkpoint.resume={ckpt}")
    # a checkpoint written before manifests (COMPLETE holds only the step) is read unchecked, and said so
    for name, raw in pristine.items():
        (ckpt / name).write_bytes(raw)
    (ckpt / "files.json").unlink()
    (ckpt / "COMPLETE").write_text("step 2\n")
    said = []
    assert verify_checkpoint(ckpt, log=said.append)["step"] == 2
    assert said == [f"{ckpt} has no files.json (written by an older gam-pretrain): its files are not checked for "
                    "damage"]


# ---- 2. a resume never rewrites a finished checkpoint, nor changes the schedule ------------------
def test_resume_refuses_a_shorter_run_or_another_schedule_and_damaged_checkpoints(tmp_path, prepared_small):
    run(tmp_path, prepared_small, "r", 4, "train.stop_at_step=2")
    run_dir = tmp_path / "r"
    before = hashes(run_dir)
    ckpt = run_dir / "checkpoints" / "step_00000002"
    refusals = {
        "train.max_steps=1": f"checkpoint {ckpt} is at step 2, beyond this run's last step 1",
        "optim.lr=0.001": "written with optim.lr=0.003, this run has optim.lr=0.001",
        "optim.warmup_steps=2": "written with optim.warmup_steps=5, this run has optim.warmup_steps=2",
        "optim.schedule=constant": "written with optim.schedule='cosine', this run has optim.schedule='constant'",
        "optim.min_lr_ratio=0.5": "written with optim.min_lr_ratio=0.0, this run has optim.min_lr_ratio=0.5",
        "train.max_steps=6": "written with total_steps=4, this run has total_steps=6",
    }
    for change, message in refusals.items():
        with pytest.raises(CheckpointMismatchError) as e:
            run(tmp_path, prepared_small, "r", 4, change)
        assert message in str(e.value) and "\n" not in str(e.value), (change, str(e.value))
    # every checkpoint damaged: refused, naming them, not a silent start from scratch
    (ckpt / "trainer_state.json").write_text('{"step": ')
    with pytest.raises(CheckpointError, match=r"no intact checkpoint .*step_00000002; .*trainer_state\.json"):
        run(tmp_path, prepared_small, "r", 4)
    assert {k: v for k, v in hashes(run_dir).items() if k != "checkpoints/step_00000002/trainer_state.json"} == \
        {k: v for k, v in before.items() if k != "checkpoints/step_00000002/trainer_state.json"}
    assert not (run_dir / "summary.json").exists()


# ---- 3. auto-resume falls back to the newest intact checkpoint -----------------------------------
def test_auto_resume_skips_damaged_checkpoints_and_prune_keeps_what_it_resumed_from(tmp_path, prepared_small):
    base = ("checkpoint.interval_steps=2", "model.dropout=0.1")
    first = run(tmp_path, prepared_small, "r", 8, *base, "checkpoint.keep_last=3", "train.stop_at_step=6")
    run_dir = tmp_path / "r"
    four, six = (run_dir / "checkpoints" / f"step_0000000{s}" for s in (4, 6))
    (six / "model_optim.pt").write_bytes((six / "model_optim.pt").read_bytes()[:1000])  # truncated weights
    (four / "trainer_state.json").write_text('{"step": 4, "lo')  # garbled
    damaged = {**hashes(four), **{f"6/{k}": v for k, v in hashes(six).items()}}
    said = []
    run(tmp_path, prepared_small, "r", 8, *base, "checkpoint.keep_last=1", "train.stop_at_step=3", log=said.append)
    said = [line for line in said if line.startswith(("skipping", "resumed"))]
    assert said[0] == f"skipping damaged checkpoint step_00000006: {six / 'model_optim.pt'} is damaged: its sha256 " \
                      "differs from the one in files.json"
    assert said[1].startswith(f"skipping damaged checkpoint step_00000004: {four / 'trainer_state.json'} is damaged")
    assert said[2:] == [f"resumed from {run_dir / 'checkpoints' / 'step_00000002'} at step 2"]
    # saved at 3 with keep_last=1: the damaged 4 and 6 neither count as the newest nor are deleted
    assert [s for s, _ in complete_checkpoints(run_dir)] == [3, 4, 6]
    assert {**hashes(four), **{f"6/{k}": v for k, v in hashes(six).items()}} == damaged
    resumed = run(tmp_path, prepared_small, "r", 8, *base, "checkpoint.keep_last=1")  # replaces 4 and 6 as it goes
    # steps 3-6 trained again after the fallback: the same losses as the first time (dropout RNG restored too)
    assert resumed.summary["loss_curve"][:6] == first.summary["loss_curve"]
    assert [s for s, _ in complete_checkpoints(run_dir)] == [8]


# ---- 4. the run's other edges -----------------------------------------------------------------------
def test_export_records_and_checks_its_files_and_is_readable_by_others(tmp_path, prepared_small, capsys):
    from gam_pretrain.cli import main
    from gam_pretrain.export import ExportError, load_export

    run(tmp_path, prepared_small, "r", 2)
    export = tmp_path / "export"
    assert main(["export", str(tmp_path / "r"), "--out", str(export)]) == 0
    config = json.loads((export / "config.json").read_text())
    files = ["model.safetensors", "tokenizer.json", "modeling_gam_pretrain.py", "tokenizer_config.json",
             "special_tokens_map.json", "generation_config.json"]
    for name in files:
        assert config["sha256"][name] == hashlib.sha256((export / name).read_bytes()).hexdigest()
    umask = os.umask(0o022)
    os.umask(umask)
    assert {p.name: p.stat().st_mode & 0o777 for p in export.iterdir()} == \
        dict.fromkeys([*files, "config.json"], 0o666 & ~umask)
    weights = export / "model.safetensors"
    pristine = weights.read_bytes()
    raw = bytearray(pristine)
    for i in range(len(raw) - 3000, len(raw) - 1000):  # 2,000 flipped bytes: a valid file of other weights
        raw[i] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(ExportError, match=f"^{weights} is damaged"):
        load_export(export)
    assert str(weights) in one_line_error(["generate", str(export)], capsys)
    # an export from before hashes were recorded: a truncated file is still one line naming it
    del config["sha256"]
    (export / "config.json").write_text(json.dumps(config))
    weights.write_bytes(pristine[:len(pristine) // 2])
    with pytest.raises(ExportError, match=f"^{weights} is damaged or truncated"):
        load_export(export)


def test_summary_is_written_whole_and_a_damaged_one_is_named(tmp_path):
    from gam_pretrain.train.summary import read_summary, write_summary

    write_summary(tmp_path, {"steps": 4})
    assert read_summary(tmp_path) == {"steps": 4} and [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    (tmp_path / "summary.json").write_text('{"steps": 4, "val_')
    with pytest.raises(ValueError, match=f"^{tmp_path / 'summary.json'} is not valid JSON"):
        read_summary(tmp_path / "summary.json")


def test_a_run_dir_in_use_is_refused(tmp_path, prepared_small):
    import fcntl

    (tmp_path / "busy").mkdir()
    with open(tmp_path / "busy" / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError, match=f"^run dir {tmp_path / 'busy'} is in use by another training process"):
            run(tmp_path, prepared_small, "busy", 2)
    assert [p.name for p in (tmp_path / "busy").iterdir()] == [".lock"]


def test_distributed_engines_without_a_launcher_say_how_to_launch(tmp_path, prepared_small, capsys):
    for kind in ("ddp", "fsdp2", "deepspeed"):
        line = one_line_error(["train", *overrides(tmp_path, prepared_small, kind, 2, f"engine.kind={kind}")], capsys)
        assert f"engine.kind={kind} needs a distributed launch" in line and "torchrun" in line, line
    assert not list(tmp_path.iterdir())


def test_nan_loss_is_one_line_naming_the_step(tmp_path, prepared_small, monkeypatch, capsys):
    from gam_pretrain.train.engines import SingleEngine
    from gam_pretrain.train.engines.base import StepResult

    monkeypatch.setattr(SingleEngine, "train_step", lambda self, batches, step, total: StepResult(float("nan"), 0, 0))
    line = one_line_error(["train", *overrides(tmp_path, prepared_small, "nan", 2)], capsys)
    assert line == "gam-pretrain: error: loss became nan at step 1; lower optim.lr or check the data"


def test_status_of_a_preempted_run_says_so(tmp_path):
    from gam_pretrain.launch.status import format_status, run_status

    events = [{"event": "start", "total_steps": 30, "tokens_per_step": 128, "time": 1.0},
              {"event": "preempted", "step": 6, "signal": "SIGUSR1", "time": 2.0}]
    (tmp_path / "attempts.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    status = run_status(tmp_path)
    assert status["state"] == "preempted at step 6" and "state      preempted at step 6" in format_status(status)
    (tmp_path / "attempts.jsonl").write_text("".join(json.dumps(e) + "\n" for e in [*events, {**events[0]}]))
    assert run_status(tmp_path)["state"] == "started"  # requeued


def test_generate_refuses_an_empty_prompt_and_a_negative_top_k():
    from gam_pretrain.eval.generate import generate
    from gam_pretrain.models import build_model

    model = build_model(tiny_model_config(arch="gam"))
    assert len(generate(model, [1, 2], 3, 32)) == 3
    with pytest.raises(ValueError, match="the prompt is empty"):
        generate(model, [], 3, 32)
    with pytest.raises(ValueError, match="top_k .* got -3"):
        generate(model, [1], 3, 32, top_k=-3)
