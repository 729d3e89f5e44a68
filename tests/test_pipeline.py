"""Pipeline parallelism on 8 fake CPU devices: the pipelined model is the unpipelined model."""

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
from jaxlm import sharding, training
from jaxlm.data import loader
from jaxlm.errors import UsageError
from jaxlm.model.pipeline import PipelineSpec
from jaxlm.step import abstract_step_inputs, build_program, make_loss_fn

FOUR_LAYERS = ("model.n_layers=4", "train.steps=4", "train.eval_every=0")
CIRCULAR = ("train.pipeline_repeats=2", "train.pipeline_schedule=circular")
LAYOUTS = [
    ("pp=2", []),
    ("pp=4", []),
    ("pp=2,tp=2,dp=2", []),
    ("pp=2,dp=4", ["train.zero1=true"]),
    ("pp=2", [*CIRCULAR]),
    (
        "pp=2",
        [*CIRCULAR, "train.microbatches=4"],
    ),
    ("pp=2,tp=2", ["model.remat=full", "train.microbatches=4"]),
]


def mesh(spec):
    n = np.prod([int(part.split("=")[1]) for part in spec.split(",")])
    return mesh_lib.make_mesh(spec, jax.devices()[:n])


@pytest.fixture(scope="module")
def unpipelined():
    cfg = tiny_config(*FOUR_LAYERS)
    one = mesh("dp=1")
    losses = [r["loss"] for r in train_rows(training.run(cfg, one))]
    return losses, gradients(cfg, one)


def gradients(cfg, m):
    """d loss / d params on the first batch, from the initial state; layers as [L, ...]."""
    program = build_program(cfg, m)
    state = program.init(jax.random.key(0))
    batch = next(loader.make_batches(cfg, program.batch_sharding))
    loss_sums = make_loss_fn(program.spec.graphdef)

    def loss(params):
        total, tokens = loss_sums(params, batch)
        return total / tokens

    grads = jax.jit(jax.grad(loss))(state.params)
    # the circular layout stores layers as [repeats, L / repeats, ...]: compare as [L, ...]
    lead = 2 if cfg.train.pipeline_repeats > 1 else 1
    grads["layers"] = jax.tree.map(
        lambda g: np.asarray(g).reshape(-1, *g.shape[lead:]), grads["layers"]
    )
    return grads


@pytest.mark.slow
@pytest.mark.parametrize("spec, extra", LAYOUTS)
def test_pipelined_losses_and_gradients_equal_the_unpipelined_model(
    tiny_cfg, unpipelined, spec, extra
):
    cfg = tiny_cfg(*FOUR_LAYERS, *extra)
    losses, grads = unpipelined
    program_losses = [r["loss"] for r in train_rows(training.run(cfg, mesh(spec)))]
    assert losses[-1] < losses[0] - 0.1
    np.testing.assert_allclose(program_losses, losses, rtol=1e-5)
    for (path, want), got in zip(
        jax.tree_util.tree_leaves_with_path(grads),
        jax.tree.leaves(gradients(cfg, mesh(spec))),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=str(path))


@pytest.mark.parametrize(
    "spec, rows, microbatches",
    [
        ("pp=4", 6, 6),  # M not a multiple of S: the stream is padded; the head splits by position
        ("pp=2,dp=2", 8, 2),  # two sequences per microbatch and replica
    ],
)
def test_packed_documents_and_uneven_microbatches_give_the_unpipelined_gradients(
    tiny_cfg, spec, rows, microbatches
):
    overrides = (*FOUR_LAYERS, f"train.global_batch_size={rows}")
    cfg = tiny_cfg(*overrides, f"train.microbatches={microbatches}")
    want = packed_loss_and_gradients(tiny_cfg(*overrides), mesh("dp=1"), rows)
    assert_same_loss_and_gradients(packed_loss_and_gradients(cfg, mesh(spec), rows), want)


def test_each_stage_holds_only_its_share_of_the_layer_stack(tiny_cfg):
    for spec, extra in (
        ("pp=4,dp=2", []),
        ("pp=2,tp=2,dp=2", [*CIRCULAR]),
    ):
        program = build_program(tiny_cfg(*FOUR_LAYERS, *extra), mesh(spec))
        layers = program.init(jax.random.key(0)).params["layers"]
        pp = program.stages.stages
        total = sum(x.nbytes for x in jax.tree.leaves(layers))
        for device in jax.devices():
            held = sum(
                s.data.nbytes
                for x in jax.tree.leaves(layers)
                for s in x.addressable_shards
                if s.device == device
            )
            tensor = 2 if "tp=2" in spec else 1
            # attention and MLP weights split over tensor too; norms only over pipeline
            assert total / (pp * tensor) <= held <= total / pp


def compiled_train_step(cfg, m):
    program = build_program(cfg, m)
    inputs = abstract_step_inputs(cfg, program)
    return program, program.train_step.lower(*inputs).compile().as_text()


