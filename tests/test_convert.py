"""Hugging Face interop: logits equal transformers' to 1e-4 both ways (float32, random weights,
tiny Llama and GPT-2 configs), checkpoints restore on any mesh, bad input exits with code 2.

transformers and torch are test-only; jaxlm itself reads and writes safetensors with NumPy.
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import evaluation, runs
from jaxlm import mesh as mesh_lib
from jaxlm import model as model_lib
from jaxlm.convert import from_hf, layouts, to_hf
from jaxlm.errors import UsageError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
pytestmark = pytest.mark.hf

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "8"}
TOLERANCE = 1e-4
VOCAB = 128

LLAMA3_SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

HF_CONFIGS = {
    "llama-gqa-theta1e4-untied": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        rope_theta=10000.0,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    ),
    "llama-mha-theta5e5-tied": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    ),
    "llama-biases-wide-heads": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        attention_bias=True,
        mlp_bias=True,
        max_position_embeddings=64,
    ),
    # Llama 3.1's rotary scaling with a short original context, so that each of its three
    # bands (kept, interpolated, stretched) holds some of the 8 frequencies
    "llama3.1-rope-scaling": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, **LLAMA3_SCALING},
    ),
    "gpt2-tied": lambda: transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "gpt2-untied": lambda: transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=8,
        n_positions=64,
        n_inner=96,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    ),
}

JAXLM_CONFIGS = {
    "llama-like (default model)": ["model.n_kv_heads=2"],
    "llama-like tied, theta 5e5": ["model.tie_embeddings=true", "model.rope_theta=500000"],
    "llama-like with biases": ["model.use_bias=true"],
    "llama-like with Llama 3.1 rotary scaling": [
        "model.rope_scaling.rope_type=llama3",
        *(f"model.rope_scaling.{key}={value}" for key, value in LLAMA3_SCALING.items()),
    ],
    "gpt2-like (gpt-124m shape)": [
        "model.mlp=gelu",
        "model.norm=layernorm",
        "model.positions=learned",
        "model.tie_embeddings=true",
        "model.use_bias=true",
        "model.n_kv_heads=8",
    ],
}


def hf_model(name: str, seed: int = 0):
    """A transformers model of a tiny config with every weight random (norms and biases too)."""
    torch.manual_seed(seed)
    cfg = HF_CONFIGS[name]()
    model_class = (
        transformers.LlamaForCausalLM
        if isinstance(cfg, transformers.LlamaConfig)
        else transformers.GPT2LMHeadModel
    )
    model = model_class(cfg).float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.normal_(0.0, 0.1 if p.ndim > 1 else 0.3)
            if n.endswith("norm.weight") or (".ln_" in n and n.endswith(".weight")):
                p.add_(1.0)
            if n.endswith("gate_proj.bias"):  # jaxlm's SwiGLU has no gate bias
                p.zero_()
    return model


def hf_logits(model_or_dir, tokens: np.ndarray) -> np.ndarray:
    model = model_or_dir
    if not isinstance(model, torch.nn.Module):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_or_dir, dtype=torch.float32
        ).eval()
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def jaxlm_logits(run_dir, tokens, mesh_spec="dp=-1", devices=None) -> np.ndarray:
    """The parity tool: `python -m jaxlm.eval --tokens --logits-out`, in-process (float32)."""
    run = runs.open_run(run_dir)
    cfg = config_lib.apply_overrides(run.cfg, ["model.compute_dtype=float32"])
    run = dataclasses.replace(run, cfg=cfg)
    return evaluation.logits(run, mesh_lib.make_mesh(mesh_spec, devices), tokens)


def random_params(cfg, seed=0):
    """Every parameter of a jaxlm model random, norms and biases too: N(0, 0.1^2), plus 1 for
    the norms' scales (NumPy: nothing to compile)."""
    rng = np.random.default_rng(seed)
    shapes = layouts.flat(model_lib.describe(cfg).shapes)
    return layouts.nested(
        {
            path: (rng.normal(0, 0.1, s.shape) + path.endswith("scale")).astype(np.float32)
            for path, s in shapes.items()
        }
    )


def random_tokens(batch=2, length=24, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length))


