"""What the programs in this folder share: ending the process the way the ``dsv3`` command does.

The tests start these programs under ``torchrun`` (``python -m torch.distributed.run ...
tests/scripts/NAME.py ARGS``) or plain ``python``. A process that joined a process group ends
like ``dsv3.cli.run``: output flushed, then ``os._exit`` without interpreter finalization, so
that gloo's threads cannot abort a finished run at exit (see ``dsv3.cli.run``).
"""

import os
import sys


def finish(code: int = 0) -> None:
    """End this process with ``code`` (never returns)."""
    from dsv3.parallel.distributed import started

    sys.stdout.flush()
    sys.stderr.flush()
    if started():
        os._exit(code)
    sys.exit(code)
