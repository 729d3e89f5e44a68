"""The train step's pieces: padding is invisible to the loss, micro batches keep their shards,
a loss in chunks is the loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import mesh as mesh_lib
from jaxlm.data import loader
from jaxlm.errors import UsageError
from jaxlm.sharding import split_rows
from jaxlm.step import build_program, make_loss_fn


def test_padded_positions_do_not_touch_loss_or_gradients(tiny_cfg):
    cfg = tiny_cfg()
    mesh = mesh_lib.make_mesh("dp=2,tp=4")
    program = build_program(cfg, mesh)
    batch = next(loader.make_batches(cfg, program.batch_sharding))
    weights = np.ones(batch["weights"].shape, np.float32)
    weights[:, 20:] = 0  # the last 12 positions of every row are padding
    garbage = np.asarray(batch["targets"]).copy()
    garbage[:, 20:] = (garbage[:, 20:] + 7) % cfg.model.vocab_size
    put = lambda x: jax.device_put(jnp.asarray(x), program.batch_sharding)  # noqa: E731
    padded = {**batch, "weights": put(weights)}
    padded_garbage = {**padded, "targets": put(garbage)}

    results = []
    for b in (padded, padded_garbage):
        state = program.init(jax.random.key(0))
        state, metrics = program.train_step(state, b, np.float32(np.inf))
        results.append((float(metrics["loss"]), np.asarray(state.params["embedding"])))
    assert results[0][0] == results[1][0]
    np.testing.assert_array_equal(results[0][1], results[1][1])
    assert float(metrics["tokens"]) == 20 * weights.shape[0]


def test_micro_batches_are_strided_so_each_device_keeps_its_rows():
    x = jnp.arange(8)
    micro = split_rows(x, 4)
    assert micro.shape == (4, 2)
    # rows 0-3 live on device 0 and rows 4-7 on device 1 (dp=2): each micro batch takes one
    # row from each, so no row moves
    assert micro.tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec, overrides",
    # pp=4,dp=2: the head splits the whole batch's 16 rows over the 8 devices, a chunk's 4 rows
    # by position
    [("dp=2,tp=4", []), ("pp=4,dp=2", ["model.n_layers=4"])],
)
def test_a_loss_in_chunks_is_the_loss_with_the_same_gradients(tiny_cfg, spec, overrides):
    """Head and loss on 4 slices of the rows in turn (recomputed in the backward pass): the same
    loss and gradients as on the whole batch, with a pipeline and without."""
    cfg = tiny_cfg(*overrides)
    program = build_program(cfg, mesh_lib.make_mesh(spec))
    params = program.init(jax.random.key(0)).params
    batch = next(loader.make_batches(cfg, program.batch_sharding))

    def mean_loss(params, chunks):
        total, tokens = make_loss_fn(program.spec.graphdef, chunks)(params, batch)
        return total / tokens

    results = [
        jax.jit(jax.value_and_grad(mean_loss), static_argnums=1)(params, chunks)
        for chunks in (1, 4)
    ]
    (whole, whole_grads), (chunked, chunked_grads) = results
    np.testing.assert_allclose(chunked, whole, rtol=1e-6)
    for (path, want), got in zip(
        jax.tree_util.tree_leaves_with_path(whole_grads),
        jax.tree.leaves(chunked_grads),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=str(path))


def test_loss_chunks_that_do_not_divide_the_micro_batch_are_refused(tiny_cfg):
    with pytest.raises(UsageError, match="train.loss_chunks=3 does not divide the micro batch"):
        build_program(tiny_cfg("train.loss_chunks=3"), mesh_lib.make_mesh("dp=8"))


def test_a_step_over_the_loss_limit_keeps_parameters_and_optimizer_state(tiny_cfg):
    program = build_program(tiny_cfg(), mesh_lib.make_mesh("dp=2,tp=4"))
    batch = next(loader.make_batches(tiny_cfg(), program.batch_sharding))
    state = program.init(jax.random.key(0))
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))

    kept, metrics = program.train_step(state, batch, jnp.float32(-np.inf))  # every loss a spike
    assert int(metrics["skipped"]) == 1 and int(kept.step) == 1
    for want, got in zip(
        jax.tree.leaves(before), jax.tree.leaves((kept.params, kept.opt_state)), strict=True
    ):
        np.testing.assert_array_equal(got, want)

    taken, metrics = program.train_step(kept, batch, jnp.float32(np.inf))
    assert int(metrics["skipped"]) == 0
    params = zip(jax.tree.leaves(before[0]), jax.tree.leaves(taken.params), strict=True)
    assert all(not np.array_equal(got, want) for want, got in params)
