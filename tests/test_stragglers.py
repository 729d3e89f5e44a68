"""Stragglers: each process's host time travels with the stop vote; a process that holds the
others up is named in the log and in an events row (jaxlm/stragglers.py)."""

import json

import numpy as np
import pytest

from conftest import train_processes
from jaxlm.stragglers import PERSIST, Slowdown, Stragglers


def judge(host_times_per_step, *, every=5, margin=0.1, step_time=1.0):
    """The events rows of a Stragglers over these steps (the first one is start-up)."""
    stragglers = Stragglers(every, margin, [f"node{p}" for p in range(len(host_times_per_step[0]))])
    rows = []
    for step, times in enumerate(host_times_per_step, start=1):
        rows += stragglers.observe(step, times, step_time)
    return rows


def test_a_process_slower_two_intervals_in_a_row_is_named_with_its_host():
    rng = np.random.default_rng(0)
    steps = [0.01 + 0.005 * rng.random(4) for _ in range(21)]
    for times in steps[1:]:
        times[2] += 0.6  # process 2 spends 0.6 s of each 1 s step on its own
    rows = judge(steps)
    assert [r["step"] for r in rows] == [5 * (PERSIST + k) for k in range(5 - PERSIST)]
    assert {(r["process"], r["host"]) for r in rows} == {(2, "node2")}
    assert rows[0]["share_of_step"] == pytest.approx(0.6, abs=0.01)
    assert rows[0]["median_host_time_s"] < 0.02 < 0.6 < rows[0]["host_time_s"]


def test_noise_a_hiccup_and_the_start_up_name_nobody():
    rng = np.random.default_rng(1)
    steps = [0.01 + 0.02 * rng.random(3) for _ in range(31)]  # noise: 2 % of the step
    steps[0][1] += 30.0  # the first step: the data pipeline starting
    for times in steps[6:11]:  # one slow interval only
        times[0] += 0.5
    assert judge(steps) == []
    assert judge(steps, every=0) == []  # train.straggler_every=0: off
    assert judge([[5.0]] * 20) == []  # one process has no peers to be slower than


def test_the_slowdown_waits_factor_minus_one_steps_once_its_baseline_is_measured():
    slow, healthy = Slowdown(3.0), Slowdown(None)
    for step_time in (0.1, 0.3, 0.2):
        assert slow.delay_s() == 0.0
        slow.observe(step_time)
        healthy.observe(step_time)
    assert slow.delay_s() == pytest.approx(2 * 0.2)  # (3 - 1) x the median
    slow.observe(10.0)  # its own slowed steps do not feed back
    assert slow.delay_s() == pytest.approx(0.4) and healthy.delay_s() == 0.0


@pytest.mark.slow
def test_a_process_made_three_times_slower_is_named_within_a_few_intervals(tmp_path):
    """Two processes, the second 3x slower: named by the third interval of 4 steps, and the
    other never; every process logs the verdict, process 0 writes it to metrics.jsonl."""
    args = ["--config", "tiny", "--mesh", "dp=8", "--out", str(tmp_path), "train.steps=16"]
    args += ["data.source=synthetic", "train.eval_every=0", "train.straggler_every=4"]
    processes = train_processes(2, [*args, "debug.slow_process=1", "debug.slow_factor=3"])
    for p in processes:
        _, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    named = [r for r in rows if r.get("event") == "straggler"]
    assert named and named[0]["step"] <= 12, named
    assert {r["process"] for r in named} == {1}
    assert named[0]["host"] and named[0]["share_of_step"] > 0.3
    trained = [r for r in rows if "loss" in r]
    assert all("host_time_s" in r for r in trained)  # process 0's own
    for process in (0, 1):
        log = (tmp_path / "logs" / f"process-{process}.log").read_text()
        assert "straggler: process 1 on host" in log
