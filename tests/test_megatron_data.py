"""Megatron-LM's own data code as the reference: jaxlm reads the indexed datasets that Megatron's
`IndexedDatasetBuilder` writes, Megatron reads the ones jaxlm writes, and with
`data.order=megatron` jaxlm's samples are the samples of Megatron's GPTDataset (through its
BlendedMegatronDatasetBuilder, for one dataset and for a blend), token for token.

megatron-core is a test-only dependency, installed by .ci/run (it imports torch; jaxlm never
does). The corpora are sized so that Megatron's "969,30,1" split leaves every split documents:
with an empty split Megatron's epoch count never ends.
"""

import numpy as np
import pytest

from jaxlm.data import indexed
from jaxlm.data.__main__ import main as data_main

pytestmark = pytest.mark.megatron
torch = pytest.importorskip("torch")
megatron_indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")

VOCAB = 1000
SAMPLES = 500


def write_with_megatron(prefix, documents, dtype):
    builder = megatron_indexed.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in documents:
        builder.add_document(torch.from_numpy(doc.astype(np.int64)), [len(doc)])
    builder.finalize(f"{prefix}.idx")


def random_documents(seed, count, longest=200):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, rng.integers(1, longest)) for _ in range(count)]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Two Megatron-written corpora: 3,000 documents in uint16 and 1,000 in int32 (the second
    small enough that 500 samples of 200 tokens take a second epoch)."""
    root = tmp_path_factory.mktemp("megatron")
    made = {}
    for name, seed, count, dtype in (("web", 0, 3000, np.uint16), ("code", 1, 1000, np.int32)):
        documents = random_documents(seed, count)
        write_with_megatron(root / name, documents, dtype)
        made[name] = (root / name, documents)
    return made


def test_jaxlm_reads_the_documents_megatron_wrote(corpora):
    for prefix, documents in corpora.values():
        ours = indexed.IndexedDataset(prefix)
        theirs = megatron_indexed.IndexedDataset(str(prefix))
        assert len(ours) == len(theirs) == len(documents)
        np.testing.assert_array_equal(ours.sequence_lengths, theirs.sequence_lengths)
        np.testing.assert_array_equal(ours.document_indices, theirs.document_indices)
        assert ours.dtype == theirs.index.dtype
        for i in (0, 1, len(documents) // 2, len(documents) - 1):
            np.testing.assert_array_equal(ours.read(i), documents[i])
            np.testing.assert_array_equal(ours.read(i), theirs[i])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64])
def test_megatron_reads_what_jaxlm_writes(tmp_path, dtype):
    documents = [d % np.iinfo(dtype).max for d in random_documents(2, 50)]
    indexed.write(tmp_path / "ours", documents, dtype)
    theirs = megatron_indexed.IndexedDataset(str(tmp_path / "ours"))
    assert len(theirs) == 50 and theirs.index.dtype == dtype
    np.testing.assert_array_equal(theirs.document_indices, np.arange(51))
    for i, doc in enumerate(documents):
        np.testing.assert_array_equal(theirs[i], doc)


class _MockTokenizer:
    """What GPTDataset asks of a tokenizer: a vocabulary size, EOD and pad ids."""

    vocab_size = VOCAB
    eod = 0
    pad = -1  # no token is padding: Megatron would zero it
    unique_identifiers = {"class": "MockTokenizer"}


def megatron_samples(prefixes, weights, *, seq_len, seed, count=SAMPLES):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_len,
        blend=([str(p) for p in prefixes], weights),
        split="969,30,1",
        tokenizer=_MockTokenizer(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        path_to_cache=None,  # indices in memory: no process group needed
    )
    train, _, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [count, 10, 10], lambda: True, config
    ).build()
    rows = []
    for i in range(count):
        sample = train[i]
        rows.append(np.concatenate([sample["tokens"].numpy(), sample["labels"][-1:].numpy()]))
    return np.stack(rows)


def jaxlm_samples(tmp_path, source, *, seq_len, seed, count=SAMPLES):
    out = tmp_path / f"samples-{seq_len}-{seed}.npy"
    argv = ["samples", "--source", source, "--seq-len", str(seq_len), "--seed", str(seed)]
    argv += ["--count", str(count), "--order", "megatron", "--cache-dir", str(tmp_path / "cache")]
    assert data_main([*argv, "--out", str(out)]) == 0
    return np.load(out)


@pytest.mark.parametrize("seq_len", [64, 200])
@pytest.mark.parametrize("seed", [1234, 7])
def test_megatron_order_is_gptdatasets_sample_for_sample(corpora, tmp_path, seq_len, seed):
    web, code = corpora["web"][0], corpora["code"][0]
    for name, prefixes, weights, source in (
        ("one dataset", [web], None, f"megatron:{web}"),
        ("one small dataset", [code], None, f"megatron:{code}"),
        ("a 0.7/0.3 blend", [web, code], [0.7, 0.3], f"0.7 megatron:{web} 0.3 {code}"),
    ):
        theirs = megatron_samples(prefixes, weights, seq_len=seq_len, seed=seed)
        ours = jaxlm_samples(tmp_path, source, seq_len=seq_len, seed=seed)
        assert ours.shape == theirs.shape == (SAMPLES, seq_len + 1), name
        mismatched = np.flatnonzero((ours != theirs).any(axis=1))
        assert mismatched.size == 0, f"{name}: samples {mismatched[:5]} differ"
