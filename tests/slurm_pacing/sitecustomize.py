"""Paces the first attempt of a SLURM job for tests/test_slurm.py's requeue test (the job's set-up
puts this folder on PYTHONPATH; the reference run does not see it).

SLURM checks time limits every 30 s, so the first attempt must outlast that while the test waits
for SLURM's signal. Instead of a run long enough in steps (16,000 tiny steps, minutes of CPU for
three runs sharing 2 cores), each optimizer step of the first attempt sleeps GAM_TEST_STEP_SLEEP_S:
long in wall time, light on the cores. A requeued attempt (SLURM_RESTART_COUNT >= 1) runs at full
speed. The sleep sits outside the step's arithmetic, so the run's numbers are unchanged."""
import importlib.abc
import importlib.util
import os
import sys
import time

TARGET = "gam_pretrain.train.engines.base"


class _PaceFirstAttempt(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            train_step, pause = module.Engine.train_step, float(os.environ["GAM_TEST_STEP_SLEEP_S"])

            def paced(self, *args, **kwargs):
                time.sleep(pause)
                return train_step(self, *args, **kwargs)

            module.Engine.train_step = paced

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("SLURM_JOB_ID") and os.environ.get("GAM_TEST_STEP_SLEEP_S") \
        and os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
    sys.meta_path.insert(0, _PaceFirstAttempt())
