"""Where a run's numbers go: metrics.jsonl, the trackers (jaxlm/trackers.py) and the terminal.

`metrics.jsonl` gets one JSON object per step (steps count from 1). On a terminal the run shows a
live progress bar (rich); elsewhere (a Slurm log, a pipe) it prints a plain line every
`log.every` steps, so logs stay readable.
"""

import json
import logging
import math
import pathlib
import sys
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from jaxlm import trackers

log = logging.getLogger("jaxlm")


class MetricsLog:
    """Appends rows to DIR/metrics.jsonl and passes them to the trackers (jaxlm/trackers.py);
    a no-op without DIR.

    A run resumed from the checkpoint of step s drops the rows logged after s (the steps that
    are about to run again) and appends; TensorBoard purges its events after s the same way.
    `open_trackers(resume_step)` opens the trackers once the file is ready.
    """

    def __init__(self, out_dir: pathlib.Path | None, *, resume_step: int = 0, open_trackers=None):
        self._file = None
        self._trackers: list[trackers.Tracker] = []
        self.kept: list[dict] = []  # the rows of the steps before a resume
        if out_dir is None:
            return
        path = out_dir / "metrics.jsonl"
        kept = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    if row["step"] <= resume_step:
                        kept.append(line + "\n")
                        self.kept.append(row)
                except (ValueError, KeyError):
                    pass  # a line cut short by a kill
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)
        self._file = open(path, "a")
        if open_trackers:
            self._trackers = open_trackers(resume_step)

    def write(self, row: dict, *, prefix: str = "train") -> None:
        if self._file:
            self._file.write(json.dumps(strict_json(row), allow_nan=False) + "\n")
            self._file.flush()
        for tracker in self._trackers:
            tracker.write(row, prefix)

    def close(self) -> None:
        if self._file:
            self._file.close()
        for tracker in self._trackers:
            tracker.close()


class ProgressReport:
    """A live bar on a terminal, plain log lines every `every` steps otherwise; both show the
    loss, throughput, MFU (where the device's peak is known) and the time left.

    While the bar is live, jaxlm's log lines (validation, checkpoints) go through the bar's
    console, which prints them above the bar: written straight to the terminal they would
    glue onto the bar's line.
    """

    def __init__(self, total_steps: int, *, every: int, first_step: int = 0, live: bool = True):
        self.total, self.every = total_steps, max(every, 1)
        self._started = None  # (time, step) of the first step reported
        self._bar, self._rerouted = None, []
        if live and sys.stdout.isatty():
            self._bar = Progress(
                TextColumn("step"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn("{task.fields[status]}"),
                TimeRemainingColumn(),
            )
            self._task = self._bar.add_task(
                "train", total=total_steps, completed=first_step, status="compiling"
            )
            self._bar.start()  # sys.stdout is now the bar's proxy, which prints above it
            for handler in log.handlers:
                stream = getattr(handler, "stream", None)
                if isinstance(handler, logging.StreamHandler) and stream and stream.isatty():
                    self._rerouted.append((handler, handler.setStream(sys.stdout)))

    def update(self, row: dict) -> None:
        step = row["step"]
        if self._started is None:  # timed from the end of the first step: compiling excluded
            self._started = (time.monotonic(), step)
        status = f"loss {row['loss']:.4f} | {row['tokens_per_s']:,.0f} tok/s"
        if row.get("mfu") is not None:
            status += f" | MFU {100 * row['mfu']:.1f} %"
        if self._bar:
            self._bar.update(self._task, completed=step, status=status)
        elif step % self.every == 0 or step in (1, self.total):
            log.info(
                "step %d/%d | %s | %.3f s/step | eta %s",
                step,
                self.total,
                status,
                row["step_time_s"],
                self._eta(step, row["step_time_s"]),
            )

    def _eta(self, step: int, step_time_s: float) -> str:
        """The time to the last step at the pace since the first (validation and checkpoints
        included), or at this step's pace before there is one."""
        began, first = self._started
        done = step - first
        pace = (time.monotonic() - began) / done if done else step_time_s
        return duration((self.total - step) * pace)

    def close(self) -> None:
        if self._bar:
            self._bar.stop()
            for handler, stream in self._rerouted:
                handler.setStream(stream)


def duration(seconds: float) -> str:
    """1h02m, 4m05s, 12s."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def strict_json(row: dict) -> dict:
    """The row with non-finite numbers as null: JSON has no NaN or Infinity, and jq, JavaScript's
    JSON.parse and most loaders reject Python's bare `NaN`. A skipped step keeps its marker."""
    return {
        key: None if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in row.items()
    }
