"""`data.source` resolved and checked: each source of a blend found, opened and matched against
the model, before any compute; and one split of a source as documents.

    stdlib                  the default corpus (jaxlm/data/stdlib.py), a prepared directory
    DIR                     a directory made by `python -m jaxlm.data prepare` (its own train
                            and val splits)
    megatron:PREFIX         Megatron-LM's PREFIX.bin + PREFIX.idx (also a bare PREFIX whose
                            .idx exists); its sequences are split by `data.split`
    FILE.jsonl              conversations (data.format=chat), prepared on first use into a
                            cache directory beside the file (or in data.cache_dir), with
                            data.tokenizer (default: the default corpus's) and the chat template

A prepared directory says what it holds: text, or chat data with the template that rendered it;
`data.format` must match every source of the blend.

No JAX here.
"""

import dataclasses
import functools
import hashlib
import json
import logging
import os
import pathlib

import numpy as np

from jaxlm.data import (
    blend,
    chat,
    corpus,
    indexed,
    megatron_order,
    prepare,
    shards,
    stdlib,
    tokenizer,
)
from jaxlm.errors import UsageError

log = logging.getLogger("jaxlm")


@dataclasses.dataclass(frozen=True)
class Source:
    """One source of `data.source`, found."""

    name: str  # short and unique in the blend: metric names (tokens/NAME, val_loss/NAME)
    kind: str  # "prepared" or "megatron"
    path: pathlib.Path  # the directory, or the Megatron prefix
    weight: float


def resolve(
    data, vocab_size: int | None, *, init_from: str | None = None, check_format: bool = True
) -> list[Source] | None:
    """The sources `data.source` names (None for synthetic), each checked: it exists and is
    intact, its vocabulary fits `vocab_size` (the model's; None: not checked), its tokenizer
    is `data.tokenizer` if that is set, and it holds what `data.format` says (unless
    `check_format` is false: the tools that only look at a source). Conversations in
    JSONL are prepared first (with the chat template of `data.chat_template`, else that of the
    run `init_from` where it has one, else the built-in one)."""
    components = blend.parse(data.source)
    if [c.source for c in components] == ["synthetic"]:
        if data.format == "chat":
            raise UsageError("data.format=chat needs conversations, not synthetic batches")
        return None
    found = []
    for c in components:
        kind, path = _locate(c.source, vocab_size)
        if kind == "jsonl":
            if data.format != "chat":
                raise UsageError(
                    f"data.source '{path}' is a JSONL file: conversations need data.format=chat; "
                    f"text is prepared first with python -m jaxlm.data prepare"
                )
            kind, path = "prepared", _prepare_chat(path, data, vocab_size, init_from)
        found.append((kind, path, c.weight))
    names = _names([path for _, path, _ in found])
    sources = [Source(n, k, p, w) for n, (k, p, w) in zip(names, found, strict=True)]
    for source in sources:
        _check(source, data, vocab_size, check_format)
    return sources


def _locate(text: str, vocab_size: int | None) -> tuple[str, pathlib.Path]:
    if text == "stdlib":
        return "prepared", stdlib.dataset(vocab_size)
    if text.startswith(blend.MEGATRON):
        return "megatron", pathlib.Path(text[len(blend.MEGATRON) :])
    path = pathlib.Path(text)
    if path.suffix == ".jsonl" and path.is_file():
        return "jsonl", path
    # Megatron keeps its index cache in a directory named like the prefix (PREFIX/cache/), so
    # a directory is a prepared one only if it has a manifest or there is no PREFIX.idx
    if (path / "manifest.json").is_file():
        return "prepared", path
    if indexed.idx_path(path).is_file():
        return "megatron", path
    if path.is_dir():
        return "prepared", path
    raise UsageError(
        f"data.source '{text}' is neither 'stdlib', 'synthetic', a prepared directory nor a "
        f"Megatron prefix (no {indexed.idx_path(path).name})"
    )


def _names(paths: list[pathlib.Path]) -> list[str]:
    """The last path component of each, with its index where two would share one."""
    names = [p.name or str(p) for p in paths]
    return [n if names.count(n) == 1 else f"{n}.{i}" for i, n in enumerate(names)]