def max_diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_hf_to_jaxlm_and_back_gives_transformers_logits(tmp_path, name):
    model = hf_model(name)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    tokens = random_tokens()
    expected = hf_logits(model, tokens)

    from_hf.convert(tmp_path / "hf", tmp_path / "run")  # on fsdp=8
    got = jaxlm_logits(tmp_path / "run", tokens, "dp=2,tp=2", jax.devices()[:4])
    print(f"\n{name}: HF -> jaxlm max |logit diff| {max_diff(got, expected):.2e}")
    assert max_diff(got, expected) <= TOLERANCE

    to_hf.convert(tmp_path / "run", tmp_path / "hf-again")
    again = hf_logits(tmp_path / "hf-again", tokens)
    print(f"{name}: HF -> jaxlm -> HF max |logit diff| {max_diff(again, expected):.2e}")
    assert max_diff(again, expected) <= TOLERANCE


@pytest.mark.parametrize("name", list(JAXLM_CONFIGS))
def test_jaxlm_to_hf_gives_jaxlm_logits(tmp_path, tiny_cfg, name):
    """A jaxlm model with every parameter random (norms and biases too) -> transformers."""
    cfg = tiny_cfg(f"model.vocab_size={VOCAB}", *JAXLM_CONFIGS[name])
    mesh = mesh_lib.make_mesh("fsdp=4,tp=2")
    graphdef, params = model_lib.describe(cfg.model).graphdef, random_params(cfg.model)
    from_hf.write_run(tmp_path / "run", cfg, params, mesh)
    tokens = random_tokens()
    expected = np.asarray(jax.jit(model_lib.apply, static_argnums=0)(graphdef, params, tokens))

    to_hf.convert(tmp_path / "run", tmp_path / "hf")
    arch = json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"]
    got = hf_logits(tmp_path / "hf", tokens)
    print(f"\n{name} as {arch[0]}: jaxlm -> HF max |logit diff| {max_diff(got, expected):.2e}")
    assert max_diff(got, expected) <= TOLERANCE
    assert arch == [layouts.GPT2 if "gpt2" in name else layouts.LLAMA]


def test_converted_checkpoint_restores_on_any_mesh(tmp_path):
    model = hf_model("llama-gqa-theta1e4-untied", seed=3)
    model.save_pretrained(tmp_path / "hf")
    from_hf.convert(tmp_path / "hf", tmp_path / "run", "fsdp=4,tp=2")
    tokens = random_tokens(batch=4)
    one_device = jaxlm_logits(tmp_path / "run", tokens, "dp=1", jax.devices()[:1])
    for spec in ("fsdp=8", "dp=2,tp=2"):
        devices = jax.devices()[:4] if spec == "dp=2,tp=2" else None
        assert max_diff(jaxlm_logits(tmp_path / "run", tokens, spec, devices), one_device) < 1e-5
    assert max_diff(one_device, hf_logits(model, tokens)) <= TOLERANCE
    # neither direction writes over an existing model or run
    for convert, source in ((from_hf.convert, "hf"), (to_hf.convert, "run")):
        with pytest.raises(UsageError, match="exists and is not an empty directory"):
            convert(tmp_path / source, tmp_path / "hf")


@pytest.mark.slow
def test_a_converted_run_is_trained_from_not_resumed(tmp_path):
    """Resuming a converted run (parameters only) is refused with exit 2, nothing renamed;
    checkpoint.init_from trains from it."""
    from jaxlm import train

    hf_model("llama-gqa-theta1e4-untied", seed=4).save_pretrained(tmp_path / "hf")
    from_hf.convert(tmp_path / "hf", tmp_path / "run")
    args = [
        "--config",
        str(tmp_path / "run" / "config.yaml"),
        "--mesh",
        "dp=-1",
        "data.source=synthetic",
        "train.steps=2",
        "train.global_batch_size=8",
        "train.seq_len=16",
        "train.eval_every=0",
    ]
    assert train.main([*args, "--out", str(tmp_path / "run")]) == 2
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["0"]
    assert (
        train.main(
            [*args, "--out", str(tmp_path / "tuned"), f"checkpoint.init_from={tmp_path / 'run'}"]
        )
        == 0
    )


