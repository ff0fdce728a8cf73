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
_early_signal: int | None = None


def _remember_early(signum, frame) -> None:
    global _early_signal
    _early_signal = signum


def catch_early_signals() -> None:
    """Call first thing in a launched job: a signal that arrives while data and engine are still
    being set up is remembered (not fatal) and honoured at the first step boundary."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _remember_early)


class PreemptionFlag:
    def __init__(self, install: bool = True):
        global _early_signal
        self.signum: int | None = _early_signal
        _early_signal = None
        self._previous = {}
        if install and threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # no I/O, no collectives: just remember it
        self.signum = signum

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

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
