"""Orders of windows: which seq_len + 1 tokens, from which documents, make sample i.

    PackedOrder     jaxlm's (data.order=jaxlm): each epoch a seeded permutation of the
                    documents, packed as one stream into windows that do not overlap
    PaddedOrder     data.packing=padded: the same permutation, one document per window
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
from jaxlm.data.megatron_order import GPTOrder, read_stream
from jaxlm.errors import UsageError

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
        order = _permutation(self.seed, epoch, n) if self.shuffle else np.arange(n)
        return order, np.cumsum(self.split.doc_length[order])

    def window(self, index: int) -> list[np.ndarray]:
        """The pieces of documents that make window `index`, in order."""
        epoch, window = divmod(index, self.one_pass)
        order, ends = self._epoch(epoch)
        start = window * self.window_len
        return read_stream(self.split, order, ends, start, start + self.window_len)


class PaddedOrder:
    """One document per window, cut at seq_len + 1 tokens (the pipeline pads the rest): for
    fine-tuning, where an example should be seen whole and alone. The documents are shuffled
    anew each epoch, as in PackedOrder."""

    def __init__(self, split: Documents, *, seq_len: int, seed: int, shuffle: bool = True):
        self.split, self.seq_len, self.seed, self.shuffle = split, seq_len, seed, shuffle
        self.one_pass = len(split)

    def __len__(self) -> int:
        return self.one_pass * (_EPOCHS if self.shuffle else 1)

    def window(self, index: int) -> list[np.ndarray]:
        epoch, position = divmod(index, self.one_pass)
        document = position
        if self.shuffle:
            document = _permutation(self.seed, epoch, self.one_pass)[position]
        length = min(int(self.split.doc_length[document]), self.seq_len + 1)
        return [self.split.read(document, 0, length)]


@functools.lru_cache(maxsize=2)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


class BlendedOrder:
    """Windows of several orders, taken in the proportion of their weights (blend.BlendSchedule):
    window i is window j of source k, where the schedule gives (k, j).

    The sources' orders are made by `factories` when a window is first read from them, so a blend
    of hundreds of prefixes holds files and pages only for the sources it has read."""

    def __init__(self, factories, schedule: BlendSchedule, names, *, seq_len, one_pass, length):
        self._factories, self._orders = factories, [None] * len(factories)
        self.schedule, self.names = schedule, names
        self.seq_len, self.one_pass, self._length = seq_len, one_pass, length

    def __len__(self) -> int:
        return self._length

    def window(self, index: int) -> list[np.ndarray]:
        (k,), (j,) = self.schedule.lookup([index])
        if self._orders[k] is None:
            self._orders[k] = self._factories[k]()
        return self._orders[k].window(int(j))

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

    def one(source, samples, wait):
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
        if data.packing == "padded":
            return PaddedOrder(documents, seq_len=seq_len, seed=seed, shuffle=train)
        return PackedOrder(documents, seq_len=seq_len, seed=seed, shuffle=train)

    if len(sources) == 1:
        return one(sources[0], num_samples, wait)
    weights = normalize([s.weight for s in sources])
    # Megatron's per-source sample counts: ceil(ceil(N * w) * (1 + surplus))
    counts = [int(math.ceil(math.ceil(num_samples * w) * (1 + _SURPLUS))) for w in weights]
    # Each source is made once now, to check it (and, for Megatron's order, so that process 0
    # builds its index while the others wait, in one order on every process), then let go; the
    # blend makes it again, without waiting, when it first reads from it.
    one_pass = 0
    for source, n in zip(sources, counts, strict=True):
        order = one(source, n, wait)
        if order.one_pass == 0:
            raise UsageError(
                f"the {split} split of {source.path} is shorter than one window of "
                f"{seq_len + 1} tokens: use a shorter sequence or leave it out of the blend"
            )
        one_pass += order.one_pass
    return BlendedOrder(
        [functools.partial(one, s, n, None) for s, n in zip(sources, counts, strict=True)],
        BlendSchedule([s.weight for s in sources]),
        [s.name for s in sources],
        seq_len=seq_len,
        one_pass=one_pass,
        # Megatron's sources hold what the run's samples need; jaxlm's wrap into new epochs
        length=num_samples if data.order == "megatron" else _EPOCHS * one_pass,
    )
