"""Tokenize a corpus once into binary shards that training memory-maps.

    DIR/manifest.json         written last: the directory is complete
    DIR/tokenizer.model       the tokenizer that made the shards
    DIR/chat_template.jinja   the chat template that rendered them (chat data only)
    DIR/train-00000.bin       token ids, uint16 when the vocabulary fits, else uint32
    DIR/train-00000.docs.npy  int64 offsets of the documents in the shard (n_docs + 1 of them)
    DIR/train-00000.json      the shard's commit marker: counts, document range, CRC-32
    DIR/val-00000.*           the held-out split, the same way

Documents are read as a stream and tokenized on all cores (every document ends with EOS), so
corpora larger than memory work. A shard closes at the first document boundary after
`shard_tokens` tokens; documents never straddle shards. Every `val_period`-th document goes to
the validation split. Each shard is written under a temporary name and committed by its JSON
marker, so an interrupted run resumes after the last committed shard of each split.

Chat data (`chat_template` given; jaxlm/data/chat.py): each JSONL row's `messages` is one
document, rendered by the template and tokenized whole; tokens outside the assistant's answers
carry UNTRAINED_BIT (so chat shards are uint32), and no EOS is appended: the template ends turns.
"""

import hashlib
import json
import logging
import multiprocessing
import os
import pathlib
import shutil
import sys
import time
import zlib
from collections.abc import Iterator

import numpy as np

from jaxlm.data import chat, indexed
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.data.corpus import Document, Inputs
from jaxlm.errors import UsageError

log = logging.getLogger("jaxlm")

FORMAT = 1
SHARD_TOKENS = 1 << 24  # 32 MiB of uint16 per shard
SPLITS = ("train", "val")
_BATCH_DOCUMENTS = 256  # documents in flight at once: bounds memory however large the corpus
# set on a token that is not a training target (chat data outside the assistant's answers)
UNTRAINED_BIT = 1 << 31


def token_dtype(vocab_size: int, *, chat: bool = False) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 and not chat else np.uint32)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}"


def prepare(
    inputs: Inputs,
    tokenizer_path: pathlib.Path,
    out: pathlib.Path,
    *,
    val_fraction: float = 0.01,
    shard_tokens: int = SHARD_TOKENS,
    workers: int | None = None,
    chat_template: str | None = None,
) -> dict:
    """Tokenize `inputs` into shards under `out`; resume or return at once if already done.
    With `chat_template` (the template's text) the inputs are conversations."""
    if not 0 <= val_fraction < 1:
        raise UsageError(f"--val-fraction must be in [0, 1), not {val_fraction}")
    sp = tokenizer_lib.load(tokenizer_path)
    settings = {
        "format": FORMAT,
        "tokenizer_sha256": tokenizer_lib.fingerprint(tokenizer_path),
        "vocab_size": sp.vocab_size(),
        "eos_id": sp.eos_id(),
        "dtype": token_dtype(sp.vocab_size(), chat=chat_template is not None).name,
        "val_period": round(1 / val_fraction) if val_fraction else 0,
        "inputs_sha256": _inputs_fingerprint(inputs),
        "chat_template_sha256": chat.fingerprint(chat_template) if chat_template else None,
    }
    out = pathlib.Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create {out}: {e.strerror}") from None
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        _check_same_settings(out, manifest, settings)
        log.info("%s is already prepared", out)
        return manifest
    writers = {split: _ShardWriter(out, split, settings, shard_tokens) for split in SPLITS}
    if not (out / "tokenizer.model").exists():
        shutil.copyfile(tokenizer_path, out / "tokenizer.model")
    if chat_template:
        _write_atomic(out / "chat_template.jinja", chat_template)

    started = time.perf_counter()
    encoder = _Encoder(tokenizer_path, workers, chat_template)
    with _Progress(inputs.total_bytes) as progress, encoder as encode:
        pending: list[tuple[int, str, Document]] = []

        def encode_pending():
            for (index, split, doc), ids in zip(
                pending, encode([d.text for _, _, d in pending]), strict=True
            ):
                writers[split].add(index, ids, doc.replaced)
            progress.update(inputs.bytes_read)
            pending.clear()

        for index, document in enumerate(inputs.documents()):
            period = settings["val_period"]
            split = "val" if period and index % period == period - 1 else "train"
            if index < writers[split].done_until:
                continue  # committed by an earlier run
            if chat_template:  # refuse a malformed row here, where its file and line are known
                chat.check_messages(document.text, document.key)
            pending.append((index, split, document))
            if len(pending) >= _BATCH_DOCUMENTS:
                encode_pending()
        encode_pending()
    for writer in writers.values():
        writer.flush()

    shards = {split: writers[split].committed() for split in SPLITS}
    if not any(s["documents"] for s in shards["train"]):
        raise UsageError(
            f"the inputs hold no text: {len(inputs.files)} files, "
            f"{inputs.skipped_binary} of them binary"
        )
    manifest = {
        **settings,
        "shard_tokens": shard_tokens,
        "documents": {s: sum(x["documents"] for x in shards[s]) for s in SPLITS},
        "tokens": {s: sum(x["tokens"] for x in shards[s]) for s in SPLITS},
        "replaced_characters": sum(x["replaced_characters"] for s in SPLITS for x in shards[s]),
        "skipped_binary_files": inputs.skipped_binary,
        "input_files": len(inputs.files),
        "input_bytes": inputs.total_bytes,
        "shards": {s: [x["name"] for x in shards[s]] for s in SPLITS},
    }
    _write_atomic(manifest_path, json.dumps(manifest, indent=2))
    seconds = time.perf_counter() - started
    log.info(
        "prepared %s tokens (%s validation) from %.1f MB in %.1f s (%.1f MB/s) into %s",
        f"{manifest['tokens']['train']:,}",
        f"{manifest['tokens']['val']:,}",
        inputs.total_bytes / 1e6,
        seconds,
        inputs.total_bytes / 1e6 / max(seconds, 1e-9),
        out,
    )
    return manifest