def _check(source: Source, data, vocab: int | None, check_format: bool) -> None:
    if source.kind == "prepared":
        manifest = shards.read_manifest(source.path)
        holds = format_of(manifest)
        if check_format and holds != data.format:
            raise UsageError(
                f"{source.path} holds {holds} data but data.format={data.format}: set "
                f"data.format={holds}, or prepare it with --format {data.format}"
            )
        if vocab is not None and manifest["vocab_size"] > vocab:
            raise UsageError(
                f"{source.path} was tokenized with a vocabulary of {manifest['vocab_size']}, "
                f"larger than the model's model.vocab_size={vocab}"
            )
        if data.tokenizer:
            tokenizer.load(data.tokenizer)  # refuses a missing or invalid file
            wanted = tokenizer.fingerprint(data.tokenizer)
            if wanted != manifest["tokenizer_sha256"]:
                raise UsageError(
                    f"{source.path} was made with tokenizer {manifest['tokenizer_sha256'][:12]}, "
                    f"not with data.tokenizer={data.tokenizer} ({wanted[:12]})"
                )
        return
    if check_format and data.format == "chat":
        raise UsageError(
            f"the Megatron dataset {source.path} holds no loss masks: data.format=chat needs "
            f"conversations (a JSONL file, or a directory from prepare --format chat)"
        )
    dataset = indexed.IndexedDataset(source.path)  # refuses missing files and bad headers
    if vocab is None:
        return
    largest = max_token(dataset, cache_dir(source, data), vocab)
    if largest >= vocab:
        raise UsageError(
            f"the Megatron dataset {source.path} holds token id {largest}, outside the model's "
            f"vocabulary (model.vocab_size={vocab})"
        )


def format_of(manifest: dict) -> str:
    """What a prepared directory holds: "chat" (rendered by a chat template) or "text"."""
    return "chat" if manifest.get("chat_template_sha256") else "text"


def _prepare_chat(path: pathlib.Path, data, vocab: int | None, init_from) -> pathlib.Path:
    """The prepared directory of a JSONL file of conversations, made on first use (under a
    lock, so one process of a job prepares while the others wait). Its name holds the file's
    size and time, the tokenizer and the template: a change to any of them prepares anew."""
    if data.tokenizer:
        model = pathlib.Path(data.tokenizer)
    elif vocab is not None:
        model = stdlib.dataset(vocab) / "tokenizer.model"
    else:
        raise UsageError(f"name the tokenizer for {path} with data.tokenizer")
    tokenizer.load(model)  # refuses a missing or invalid file
    template = chat.template_for(data.chat_template, init_from)
    stat = path.stat()
    key = hashlib.sha256(
        "\0".join(
            [
                str(path.resolve()),
                str(stat.st_size),
                str(stat.st_mtime_ns),
                tokenizer.fingerprint(model),
                chat.fingerprint(template),
            ]
        ).encode()
    ).hexdigest()
    home = pathlib.Path(data.cache_dir) if data.cache_dir else path.parent / "cache"
    out = home / f"{path.stem}-chat-{key[:16]}"
    if not (out / "manifest.json").is_file():
        with stdlib.locked(home / f"{out.name}.lock"):
            if not (out / "manifest.json").is_file():
                log.info("preparing the conversations of %s into %s", path, out)
                inputs = corpus.resolve_inputs([str(path)], "messages")
                # in this process: fine-tuning sets are small, and a pool of spawned workers
                # would re-run the caller's script where it has no `if __name__` guard
                prepare.prepare(inputs, model, out, chat_template=template, workers=1)
    return out


def chat_template(sources: list[Source] | None) -> str | None:
    """The chat template that rendered the sources (chat data), or None (text)."""
    templates = {
        (s.path / "chat_template.jinja").read_text()
        for s in sources or []
        if s.kind == "prepared" and (s.path / "chat_template.jinja").is_file()
    }
    if len(templates) > 1:
        raise UsageError(
            "the sources of data.source were rendered by different chat templates: prepare "
            "them with one"
        )
    return templates.pop() if templates else None


def cache_dir(source: Source, data) -> pathlib.Path:
    """Where the indices built for a source go: data.cache_dir, else beside the data."""
    if data.cache_dir:
        return pathlib.Path(data.cache_dir)
    home = source.path if source.kind == "prepared" else source.path.parent
    return home / "cache"


