"""Tokenizer and prepared shards: exact round trips, resumable preparation, refused bad input."""

import json
import os
import pathlib
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

from jaxlm.data import corpus, prepare, shards, tokenizer
from jaxlm.errors import UsageError

STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def data_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "jaxlm.data", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """A small corpus: some stdlib modules, a file with tabs and non-ASCII, one with bad bytes."""
    root = tmp_path_factory.mktemp("corpus")
    for path in sorted((STDLIB / "json").glob("*.py")) + sorted((STDLIB / "email").glob("*.py")):
        (root / f"{path.parent.name}_{path.name}").write_bytes(path.read_bytes())
    (root / "mixed.txt").write_text("def f():\n\treturn 'grüße, 東京' \\\n  + '  '\n\n\n")
    (root / "bad_bytes.txt").write_bytes(b"valid line\n\xff\xfe broken \xc3\x28 bytes\n")
    (root / "binary.dat").write_bytes(b"\x00\x01\x02" * 100)
    return root


@pytest.fixture(scope="module")
def model_file(texts, tmp_path_factory):
    return tokenizer.train(
        corpus.resolve_inputs([str(texts)]).documents(),
        512,
        tmp_path_factory.mktemp("tok") / "tok.model",
    )


@pytest.fixture(scope="module")
def prepared(texts, model_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    manifest = prepare.prepare(
        corpus.resolve_inputs([str(texts)]),
        model_file,
        out,
        val_fraction=0.2,
        shard_tokens=20_000,
        workers=2,
    )
    return out, manifest


def test_tokenizer_round_trips_code_exactly(texts, model_file):
    sp = tokenizer.load(model_file)
    assert sp.vocab_size() == 512
    for document in corpus.resolve_inputs([str(texts)]).documents():
        assert sp.decode(sp.encode(document.text)) == document.text, document.key


def test_prepared_shards_hold_every_document_and_its_eos(texts, model_file, prepared):
    out, manifest = prepared
    sp = tokenizer.load(model_file)
    documents = list(corpus.resolve_inputs([str(texts)]).documents())
    assert manifest["documents"]["train"] + manifest["documents"]["val"] == len(documents)
    assert len(manifest["shards"]["train"]) >= 2  # small shards: several of them
    assert manifest["dtype"] == "uint16" and manifest["skipped_binary_files"] == 1
    assert manifest["replaced_characters"] == 3  # \xff, \xfe and the broken \xc3 sequence
    train, val = (shards.PreparedSplit(out, split) for split in ("train", "val"))
    assert manifest["tokens"]["train"] == train.num_tokens
    assert len(val) == len(documents) // 5  # every 5th document is held out
    ordered = [d for i, d in enumerate(documents) if i % 5 != 4]
    for k, document in enumerate(ordered):
        ids = train.read(k, 0, train.doc_length[k])
        assert ids[-1] == sp.eos_id()
        assert sp.decode(ids[:-1].tolist()) == document.text


def test_token_dtype_grows_with_the_vocabulary():
    assert prepare.token_dtype(65536) == np.uint16
    assert prepare.token_dtype(128256) == np.uint32


def test_an_interrupted_prepare_resumes_after_its_last_committed_shard(
    texts, model_file, prepared, tmp_path, monkeypatch
):
    inputs = corpus.resolve_inputs([str(texts)])
    original_flush = prepare._ShardWriter.flush
    flushes = []

    def failing_flush(self):
        if len(flushes) == 2:
            raise KeyboardInterrupt  # the job is killed after two shards are committed
        flushes.append(self.split)
        original_flush(self)

    monkeypatch.setattr(prepare._ShardWriter, "flush", failing_flush)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(
            inputs, model_file, tmp_path, val_fraction=0.2, shard_tokens=20_000, workers=1
        )
    assert not (tmp_path / "manifest.json").exists()
    committed = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.bin")}
    assert len(committed) == 2

    monkeypatch.setattr(prepare._ShardWriter, "flush", original_flush)
    manifest = prepare.prepare(
        inputs, model_file, tmp_path, val_fraction=0.2, shard_tokens=20_000, workers=1
    )
    for name, mtime in committed.items():  # finished shards were not written again
        assert (tmp_path / name).stat().st_mtime_ns == mtime
    reference, expected = prepared
    assert manifest["shards"] == expected["shards"] and manifest["tokens"] == expected["tokens"]
    for name in manifest["shards"]["train"] + manifest["shards"]["val"]:
        assert (tmp_path / f"{name}.bin").read_bytes() == (reference / f"{name}.bin").read_bytes()


def test_jsonl_documents_come_from_the_named_field(tmp_path, model_file):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"document {i}\n", "id": i}) for i in range(4)))
    inputs = corpus.resolve_inputs([str(path)], jsonl_field="body")
    assert [d.text for d in inputs.documents()] == [f"document {i}\n" for i in range(4)]
    with pytest.raises(UsageError, match=r"docs.jsonl:1 has no field 'text'"):
        list(corpus.resolve_inputs([str(path)]).documents())


