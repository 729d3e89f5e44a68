"""A launch script under a real Slurm started by this test: two tasks train together, and a
USR1 before the time limit leads to a requeued job that resumes from its checkpoint."""

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

import slurm_cluster

REPO = pathlib.Path(__file__).resolve().parents[1]
why_not = slurm_cluster.available()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.slurm,
    pytest.mark.skipif(bool(why_not), reason=why_not),
]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = slurm_cluster.SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    yield cluster
    cluster.stop()


def train_steps(out: pathlib.Path) -> list[int]:
    try:
        with open(out / "metrics.jsonl") as f:
            return [json.loads(line)["step"] for line in f if '"loss"' in line]
    except (OSError, json.JSONDecodeError):
        return []


def finished(job: dict) -> dict | None:
    """The job's record once it has ended (not while pending, requeued or running)."""
    ended = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
    return job if job.get("JobState") in ended else None


def wait(predicate, what: str, timeout: float):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise TimeoutError(what)


def job_env(devices: int = 4, **extra: str) -> dict:
    return {
        "JAXLM_PYTHON": sys.executable,
        "JAXLM_HOME": str(REPO),
        "JAX_NUM_CPU_DEVICES": str(devices),
        "JAX_PLATFORMS": "cpu",
        "JAXLM_CACHE": os.environ["JAXLM_CACHE"],
        **extra,
    }


def submit_tiny_on_two_tasks(slurm, tmp_path, *args: str, tasks: int = 2, env=None) -> int:
    """The tiny preset on dp=2,fsdp=2,tp=2 over two tasks of launch/cpu-cluster.sbatch (or
    `tasks` with the devices `env` gives), into tmp_path/run, its output in tmp_path/job.out."""
    return slurm.sbatch(
        f"--ntasks={tasks}",
        f"--ntasks-per-node={tasks}",
        f"--output={tmp_path}/job.out",
        "launch/cpu-cluster.sbatch",
        "--config",
        "tiny",
        "--mesh",
        "dp=2,fsdp=2,tp=2",
        "--out",
        str(tmp_path / "run"),
        *args,
        env=env or job_env(),
        cwd=REPO,
    )


def test_sbatch_trains_on_two_tasks_and_a_usr1_requeues_and_resumes(slurm, tmp_path):
    out = tmp_path / "run"
    job = submit_tiny_on_two_tasks(
        slurm,
        tmp_path,
        "train.steps=60",
        "checkpoint.every=1000",
        "train.eval_every=0",
        "distributed.heartbeat_timeout=20",
        "distributed.init_timeout=60",
        env=job_env(JAXLM_DOCTOR="--sizes 4KiB --repeats 2"),  # preflight checks first
    )
    try:
        wait(lambda: len(train_steps(out)) >= 8, "8 steps of the first run", 300)
        slurm.signal(job, "USR1")  # as `#SBATCH --signal=USR1@120` does before the time limit
        info = wait(lambda: finished(slurm.job(job)), "the requeued job to finish", 600)
    finally:
        slurm.cancel(job)
    log = (tmp_path / "job.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert int(info["Restarts"]) == 1
    assert "requeueing job" in log
    assert log.count("jaxlm: preflight checks passed") == 2  # before each start
    stopped = int(log.split("stopped by SIGUSR1 after step ")[1].split(";")[0])
    assert f"resumed from the checkpoint of step {stopped}" in log
    assert train_steps(out) == list(range(1, 61))  # each step once: the rerun went on from there
    for process in (0, 1):  # both tasks trained, each with its own log
        text = (out / "logs" / f"process-{process}.log").read_text()
        assert f"process {process} of 2" in text


def test_a_hung_task_is_requeued_without_its_node_and_resumes(slurm, tmp_path):
    """Task 1 hangs before step 7: the watchdogs end both tasks with 76, the job is requeued
    with the node in its excluded list (the test cluster's only node, so it waits), and once
    the test lifts the exclusion it resumes from the checkpoint of step 6 and finishes."""
    out = tmp_path / "run"
    job = submit_tiny_on_two_tasks(
        slurm,
        tmp_path,
        "train.steps=12",
        "checkpoint.every=3",
        "train.eval_every=0",
        "train.step_timeout=10",
        "debug.hang_at_step=7",
        "debug.hang_process=1",
        "distributed.heartbeat_timeout=60",
        "distributed.init_timeout=60",
    )
    try:
        held = wait(
            lambda: (info := slurm.job(job)).get("ExcNodeList") == slurm.host and info,
            "the requeued job with its node excluded",
            400,
        )
        assert held["JobState"] == "PENDING" and int(held["Restarts"]) == 1
        subprocess.run(
            ["scontrol", "update", f"JobId={job}", "ExcNodeList="], env=slurm.env, check=True
        )
        info = wait(lambda: finished(slurm.job(job)), "the resumed job to finish", 400)
    finally:
        slurm.cancel(job)
    log = (tmp_path / "job.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert f"a task hung on {slurm.host}; requeueing job {job} without {slurm.host}" in log
    assert "resumed from the checkpoint of step 6" in log
    assert train_steps(out)[-1] == 12
    assert (
        "debug.hang_at_step: process 1 hangs before step 7"
        in (out / "logs" / "process-1.log").read_text()
    )
    assert "watchdog: no progress for" in log and "ending with exit code 76" in log


def test_preflight_checks_that_find_a_slow_host_requeue_the_job_without_it(slurm, tmp_path):
    """JAXLM_DOCTOR runs python -m jaxlm.doctor on every task before training; with task 2 made
    3x slower it names that task's host, and the job is requeued held with the host excluded
    (the cluster's only node: it then waits, and the test cancels it)."""
    doctor = "--mesh dp=4,tp=2 --sizes 4KiB,64KiB debug.slow_process=2 debug.slow_factor=3"
    job = submit_tiny_on_two_tasks(
        slurm,
        tmp_path,
        "train.steps=2",
        tasks=4,
        env=job_env(devices=2, JAXLM_DOCTOR=doctor),
    )
    try:
        held = wait(
            lambda: (info := slurm.job(job)).get("ExcNodeList") == slurm.host and info,
            "the requeued job with its node excluded",
            300,
        )
    finally:
        slurm.cancel(job)
    assert held["JobState"] == "PENDING" and int(held["Restarts"]) == 1
    log = (tmp_path / "job.out").read_text()
    assert f"found {slurm.host} markedly slower than the others; requeueing job {job}" in log
    result = json.loads(log.split("jaxlm: preflight result: ")[1].split("\n")[0])
    assert [(o["process"], o["host"]) for o in result["outliers"]] == [(2, slurm.host)]
    assert not train_steps(tmp_path / "run")  # nothing trained on the slow host
