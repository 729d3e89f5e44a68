"""Blends of sources and Megatron prefixes as jaxlm data: the weights' proportions, the blend
text and its refusals, tokens and validation per source, and a blend that resumes exactly and
reads the same on any mesh."""

import json
import pathlib
import sysconfig

import numpy as np
import pytest

from conftest import tiny_config, train_rows
from jaxlm import mesh as mesh_lib
from jaxlm import training
from jaxlm.data import blend, corpus, indexed, loader, prepare, tokenizer
from jaxlm.data.__main__ import main as data_main
from jaxlm.errors import UsageError
from jaxlm.sharding import batch_sharding

STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A prepared directory (jaxlm's shards) and a Megatron prefix jaxlm wrote, same tokenizer."""
    root = tmp_path_factory.mktemp("blend")
    inputs = corpus.resolve_inputs([str(STDLIB / "json"), str(STDLIB / "email")])
    tok = tokenizer.train(inputs.documents(), 512, root / "tok.model")
    prepare.prepare(inputs, tok, root / "prepared", val_fraction=0.1, workers=1)
    prepare.prepare_megatron(inputs, tok, root / "mega" / "email_json", workers=1)
    return {"prepared": root / "prepared", "megatron": root / "mega" / "email_json", "tok": tok}


def blend_cfg(data, *overrides):
    source = f"0.7 megatron:{data['megatron']} 0.3 {data['prepared']}"
    return tiny_config(
        f"data.source={source}",
        f"data.cache_dir={data['prepared'].parent / 'cache'}",
        "data.split=90,10,0",
        *overrides,
    )


@pytest.mark.parametrize("weights", [[0.7, 0.3], [5, 3, 2], [0.01, 0.99], [1, 1, 1, 1]])
def test_a_blend_takes_its_sources_in_proportion(weights):
    schedule = blend.BlendSchedule(weights)
    source, index = schedule.lookup(np.arange(10_000))
    share = np.bincount(source, minlength=len(weights)) / 10_000
    np.testing.assert_allclose(share, np.asarray(weights) / sum(weights), atol=0.01)
    # each source's samples are taken in order, none twice
    for k in range(len(weights)):
        np.testing.assert_array_equal(index[source == k], np.arange(np.sum(source == k)))
    # a lookup far on, cold, agrees with the walk from the start
    far = blend.BlendSchedule(weights).lookup([9_999])
    assert (far[0][0], far[1][0]) == (source[-1], index[-1])
    np.testing.assert_array_equal(
        schedule.taken(10_000), np.bincount(source, minlength=len(weights))
    )


def test_the_blend_text_a_yaml_list_and_a_mapping_are_one_blend():
    text = "0.7 megatron:/data/web 0.3 /data/code"
    as_list = [
        {"source": "megatron:/data/web", "weight": 0.7},
        {"source": "/data/code", "weight": 0.3},
    ]
    assert blend.parse(blend.to_text(as_list)) == blend.parse(text)
    assert blend.parse(
        blend.to_text({"megatron:/data/web": 0.7, "/data/code": 0.3})
    ) == blend.parse(text)
    assert blend.parse("/data/code") == [blend.Component("/data/code", 1.0)]
    # in a YAML preset
    from jaxlm import config as config_lib

    cfg = config_lib.merge(config_lib.Config(), {"data": {"source": as_list}}, source="a preset")
    assert blend.parse(config_lib.validate(cfg).data.source) == blend.parse(text)


@pytest.mark.parametrize(
    "text, message",
    [
        ("-0.5 a 1 b", "positive"),
        ("nan a 1 b", "positive"),
        ("0 a 0 b", "positive"),
        ("1 a 2 a", "more than once"),
        ("0.5 a b", "pairs of weight and source"),
        ("x a 1 b", "not a weight"),
        ("1 synthetic 1 b", "cannot be part of a blend"),
    ],
)
def test_bad_blends_are_refused_with_one_sentence(text, message):
    with pytest.raises(UsageError, match=message):
        blend.parse(text)


def test_a_blend_resolves_with_names_and_feeds_both_sources(data):
    cfg = blend_cfg(data)
    sources = loader.resolve_source(cfg)
    assert [(s.kind, s.name) for s in sources] == [
        ("megatron", "email_json"),
        ("prepared", "prepared"),
    ]
    batches = loader.make_batches(cfg, batch_sharding(mesh_lib.make_mesh("dp=8")), sources=sources)
    for _ in range(10):
        next(batches)
    taken = batches.taken()
    total = 10 * cfg.train.global_batch_size * cfg.train.seq_len
    assert sum(taken.values()) == total
    assert abs(taken["email_json"] / total - 0.7) < 0.02


def test_a_blend_reads_the_same_batches_on_any_mesh_and_resumes_exactly(data):
    cfg = blend_cfg(data)
    one = loader.make_batches(cfg, batch_sharding(mesh_lib.make_mesh("dp=1", _first_device())))
    expected = [np.asarray(next(one)["inputs"]) for _ in range(6)]
    mesh = mesh_lib.make_mesh("dp=2,fsdp=2,tp=2")
    first = loader.make_batches(cfg, batch_sharding(mesh))
    for want in expected[:3]:
        np.testing.assert_array_equal(np.asarray(next(first)["inputs"]), want)
    resumed = loader.make_batches(cfg, batch_sharding(mesh))
    resumed.set_state(first.get_state())
    for want in expected[3:]:
        np.testing.assert_array_equal(np.asarray(next(resumed)["inputs"]), want)
    assert resumed.taken() == one.taken()


def _first_device():
    import jax

    return jax.devices()[:1]


@pytest.mark.slow
def test_training_on_a_blend_resumed_on_another_mesh_equals_uninterrupted(data, tmp_path):
    """One device for 4 steps straight; dp=2,fsdp=2,tp=2 stopped after 2 and resumed: the same
    losses, the same tokens per source, and a validation loss for each source."""
    settings = ["train.steps=4", "train.decay_steps=4", "train.eval_every=2"]
    settings += ["train.eval_batches=2"]
    settings += ["checkpoint.every=2"]  # the schedule is fixed: the first run stops at 2 of 4
    cfg = blend_cfg(data, *settings)
    straight = training.run(cfg, mesh_lib.make_mesh("dp=1", _first_device()), tmp_path / "a")
    mesh = mesh_lib.make_mesh("dp=2,fsdp=2,tp=2")
    half = training.run(blend_cfg(data, *settings, "train.steps=2"), mesh, tmp_path / "b")
    rest = training.run(cfg, mesh, tmp_path / "b")
    want, got = train_rows(straight), train_rows(half) + train_rows(rest)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-5)
    for key in ("tokens/email_json", "tokens/prepared"):
        assert [r[key] for r in got] == [r[key] for r in want]
    val = [r for r in straight if "val_loss" in r]
    assert val and all({"val_loss/email_json", "val_loss/prepared"} <= set(r) for r in val)
    written = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").open()]
    assert [r["tokens/prepared"] for r in written if "loss" in r] == [
        r["tokens/prepared"] for r in want
    ]


