"""`python -m jaxlm.eval`: the validation loss training logs, on any mesh, as a table and JSON;
logits for given token ids; one sentence and exit code 2 for bad input."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import evaluation, runs, training
from jaxlm import mesh as mesh_lib
from jaxlm import model as model_lib
from jaxlm.data import loader
from jaxlm.data.shards import PreparedSplit
from jaxlm.errors import UsageError

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "8"}
EVAL_BATCHES = 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny preset trained for 4 steps on the default corpus, validated at the end."""
    out = tmp_path_factory.mktemp("eval") / "run"
    cfg = config_lib.load(
        "tiny",
        [
            "model.compute_dtype=float32",
            "train.steps=4",
            "train.eval_every=4",
            f"train.eval_batches={EVAL_BATCHES}",
        ],
    )
    rows = training.run(cfg, mesh_lib.make_mesh("dp=8"), out)
    return out, [r for r in rows if "val_loss" in r][-1]


def eval_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "jaxlm.eval", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )


def test_the_loss_is_the_validation_loss_training_logged(trained, tmp_path):
    out, logged = trained
    result = eval_cli(
        "--run",
        out,
        "--batches",
        EVAL_BATCHES,
        "--mesh",
        "fsdp=2,tp=4",
        "--json",
        tmp_path / "eval.json",
    )
    assert result.returncode == 0, result.stderr
    *table, last = result.stdout.strip().splitlines()
    row = json.loads(last)
    assert row == json.loads((tmp_path / "eval.json").read_text())
    assert row["step"] == 4 and row["batches"] == EVAL_BATCHES
    assert row["tokens"] == EVAL_BATCHES * 16 * 32  # tiny: batches of 16 x 32 tokens
    assert row["loss"] == pytest.approx(logged["val_loss"], rel=1e-5)
    assert row["perplexity"] == pytest.approx(math.exp(row["loss"]))
    assert [line.split()[0] for line in table] == [
        "run",
        "data",
        "batches",
        "tokens",
        "loss",
        "perplexity",
    ]
    assert f"{row['loss']:.4f}" in table[4]


@pytest.mark.slow
def test_the_whole_split_by_default_and_another_data_directory(trained):
    out, _ = trained
    run = runs.open_run(out)
    (source,) = loader.resolve_source(run.cfg)
    directory = source.path
    first = evaluation.evaluate(run, mesh_lib.make_mesh("dp=8"), batches=1)
    assert first["tokens"] == 16 * 32
    big_batches = config_lib.apply_overrides(run.cfg, ["train.global_batch_size=256"])
    whole = evaluation.evaluate(
        dataclasses.replace(run, cfg=big_batches), mesh_lib.make_mesh("dp=8")
    )
    split = PreparedSplit(directory, "val")
    assert whole["batches"] == split.num_tokens // 33 // 256  # windows of 32 + 1 tokens
    assert whole["tokens"] == whole["batches"] * 256 * 32 and whole["loss"] != first["loss"]

    # --data: a prepared directory other than the run's own (the same corpus, copied)
    import shutil

    other = out.parent / "other-data"
    shutil.copytree(directory, other)
    result = eval_cli("--run", out, "--data", other, "--batches", 1)
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["data"] == str(other) and row["loss"] == pytest.approx(first["loss"], rel=1e-5)

    # ... but not one another tokenizer made: the loss of text cut into other tokens means nothing
    foreign = out.parent / "foreign-data"
    shutil.copytree(directory, foreign)
    manifest = json.loads((foreign / "manifest.json").read_text())
    manifest["tokenizer_sha256"] = "0" * 64
    (foreign / "manifest.json").write_text(json.dumps(manifest))
    result = eval_cli("--run", out, "--data", foreign, "--batches", 1)
    assert result.returncode == 2, result.stderr
    assert f"{foreign} was made with tokenizer 000000000000" in result.stderr


def test_a_circular_pipeline_checkpoint_is_read_as_one_stack_of_layers(tiny_cfg, tmp_path):
    """Under `train.pipeline_repeats=R` the layers are stored as [R, L / R, ...], the values of
    the plain [L, ...] stack reshaped; the tools read them back as that plain stack."""
    from jaxlm.convert import from_hf

    cfg = tiny_cfg(
        "model.n_layers=4", "train.pipeline_repeats=2", "train.pipeline_schedule=circular"
    )
    mesh = mesh_lib.make_mesh("dp=8")
    build = lambda stages: jax.jit(  # noqa: E731
        lambda key: model_lib.build(cfg.model, key, stages=stages)[1]
    )(jax.random.key(3))
    circular = build(model_lib.PipelineSpec(repeats=2))
    assert circular["layers"]["attn"]["q_proj"].shape[:2] == (2, 2)
    from_hf.write_run(tmp_path / "run", cfg, circular, mesh)
    run = runs.open_run(tmp_path / "run")
    assert run.repeats == 2 and run.cfg.train.pipeline_repeats == 1
    jax.tree.map(
        np.testing.assert_array_equal, runs.load_params(run, mesh), build(model_lib.PipelineSpec())
    )


