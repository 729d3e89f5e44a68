"""The step watchdog: a process that stops making progress ends, saying where it was.

JAX has no NCCL-style watchdog: a process waiting in a collective for a peer that hangs (or for
a link that went down) waits until the job's time limit. The coordination service catches a
peer that *died*, not one that is alive and stuck. So every process runs a thread that watches
the training loop's progress. The loop names each phase as it enters it (`enter`):

    step N: preparing     host work: taking batch N
    compiling             the first step: traced, compiled and run
    step N                dispatching step N, reading step N-1's metrics
    validating            after step N
    saving checkpoint N

If a phase lasts longer than its allowance, the watchdog logs every thread's Python stack and
the phase, hands an `events` row to the run's metrics, and ends the process with `EXIT_HUNG`
(76), so a launch script can requeue the job without the node that hung. The other processes
stop progressing too (they wait for the hung one), so their watchdogs end them the same way
within the allowance. A process that fires reports at once and exits `GRACE_S` later, so that
the processes it waits for (or that wait for it) report too before a launcher kills them; and
the training thread, should a peer's exit make its collective fail meanwhile, waits for the
watchdog's exit code rather than ending with its own. After an error the watchdog goes on
watching the run's teardown (which may wait on peers too) with the plain timeout.

Allowances (`train.step_timeout`): `auto` gives a phase `AUTO_FACTOR` times the median of its
earlier durations, at least `AUTO_FLOOR_S`; a number of seconds gives every phase that much.
Either way a phase seen for the first time (compiling, the first validation and the first
save, which compile or open what they need) gets at least `FIRST_TIME_S`.

Under the launch scripts every process that fires also appends its host, process, step and
whether it was waiting to `$JAXLM_HANG_MARKER`. The processes that the others waited for (stuck
in host work while others waited, or at a lower step) are the evidence that
`python -m jaxlm.watchdog culprits FILE` names, and launch/slurm-run.sh requeues the job
without their hosts.
"""

import contextlib
import json
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
GRACE_S = 5.0  # between a process's report and its exit: time for its peers to report
# process 0 hosts the coordination service, whose end aborts the other processes: it leaves last
COORDINATOR_EXTRA_S = 3.0
FIRST_TIME_S = 1800.0  # a first compile of a large model on a busy host
_HISTORY = 50  # durations kept per phase kind


OFF = float("inf")  # train.step_timeout=off: no watchdog thread at all


def parse_timeout(text) -> float | None:
    """`train.step_timeout`: None for 'auto', OFF for 'off', else positive seconds."""
    if str(text).strip().lower() == "auto":
        return None
    if str(text).strip().lower() == "off":
        return OFF
    try:
        seconds = float(text)
    except ValueError:
        raise UsageError(
            f"train.step_timeout must be 'auto', 'off' or seconds, not '{text}'"
        ) from None
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
        grace_s: float = GRACE_S,
    ):
        self.timeout, self.process_index = timeout, process_index
        self.on_hang, self._exit, self.poll_s, self.grace_s = on_hang, exit, poll_s, grace_s
        self._lock = threading.Lock()
        self._phase, self._kind, self._step, self._since = None, None, 0, time.monotonic()
        self._waiting = False
        self._fired = threading.Event()
        self._durations: dict[str, list[float]] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="jaxlm-watchdog", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._fired.is_set():
            self._thread.join()  # the watchdog ends the process with its own code
        elif exc_type is not None:
            self.enter("ending after an error", self._step, "ending")  # go on watching
        else:
            self._stopped.set()
            self._thread.join()

    def enter(self, phase: str, step: int, kind: str | None = None, *, waiting=True) -> None:
        """The loop is now in `phase` at `step`; the phase before it has ended. `kind` groups
        phases whose durations are alike (every 'step N' is of kind 'step'); `waiting`: the
        phase waits on the devices (and through them on the other processes), not host work."""
        now = time.monotonic()
        with self._lock:
            if self._kind is not None:
                history = self._durations.setdefault(self._kind, [])
                history.append(now - self._since)
                del history[:-_HISTORY]
            self._phase, self._kind, self._step, self._since = phase, kind or phase, step, now
            self._waiting = waiting

    def allowance(self, kind: str) -> float:
        if kind == "ending":
            return self.timeout or AUTO_FLOOR_S
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
                phase, step, waiting = self._phase, self._step, self._waiting
            if waited > allowed:
                self._fire(phase, step, waited, allowed, waiting)
                return

    def _fire(self, phase: str, step: int, waited: float, allowed: float, waiting: bool) -> None:
        self._fired.set()
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
        row = {
            "step": step,
            "event": "hang",
            "phase": phase,
            "host": host,
            "process": self.process_index,
            "waited_s": waited,
            "allowed_s": allowed,
            "waiting": waiting,
        }
        try:
            marker = os.environ.get("JAXLM_HANG_MARKER")
            if marker:  # one short line, appended: the processes' lines do not interleave
                with open(marker, "a") as f:
                    keys = ("host", "process", "step", "waiting")
                    f.write(json.dumps({k: row[k] for k in keys}) + "\n")
            self.on_hang(row)
        finally:
            # a log stream that is already closed must not keep a hung process alive
            for stream in (*log.handlers, sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()
            time.sleep(self.grace_s + (COORDINATOR_EXTRA_S if self.process_index == 0 else 0))
            self._exit(EXIT_HUNG)


class Unwatched:
    """train.step_timeout=off: the loop's phases go nowhere."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def enter(self, phase, step, kind=None, *, waiting=True) -> None:
        pass


def all_stacks() -> str:
    """Every thread's Python stack, named."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        stack = "".join(traceback.format_stack(frame))
        parts.append(f"--- thread {names.get(ident, ident)}\n{stack}")
    return "\n".join(parts)


def culprits(lines) -> list[str]:
    """The hosts of the processes the others waited for: stuck in host work while some waited
    on the devices, or else at a lower step than the others reached. None when every process
    waited at the same step (a collective that hung with no process behind it): no host is
    excluded without evidence."""
    reports = [json.loads(line) for line in lines if line.strip()]
    stuck = [r for r in reports if not r["waiting"]]
    if stuck and len(stuck) < len(reports):
        return sorted({r["host"] for r in stuck})
    steps = [r["step"] for r in reports]
    if not reports or min(steps) == max(steps):
        return []
    return sorted({r["host"] for r in reports if r["step"] == min(steps)})


def main(argv=None) -> int:
    """`python -m jaxlm.watchdog culprits FILE`: the hosts to exclude, comma-separated."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "culprits":
        print("usage: python -m jaxlm.watchdog culprits FILE", file=sys.stderr)
        return 2
    try:
        with open(argv[1]) as f:
            print(",".join(culprits(f)))
    except (OSError, ValueError, KeyError) as e:
        print(f"error: cannot read the watchdog's reports in {argv[1]}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
