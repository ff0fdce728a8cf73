import json
import math

import numpy as np
import pytest
import torch

from gam_pretrain.config import OptimConfig, load_config
from gam_pretrain.train.checkpoint import load_checkpoint, save_checkpoint
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


def test_checkpoint_without_marker_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt", {"w": torch.ones(2)}, {"step": 3})
    state, meta = load_checkpoint(path)
    assert meta["step"] == 3 and torch.equal(state["w"], torch.ones(2))
    (path / "COMPLETE").unlink()
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(path)


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
    state, meta = load_checkpoint(run_dir / "checkpoints" / "step_00000040")
    assert meta["step"] == 40 and "model" in state and "optimizer" in state


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
