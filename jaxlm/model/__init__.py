"""The model as pure data: a graph definition, a tree of parameter arrays, their logical axes.

Training code never holds a stateful Flax object: it keeps parameters as a plain nested dict of
arrays (what Orbax saves, what optax updates, what converters read) and rebuilds the module
inside jit with `nnx.merge`, which costs nothing at run time.
"""

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.model import pipeline_1f1b
from jaxlm.model.layers import CACHE_AXES, LayerCache
from jaxlm.model.pipeline import PipelineSpec
from jaxlm.model.transformer import Transformer, apply_layer, default_positions
from jaxlm.sharding import ActivationSharding

Params = dict[str, Any]


class ModelSpec(NamedTuple):
    graphdef: Any  # nnx.GraphDef of Transformer: static structure, no arrays
    shapes: Params  # jax.ShapeDtypeStruct per parameter
    axes: Params  # tuple of logical axis names per parameter


def build(
    cfg: ModelConfig,
    key: jax.Array,
    shard=ActivationSharding(),
    stages: PipelineSpec = PipelineSpec(),
) -> tuple[Any, Params]:
    """(graphdef, params): a freshly initialised model, its parameters as a nested dict."""
    model = Transformer(cfg, rngs=nnx.Rngs(params=key), shard=shard, stages=stages)
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def describe(
    cfg: ModelConfig, shard=ActivationSharding(), stages: PipelineSpec = PipelineSpec()
) -> ModelSpec:
    """Shapes and logical axes of every parameter, without allocating any of them."""
    abstract = nnx.eval_shape(
        lambda: Transformer(cfg, rngs=nnx.Rngs(0), shard=shard, stages=stages)
    )
    graphdef, state = nnx.split(abstract)
    axes = jax.tree.map(tuple, nnx.to_pure_dict(nnx.get_partition_spec(state)))
    return ModelSpec(graphdef, nnx.to_pure_dict(state), axes)


def apply(graphdef, params: Params, tokens_BxL, positions_BxL=None, segments_BxL=None):
    """Logits [B, L, V] for the token ids, from the parameter tree."""
    return nnx.merge(graphdef, params)(tokens_BxL, positions_BxL, segments_BxL)


def hidden(graphdef, params: Params, tokens_BxL, positions_BxL=None, segments_BxL=None):
    """The last layer's output [B, L, D]: `apply` without the head, for a loss that runs the
    head in pieces."""
    return nnx.merge(graphdef, params).hidden(tokens_BxL, positions_BxL, segments_BxL)


def head(graphdef, params: Params, x_BxLxD):
    """Logits [B, L, V] of the final norm and output projection, for `hidden`'s output."""
    return nnx.merge(graphdef, params).head(x_BxLxD)


def decode(graphdef, params: Params, tokens_BxT, cache: LayerCache, start):
    """(logits [B, T, V], cache): T tokens at positions start.. over a key/value cache."""
    return nnx.merge(graphdef, params).decode(tokens_BxT, cache, start)


def stage_parts(graphdef, params: Params, loss_of_logits) -> pipeline_1f1b.StageParts:
    """The model cut into the pieces the 1F1B schedule runs: embedding, layer, head and loss
    (`loss_of_logits(logits, targets, weights)`, per token), as pure functions of the
    parameters."""
    # The embedding and the head never touch the layers: shapes stand in for them.
    no_layers = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params["layers"])

    def outside_layers(rest) -> Transformer:
        return nnx.merge(graphdef, {**rest, "layers": no_layers})

    model = outside_layers(without_layers(params))
    layers_graphdef = nnx.graphdef(model.layers)

    def embed(rest, tokens_BxL, positions_BxL):
        return outside_layers(rest).embed(tokens_BxL, positions_BxL)

    def loss(rest, x_BxLxD, targets_BxL, weights_BxL):
        return loss_of_logits(outside_layers(rest).head(x_BxLxD), targets_BxL, weights_BxL)

    return pipeline_1f1b.StageParts(
        embed=embed,
        context=model.layer_context,
        layer=functools.partial(apply_layer, layers_graphdef),
        loss=loss,
    )


def without_layers(params: Params) -> Params:
    """The parameters outside the layer stack: embeddings, final norm, head."""
    return {k: v for k, v in params.items() if k != "layers"}


def cache_shapes(cfg: ModelConfig, batch: int, length: int) -> LayerCache:
    """The key/value cache of `batch` sequences of up to `length` tokens, in the compute dtype;
    its dimensions are named by CACHE_AXES."""
    shape = (cfg.n_layers, batch, length, cfg.kv_heads, cfg.dim_per_head)
    return LayerCache(*[jax.ShapeDtypeStruct(shape, jnp.dtype(cfg.compute_dtype))] * 2)


def param_count(shapes: Params) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


__all__ = [
    "CACHE_AXES",
    "LayerCache",
    "ModelSpec",
    "Params",
    "PipelineSpec",
    "Transformer",
    "apply",
    "build",
    "cache_shapes",
    "decode",
    "default_positions",
    "describe",
    "param_count",
    "stage_parts",
    "without_layers",
]
