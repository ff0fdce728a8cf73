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


@pytest.fixture(scope="session")
def prepared_small(tmp_path_factory):
    """The embedded corpus tokenized with a small byte-level BPE, shared by the session."""
    from gam_pretrain.data import prepare_corpus

    return prepare_corpus("embedded", "bpe-bytelevel", 512, tmp_path_factory.mktemp("data"), log=lambda *a: None)
