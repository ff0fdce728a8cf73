"""`gam-pretrain ARGS...`, but this process SIGKILLs itself in the middle of writing one checkpoint.

    GAM_KILL_IN_SAVE=STEP:WHEN[:RANK] python tests/dist/torture_victim.py train KEY=VALUE ...

WHEN is `before` (the checkpoint folder made, no engine file yet) or `after` (the engine's files
written, the manifest and the COMPLETE marker not yet: with checkpoint.async_save, in the
background thread that writes them). RANK (default 0) is the rank that dies; under torchrun the
launcher then stops the others, as a node failure would. GAM_KILL_NOTE=FILE: the dying thread's
name is written there first.
"""
import os
import signal
import sys
import threading

from gam_pretrain.cli import main
from gam_pretrain.train import loop


def die() -> None:
    if os.environ.get("GAM_KILL_NOTE"):
        with open(os.environ["GAM_KILL_NOTE"], "w") as f:
            f.write(threading.current_thread().name)
    os.kill(os.getpid(), signal.SIGKILL)


def kill_in_save(build_model_and_engine, step: int, when: str, rank: int):
    def build(*args, **kwargs):
        engine = build_model_and_engine(*args, **kwargs)
        stage_save = engine.stage_save

        def dying_stage_save(directory):
            dies = directory.name.startswith(f"step_{step:08d}") and int(os.environ.get("RANK", "0")) == rank
            if dies and when == "before":
                die()
            write = stage_save(directory)

            def dying_write(group):
                write(group)
                if dies:
                    die()

            return dying_write

        engine.stage_save = dying_stage_save
        return engine

    return build


if os.environ.get("GAM_KILL_IN_SAVE"):
    step, when, *rank = os.environ["GAM_KILL_IN_SAVE"].split(":")
    loop.build_model_and_engine = kill_in_save(loop.build_model_and_engine, int(step), when,
                                               int(rank[0]) if rank else 0)
sys.exit(main(sys.argv[1:]))
