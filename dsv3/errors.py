"""The one exception type for bad user input.

Every problem a user can fix (a bad config value, a missing corpus, an impossible parallel
layout, a corrupt checkpoint) is raised as :class:`DsvError` with a single-line message that
names the problem and the fix. The command line turns it into one line on stderr and exit
code 2 (see ``dsv3/cli.py``); library users catch it like any other exception.
"""


class DsvError(Exception):
    """A user-fixable problem. ``str(err)`` is one line: what is wrong, then how to fix it."""

    exit_code = 2


class StopRequested(Exception):
    """Training stopped early on SIGTERM / SIGUSR1 after saving a checkpoint; run again to resume.

    Exit code 75 (EX_TEMPFAIL: "try again"); SLURM scripts requeue on it.
    """

    exit_code = 75


class TrainingDiverged(Exception):
    """The loss or gradient became NaN/Inf and ``train.nonfinite=stop``; the last good
    checkpoint is still ``latest``. Exit code 3."""

    exit_code = 3
