"""Weighted mixtures of prepared shard sets (data.mixture)."""
import json

import numpy as np
import pytest

from conftest import small_prep_config
from gam_pretrain.data import PrepError, ShardSet, SourceSpec, run_prep
from gam_pretrain.data.mixture import MixtureLoader

QUIET = dict(log=lambda *a: None, progress=False)


@pytest.fixture(scope="module")
def second_set(prepared_small, tmp_path_factory):
    """Another corpus prepped with prepared_small's tokenizer and block size."""
    folder = tmp_path_factory.mktemp("second")
    stories = [f"Once upon a time a {a} ate {f} by the {p}." for a in ("cat", "dog", "owl", "fox")
               for f in ("fish", "rice", "honey") for p in ("river", "hill", "sea")] * 20
    for split, docs in (("train", stories), ("validation", stories[:20])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    spec = SourceSpec(kind="files", splits={s: str(folder / f"{s}.jsonl") for s in ("train", "validation")})
    out = folder / "data"
    run_prep(small_prep_config(source=spec, tokenizer=str(prepared_small.path / "tokenizer.json"), samples_per_shard=64),
             out, **QUIET)
    return ShardSet(out)


def mixture(prepared_small, second_set, weights=(0.7, 0.3), **kw):
    sources = {str(prepared_small.path): prepared_small, str(second_set.path): second_set}
    return MixtureLoader(sources, dict(zip(sources, weights)), "train", kw.pop("batch", 32), seed=3, **kw)


def source_of(loader, ids):
    return np.searchsorted(loader.offsets, ids, side="right") - 1


def test_every_prefix_holds_the_weights_and_the_samples_are_each_sources_own(prepared_small, second_set):
    loader = mixture(prepared_small, second_set)
    counts = np.zeros(2, dtype=np.int64)
    for step in range(1, 313):  # 9,984 samples: the second source (2,000-odd samples) repeats
        batch = loader.next_step()
        counts += np.bincount(source_of(loader, loader.last_sample_ids), minlength=2)
        # every prefix: the lighter source within one sample of its share
        assert abs(counts[1] - 0.3 * counts.sum()) < 1 and np.array_equal(counts, loader.samples_before(step))
    assert counts.sum() == 312 * 32 and abs(counts[0] / counts.sum() - 0.7) < 0.01
    # a sample is its source's row: ids map back to the rows read from each set
    ids = loader.last_sample_ids
    rows = np.concatenate([x.numpy() for x, _ in batch])
    first = next(k for k, i in enumerate(ids) if source_of(loader, [i])[0] == 1)
    local = int(ids[first] - loader.offsets[1])
    shards, start = second_set.shards("train"), 0
    for shard in shards:
        if local < start + shard["samples"]:
            assert np.array_equal(rows[first], second_set.read(shard)[local - start][:-1])
            break
        start += shard["samples"]


def test_the_order_is_the_seeds_and_resumes_at_another_world_size(prepared_small, second_set):
    straight = mixture(prepared_small, second_set)
    batches = [np.concatenate([x.numpy() for x, _ in straight.next_step()]) for _ in range(12)]
    first = mixture(prepared_small, second_set)
    for _ in range(5):
        first.next_step()
    ranks = [mixture(prepared_small, second_set, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(first.state_dict())
    for step in range(5, 12):
        got = np.concatenate([np.concatenate([x.numpy() for x, _ in r.next_step()]) for r in ranks])
        assert np.array_equal(got, batches[step])
    with pytest.raises(ValueError, match="seed"):
        mixture(prepared_small, second_set, rank=0).load_state_dict({**first.state_dict(), "seed": 4})


def test_sets_of_another_tokenizer_are_refused_and_caps_hold(prepared_small, prepared_tiny, second_set):
    with pytest.raises(PrepError, match=rf"^data.mixture: {prepared_tiny.path} has another tokenizer"):
        MixtureLoader({str(prepared_small.path): prepared_small, str(prepared_tiny.path): prepared_tiny},
                      {str(prepared_small.path): 1, str(prepared_tiny.path): 1}, "train", 32, seed=0)
    loader = mixture(prepared_small, second_set, max_epochs={str(second_set.path): 1.0})
    loader.check_caps(10)
    with pytest.raises(PrepError, match=rf"{second_set.path} would be read .* over its data.mixture_max_epochs of 1.0"):
        loader.check_caps(1000)


def test_a_mixture_run_logs_tokens_per_source_and_a_sigkilled_run_resumes_exactly(prepared_small, second_set,
                                                                                  tmp_path):
    from test_torture import kill_group, launch, wait_for

    from gam_pretrain.config import load_config
    from gam_pretrain.train.loop import train

    mix = json.dumps({str(prepared_small.path): 3, str(second_set.path): 1})
    base = ["model.vocab_size=512", "model.block_size=32", "model.d_model=32", "model.n_layers=2",
            "model.memory_slots=16", "model.dropout=0.1", "optim.warmup_steps=2", "train.batch_size=8",
            "train.eval_batches=2", "train.eval_interval=0", "train.log_interval=2", f"train.out_dir={tmp_path}",
            "train.progress=false", "logging.wandb=disabled", f"data.mixture={mix}", "train.max_steps=12",
            "checkpoint.interval_steps=4"]
    straight = train(load_config(None, [*base, "train.run_name=straight"]), log=lambda *a: None).summary
    by_source = straight["tokens_by_source"]
    assert sum(by_source.values()) == straight["tokens"]
    assert by_source[str(prepared_small.path)] == 3 * by_source[str(second_set.path)]
    logged = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert any("tokens_by_source" in record for record in logged)
    # SIGKILL once the step-4 checkpoint is complete, relaunch: the same losses as the straight run
    args = ["train", *base, "train.run_name=victim"]
    proc = launch(args, "single", tmp_path / "victim.log")
    assert wait_for((tmp_path / "victim" / "checkpoints" / "step_00000004" / "COMPLETE").exists, proc)
    kill_group(proc)
    assert not (tmp_path / "victim" / "summary.json").exists()
    assert launch(args, "single", tmp_path / "victim.log").wait(timeout=600) == 0, (tmp_path / "victim.log").read_text()[-3000:]
    resumed = json.loads((tmp_path / "victim" / "summary.json").read_text())
    assert resumed["loss_curve"] == straight["loss_curve"] and resumed["tokens_by_source"] == by_source