def test_globs_expand_to_sorted_files(texts):
    files = corpus.resolve_inputs([str(texts / "json_*.py")]).files
    assert files == sorted(files) and len(files) == len(list((STDLIB / "json").glob("*.py")))


@pytest.mark.parametrize(
    "make, args, sentence",
    [
        (lambda d: None, ["--input", "{d}/nowhere"], "input '{d}/nowhere' does not exist"),
        (
            lambda d: (d / "empty").mkdir(),
            ["--input", "{d}/empty"],
            "input '{d}/empty' contains no files",
        ),
        (
            lambda d: (d / "e.txt").write_text(""),
            ["--input", "{d}/e.txt"],
            "the input files are all empty",
        ),
    ],
)
def test_missing_or_empty_input_exits_2_naming_it(tmp_path, make, args, sentence):
    make(tmp_path)
    args = [a.format(d=tmp_path) for a in args]
    result = data_cli("tokenizer", *args, "--vocab-size", "512", "--out", str(tmp_path / "t.model"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert sentence.format(d=tmp_path) in result.stderr


def test_shards_of_another_tokenizer_are_refused_naming_both(texts, prepared, tmp_path):
    other = tokenizer.train(
        corpus.resolve_inputs([str(texts / "json_*.py")]).documents(), 400, tmp_path / "other.model"
    )
    out, manifest = prepared
    result = data_cli(
        "prepare",
        "--input",
        str(texts),
        "--tokenizer",
        str(other),
        "--out",
        str(out),
        "--val-fraction",
        "0.2",
    )
    assert result.returncode == 2
    assert manifest["tokenizer_sha256"][:12] in result.stderr
    assert tokenizer.fingerprint(other)[:12] in result.stderr


@pytest.mark.parametrize(
    "damage, sentence",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-10]), "is truncated or corrupt"),
        (
            lambda p: p.write_bytes(b"\x07\x00" + p.read_bytes()[2:]),
            "is corrupt: its CRC-32 does not match",
        ),
    ],
)
def test_a_damaged_shard_is_refused_naming_the_file(prepared, tmp_path, damage, sentence):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared[0], copy)
    shard = copy / "train-00001.bin"
    damage(shard)
    with pytest.raises(UsageError, match=f"shard {shard} {sentence}"):
        shards.PreparedSplit(copy, "train")


def test_training_refuses_shards_with_a_larger_vocabulary_naming_both(prepared, tmp_path):
    out, _ = prepared
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxlm.train",
            "--config",
            "tiny",
            "--out",
            str(tmp_path / "r"),
            f"data.source={out}",
            "model.vocab_size=384",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert result.returncode == 2
    assert "vocabulary of 512, larger than the model's model.vocab_size=384" in result.stderr
