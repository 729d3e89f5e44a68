"""Reading a prepared directory: one split's documents, memory-mapped, by index.

Opening checks what would otherwise surface as wrong data mid-run: the manifest exists (the
directory is complete), every shard has the size its marker promises, document offsets are
consistent and, unless told not to, every shard's CRC-32 matches. Any failure names the file and
is a UsageError, before training starts.
"""

import json
import pathlib
import zlib

import numpy as np

from jaxlm.data.prepare import SPLITS
from jaxlm.errors import UsageError


def read_manifest(directory: pathlib.Path) -> dict:
    path = pathlib.Path(directory) / "manifest.json"
    if not path.is_file():
        raise UsageError(
            f"{directory} is not a prepared data directory (no manifest.json): make one with "
            f"'python -m jaxlm.data prepare', or finish an interrupted one by running it again"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UsageError(f"{path} is corrupt (not valid JSON)") from None


class PreparedSplit:
    """The documents of one split ('train' or 'val'); tokens are read lazily from the shards."""

    def __init__(self, directory: pathlib.Path, split: str, *, verify: bool = True):
        assert split in SPLITS
        self.directory = pathlib.Path(directory)
        self.manifest = read_manifest(self.directory)
        dtype = np.dtype(self.manifest["dtype"])
        self._shards: list[np.memmap] = []
        shard_of, start, length = [], [], []
        for index, name in enumerate(self.manifest["shards"][split]):
            tokens, offsets = self._open_shard(name, dtype, verify)
            self._shards.append(tokens)
            shard_of.append(np.full(len(offsets) - 1, index, np.int32))
            start.append(offsets[:-1])
            length.append(np.diff(offsets))
        empty = np.zeros(0, np.int64)
        self.doc_shard = np.concatenate(shard_of) if shard_of else empty.astype(np.int32)
        self.doc_start = np.concatenate(start) if start else empty
        self.doc_length = np.concatenate(length) if length else empty
        self.num_tokens = int(self.doc_length.sum())
        # what names this split in a cache of indices built over it (megatron_order.GPTOrder)
        self.identity = {
            "directory": str(self.directory.resolve()),
            "split": split,
            "shards": self.manifest["shards"][split],
            "tokens": self.num_tokens,
        }

    def __len__(self) -> int:
        return len(self.doc_length)

    def read(self, document: int, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of a document."""
        base = self.doc_start[document]
        return self._shards[self.doc_shard[document]][base + start : base + stop]

    def _open_shard(self, name: str, dtype: np.dtype, verify: bool):
        bin_path = self.directory / f"{name}.bin"
        try:
            info = json.loads((self.directory / f"{name}.json").read_text())
            offsets = np.load(self.directory / f"{name}.docs.npy")
        except (OSError, ValueError) as e:
            raise UsageError(f"shard {bin_path} is incomplete or corrupt ({e})") from None
        expected = info["tokens"] * dtype.itemsize
        actual = bin_path.stat().st_size if bin_path.exists() else -1
        if actual != expected:
            raise UsageError(
                f"shard {bin_path} is truncated or corrupt: {actual} bytes where "
                f"{expected} were written"
            )
        if len(offsets) != info["documents"] + 1 or offsets[-1] != info["tokens"]:
            raise UsageError(f"shard {bin_path} is corrupt: its document offsets do not match")
        tokens = np.memmap(bin_path, dtype=dtype, mode="r")
        if verify and zlib.crc32(tokens) != info["crc32"]:
            raise UsageError(f"shard {bin_path} is corrupt: its CRC-32 does not match")
        return tokens, offsets
