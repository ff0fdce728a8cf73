"""Fast single-process checks of engine plumbing (the 2-process tests are in test_engines.py)."""
import json

import pytest
import torch

from conftest import tiny_model_config
from gam_pretrain.config import EngineConfig, OptimConfig, load_config
from gam_pretrain.models import build_model
from gam_pretrain.train.distributed import env_dist_info
from gam_pretrain.train.engines import SingleEngine
from gam_pretrain.train.engines.zero import deepspeed_config


def test_deepspeed_json_is_generated_and_extra_keys_merge_over_it():
    engine = EngineConfig(kind="deepspeed", zero_stage=3, offload_optimizer=True,
                          deepspeed_extra=json.dumps({"zero_optimization": {"overlap_comm": True}, "wall_clock_breakdown": True}))
    cfg = deepspeed_config(engine, OptimConfig(grad_clip=0.5), micro_batch=4, grad_accum=2, world_size=8, bf16=True)
    assert cfg["train_batch_size"] == 64 and cfg["gradient_clipping"] == 0.5 and cfg["bf16"] == {"enabled": True}
    assert cfg["zero_optimization"] == {"stage": 3, "memory_efficient_linear": False,
                                        "offload_optimizer": {"device": "cpu"}, "overlap_comm": True}
    assert cfg["wall_clock_breakdown"] is True


def test_bad_deepspeed_extra_is_a_config_error():
    from gam_pretrain.config import ConfigError, validate

    with pytest.raises(ConfigError, match="deepspeed_extra"):
        validate(load_config(None, ["engine.deepspeed_extra=[1, 2]"]))


def test_rank_and_master_come_from_slurm_variables(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        # setenv first so monkeypatch records the key and removes what env_dist_info writes to it;
        # a leaked RANK/MASTER_ADDR would make every later train() wait for a 4-rank rendezvous
        monkeypatch.setenv(key, "unset")
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "12345")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu-node-7")
    info = env_dist_info()
    assert (info.rank, info.world_size, info.local_rank) == (3, 4, 1)
    import os

    assert os.environ["MASTER_ADDR"] == "gpu-node-7" and os.environ["MASTER_PORT"] == str(20000 + 12345 % 20000)
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("3", "4")


def test_activation_checkpointing_gives_the_same_gradients():
    idx = torch.randint(0, 97, (2, 32))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        engine = SingleEngine(build_model(tiny_model_config(arch="gam")), OptimConfig(), torch.device("cpu"), "fp32",
                              engine_cfg=EngineConfig(activation_checkpointing=ckpt))
        engine.forward_backward(idx, idx, 1.0)
        grads.append([p.grad.clone() for p in engine.module.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