def stacked_weight_gathers(program, hlo: str, repeats: bool) -> list[str]:
    """All-gathers in `hlo` whose result is a whole stack of some layer weight, in its stored
    form ([L, ...] or [R, L/R, ...]) or split by stage ([S, R, L/(S R), ...])."""
    gathers = [line for line in hlo.splitlines() if re.search(r"all-gather(-start)?\(", line)]
    found = []
    for x in jax.tree.leaves(program.spec.shapes["layers"]):
        per_layer = x.shape[2 if repeats else 1 :]
        for lead in ((4,), (2, 2), (2, 1, 2), (2, 2, 1)):
            whole = ",".join(map(str, (*lead, *per_layer)))
            found += [g for g in gathers if f"[{whole}]" in g]
    return found


@pytest.mark.parametrize("extra", [[], [*CIRCULAR]])
def test_activations_move_by_collective_permute_and_weights_never_gather(tiny_cfg, extra):
    program, hlo = compiled_train_step(tiny_cfg(*FOUR_LAYERS, *extra), mesh("pp=2,dp=2,tp=2"))
    assert re.search(r"collective-permute(-start)?\(", hlo)
    assert stacked_weight_gathers(program, hlo, repeats=bool(extra)) == []


def test_the_weight_gather_check_catches_a_pipeline_that_gathers(tiny_cfg, monkeypatch):
    """The check above can fail: a pipeline that gives every stage the whole stack is caught."""
    from jax.sharding import PartitionSpec

    from jaxlm.model import pipeline

    monkeypatch.setattr(pipeline, "weight_spec", lambda spec: PartitionSpec())
    program, hlo = compiled_train_step(tiny_cfg(*FOUR_LAYERS), mesh("pp=2,dp=2,tp=2"))
    assert stacked_weight_gathers(program, hlo, repeats=False)


def test_the_bubble_is_reported_at_start_and_in_every_row(tiny_cfg, caplog):
    cfg = tiny_cfg(*FOUR_LAYERS, "train.microbatches=8", "train.steps=2")
    rows = train_rows(training.run(cfg, mesh("pp=4,dp=2")))
    bubble = PipelineSpec(stages=4, repeats=1, microbatches=8).bubble
    assert bubble == pytest.approx(3 / 11)
    assert all(r["pipeline_bubble"] == pytest.approx(bubble) for r in rows)
    assert PipelineSpec(stages=4, repeats=2, microbatches=8).bubble == pytest.approx(3 / 19)


@pytest.mark.parametrize(
    "overrides, microbatches",
    [
        ([], 8),  # Megatron's rule: one sequence per microbatch (16 sequences over dp=2)
        (["train.micro_batch_size=4"], 4),  # ... of the micro batch, with accumulation
        (["train.microbatches=4"], 4),
    ],
)
def test_pipeline_microbatches_default_to_one_sequence_each(tiny_cfg, overrides, microbatches):
    cfg = tiny_cfg(*FOUR_LAYERS, *overrides)
    assert sharding.pipeline_geometry(cfg, mesh("pp=4,dp=2")) == (4, 1, microbatches)


@pytest.mark.parametrize(
    "spec, overrides, message",
    [
        (
            "pp=4",
            ["model.n_layers=6"],
            "model.n_layers=6 is not divisible by 4 pipeline stages x 1 repeats = 4",
        ),
        (
            "pp=2",
            ["model.n_layers=4", "train.pipeline_repeats=4", "train.pipeline_schedule=circular"],
            "model.n_layers=4 is not divisible by 2 pipeline stages x 4 repeats = 8",
        ),
        (
            "pp=4",
            ["model.n_layers=4", "train.microbatches=2"],
            "train.microbatches=2 is fewer than the 4 pipeline stages",
        ),
        (
            "pp=2",
            ["model.n_layers=4", "train.microbatches=3"],
            "train.microbatches=3 does not divide the 16 sequences",
        ),
        (
            "dp=2",
            [*CIRCULAR],
            "train.pipeline_repeats needs a pipeline",
        ),
        (
            "pp=4,dp=2",
            ["model.n_layers=4", "train.global_batch_size=4"],
            "each data-parallel replica runs 2 sequences per forward pass, fewer than the 4 "
            "pipeline stages",
        ),
    ],
)
def test_pipelines_that_do_not_fit_are_refused_with_the_numbers(tiny_cfg, spec, overrides, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        build_program(tiny_cfg(*overrides), mesh(spec))


@pytest.mark.slow
def test_a_pipelined_checkpoint_continues_without_a_pipeline(tiny_cfg, tmp_path):
    schedule = (*FOUR_LAYERS[:1], "train.decay_steps=8", "checkpoint.every=4", "train.eval_every=0")
    whole = train_rows(training.run(tiny_cfg("train.steps=8", *schedule), mesh("dp=1")))
    training.run(tiny_cfg("train.steps=4", *schedule), mesh("pp=2,dp=4"), tmp_path)
    continued = train_rows(
        training.run(tiny_cfg("train.steps=8", *schedule), mesh("fsdp=8"), tmp_path)
    )
    np.testing.assert_allclose(
        [r["loss"] for r in continued], [r["loss"] for r in whole[4:]], rtol=1e-5
    )

    with pytest.raises(UsageError, match="resume with the train.pipeline_repeats it was"):
        training.run(
            tiny_cfg(
                "train.steps=8",
                *schedule,
                *CIRCULAR,
            ),
            mesh("pp=2,dp=4"),
            tmp_path,
        )
