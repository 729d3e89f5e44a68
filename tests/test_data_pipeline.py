"""The grain pipeline over prepared shards: deterministic, split over processes, resumable, and
packed so that documents do not see each other."""

import pathlib
import sysconfig

import jax
import numpy as np
import pytest

from jaxlm import mesh as mesh_lib
from jaxlm import model as model_lib
from jaxlm.data import corpus, loader, prepare, tokenizer
from jaxlm.data.orders import PackedOrder
from jaxlm.data.pipeline import PackedBatches
from jaxlm.data.shards import PreparedSplit
from jaxlm.sharding import batch_sharding

STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    inputs = corpus.resolve_inputs([str(STDLIB / "json"), str(STDLIB / "email")])
    tok = tmp_path_factory.mktemp("tok") / "tok.model"
    tokenizer.train(inputs.documents(), 512, tok)
    out = tmp_path_factory.mktemp("data")
    prepare.prepare(inputs, tok, out, val_fraction=0.1, shard_tokens=30_000, workers=1)
    return out


def source(directory, seq_len=32, seed=0, **kw):
    order = PackedOrder(PreparedSplit(directory, "train"), seq_len=seq_len, seed=seed)
    return PackedBatches(order, **{"global_batch": 8, **kw})


def batches_per_epoch(src):
    return src.order.one_pass // src.global_batch


def test_same_seed_same_batches_other_seed_other_batches(directory):
    a, b, c = source(directory), source(directory), source(directory, seed=1)
    for i in (0, 5, batches_per_epoch(a) + 2):
        np.testing.assert_array_equal(a[i]["inputs"], b[i]["inputs"])
    assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])
    # a new epoch is a new shuffle
    assert not np.array_equal(a[0]["inputs"], a[batches_per_epoch(a)]["inputs"])


@pytest.mark.parametrize("n", [2, 4])
def test_processes_get_disjoint_rows_that_form_the_global_batch(directory, n):
    whole = source(directory)
    parts = [source(directory, process_index=i, process_count=n) for i in range(n)]
    for b in (0, 3):
        local = [p[b] for p in parts]
        for key in whole[b]:
            np.testing.assert_array_equal(np.concatenate([x[key] for x in local]), whole[b][key])
        rows = {tuple(r) for x in local for r in x["inputs"]}
        assert len(rows) == 8  # no row twice


def test_windows_are_the_shuffled_documents_end_to_end(directory):
    src = source(directory, seq_len=63)
    split = src.order.split
    order, _ = src.order._epoch(0)
    stream = np.concatenate([split.read(d, 0, split.doc_length[d]) for d in order])
    batch = src[1]
    window = 64
    expected = stream[8 * window : 16 * window].reshape(8, window)
    np.testing.assert_array_equal(batch["inputs"], expected[:, :-1])
    np.testing.assert_array_equal(batch["targets"], expected[:, 1:])
    # positions restart at every document start; segments count the pieces of each window
    starts = batch["positions"] == 0
    assert np.all(starts[:, 0])
    np.testing.assert_array_equal(np.cumsum(starts, axis=1), batch["segments"])


def test_resumed_iterator_continues_exactly(directory, tiny_cfg):
    cfg = tiny_cfg(f"data.source={directory}", "train.seq_len=32", "train.global_batch_size=8")
    sharding = batch_sharding(mesh_lib.make_mesh("dp=2,tp=4"))
    uninterrupted = loader.make_batches(cfg, sharding)
    expected = [next(uninterrupted) for _ in range(6)]
    first = loader.make_batches(cfg, sharding)
    for _ in range(3):
        next(first)
    state = first.get_state()
    resumed = loader.make_batches(cfg, sharding)
    resumed.set_state(state)
    for want in expected[3:]:
        got = next(resumed)
        assert got["inputs"].sharding == sharding
        for key in want:
            np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))


def test_a_document_has_the_same_logits_alone_and_packed_after_another(directory, tiny_cfg):
    cfg = tiny_cfg()
    graphdef, params = model_lib.build(cfg.model, jax.random.key(0))
    src = source(directory, seq_len=127)
    # a row in which a second document begins
    batch = next(b for b in (src[i] for i in range(50)) if b["segments"].max() >= 2)
    row = int(np.argmax(batch["segments"].max(axis=1) >= 2))
    segments, positions = batch["segments"][row], batch["positions"][row]
    start = int(np.argmax(segments == 2))  # where the second document begins
    end = start + int(np.sum(segments == 2))
    assert start > 0
    apply = jax.jit(lambda *inputs: model_lib.apply(graphdef, params, *inputs))
    packed = apply(batch["inputs"][row : row + 1], positions[None], segments[None])
    alone = apply(batch["inputs"][row : row + 1, start:end])
    np.testing.assert_allclose(packed[0, start:end], alone[0], rtol=1e-5, atol=1e-5)


def test_too_little_data_for_one_batch_is_refused(directory):
    from jaxlm.errors import UsageError

    with pytest.raises(UsageError, match="fewer than one global batch"):
        source(directory, seq_len=4096, global_batch=512)


def test_synthetic_validation_walks_the_training_chain_with_other_draws(tiny_cfg):
    """Validation loss can only follow training's toward ln 4 if both walk one chain."""
    from jaxlm.data import synthetic

    cfg = tiny_cfg()
    sharding = batch_sharding(mesh_lib.make_mesh("dp=8"))
    train = next(iter(loader.make_batches(cfg, sharding)))
    val = next(iter(loader.make_batches(cfg, sharding, split="val")))
    table = np.asarray(synthetic.successors(cfg.train.seed, cfg.model.vocab_size))
    for batch in (train, val):
        inputs, targets = np.asarray(batch["inputs"]), np.asarray(batch["targets"])
        allowed = (table[inputs] == targets[..., None]).any(-1)
        assert allowed.all()  # every step of every walk is a step of the training chain
    assert not np.array_equal(np.asarray(train["inputs"]), np.asarray(val["inputs"]))
