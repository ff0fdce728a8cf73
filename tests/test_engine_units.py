"""Fast single-process checks of engine plumbing (the 2-process tests are in test_engines.py)."""
import json

import pytest
import torch

from conftest import tiny_model_config
from gam_pretrain.config import EngineConfig, OptimConfig, RunConfig, TrainConfig, load_config
from gam_pretrain.models import build_model
from gam_pretrain.train.distributed import DistInfo, env_dist_info
from gam_pretrain.train.engines import SingleEngine
from gam_pretrain.train.engines.zero import deepspeed_config


def test_deepspeed_json_is_generated_and_extra_keys_merge_over_it():
    engine = EngineConfig(kind="deepspeed", zero_stage=3, offload_optimizer=True,
                          deepspeed_extra=json.dumps({"zero_optimization": {"overlap_comm": True}, "wall_clock_breakdown": True}))
    run = RunConfig(engine=engine, optim=OptimConfig(grad_clip=0.5), train=TrainConfig(batch_size=64, grad_accum=2))
    cfg = deepspeed_config(run, world_size=8, bf16=True)
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["train_batch_size"] == 64 and cfg["gradient_clipping"] == 0.5 and cfg["bf16"] == {"enabled": True}
    hidden = run.model.d_model
    assert cfg["zero_optimization"] == {"stage": 3, "memory_efficient_linear": False,
                                        "reduce_bucket_size": hidden**2, "stage3_prefetch_bucket_size": int(0.9 * hidden**2),
                                        "stage3_param_persistence_threshold": 10 * hidden,
                                        "stage3_max_reuse_distance": hidden**2, "stage3_max_live_parameters": 24 * hidden**2,
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

    assert os.environ["MASTER_ADDR"] == "gpu-node-7" and os.environ["MASTER_PORT"] == "32345"  # 20000 + job id mod 20000
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("3", "4")


def tiny_engine(activation_checkpointing: bool = False) -> SingleEngine:
    torch.manual_seed(0)
    cfg = RunConfig(model=tiny_model_config(arch="gam"), train=TrainConfig(precision="fp32"),
                    engine=EngineConfig(activation_checkpointing=activation_checkpointing))
    return SingleEngine(build_model(cfg.model), cfg, torch.device("cpu"))


def test_activation_checkpointing_gives_the_same_gradients():
    idx = torch.randint(0, 97, (2, 32))
    grads = []
    for ckpt in (False, True):
        engine = tiny_engine(activation_checkpointing=ckpt)
        engine.forward_backward(idx, idx, 1.0)
        grads.append([p.grad.clone() for p in engine.module.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_train_step_accumulates_micro_batches_like_one_batch():
    tokens = torch.randint(0, 97, (4, 33))
    batch = (tokens[:, :-1], tokens[:, 1:])
    micro = [(tokens[i:i + 2, :-1], tokens[i:i + 2, 1:]) for i in (0, 2)]
    whole, split = tiny_engine(), tiny_engine()
    one, acc = whole.train_step([batch], 0, 10), split.train_step(micro, 0, 10)
    assert one.lr == acc.lr == whole.cfg.optim.lr / whole.cfg.optim.warmup_steps
    assert acc.loss == pytest.approx(one.loss, rel=1e-6) and acc.grad_norm == pytest.approx(one.grad_norm, rel=1e-5)
    for a, b in zip(whole.module.parameters(), split.module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_ddp_all_reduces_on_the_last_micro_batch_only(tmp_path):
    import torch.distributed as tdist

    from gam_pretrain.train.engines.ddp import DDPEngine

    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        cfg = RunConfig(model=tiny_model_config(arch="gam"), train=TrainConfig(precision="fp32"))
        engine = DDPEngine(build_model(cfg.model), cfg, torch.device("cpu"), DistInfo())
        reduced = []

        def record(state, bucket):
            reduced.append(bucket.index())
            done = torch.futures.Future()
            done.set_result(bucket.buffer())
            return done

        engine.model.register_comm_hook(None, record)
        tokens = torch.randint(0, 97, (6, 33))
        engine.train_step([(tokens[i:i + 2, :-1], tokens[i:i + 2, 1:]) for i in (0, 2, 4)], 0, 10)
        assert reduced == [0]  # one bucket (a tiny model), all-reduced once: in the last backward
    finally:
        tdist.destroy_process_group()


def test_first_host_of_a_node_list_without_scontrol(monkeypatch):
    from gam_pretrain.train import distributed

    def no_scontrol(*args, **kwargs):
        raise OSError("scontrol: not found")

    monkeypatch.setattr(distributed.subprocess, "run", no_scontrol)
    cases = {"gpu[07-10,12],cpu1": "gpu07", "node[01-04]": "node01", "a,b": "a", "single": "single"}
    assert {nodes: distributed.first_slurm_host(nodes) for nodes in cases} == cases
