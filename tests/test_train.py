import json
import math

import numpy as np
import pytest
import torch

from gam_pretrain.config import OptimConfig, load_config
from gam_pretrain.train.checkpoint import complete_checkpoints, latest_checkpoint, read_trainer_state
from gam_pretrain.data.cache import DataMismatchError, check_fits
from gam_pretrain.train.loop import train
from gam_pretrain.train.schedule import lr_at


def test_schedule_warmup_then_cosine():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 110, cfg) == pytest.approx(0.1)
    assert lr_at(9, 110, cfg) == pytest.approx(1.0)
    assert lr_at(60, 110, cfg) == pytest.approx(0.55)  # halfway through the decay
    assert lr_at(110, 110, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, 110, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_schedule_warmup_stable_decay():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule="wsd", decay_fraction=0.25, min_lr_ratio=0.2)
    assert lr_at(9, 100, cfg) == pytest.approx(1.0)
    assert [lr_at(s, 100, cfg) for s in (10, 50, 74, 75)] == [1.0] * 4  # stable until the last 25 steps
    assert lr_at(76, 100, cfg) == pytest.approx(0.2 + 0.8 * 24 / 25)  # then linear towards lr * min_lr_ratio
    assert lr_at(99, 100, cfg) == pytest.approx(0.2 + 0.8 / 25)
    # a branch decaying from step 40 to 60 (optim.decay_start) ends as a 60-step run with decay_fraction 1/3
    branch = OptimConfig(lr=1.0, warmup_steps=10, schedule="wsd", decay_start=40, min_lr_ratio=0.2)
    whole = OptimConfig(lr=1.0, warmup_steps=10, schedule="wsd", decay_fraction=1 / 3, min_lr_ratio=0.2)
    assert [lr_at(s, 60, branch) for s in range(60)] == [lr_at(s, 60, whole) for s in range(60)]


def tiny_run_overrides(tmp_path, data, arch="gam", steps=40):
    return [f"model.arch={arch}", "model.vocab_size=512", "model.block_size=32", "model.d_model=32",
            "model.n_layers=2", "model.memory_slots=16", "model.n_heads=4", "model.dropout=0.0", "model.expand=2",
            f"data.dir={data.path}", "optim.lr=3e-3", "optim.warmup_steps=5",
            f"train.max_steps={steps}", "train.batch_size=8", "train.eval_batches=4", "train.eval_interval=20",
            "train.log_interval=5", f"train.out_dir={tmp_path}", "train.progress=false", "logging.wandb=disabled"]


@pytest.mark.parametrize("arch", ["gam", "transformer", "mamba"])
def test_tiny_training_run_learns(tmp_path, prepared_small, arch):
    cfg = load_config(None, tiny_run_overrides(tmp_path, prepared_small, arch))
    result = train(cfg, log=lambda *a: None)
    curve = result.summary["loss_curve"]
    assert np.mean(curve[-5:]) < np.mean(curve[:5]) - 0.5
    assert result.summary["val_loss"] < math.log(512)  # better than uniform over the vocabulary
    run_dir = result.run_dir
    assert load_config(run_dir / "config.yaml") == cfg  # the resolved config is written and complete
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(5, 41, 5))
    assert all(0 < r["mfu"] < 1.5 and r["tokens_per_s"] > 0 and math.isfinite(r["grad_norm"]) for r in steps)
    assert sum("val_loss" in r for r in records) == 2  # step 20 and the final one
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]))
    state = read_trainer_state(run_dir / "checkpoints" / "step_00000040")
    assert state["step"] == 40 and state["loader"]["global_batches_in_epoch"] == 40 and len(state["history"]) == 40


