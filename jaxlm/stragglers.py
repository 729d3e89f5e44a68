"""Stragglers: a process whose own work holds up every step of the others.

In SPMD training every step waits for its slowest process. A process's *host time* per step is
the time it takes before it can dispatch the step, awaiting no device: taking its batch
(reading, tokenizing, moving it to the devices) and the loop's own Python. Dispatch and the
wait for results are left out: they block on the devices, and through them on the other
processes, so they grow alike everywhere. Healthy processes have small and alike host times;
a straggler's (slow reads from a shared file system, a busy or throttled CPU, a noisy neighbour)
is larger, while its peers wait for it, so their host times stay small and every step's wall
time grows by the straggler's excess.

Every step each process casts its host time with the stop vote (jaxlm/loop.py): one number per
device, gathered by the devices along with the vote and read with the step's metrics, so the
sharing adds no host synchronisation. Every process thus sees every process's host times and
reaches the same verdict. Every `train.straggler_every` steps it takes each process's mean over
the interval: a process whose mean exceeds the median of the others' by more than
`train.straggler_margin` of the mean step time, in `PERSIST` intervals in a row, is named in the
log and in an `events` row (host, process, its host time and the others' median, the share of
every step it costs), for as long as it stays slow.

What host times cannot show: a slow *device* or link (its process waits on it just as the
others do). `python -m jaxlm.doctor` times the collectives per axis and per pair for those.
"""

import dataclasses
import logging
import statistics

import numpy as np

log = logging.getLogger("jaxlm")

PERSIST = 2  # intervals in a row before a process is named: one slow interval may be a hiccup


@dataclasses.dataclass
class Stragglers:
    every: int  # steps per interval; 0: never judged
    margin: float  # excess host time, as a fraction of the step time, that counts as slow
    hosts: list[str]  # of every process, by process index

    def __post_init__(self):
        self._first = True  # the first step's host time holds the data pipeline's start-up
        self._sums = np.zeros(len(self.hosts))
        self._step_time, self._steps = 0.0, 0
        self._strikes = np.zeros(len(self.hosts), dtype=int)

    def observe(self, step: int, host_times, step_time: float) -> list[dict]:
        """Add one step's host times (seconds, by process) and wall time; at the end of an
        interval, the `events` rows of the processes named stragglers (often none)."""
        if self.every == 0 or len(self.hosts) < 2 or self._first:
            self._first = False
            return []
        self._sums += np.asarray(host_times, dtype=float)
        self._step_time += step_time
        self._steps += 1
        if step % self.every:
            return []
        means, step_time = self._sums / self._steps, self._step_time / self._steps
        self._sums[:], self._step_time, self._steps = 0.0, 0.0, 0
        rows = []
        for p, mine in enumerate(means):
            others = statistics.median(np.delete(means, p))
            excess = (mine - others) / step_time if step_time > 0 else 0.0
            self._strikes[p] = self._strikes[p] + 1 if excess > self.margin else 0
            if self._strikes[p] >= PERSIST:
                rows.append(self._name(step, p, mine, others, step_time, excess))
        return rows

    def _name(self, step, process, mine, others, step_time, excess) -> dict:
        log.warning(
            "straggler: process %d on host %s spends %.3f s of host time per step against a "
            "median of %.3f s for the others, %.0f %% of the %.3f s step, over the last %d "
            "intervals of %d steps",
            process,
            self.hosts[process],
            mine,
            others,
            100 * excess,
            step_time,
            self._strikes[process],
            self.every,
        )
        return {
            "step": step,
            "event": "straggler",
            "host": self.hosts[process],
            "process": process,
            "host_time_s": float(mine),
            "median_host_time_s": float(others),
            "step_time_s": float(step_time),
            "share_of_step": float(excess),
        }


class Slowdown:
    """The debug.slow_process hook: that process's steps take `debug.slow_factor` times as long,
    by a host-side delay of (factor - 1) times its step time measured before the delay began,
    as a process with a slow CPU or slow reads would."""

    BASELINE_STEPS = 3

    def __init__(self, factor: float | None):
        self.factor = factor  # None: this process is not the slow one
        self._baseline: list[float] = []

    def observe(self, step_time: float) -> None:
        if self.factor and len(self._baseline) < self.BASELINE_STEPS:
            self._baseline.append(step_time)

    def delay_s(self) -> float:
        if not self.factor or len(self._baseline) < self.BASELINE_STEPS:
            return 0.0
        return (self.factor - 1) * statistics.median(self._baseline)
