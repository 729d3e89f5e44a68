"""Megatron-LM's indexed dataset format, read and written with NumPy: `PREFIX.bin` + `PREFIX.idx`.

    PREFIX.idx    b"MMIDIDX\\x00\\x00", version (uint64, 1), dtype code (uint8),
                  sequence count S (uint64), document count D + 1 (uint64),
                  sequence lengths (int32 x S), byte pointers into .bin (int64 x S),
                  document indices (int64 x D + 1: the first sequence of each document, then S)
    PREFIX.bin    the token ids of all sequences, back to back, in the dtype of the code

This is what Megatron's `preprocess_data.py` and `IndexedDatasetBuilder` write. GPT training
treats each sequence as a document (as Megatron's GPTDataset does); without sentence splitting
there is one sequence per document.

Opening reads and checks the index only; the `.bin` is memory-mapped on the first read, so a
blend of hundreds of prefixes holds open files and pages only for the prefixes it reads.
"""

import functools
import os
import pathlib
import struct

import numpy as np

from jaxlm.errors import UsageError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# Megatron's DType codes (megatron/core/datasets/indexed_dataset.py)
DTYPES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODES = {np.dtype(t): code for code, t in DTYPES.items()}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, documents + 1


def idx_path(prefix) -> pathlib.Path:
    return pathlib.Path(f"{prefix}.idx")


def bin_path(prefix) -> pathlib.Path:
    return pathlib.Path(f"{prefix}.bin")


def exists(prefix) -> bool:
    return idx_path(prefix).is_file() and bin_path(prefix).is_file()


def token_dtype(vocab_size: int) -> np.dtype:
    """The dtype Megatron's preprocessing picks for a vocabulary (uint16 when it fits)."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


class IndexedDataset:
    """One Megatron prefix: its sequences by index, tokens read lazily from the `.bin`.

    Opening reads the header and checks the files' sizes against it, and keeps nothing open:
    the index arrays and the tokens are memory-mapped when first used."""

    def __init__(self, prefix):
        self.prefix = str(prefix)
        for path in (idx_path(prefix), bin_path(prefix)):
            if not path.is_file():
                raise UsageError(f"the Megatron dataset {prefix} has no {path.name} ({path})")
        path = idx_path(prefix)
        with open(path, "rb") as f:
            header = f.read(_HEADER.size)
            if len(header) < _HEADER.size:
                raise UsageError(f"{path} is too short to be a Megatron index")
            magic, version, code, sequences, documents = _HEADER.unpack(header)
            if magic != MAGIC:
                raise UsageError(f"{path} is not a Megatron index (its magic is {magic!r})")
            if version != VERSION:
                raise UsageError(f"{path} has index version {version}; jaxlm reads 1")
            if code not in DTYPES:
                raise UsageError(f"{path} has an unknown dtype code {code}")
            self.dtype = np.dtype(DTYPES[code])
            self._count, self._documents = sequences, documents
            need = _HEADER.size + sequences * (4 + 8) + documents * 8
            size = path.stat().st_size
            if size < need:
                raise UsageError(
                    f"{path} is truncated: {size:,} bytes where its header promises {need:,}"
                )
            end = 0
            if sequences:  # the last sequence's length and pointer say where the tokens end
                f.seek(_HEADER.size + (sequences - 1) * 4)
                (last_length,) = struct.unpack("<i", f.read(4))
                f.seek(_HEADER.size + sequences * 4 + (sequences - 1) * 8)
                (last_pointer,) = struct.unpack("<q", f.read(8))
                end = last_pointer + last_length * self.dtype.itemsize
        size = bin_path(prefix).stat().st_size
        if size < end:
            raise UsageError(
                f"{bin_path(prefix)} is shorter than its index says: {size:,} bytes where "
                f"{end:,} are indexed"
            )

    def __len__(self) -> int:
        return self._count

    @functools.cached_property
    def _index(self) -> np.memmap:
        return np.memmap(idx_path(self.prefix), dtype=np.uint8, mode="r")

    @functools.cached_property
    def sequence_lengths(self) -> np.ndarray:
        return np.frombuffer(self._index, np.int32, self._count, _HEADER.size)

    @functools.cached_property
    def sequence_pointers(self) -> np.ndarray:
        offset = _HEADER.size + self._count * 4
        return np.frombuffer(self._index, np.int64, self._count, offset)

    @functools.cached_property
    def document_indices(self) -> np.ndarray:
        offset = _HEADER.size + self._count * 12
        return np.frombuffer(self._index, np.int64, self._documents, offset)

    @functools.cached_property
    def _tokens(self) -> np.memmap:
        return np.memmap(bin_path(self.prefix), dtype=self.dtype, mode="r")

    @property
    def num_documents(self) -> int:
        return max(self._documents - 1, 0)

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def read(self, sequence: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Tokens [start, stop) of a sequence, a view of the memory-mapped `.bin`."""
        base = int(self.sequence_pointers[sequence]) // self.dtype.itemsize
        stop = int(self.sequence_lengths[sequence]) if stop is None else stop
        return self._tokens[base + start : base + stop]

    def max_token(self, chunk: int = 1 << 24) -> int:
        """The largest token id in the `.bin` (read through once, a chunk at a time)."""
        end = self.num_tokens  # the indexed tokens; anything after them is not read
        return max(
            (int(self._tokens[i : i + chunk].max()) for i in range(0, end, chunk)), default=-1
        )


def write(prefix, documents, dtype) -> dict:
    """Write `documents` (an iterable of 1-D integer arrays) as a Megatron prefix, one sequence
    per document. Both files are written under temporary names and renamed when complete, the
    `.idx` last, so a reader never sees half a dataset. Returns the counts."""
    dtype = np.dtype(dtype)
    if dtype not in _CODES or dtype.kind not in "iu":
        raise UsageError(f"jaxlm writes Megatron datasets of integer tokens, not {dtype}")
    low, high = np.iinfo(dtype).min, np.iinfo(dtype).max
    prefix = pathlib.Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp_bin = pathlib.Path(f"{bin_path(prefix)}.tmp")
    lengths = []
    with open(tmp_bin, "wb") as out:
        for document in documents:
            tokens = np.asarray(document)
            if tokens.size and (tokens.min() < low or tokens.max() > high):
                raise UsageError(f"token ids of {prefix} do not fit its dtype {dtype}")
            out.write(tokens.astype(dtype, copy=False).tobytes())
            lengths.append(tokens.size)
    os.replace(tmp_bin, bin_path(prefix))
    lengths = np.asarray(lengths, np.int32)
    write_index(prefix, lengths, dtype)
    return {"documents": len(lengths), "tokens": int(lengths.sum(dtype=np.int64))}


def write_index(prefix, lengths: np.ndarray, dtype) -> None:
    """PREFIX.idx for sequences of `lengths` stored back to back in PREFIX.bin, one sequence per
    document; written under a temporary name and renamed."""
    dtype, lengths = np.dtype(dtype), np.asarray(lengths, np.int32)
    pointers = np.zeros(len(lengths), np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    tmp = pathlib.Path(f"{idx_path(prefix)}.tmp")
    with open(tmp, "wb") as out:
        out.write(_HEADER.pack(MAGIC, VERSION, _CODES[dtype], len(lengths), len(lengths) + 1))
        out.write(lengths.tobytes())
        out.write(pointers.tobytes())
        out.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes())
    os.replace(tmp, idx_path(prefix))
