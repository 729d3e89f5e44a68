"""Documents from the inputs a user names: text files, directories, globs and JSONL files.

One text file is one document; a JSONL file holds one document per line (the `text` field, or
another given with --jsonl-field). Directories are read recursively in sorted order, so the
document order, and everything derived from it, is the same on every machine. Files that look
binary (a NUL byte in their first 8 KiB) are skipped and counted. Bytes that are not UTF-8 are
replaced by U+FFFD and counted, never fatal.

The default corpus is the source of the running interpreter's standard library: about 1,800
Python files and 31 MB of real code on every machine, with nothing to download.
"""

import dataclasses
import glob
import json
import pathlib
import sysconfig
from collections.abc import Iterator, Sequence

from jaxlm.errors import UsageError

_REPLACEMENT = "\ufffd"
_SNIFF_BYTES = 8192


@dataclasses.dataclass(frozen=True)
class Document:
    key: str  # where it came from: a path, or path:line for JSONL
    text: str
    replaced: int  # characters that were not valid UTF-8 and became U+FFFD


@dataclasses.dataclass
class Inputs:
    """The files behind a list of user inputs, and what reading them skipped."""

    files: list[pathlib.Path]
    jsonl_field: str = "text"
    skipped_binary: int = 0
    bytes_read: int = 0  # progress of `documents()` through the files

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def documents(self) -> Iterator[Document]:
        self.skipped_binary = self.bytes_read = 0
        for path in self.files:
            if path.suffix == ".jsonl":
                for document, size in _jsonl_documents(path, self.jsonl_field):
                    self.bytes_read += size
                    if document:
                        yield document
                continue
            raw = path.read_bytes()
            self.bytes_read += len(raw)
            if b"\0" in raw[:_SNIFF_BYTES]:
                self.skipped_binary += 1
                continue
            document = _decode(str(path), raw)
            if document.text:
                yield document


def resolve_inputs(inputs: Sequence[str], jsonl_field: str = "text") -> Inputs:
    """Every input becomes its files; an input that names nothing is a UsageError."""
    if not inputs:
        raise UsageError("no --input given: name text files, directories, globs or JSONL files")
    files: list[pathlib.Path] = []
    for item in inputs:
        path = pathlib.Path(item)
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p, path))
        elif glob.has_magic(item):
            found = sorted(
                pathlib.Path(p)
                for p in glob.glob(item, recursive=True)
                if pathlib.Path(p).is_file()
            )
        else:
            raise UsageError(f"input '{item}' does not exist")
        if not found:
            raise UsageError(f"input '{item}' contains no files")
        files += found
    empty = [f for f in files if f.stat().st_size == 0]
    if len(empty) == len(files):
        raise UsageError(f"the input files are all empty: {', '.join(map(str, inputs))}")
    return Inputs(files, jsonl_field)


def stdlib_inputs() -> Inputs:
    """The standard library's .py files (site-packages excluded), in sorted order."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.parts)
    )
    return Inputs(files)


def _hidden(path: pathlib.Path, root: pathlib.Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _decode(key: str, raw: bytes) -> Document:
    text = raw.decode("utf-8", errors="replace")
    replaced = text.count(_REPLACEMENT) - raw.count(_REPLACEMENT.encode())
    return Document(key, text, replaced)


def _jsonl_documents(path: pathlib.Path, field: str) -> Iterator[tuple[Document, int]]:
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                yield None, len(line)
                continue
            line_doc = _decode(f"{path}:{number}", line)
            try:
                record = json.loads(line_doc.text)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{number} is not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or field not in record:
                raise UsageError(f"{path}:{number} has no field '{field}' (see --jsonl-field)")
            value = record[field]  # a string, or structured data (chat messages) kept as JSON
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            yield (Document(line_doc.key, text, line_doc.replaced) if text else None), len(line)
