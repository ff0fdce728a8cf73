"""`gam-pretrain ARGS...`, but this process SIGKILLs itself in the middle of writing one checkpoint.

    GAM_KILL_IN_SAVE=STEP:WHEN[:RANK] python tests/dist/torture_victim.py train KEY=VALUE ...

WHEN is `before` (the checkpoint folder made, no engine file yet) or `after` (the engine's files
written, the manifest and the COMPLETE marker not yet). RANK (default 0) is the rank that dies;
under torchrun the launcher then stops the others, as a node failure would.
"""
import os
import signal
import sys

from gam_pretrain.cli import main
from gam_pretrain.train import loop


def kill_in_save(build_engine, step: int, when: str, rank: int):
    def build(*args, **kwargs):
        engine = build_engine(*args, **kwargs)
        save = engine.save

        def dying_save(directory):
            dies = directory.name.startswith(f"step_{step:08d}") and int(os.environ.get("RANK", "0")) == rank
            if dies and when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            save(directory)
            if dies:
                os.kill(os.getpid(), signal.SIGKILL)

        engine.save = dying_save
        return engine

    return build


if os.environ.get("GAM_KILL_IN_SAVE"):
    step, when, *rank = os.environ["GAM_KILL_IN_SAVE"].split(":")
    loop.build_engine = kill_in_save(loop.build_engine, int(step), when, int(rank[0]) if rank else 0)
sys.exit(main(sys.argv[1:]))
