"""Megatron-LM GPTDataset's sample order (`data.order=megatron`), rebuilt with NumPy.

For one source and one split, Megatron-LM (megatron/core/datasets/gpt_dataset.py) builds:

    split range     the split string ("969,30,1") normalized into book-ends; the split's
                    sequences are [round(lo * S), round(hi * S)) of the S in the index
    epochs          as many passes over the split as `num_samples` windows need
    document index  the split's sequences repeated once per epoch and shuffled with
                    numpy.random.RandomState(seed) (the last epoch shuffled apart when it
                    would be used for less than 80 % of its samples)
    sample index    the documents in that order as one token stream; sample i is the window
                    [i * L, i * L + L + 1), so neighbouring samples share one token
    shuffle index   a permutation of the samples from the same RandomState

and sample j of the dataset is window shuffle[j]. The sample index is the same thing as the
cumulative document ends with a binary search, which is what is stored here (`doc_ends`), built
vectorized: 10^7 documents take seconds, not Megatron's C++ loop.

The three arrays are cached as .npy next to the data (PREFIX's directory/cache/) or in
`data.cache_dir`, under a hash of everything they depend on, written by process 0 under
temporary names with the description last, and memory-mapped by every process.
"""

import functools
import hashlib
import json
import logging
import os
import pathlib
import re

import numpy as np

from jaxlm.errors import UsageError

log = logging.getLogger("jaxlm")

SPLITS = ("train", "val", "test")
DEFAULT_SPLIT = "969,30,1"
_FINAL_EPOCH_THRESHOLD = 0.80  # Megatron's: a final epoch used less than this is shuffled apart
_VERSION = 1  # of the cached files' layout
_ARRAYS = ("doc_index", "doc_ends", "shuffle")


