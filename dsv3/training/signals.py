"""Stopping a run on a signal: SIGTERM / SIGUSR1 on any rank ask every rank to save and stop
after the current step (exit code 75; ``slurm/train.sbatch`` sends SIGUSR1 before the time limit)."""

from __future__ import annotations

import signal
import threading

import torch

from dsv3.collectives import all_reduce_sum


class StopSignal:
    """Records SIGTERM / SIGUSR1 (installed on the main thread only) and lets every rank agree
    on whether any rank received one.

    Attributes:
        received: the last signal number received on this rank, 0 if none.
    """

    def __init__(self):
        self.received = 0

        def handler(signum, frame):
            self.received = signum

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, handler)

    def agreed(self) -> bool:
        """True on every rank if any rank received a stop signal (one tiny all-reduce per step)."""
        flag = torch.tensor([1.0 if self.received else 0.0])
        return all_reduce_sum(flag).item() > 0