def test_logits_out_are_the_float32_logits_of_the_tokens(trained, tmp_path):
    out, _ = trained
    tokens = np.random.default_rng(0).integers(0, 512, (3, 20))
    np.save(tmp_path / "ids.npy", tokens)
    result = eval_cli(
        "--run",
        out,
        "--tokens",
        tmp_path / "ids.npy",
        "--logits-out",
        tmp_path / "logits.npy",
        "--mesh",
        "dp=2,tp=4",
    )
    assert result.returncode == 0, result.stderr
    logits = np.load(tmp_path / "logits.npy")
    assert logits.dtype == np.float32 and logits.shape == (3, 20, 512)

    # the same numbers from the bare model on one device
    run = runs.open_run(out)
    mesh = mesh_lib.make_mesh("dp=1", jax.devices()[:1])
    graphdef = model_lib.describe(run.cfg.model).graphdef
    expected = jax.jit(model_lib.apply, static_argnums=0)(
        graphdef, runs.load_params(run, mesh), tokens
    )
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)
    # causal: a token's logits depend only on the tokens up to it
    short = evaluation.logits(run, mesh_lib.make_mesh("dp=8"), tokens[:, :7])
    np.testing.assert_allclose(short, logits[:, :7], atol=1e-5)


@pytest.mark.parametrize(
    "tokens, sentence",
    [
        (np.array([[1, 2, 512]]), "outside the model's vocabulary of 512"),
        (np.zeros((1, 257), np.int64), "longer than the model's context of 256"),
        (np.zeros((2, 2, 2), np.int64), "must hold integer ids of shape [batch, length]"),
        (np.zeros((1, 4), np.float32), "must hold integer ids of shape [batch, length]"),
    ],
)
def test_bad_tokens_are_refused(trained, tokens, sentence):
    out, _ = trained
    with pytest.raises(UsageError, match=sentence.replace("[", r"\[").replace("]", r"\]")):
        evaluation.logits(runs.open_run(out), mesh_lib.make_mesh("dp=8"), tokens)


def test_bad_input_exits_2(trained, tmp_path):
    out, _ = trained
    np.save(tmp_path / "ids.npy", np.array([[0, 9999]]))
    result = eval_cli(
        "--run", out, "--tokens", tmp_path / "ids.npy", "--logits-out", tmp_path / "out.npy"
    )
    assert result.returncode == 2 and "outside the model's vocabulary" in result.stderr
    with pytest.raises(UsageError, match="does not exist"):
        runs.open_run(tmp_path / "missing")
    with pytest.raises(UsageError, match="has no checkpoint of step 3; it has 4"):
        runs.open_run(out, step=3)
    with pytest.raises(UsageError, match="not divisible by the data-parallel size 3"):
        evaluation.evaluate(runs.open_run(out), mesh_lib.make_mesh("dp=3", jax.devices()[:3]))


@pytest.mark.hf
def test_a_trained_run_exports_to_transformers_with_the_same_logits(trained, tmp_path):
    """What `python -m jaxlm.train` writes (the whole train state) exports with its tokenizer."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxlm.convert import to_hf

    out, _ = trained
    to_hf.convert(out, tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    tokens = np.asarray([tokenizer.encode("import os\nfor name in os.listdir('.'):\n")])
    with torch.no_grad():
        expected = model(torch.tensor(tokens)).logits.numpy()
    got = evaluation.logits(runs.open_run(out), mesh_lib.make_mesh("dp=8"), tokens)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_a_run_without_prepared_data_needs_data(tiny_cfg, tmp_path):
    from jaxlm.convert import from_hf

    cfg = tiny_cfg()  # synthetic data
    shapes = model_lib.describe(cfg.model).shapes
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    from_hf.write_run(tmp_path / "run", cfg, params, mesh_lib.make_mesh("dp=8"))
    with pytest.raises(UsageError, match="has no prepared data to evaluate on: pass --data"):
        evaluation.evaluate(runs.open_run(tmp_path / "run"), mesh_lib.make_mesh("dp=8"))
    # nor any tokenizer to check --data against: its loss there would mean nothing
    from jaxlm import eval as eval_command

    with pytest.raises(UsageError, match="was trained on synthetic data, which no tokenizer"):
        eval_command.same_tokenizer(runs.open_run(tmp_path / "run"))
