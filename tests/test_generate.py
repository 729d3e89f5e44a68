"""Generation with a key/value cache: equal to decoding by full recomputation, the same on every
tensor-parallel layout, sampling that keeps only what top-k and top-p allow, and the command."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import generation, runs
from jaxlm import mesh as mesh_lib
from jaxlm import model as model_lib
from jaxlm.convert import from_hf
from jaxlm.errors import UsageError
from jaxlm.generation import Sampling

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "8"}
CONTEXT = 48
GREEDY = Sampling(temperature=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny float32 model with large random weights (confident, tie-free predictions), and a
    SentencePiece tokenizer of its vocabulary, saved as a run directory."""
    from jaxlm import config as config_lib
    from jaxlm.data import corpus, tokenizer

    directory = tmp_path_factory.mktemp("generate")
    documents = list(corpus.stdlib_inputs().documents())[:100]
    model_file = tokenizer.train(documents, 512, directory / "tokenizer.model")
    cfg = config_lib.load(
        "tiny",
        ["model.compute_dtype=float32", "data.source=synthetic", f"model.max_seq_len={CONTEXT}"],
    )
    params = random_params(cfg.model)
    from_hf.write_run(directory / "run", cfg, params, mesh_lib.make_mesh("dp=8"), [model_file])
    return runs.open_run(directory / "run")


def random_params(cfg, seed=0, std=0.3):
    """Large random weights, norms (around 1) and biases included (NumPy: nothing to compile),
    for confident predictions without near ties."""
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        around = 1.0 if path[-1].key == "scale" else 0.0
        return (around + rng.normal(0, std, shape.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, model_lib.describe(cfg).shapes)


def on(spec: str, n_devices: int = 8):
    return mesh_lib.make_mesh(spec, jax.devices()[:n_devices])


def prompts(batch=2, length=9, seed=0):
    return np.random.default_rng(seed).integers(3, 512, (batch, length))


def greedy(run, mesh, prompt, n=12, **kwargs):
    params = runs.load_params(run, mesh)
    return generation.generate(
        run.cfg.model,
        params,
        mesh,
        prompt,
        max_new_tokens=n,
        sampling=kwargs.pop("sampling", GREEDY),
        **kwargs,
    )


@pytest.mark.parametrize(
    "overrides",
    [
        [],  # rotary, GQA, SwiGLU
        [
            "model.positions=learned",
            "model.norm=layernorm",
            "model.mlp=gelu",
            "model.use_bias=true",
            "model.tie_embeddings=true",
        ],  # GPT-2's shape
    ],
)
def test_prefill_then_one_token_steps_equal_the_full_forward_pass(tiny_cfg, overrides):
    cfg = tiny_cfg(*overrides).model
    graphdef, params = model_lib.describe(cfg).graphdef, random_params(cfg)
    tokens = jnp.asarray(prompts(length=14))
    full = jax.jit(lambda p, t: model_lib.apply(graphdef, p, t))(params, tokens)
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), model_lib.cache_shapes(cfg, 2, 16))
    decode = jax.jit(model_lib.decode, static_argnums=0)
    logits, cache = decode(graphdef, params, tokens[:, :8], cache, 0)
    steps = [logits]
    for t in range(8, 14):
        logits, cache = decode(graphdef, params, tokens[:, t : t + 1], cache, jnp.int32(t))
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5, rtol=0)


def test_greedy_generation_with_the_cache_equals_argmax_by_full_recomputation(run):
    mesh, n = on("dp=1", 1), 16
    prompt = prompts()
    tokens = greedy(run, mesh, prompt, n=n)
    graphdef = model_lib.describe(run.cfg.model).graphdef
    params = runs.load_params(run, mesh)
    # Recompute the whole sequence for every token, without a cache. Causal: the tokens
    # padded on behind the end cannot change the logits at the end, so one compiled length
    # serves every step.
    full = jax.jit(lambda p, t: model_lib.apply(graphdef, p, t))
    sequence = np.zeros((2, prompt.shape[1] + n), np.int32)
    sequence[:, : prompt.shape[1]] = prompt
    for i in range(n):
        end = prompt.shape[1] + i
        expected = np.asarray(jnp.argmax(full(params, sequence)[:, end - 1], axis=-1))
        np.testing.assert_array_equal(tokens[:, i], expected, err_msg=f"new token {i}")
        sequence[:, end] = expected
    assert tokens.shape == (2, n) and len(set(tokens.ravel().tolist())) > 4


@pytest.fixture(scope="module")
def one_device_tokens(run):
    """Greedy tokens on one device of one prompt and of a batch of two."""
    batches = (prompts(batch=1, seed=1), prompts(batch=2, seed=2))
    return [(prompt, greedy(run, on("dp=1", 1), prompt)) for prompt in batches]


@pytest.mark.parametrize("spec, n_devices", [("tp=2", 2), ("dp=2,tp=2", 4), ("fsdp=2,tp=4", 8)])
def test_tensor_parallel_decoding_gives_the_tokens_of_one_device(
    run, one_device_tokens, spec, n_devices
):
    """One prompt (replicated over the data-parallel devices) and a batch of two."""
    for prompt, expected in one_device_tokens:
        np.testing.assert_array_equal(greedy(run, on(spec, n_devices), prompt), expected)


