"""Runs training scenarios inside one multi-process launch (torchrun), for the engine tests.

    torchrun --nproc_per_node 2 tests/dist/scenarios.py SPEC.json

SPEC: {"runs": [{"name": ..., "overrides": [...]}, ...], "out": "results.json"}. Each run is a
train() call in the same process group; rank 0 writes every run's summary to `out`.
"""
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


def main(spec_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    results = {}
    for run in spec["runs"]:
        try:
            result = train(load_config(None, run["overrides"]), log=lambda *a: None)
        except SystemExit as e:  # preemption: the checkpoint is written; leave with its status at once
            sys.stdout.flush()
            os._exit(e.code if isinstance(e.code, int) else 1)
        results[run["name"]] = {k: v for k, v in result.summary.items()}
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