def max_token(dataset: indexed.IndexedDataset, cache: pathlib.Path, limit=None) -> int:
    """The largest token id of a Megatron prefix, read through once and remembered in the cache
    (keyed by the files' sizes and times); not remembered when it is `limit` or more, so that a
    refused run writes nothing."""
    bin_stat = os.stat(indexed.bin_path(dataset.prefix))
    idx_stat = os.stat(indexed.idx_path(dataset.prefix))
    key = [bin_stat.st_size, bin_stat.st_mtime_ns, idx_stat.st_size, idx_stat.st_mtime_ns]
    path = cache / f"{pathlib.Path(dataset.prefix).name}-max-token.json"
    try:
        remembered = json.loads(path.read_text())
        if remembered["key"] == key:
            return remembered["max_token"]
    except (OSError, ValueError, KeyError):
        pass
    largest = dataset.max_token()
    if limit is not None and largest >= limit:
        return largest
    try:
        cache.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, "max_token": largest}))
    except OSError:
        pass  # a read-only place: read it through again next time
    return largest


class MegatronSplit:
    """The sequences of a Megatron prefix in one split's range (Megatron's `data.split`), as
    documents (pipeline.Documents). Nothing is mapped until lengths or tokens are read."""

    def __init__(self, prefix, split: str, split_text: str):
        self.dataset = indexed.IndexedDataset(prefix)
        self.first, self.last = megatron_order.split_range(len(self.dataset), split_text, split)
        if self.last <= self.first:
            raise UsageError(f"data.split '{split_text}' leaves no {split} documents in {prefix}")
        idx = os.stat(indexed.idx_path(prefix))
        self.identity = {
            "prefix": os.path.abspath(prefix),
            "index": [idx.st_size, idx.st_mtime_ns],
            "range": [self.first, self.last],
        }

    @functools.cached_property
    def doc_length(self) -> np.ndarray:
        return self.dataset.sequence_lengths[self.first : self.last]

    @functools.cached_property
    def num_tokens(self) -> int:
        return int(self.doc_length.sum(dtype=np.int64))

    def __len__(self) -> int:
        return self.last - self.first

    def read(self, document: int, start: int, stop: int) -> np.ndarray:
        return self.dataset.read(self.first + document, start, stop)


def open_split(source: Source, split: str, data):
    """The documents of `split` ('train' or 'val') of a source (pipeline.Documents)."""
    if source.kind == "megatron":
        return MegatronSplit(source.path, split, data.split)
    return shards.PreparedSplit(source.path, split, verify=data.verify)


def describe(data) -> list[dict]:
    """What `python -m jaxlm.data inspect` prints: per source its kind, documents, tokens,
    dtype, tokenizer and splits."""
    found = resolve(data, None, check_format=False)
    if found is None:
        raise UsageError("synthetic batches are made on the devices: there is nothing to inspect")
    rows = []
    for source in found:
        row = {"source": str(source.path), "kind": source.kind, "weight": source.weight}
        if source.kind == "prepared":
            manifest = shards.read_manifest(source.path)
            row |= {
                "documents": sum(manifest["documents"].values()),
                "tokens": sum(manifest["tokens"].values()),
                "dtype": manifest["dtype"],
                "format": format_of(manifest),
                "vocab_size": manifest["vocab_size"],
                "tokenizer_sha256": manifest["tokenizer_sha256"],
                "splits": {
                    s: {"documents": manifest["documents"][s], "tokens": manifest["tokens"][s]}
                    for s in manifest["documents"]
                },
            }
        else:
            dataset = indexed.IndexedDataset(source.path)
            info_path = pathlib.Path(f"{source.path}.jaxlm.json")
            info = json.loads(info_path.read_text()) if info_path.is_file() else {}
            row |= {
                "documents": dataset.num_documents,
                "sequences": len(dataset),
                "tokens": dataset.num_tokens,
                "dtype": dataset.dtype.name,
                "max_token": max_token(dataset, cache_dir(source, data)),
                "tokenizer_sha256": info.get(
                    "tokenizer_sha256",
                    "not recorded (a Megatron index does not name its tokenizer)",
                ),
                "splits": {},
            }
            for split in megatron_order.SPLITS:
                first, last = megatron_order.split_range(len(dataset), data.split, split)
                lengths = dataset.sequence_lengths[first:last]
                row["splits"][split] = {
                    "documents": last - first,
                    "tokens": int(lengths.sum(dtype=np.int64)),
                }
        rows.append(row)
    return rows
