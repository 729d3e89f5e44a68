"""The input pipeline: prepared shards -> shuffled documents -> packed windows -> global batches.

    PreparedSplit          memory-mapped documents (jaxlm/data/shards.py)
      -> shuffle           a seeded permutation of the documents, new each epoch
      -> pack              the shuffled documents as one stream, cut into windows of
                           seq_len + 1 tokens; a document may run into the next window
      -> this process's rows   row r of global batch b is window b * B + r; process p of n
                           reads only rows [p B/n, (p+1) B/n)
      -> grain             MapDataset over batch indices, read ahead by threads; its iterator
                           state (the next batch index) is what a checkpoint saves
      -> jax.Array         jax.make_array_from_process_local_data on the batch sharding

Packing is random access (like Megatron's sample index): cumulative document lengths in the
epoch's order locate any window's documents with a binary search, so a process touches only
the tokens of its own rows, and the global batch is the same whatever the number of processes.

Each window carries segment ids (1, 2, ... for the pieces of documents in it) and positions
(restarting at 0 in each piece), so with `data.cross_document_attention=false` a token attends
only to earlier tokens of its own document.
"""

import functools

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding

from jaxlm.data.shards import PreparedSplit
from jaxlm.errors import UsageError

_EPOCHS = 1 << 20  # the index space of a training run: far more epochs than any run takes


class PackedBatches:
    """A grain data source: element i is this process's rows of global batch i, as NumPy."""

    def __init__(
        self,
        split: PreparedSplit,
        *,
        seq_len: int,
        global_batch: int,
        seed: int,
        shuffle: bool = True,
        segments: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        name: str = "train",
    ):
        self.split, self.window = split, seq_len + 1
        self.global_batch, self.seed, self.shuffle, self.segments = (
            global_batch,
            seed,
            shuffle,
            segments,
        )
        if global_batch % process_count:
            raise UsageError(
                f"the global batch of {global_batch} does not divide over {process_count} processes"
            )
        self.rows = global_batch // process_count
        self.first_row = process_index * self.rows
        self.batches_per_epoch = split.num_tokens // self.window // global_batch
        if self.batches_per_epoch == 0:
            raise UsageError(
                f"the {name} split of {split.directory} has {split.num_tokens:,} tokens, fewer "
                f"than one global batch of {global_batch} x {self.window}: use a smaller batch "
                f"or sequence, or more data"
            )

    def __len__(self) -> int:
        return self.batches_per_epoch * (_EPOCHS if self.shuffle else 1)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        epoch, batch = divmod(index, self.batches_per_epoch)
        order, ends = self._epoch(epoch)
        first_window = batch * self.global_batch + self.first_row
        rows = [self._window(order, ends, first_window + r) for r in range(self.rows)]
        tokens, segments, positions = (np.stack(x) for x in zip(*rows, strict=True))
        batch = {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "weights": np.ones(tokens[:, 1:].shape, np.float32),
        }
        if self.segments:
            batch["segments"], batch["positions"] = segments[:, :-1], positions[:, :-1]
        return batch

    @functools.lru_cache(maxsize=2)  # noqa: B019 (two epochs, as long-lived as the iterator)
    def _epoch(self, epoch: int):
        """Document order of an epoch and the cumulative end of each document in its stream."""
        n = len(self.split)
        order = (
            np.random.default_rng([self.seed, epoch]).permutation(n)
            if self.shuffle
            else np.arange(n)
        )
        return order, np.cumsum(self.split.doc_length[order])

    def _window(self, order, ends, window: int):
        start, stop = window * self.window, (window + 1) * self.window
        tokens = np.empty(self.window, np.int32)
        segments = np.empty(self.window, np.int32)
        positions = np.empty(self.window, np.int32)
        k = int(np.searchsorted(ends, start, side="right"))  # first document ending after start
        filled, segment = 0, 1
        while filled < self.window:
            doc_start = ends[k] - self.split.doc_length[order[k]]
            lo, hi = start + filled - doc_start, min(stop, ends[k]) - doc_start
            n = hi - lo
            tokens[filled : filled + n] = self.split.read(order[k], lo, hi)
            segments[filled : filled + n] = segment
            positions[filled : filled + n] = np.arange(n)
            filled, segment, k = filled + n, segment + 1, k + 1
        return tokens, segments, positions


class GlobalBatches:
    """Iterator of global batches (jax.Arrays on the batch sharding) with a saveable state."""

    def __init__(
        self, source: PackedBatches, sharding: NamedSharding, *, threads: int = 1, prefetch: int = 4
    ):
        self.source, self.sharding = source, sharding
        self.position = 0  # batches consumed
        options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)
        self._iterator = iter(grain.MapDataset.source(source).to_iter_dataset(options))

    def __iter__(self):
        return self

    def __len__(self) -> int:
        return len(self.source)

    def __next__(self) -> dict[str, jax.Array]:
        local = next(self._iterator)
        self.position += 1
        return {k: self._globalize(v) for k, v in local.items()}

    def _globalize(self, local: np.ndarray) -> jax.Array:
        shape = (self.source.global_batch, *local.shape[1:])
        # an intended copy to the devices (the training loop forbids implicit ones)
        with jax.transfer_guard_host_to_device("allow"):
            return jax.make_array_from_process_local_data(self.sharding, local, shape)

    def get_state(self) -> dict:
        return {"position": self.position, "grain": self._iterator.get_state()}

    def set_state(self, state: dict) -> None:
        self._iterator.set_state(state["grain"])
        self.position = state["position"]