def test_sharded_files_both_ways(tmp_path):
    """Checkpoints of several safetensors files (and an index) are read and written."""
    model = hf_model("gpt2-tied", seed=4)
    model.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    from_hf.convert(tmp_path / "hf", tmp_path / "run")
    to_hf.convert(tmp_path / "run", tmp_path / "hf-again", shard_bytes=40_000)
    files = sorted(p.name for p in (tmp_path / "hf-again").glob("*.safetensors"))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "hf-again" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    tokens = random_tokens()
    assert max_diff(hf_logits(tmp_path / "hf-again", tokens), hf_logits(model, tokens)) < 1e-5


def test_gpt2_files_of_the_old_layout_convert(tmp_path):
    """Older GPT-2 checkpoints name the tensors without 'transformer.' and carry the causal
    mask as a tensor 'h.N.attn.bias'."""
    model = hf_model("gpt2-tied", seed=7)
    model.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    tensors = {
        name.removeprefix("transformer."): value
        for name, value in safetensors_numpy.load_file(path).items()
    }
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    safetensors_numpy.save_file(tensors, path, metadata={"format": "pt"})
    from_hf.convert(tmp_path / "hf", tmp_path / "run")
    tokens = random_tokens()
    assert max_diff(jaxlm_logits(tmp_path / "run", tokens), hf_logits(model, tokens)) <= TOLERANCE


def test_bfloat16_weights_are_read(tmp_path):
    hf_model("llama-mha-theta5e5-tied", seed=5).to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    from_hf.convert(tmp_path / "hf", tmp_path / "run")
    tokens = random_tokens()
    expected = hf_logits(tmp_path / "hf", tokens)  # the bf16 weights, computed in float32
    assert max_diff(jaxlm_logits(tmp_path / "run", tokens), expected) <= TOLERANCE
    to_hf.convert(tmp_path / "run", tmp_path / "hf-bf16", dtype="bfloat16")
    config = json.loads((tmp_path / "hf-bf16" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    assert max_diff(hf_logits(tmp_path / "hf-bf16", tokens), expected) <= TOLERANCE


def test_the_tokenizer_loads_in_transformers_and_encodes_as_sentencepiece(tmp_path, tiny_cfg):
    import sentencepiece as spm

    from jaxlm.data import corpus, tokenizer

    documents = list(corpus.stdlib_inputs().documents())[:120]
    model_file = tokenizer.train(documents, 512, tmp_path / "tokenizer.model")
    cfg = tiny_cfg()
    params = random_params(cfg.model)
    from_hf.write_run(tmp_path / "run", cfg, params, mesh_lib.make_mesh("dp=8"), [model_file])
    to_hf.convert(tmp_path / "run", tmp_path / "hf")

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    for document in documents[-5:]:
        text = document.text[:2000]
        assert hf_tokenizer.encode(text) == sp.encode(text)
        assert hf_tokenizer.decode(sp.encode(text)) == text
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (sp.bos_id(), sp.eos_id())

    # back into jaxlm: the tokenizer and its settings come along
    from_hf.convert(tmp_path / "hf", tmp_path / "run-again")
    assert (tmp_path / "run-again" / "tokenizer.model").read_bytes() == model_file.read_bytes()
    assert (tmp_path / "run-again" / "tokenizer_config.json").is_file()


def convert_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "jaxlm.convert", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )


@pytest.mark.slow
def test_command_line_round_trip_with_the_logits_tool(tmp_path):
    """The commands as a user runs them: from-hf, eval --tokens --logits-out, to-hf."""
    model = hf_model("gpt2-tied", seed=6)
    model.save_pretrained(tmp_path / "hf")
    result = convert_cli("from-hf", tmp_path / "hf", "--out", tmp_path / "run", "--mesh", "fsdp=8")
    assert result.returncode == 0, result.stderr
    assert "converted the GPT2LMHeadModel" in result.stdout
    tokens = random_tokens()
    np.save(tmp_path / "ids.npy", tokens)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxlm.eval",
            "--run",
            str(tmp_path / "run"),
            "--tokens",
            str(tmp_path / "ids.npy"),
            "--logits-out",
            str(tmp_path / "logits.npy"),
            "--mesh",
            "tp=2,dp=4",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    logits = np.load(tmp_path / "logits.npy")
    assert logits.dtype == np.float32 and logits.shape == (*tokens.shape, VOCAB)
    assert max_diff(logits, hf_logits(model, tokens)) <= TOLERANCE
    result = convert_cli("to-hf", tmp_path / "run", "--out", tmp_path / "hf-again")
    assert result.returncode == 0, result.stderr
    assert "no tokenizer written" in result.stdout
    assert max_diff(hf_logits(tmp_path / "hf-again", tokens), logits) <= TOLERANCE


def test_unsupported_architecture_and_missing_tensors_exit_2_naming_them(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(
        json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"})
    )
    result = convert_cli("from-hf", tmp_path / "bert", "--out", tmp_path / "run")
    assert result.returncode == 2
    assert (
        "holds a BertForMaskedLM; jaxlm converts LlamaForCausalLM and GPT2LMHeadModel"
        in result.stderr
    )

    hf_model("llama-gqa-theta1e4-untied").save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    tensors = safetensors_numpy.load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"], tensors["model.norm.weight"]
    safetensors_numpy.save_file(tensors, path, metadata={"format": "pt"})
    result = convert_cli("from-hf", tmp_path / "hf", "--out", tmp_path / "run")
    assert result.returncode == 2
    assert (
        "lacks tensors the config implies: model.layers.1.mlp.up_proj.weight, model.norm.weight"
    ) in result.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "change, sentence",
    [
        ({"architectures": None, "model_type": "mistral"}, "holds a mistral"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        (
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0}},
            "rotary scaling 'yarn' is not supported",
        ),
        (
            {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
            "rotary scaling 'llama3' lacks low_freq_factor, high_freq_factor, "
            "original_max_position_embeddings",
        ),
        ({"mlp_bias": True}, "attention_bias=False with mlp_bias=True has no jaxlm counterpart"),
        ({"num_hidden_layers": 3}, "lacks tensors the config implies: model.layers.2."),
        ({"intermediate_size": 48}, "has tensors of other shapes than its config implies"),
    ],
)
def test_other_hf_inputs_that_are_refused(tmp_path, change, sentence):
    hf_model("llama-gqa-theta1e4-untied").save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UsageError, match=sentence.replace("(", r"\(").replace(")", r"\)")):
        from_hf.convert(tmp_path / "hf", tmp_path / "run")


