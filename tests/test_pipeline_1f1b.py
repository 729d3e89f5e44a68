"""The 1F1B schedule (jaxlm/model/pipeline_1f1b.py): the same gradients as the unpipelined model
and as GPipe, the same optimizer steps, and memory bounded by the stages, not the microbatches."""

import re

import jax
import numpy as np
import pytest

from conftest import (
    assert_same_loss_and_gradients,
    packed_loss_and_gradients,
    tiny_config,
    train_rows,
)
from jaxlm import mesh as mesh_lib
from jaxlm import training
from jaxlm.cost import compiled
from jaxlm.errors import UsageError
from jaxlm.model import PipelineSpec, pipeline_1f1b
from jaxlm.step import build_program

ROWS = 16
FOUR_LAYERS = ("model.n_layers=4", f"train.global_batch_size={ROWS}")
INTERLEAVED = ("train.pipeline_repeats=2",)


def mesh(spec):
    n = np.prod([int(part.split("=")[1]) for part in spec.split(",")])
    return mesh_lib.make_mesh(spec, jax.devices()[:n])


@pytest.fixture(scope="module")
def unpipelined():
    """The unpipelined model's loss and gradients, by its number of layers (computed once)."""
    found = {}

    def of(layers: int):
        if layers not in found:
            cfg = tiny_config(*FOUR_LAYERS, f"model.n_layers={layers}")
            found[layers] = packed_loss_and_gradients(cfg, mesh("dp=1"), ROWS)
        return found[layers]

    return of


ONE_F_ONE_B = [
    # pp, M = S, 2S, 4S; tensor and data parallelism around it; remat=full (only the stage's
    # input kept); packed documents throughout
    ("pp=2", 2, []),
    pytest.param("pp=4", 8, [], marks=pytest.mark.slow),
    pytest.param("pp=4", 4, [], marks=pytest.mark.slow),
    pytest.param("pp=2", 8, ["model.remat=full"], marks=pytest.mark.slow),
    pytest.param("pp=4", 16, [], marks=pytest.mark.slow),
    pytest.param("pp=2,tp=2,dp=2", 4, [], marks=pytest.mark.slow),
    pytest.param("pp=2,fsdp=2,tp=2", 2, ["model.remat=full"], marks=pytest.mark.slow),
    pytest.param("pp=4,dp=2", 8, [], marks=pytest.mark.slow),
    # interleaved: two layer groups per stage
    ("pp=2", 4, ["train.pipeline_repeats=2"]),
    pytest.param("pp=2", 2, ["train.pipeline_repeats=2"], marks=pytest.mark.slow),
    pytest.param("pp=2", 8, ["train.pipeline_repeats=2"], marks=pytest.mark.slow),
    pytest.param(
        "pp=2", 4, ["train.pipeline_repeats=2", "model.remat=full"], marks=pytest.mark.slow
    ),
    pytest.param("pp=2,tp=2,dp=2", 4, ["train.pipeline_repeats=2"], marks=pytest.mark.slow),
    *[
        pytest.param("pp=4", m, ["model.n_layers=8", *INTERLEAVED], marks=pytest.mark.slow)
        for m in (4, 8, 16)
    ],
    pytest.param("pp=2", 4, [], marks=pytest.mark.slow),
    # context parallelism inside the stages (gathered keys and values), both layouts
    pytest.param("cp=2,pp=2", 4, [], marks=pytest.mark.slow),
    pytest.param("cp=2,pp=2", 4, [*INTERLEAVED], marks=pytest.mark.slow),
]


@pytest.mark.parametrize("spec, microbatches, extra", ONE_F_ONE_B)
def test_1f1b_gives_the_unpipelined_loss_and_gradients(unpipelined, spec, microbatches, extra):
    cfg = tiny_config(
        *FOUR_LAYERS,
        "train.pipeline_schedule=1f1b",
        f"train.microbatches={microbatches}",
        *extra,
    )
    loss, grads = packed_loss_and_gradients(cfg, mesh(spec), ROWS)
    want = unpipelined(cfg.model.n_layers)
    assert_same_loss_and_gradients((loss, as_one_stack(grads, cfg)), want)


