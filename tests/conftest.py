import os
import shutil
import subprocess
import sys
from pathlib import Path

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


@pytest.fixture(scope="session")
def prepared_tiny(tmp_path_factory):
    """A corpus of about 80 train samples (block 32, shards of 16): an epoch is a few steps, so tests
    can cross one. 30 documents of 300 characters from the start of the embedded corpus's splits."""
    import json

    from gam_pretrain.data import ShardSet, SourceSpec, run_prep
    from gam_pretrain.data.sources import _embedded_documents

    corpus = tmp_path_factory.mktemp("tiny-corpus")
    for split, count in (("train", 30), ("validation", 8)):
        text = "".join(_embedded_documents(split))
        docs = [text[300 * i : 300 * (i + 1)] for i in range(count)]
        (corpus / f"{split}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    spec = SourceSpec(kind="files", splits={s: str(corpus / f"{s}.jsonl") for s in ("train", "validation")})
    out = tmp_path_factory.mktemp("data") / "tiny"
    run_prep(small_prep_config(source=spec, samples_per_shard=16), out, workers=1, log=lambda *a: None, progress=False)
    return ShardSet(out)


REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real SLURM on localhost (munge, mariadb, slurmdbd, slurmctld, two slurmd), started by
    tools/local_slurm.py for this session and always torn down by PID. Installs the Debian packages
    when run as root (CI); elsewhere, without SLURM installed, the SLURM tests are skipped."""
    if os.environ.get("GAM_SKIP_SLURM") == "1":
        pytest.skip("GAM_SKIP_SLURM=1")
    if os.geteuid() != 0 and not shutil.which("slurmctld"):
        pytest.skip("needs SLURM installed, or root to install it (CI runs as root)")
    state = Path(os.environ.get("GAM_SLURM_STATE", f"/tmp/gam-pretrain-slurm-test-{os.getuid()}"))
    script = [sys.executable, str(REPO / "tools" / "local_slurm.py")]
    up = subprocess.run([*script, "up", "--state", str(state)], capture_output=True, text=True)
    if up.returncode != 0:
        subprocess.run([*script, "down", "--state", str(state)])
        pytest.fail(f"could not start the local SLURM cluster:\n{up.stderr[-4000:]}")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        yield state
    finally:
        subprocess.run([*script, "down", "--state", str(state)], capture_output=True)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
