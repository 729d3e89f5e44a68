"""The trainer end to end on 8 fake CPU devices: every layout trains the same model."""

import jax
import numpy as np
import pytest

from conftest import train_rows
from jaxlm import mesh as mesh_lib
from jaxlm import training
from jaxlm.step import build_program

STEPS = 5


def losses(cfg, spec, devices=None):
    rows = train_rows(training.run(cfg, mesh_lib.make_mesh(spec, devices)))
    return np.array([row["loss"] for row in rows])


@pytest.fixture(scope="module")
def one_device_losses():
    from jaxlm import config as config_lib

    cfg = config_lib.load(
        "tiny", ["model.compute_dtype=float32", "data.source=synthetic", f"train.steps={STEPS}"]
    )
    return losses(cfg, "dp=1", jax.devices()[:1])


@pytest.mark.parametrize(
    "spec, extra",
    [
        ("dp=8", []),
        ("fsdp=8", []),
        ("dp=2,fsdp=2,tp=2", []),
        ("tp=4,dp=2", []),
        ("dp=8", ["train.zero1=true"]),
        ("fsdp=-1,tp=2", []),
        # the batches arrive split along their length too (tests/test_context.py's fast ones
        # cover the context axis in the fast tier)
        pytest.param("cp=4,dp=2", [], marks=pytest.mark.slow),
    ],
)
def test_every_layout_matches_one_device(tiny_cfg, one_device_losses, spec, extra):
    sharded = losses(tiny_cfg(f"train.steps={STEPS}", *extra), spec)
    assert one_device_losses[-1] < one_device_losses[0] - 0.1  # the model really trains
    np.testing.assert_allclose(sharded, one_device_losses, rtol=1e-5)


@pytest.mark.slow
def test_accumulating_four_micro_batches_of_two_equals_one_batch_of_eight(tiny_cfg):
    one = mesh_lib.make_mesh("dp=1", jax.devices()[:1])
    base = ("train.global_batch_size=8", "train.steps=3")
    big = train_rows(training.run(tiny_cfg(*base, "train.micro_batch_size=8"), one))
    program = build_program(tiny_cfg(*base, "train.micro_batch_size=2"), one)
    assert program.accumulation == 4 and program.micro_batch == 2
    accumulated = train_rows(
        training.run(tiny_cfg(*base, "train.micro_batch_size=2"), one, program=program)
    )
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in accumulated], [r[key] for r in big], rtol=1e-5)


@pytest.mark.slow
def test_accumulation_with_data_parallelism(tiny_cfg):
    cfg = tiny_cfg("train.global_batch_size=16", "train.micro_batch_size=1", "train.steps=3")
    program = build_program(cfg, mesh_lib.make_mesh("dp=4,tp=2"))
    assert (program.micro_batch, program.accumulation) == (1, 4)
    rows = train_rows(training.run(cfg, mesh_lib.make_mesh("dp=4,tp=2"), program=program))
    accumulated = [r["loss"] for r in rows]
    whole = losses(
        tiny_cfg("train.global_batch_size=16", "train.steps=3"), "dp=1", jax.devices()[:1]
    )
    np.testing.assert_allclose(accumulated, whole, rtol=1e-5)


def test_train_step_is_traced_once_in_ten_steps(tiny_cfg):
    cfg = tiny_cfg("train.steps=10")
    mesh = mesh_lib.make_mesh("dp=2,fsdp=2,tp=2")
    program = build_program(cfg, mesh)
    rows = train_rows(training.run(cfg, mesh, program=program))
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert program.train_step._cache_size() == 1


@pytest.mark.slow
def test_float16_loss_scale_backs_off_on_overflow_and_skips(tiny_cfg):
    cfg = tiny_cfg("model.compute_dtype=float16", "train.loss_scale=1e30", "train.steps=4")
    rows = train_rows(training.run(cfg, mesh_lib.make_mesh("dp=2,tp=4")))
    # a scale of 1e30 overflows float16 gradients: each step is skipped and the scale halves
    assert [r["skipped_steps"] for r in rows] == [1, 2, 3, 4]
    np.testing.assert_allclose(
        [r["loss_scale"] for r in rows], [1e30 / 2**k for k in (1, 2, 3, 4)], rtol=1e-6
    )

    rows = train_rows(
        training.run(
            tiny_cfg("model.compute_dtype=float16", "train.steps=20"),
            mesh_lib.make_mesh("dp=2,tp=4"),
        )
    )
    assert rows[-1]["skipped_steps"] == 0
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
