"""Where training's batches come from: `data.source` resolved, checked and read as global
batches. Knows shapes and the batch sharding, never the model.

`data.source` picks the source (jaxlm/data/sources.py), or a weighted blend of several:
- `stdlib` (default): the interpreter's standard library, tokenized once into a cache;
- a directory made by `python -m jaxlm.data prepare`;
- `megatron:PREFIX`: a Megatron-LM indexed dataset (PREFIX.bin + PREFIX.idx);
- `synthetic`: random Markov-chain walks generated on the devices (tests, benchmarks).
`data.order` picks jaxlm's order of samples or Megatron's (jaxlm/data/orders.py).
"""

from typing import Protocol

import jax
from jax.experimental import multihost_utils

from jaxlm.config import Config
from jaxlm.data import sources as sources_lib
from jaxlm.data.orders import make_order
from jaxlm.data.pipeline import GlobalBatches, PackedBatches
from jaxlm.data.sources import Source
from jaxlm.data.synthetic import SyntheticBatches


class Batches(Protocol):
    """An endless iterator of global batches that a checkpoint can save and restore."""

    @property
    def position(self) -> int:
        """Batches taken so far."""

    def __next__(self) -> dict[str, jax.Array]: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...

    def taken(self) -> dict[str, int]:
        """Tokens taken from each source of a blend so far (empty for one source)."""

    @property
    def read_s(self) -> float:
        """Seconds the last batch took to read on the host, before any device was involved
        (putting it on the devices may wait for them: it is left out)."""


def resolve_source(cfg: Config) -> list[Source] | None:
    """The sources the config trains on (None for synthetic), checked against the model
    (jaxlm/data/sources.py)."""
    return sources_lib.resolve(cfg.data, cfg.model.vocab_size, init_from=cfg.checkpoint.init_from)


def chat_template(sources) -> str | None:
    """The chat template that rendered the sources' conversations (None: text data)."""
    return sources_lib.chat_template(sources)


def make_batches(
    cfg: Config, sharding, *, split: str = "train", sources=None, only: str | None = None
) -> Batches:
    """The global batches of `split`, laid out by `sharding`, from `sources` (resolve_source).

    `split="val"` gives the held-out batches in a fixed order (jaxlm's order: no shuffling).
    `only` names one source of a blend to read alone (per-source validation).
    """
    train = split == "train"
    t = cfg.train
    if cfg.data.source == "synthetic":
        return SyntheticBatches(
            batch_size=t.global_batch_size,
            seq_len=t.seq_len,
            vocab_size=cfg.model.vocab_size,
            seed=t.seed,
            sharding=sharding,
            draws=0 if train else 1,  # validation: the training chain, other walks
        )
    sources = sources if sources is not None else resolve_source(cfg)
    if only is not None:
        sources = [s for s in sources if s.name == only]
    batches = t.steps if train else t.eval_batches
    order = make_order(
        sources,
        split,
        cfg.data,
        seq_len=t.seq_len,
        seed=t.seed,
        num_samples=batches * t.global_batch_size,
        process_index=jax.process_index(),
        wait=_barrier("jaxlm-data-index") if jax.process_count() > 1 else None,
    )
    source = PackedBatches(
        order,
        global_batch=t.global_batch_size,
        segments=not cfg.data.cross_document_attention,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        name=split,
    )
    return GlobalBatches(source, sharding, threads=cfg.data.threads, prefetch=cfg.data.prefetch)


def _barrier(name: str):
    def wait():
        multihost_utils.sync_global_devices(name)

    return wait
