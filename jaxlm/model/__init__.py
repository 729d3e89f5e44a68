"""The model as pure data: a graph definition, a tree of parameter arrays, their logical axes.

Training code never holds a stateful Flax object: it keeps parameters as a plain nested dict of
arrays (what Orbax saves, what optax updates, what converters read) and rebuilds the module
inside jit with `nnx.merge`, which costs nothing at run time.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.model.layers import CACHE_AXES, LayerCache
from jaxlm.model.pipeline import PipelineSpec
from jaxlm.model.transformer import Transformer
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
    "describe",
    "param_count",
]
