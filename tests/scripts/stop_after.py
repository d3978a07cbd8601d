"""Train and stop after optimizer step N as an interrupted run would (a checkpoint is saved).

Usage: ``torchrun ... tests/scripts/stop_after.py N KEY=VALUE ...``, or ``python`` instead of
``torchrun ...`` for one process.
"""

import sys

from common import finish

from dsv3.config import load_config
from dsv3.training.trainer import Trainer

Trainer(load_config(None, sys.argv[2:])).run(stop_after=int(sys.argv[1]))
finish(0)
