"""The train step's pieces: padding is invisible to the loss, micro batches keep their shards."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import mesh as mesh_lib
from jaxlm.data import loader
from jaxlm.sharding import split_rows
from jaxlm.step import build_program


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