def test_unexpected_tensors_and_nonzero_gate_bias_are_refused(tmp_path):
    hf_model("llama-biases-wide-heads").save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    tensors = safetensors_numpy.load_file(path)
    tensors["model.layers.0.self_attn.q_norm.weight"] = np.ones(32, np.float32)
    tensors["model.layers.1.mlp.gate_proj.bias"] += 1.0
    safetensors_numpy.save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(UsageError, match="has no place for: model.layers.0.self_attn.q_norm"):
        from_hf.convert(tmp_path / "hf", tmp_path / "run")
    del tensors["model.layers.0.self_attn.q_norm.weight"]
    safetensors_numpy.save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(UsageError, match="gate_proj.bias is not zero"):
        from_hf.convert(tmp_path / "hf", tmp_path / "run")


def test_a_model_without_a_hf_counterpart_is_refused(tmp_path, tiny_cfg):
    cfg = tiny_cfg("model.norm=layernorm")  # with rotary positions: neither Llama nor GPT-2
    params = random_params(cfg.model)
    from_hf.write_run(tmp_path / "run", cfg, params, mesh_lib.make_mesh("dp=8"))
    with pytest.raises(UsageError, match="has no Hugging Face counterpart"):
        to_hf.convert(tmp_path / "run", tmp_path / "hf")
    with pytest.raises(UsageError, match="has no checkpoint of step 7; it has 0"):
        to_hf.convert(tmp_path / "run", tmp_path / "hf", step=7)
    with pytest.raises(UsageError, match="does not exist"):
        to_hf.convert(tmp_path / "nothing", tmp_path / "hf")