def _check_same_settings(out: pathlib.Path, found: dict, wanted: dict) -> None:
    if found.get("tokenizer_sha256") != wanted["tokenizer_sha256"]:
        raise UsageError(
            f"{out} holds shards made with tokenizer {found.get('tokenizer_sha256', '?')[:12]}, "
            f"not with the given tokenizer {wanted['tokenizer_sha256'][:12]}: use another --out"
        )
    for key in ("inputs_sha256", "val_period", "format", "chat_template_sha256"):
        if found.get(key) != wanted[key]:
            raise UsageError(
                f"{out} was prepared from other inputs or settings ({key} differs): "
                f"use another --out"
            )


def _inputs_fingerprint(inputs: Inputs) -> str:
    h = hashlib.sha256(inputs.jsonl_field.encode())
    for f in inputs.files:
        h.update(f"{f}\0{f.stat().st_size}\0".encode())
    return h.hexdigest()


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class _ShardWriter:
    """Collects one split's documents and commits a shard whenever it is full."""

    def __init__(self, out: pathlib.Path, split: str, settings: dict, shard_tokens: int):
        self.out, self.split, self.settings, self.shard_tokens = out, split, settings, shard_tokens
        self.dtype = np.dtype(settings["dtype"])
        self._committed = []
        while (out / f"{shard_name(split, len(self._committed))}.json").exists():
            info = json.loads((out / f"{shard_name(split, len(self._committed))}.json").read_text())
            _check_same_settings(out, info, settings)
            self._committed.append(info)
        self.done_until = self._committed[-1]["end_document"] if self._committed else 0
        self._reset()

    def _reset(self):
        self._arrays, self._lengths, self._first, self._replaced = [], [], None, 0

    def add(self, index: int, ids: np.ndarray, replaced: int) -> None:
        if self._first is None:
            self._first = index
        self._arrays.append(ids)
        self._lengths.append(len(ids))
        self._replaced += replaced
        self._end = index + 1
        if sum(self._lengths) >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self._arrays:
            return
        name = shard_name(self.split, len(self._committed))
        tokens = np.concatenate(self._arrays).astype(self.dtype)
        offsets = np.concatenate([[0], np.cumsum(self._lengths)]).astype(np.int64)
        for suffix, write in (
            (".bin", tokens.tofile),
            (".docs.npy", lambda f: np.save(f, offsets)),
        ):
            tmp = self.out / f"{name}{suffix}.tmp"
            with open(tmp, "wb") as f:
                write(f)
            os.replace(tmp, self.out / f"{name}{suffix}")
        info = {
            **{
                k: self.settings[k]
                for k in (
                    "format",
                    "tokenizer_sha256",
                    "inputs_sha256",
                    "val_period",
                    "chat_template_sha256",
                )
            },
            "name": name,
            "tokens": int(len(tokens)),
            "documents": len(self._lengths),
            "first_document": self._first,
            "end_document": self._end,
            "replaced_characters": self._replaced,
            "crc32": zlib.crc32(tokens.tobytes()),
        }
        _write_atomic(self.out / f"{name}.json", json.dumps(info))  # commits the shard
        self._committed.append(info)
        self.done_until = self._end
        self._reset()

    def committed(self) -> list[dict]:
        return list(self._committed)


