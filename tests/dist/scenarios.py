"""Runs training scenarios inside one multi-process launch (torchrun), for the engine tests.

    torchrun --nproc_per_node 2 tests/dist/scenarios.py SPEC.json

SPEC: {"runs": [{"name": ..., "overrides": [...]}, ...], "out": "results.json"}. Each run is a
train() call in the same process group; rank 0 writes every run's summary to `out`. A run with
"init_only": true builds the model under its engine and stops: its result holds the checksum of the
gathered initial weights and each rank's peak RSS growth while building (bytes, from /proc).
"""
import importlib
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

torch.set_num_threads(1)

from gam_pretrain.config import load_config  # noqa: E402
from gam_pretrain.train.loop import train  # noqa: E402


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM), since the last reset_peak_rss()."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def init_only(cfg) -> dict:
    import torch.distributed as dist

    from gam_pretrain.train.distributed import all_reduce_mean, init_distributed
    from gam_pretrain.train.engines import build_model_and_engine
    from gam_pretrain.train.loop import params_checksum, seed_everything

    from gam_pretrain.train.engines import engine_class
    from gam_pretrain.train.engines.base import Engine

    info = init_distributed("cpu")
    engine_class(cfg, info.world_size)  # its modules imported (DeepSpeed's are large) before measuring
    if cfg.engine.kind == "deepspeed":
        importlib.import_module("deepspeed")
    dist.barrier()
    reset_peak_rss()
    before = peak_rss_bytes()
    materialized = []
    deferred = Engine.materialize_sharded

    def measured(engine, shard_unit):  # the peak up to the end of materializing (before any optimizer)
        deferred(engine, shard_unit)
        materialized.append(peak_rss_bytes() - before)

    Engine.materialize_sharded = measured
    seed_everything(cfg.train.seed)
    try:
        engine = build_model_and_engine(cfg, torch.device("cpu"), info)
    finally:
        Engine.materialize_sharded = deferred
    growth = peak_rss_bytes() - before
    after_init = float(torch.randn(()))  # the global stream after init, the same whichever path built it
    full = engine.full_state_dict()
    peaks = [None] * info.world_size
    dist.all_gather_object(peaks, growth)
    model_peaks = [None] * info.world_size
    dist.all_gather_object(model_peaks, materialized[0] if materialized else None)
    all_reduce_mean(torch.zeros(1))
    return {"params_checksum": params_checksum(full) if info.is_main else None, "init_rss_growth": peaks,
            "materialize_rss_growth": model_peaks,
            "param_bytes": sum(v.numel() * 4 for v in full.values()) if info.is_main else None,
            "after_init_draw": after_init}


def main(spec_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    results = {}
    plain_linear = torch.nn.functional.linear
    for run in spec["runs"]:
        if run.get("init_only"):
            results[run["name"]] = init_only(load_config(None, run["overrides"]))
            continue
        try:
            result = train(load_config(None, run["overrides"]), log=lambda *a: None)
        except SystemExit as e:  # preemption: the checkpoint is written; leave with its status at once
            sys.stdout.flush()
            os._exit(e.code if isinstance(e.code, int) else 1)
        results[run["name"]] = {k: v for k, v in result.summary.items()}
        # ZeRO-3 swaps in DeepSpeed's linear for its own forward only (every other model uses torch's)
        results[run["name"]]["plain_linear_after"] = torch.nn.functional.linear is plain_linear
        results[run["name"]]["state"] = {k: v.tolist() for k, v in result.engine.full_state_dict().items()} \
            if run.get("weights") else None
    if int(os.environ.get("RANK", "0")) == 0:
        with open(spec["out"], "w") as f:
            json.dump(results, f)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    # Skip interpreter teardown: DeepSpeed/gloo background threads sometimes abort the process there
    # ("terminate called without an active exception") after all work is done and written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
