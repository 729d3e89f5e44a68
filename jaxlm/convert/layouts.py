"""The two Hugging Face architectures jaxlm's model can be, and where each tensor goes.

    LlamaForCausalLM   RMSNorm, rotary positions, SwiGLU, grouped-query attention, tied or
                       untied head; with `model.use_bias` biases on q, k, v, o and the MLP
    GPT2LMHeadModel    LayerNorm with bias, learned positions, tanh-GeLU ("gelu_new"), biases
                       on every linear map, multi-head attention, tied (or untied) head

Tensor layouts:
- jaxlm stores a linear map as [in dims..., out dims...] with heads as axes of their own:
  q_proj [D, N, H], o_proj [N, H, D], up_proj [D, F]. torch.nn.Linear (Llama) stores [out, in];
  GPT-2's Conv1D stores [in, out].
- GPT-2 fuses q, k and v into c_attn [D, 3D] (bias [3D]), in that order along the output.
- Rotary positions: jaxlm rotates the two halves of each head against each other
  (`jaxlm.model.layers.apply_rotary`), which is Hugging Face's `rotate_half`, with the same
  frequencies theta^(-2i/H); so q and k convert without any permutation of their rows.
- Norm epsilons, the attention scale 1/sqrt(H) and the tanh form of GeLU are the same on both
  sides; Llama's default eps (1e-6 in transformers) is carried over as `model.norm_eps`.
"""

import dataclasses
import math

import jax

from jaxlm import config as config_lib
from jaxlm.config import ModelConfig
from jaxlm.errors import UsageError

