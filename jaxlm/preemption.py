"""Stop requests: Slurm's signals and the job's own time limit.

Slurm sends SIGTERM before it kills a preempted or cancelled job, and `sbatch --signal=USR1@120`
sends SIGUSR1 two minutes before the time limit. Either (or `train.time_limit` running out)
asks the training loop to finish the step it is on, save a checkpoint synchronously and exit
with code 75 (jaxlm.errors.EXIT_PREEMPTED) so a requeue continues the run.
"""

import signal
import threading
import time

from jaxlm.config import TrainConfig, parse_duration

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self, time_limit_s: float | None = None):
        self._event = threading.Event()
        self.reason = ""
        self._deadline = time.monotonic() + time_limit_s if time_limit_s else None
        self._previous = {}

    @classmethod
    def from_config(cls, t: TrainConfig) -> "StopRequest":
        return cls(parse_duration(t.time_limit) if t.time_limit else None)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers only live there
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, _frame):
        self.reason = signal.Signals(signum).name
        self._event.set()

    @property
    def requested(self) -> bool:
        if not self._event.is_set() and self._deadline and time.monotonic() >= self._deadline:
            self.reason = "train.time_limit"
            self._event.set()
        return self._event.is_set()
