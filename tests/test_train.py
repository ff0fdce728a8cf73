import json
import math

import numpy as np
import pytest
import torch

from gam_pretrain.config import OptimConfig, load_config
from gam_pretrain.data import BlockLoader, validation_batches
from gam_pretrain.train.checkpoint import load_checkpoint, save_checkpoint
from gam_pretrain.train.loop import DataMismatchError, check_vocab, train
from gam_pretrain.train.schedule import lr_at


def test_schedule_warmup_then_cosine():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 110, cfg) == pytest.approx(0.1)
    assert lr_at(9, 110, cfg) == pytest.approx(1.0)
    assert lr_at(60, 110, cfg) == pytest.approx(0.55)  # halfway through the decay
    assert lr_at(110, 110, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, 110, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_loader_covers_each_epoch_once_in_a_seeded_order():
    tokens = np.arange(1001, dtype=np.uint16)
    loader = BlockLoader(tokens, block_size=10, batch_size=4, seed=3)
    assert loader.num_samples == 100
    seen = [int(x[i, 0]) // 10 for _ in range(25) for x, _ in [loader.next_batch()] for i in range(4)]
    assert sorted(seen) == list(range(100)) and loader.epoch == 1 and loader.position == 0
    again = BlockLoader(tokens, block_size=10, batch_size=4, seed=3)
    torch.testing.assert_close(again.next_batch()[0], BlockLoader(tokens, 10, 4, seed=3).next_batch()[0])
    x, y = again.next_batch()
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one


def test_loader_resume_is_exact_across_epochs():
    tokens = np.arange(2001, dtype=np.uint16)
    straight = BlockLoader(tokens, 16, 5, seed=1)
    expected = [straight.next_batch()[0] for _ in range(60)]  # 124 samples/epoch: crosses two epochs
    first = BlockLoader(tokens, 16, 5, seed=1)
    got = [first.next_batch()[0] for _ in range(23)]
    resumed = BlockLoader(tokens, 16, 5, seed=1)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got += [resumed.next_batch()[0] for _ in range(37)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_loader_ranks_partition_the_global_batch():
    tokens = np.arange(801, dtype=np.uint16)
    whole = BlockLoader(tokens, 8, 6, seed=0)
    ranks = [BlockLoader(tokens, 8, 3, seed=0, rank=r, world_size=2) for r in range(2)]
    for _ in range(10):
        torch.testing.assert_close(torch.cat([r.next_batch()[0] for r in ranks]), whole.next_batch()[0])


def test_validation_reads_the_whole_split_in_order():
    tokens = np.arange(95, dtype=np.uint16)
    batches = list(validation_batches(tokens, 10, 4))
    assert [b[0].shape[0] for b in batches] == [4, 4, 1]
    assert torch.equal(torch.cat([b[0][:, 0] for b in batches]), torch.arange(0, 90, 10))


def test_checkpoint_without_marker_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt", {"w": torch.ones(2)}, {"step": 3})
    state, meta = load_checkpoint(path)
    assert meta["step"] == 3 and torch.equal(state["w"], torch.ones(2))
    (path / "COMPLETE").unlink()
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(path)


def tiny_run_overrides(tmp_path, data_dir, arch="gam", steps=40):
    return [f"model.arch={arch}", "model.vocab_size=512", "model.block_size=32", "model.d_model=32",
            "model.n_layers=2", "model.memory_slots=16", "model.n_heads=4", "model.dropout=0.0", "model.expand=2",
            "data.tokenizer=bpe-bytelevel", f"data.cache_dir={data_dir}", "optim.lr=3e-3", "optim.warmup_steps=5",
            f"train.max_steps={steps}", "train.batch_size=8", "train.eval_batches=4", "train.eval_interval=20",
            "train.log_interval=5", f"train.out_dir={tmp_path}", "train.progress=false", "logging.wandb=disabled"]


@pytest.mark.parametrize("arch", ["gam", "transformer", "mamba"])
def test_tiny_training_run_learns(tmp_path, prepared_small, arch):
    cfg = load_config(None, tiny_run_overrides(tmp_path, prepared_small.path.parent, arch))
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
    base = tiny_run_overrides(tmp_path, prepared_small.path.parent, steps=3) + ["train.eval_batches=1"]
    one = train(load_config(None, base + ["train.run_name=one"]), log=lambda *a: None)
    acc = train(load_config(None, base + ["train.run_name=acc", "train.grad_accum=4"]), log=lambda *a: None)
    np.testing.assert_allclose(one.summary["loss_curve"], acc.summary["loss_curve"], rtol=1e-5)
    for a, b in zip(one.model.parameters(), acc.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_vocab_mismatch_is_refused(prepared_small):
    check_vocab(prepared_small, 512)
    check_vocab(prepared_small, 640)  # spare embedding rows are allowed (e.g. padded to a multiple of 64)
    with pytest.raises(DataMismatchError, match="512 tokens but model.vocab_size is 256"):
        check_vocab(prepared_small, 256)


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
