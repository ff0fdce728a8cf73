"""Preemption: a signal only sets a flag; the loop asks all ranks at the next step boundary.

SIGUSR1, SIGUSR2 (SLURM --signal / submitit) and SIGTERM (scancel, time limit) are caught. The
loop agrees on the flag with a collective, every rank saves the checkpoint together, and the
process exits with EXIT_REQUEUE so a launcher script knows to requeue the job.
"""
from __future__ import annotations

import signal
import threading

EXIT_REQUEUE = 3
SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


class PreemptionFlag:
    def __init__(self, install: bool = True):
        self.signum: int | None = None
        self._previous = {}
        if install and threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # no I/O, no collectives: just remember it
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; exits with EXIT_REQUEUE."""

    def __init__(self, step: int):
        super().__init__(EXIT_REQUEUE)
        self.step = step
