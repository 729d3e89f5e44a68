"""Model arithmetic from the config: parameters by component and FLOPs per token.

Model FLOPs per token (what MFU counts, PaLM's and Megatron's definition):

    model_flops_per_token = 6 * N_matmul + 6 * n_layers * seq_len * n_heads * head_dim

- 6 * N_matmul: each weight of a matmul does a multiply-add per token in the forward pass (2)
  and two in the backward pass (4). N_matmul is every parameter that multiplies activations: the
  blocks' projections and the output head (the embedding table when tied); not the embedding
  lookup, the position table or the norms.
- causal attention: the score (Q K^T) and value (P V) matmuls cost 2 * 2 * T * N * H per token
  and layer forward, halved because a causal token attends to T/2 keys on average; x3 for the
  backward pass gives 6 * L * T * N * H.

Hardware FLOPs also count what activation recomputation runs again: `full` reruns each layer's
forward (+2 * N_layers + 2 * L * T * N * H), `save_dots` keeps the weight matmuls and reruns the
attention matmuls (+2 * L * T * N * H); the 1F1B pipeline schedule reruns the layers' forward
once more. MFU uses model FLOPs only, so recomputation lowers it.

    MFU = model_flops_per_token * tokens/s / (devices * peak FLOP/s per device)
"""

import math

import jax

from jaxlm.config import ModelConfig

_SECONDS_PER_DAY = 86400.0


def params_by_component(shapes) -> dict[str, int]:
    """Parameter counts of embedding, positions, attention, mlp, norms and head (and total)."""
    counts = dict.fromkeys(("embedding", "positions", "attention", "mlp", "norms", "head"), 0)
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        names = [getattr(k, "key", str(k)) for k in path]
        n = math.prod(leaf.shape)
        if names[0] == "embedding":
            counts["embedding"] += n
        elif names[0] == "position_embedding":
            counts["positions"] += n
        elif names[0] == "lm_head":
            counts["head"] += n
        elif "attn" in names:
            counts["attention"] += n
        elif "mlp" in names:
            counts["mlp"] += n
        else:  # attn_norm, mlp_norm, final_norm
            counts["norms"] += n
    counts["total"] = sum(counts.values())
    return counts


def matmul_params(cfg: ModelConfig, counts: dict[str, int]) -> int:
    """Parameters that multiply activations once per token (see the module docstring)."""
    head = counts["embedding"] if cfg.tie_embeddings else counts["head"]
    return counts["attention"] + counts["mlp"] + head


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the causal score and value matmuls, all layers."""
    return 2 * cfg.n_layers * seq_len * cfg.n_heads * cfg.dim_per_head


def model_flops_per_token(cfg: ModelConfig, seq_len: int, counts: dict[str, int]) -> float:
    return 6 * matmul_params(cfg, counts) + 3 * attention_flops_per_token(cfg, seq_len)


def model_flops_per_token_of(cfg, shapes) -> float:
    """Model FLOPs per token of a run config (`jaxlm.config.Config`) whose parameters have
    `shapes`, at its training sequence length."""
    return model_flops_per_token(cfg.model, cfg.train.seq_len, params_by_component(shapes))


def hardware_flops_per_token(
    cfg: ModelConfig, seq_len: int, counts: dict[str, int], schedule: str = "gpipe"
) -> float:
    """Model FLOPs plus the forward work that runs again: the core attention always (its
    scores are recomputed in the backward pass, by a flash kernel or jaxlm/model/layers.py for
    XLA's), and the layers' weight matmuls as often as `layer_reruns` says."""
    extra = attention_flops_per_token(cfg, seq_len)
    extra += 2 * (counts["attention"] + counts["mlp"]) * layer_reruns(cfg, schedule)
    return model_flops_per_token(cfg, seq_len, counts) + extra


def layer_reruns(cfg: ModelConfig, schedule: str = "gpipe") -> int:
    """Extra forward passes of the layers per step: one under full recomputation; under the
    1F1B schedule (`schedule`, the pipeline's), one more, since its backward slot recomputes
    each layer from its saved input (jaxlm/model/pipeline_1f1b.py)."""
    return (cfg.remat == "full") + (schedule == "1f1b")


def mfu(flops_per_token: float, tokens_per_s_per_device: float, peak_tflops: float) -> float:
    return flops_per_token * tokens_per_s_per_device / (peak_tflops * 1e12)


def days_to_train(
    flops_per_token: float, tokens: float, devices: int, peak_tflops: float, mfu_: float
) -> float:
    """GPT-NL's compute calculus: total model FLOPs over the FLOP/s the devices deliver."""
    return flops_per_token * tokens / (devices * peak_tflops * 1e12 * mfu_) / _SECONDS_PER_DAY
