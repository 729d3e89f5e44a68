"""`data.source` as a weighted blend of sources, and the order in which a blend takes them.

    "0.7 megatron:/data/web 0.3 /data/code"     weight, source, weight, source ... (Megatron's
                                                --data-path); one source alone needs no weight
    [{source: /data/web, weight: 0.7}, ...]      the same as a YAML list (or a mapping
                                                source: weight), turned into that text

A source is a directory made by `python -m jaxlm.data prepare`, `megatron:PREFIX` (Megatron-LM's
PREFIX.bin + PREFIX.idx), or a bare path whose PREFIX.idx exists. Weights need not sum to one.

Sample s of a blend goes to the source furthest below its share so far, Megatron's
`build_blending_indices`: the k with the largest `w_k * max(s, 1) - taken_k`, the first on a
tie, in the same float64 arithmetic, so the choice is Megatron's sample for sample. It is a pure
function of the weights, so every process computes it alone, and any sample's source is found
without reading data.
"""

import dataclasses
import functools
import math

import numpy as np

from jaxlm.errors import UsageError

MEGATRON = "megatron:"


@dataclasses.dataclass(frozen=True)
class Component:
    source: str  # as written in data.source
    weight: float


def parse(text: str) -> list[Component]:
    """The components of a `data.source` text, checked: weights positive and finite, no source
    twice."""
    words = str(text).split()
    if not words:
        raise UsageError(
            "data.source is empty: name a prepared directory, a Megatron prefix, "
            "'stdlib' or 'synthetic'"
        )
    if len(words) == 1:
        return [Component(words[0], 1.0)]
    if len(words) % 2:
        raise UsageError(
            f"data.source '{text}' is not a blend: write pairs of weight and source, "
            f"e.g. '0.7 megatron:/data/web 0.3 /data/code'"
        )
    components = []
    for weight_text, source in zip(words[::2], words[1::2], strict=True):
        try:
            weight = float(weight_text)
        except ValueError:
            raise UsageError(
                f"data.source: '{weight_text}' (before {source}) is not a weight: write pairs "
                f"of weight and source"
            ) from None
        if not math.isfinite(weight) or weight <= 0:
            raise UsageError(
                f"data.source: the weight of {source} must be a positive number, not {weight_text}"
            )
        if source == "synthetic":
            raise UsageError("data.source: 'synthetic' cannot be part of a blend")
        components.append(Component(source, weight))
    names = [c.source for c in components]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"data.source names {', '.join(twice)} more than once")
    return components


def to_text(value) -> str:
    """A YAML list of {source, weight} or a mapping {source: weight} as the blend text."""
    if isinstance(value, dict):
        value = [{"source": k, "weight": v} for k, v in value.items()]
    if isinstance(value, list | tuple):
        parts = []
        for item in value:
            if not (isinstance(item, dict) and set(item) == {"source", "weight"}):
                raise UsageError(
                    f"data.source: each entry of a blend list needs exactly 'source' and "
                    f"'weight', not {item!r}"
                )
            parts += [str(item["weight"]), str(item["source"])]
        return " ".join(parts)
    return str(value)


def normalize(weights) -> np.ndarray:
    """Megatron's normalization (float64 division by the sum)."""
    w = np.asarray(weights, np.float64)
    return w / w.sum()


class BlendSchedule:
    """Which source, and which of its samples, each sample of the blend is.

    Computed a chunk at a time, on demand; only each chunk's starting counts are kept, so a
    lookup far into a run costs one pass up to it (about 0.4 us a sample), once.
    """

    CHUNK = 1 << 16

    def __init__(self, weights):
        # Megatron normalizes twice (the dataset builder, then BlendedDataset); so do we, for
        # the last bit of every weight
        self.weights = [float(w) for w in normalize(normalize(weights))]
        self._starts = [np.zeros(len(self.weights), np.int64)]  # counts before chunk j

    def __len__(self) -> int:
        return len(self.weights)

    def lookup(self, samples) -> tuple[np.ndarray, np.ndarray]:
        """(source, sample of that source) of each blend sample index."""
        samples = np.asarray(samples, np.int64)
        chunk, within = np.divmod(samples, self.CHUNK)
        source = np.empty(samples.shape, np.int16)
        index = np.empty(samples.shape, np.int64)
        for j in np.unique(chunk):
            sources, indices = self._chunk(int(j))
            mask = chunk == j
            source[mask], index[mask] = sources[within[mask]], indices[within[mask]]
        return source, index

    def taken(self, stop: int) -> np.ndarray:
        """Samples taken from each source among blend samples [0, stop)."""
        j, within = divmod(stop, self.CHUNK)
        counts = self._start(j).copy()
        if within:
            counts += np.bincount(self._chunk(j)[0][:within], minlength=len(self))
        return counts

    def _start(self, j: int) -> np.ndarray:
        while len(self._starts) <= j:
            self._chunk(len(self._starts) - 1)
        return self._starts[j]

    @functools.lru_cache(maxsize=4)  # noqa: B019 (as long-lived as the schedule)
    def _chunk(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        w, k = self.weights, len(self.weights)
        counts = [int(c) for c in self._start(j)]
        sources = np.empty(self.CHUNK, np.int16)
        indices = np.empty(self.CHUNK, np.int64)
        first = j * self.CHUNK
        for i in range(self.CHUNK):
            s = float(max(first + i, 1))
            best, best_error = 0, w[0] * s - counts[0]
            for d in range(1, k):
                error = w[d] * s - counts[d]
                if error > best_error:
                    best, best_error = d, error
            sources[i], indices[i] = best, counts[best]
            counts[best] += 1
        if len(self._starts) == j + 1:
            self._starts.append(np.asarray(counts, np.int64))
        return sources, indices
