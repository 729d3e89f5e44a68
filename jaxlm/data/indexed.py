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
    """One Megatron prefix: its sequences by index, tokens read lazily from the `.bin`."""

    def __init__(self, prefix):
        self.prefix = str(prefix)
        for path in (idx_path(prefix), bin_path(prefix)):
            if not path.is_file():
                raise UsageError(f"the Megatron dataset {prefix} has no {path.name} ({path})")
        index = np.memmap(idx_path(prefix), dtype=np.uint8, mode="r")
        if index.size < _HEADER.size:
            raise UsageError(f"{idx_path(prefix)} is too short to be a Megatron index")
        magic, version, code, sequences, documents = _HEADER.unpack(index[: _HEADER.size])
        if magic != MAGIC:
            raise UsageError(f"{idx_path(prefix)} is not a Megatron index (its magic is {magic!r})")
        if version != VERSION:
            raise UsageError(f"{idx_path(prefix)} has index version {version}; jaxlm reads 1")
        if code not in DTYPES:
            raise UsageError(f"{idx_path(prefix)} has an unknown dtype code {code}")
        self.dtype = np.dtype(DTYPES[code])
        need = _HEADER.size + sequences * (4 + 8) + documents * 8
        if index.size < need:
            raise UsageError(
                f"{idx_path(prefix)} is truncated: {index.size} bytes where its header promises "
                f"{need}"
            )
        offset = _HEADER.size
        self.sequence_lengths = np.frombuffer(index, np.int32, sequences, offset)
        offset += self.sequence_lengths.nbytes
        self.sequence_pointers = np.frombuffer(index, np.int64, sequences, offset)
        offset += self.sequence_pointers.nbytes
        self.document_indices = np.frombuffer(index, np.int64, documents, offset)
        end = (
            int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize
            if sequences
            else 0
        )
        size = bin_path(prefix).stat().st_size
        if size < end:
            raise UsageError(
                f"{bin_path(prefix)} is shorter than its index says: {size:,} bytes where "
                f"{end:,} are indexed"
            )
        self._tokens: np.memmap | None = None

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return max(len(self.document_indices) - 1, 0)

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def read(self, sequence: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Tokens [start, stop) of a sequence, a view of the memory-mapped `.bin`."""
        if self._tokens is None:
            self._tokens = np.memmap(bin_path(self.prefix), dtype=self.dtype, mode="r")
        base = int(self.sequence_pointers[sequence]) // self.dtype.itemsize
        stop = int(self.sequence_lengths[sequence]) if stop is None else stop
        return self._tokens[base + start : base + stop]

    def max_token(self, chunk: int = 1 << 24) -> int:
        """The largest token id in the `.bin` (read through once, a chunk at a time)."""
        if self._tokens is None:
            self._tokens = np.memmap(bin_path(self.prefix), dtype=self.dtype, mode="r")
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
    tmp_bin, tmp_idx = (pathlib.Path(f"{p}.tmp") for p in (bin_path(prefix), idx_path(prefix)))
    lengths = []
    with open(tmp_bin, "wb") as out:
        for document in documents:
            tokens = np.asarray(document)
            if tokens.size and (tokens.min() < low or tokens.max() > high):
                raise UsageError(f"token ids of {prefix} do not fit its dtype {dtype}")
            out.write(tokens.astype(dtype, copy=False).tobytes())
            lengths.append(tokens.size)
    lengths = np.asarray(lengths, np.int32)
    pointers = np.zeros(len(lengths), np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    with open(tmp_idx, "wb") as out:
        out.write(_HEADER.pack(MAGIC, VERSION, _CODES[dtype], len(lengths), len(lengths) + 1))
        out.write(lengths.tobytes())
        out.write(pointers.tobytes())
        out.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes())
    os.replace(tmp_bin, bin_path(prefix))
    os.replace(tmp_idx, idx_path(prefix))
    return {"documents": len(lengths), "tokens": int(lengths.sum(dtype=np.int64))}