def test_the_cache_lives_in_the_layout_of_the_sharding_table(run):
    """kv heads on tensor, batch on data x fsdp: each device holds its share of the cache."""
    from jaxlm import sharding

    mesh = on("dp=2,tp=4")
    names = sharding.named(mesh, model_lib.CACHE_AXES)
    cache = jax.jit(
        lambda: jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype), model_lib.cache_shapes(run.cfg.model, 2, 16)
        ),
        out_shardings=model_lib.LayerCache(names, names),
    )()
    shard_shape = cache.k.addressable_shards[0].data.shape
    assert cache.k.shape == (2, 2, 16, 4, 8) and shard_shape == (2, 1, 16, 1, 8)


def test_sampling_keeps_only_what_top_k_and_top_p_allow():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.log(jnp.asarray(np.tile(probs, (4000, 1)), jnp.float32))

    def draw(sampling, seed=0):
        tokens = jax.jit(generation.sample, static_argnums=2)(
            logits, jax.random.key(seed), sampling
        )
        return np.bincount(np.asarray(tokens), minlength=4) / len(tokens)

    np.testing.assert_allclose(draw(Sampling(temperature=1.0)), probs, atol=0.03)
    assert np.array_equal(draw(GREEDY), [1, 0, 0, 0])
    top2 = draw(Sampling(temperature=1.0, top_k=2))
    assert top2[2:].sum() == 0 and abs(top2[0] - 0.5 / 0.8) < 0.03
    # top-p keeps the most likely tokens until their probability reaches p
    assert draw(Sampling(temperature=1.0, top_p=0.7))[2:].sum() == 0
    top3 = draw(Sampling(temperature=1.0, top_p=0.9))
    assert top3[3] == 0 and top3[2] > 0.1
    assert np.array_equal(draw(Sampling(temperature=1.0, top_p=0.01)), [1, 0, 0, 0])
    # a low temperature sharpens, a high one flattens
    assert draw(Sampling(temperature=0.2))[0] > 0.88 and draw(Sampling(temperature=5.0))[0] < 0.35


def test_sampling_is_reproducible_by_seed(run):
    mesh, prompt = on("dp=1", 1), prompts(batch=1)
    hot = Sampling(temperature=1.5)
    a, b = (greedy(run, mesh, prompt, sampling=hot, seed=7) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, greedy(run, mesh, prompt, sampling=hot, seed=8))


def test_generation_stops_at_eos_and_at_the_end_of_the_context(run):
    mesh, prompt = on("dp=1", 1), prompts(batch=1)
    free = greedy(run, mesh, prompt, n=100)
    assert free.shape[1] == CONTEXT - prompt.shape[1]  # the context is full
    k = next(k for k in range(3, free.shape[1]) if free[0, k] not in free[0, :k])
    stopped = greedy(run, mesh, prompt, n=100, eos_id=int(free[0, k]))
    np.testing.assert_array_equal(stopped, free[:, : k + 1])  # the EOS itself, then nothing


def generate_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "jaxlm.generate", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )


def test_the_command_streams_the_greedy_text(run):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(run.directory / "tokenizer.model"))
    prompt = "def add(a, b):\n    return"
    result = generate_cli(
        "--run",
        run.directory,
        "--prompt",
        prompt,
        "--max-new-tokens",
        10,
        "--temperature",
        0,
        "--mesh",
        "tp=2,dp=4",
    )
    assert result.returncode == 0, result.stderr
    ids = sp.encode(prompt)
    new = greedy(run, on("dp=1", 1), [ids], n=10, eos_id=sp.eos_id())[0].tolist()
    new = new[: new.index(sp.eos_id())] if sp.eos_id() in new else new
    assert result.stdout == sp.decode(ids + new) + "\n"
    assert result.stdout.startswith(prompt)
    assert "tokens/s" in result.stderr  # the log goes to stderr, the text alone to stdout


def test_a_prompt_longer_than_the_context_exits_2(run):
    result = generate_cli("--run", run.directory, "--prompt", "x = 1\n" * 40)
    assert result.returncode == 2
    assert "longer than the model's context of 48 tokens" in result.stderr


@pytest.mark.parametrize(
    "sampling, sentence",
    [
        (Sampling(temperature=-1), "--temperature must be at least 0, not -1"),
        (Sampling(top_k=-2), "--top-k must be at least 0, not -2"),
        (Sampling(top_p=0), "--top-p must be in (0, 1], not 0"),
    ],
)
def test_bad_sampling_settings_are_refused(sampling, sentence):
    with pytest.raises(UsageError, match=re.escape(sentence)):
        sampling.check()


@pytest.mark.parametrize(
    "spec, sentence",
    [
        ("pp=2,dp=4", "leave pp out of --mesh"),
        ("tp=8", "model.n_kv_heads=4 is not divisible by tensor=8"),
    ],
)
def test_meshes_that_cannot_decode_are_refused(run, spec, sentence):
    with pytest.raises(UsageError, match=re.escape(sentence)):
        runs.check_mesh(run.cfg, on(spec))
