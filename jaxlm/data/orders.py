"""Orders of windows: which seq_len + 1 tokens, from which documents, make sample i.

    PackedOrder     jaxlm's (data.order=jaxlm): each epoch a seeded permutation of the
                    documents, packed as one stream into windows that do not overlap
    GPTOrder        Megatron-LM's (data.order=megatron): jaxlm/data/megatron_order.py
    BlendedOrder    several sources' orders in the proportion of their weights (blend.py)

`make_order` builds the order `data.*` asks for from resolved sources (sources.py). A window is
a list of pieces of documents; the pipeline turns it into tokens, segment ids and positions.
No JAX here, so `python -m jaxlm.data samples` runs without devices.
"""

import functools
import math
from typing import Protocol

import numpy as np

from jaxlm.data import sources as sources_lib
from jaxlm.data.blend import BlendSchedule, normalize
from jaxlm.data.megatron_order import GPTOrder

_EPOCHS = 1 << 20  # the index space of a training run: far more epochs than any run takes
_SURPLUS = 0.005  # Megatron's mid_level_dataset_surplus: each blended source builds this much more


class Documents(Protocol):
    """One split of one source: its documents by index (shards.PreparedSplit, or the sequences
    of a Megatron prefix, sources.MegatronSplit)."""

    doc_length: np.ndarray  # tokens of each document
    num_tokens: int

    def __len__(self) -> int: ...

    def read(self, document: int, start: int, stop: int) -> np.ndarray: ...


class PackedOrder:
    """jaxlm's order over one split: the documents shuffled anew each epoch (a seeded
    permutation), as one stream cut into windows of seq_len + 1 tokens that do not overlap.
    Window i is epoch i // one_pass; endless when shuffled, one pass when not."""

    def __init__(self, split: Documents, *, seq_len: int, seed: int, shuffle: bool = True):
        self.split, self.seq_len, self.seed, self.shuffle = split, seq_len, seed, shuffle
        self.window_len = seq_len + 1
        self.one_pass = split.num_tokens // self.window_len

    def __len__(self) -> int:
        return self.one_pass * (_EPOCHS if self.shuffle else 1)

    @functools.lru_cache(maxsize=2)  # noqa: B019 (two epochs, as long-lived as the order)
    def _epoch(self, epoch: int):
        """Document order of an epoch and the cumulative end of each document in its stream."""
        n = len(self.split)
        order = (
            np.random.default_rng([self.seed, epoch]).permutation(n)
            if self.shuffle
            else np.arange(n)
        )
        return order, np.cumsum(self.split.doc_length[order])

    def window(self, index: int) -> list[np.ndarray]:
        """The pieces of documents that make window `index`, in order."""
        epoch, window = divmod(index, self.one_pass)
        order, ends = self._epoch(epoch)
        start, stop = window * self.window_len, (window + 1) * self.window_len
        k = int(np.searchsorted(ends, start, side="right"))  # first document ending after start
        pieces = []
        while start < stop:
            doc_start = ends[k] - self.split.doc_length[order[k]]
            end = min(stop, ends[k])
            pieces.append(self.split.read(order[k], start - doc_start, end - doc_start))
            start, k = end, k + 1
        return pieces


class BlendedOrder:
    """Windows of several orders, taken in the proportion of their weights (blend.BlendSchedule):
    window i is window j of source k, where the schedule gives (k, j)."""

    def __init__(self, orders: list, schedule: BlendSchedule, names: list[str]):
        self.orders, self.schedule, self.names = orders, schedule, names
        self.seq_len = orders[0].seq_len
        self.one_pass = sum(o.one_pass for o in orders)

    def __len__(self) -> int:
        return min(len(o) for o in self.orders) * len(self.orders)  # bounded by the shortest

    def window(self, index: int) -> list[np.ndarray]:
        (k,), (j,) = self.schedule.lookup([index])
        return self.orders[k].window(int(j))

    def taken(self, windows: int) -> dict[str, int]:
        """Windows taken from each source among the first `windows`."""
        return dict(zip(self.names, map(int, self.schedule.taken(windows)), strict=True))


def make_order(
    sources,
    split: str,
    data,
    *,
    seq_len: int,
    seed: int,
    num_samples: int,
    process_index: int = 0,
    wait=None,
):
    """The order of `split` over resolved `sources` as `data` (config.DataConfig) asks.

    `num_samples` is what the run will take (Megatron's --train-samples): Megatron's order
    depends on it, through the number of epochs; jaxlm's does not. `wait` is a barrier across
    processes, for the Megatron indices that process 0 builds."""
    train = split == "train"

    def one(source, samples):
        documents = sources_lib.open_split(source, split, data)
        if data.order == "megatron":
            return GPTOrder(
                documents,
                seq_len=seq_len,
                num_samples=samples,
                seed=seed,
                cache_dir=sources_lib.cache_dir(source, data),
                build_here=process_index == 0,
                wait=wait,
            )
        return PackedOrder(documents, seq_len=seq_len, seed=seed, shuffle=train)

    if len(sources) == 1:
        return one(sources[0], num_samples)
    weights = normalize([s.weight for s in sources])
    # Megatron's per-source sample counts: ceil(ceil(N * w) * (1 + surplus))
    counts = [int(math.ceil(math.ceil(num_samples * w) * (1 + _SURPLUS))) for w in weights]
    return BlendedOrder(
        [one(s, n) for s, n in zip(sources, counts, strict=True)],
        BlendSchedule([s.weight for s in sources]),
        [s.name for s in sources],
    )