def test_grad_accumulation_matches_one_big_batch(tmp_path, prepared_small):
    base = tiny_run_overrides(tmp_path, prepared_small, steps=3) + ["train.eval_batches=1"]
    one = train(load_config(None, base + ["train.run_name=one"]), log=lambda *a: None)
    acc = train(load_config(None, base + ["train.run_name=acc", "train.grad_accum=4"]), log=lambda *a: None)
    np.testing.assert_allclose(one.summary["loss_curve"], acc.summary["loss_curve"], rtol=1e-5)
    for a, b in zip(one.model.parameters(), acc.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_data_that_does_not_fit_the_model_is_refused(prepared_small):
    check_fits(prepared_small, 512, 32)
    check_fits(prepared_small, 640, 32)  # spare embedding rows are allowed (e.g. padded to a multiple of 64)
    with pytest.raises(DataMismatchError, match="512 tokens but model.vocab_size is 256"):
        check_fits(prepared_small, 256, 32)
    with pytest.raises(DataMismatchError, match="packed for block_size 32 but model.block_size is 64"):
        check_fits(prepared_small, 512, 64)


def test_a_run_logged_to_a_file_gives_one_plain_line_per_interval_and_a_final_line(tmp_path, prepared_small):
    """stdout to a file, as a SLURM job's: no progress bar (no carriage returns), a line per log
    interval, and a final line with the validation loss, the tokens and the run dir; the profiler
    trace train.profile_steps asks for; and TensorBoard's events holding metrics.jsonl's numbers."""
    import subprocess
    import sys

    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    overrides = [o for o in tiny_run_overrides(tmp_path, prepared_small, steps=20) if o != "train.progress=false"]
    with open(tmp_path / "job.out", "w") as out:
        done = subprocess.run([sys.executable, "-m", "gam_pretrain", "train", *overrides, "train.run_name=logged",
                               "train.profile_steps=[3, 4]", "logging.tensorboard=true"],
                              stdout=out, stderr=subprocess.STDOUT, timeout=600)
    text = (tmp_path / "job.out").read_text()
    assert done.returncode == 0, text[-2000:]
    assert "\r" not in text
    lines = [line for line in text.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["5/20", "10/20", "15/20", "20/20"]
    assert all(" | loss " in line and " tokens/s | MFU " in line and "| ETA " in line for line in lines)
    final = text.strip().splitlines()[-1]
    summary = json.loads((tmp_path / "logged" / "summary.json").read_text())
    assert final.startswith("gam: finished 20 steps, 5,120 tokens in ")
    assert f"validation loss {summary['val_loss']:.4f}" in final and final.endswith(f"run dir {tmp_path / 'logged'}")
    trace = json.loads((tmp_path / "logged" / "profile" / "steps_3-4_rank00000.json").read_text())
    assert any("aten::" in event.get("name", "") for event in trace["traceEvents"])
    assert f"profile of steps 3-4: {tmp_path / 'logged' / 'profile'}" in text
    events = accumulator.EventAccumulator(str(tmp_path / "logged" / "tensorboard"))
    events.Reload()
    metrics = [json.loads(line) for line in (tmp_path / "logged" / "metrics.jsonl").read_text().splitlines()]
    want = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    got = events.Scalars("loss")
    assert [e.step for e in got] == [step for step, _ in want]
    assert [e.value for e in got] == pytest.approx([loss for _, loss in want], rel=1e-6)
    assert [e.value for e in events.Scalars("val_loss")] == pytest.approx([summary["val_loss"]], rel=1e-6)
    assert "memory_mb/rank0" in events.Tags()["scalars"]


def test_cli_refuses_mismatched_vocab_at_start(tmp_path, prepared_small, capsys):
    from gam_pretrain.cli import main

    rc = main(["train", *tiny_run_overrides(tmp_path, prepared_small), "model.vocab_size=100"])
    assert rc == 1 and "model.vocab_size is 100" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before a run directory was made


def test_wandb_offline_run_is_written_and_reused(tmp_path):
    from gam_pretrain.config import LoggingConfig
    from gam_pretrain.train.metrics import MetricsLogger

    for _ in range(2):  # the second logger continues the same run id
        logger = MetricsLogger(tmp_path, LoggingConfig(wandb="offline"), {"a": 1}, "t")
        logger.log({"step": 1, "loss": 2.0})
        logger.close()
    run_id = (tmp_path / "wandb_id").read_text()
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_resume_continues_exactly_and_ignores_partial_checkpoints(tmp_path, prepared_small):
    base = tiny_run_overrides(tmp_path, prepared_small, steps=12) + ["model.dropout=0.1", "train.eval_interval=0"]
    straight = train(load_config(None, base + ["train.run_name=straight"]), log=lambda *a: None)
    resumable = base + ["train.run_name=resumed", "checkpoint.keep_last=1", "checkpoint.keep_every=3"]
    cut = train(load_config(None, resumable + ["train.stop_at_step=7"]), log=lambda *a: None)
    assert cut.summary == {"stopped_at": 7, "loss_curve": straight.summary["loss_curve"][:7]}
    run_dir = tmp_path / "resumed"
    assert [s for s, _ in complete_checkpoints(run_dir)] == [7]
    # a half-written checkpoint from a crash is never picked up
    (run_dir / "checkpoints" / "step_00000009.partial").mkdir()
    assert latest_checkpoint(run_dir).name == "step_00000007"
    resumed = train(load_config(None, resumable + ["checkpoint.interval_steps=3"]), log=lambda *a: None)
    assert resumed.summary["loss_curve"] == straight.summary["loss_curve"]  # dropout RNG restored too
    assert resumed.summary["params_checksum"] == straight.summary["params_checksum"]
    # saved at 9 and 12; 7 is not a multiple of keep_every=3 and not the newest: pruned; 9 kept forever
    assert [s for s, _ in complete_checkpoints(run_dir)] == [9, 12]
    # throughput covers both attempts (train_seconds is summed across them), like MFU
    summary = resumed.summary
    assert summary["tokens_per_s"] == pytest.approx(summary["tokens"] / summary["train_seconds"])
    assert summary["mfu"] == pytest.approx(summary["tokens_per_s"] * summary["flops_per_token"] / summary["peak_flops"])
    again = train(load_config(None, resumable), log=lambda *a: None)  # relaunching a finished run changes nothing
    assert again.summary["loss_curve"] == summary["loss_curve"] and again.summary["tokens_per_s"] == summary["tokens_per_s"]


def test_resume_refuses_a_checkpoint_from_another_model(tmp_path, prepared_small):
    from gam_pretrain.train.checkpoint import CheckpointMismatchError

    base = tiny_run_overrides(tmp_path, prepared_small, steps=2) + ["train.run_name=r", "train.eval_batches=1"]
    train(load_config(None, base), log=lambda *a: None)
    with pytest.raises(CheckpointMismatchError, match="model.d_model=32, this run has model.d_model=48"):
        train(load_config(None, base + ["train.max_steps=4", "model.d_model=48"]), log=lambda *a: None)
    # fields a GAM never reads (the attention kernel, gam-assoc's conv) do not make it another model
    stopped = base + ["train.run_name=s", "train.max_steps=4"]
    train(load_config(None, stopped + ["train.stop_at_step=2"]), log=lambda *a: None)
    resumed = train(load_config(None, stopped + ["model.attention=naive", "model.assoc_conv=4"]), log=lambda *a: None)
    assert resumed.summary["steps"] == 4


def test_a_cooldown_branch_of_a_stable_run_is_the_wsd_run_of_that_length(tmp_path, prepared_small, capsys):
    """One stable run (wsd over 40 steps) serves a 20-step budget: branched at step 15 and decayed to
    20, it trains exactly what a 20-step wsd run decaying over its last 5 steps trains (dropout on:
    the random streams continue too). Stopped and resumed, a branch needs only its own checkpoints."""
    import shutil

    from gam_pretrain.cli import main

    base = tiny_run_overrides(tmp_path, prepared_small) + ["optim.schedule=wsd", "model.dropout=0.1",
                                                            "train.eval_interval=0"]
    whole = train(load_config(None, base + ["train.max_steps=20", "optim.decay_fraction=0.25",
                                            "train.run_name=whole"]), log=lambda *a: None)
    stable = base + ["train.max_steps=40", "train.run_name=stable", "checkpoint.interval_steps=5",
                     "checkpoint.keep_every=5", "train.stop_at_step=16"]
    train(load_config(None, stable), log=lambda *a: None)
    branch_point = tmp_path / "stable" / "checkpoints" / "step_00000015"
    # refused in one line each: a branch point in the decay, at or past the end, of another model, not wsd
    for extra, named in ((["--cooldown-from", str(tmp_path / "whole" / "checkpoints" / "step_00000020")],
                          "not in its run's stable phase"),
                         (["train.max_steps=15", "--cooldown-from", str(branch_point)], "not before this run's last"),
                         (["model.d_model=48", "--cooldown-from", str(branch_point)], "model.d_model"),
                         (["optim.schedule=cosine", "--cooldown-from", str(branch_point)], "optim.schedule=wsd"),
                         (["--cooldown-from", str(tmp_path / "stable")], "not a complete checkpoint folder")):
        capsys.readouterr()
        assert main(["train", *base, "train.max_steps=20", "train.run_name=refused", *extra]) != 0
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and named in err, err
    cool = [*base, "train.max_steps=20", "train.run_name=cool", "--cooldown-from", str(branch_point)]
    assert main(["train", *cool, "train.stop_at_step=18", "checkpoint.interval_steps=1"]) == 0
    shutil.rmtree(tmp_path / "stable")  # the branch resumes from its own checkpoint at 18
    assert main(["train", *cool]) == 0
    summary = json.loads((tmp_path / "cool" / "summary.json").read_text())
    assert summary["loss_curve"] == whole.summary["loss_curve"]
    assert summary["val_loss"] == whole.summary["val_loss"]
    assert summary["params_checksum"] == whole.summary["params_checksum"]
    assert summary["branch_step"] == 15 and summary["branched_from"] == str(branch_point)
    assert [s for s, _ in complete_checkpoints(tmp_path / "cool")] == [18, 20]  # its own only
    capsys.readouterr()  # its resolved config.yaml runs again as it is (finished: nothing to do)
    assert main(["train", "--config", str(tmp_path / "cool" / "config.yaml")]) == 0
    assert "finished already" in capsys.readouterr().out
