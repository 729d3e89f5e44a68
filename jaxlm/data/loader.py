"""Where training's batches come from: `data.source` resolved, checked and read as global
batches. Knows shapes and the batch sharding, never the model.

`data.source` picks the source:
- `stdlib` (default): the interpreter's standard library, tokenized once into a cache;
- a directory made by `python -m jaxlm.data prepare`;
- `synthetic`: random Markov-chain walks generated on the devices (tests, benchmarks).
"""

import pathlib
from typing import Protocol

import jax

from jaxlm.config import Config
from jaxlm.data import shards, stdlib, tokenizer
from jaxlm.data.pipeline import GlobalBatches, PackedBatches
from jaxlm.data.shards import PreparedSplit
from jaxlm.data.synthetic import SyntheticBatches
from jaxlm.errors import UsageError


class Batches(Protocol):
    """An endless iterator of global batches that a checkpoint can save and restore."""

    @property
    def position(self) -> int:
        """Batches taken so far."""

    def __next__(self) -> dict[str, jax.Array]: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


def resolve_source(cfg: Config) -> pathlib.Path | None:
    """The prepared directory the config trains on (None for synthetic), checked against the
    model: its vocabulary must fit and, if `data.tokenizer` is set, its tokenizer must match."""
    source = cfg.data.source
    if source == "synthetic":
        return None
    directory = stdlib.dataset(cfg.model.vocab_size) if source == "stdlib" else pathlib.Path(source)
    if source != "stdlib" and not directory.is_dir():
        raise UsageError(f"data.source '{source}' is neither 'stdlib', 'synthetic' nor a directory")
    manifest = shards.read_manifest(directory)
    if manifest["vocab_size"] > cfg.model.vocab_size:
        raise UsageError(
            f"{directory} was tokenized with a vocabulary of {manifest['vocab_size']}, larger "
            f"than the model's model.vocab_size={cfg.model.vocab_size}"
        )
    if cfg.data.tokenizer:
        tokenizer.load(cfg.data.tokenizer)  # refuses a missing or invalid file
        wanted = tokenizer.fingerprint(cfg.data.tokenizer)
        if wanted != manifest["tokenizer_sha256"]:
            raise UsageError(
                f"{directory} was made with tokenizer {manifest['tokenizer_sha256'][:12]}, not "
                f"with data.tokenizer={cfg.data.tokenizer} ({wanted[:12]})"
            )
    return directory


def make_batches(cfg: Config, sharding, *, split: str = "train", directory=None) -> Batches:
    """The global batches of `split`, laid out by `sharding`.

    `split="val"` gives the held-out batches in a fixed order (no shuffling).
    """
    train = split == "train"
    if cfg.data.source == "synthetic":
        return SyntheticBatches(
            batch_size=cfg.train.global_batch_size,
            seq_len=cfg.train.seq_len,
            vocab_size=cfg.model.vocab_size,
            seed=cfg.train.seed,
            sharding=sharding,
            draws=0 if train else 1,  # validation: the training chain, other walks
        )
    directory = directory or resolve_source(cfg)
    source = PackedBatches(
        PreparedSplit(directory, split, verify=cfg.data.verify),
        seq_len=cfg.train.seq_len,
        global_batch=cfg.train.global_batch_size,
        seed=cfg.train.seed,
        shuffle=train,
        segments=not cfg.data.cross_document_attention,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        name=split,
    )
    return GlobalBatches(source, sharding, threads=cfg.data.threads, prefetch=cfg.data.prefetch)
