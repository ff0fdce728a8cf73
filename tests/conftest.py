import os

import pytest
import torch

# Deterministic and fair on a 2-core CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("WANDB_MODE", "disabled")

from gam_pretrain.models import ModelConfig  # noqa: E402


def tiny_model_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=97, block_size=32, d_model=32, n_layers=2, memory_slots=16, conv_kernel=3, n_heads=4,
                dropout=0.0, d_state=4, d_conv=4, expand=2)
    base.update(overrides)
    return ModelConfig(**base)


os.environ["HF_DATASETS_OFFLINE"] = "1"  # tests never reach the Hub
os.environ["HF_HUB_OFFLINE"] = "1"


def small_prep_config(**overrides):
    from gam_pretrain.data import PrepConfig, SourceSpec

    base = dict(source=SourceSpec(kind="embedded"), tokenizer="bpe-bytelevel", vocab_size=512, block_size=32,
                documents_per_unit=4, samples_per_shard=1024)
    base.update(overrides)
    return PrepConfig(**base)


@pytest.fixture(scope="session")
def prepared_small(tmp_path_factory):
    """The embedded corpus as shards: byte-level BPE with 512 tokens, block 32. Shared by the session."""
    from gam_pretrain.data import ShardSet, run_prep

    out = tmp_path_factory.mktemp("data") / "embedded"
    run_prep(small_prep_config(), out, workers=1, log=lambda *a: None, progress=False)
    return ShardSet(out)
