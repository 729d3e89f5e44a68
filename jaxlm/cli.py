"""What every `python -m jaxlm.*` command shares at its edge: log lines and the exit-2 rule."""

import logging
import os
import pathlib
import sys
from collections.abc import Callable

from jaxlm.errors import EXIT_FAILED, EXIT_PREEMPTED, EXIT_USAGE, Diverged, Preempted, UsageError

log = logging.getLogger("jaxlm")


def setup_logging() -> None:
    """jaxlm's own lines on stdout, bare; JAX's and other libraries' loggers keep their levels."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # a library that configures the root logger must not echo our lines


def run_command(body: Callable[[], object]) -> int:
    """Run a command's body; a UsageError becomes one line on stderr and exit code 2, a
    preemption exit code 75 and a diverged run exit code 1 (see jaxlm/errors.py)."""
    setup_logging()
    try:
        body()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Preempted as e:
        log.info("%s", e)
        _mark_stopped()
        return EXIT_PREEMPTED
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _mark_stopped() -> None:
    """Create the file JAXLM_STOP_MARKER names, if set: a launcher's way to learn that the run
    stopped with a complete checkpoint when the exit code is lost (under
    `srun --kill-on-bad-exit` the first task to exit 75 gets its peers killed, and srun then
    reports their signal, not 75)."""
    marker = os.environ.get("JAXLM_STOP_MARKER")
    if marker:
        try:
            pathlib.Path(marker).touch()
        except OSError as e:
            log.warning("could not create JAXLM_STOP_MARKER %s: %s", marker, e)
