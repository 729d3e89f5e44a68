"""Data: where batches come from. Knows shapes and the batch sharding, never the model."""

from jax.sharding import NamedSharding

from jaxlm.config import Config
from jaxlm.data.synthetic import SyntheticBatches
from jaxlm.errors import UsageError


def make_batches(cfg: Config, sharding: NamedSharding):
    """An iterator of global training batches with `get_state()` / `set_state()`."""
    if cfg.data.source == "synthetic":
        return SyntheticBatches(
            batch_size=cfg.train.global_batch_size,
            seq_len=cfg.train.seq_len,
            vocab_size=cfg.model.vocab_size,
            seed=cfg.train.seed,
            sharding=sharding,
        )
    raise UsageError(f"unknown data.source '{cfg.data.source}': use 'synthetic'")