LLAMA, GPT2 = "LlamaForCausalLM", "GPT2LMHeadModel"
ARCHITECTURES = (LLAMA, GPT2)
_MODEL_TYPES = {"llama": LLAMA, "gpt2": GPT2}
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # one function, three names
# the fields of Llama 3.1's rotary scaling, named alike in config.json and model.rope_scaling
_LLAMA3_SCALING = (
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
# Tensors some checkpoints carry that are not weights: rotary tables and GPT-2's causal mask.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One Hugging Face tensor (one per layer when `name` holds "{i}") and the jaxlm
    parameters it carries.

    Its [in, out] form is the jaxlm parameters' slices, each reshaped to
    [prod(shape[:split]), prod(shape[split:])] and joined along out (GPT-2's fused q, k, v);
    `split=None` for vectors, which are flattened and joined. `transpose`: stored as
    [out, in] (torch.nn.Linear). `zeros`: a vector of that size that jaxlm's model does not
    have and that must be zero (Llama's gate bias).
    """

    name: str
    params: tuple[str, ...]  # paths in the parameter tree, e.g. "layers/attn/q_proj"
    split: int | None = 1
    transpose: bool = False
    zeros: int = 0

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.name


# --- configs ----------------------------------------------------------------------------------


def architecture_of(hf: dict, where) -> str:
    """Which supported architecture a config.json describes, or a UsageError naming it."""
    names = hf.get("architectures") or []
    name = names[0] if names else _MODEL_TYPES.get(hf.get("model_type", ""), hf.get("model_type"))
    if name not in ARCHITECTURES:
        raise UsageError(
            f"{where} holds a {name or 'model of unknown architecture'}; jaxlm "
            f"converts {' and '.join(ARCHITECTURES)}"
        )
    return name


def run_config(hf: dict, where) -> tuple[str, config_lib.Config]:
    """(architecture, jaxlm config) of a Hugging Face config.json mapping: the model as
    Hugging Face describes it, training settings at their defaults (sequences no longer than
    the model's context)."""
    arch = architecture_of(hf, where)
    try:
        fields = _llama_fields(hf, where) if arch == LLAMA else _gpt2_fields(hf, where)
    except KeyError as e:
        raise UsageError(f"{where}/config.json has no {e.args[0]}") from None
    fields["compute_dtype"] = _DTYPES.get(hf.get("dtype") or hf.get("torch_dtype"), "bfloat16")
    seq_len = min(config_lib.TrainConfig.seq_len, fields["max_seq_len"])
    cfg = config_lib.merge(
        config_lib.Config(),
        {"model": fields, "train": {"seq_len": seq_len}},
        source=f"{where}/config.json",
    )
    return arch, config_lib.validate(cfg)


def _llama_fields(hf: dict, where) -> dict:
    heads, d_model = hf["num_attention_heads"], hf["hidden_size"]
    kv_heads = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or d_model // heads
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise UsageError(
            f"{where}: hidden_act '{hf['hidden_act']}' is not supported; jaxlm's "
            f"Llama MLP is SwiGLU (silu)"
        )
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise UsageError(
            f"{where}: rotary scaling '{rope_type}' is not supported; jaxlm's rotary "
            f"positions are unscaled or scaled as Llama 3.1's (rope_type llama3)"
        )
    scaling = {"rope_type": rope_type}
    if rope_type == "llama3":
        missing = [key for key in _LLAMA3_SCALING if key not in rope]
        if missing:
            raise UsageError(f"{where}: rotary scaling 'llama3' lacks {', '.join(missing)}")
        scaling |= {key: rope[key] for key in _LLAMA3_SCALING}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    if bool(hf.get("attention_bias")) != bool(hf.get("mlp_bias")):
        raise UsageError(
            f"{where}: attention_bias={hf.get('attention_bias')} with "
            f"mlp_bias={hf.get('mlp_bias')} has no jaxlm counterpart "
            f"(model.use_bias puts biases on both)"
        )
    return {
        "vocab_size": hf["vocab_size"],
        "d_model": d_model,
        "n_layers": hf["num_hidden_layers"],
        "n_heads": heads,
        "n_kv_heads": None if kv_heads == heads else kv_heads,
        "head_dim": None if head_dim * heads == d_model else head_dim,
        "d_ff": hf["intermediate_size"],
        "mlp": "swiglu",
        "norm": "rmsnorm",
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "positions": "rope",
        "rope_theta": theta,
        "rope_scaling": scaling,
        "max_seq_len": hf.get("max_position_embeddings", 2048),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "use_bias": bool(hf.get("attention_bias")),
        "init_std": hf.get("initializer_range", 0.02),
    }


def _gpt2_fields(hf: dict, where) -> dict:
    if hf.get("activation_function", "gelu_new") not in _TANH_GELUS:
        raise UsageError(
            f"{where}: activation_function '{hf['activation_function']}' is not "
            f"supported; jaxlm's GeLU is the tanh form (gelu_new)"
        )
    for key, wanted in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False),
    ):
        if bool(hf.get(key, wanted)) != wanted:
            raise UsageError(f"{where}: {key}={hf[key]} is not supported (jaxlm: {wanted})")
    d_model = hf["n_embd"]
    return {
        "vocab_size": hf["vocab_size"],
        "d_model": d_model,
        "n_layers": hf["n_layer"],
        "n_heads": hf["n_head"],
        "d_ff": hf.get("n_inner") or 4 * d_model,
        "mlp": "gelu",
        "norm": "layernorm",
        "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
        "positions": "learned",
        "max_seq_len": hf.get("n_positions", 1024),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
        "use_bias": True,
        "init_std": hf.get("initializer_range", 0.02),
    }


def architecture_for(cfg: ModelConfig) -> str:
    """The Hugging Face architecture that computes what `cfg` computes, or a UsageError."""
    if cfg.norm == "rmsnorm" and cfg.positions == "rope" and cfg.mlp == "swiglu":
        return LLAMA
    if (
        cfg.norm == "layernorm"
        and cfg.positions == "learned"
        and cfg.mlp == "gelu"
        and cfg.use_bias
        and cfg.kv_heads == cfg.n_heads
        and cfg.n_heads * cfg.dim_per_head == cfg.d_model
    ):
        return GPT2
    raise UsageError(
        f"this model (norm={cfg.norm}, positions={cfg.positions}, mlp={cfg.mlp}, "
        f"use_bias={cfg.use_bias}, {cfg.kv_heads}/{cfg.n_heads} kv heads) has no Hugging Face "
        f"counterpart: LlamaForCausalLM needs rmsnorm, rope and swiglu; GPT2LMHeadModel needs "
        f"layernorm, learned positions, gelu, biases, and as many kv heads as heads of "
        f"d_model/n_heads dimensions"
    )


def hf_config(cfg: ModelConfig, arch: str, *, dtype: str, bos: int | None, eos: int | None) -> dict:
    """The config.json of `cfg` as `arch` (transformers 4 and 5 both read it)."""
    common = {
        "architectures": [arch],
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if arch == LLAMA:
        rope = {"rope_type": cfg.rope_scaling.rope_type}
        if rope["rope_type"] == "llama3":
            rope |= {key: getattr(cfg.rope_scaling, key) for key in _LLAMA3_SCALING}
        return {
            **common,
            "model_type": "llama",
            "hidden_size": cfg.d_model,
            "intermediate_size": cfg.d_ff,
            "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.dim_per_head,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": cfg.norm_eps,
            # transformers 4 reads rope_theta and rope_scaling, 5 reads rope_parameters
            "rope_theta": cfg.rope_theta,
            "rope_scaling": rope if rope["rope_type"] != "default" else None,
            "rope_parameters": {**rope, "rope_theta": cfg.rope_theta},
            "attention_bias": cfg.use_bias,
            "mlp_bias": cfg.use_bias,
            "attention_dropout": 0.0,
            "pretraining_tp": 1,
        }
    return {
        **common,
        "model_type": "gpt2",
        "n_positions": cfg.max_seq_len,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.d_ff,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
    }


# --- tensors ----------------------------------------------------------------------------------


def tensors(arch: str, cfg: ModelConfig) -> list[Tensor]:
    """Every tensor of the Hugging Face checkpoint of `cfg`, in file order."""
    return _llama_tensors(cfg) if arch == LLAMA else _gpt2_tensors(cfg)


def _llama_tensors(cfg: ModelConfig) -> list[Tensor]:
    layer = "model.layers.{i}."
    out = [Tensor("model.embed_tokens.weight", ("embedding",))]
    for name in ("q", "k", "v", "o"):
        out.append(
            Tensor(
                f"{layer}self_attn.{name}_proj.weight",
                (f"layers/attn/{name}_proj",),
                split=2 if name == "o" else 1,
                transpose=True,
            )
        )
        if cfg.use_bias:
            out.append(
                Tensor(
                    f"{layer}self_attn.{name}_proj.bias", (f"layers/attn/{name}_bias",), split=None
                )
            )
    for name in ("gate", "up", "down"):
        out.append(
            Tensor(f"{layer}mlp.{name}_proj.weight", (f"layers/mlp/{name}_proj",), transpose=True)
        )
    if cfg.use_bias:
        out += [
            Tensor(f"{layer}mlp.gate_proj.bias", (), split=None, zeros=cfg.d_ff),
            Tensor(f"{layer}mlp.up_proj.bias", ("layers/mlp/up_bias",), split=None),
            Tensor(f"{layer}mlp.down_proj.bias", ("layers/mlp/down_bias",), split=None),
        ]
    out += [
        Tensor(f"{layer}input_layernorm.weight", ("layers/attn_norm/scale",), split=None),
        Tensor(f"{layer}post_attention_layernorm.weight", ("layers/mlp_norm/scale",), split=None),
        Tensor("model.norm.weight", ("final_norm/scale",), split=None),
    ]
    if not cfg.tie_embeddings:
        out.append(Tensor("lm_head.weight", ("lm_head",), transpose=True))
    return out


def _gpt2_tensors(cfg: ModelConfig) -> list[Tensor]:
    layer = "transformer.h.{i}."
    out = [
        Tensor("transformer.wte.weight", ("embedding",)),
        Tensor("transformer.wpe.weight", ("position_embedding",)),
    ]
    for hf, jaxlm in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
        out += [
            Tensor(f"{layer}{hf}.weight", (f"layers/{jaxlm}/scale",), split=None),
            Tensor(f"{layer}{hf}.bias", (f"layers/{jaxlm}/bias",), split=None),
        ]
    out += [
        Tensor(
            f"{layer}attn.c_attn.weight",
            ("layers/attn/q_proj", "layers/attn/k_proj", "layers/attn/v_proj"),
        ),
        Tensor(
            f"{layer}attn.c_attn.bias",
            ("layers/attn/q_bias", "layers/attn/k_bias", "layers/attn/v_bias"),
            split=None,
        ),
        Tensor(f"{layer}attn.c_proj.weight", ("layers/attn/o_proj",), split=2),
        Tensor(f"{layer}attn.c_proj.bias", ("layers/attn/o_bias",), split=None),
        Tensor(f"{layer}mlp.c_fc.weight", ("layers/mlp/up_proj",)),
        Tensor(f"{layer}mlp.c_fc.bias", ("layers/mlp/up_bias",), split=None),
        Tensor(f"{layer}mlp.c_proj.weight", ("layers/mlp/down_proj",)),
        Tensor(f"{layer}mlp.c_proj.bias", ("layers/mlp/down_bias",), split=None),
        Tensor("transformer.ln_f.weight", ("final_norm/scale",), split=None),
        Tensor("transformer.ln_f.bias", ("final_norm/bias",), split=None),
    ]
    if not cfg.tie_embeddings:
        out.append(Tensor("lm_head.weight", ("lm_head",), transpose=True))
    return out


def check_new_directory(out) -> None:
    """Conversions write into a new or empty directory, never over another model or run."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(
            f"--out {out} exists and is not an empty directory: convert into a new one"
        )


def flat(tree) -> dict:
    """{"layers/attn/q_proj": leaf, ...}: a parameter tree by path (as checkpoint metadata names
    them)."""
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def nested(flat_tree: dict) -> dict:
    """The inverse of `flat`."""
    tree: dict = {}
    for path, leaf in flat_tree.items():
        *parents, name = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = leaf
    return tree


def slice_shape(shape: tuple[int, ...], per_layer: bool) -> tuple[int, ...]:
    """One layer's slice of a stacked [L, ...] parameter, or the parameter itself."""
    return tuple(shape[1:]) if per_layer else tuple(shape)


def piece_width(shape: tuple[int, ...], split: int | None) -> int:
    """How much of the joined (out) axis a parameter slice of `shape` takes."""
    return math.prod(shape) if split is None else math.prod(shape[split:])


def hf_shape(tensor: Tensor, slice_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The shape Hugging Face stores `tensor` in, from its parameters' slice shapes."""
    if tensor.zeros:
        return (tensor.zeros,)
    width = sum(piece_width(s, tensor.split) for s in slice_shapes)
    if tensor.split is None:
        return (width,)
    rows = math.prod(slice_shapes[0][: tensor.split])
    return (width, rows) if tensor.transpose else (rows, width)
