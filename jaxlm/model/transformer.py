"""A decoder-only transformer, written once for every layout and every preset.

Deviations from the vanilla (GPT-2) transformer, each chosen by a ModelConfig field:
- pre-norm blocks, RMSNorm or LayerNorm (`norm`), the final norm before the head;
- rotary positions on q and k with base `rope_theta` (`positions=rope`), optionally with
  Llama 3.1's frequency scaling (`rope_scaling`), or a learned table;
- grouped-query attention: `n_kv_heads` key/value heads shared by groups of query heads;
- SwiGLU or tanh-GeLU MLP (`mlp`); biases only with `use_bias`;
- tied or untied output head (`tie_embeddings`);
- output projections initialised with std / sqrt(2 * n_layers) (GPT-2, Megatron);
- no dropout: pretraining on deduplicated data at this scale does not use it.

`decode` runs the same blocks for generation over a key/value cache (prefill, then one token
at a time); training never touches it.

The blocks are created once with a leading "layers" axis (`nnx.vmap`) and applied with
`jax.lax.scan`, so compile time does not grow with depth, and the stacked weights are one array
per role that the pipeline issue can split into stages. Activation recomputation wraps one layer.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.model import context, pipeline
from jaxlm.model.layers import (
    MLP,
    Attention,
    LayerCache,
    Norm,
    Shard,
    TokenIds,
    dense,
    normal,
    param,
    rotary_frequencies,
    rotary_tables,
)
from jaxlm.model.pipeline import PipelineSpec
from jaxlm.sharding import ActivationSharding

REMAT_POLICIES = {
    # Recompute the whole layer in the backward pass: least memory, ~1/3 more FLOPs.
    "full": jax.checkpoint_policies.nothing_saveable,
    # Keep the weight matmuls' outputs, recompute the rest (attention scores, norms, activations):
    # Megatron's "selective" recomputation.
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# `remat=none` in a pipeline round (see `_run_layers`): every matmul's output is kept and the
# elementwise work between them recomputed, the weights' casts to the compute dtype among it
# (kept, they would be one copy of the stage's weights per pipeline iteration).
ROUND_WITHOUT_REMAT = jax.checkpoint_policies.dots_saveable


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard, *, rngs: nnx.Rngs):
        self.attn_norm = Norm(cfg, rngs=rngs)
        self.attn = Attention(cfg, shard, rngs=rngs)
        self.mlp_norm = Norm(cfg, rngs=rngs)
        self.mlp = MLP(cfg, shard, rngs=rngs)
        self.shard = shard

    def __call__(self, x_BxLxD, rotary, mask):
        x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD), rotary, mask)
        x_BxLxD = x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD))
        return self.shard(x_BxLxD, ("batch", "length", "act_embed"))

    def decode(self, x_BxTxD, rotary, cache: LayerCache, start):
        y_BxTxD, cache = self.attn.decode(self.attn_norm(x_BxTxD), rotary, cache, start)
        x_BxTxD = x_BxTxD + y_BxTxD
        x_BxTxD = x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD))
        return self.shard(x_BxTxD, ("batch", "length", "act_embed")), cache


class Transformer(nnx.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        shard: Shard = ActivationSharding(),
        stages: PipelineSpec = PipelineSpec(),
    ):
        self.cfg, self.shard, self.stages = cfg, shard, stages
        D, V = cfg.d_model, cfg.vocab_size
        self.embedding = param(rngs, normal(cfg.init_std), (V, D), ("vocab", "embed"))
        if cfg.positions == "learned":
            self.position_embedding = param(
                rngs, normal(cfg.init_std / 2), (cfg.max_seq_len, D), ("positions", "embed")
            )

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def stacked_blocks(rngs):
            return Block(cfg, shard, rngs=rngs)

        self.layers = stacked_blocks(rngs)
        if stages.repeats > 1:
            _split_layer_axis(self.layers, stages.repeats)
        self.final_norm = Norm(cfg, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, normal(cfg.init_std), (D, V), ("embed", "vocab"))

    def __call__(self, tokens_BxL, positions_BxL=None, segments_BxL=None):
        """Logits [B, L, V] in the compute dtype.

        positions: each token's position in its document (default 0..L-1);
        segments: document ids for packed rows; tokens attend only within their document.
        """
        return self.head(self.hidden(tokens_BxL, positions_BxL, segments_BxL))

    @jax.named_scope("embed")
    def embed(self, tokens_BxL, positions_BxL):
        dtype = jnp.dtype(self.cfg.compute_dtype)
        x_BxLxD = self._lookup(self.embedding, "vocab", tokens_BxL)
        if self.cfg.positions == "learned":
            x_BxLxD += self._lookup(self.position_embedding, "positions", positions_BxL)
        # under a pipeline each stage embeds only the tokens of its own share of the stream
        tokens = self._split_tokens((*tokens_BxL.shape, self.cfg.d_model))
        return self.shard(x_BxLxD.astype(dtype), (*tokens, "act_embed"))

    def _lookup(self, table, rows: str, ids_BxL):
        # Gather the table's d_model over fsdp first, as FSDP does for every weight: XLA's
        # partitioner cannot turn an fsdp-sharded gather into a batch-sharded output cheaply.
        table_RxD = self.shard(table[...], (rows, "act_embed"))
        return jnp.take(table_RxD, ids_BxL, axis=0)

    def forward_embedded(self, x_BxLxD, positions_BxL, segments_BxL=None):
        """The rest of the forward pass after the embedding lookup (differentiable in x)."""
        return self.head(self.body(x_BxLxD, positions_BxL, segments_BxL))

    def hidden(self, tokens_BxL, positions_BxL=None, segments_BxL=None):
        """The last layer's output [B, L, D], before the head."""
        if positions_BxL is None:
            positions_BxL = default_positions(tokens_BxL)
        return self.body(self.embed(tokens_BxL, positions_BxL), positions_BxL, segments_BxL)

    def body(self, x_BxLxD, positions_BxL, segments_BxL=None):
        """The layers: [B, L, D] -> [B, L, D]."""
        ways = self.shard.ways("length")
        if context.attention_for(self.cfg.context_attention, self.shard) == "ring":
            # the ring's order (two mirrored chunks per device) for the layers, and back
            segments_BxL = None if segments_BxL is None else context.zigzag(segments_BxL, ways)
            x_BxLxD = self._layers(
                context.zigzag(x_BxLxD, ways), context.zigzag(positions_BxL, ways), segments_BxL
            )
            return context.unzigzag(x_BxLxD, ways)
        return self._layers(x_BxLxD, positions_BxL, segments_BxL)

    def _layers(self, x_BxLxD, positions_BxL, segments_BxL):
        graphdef, stacked = nnx.split(self.layers)
        if self.stages.stages > 1:
            return pipeline.run(
                functools.partial(self._run_layers, graphdef),
                stacked,
                x_BxLxD,
                positions_BxL,
                segments_BxL,
                self.stages,
                self.shard,
            )
        return self._run_layers(graphdef, stacked, x_BxLxD, positions_BxL, segments_BxL)

    @jax.named_scope("head")
    def head(self, x_BxLxD):
        """The final norm and the output projection: logits [B, L, V]."""
        tokens = self._split_tokens(x_BxLxD.shape)
        if tokens != ("batch", "length"):  # a pipeline's output, split over the stages
            x_BxLxD = self.shard(x_BxLxD, (*tokens, "act_embed"))
        x_BxLxD = self.final_norm(x_BxLxD)
        dtype = x_BxLxD.dtype
        if self.cfg.tie_embeddings:
            w_DxV = self.embedding[...].astype(dtype).T
        else:
            w_DxV = self.lm_head[...].astype(dtype)
        if tokens[1] == "pipeline_length":
            # Split by position, B x L does not flatten into one sharded dimension (B is whole,
            # L split): `dense`'s reshape would gather every stage's tokens. An einsum keeps L.
            logits_BxLxV = jnp.einsum("BLD,DV->BLV", x_BxLxD, w_DxV)
        else:
            logits_BxLxV = dense(x_BxLxD, w_DxV)
        return self.shard(logits_BxLxV, (*tokens, "vocab"))

    def _split_tokens(self, shape) -> tuple[str, str]:
        """The logical names of the batch and length of the embedding's output and the head's
        input. Both work per token: under a pipeline their tokens are split over the stages too,
        by sequence where the batch divides (the stream's layout, pipeline.split_microbatches),
        else by position; otherwise each stage would compute and keep the whole batch's. Inside a
        stage (the 1F1B schedule) they work on one microbatch, as the layers do."""
        inside_stage = pipeline.AXIS in jax.sharding.get_abstract_mesh().manual_axes
        if self.stages.stages > 1 and not inside_stage:
            for names in (("pipeline_batch", "length"), ("batch", "pipeline_length")):
                if self.shard.fits(shape, (*names, "act_embed")):
                    return names
        return ("batch", "length")

    def decode(self, tokens_BxT, cache: LayerCache, start):
        """Logits [B, T, V] of T tokens at positions start .. start+T-1 given the cache of the
        `start` tokens before them, and the cache with these tokens added.

        Prefill is one call with the whole prompt at start 0, then each sampled token is one
        call with T = 1. The cache holds [L, B, S, K, H] keys and values in the compute dtype
        (see `cache_shapes`); positions past `start + T` are ignored, so S is the longest
        sequence the cache can hold. Layers run in one scan, without a pipeline.
        """
        positions_BxT = jnp.broadcast_to(start + jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
        x_BxTxD = self.embed(tokens_BxT, positions_BxT)
        rotary = None
        if self.cfg.positions == "rope":
            rotary = rotary_tables(positions_BxT, rotary_frequencies(self.cfg))
        graphdef, stacked = nnx.split(self.layers)

        def one_layer(x_BxTxD, layer):
            layer_params, layer_cache = layer
            x_BxTxD, layer_cache = nnx.merge(graphdef, layer_params).decode(
                x_BxTxD, rotary, layer_cache, start
            )
            return x_BxTxD, layer_cache

        x_BxTxD, cache = jax.lax.scan(one_layer, x_BxTxD, (stacked, cache))
        return self.head(x_BxTxD), cache

    def layer_context(self, positions_BxL, segments_BxL):
        """What every layer of a forward pass shares: (rotary tables or None, the attention
        mask: None for causal only, document equality [B, 1, L, L], or the ring's token ids)."""
        cfg = self.cfg
        rotary = None
        if cfg.positions == "rope":
            rotary = rotary_tables(positions_BxL, rotary_frequencies(cfg))
        mask = None
        if context.attention_for(cfg.context_attention, self.shard) == "ring":
            mask = TokenIds(positions_BxL, segments_BxL)
        elif segments_BxL is not None:
            mask = segments_BxL[:, None, :, None] == segments_BxL[:, None, None, :]
        return rotary, mask

    def _run_layers(self, graphdef, stacked, x_BxLxD, positions_BxL, segments_BxL, group=None):
        """Scan blocks over the leading axis of `stacked`, one layer's weights at a time; with
        `group`, over the layers of stacked[group] (a pipeline round, see pipeline.run)."""
        cfg = self.cfg
        shared = self.layer_context(positions_BxL, segments_BxL)

        def one_layer(x_BxLxD, layer_params):
            return apply_layer(graphdef, layer_params, x_BxLxD, shared), None

        if group is not None:
            # The group's weights are a slice that depends on the pipeline iteration: sliced
            # here, inside the layer's recomputation region, and never saved (no policy saves
            # a slice or a cast).
            def layer_of_group(x_BxLxD, j):
                layer_params = jax.tree.map(lambda w: w[group, j], stacked)
                return one_layer(x_BxLxD, layer_params)

            policy = REMAT_POLICIES.get(cfg.remat, ROUND_WITHOUT_REMAT)
            step = jax.checkpoint(layer_of_group, policy=policy, prevent_cse=False)
            n_layers = jax.tree.leaves(stacked)[0].shape[1]
            x_BxLxD, _ = jax.lax.scan(step, x_BxLxD, jnp.arange(n_layers))
            return x_BxLxD
        if self.cfg.remat != "none":
            one_layer = jax.checkpoint(
                one_layer, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=False
            )
        x_BxLxD, _ = jax.lax.scan(one_layer, x_BxLxD, stacked)
        return x_BxLxD


def default_positions(tokens_BxL):
    """Each token's position when the rows are one document each: 0 .. L-1."""
    return jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)


def apply_layer(graphdef, layer_params, x_BxLxD, shared):
    """One block of the stack (`graphdef` the stack's, `layer_params` one layer's slice) on x,
    with `shared` = layer_context(...)."""
    rotary, mask = shared
    return nnx.merge(graphdef, layer_params)(x_BxLxD, rotary, mask)


def _split_layer_axis(stack: nnx.Module, repeats: int) -> None:
    """[L, ...] -> [repeats, L / repeats, ...], the circular pipeline's layout. The values are the
    ones a plain stack gets (only reshaped), and the flat order stays the execution order."""
    for _, variable in nnx.iter_graph(stack):
        if isinstance(variable, nnx.Param):
            value = variable[...]
            variable.set_value(value.reshape(repeats, -1, *value.shape[1:]))
            variable.set_metadata(
                out_sharding=("repeats", *variable.get_metadata()["out_sharding"])
            )
