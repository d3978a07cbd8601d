"""``dsv3.cli.run`` with a stand-in ``main`` that returns 3, for the test of the clean exit.

Usage: ``python tests/scripts/exit_probe.py STARTED`` with STARTED ``True`` (as if the process
had joined a process group) or ``False``. Prints ``ran``, and ``finalized`` from an ``atexit``
handler if the interpreter finalizes.
"""

import atexit
import sys

import dsv3.cli
import dsv3.parallel.distributed as d

atexit.register(lambda: print("finalized", flush=True))
started = sys.argv[1] == "True"


def fake_main():
    d._started = started
    print("ran", flush=True)
    return 3


dsv3.cli.main = fake_main
dsv3.cli.run()
