"""Several processes on this machine: the same training as one process, checkpoints that move
between process counts, and no hang when a peer dies."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import train_processes, train_rows
from jaxlm import config as config_lib
from jaxlm import mesh as mesh_lib
from jaxlm import training

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
ENV.pop("JAX_NUM_CPU_DEVICES", None)
# the tiny preset's 12 steps, for one process (in this one) and for several (launched)
OVERRIDES = ("train.decay_steps=12", "train.eval_every=4", "model.compute_dtype=float32")
SCHEDULE = ("--config", "tiny", *OVERRIDES)


def twelve_steps() -> config_lib.Config:
    return config_lib.load("tiny", [*OVERRIDES, "train.steps=12"])


def launch(n, out, *args, timeout=600):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxlm.launch",
            "local",
            "-n",
            str(n),
            "--cpu-devices",
            "8",
            "--",
            "--out",
            str(out),
            *args,
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def rows(out):
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process with all 8 devices, on the default corpus."""
    out = tmp_path_factory.mktemp("one")
    cfg = twelve_steps()
    training.run(cfg, mesh_lib.make_mesh("dp=2,fsdp=2,tp=2"), out)
    return rows(out)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The same 12 steps launched as two processes of 4 devices each, saving every 3 steps."""
    out = tmp_path_factory.mktemp("two")
    result = launch(
        2,
        out,
        *SCHEDULE,
        "--mesh",
        "dp=2,fsdp=2,tp=2",
        "train.steps=12",
        "checkpoint.every=3",
        "checkpoint.keep=4",
        "train.straggler_every=3",  # healthy processes: never named
    )
    return out, result


@pytest.mark.slow
def test_two_processes_train_exactly_like_one(two_processes, one_process):
    out, result = two_processes
    assert result.returncode == 0, result.stderr[-3000:]
    two = rows(out)
    assert not [r for r in two if r.get("event") == "straggler"]
    assert [r["step"] for r in two] == [r["step"] for r in one_process]
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(
            [r[key] for r in two if key in r], [r[key] for r in one_process if key in r], rtol=1e-5
        )
    for process in (0, 1):
        assert f"process {process} of 2" in (out / "logs" / f"process-{process}.log").read_text()
    assert "process 1 of 2" not in result.stdout  # only process 0 talks on the terminal


@pytest.mark.slow
def test_a_checkpoint_of_two_processes_continues_in_one_on_another_mesh(
    tmp_path, two_processes, one_process
):
    out, result = two_processes
    assert result.returncode == 0, result.stderr[-3000:]
    # the two processes' run as it stood after step 6: its later checkpoints removed
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    for later in (9, 12):
        shutil.rmtree(tmp_path / "checkpoints" / str(later))
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [3, 6]
    cfg = twelve_steps()
    continued = train_rows(training.run(cfg, mesh_lib.make_mesh("fsdp=4,tp=2"), tmp_path))
    assert [r["step"] for r in continued] == list(range(7, 13))
    np.testing.assert_allclose(
        [r["loss"] for r in continued], [r["loss"] for r in train_rows(one_process)[6:]], rtol=1e-5
    )


@pytest.mark.slow
def test_a_killed_process_ends_the_others_within_the_heartbeat_timeout(tmp_path):
    timeout = 10
    args = ["--config", "tiny", "--mesh", "dp=8", "--out", str(tmp_path), "train.steps=100000"]
    args += ["train.eval_every=0", "checkpoint.every=0"]
    processes = train_processes(2, [*args, f"distributed.heartbeat_timeout={timeout}"])
    try:
        deadline = time.time() + 300
        while (
            not (tmp_path / "metrics.jsonl").exists()
            or len((tmp_path / "metrics.jsonl").read_text().splitlines()) < 3
        ):
            assert time.time() < deadline and processes[0].poll() is None
            time.sleep(0.2)
        processes[1].send_signal(signal.SIGKILL)
        killed = time.time()
        _, stderr = processes[0].communicate(timeout=timeout + 60)
        assert time.time() - killed < timeout + 30
        assert processes[0].returncode != 0
        assert "another task died" in stderr or "unhealthy" in stderr
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()


def test_the_launcher_passes_a_failure_on(tmp_path):
    result = launch(2, tmp_path, "--config", "tiny", "--mesh", "dp=3")
    assert result.returncode == 2
    assert "the mesh dp=3 has 3 devices but 8 are available" in result.stderr


def test_inner_axes_take_a_processs_own_devices_first():
    local, outer = mesh_lib.split_over_processes(
        {"pipeline": 1, "data": 2, "fsdp": 2, "context": 1, "tensor": 2}, per_process=4
    )
    # tensor inside a host, data across hosts
    assert local == {"tensor": 2, "context": 1, "fsdp": 2, "data": 1, "pipeline": 1}
    assert outer == {"tensor": 1, "context": 1, "fsdp": 1, "data": 2, "pipeline": 1}
    local, outer = mesh_lib.split_over_processes(
        {"pipeline": 4, "data": 2, "fsdp": 1, "context": 1, "tensor": 8}, per_process=8
    )
    assert local["tensor"] == 8
    assert outer == {"tensor": 1, "context": 1, "fsdp": 1, "data": 2, "pipeline": 4}
    # a context ring stays inside a host before fsdp does
    local, outer = mesh_lib.split_over_processes(
        {"pipeline": 1, "data": 1, "fsdp": 2, "context": 2, "tensor": 2}, per_process=4
    )
    assert (local["context"], outer["context"], outer["fsdp"]) == (2, 1, 2)
