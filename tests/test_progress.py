"""What a run shows while it trains: plain log lines off a terminal, a live bar on one."""

import io
import logging
import re

import pytest

from jaxlm import metrics

log = logging.getLogger("jaxlm")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def terminal(monkeypatch, request) -> Terminal:
    """What jaxlm's log lines and the bar write from now on, as a terminal would get it. Called
    in the test itself: pytest puts its own sys.stdout back between a fixture and the test."""
    out = Terminal()
    monkeypatch.setattr("sys.stdout", out)
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(message)s"))
    monkeypatch.setattr(log, "handlers", [handler])
    # setLevel, not a patched attribute: the logger caches isEnabledFor, and an earlier test of
    # the same worker may have filled that cache with "INFO is off"
    level = log.level
    log.setLevel(logging.INFO)
    request.addfinalizer(lambda: log.setLevel(level))
    return out


def row(step: int) -> dict:
    return {"step": step, "loss": 5.0, "tokens_per_s": 1000.0, "step_time_s": 0.5, "mfu": 0.123}


def test_the_plain_line_shows_loss_throughput_mfu_and_the_time_left(monkeypatch, request):
    shown = terminal(monkeypatch, request)
    report = metrics.ProgressReport(10, every=5, live=False)  # a Slurm log, a pipe
    for step in range(1, 11):
        report.update(row(step))
    report.close()
    lines = shown.getvalue().splitlines()
    assert [line.split(" |")[0] for line in lines] == ["step 1/10", "step 5/10", "step 10/10"]
    assert lines[0] == (
        "step 1/10 | loss 5.0000 | 1,000 tok/s | MFU 12.3 % | 0.500 s/step | eta 4s"
    )  # before a second step: this step's pace, 9 x 0.5 s
    assert lines[-1].endswith("| eta 0s")


def test_log_lines_print_above_the_live_bar_never_glued_to_it(monkeypatch, request):
    shown = terminal(monkeypatch, request)
    report = metrics.ProgressReport(10, every=1, live=True)
    report.update(row(3))
    log.info("saved the checkpoint of step 3")
    report.update(row(4))
    report.close()
    log.info("after the bar")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.getvalue())  # ANSI controls out
    lines = [part for line in text.split("\n") for part in line.split("\r")]
    assert "saved the checkpoint of step 3" in lines
    assert "after the bar" in lines
    bar = [line for line in lines if "━" in line]  # the bar itself, with the same figures
    assert bar and "MFU 12.3 %" in bar[-1] and "4/10" in bar[-1]


@pytest.mark.parametrize(
    "seconds, text", [(0.4, "0s"), (12, "12s"), (245, "4m05s"), (3720, "1h02m"), (-3, "0s")]
)
def test_durations_read_at_a_glance(seconds, text):
    assert metrics.duration(seconds) == text
