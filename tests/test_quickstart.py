import json
import math

from gam_pretrain.config import load_config
from gam_pretrain.quickstart import QUICKSTART_MODELS, run_quickstart, unigram_perplexity


def test_unigram_perplexity_of_a_uniform_stream():
    import numpy as np

    tokens = np.tile(np.arange(8), 50)
    assert math.isclose(unigram_perplexity(tokens, tokens, 8), 8.0, rel_tol=1e-9)


def test_quickstart_end_to_end_at_smoke_scale(tmp_path, prepared_small):
    # The real configs/quickstart.yaml, shrunk: a few steps of each family on the embedded corpus.
    cfg = load_config("configs/quickstart.yaml", [
        "model.vocab_size=512", f"data.dir={prepared_small.path}", "model.d_model=64",
        "model.block_size=32", "model.n_layers=2", "train.max_steps=150", "train.eval_batches=4", "optim.lr=3e-3",
        "train.eval_interval=0", f"train.out_dir={tmp_path}", "logging.wandb=disabled", "train.progress=false",
        "optim.warmup_steps=5",
    ])
    lines = []
    report = run_quickstart(cfg, log=lines.append)
    assert [r["model"] for r in report["results"]] == [label for label, _ in QUICKSTART_MODELS]
    for r in report["results"]:
        assert r["val_ppl"] < report["unigram_val_ppl"], (r["model"], r["val_ppl"])
        assert r["tokens"] == 150 * 16 * 32
    assert set(report["samples"]) == {label for label, _ in QUICKSTART_MODELS}
    assert all(text.startswith("ROMEO.") and len(text) > 20 for text in report["samples"].values())
    assert json.loads((tmp_path / "results.json").read_text())["unigram_val_ppl"] == report["unigram_val_ppl"]
    table = (tmp_path / "results.md").read_text()
    assert "| unigram reference |" in table and "Mamba (standard)" in table
    assert (tmp_path / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any("val PPL" in line for line in lines)
