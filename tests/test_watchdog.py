"""The step watchdog: a phase that outlasts its allowance ends the process with exit code 76,
its stacks and phase in the log; two processes, one of them hung, both end that way and the run
resumes from the checkpoint before the hang."""

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import train_processes
from jaxlm import watchdog
from jaxlm.errors import EXIT_HUNG


def watch(timeout, rows, codes):
    return watchdog.Watchdog(
        timeout, process_index=3, on_hang=rows.append, exit=codes.append, poll_s=0.02, grace_s=0
    )


def test_a_stalled_phase_ends_the_process_with_its_stacks_and_phase(caplog):
    rows, codes = [], []
    with caplog.at_level(logging.ERROR, logger="jaxlm"), watch(0.3, rows, codes) as dog:
        dog.enter("compiling", 1, "step")
        dog.enter("step 2", 2, "step")  # the kind has a history now: 0.3 s is its allowance
        deadline = time.time() + 10
        while not codes and time.time() < deadline:
            time.sleep(0.05)
    assert codes == [EXIT_HUNG]
    assert rows[0]["event"] == "hang" and rows[0]["phase"] == "step 2" and rows[0]["step"] == 2
    assert rows[0]["process"] == 3 and rows[0]["host"] == socket.gethostname()
    message = caplog.text
    assert "phase 'step 2' at step 2" in message and "exit code 76" in message
    assert "--- thread MainThread" in message and "test_watchdog.py" in message  # the stacks


def test_a_closed_log_stream_does_not_keep_a_hung_process_alive(tmp_path):
    """A handler left on the jaxlm logger with its file closed (as a finished command's can
    be): the watchdog still ends the process."""
    stream = open(tmp_path / "log", "w")
    handler = logging.StreamHandler(stream)
    logging.getLogger("jaxlm").addHandler(handler)
    stream.close()
    rows, codes = [], []
    try:
        with watch(0.3, rows, codes) as dog:
            dog.enter("compiling", 1, "step")
            dog.enter("step 2", 2, "step")
            deadline = time.time() + 10
            while not codes and time.time() < deadline:
                time.sleep(0.05)
    finally:
        logging.getLogger("jaxlm").removeHandler(handler)
    assert codes == [EXIT_HUNG]


def test_progress_and_first_times_keep_it_quiet():
    rows, codes = [], []
    with watch(0.3, rows, codes) as dog:
        dog.enter("compiling", 1, "step")  # a first time gets FIRST_TIME_S, not 0.3 s
        time.sleep(0.6)
        for step in range(2, 12):  # steps well inside 0.3 s
            dog.enter(f"step {step}", step, "step")
            time.sleep(0.05)
        dog.enter("validating", 11)  # a first validation: FIRST_TIME_S again
        time.sleep(0.6)
    assert codes == [] and rows == []


def test_the_culprits_are_the_processes_the_others_waited_for():
    def report(host, step, waiting):
        return json.dumps({"host": host, "process": 0, "step": step, "waiting": waiting})

    stuck = [report("a", 7, True), report("b", 7, False), report("c", 7, True)]
    assert watchdog.culprits(stuck) == ["b"]
    behind = [report("a", 8, True), report("b", 7, True)]
    assert watchdog.culprits(behind) == ["b"]
    nobody = [report("a", 7, True), report("b", 7, True)]  # a collective hung: no evidence
    assert watchdog.culprits(nobody) == [] and watchdog.culprits([]) == []


def test_auto_allows_twenty_medians_and_at_least_the_floor():
    dog = watchdog.Watchdog(None)
    assert dog.allowance("step") == watchdog.FIRST_TIME_S
    dog._durations["step"] = [100.0] * 29
    assert dog.allowance("step") == 20 * 100.0
    dog._durations["step"] = [0.01] * 10
    assert dog.allowance("step") == watchdog.AUTO_FLOOR_S
    assert watchdog.parse_timeout("auto") is None and watchdog.parse_timeout("12.5") == 12.5
    assert watchdog.parse_timeout("off") == watchdog.OFF  # training starts no watchdog then
    with watchdog.Unwatched() as nobody:
        nobody.enter("step 1", 1, "step")


@pytest.mark.slow
def test_two_processes_one_hung_both_end_with_76_and_the_run_resumes(tmp_path):
    """Process 1 stops before step 7; both processes end with the watchdog's code within the
    timeout + 30 s, process 1's log names its phase and holds its stacks, metrics.jsonl holds
    the event, and a rerun resumes from the checkpoint of step 6 and finishes."""
    timeout = 10
    args = ["--config", "tiny", "--mesh", "dp=8", "--out", str(tmp_path), "train.steps=12"]
    args += ["train.eval_every=0", "checkpoint.every=3", f"train.step_timeout={timeout}"]
    processes = train_processes(2, [*args, "debug.hang_at_step=7", "debug.hang_process=1"])
    try:
        log1 = tmp_path / "logs" / "process-1.log"
        deadline = time.time() + 300
        while not (log1.exists() and "hangs before step 7" in log1.read_text()):
            assert time.time() < deadline and all(p.poll() is None for p in processes)
            time.sleep(0.2)
        hung = time.time()
        for p in processes:
            p.communicate(timeout=timeout + 60)
        assert time.time() - hung < timeout + 30
        assert [p.returncode for p in processes] == [EXIT_HUNG, EXIT_HUNG]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    text = log1.read_text()
    assert "phase 'step 7: preparing' at step 7" in text and "--- thread MainThread" in text
    assert "_maybe_hang" in text  # the hung thread's own stack
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    hangs = [r for r in events if r.get("event") == "hang"]
    assert hangs and hangs[0]["process"] == 0  # process 0 writes the metrics: its own watchdog

    rerun = subprocess.run(
        [sys.executable, "-m", "jaxlm.train", *args],
        env={**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "8"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed from the checkpoint of step 6" in rerun.stdout
