"""Synthetic batches for tests and benchmarks: generated on the devices, in their shards.

Rows are walks of a random Markov chain in which every token has `BRANCHING` possible
successors, fixed by the seed. A model that learns the chain drives the loss from ln(V) down to
ln(BRANCHING) (1.39 nats), so learning is visible without any data on disk, and the floor is
known. Batch t is a pure function of (seed, draws, t): any mesh sees the same numbers, and
resuming needs only the step. Validation (`draws=1`) walks the training chain with other draws,
so its loss follows training's toward the floor.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from jaxlm.sharding import replicated

BRANCHING = 4


class SyntheticBatches:
    """Iterator of global batches {inputs, targets, weights} [B, L] on `sharding`."""

    def __init__(
        self,
        *,
        batch_size: int,
        seq_len: int,
        vocab_size: int,
        seed: int,
        sharding: NamedSharding,
        draws: int = 0,
    ):
        self.position = 0
        self._replicated = replicated(sharding.mesh)
        self._make = jax.jit(
            functools.partial(
                _batch, shape=(batch_size, seq_len), vocab_size=vocab_size, seed=seed, draws=draws
            ),
            out_shardings=sharding,
        )

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, jax.Array]:
        # An explicit copy of the step to every device: the loop forbids implicit transfers.
        batch = self._make(jax.device_put(self.position, self._replicated))
        self.position += 1
        return batch

    def taken(self) -> dict[str, int]:
        return {}  # one source

    read_s = 0.0  # made on the devices: no host reading

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = int(state["position"])


def successors(seed: int, vocab_size: int) -> jax.Array:
    """[V, BRANCHING]: the tokens that may follow each token in the chain of `seed`."""
    chain_key, _ = jax.random.split(jax.random.key(seed))
    return jax.random.randint(chain_key, (vocab_size, BRANCHING), 0, vocab_size)


def _batch(step, *, shape, vocab_size, seed, draws):
    batch_size, seq_len = shape
    _, walk_key = jax.random.split(jax.random.key(seed))
    successors_VxK = successors(seed, vocab_size)
    walk_key = jax.random.fold_in(walk_key, step)
    if draws:  # the same chain, walked with other random choices
        walk_key = jax.random.fold_in(walk_key, draws)
    start_key, choice_key = jax.random.split(walk_key)
    start_B = jax.random.randint(start_key, (batch_size,), 0, vocab_size)
    choices_LxB = jax.random.randint(choice_key, (seq_len, batch_size), 0, BRANCHING)

    def walk(token_B, choice_B):
        next_B = successors_VxK[token_B, choice_B]
        return next_B, next_B

    _, rest_LxB = jax.lax.scan(walk, start_B, choices_LxB)
    tokens_BxL1 = jnp.concatenate([start_B[:, None], rest_LxB.T], axis=1).astype(jnp.int32)
    return {
        "inputs": tokens_BxL1[:, :-1],
        "targets": tokens_BxL1[:, 1:],
        "weights": jnp.ones(shape, jnp.float32),
    }
