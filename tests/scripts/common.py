"""What the programs in this folder share: ending the process the way the ``dsv3`` command does.

The tests start these programs under ``torchrun`` (``python -m torch.distributed.run ...
tests/scripts/NAME.py ARGS``) or plain ``python``. Every one of them joins a process group, and
ends with :func:`finish`: output flushed, then ``os._exit`` without interpreter finalization,
as ``dsv3.cli.run`` ends such a process.

Why: a gloo worker thread releases a collective's work object (and with it the tensors) after
the collective has returned to Python. When the tensor's Python object has died in the
meantime (a temporary such as ``all_reduce(torch.tensor([...]))``), the tensor owns it, and
releasing it takes the GIL. If the main thread is already in ``Py_FinalizeEx``, ``take_gil``
ends the worker thread with ``pthread_exit``, whose forced unwind through the noexcept
``~AsyncWork`` calls ``std::terminate``: "terminate called without an active exception",
SIGABRT, exit -6 after the program's work is done. ``dist.destroy_process_group()`` does not
prevent it: DeepSpeed (``deepspeed.comm``, ``deepspeed.utils.groups``) keeps references to the
process groups, so their gloo threads live on into finalization. Hence the exit is unconditional
here, however the process joined its group (``dsv3`` or ``dist.init_process_group``).
"""

import os
import sys


def finish(code: int = 0) -> None:
    """End this process with ``code`` (never returns), without interpreter finalization.

    Every file the program wrote must be closed by then (``os._exit`` flushes no Python buffers
    but stdout's and stderr's, which are flushed here)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