def test_prepare_megatron_inspect_and_samples_from_the_command_line(data, tmp_path, capsys):
    assert data_main(["inspect", f"megatron:{data['megatron']}"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    dataset = indexed.IndexedDataset(data["megatron"])
    assert row["kind"] == "megatron" and row["documents"] == dataset.num_documents
    assert row["tokens"] == dataset.num_tokens and row["dtype"] == "uint16"
    assert row["tokenizer_sha256"] == tokenizer.fingerprint(data["tok"])
    # the same documents as the prepared directory, train and val together, in input order
    assert data_main(["inspect", str(data["prepared"])]) == 0
    prepared = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert prepared["tokens"] == row["tokens"] and prepared["documents"] == row["documents"]

    out = tmp_path / "s.npy"
    argv = ["samples", "--source", f"megatron:{data['megatron']}", "--seq-len", "32", "--count"]
    assert data_main([*argv, "7", "--out", str(out)]) == 0
    samples = np.load(out)
    assert samples.shape == (7, 33) and samples.dtype == np.int32


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: pathlib.Path(f"{p}.bin").unlink(), "has no .*\\.bin"),
        (lambda p: pathlib.Path(f"{p}.idx").unlink(), "has no .*\\.idx|neither"),
        (lambda p: _patch(p, 0, b"NOTMAGIC!"), "not a Megatron index"),
        (lambda p: _patch(p, 9, (2).to_bytes(8, "little")), "version 2"),
        (lambda p: _patch(p, 17, bytes([9])), "unknown dtype code 9"),
        (lambda p: _truncate(f"{p}.bin"), "shorter than its index"),
    ],
)
def test_a_damaged_megatron_dataset_is_refused_before_compute(data, tmp_path, damage, message):
    import shutil

    prefix = tmp_path / "copy"
    for suffix in (".bin", ".idx"):
        shutil.copy(f"{data['megatron']}{suffix}", f"{prefix}{suffix}")
    damage(prefix)
    with pytest.raises(UsageError, match=message):
        loader.resolve_source(tiny_config(f"data.source=megatron:{prefix}"))


def _patch(prefix, offset, payload):
    with open(f"{prefix}.idx", "r+b") as f:
        f.seek(offset)
        f.write(payload)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(pathlib.Path(path).stat().st_size - 10)


def test_a_megatron_vocabulary_larger_than_the_model_is_refused(tmp_path):
    indexed.write(tmp_path / "big", [np.array([1, 2, 600])], np.uint16)
    with pytest.raises(UsageError, match="token id 600, outside the model's vocabulary"):
        loader.resolve_source(tiny_config(f"data.source=megatron:{tmp_path / 'big'}"))


def test_megatron_order_is_built_by_process_0_and_read_by_the_others(data, tmp_path):
    from jaxlm.data import sources
    from jaxlm.data.megatron_order import GPTOrder

    documents = sources.MegatronSplit(data["megatron"], "train", "90,10,0")
    kw = dict(seq_len=32, num_samples=100, seed=3, cache_dir=tmp_path)
    with pytest.raises(UsageError, match="process 0 did not write it"):
        GPTOrder(documents, build_here=False, **kw)  # nobody built it
    built = []  # process 0 builds while this process waits at the barrier
    other = GPTOrder(
        documents, build_here=False, wait=lambda: built.append(GPTOrder(documents, **kw)), **kw
    )
    assert len(built) == 1 and len(other) == len(built[0]) >= 100
    for i in (0, 1, 99):
        np.testing.assert_array_equal(
            np.concatenate(other.window(i)), np.concatenate(built[0].window(i))
        )
