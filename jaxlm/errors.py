"""Exceptions that end a command with a documented exit code.

Anything a user can get wrong from the command line or a config file (a mesh that does not fit,
a typo in a key, missing data, a checkpoint of another model) raises `UsageError` with one
sentence that says what is wrong and, where possible, how to fix it. The command-line entry points
catch it, print the sentence to stderr and exit with `EXIT_USAGE`, before any compute starts.

A run that stops early on request (SIGTERM, SIGUSR1, `train.time_limit`) saves a checkpoint at
the step it finished and exits with `EXIT_PREEMPTED`, which requeue scripts look for: running the
same command again continues the run.

A process that stops making progress (stuck in a collective, a peer hung) is ended by the step
watchdog (jaxlm/watchdog.py) with `EXIT_HUNG`: requeue scripts requeue without its node, and the
run continues from its last checkpoint.

`python -m jaxlm.doctor` exits with `EXIT_UNHEALTHY` when a process or link is markedly slower
than its peers: launch scripts that run it first requeue without the hosts it names.
"""

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL in sysexits.h: "temporary failure, try again"
EXIT_HUNG = 76  # the step watchdog: no progress within train.step_timeout
EXIT_UNHEALTHY = 77  # python -m jaxlm.doctor: an outlier host or link


class UsageError(Exception):
    """A mistake in the user's input, reported as one sentence and exit code 2."""


class Preempted(Exception):
    """Training stopped on request after saving a checkpoint; exit code 75."""


class Diverged(Exception):
    """Training cannot go on (bad steps with no checkpoint to roll back to); exit code 1."""
