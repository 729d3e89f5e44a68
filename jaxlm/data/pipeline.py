"""The input pipeline: documents -> an order of windows -> global batches -> jax.Arrays.

    Documents              one split of one source, memory-mapped: a prepared directory
                           (shards.PreparedSplit) or a Megatron prefix (sources.MegatronSplit)
      -> order             windows of seq_len + 1 tokens, each a list of pieces of documents:
         PackedOrder       jaxlm's (data.order=jaxlm): documents shuffled anew each epoch and
                           packed into windows that do not overlap
         GPTOrder          Megatron-LM's (data.order=megatron, jaxlm/data/megatron_order.py)
         BlendedOrder      several sources' orders, in the proportion of their weights
      -> this process's rows   row r of global batch b is window b * B + r; process p of n
                           reads only rows [p B/n, (p+1) B/n)
      -> grain             MapDataset over batch indices, read ahead by threads; its iterator
                           state (the next batch index) is what a checkpoint saves
      -> jax.Array         jax.make_array_from_process_local_data on the batch sharding

Every order is random access (like Megatron's sample index): cumulative document lengths in
the stream's order locate any window's documents with a binary search, so a process touches
only the tokens of its own rows, and the global batch is the same whatever the number of
processes.

Each window carries segment ids (1, 2, ... for the pieces of documents in it) and positions
(restarting at 0 in each piece), so with `data.cross_document_attention=false` a token attends
only to earlier tokens of its own document. Its loss weights are 1, except for targets that
carry prepare.UNTRAINED_BIT (chat data outside the assistant's answers) and for the padding of a
window shorter than seq_len + 1 (data.packing=padded), which are 0; padding has segment id 0.
"""

import time

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding

from jaxlm.data.orders import BlendedOrder
from jaxlm.data.prepare import UNTRAINED_BIT
from jaxlm.errors import UsageError


class PackedBatches:
    """A grain data source: element i is this process's rows of global batch i, as NumPy; row r
    of global batch b is window b * B + r of the order."""

    def __init__(
        self,
        order,
        *,
        global_batch: int,
        segments: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        name: str = "train",
    ):
        self.order, self.global_batch, self.segments = order, global_batch, segments
        if global_batch % process_count:
            raise UsageError(
                f"the global batch of {global_batch} does not divide over {process_count} processes"
            )
        self.rows = global_batch // process_count
        self.first_row = process_index * self.rows
        self.batches = len(order) // global_batch
        if order.one_pass < global_batch:
            raise UsageError(
                f"the {name} data holds {order.one_pass:,} windows of {order.seq_len + 1} tokens, "
                f"fewer than one global batch of {global_batch}: use a smaller batch or "
                f"sequence, or more data"
            )

    def __len__(self) -> int:
        return self.batches

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        first_window = index * self.global_batch + self.first_row
        window_len = self.order.seq_len + 1
        rows = [_row(self.order.window(first_window + r), window_len) for r in range(self.rows)]
        tokens, trained, segments, positions = (np.stack(x) for x in zip(*rows, strict=True))
        batch = {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "weights": trained[:, 1:].astype(np.float32),
        }
        if self.segments:
            batch["segments"], batch["positions"] = segments[:, :-1], positions[:, :-1]
        return batch

    def taken(self, batches: int) -> dict[str, int]:
        """Tokens (targets) taken from each source of a blend in the first `batches` batches."""
        if not isinstance(self.order, BlendedOrder):
            return {}
        taken = self.order.taken(batches * self.global_batch)
        return {name: count * self.order.seq_len for name, count in taken.items()}


def _row(pieces: list[np.ndarray], window_len: int):
    """Tokens, whether each is trained as a target, segment ids (1, 2, ... per piece; 0 for
    padding) and positions (from 0 in each piece), padded to `window_len`."""
    lengths = [len(p) for p in pieces]
    raw = np.concatenate(pieces).astype(np.int64)
    padding = window_len - len(raw)
    tokens = np.pad(raw & ~UNTRAINED_BIT, (0, padding)).astype(np.int32)
    trained = np.pad((raw & UNTRAINED_BIT) == 0, (0, padding))
    segments = np.repeat(np.arange(1, len(pieces) + 1, dtype=np.int32), lengths)
    positions = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])
    return tokens, trained, np.pad(segments, (0, padding)), np.pad(positions, (0, padding))


class GlobalBatches:
    """Iterator of global batches (jax.Arrays on the batch sharding) with a saveable state."""

    def __init__(
        self, source: PackedBatches, sharding: NamedSharding, *, threads: int = 1, prefetch: int = 4
    ):
        self.source, self.sharding = source, sharding
        self.position = 0  # batches consumed
        self.read_s = 0.0  # the last batch's time on the host
        options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)
        self._iterator = iter(grain.MapDataset.source(source).to_iter_dataset(options))

    def __iter__(self):
        return self

    def __len__(self) -> int:
        return len(self.source)

    def __next__(self) -> dict[str, jax.Array]:
        reading = time.perf_counter()
        local = next(self._iterator)
        self.read_s = time.perf_counter() - reading
        self.position += 1
        return {k: self._globalize(v) for k, v in local.items()}

    def _globalize(self, local: np.ndarray) -> jax.Array:
        shape = (self.source.global_batch, *local.shape[1:])
        # an intended copy to the devices (the training loop forbids implicit ones)
        with jax.transfer_guard_host_to_device("allow"):
            return jax.make_array_from_process_local_data(self.sharding, local, shape)

    def taken(self) -> dict[str, int]:
        return self.source.taken(self.position)

    def get_state(self) -> dict:
        return {"position": self.position, "grain": self._iterator.get_state()}

    def set_state(self, state: dict) -> None:
        self._iterator.set_state(state["grain"])
        self.position = state["position"]