def as_one_stack(grads, cfg):
    """The interleaved layout's layer gradients [R, L / R, ...] as the plain stack [L, ...]."""
    if cfg.train.pipeline_repeats == 1:
        return grads
    layers = jax.tree.map(lambda g: g.reshape(-1, *g.shape[2:]), grads["layers"])
    return {**grads, "layers": layers}


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec, gpipe, one_f_one_b",
    [
        ("pp=4,dp=2", [], ["train.pipeline_schedule=1f1b"]),
        (
            "pp=2,dp=2",
            ["train.pipeline_schedule=circular", "train.pipeline_repeats=2"],
            ["train.pipeline_schedule=1f1b", "train.pipeline_repeats=2"],
        ),
    ],
)
def test_1f1b_gives_gpipes_loss_and_gradients_on_the_same_mesh(spec, gpipe, one_f_one_b):
    overrides = (*FOUR_LAYERS, "train.microbatches=4")
    want = packed_loss_and_gradients(tiny_config(*overrides, *gpipe), mesh(spec), ROWS)
    got = packed_loss_and_gradients(tiny_config(*overrides, *one_f_one_b), mesh(spec), ROWS)
    assert_same_loss_and_gradients(got, want)


@pytest.mark.slow
def test_1f1b_trains_as_the_unpipelined_model_with_accumulation_and_zero1(tiny_cfg):
    """The optimizer step around the schedule is unchanged: two micro batches accumulated,
    ZeRO-1's sharded update, the same losses step by step."""
    schedule = ("model.n_layers=4", "train.steps=3", "train.eval_every=0")
    want = train_rows(training.run(tiny_cfg(*schedule), mesh("dp=1")))
    cfg = tiny_cfg(
        *schedule,
        "train.pipeline_schedule=1f1b",
        "train.micro_batch_size=4",
        "train.zero1=true",
    )
    got = train_rows(training.run(cfg, mesh("pp=2,dp=2")))
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-5)
    np.testing.assert_allclose(
        [r["grad_norm"] for r in got], [r["grad_norm"] for r in want], rtol=1e-5
    )


def test_a_stage_holds_at_most_2s_minus_1_microbatches():
    assert pipeline_1f1b.in_flight(PipelineSpec(4, 1, 32)) == 7
    assert pipeline_1f1b.in_flight(PipelineSpec(4, 1, 4)) == 4
    # interleaved: waves of one layer group each, at most 2RS - 1
    assert pipeline_1f1b.in_flight(PipelineSpec(4, 2, 32)) == 15


def temporaries(schedule: str, microbatches: int) -> int:
    cfg = tiny_config(
        "model.n_layers=8",
        "model.remat=full",
        f"train.global_batch_size={microbatches}",
        f"train.microbatches={microbatches}",
        f"train.pipeline_schedule={schedule}",
    )
    return compiled.compile_step(cfg, build_program(cfg, mesh("pp=4"))).memory["temp"]


@pytest.mark.slow
def test_1f1b_memory_does_not_grow_with_the_microbatches_as_gpipes_does():
    """XLA's temporaries from M = 8 to M = 32 microbatches of one sequence: GPipe's grow by what
    it keeps per microbatch, 1F1B's by far less (its buffers of tokens and losses only)."""
    gpipe = temporaries("gpipe", 32) - temporaries("gpipe", 8)
    one_f_one_b = temporaries("1f1b", 32) - temporaries("1f1b", 8)
    assert gpipe > 0
    assert one_f_one_b < 0.25 * gpipe, (one_f_one_b, gpipe)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            [
                "train.pipeline_schedule=1f1b",
                "train.pipeline_repeats=2",
                "train.global_batch_size=12",
                "train.microbatches=6",
            ],
            "interleaved 1F1B (train.pipeline_repeats=2) runs the microbatches in groups of the "
            "4 stages: train.microbatches=6 must be a multiple of 4",
        ),
        (
            ["train.pipeline_schedule=1f1b", "train.loss_chunks=2"],
            "train.loss_chunks does not apply to train.pipeline_schedule=1f1b",
        ),
        (
            ["train.pipeline_schedule=circular"],
            "train.pipeline_schedule=circular needs train.pipeline_repeats of 2 or more",
        ),
        (
            ["train.pipeline_repeats=2"],
            "train.pipeline_repeats=2 runs the circular schedule: set "
            "train.pipeline_schedule=circular",
        ),
    ],
)
def test_schedules_that_do_not_fit_are_refused(tiny_cfg, overrides, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        build_program(tiny_cfg("model.n_layers=8", *overrides), mesh("pp=4"))
