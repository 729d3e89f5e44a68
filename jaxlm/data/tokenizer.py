"""SentencePiece tokenizers: BPE with byte fallback that round-trips code exactly.

Settings, and why:
- BPE with byte fallback: any byte sequence encodes (rare characters become byte pieces), so
  there is no unknown token in practice;
- identity normalisation, no whitespace folding, whitespace-only pieces allowed, and the newline
  as a piece of its own: indentation and line breaks survive, so decode(encode(code)) == code;
- digits split one by one (Llama's choice), which helps arithmetic and keeps numbers regular;
- a sample of at most `max_sentences` chunks, so corpora larger than memory train in bounded
  memory (SentencePiece samples the stream).
Ids 0, 1, 2 are <unk>, <s>, </s>; every document ends with </s> (EOS) in prepared shards.
"""

import hashlib
import io
import pathlib
from collections.abc import Iterable, Iterator

import sentencepiece as spm

from jaxlm.data.corpus import Document
from jaxlm.errors import UsageError

_CHUNK_CHARS = 4096  # SentencePiece's sentences are short; documents are cut at line ends
_SPECIAL_PIECES = 3 + 1 + 256  # unk, bos, eos, the newline, and 256 byte pieces


def train(
    documents: Iterable[Document],
    vocab_size: int,
    out: pathlib.Path,
    *,
    max_sentences: int = 2_000_000,
    threads: int = 2,
) -> pathlib.Path:
    """Train a tokenizer of exactly `vocab_size` pieces on `documents`; write it to `out`."""
    if vocab_size < _SPECIAL_PIECES + 64:
        raise UsageError(
            f"a vocabulary of {vocab_size} is too small for a byte-fallback tokenizer: "
            f"use at least {_SPECIAL_PIECES + 64}"
        )
    model = io.BytesIO()
    chunks = _Chunks(documents)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(chunks),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            user_defined_symbols=["\n"],
            character_coverage=0.995,
            max_sentence_length=4 * _CHUNK_CHARS,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            num_threads=threads,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise UsageError(
            f"SentencePiece could not train a {vocab_size}-piece tokenizer on "
            f"these inputs: {e}".replace("\n", " ")
        ) from None
    if chunks.count == 0:
        raise UsageError("the inputs hold no text to train a tokenizer on")
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    return out


def load(path: pathlib.Path) -> spm.SentencePieceProcessor:
    if not pathlib.Path(path).is_file():
        raise UsageError(f"tokenizer '{path}' does not exist")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError):
        raise UsageError(f"'{path}' is not a SentencePiece model") from None


def fingerprint(path: pathlib.Path) -> str:
    """sha256 of the model file: which tokenizer made a set of shards."""
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


class _Chunks:
    """Documents cut into SentencePiece-sized pieces at line ends (newlines kept)."""

    def __init__(self, documents: Iterable[Document]):
        self._documents, self.count = documents, 0

    def __iter__(self) -> Iterator[str]:
        for document in self._documents:
            chunk: list[str] = []
            size = 0
            for line in document.text.splitlines(keepends=True):
                chunk.append(line)
                size += len(line)
                if size >= _CHUNK_CHARS:
                    self.count += 1
                    yield "".join(chunk)[: 4 * _CHUNK_CHARS]
                    chunk, size = [], 0
            if chunk:
                self.count += 1
                yield "".join(chunk)[: 4 * _CHUNK_CHARS]