def parse_split(text) -> list[tuple[float, float] | None]:
    """Megatron's split matrix: (low, high) fractions of train, validation and test (None when
    the split is empty), as `parse_and_normalize_split` and `convert_split_vector_to_split_matrix`
    compute them."""
    text = str(text)
    parts = text.split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise UsageError(f"data.split '{text}' is not a list of numbers like '969,30,1'") from None
    if not 1 <= len(values) <= 3 or any(not np.isfinite(v) or v < 0 for v in values):
        raise UsageError(f"data.split '{text}' must be one to three non-negative numbers")
    if not sum(values):
        raise UsageError(f"data.split '{text}' gives every split a share of zero")
    if values != [float(p) for p in re.findall(r"[.0-9]+", text)]:  # how Megatron reads it
        raise UsageError(f"data.split '{text}' must be plain numbers like '969,30,1'")
    values += [0.0] * (3 - len(values))
    shares = np.asarray(values, np.float64)
    shares = (shares / shares.sum()).tolist()
    bounds = [0.0]
    for share in shares:
        bounds.append(bounds[-1] + share)
    return [(lo, hi) if hi > lo else None for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def split_range(count: int, split_text: str, split: str) -> tuple[int, int]:
    """The [first, last) sequences of `split` among `count`, as Megatron rounds them."""
    bounds = parse_split(split_text)[SPLITS.index(split)]
    if bounds is None:
        return 0, 0
    return int(round(bounds[0] * float(count))), int(round(bounds[1] * float(count)))


def num_epochs(tokens_per_epoch: int, num_samples: int, seq_len: int) -> int:
    """Passes over the split that `num_samples` windows of seq_len + 1 tokens need."""
    needed = num_samples * seq_len + 1
    return max(1, -(-needed // tokens_per_epoch))


def document_index(documents, epochs: int, rng: np.random.RandomState, separate_final: bool):
    if not separate_final or epochs == 1:
        index = np.tile(np.asarray(documents), epochs).astype(np.int32)
        rng.shuffle(index)
        return index
    first = document_index(documents, epochs - 1, rng, False)
    return np.concatenate((first, document_index(documents, 1, rng, False)))


def shuffle_index(num_samples: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total:
        return first
    last = np.arange(num_samples, total, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


def build(
    lengths: np.ndarray, first: int, last: int, *, seq_len: int, num_samples: int, seed: int
) -> dict[str, np.ndarray]:
    """GPTDataset's indices for documents [first, last) with these `lengths`: `doc_index`
    (document ids in stream order), `doc_ends` (the stream's cumulative ends) and `shuffle`
    (the window of each sample). Document ids relative to the split give the same order as
    Megatron's absolute ones: a shuffle's permutation depends only on the length."""
    documents = np.arange(first, last, dtype=np.int32)
    tokens_per_epoch = int(lengths[first:last].sum(dtype=np.int64))
    if tokens_per_epoch <= 1:
        raise UsageError(
            f"the split has {last - first} documents and {tokens_per_epoch} tokens, too few for "
            f"one sample of {seq_len + 1} tokens: change data.split or use more data"
        )
    epochs = num_epochs(tokens_per_epoch, num_samples, seq_len)
    separate_final = False
    if epochs > 1:
        before_final = ((epochs - 1) * tokens_per_epoch - 1) // seq_len
        per_epoch = (tokens_per_epoch - 1) // seq_len
        separate_final = num_samples - before_final < int(_FINAL_EPOCH_THRESHOLD * per_epoch)
    rng = np.random.RandomState(seed)
    doc_index = document_index(documents, epochs, rng, separate_final)
    doc_ends = np.cumsum(lengths[doc_index], dtype=np.int64)
    total = (epochs * tokens_per_epoch - 1) // seq_len  # windows: the last one is whole
    shuffle = shuffle_index(before_final if separate_final else total, total, rng)
    return {"doc_index": doc_index, "doc_ends": doc_ends, "shuffle": shuffle}


class GPTOrder:
    """One split's samples in Megatron's order: sample j is seq_len + 1 tokens read across the
    documents of its window, as pieces.

    `documents` is the split (pipeline.Documents: a Megatron prefix's sequences in the
    `data.split` range, or a prepared directory's split); its `identity` names it in the cache.
    Process 0 builds the index if the cache lacks it (`build_here`), every process then `wait`s
    for it, and the arrays are memory-mapped when the first sample is read."""

    def __init__(
        self,
        documents,
        *,
        seq_len: int,
        num_samples: int,
        seed: int,
        cache_dir: pathlib.Path,
        build_here: bool = True,
        wait=None,
    ):
        self.documents, self.seq_len = documents, seq_len
        description = {
            "version": _VERSION,
            "documents": documents.identity,
            "seq_len": seq_len,
            "num_samples": num_samples,
            "seed": seed,
        }
        digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
        base = pathlib.Path(cache_dir) / f"gpt-order-{digest[:16]}"
        self._paths = {name: pathlib.Path(f"{base}-{name}.npy") for name in _ARRAYS}
        marker = pathlib.Path(f"{base}-description.json")
        if build_here and not marker.is_file():
            arrays = build(
                documents.doc_length,
                0,
                len(documents),
                seq_len=seq_len,
                num_samples=num_samples,
                seed=seed,
            )
            try:
                base.parent.mkdir(parents=True, exist_ok=True)
                for name, array in arrays.items():
                    tmp = pathlib.Path(f"{base}-{name}.tmp.npy")
                    np.save(tmp, array)
                    os.replace(tmp, self._paths[name])
                samples = len(arrays["shuffle"])
                # last: the index is complete
                marker.write_text(json.dumps({**description, "samples": samples}, indent=1))
            except OSError as e:
                raise UsageError(
                    f"cannot write the Megatron-order index to {base.parent} ({e.strerror}): "
                    f"set data.cache_dir to a writable directory"
                ) from None
            log.info("built the Megatron-order index (%d samples) in %s", samples, base.parent)
        if wait is not None:
            wait()  # the other processes read what process 0 wrote
        try:
            self.one_pass = json.loads(marker.read_text())["samples"]
        except (OSError, ValueError, KeyError):
            raise UsageError(
                f"the Megatron-order index {marker} is missing or damaged: process 0 did not "
                f"write it (is {base.parent} shared by all processes?)"
            ) from None

    def __len__(self) -> int:
        return self.one_pass

    @functools.cached_property
    def _arrays(self):
        return tuple(np.load(self._paths[name], mmap_mode="r") for name in _ARRAYS)

    def window(self, sample: int) -> list[np.ndarray]:
        doc_index, doc_ends, shuffle = self._arrays
        start = int(shuffle[sample]) * self.seq_len
        return read_stream(self.documents, doc_index, doc_ends, start, start + self.seq_len + 1)


def read_stream(documents, doc_order, doc_ends, start: int, stop: int) -> list[np.ndarray]:
    """Tokens [start, stop) of the stream of `documents` in `doc_order` (whose cumulative ends
    are `doc_ends`), as one piece per document they cross; documents of no tokens give none.
    Both jaxlm's order and Megatron's read their windows through this."""
    k = int(np.searchsorted(doc_ends, start, side="right"))  # the first to end after start
    pieces = []
    while start < stop:
        document, doc_end = int(doc_order[k]), int(doc_ends[k])
        doc_start = doc_end - int(documents.doc_length[document])
        end = min(stop, doc_end)
        if end > start:
            pieces.append(documents.read(document, start - doc_start, end - doc_start))
        start, k = end, k + 1
    return pieces