class _Encoder:
    """Encodes batches of texts to EOS-terminated id arrays (or conversations, JSON, to flagged
    ids), on all cores when there are several."""

    def __init__(self, tokenizer_path: pathlib.Path, workers: int | None, chat_template=None):
        self.args = (str(tokenizer_path), chat_template)
        self.workers = workers or os.cpu_count() or 1
        self._pool = None

    def __enter__(self):
        if self.workers > 1:
            # spawn, not fork: the caller may be a process that already runs JAX's threads
            ctx = multiprocessing.get_context("spawn")
            self._pool = ctx.Pool(self.workers, initializer=_load_worker, initargs=self.args)
        else:
            _load_worker(*self.args)
        return self

    def __call__(self, texts: list[str]) -> Iterator[np.ndarray]:
        if self._pool is None:
            return map(_encode, texts)
        return self._pool.imap(_encode, texts, chunksize=max(1, len(texts) // (4 * self.workers)))

    def __exit__(self, *exc):
        if self._pool is not None:
            self._pool.terminate()


_worker_tokenizer = None
_worker_chat = None


def _load_worker(path: str, chat_template: str | None = None) -> None:
    global _worker_tokenizer, _worker_chat  # one tokenizer per worker process, loaded once
    _worker_tokenizer = tokenizer_lib.load(pathlib.Path(path))
    _worker_chat = chat.ChatEncoder(pathlib.Path(path), chat_template) if chat_template else None


def _encode(text: str) -> np.ndarray:
    if _worker_chat is not None:
        ids, trained = _worker_chat.encode(json.loads(text))
        return ids.astype(np.uint32) | np.where(trained, 0, UNTRAINED_BIT).astype(np.uint32)
    ids = _worker_tokenizer.encode(text)
    ids.append(_worker_tokenizer.eos_id())
    return np.asarray(ids, dtype=np.uint32)


class _Progress:
    """A bar over input bytes on a terminal; a log line every ~10 % otherwise."""

    def __init__(self, total: int):
        self.total, self.done, self._next_log = max(total, 1), 0, 0.1
        self._bar = None
        if sys.stdout.isatty():
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(
                BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()
            )
            self._task = self._bar.add_task("prepare", total=self.total)

    def __enter__(self):
        if self._bar:
            self._bar.start()
        return self

    def update(self, done: int) -> None:
        self.done = done
        if self._bar:
            self._bar.update(self._task, completed=self.done)
        elif self.done / self.total >= self._next_log:
            log.info("prepare: %.0f %% of %.1f MB", 100 * self.done / self.total, self.total / 1e6)
            while self._next_log <= self.done / self.total:
                self._next_log += 0.1

    def __exit__(self, *exc):
        if self._bar:
            self._bar.stop()


def prepare_megatron(
    inputs: Inputs, tokenizer_path: pathlib.Path, prefix: pathlib.Path, *, workers=None
) -> dict:
    """Tokenize `inputs` into one Megatron-LM indexed dataset, PREFIX.bin + PREFIX.idx, one
    EOS-terminated sequence per document (Megatron's preprocess_data.py with --append-eod);
    Megatron splits it by its --split, jaxlm by data.split. PREFIX.jaxlm.json records the
    tokenizer, which Megatron's files do not."""
    sp = tokenizer_lib.load(tokenizer_path)
    dtype = indexed.token_dtype(sp.vocab_size())
    started = time.perf_counter()

    def documents():
        with _Progress(inputs.total_bytes) as progress, _Encoder(tokenizer_path, workers) as encode:
            batch = []
            for document in inputs.documents():
                batch.append(document.text)
                if len(batch) >= _BATCH_DOCUMENTS:
                    yield from encode(batch)
                    progress.update(inputs.bytes_read)
                    batch = []
            yield from encode(batch)
            progress.update(inputs.bytes_read)

    counts = indexed.write(prefix, documents(), dtype)
    if not counts["documents"]:
        raise UsageError(f"the inputs hold no text: {len(inputs.files)} files")
    info = {
        "tokenizer_sha256": tokenizer_lib.fingerprint(tokenizer_path),
        "vocab_size": sp.vocab_size(),
        "eos_id": sp.eos_id(),
        **counts,
    }
    _write_atomic(pathlib.Path(f"{prefix}.jaxlm.json"), json.dumps(info, indent=2))
    log.info(
        "wrote %s documents, %s tokens (%s) to %s.bin/.idx in %.1f s",
        f"{counts['documents']:,}",
        f"{counts['tokens']:,}",
        dtype.name,
        prefix,
        time.perf_counter() - started,
    )
    return info
