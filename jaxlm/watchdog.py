"""The step watchdog: a process that stops making progress ends, saying where it was.

JAX has no NCCL-style watchdog: a process waiting in a collective for a peer that hangs (or for
a link that went down) waits until the job's time limit. The coordination service catches a
peer that *died*, not one that is alive and stuck. So every process runs a thread that watches
the training loop's progress. The loop names each phase as it enters it (`enter`):

    compiling             the first step: traced, compiled and run
    step N                taking batch N, dispatching step N, reading step N-1's metrics
    validating            after step N
    saving checkpoint N

If a phase lasts longer than its allowance, the watchdog logs every thread's Python stack and
the phase, hands an `events` row to the run's metrics, and ends the process with `EXIT_HUNG`
(76) at once, so a launch script can requeue the job without the node that hung. The other
processes stop progressing too (they wait for the hung one), so their watchdogs end them the
same way within the allowance.

Allowances (`train.step_timeout`): `auto` gives a phase `AUTO_FACTOR` times the median of its
earlier durations, at least `AUTO_FLOOR_S`; a number of seconds gives every phase that much.
Either way a phase seen for the first time (compiling, the first validation and the first
save, which compile or open what they need) gets at least `FIRST_TIME_S`.
"""

import logging
import os
import socket
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable

from jaxlm.errors import EXIT_HUNG, UsageError

log = logging.getLogger("jaxlm")

AUTO_FACTOR = 20.0
AUTO_FLOOR_S = 300.0
FIRST_TIME_S = 1800.0  # a first compile of a large model on a busy host
_HISTORY = 50  # durations kept per phase kind


def parse_timeout(text) -> float | None:
    """`train.step_timeout`: None for 'auto', else positive seconds."""
    if str(text).strip().lower() == "auto":
        return None
    try:
        seconds = float(text)
    except ValueError:
        raise UsageError(f"train.step_timeout must be 'auto' or seconds, not '{text}'") from None
    if not seconds > 0 or seconds == float("inf"):
        raise UsageError(f"train.step_timeout must be a positive number of seconds, not {text}")
    return seconds


class Watchdog:
    """Watches `enter` calls from the training loop on a daemon thread; see the module doc.

    `on_hang(row)` is called with the event row before the process ends (the run writes it to
    metrics.jsonl); `exit` ends the process (tests pass their own)."""

    def __init__(
        self,
        timeout: float | None,
        *,
        process_index: int = 0,
        on_hang: Callable[[dict], None] = lambda row: None,
        exit: Callable[[int], None] = os._exit,
        poll_s: float = 0.5,
    ):
        self.timeout, self.process_index = timeout, process_index
        self.on_hang, self._exit, self.poll_s = on_hang, exit, poll_s
        self._lock = threading.Lock()
        self._phase, self._kind, self._step, self._since = None, None, 0, time.monotonic()
        self._durations: dict[str, list[float]] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="jaxlm-watchdog", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stopped.set()
        self._thread.join()

    def enter(self, phase: str, step: int, kind: str | None = None) -> None:
        """The loop is now in `phase` at `step`; the phase before it has ended. `kind` groups
        phases whose durations are alike (every 'step N' is of kind 'step')."""
        now = time.monotonic()
        with self._lock:
            if self._kind is not None:
                history = self._durations.setdefault(self._kind, [])
                history.append(now - self._since)
                del history[:-_HISTORY]
            self._phase, self._kind, self._step, self._since = phase, kind or phase, step, now

    def allowance(self, kind: str) -> float:
        history = self._durations.get(kind, [])
        if self.timeout is not None:
            return self.timeout if history else max(self.timeout, FIRST_TIME_S)
        if not history:
            return FIRST_TIME_S
        return max(AUTO_FLOOR_S, AUTO_FACTOR * statistics.median(history))

    def _watch(self) -> None:
        while not self._stopped.wait(self.poll_s):
            with self._lock:
                if self._kind is None:
                    continue
                waited, allowed = time.monotonic() - self._since, self.allowance(self._kind)
                phase, step = self._phase, self._step
            if waited > allowed:
                self._fire(phase, step, waited, allowed)
                return

    def _fire(self, phase: str, step: int, waited: float, allowed: float) -> None:
        host = socket.gethostname()
        log.error(
            "watchdog: no progress for %.0f s (allowed %.0f s) in phase '%s' at step %d on "
            "host %s, process %d; ending with exit code %d. Stacks of every thread:\n%s",
            waited,
            allowed,
            phase,
            step,
            host,
            self.process_index,
            EXIT_HUNG,
            all_stacks(),
        )
        try:
            self.on_hang(
                {
                    "step": step,
                    "event": "hang",
                    "phase": phase,
                    "host": host,
                    "process": self.process_index,
                    "waited_s": waited,
                    "allowed_s": allowed,
                }
            )
        finally:
            for handler in log.handlers:
                handler.flush()
            sys.stdout.flush()
            sys.stderr.flush()
            self._exit(EXIT_HUNG)


def all_stacks() -> str:
    """Every thread's Python stack, named."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        stack = "".join(traceback.format_stack(frame))
        parts.append(f"--- thread {names.get(ident, ident)}\n{stack}")
    return "\n".join(parts)
