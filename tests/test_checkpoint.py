"""Checkpoints: a killed run continues as if nothing happened, on any mesh, and survives
signals, bad steps and damaged checkpoints."""

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import tiny_config, train_rows
from jaxlm import checkpoint, sharding, training
from jaxlm import mesh as mesh_lib
from jaxlm.data import indexed
from jaxlm.errors import EXIT_PREEMPTED
from jaxlm.step import build_program

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "2"}


def command(out, *args):
    return [
        sys.executable,
        "-m",
        "jaxlm.train",
        "--config",
        "tiny",
        "--mesh",
        "dp=2",
        "--out",
        str(out),
        *args,
    ]


def rows_of(out):
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def wait_for_step(out, process, step, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            steps = [r["step"] for r in rows_of(out) if "loss" in r]
        except (OSError, json.JSONDecodeError):
            steps = []
        if steps and steps[-1] >= step:
            return steps[-1]
        time.sleep(0.05)
    raise TimeoutError(f"no step {step} in {timeout} s")


def wait_for_commit(out, process, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, process.communicate()
        if list((out / "checkpoints").glob("*/commit_success.txt")):
            return
        time.sleep(0.01)
    raise TimeoutError(f"no committed checkpoint in {timeout} s")


@pytest.mark.slow
def test_kill_9_and_rerun_logs_the_same_losses_bit_for_bit(tmp_path):
    """Real data, CPU, fixed seed: a blend of the default corpus and a Megatron prefix; the
    restarted run is indistinguishable, down to the tokens taken from each source."""
    rng = np.random.default_rng(0)
    documents = [rng.integers(1, 512, rng.integers(20, 400)) for _ in range(500)]
    indexed.write(tmp_path / "noise", documents, np.uint16)
    # 60 steps of ~0.02 s: long enough that the kill lands mid-run once a checkpoint committed
    args = ("train.steps=60", "checkpoint.every=4", "train.eval_every=10")
    args += (f"data.source=0.6 stdlib 0.4 megatron:{tmp_path / 'noise'}",)
    reference = subprocess.run(
        command(tmp_path / "a", *args), env=ENV, capture_output=True, text=True, timeout=600
    )
    assert reference.returncode == 0, reference.stderr

    kill_at = random.Random().randint(6, 24)
    process = subprocess.Popen(
        command(tmp_path / "b", *args),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_commit(tmp_path / "b", process)  # the asynchronous save of step 4, at least
    killed_after = wait_for_step(tmp_path / "b", process, kill_at)
    process.kill()  # SIGKILL: no chance to save anything
    process.wait()
    assert killed_after < 60
    rerun = subprocess.run(
        command(tmp_path / "b", *args), env=ENV, capture_output=True, text=True, timeout=600
    )
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed from the checkpoint of step" in rerun.stdout

    expected, got = rows_of(tmp_path / "a"), rows_of(tmp_path / "b")
    keys = ("step", "loss", "grad_norm", "lr", "val_loss", "val_loss/noise", "tokens/noise")
    assert [{k: r[k] for k in keys if k in r} for r in got] == [
        {k: r[k] for k in keys if k in r} for r in expected
    ]
    assert "tokens/noise" in expected[0] and "val_loss/noise" in expected[-1]


DP8_SCHEDULE = ("train.decay_steps=10", "checkpoint.every=3", "train.eval_every=0")


@pytest.fixture(scope="module")
def on_dp8(tmp_path_factory):
    """10 steps on dp=8 uninterrupted (their rows), and a run of the first 6 saved (its dir)."""
    dp8 = mesh_lib.make_mesh("dp=8")
    uninterrupted = train_rows(training.run(tiny_config("train.steps=10", *DP8_SCHEDULE), dp8))
    saved = tmp_path_factory.mktemp("dp8-six-steps")
    training.run(tiny_config("train.steps=6", *DP8_SCHEDULE), dp8, saved)
    return uninterrupted, saved


@pytest.mark.slow
@pytest.mark.parametrize("spec, devices", [("fsdp=4,tp=2", 8), ("dp=2,tp=2", 4), ("cp=4,dp=2", 8)])
def test_save_on_dp8_restore_and_continue_on_another_mesh(
    tiny_cfg, tmp_path, on_dp8, spec, devices
):
    dp8 = mesh_lib.make_mesh("dp=8")
    uninterrupted, saved_run = on_dp8
    shutil.copytree(saved_run, tmp_path, dirs_exist_ok=True)

    other = mesh_lib.make_mesh(spec, jax.devices()[:devices])
    cfg = tiny_cfg("train.steps=10", *DP8_SCHEDULE)
    saved, restored = (_restore(cfg, m, tmp_path) for m in (dp8, other))
    assert restored.step == saved.step == 6
    q_proj = restored.state.params["layers"]["attn"]["q_proj"]
    assert q_proj.sharding.mesh.devices.size == devices
    for a, b in zip(jax.tree.leaves(saved.state), jax.tree.leaves(restored.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    continued = train_rows(training.run(cfg, other, tmp_path))
    assert [r["step"] for r in continued] == [7, 8, 9, 10]
    np.testing.assert_allclose(
        [r["loss"] for r in continued], [r["loss"] for r in uninterrupted[6:]], rtol=1e-5
    )


def _restore(cfg, mesh, out):
    program = build_program(cfg, mesh)
    target = sharding.abstract_target(
        jax.eval_shape(program.init, jax.random.key(0)), program.state_shardings
    )
    ckpts = checkpoint.Checkpoints(out, cfg.checkpoint)
    try:
        return ckpts.restore_latest(target, checkpoint.param_shapes(program.spec.shapes))
    finally:
        ckpts.close()


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_75_within_30_s(tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(
        command(out, "train.steps=100000", "checkpoint.every=0", "train.eval_every=0"),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_step(out, process, 5)
    process.send_signal(signal.SIGTERM)
    start = time.time()
    stdout, stderr = process.communicate(timeout=30)
    assert time.time() - start < 30
    assert process.returncode == EXIT_PREEMPTED, stderr
    last = [r["step"] for r in rows_of(out) if "loss" in r][-1]
    assert (out / "checkpoints" / str(last) / "commit_success.txt").exists()
    assert "stopped by SIGTERM" in stdout


@pytest.mark.slow
def test_time_limit_saves_and_exits_75(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        command(
            out,
            "train.steps=100000",
            "checkpoint.every=0",
            "train.time_limit=00:00:05",
            "train.eval_every=0",
        ),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == EXIT_PREEMPTED, result.stderr
    last = [r["step"] for r in rows_of(out) if "loss" in r][-1]
    assert (out / "checkpoints" / str(last)).is_dir()
    assert "stopped by train.time_limit" in result.stdout


def test_a_nan_step_is_skipped_and_the_run_finishes(tiny_cfg):
    rows = train_rows(
        training.run(tiny_cfg("train.steps=8", "debug.nan_at_step=4"), mesh_lib.make_mesh("dp=8"))
    )
    assert [r["skipped"] for r in rows] == [0, 0, 0, 1, 0, 0, 0, 0]
    assert np.isnan(rows[3]["loss"]) and rows[-1]["skipped_steps"] == 1
    assert np.isfinite(rows[-1]["loss"]) and rows[-1]["loss"] < rows[0]["loss"]
    # the skipped step left the schedule where it was: step 5 uses step 4's learning rate
    assert rows[4]["lr"] == rows[3]["lr"]


def test_bad_steps_in_a_row_roll_back_and_skip_the_data(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        "train.steps=16",
        "checkpoint.every=5",
        "train.max_bad_steps=3",
        "debug.nan_at_step=8",
        "debug.nan_steps=3",
        "train.eval_every=0",
    )
    rows = training.run(cfg, mesh_lib.make_mesh("dp=8"), tmp_path)
    events = [r for r in rows if "rolled_back_to" in r]
    # batches 8, 9, 10 are bad; the third in a row (step 10) rolls back to step 5, the last
    # checkpoint before the streak (none is written during one)
    assert events == [{"step": 10, "rolled_back_to": 5}]
    steps = [r["step"] for r in train_rows(rows)]
    assert steps == list(range(1, 11)) + list(range(6, 17))  # steps 6.. again, on new data
    assert all(not r["skipped"] for r in train_rows(rows)[10:])
    # metrics.jsonl is strict JSON: the bad steps' non-finite losses are null, still marked
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    written = [json.loads(line, parse_constant=_no_bare_constants) for line in lines]
    bad_rows = [r for r in written if r.get("skipped")]
    assert [r["step"] for r in bad_rows] == [8, 9, 10]
    assert all(r["loss"] is None for r in bad_rows)
    # TensorBoard holds the same numbers: the finite ones, and for a step run twice (6..10, after
    # the rollback) the later, as TensorBoard itself drops the events a step going back replaces
    scalars = _tensorboard_scalars(tmp_path / "tensorboard")
    final = {r["step"]: r for r in written if "loss" in r}
    assert scalars["train/loss"] == pytest.approx(
        {step: r["loss"] for step, r in final.items() if r["loss"] is not None}
    )


def _no_bare_constants(name):
    raise AssertionError(f"metrics.jsonl holds a bare {name}, which is not JSON")


def _tensorboard_scalars(directory) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from the event files, later events replacing earlier ones."""
    from tensorboardX.proto.event_pb2 import Event

    scalars = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):  # TFRecords: length (8 bytes), its CRC (4), the record, its CRC
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_a_loss_spike_is_skipped():
    from jaxlm.config import load
    from jaxlm.loop import BadSteps

    bad = BadSteps(load(None, ["train.spike_sigma=4", "train.spike_window=50"]).train)
    assert bad.loss_limit() == float("inf")  # no history, no limit
    for loss in np.random.default_rng(0).normal(3.0, 0.01, 50):
        bad.observe({"loss": float(loss), "skipped": 0})
    assert 3.03 < bad.loss_limit() < 3.06
    bad.observe({"loss": 9.0, "skipped": 1})
    assert bad.in_a_row == 1 and 3.03 < bad.loss_limit() < 3.06  # spikes stay out of the window


TEN_STEPS = ("train.steps=10", "checkpoint.every=5", "train.eval_every=0")


@pytest.fixture(scope="module")
def ten_steps(tmp_path_factory):
    """A run of 10 steps with checkpoints of steps 5 and 10, for tests to copy and then damage
    or resume otherwise."""
    out = tmp_path_factory.mktemp("ten-steps")
    first = subprocess.run(
        command(out, *TEN_STEPS), env=ENV, capture_output=True, text=True, timeout=300
    )
    assert first.returncode == 0, first.stderr
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage, reason",
    [
        (
            lambda d: next(
                p
                for p in sorted((d / "state").rglob("*"))
                if p.is_file() and p.stat().st_size > 1000
            ).write_bytes(b"garbage"),
            "Error",
        ),
        (lambda d: (d / "commit_success.txt").unlink(), "no commit marker"),
        (lambda d: shutil.rmtree(d / "data"), "missing data"),
    ],
)
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(ten_steps, tmp_path, damage, reason):
    shutil.copytree(ten_steps, tmp_path, dirs_exist_ok=True)
    damage(tmp_path / "checkpoints" / "10")
    result = subprocess.run(
        command(tmp_path, "train.steps=12", *TEN_STEPS[1:]),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "checkpoint" in result.stdout and "incomplete or corrupt" in result.stdout
    assert reason in result.stdout
    assert "resumed from the checkpoint of step 5" in result.stdout
    assert (tmp_path / "checkpoints" / "corrupt-10").is_dir()  # kept, not deleted
    assert [r["step"] for r in rows_of(tmp_path) if "loss" in r] == list(range(1, 13))


@pytest.mark.slow
def test_a_checkpoint_of_another_model_exits_2_naming_the_parameters(ten_steps, tmp_path):
    shutil.copytree(ten_steps, tmp_path, dirs_exist_ok=True)
    before = _snapshot(tmp_path)
    result = subprocess.run(
        command(tmp_path, *TEN_STEPS, "model.d_ff=256"),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "is of a model with other shapes" in result.stderr
    assert "layers/mlp/up_proj [2, 64, 128] there, [2, 64, 256] here" in result.stderr
    assert _snapshot(tmp_path) == before  # the refused run left config.yaml and all else as it was


def _snapshot(directory):
    """Every file under `directory` and its bytes."""
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_an_unwritable_run_directory_exits_2_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cache = tmp_path / "cache"  # the default corpus is not built for a refused run
    result = subprocess.run(
        command(blocker / "run", "train.steps=2"),
        env={**ENV, "JAXLM_CACHE": str(cache)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "cannot write to the run directory" in result.stderr
    assert "compiled" not in result.stdout
    assert not cache.exists()


@pytest.mark.slow
def test_init_from_takes_another_runs_parameters_only(tiny_cfg, tmp_path):
    mesh = mesh_lib.make_mesh("dp=8")
    first = training.run(tiny_cfg("train.steps=3"), mesh, tmp_path / "a")
    # lr 0: the second run's parameters stay what it started from
    second = training.run(
        tiny_cfg("train.steps=1", "train.lr=0", f"checkpoint.init_from={tmp_path / 'a'}"),
        mesh_lib.make_mesh("fsdp=4,tp=2"),
        tmp_path / "b",
    )
    val = lambda rows: [r["val_loss"] for r in rows if "val_loss" in r]  # noqa: E731
    assert val(second)[0] == pytest.approx(val(first)[-1], rel=1e-6)
    assert train_rows(second)[0]["lr"] == 0  # and its own schedule and optimizer, from step 1
