"""SIGTERM (a SLURM preemption, or torchrun forwarding one) -> save at the end of the step and exit.

The handler only records the request; the trainer checks it after every step (all ranks agree
through an all-reduce), saves a checkpoint and returns, so a signal never interrupts a save.
"""

from __future__ import annotations

import signal


class TerminationRequest:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.requested = False
        self.signal_name: str | None = None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name
