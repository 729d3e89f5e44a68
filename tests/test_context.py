"""Context parallelism on 8 fake CPU devices: the `context` axis splits every sequence along its
length, and the model is the model of one device."""

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
from jaxlm import model as model_lib
from jaxlm import runs, training
from jaxlm.cost.compiled import compile_step
from jaxlm.errors import UsageError
from jaxlm.step import build_program

ROWS = 4  # packed rows of two documents each, the boundary at another place in every row


def mesh(spec):
    n = int(np.prod([int(part.split("=")[1]) for part in spec.split(",")]))
    return mesh_lib.make_mesh(spec, jax.devices()[:n])


def loss_and_gradients(cfg, m):
    return packed_loss_and_gradients(cfg, m, ROWS)


@pytest.fixture(scope="module")
def one_device():
    return loss_and_gradients(tiny_config(f"train.global_batch_size={ROWS}"), mesh("dp=1"))


RING, GATHER = "model.context_attention=ring", "model.context_attention=all_gather"


@pytest.mark.parametrize(
    "spec, extra",
    [
        # the fast tier: one ring and one gathered layout; the rest in the slow one
        ("cp=4", [RING]),
        ("cp=2", [GATHER]),
        *(
            pytest.param(spec, extra, marks=pytest.mark.slow)
            for spec, extra in [
                ("cp=2", [RING]),
                ("cp=8", [RING]),
                ("cp=2,tp=2,dp=2", [RING]),
                ("cp=2,fsdp=2", [RING]),
                ("cp=2,dp=2", [RING, "train.zero1=true", "model.remat=full"]),
                ("cp=8", [GATHER]),
                ("cp=2,tp=2,dp=2", [GATHER]),
                ("cp=4,pp=2", ["model.n_layers=4", "train.microbatches=2"]),  # auto: gathered
            ]
        ),
    ],
)
def test_losses_and_gradients_equal_one_device_with_packed_documents(
    tiny_cfg, one_device, spec, extra
):
    want = one_device
    if "model.n_layers=4" in extra:  # the pipeline needs a layer per stage and microbatch
        want = loss_and_gradients(
            tiny_cfg(f"train.global_batch_size={ROWS}", "model.n_layers=4"), mesh("dp=1")
        )
    got = loss_and_gradients(tiny_cfg(f"train.global_batch_size={ROWS}", *extra), mesh(spec))
    assert_same_loss_and_gradients(got, want)


def test_a_tokens_logits_do_not_change_when_later_tokens_change(tiny_cfg):
    """Causality across the chunk boundaries: with cp=4, position t's logits are the same
    whatever follows t, in every chunk, and a change reaches every later position."""
    cfg = tiny_cfg("train.global_batch_size=2")
    program = build_program(cfg, mesh("cp=4,dp=2"))
    params = program.init(jax.random.key(0)).params
    logits = jax.jit(lambda p, t: model_lib.apply(program.spec.graphdef, p, t))
    L = cfg.train.seq_len
    tokens = np.random.default_rng(1).integers(0, cfg.model.vocab_size, (2, L)).astype(np.int32)
    before = np.asarray(logits(params, jax.device_put(tokens, program.batch_sharding)))
    for t in (L // 4 - 1, L // 2, L - 2):  # the last of chunk 0, the first of chunk 2, ...
        changed = tokens.copy()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % cfg.model.vocab_size
        after = np.asarray(logits(params, jax.device_put(changed, program.batch_sharding)))
        np.testing.assert_array_equal(after[:, : t + 1], before[:, : t + 1])
        assert (np.abs(after[:, t + 1 :] - before[:, t + 1 :]).max(axis=-1) > 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("kind, share", [("ring", 0.2), ("all_gather", 0.35)])
def test_each_device_keeps_its_share_of_a_long_sequence(tiny_cfg, kind, share):
    """XLA's temporary memory for one sequence of 2,048 tokens, where the attention's scores
    are most of it (one device: 244 MB, in query blocks). With cp=8 the ring scores two chunks
    of 128 queries against two of 128 keys at a time (0.16 of one device's, measured), the
    gathered variant its 256 queries against all 2,048 keys (0.30)."""
    cfg = tiny_cfg(
        "train.global_batch_size=1",
        "train.seq_len=2048",
        "model.max_seq_len=2048",
        f"model.context_attention={kind}",
    )
    temps = {
        spec: compile_step(cfg, build_program(cfg, mesh(spec))).memory["temp"]
        for spec in ("dp=1", "cp=8")
    }
    assert temps["cp=8"] <= share * temps["dp=1"], temps


@pytest.mark.slow
def test_a_checkpoint_saved_on_cp4_continues_on_one_device_as_if_uninterrupted(tiny_cfg, tmp_path):
    """(A dp=8 checkpoint continuing on cp=4 is tests/test_checkpoint.py's.)"""
    schedule = ("train.decay_steps=6", "checkpoint.every=3", "train.eval_every=0")
    whole = train_rows(training.run(tiny_cfg("train.steps=6", *schedule), mesh("cp=4,dp=2")))
    training.run(tiny_cfg("train.steps=3", *schedule), mesh("cp=4,dp=2"), tmp_path)
    continued = train_rows(
        training.run(tiny_cfg("train.steps=6", *schedule), mesh("dp=1"), tmp_path)
    )
    assert [row["step"] for row in continued] == [4, 5, 6]
    np.testing.assert_allclose(
        [row["loss"] for row in continued], [row["loss"] for row in whole[3:]], rtol=1e-5
    )


@pytest.mark.parametrize(
    "spec, overrides, sentence",
    [
        ("cp=4,dp=2", ["train.seq_len=100"], "train.seq_len=100 is not divisible by 2 x context=4"),
        ("cp=2,pp=2", [RING], "model.context_attention=ring does not run inside a pipeline"),
    ],
)
def test_a_sequence_that_does_not_split_is_refused(tiny_cfg, spec, overrides, sentence):
    with pytest.raises(UsageError, match=sentence):
        build_program(tiny_cfg(*overrides), mesh(spec))


def test_generation_and_evaluation_refuse_the_context_axis(tiny_cfg):
    with pytest.raises(UsageError, match="leave cp out of --mesh"):
        runs.check_mesh(tiny_cfg(), mesh("cp=2"))
