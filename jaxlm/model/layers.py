"""The pieces of a transformer block: norms, rotary positions, attention and the MLP.

Each piece runs in a `jax.named_scope` (norm, rotary, attention, mlp), so profiles of the
compiled step (benchmarks/cpu_profile.py, XProf, Nsight) name where the time goes.

Conventions (nanodo's): a tensor's name ends in its shape, with B batch, L length, D d_model,
N query heads, K key/value heads, H head dim, F MLP hidden, V vocabulary; a contraction with a
weight is `dense` (one matmul over the flattened tokens), the others are einsums. Parameters
are float32 and carry logical axis names (see jaxlm/sharding.py) in their `out_sharding`
metadata; they are cast to the compute dtype where they are used.
"""

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.model import context
from jaxlm.sharding import ActivationSharding

Initializer = Callable[..., jax.Array]
Shard = ActivationSharding  # pins activations to the sharding table (a no-op without a mesh)


def param(rngs: nnx.Rngs, init: Initializer, shape: tuple[int, ...], axes: tuple[str, ...]):
    """A float32 parameter named by logical axes; placement is decided later, not here."""
    assert len(shape) == len(axes), (shape, axes)
    # eager_sharding=False: Flax would otherwise read the logical names as mesh axes. Layout is
    # applied once, by jit's out_shardings over the whole state (jaxlm/step.py).
    return nnx.Param(
        init(rngs.params(), shape, jnp.float32), out_sharding=axes, eager_sharding=False
    )


def dense(x: jax.Array, w: jax.Array, contracting: int = 1) -> jax.Array:
    """x's last `contracting` dims times w's first ones, e.g. [B, L, D] x [D, N, H] -> [B, L, N, H].

    The einsum "BLD,DNH->BLNH" written as one [B*L, D] x [D, N*H] matmul. Its gradient is then
    two plain matmuls too; an einsum's weight gradient contracts over both B and L, which
    XLA:CPU lowers to a copy of the cotangent in transposed layout (fused with the elementwise
    work before it, and unvectorised) and an unfused dot: 2.3x slower for a SwiGLU MLP's forward
    and backward pass on the development machine (benchmarks/cpu_profile.py). The results are
    the same. Merging B and L keeps a batch sharding: B is the major dimension."""
    tokens, inputs = x.shape[:-contracting], x.shape[-contracting:]
    assert inputs == w.shape[:contracting], (x.shape, w.shape)
    size = math.prod(inputs)
    y = x.reshape(-1, size) @ w.reshape(size, -1)
    return y.reshape(*tokens, *w.shape[contracting:])


def normal(std: float) -> Initializer:
    return jax.nn.initializers.normal(stddev=std)


zeros = jax.nn.initializers.zeros
ones = jax.nn.initializers.ones


def recomputed(f):
    """`f`, an elementwise function of matmul outputs, recomputed in the backward pass from its
    inputs: only they are kept, not the intermediates autodiff would keep (a sigmoid, a
    product). Megatron's recomputation of activation functions: in the layer scan every kept
    [B, L, F] tensor is also a buffer that the scan stacks and zero-fills each step."""
    return jax.checkpoint(f, policy=jax.checkpoint_policies.nothing_saveable)


def _swiglu(gate, up):
    return jax.nn.silu(gate) * up


class Norm(nnx.Module):
    """RMSNorm (Llama) or LayerNorm (GPT-2), computed in float32 whatever the compute dtype."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.kind, self.eps = cfg.norm, cfg.norm_eps
        self.scale = param(rngs, ones, (cfg.d_model,), ("embed",))
        if cfg.norm == "layernorm":
            self.bias = param(rngs, zeros, (cfg.d_model,), ("embed",))

    @jax.named_scope("norm")
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        x = x_BxLxD.astype(jnp.float32)
        if self.kind == "layernorm":
            x = x - x.mean(-1, keepdims=True)
        y = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + self.eps) * self.scale[...]
        if self.kind == "layernorm":
            y = y + self.bias[...]
        return y.astype(x_BxLxD.dtype)


@jax.named_scope("rotary")
def rotary_frequencies(cfg: ModelConfig) -> np.ndarray:
    """The H/2 rotary frequencies theta^(-2i/H), float32, with `cfg.rope_scaling` applied:
    Llama 3.1's stretches the long wavelengths `factor` times, keeps the short ones and
    interpolates between (as Hugging Face's `rope_type: llama3`)."""
    head_dim, scaling = cfg.dim_per_head, cfg.rope_scaling
    inv_freq = cfg.rope_theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling.rope_type == "llama3":
        context = scaling.original_max_position_embeddings
        wavelength = 2 * math.pi / inv_freq
        # 0 at wavelengths >= context / low_freq_factor (stretched), 1 at <= context /
        # high_freq_factor (kept), linear in context / wavelength between
        kept = (context / wavelength - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        kept = np.clip(kept, 0.0, 1.0)
        inv_freq = (1 - kept) * inv_freq / scaling.factor + kept * inv_freq
    return inv_freq.astype(np.float32)


def rotary_tables(positions_BxL: jax.Array, inv_freq_Hh: np.ndarray):
    """(sin, cos) of shape [B, L, H/2] for rotary embeddings at the given token positions, for
    the frequencies of `rotary_frequencies`."""
    angle_BxLxHh = positions_BxL.astype(jnp.float32)[..., None] * inv_freq_Hh
    return jnp.sin(angle_BxLxHh), jnp.cos(angle_BxLxHh)


@jax.named_scope("rotary")
def apply_rotary(x_BxLxNxH: jax.Array, sin_BxLxHh: jax.Array, cos_BxLxHh: jax.Array):
    """Rotate the two halves of each head (the "rotate_half" layout that Hugging Face uses)."""
    x = x_BxLxNxH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    sin, cos = sin_BxLxHh[:, :, None, :], cos_BxLxHh[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxNxH.dtype)


class Attention(nnx.Module):
    """Causal grouped-query attention through `jax.nn.dot_product_attention`."""

    def __init__(self, cfg: ModelConfig, shard: Shard, *, rngs: nnx.Rngs):
        D, N, K, H = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
        init, out_init = normal(cfg.init_std), normal(cfg.init_std / math.sqrt(2 * cfg.n_layers))
        self.q_proj = param(rngs, init, (D, N, H), ("embed", "heads", "head_dim"))
        self.k_proj = param(rngs, init, (D, K, H), ("embed", "kv_heads", "head_dim"))
        self.v_proj = param(rngs, init, (D, K, H), ("embed", "kv_heads", "head_dim"))
        self.o_proj = param(rngs, out_init, (N, H, D), ("heads", "head_dim", "embed"))
        self.use_bias = cfg.use_bias
        if cfg.use_bias:
            self.q_bias = param(rngs, zeros, (N, H), ("heads", "head_dim"))
            self.k_bias = param(rngs, zeros, (K, H), ("kv_heads", "head_dim"))
            self.v_bias = param(rngs, zeros, (K, H), ("kv_heads", "head_dim"))
            self.o_bias = param(rngs, zeros, (D,), ("embed",))
        self.implementation = cfg.attention
        self.context = context.attention_for(cfg.context_attention, shard)
        self.shard = shard

    @jax.named_scope("attention")
    def __call__(self, x_BxLxD, rotary, mask_Bx1xLxL):
        """`mask_Bx1xLxL`: None (causal), the documents' [B, 1, L, L] visibility, or for the
        context ring the tokens' `TokenIds` (an L x L mask would not split)."""
        if self.context == "ring":
            return self.output(self._ring(x_BxLxD, rotary, mask_Bx1xLxL))
        q_BxLxNxH, k_BxLxKxH, v_BxLxKxH = self.project(x_BxLxD, rotary)
        implementation = attention_implementation(self.implementation, x_BxLxD.dtype)
        if implementation == "xla" or self.context == "all_gather":
            if self.context == "all_gather":
                # The sequence split over `context`: each device attends its own queries to
                # all keys (gathered in `project`) in one masked square, XLA's (blocks of
                # queries would cut across the split, and cuDNN's fused kernel is not split).
                attend = functools.partial(self.attend, is_causal=True, implementation="xla")
            else:
                attend = functools.partial(causal_attention_in_blocks, attend=self.attend)
            # Megatron's selective recomputation: the backward pass recomputes the [B, N, L, L]
            # scores and probabilities from q, k and v rather than keeping them, as a flash
            # kernel does. They are the largest activation, and with the layer scan they would
            # also need a zero-filled stacking buffer: on CPU storing them cost more than the
            # recomputation.
            attend = jax.checkpoint(attend, policy=jax.checkpoint_policies.nothing_saveable)
        else:
            attend = functools.partial(self.attend, is_causal=True, implementation=implementation)
        out_BxLxNxH = attend(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, mask_Bx1xLxL)
        return self.output(out_BxLxNxH)

    def _ring(self, x_BxLxD, rotary, ids: "TokenIds"):
        """Ring attention over the context axis (jaxlm/model/context.py); its own backward pass
        recomputes the scores step by step, as the other paths' recomputation does whole."""
        q_BxLxNxH, k_BxLxKxH, v_BxLxKxH = self.project(x_BxLxD, rotary, kv_names="length")
        return context.ring_attention(
            q_BxLxNxH,
            k_BxLxKxH,
            v_BxLxKxH,
            ids.positions,
            ids.segments,
            self.shard.current_mesh(),
        )

    def decode(self, x_BxTxD, rotary, cache: "LayerCache", start):
        """Attention of T new tokens at positions start .. start+T-1 over the cache, whose first
        `start` entries hold the keys and values of the tokens before them. Returns the output
        and the cache with the new tokens' keys and values written in."""
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH = self.project(x_BxTxD, rotary)
        names = ("batch", "length", "kv_heads", "head_dim")
        k_BxSxKxH, v_BxSxKxH = (
            self.shard(
                jax.lax.dynamic_update_slice_in_dim(c, new.astype(c.dtype), start, axis=1), names
            )
            for c, new in ((cache.k, k_BxTxKxH), (cache.v, v_BxTxKxH))
        )
        T, S = x_BxTxD.shape[1], k_BxSxKxH.shape[1]
        # Query t (at position start + t) sees cache entries 0 .. start + t: the earlier tokens
        # and itself; the entries not yet written lie beyond and are masked out.
        mask_TxS = causal_mask(T, S, start)
        # XLA's attention: the mask is not the square causal one cuDNN's fused kernel takes,
        # and a one-token query gains nothing from a flash kernel.
        out_BxTxNxH = self.attend(
            q_BxTxNxH,
            k_BxSxKxH,
            v_BxSxKxH,
            mask_TxS[None, None],
            is_causal=False,
            implementation="xla",
        )
        return self.output(out_BxTxNxH), LayerCache(k_BxSxKxH, v_BxSxKxH)

    def project(self, x_BxLxD, rotary, kv_names: str = "kv_length"):
        """Queries, keys and values, biased and rotated, in the layout of the sharding table;
        keys and values whole along the sequence unless `kv_names` says otherwise."""
        dtype = x_BxLxD.dtype
        q_BxLxNxH = dense(x_BxLxD, self.q_proj[...].astype(dtype))
        k_BxLxKxH = dense(x_BxLxD, self.k_proj[...].astype(dtype))
        v_BxLxKxH = dense(x_BxLxD, self.v_proj[...].astype(dtype))
        if self.use_bias:
            q_BxLxNxH += self.q_bias[...].astype(dtype)
            k_BxLxKxH += self.k_bias[...].astype(dtype)
            v_BxLxKxH += self.v_bias[...].astype(dtype)
        if rotary is not None:
            q_BxLxNxH = apply_rotary(q_BxLxNxH, *rotary)
            k_BxLxKxH = apply_rotary(k_BxLxKxH, *rotary)
        q_BxLxNxH = self.shard(q_BxLxNxH, ("batch", "length", "heads", "head_dim"))
        # keys and values whole along the sequence: gathered over `context` when it splits it
        k_BxLxKxH = self.shard(k_BxLxKxH, ("batch", kv_names, "kv_heads", "head_dim"))
        v_BxLxKxH = self.shard(v_BxLxKxH, ("batch", kv_names, "kv_heads", "head_dim"))
        return q_BxLxNxH, k_BxLxKxH, v_BxLxKxH

    @staticmethod
    def attend(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, mask, *, is_causal: bool, implementation: str):
        dtype = q_BxLxNxH.dtype
        if dtype == jnp.float16 and jax.devices()[0].platform == "cpu":
            # XLA:CPU has no float16 dot with float32 accumulation, which the XLA attention
            # path asks for in float16; attend in float32 there (CPU runs are for trying).
            q_BxLxNxH, k_BxSxKxH, v_BxSxKxH = (
                t.astype(jnp.float32) for t in (q_BxLxNxH, k_BxSxKxH, v_BxSxKxH)
            )
        return jax.nn.dot_product_attention(
            q_BxLxNxH,
            k_BxSxKxH,
            v_BxSxKxH,
            mask=mask,
            is_causal=is_causal,
            implementation=implementation,
        ).astype(dtype)

    def output(self, out_BxLxNxH):
        dtype = out_BxLxNxH.dtype
        # Row-parallel under tensor parallelism: each device holds whole heads, the sum over
        # heads becomes one all-reduce (or reduce-scatter) of [B, L, D].
        y_BxLxD = dense(out_BxLxNxH, self.o_proj[...].astype(dtype), 2)
        if self.use_bias:
            y_BxLxD += self.o_bias[...].astype(dtype)
        return y_BxLxD


# Queries per block of the XLA attention's causal block skipping (causal_attention_in_blocks):
# 128 ran gpt-124m's attention (seq 1,024) fastest on the development machine, ahead of 256.
# Blocks are unrolled in the layer's program: longer sequences take larger blocks rather than
# more of them, so that compiling stays short (16 blocks skip 47 % of the square).
QUERY_BLOCK = 128
MAX_QUERY_BLOCKS = 16


def query_blocks(length: int) -> int:
    """How many query blocks causal_attention_in_blocks splits a sequence into (1: whole)."""
    n = min(length // QUERY_BLOCK, MAX_QUERY_BLOCKS)
    return n if n >= 2 and length % n == 0 else 1


def causal_attention_in_blocks(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, mask, *, attend):
    """Causal attention with the masked-out work skipped, as a flash kernel skips it: queries in
    n blocks, each attending to the keys up to its own last position only. XLA's attention
    computes every [L, L] score and masks half of them away; the blocks' scores and
    probabilities cover (n + 1) / 2n of that square (56 % at seq 1,024), in the forward and
    backward pass alike. The result is the same (every query sees the same keys, softmax over
    the same scores). A sequence that is one block, or does not split evenly, runs whole.

    `mask` [B, 1, L, L] (documents of packed rows) or None; `attend` is Attention.attend."""
    L = q_BxLxNxH.shape[1]
    n = query_blocks(L)
    if n == 1:
        return attend(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, mask, is_causal=True, implementation="xla")
    size = L // n
    blocks = []
    for start in range(0, L, size):
        end = start + size  # queries start .. end-1 see keys 0 .. end-1, causally
        block_mask = causal_mask(size, end, start)[None, None]
        if mask is not None:
            block_mask = block_mask & mask[:, :, start:end, :end]
        out = attend(
            q_BxLxNxH[:, start:end],
            k_BxLxKxH[:, :end],
            v_BxLxKxH[:, :end],
            block_mask,
            is_causal=False,
            implementation="xla",
        )
        blocks.append(out)
    return jnp.concatenate(blocks, axis=1)


def causal_mask(queries: int, keys: int, start) -> jax.Array:
    """[queries, keys]: query t, at position start + t, sees keys 0 .. start + t."""
    return jnp.arange(keys)[None, :] <= start + jnp.arange(queries)[:, None]


class TokenIds(NamedTuple):
    """Each token's position in its document and its document's id, [B, L] (segments None: one
    document per row): the context ring's masks come from them, in whatever order the tokens
    lie."""

    positions: jax.Array
    segments: jax.Array | None


class LayerCache(NamedTuple):
    """One layer's keys and values [B, S, K, H] (stacked over layers: [L, B, S, K, H])."""

    k: jax.Array
    v: jax.Array


CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")


def attention_implementation(choice: str, dtype) -> str:
    """'auto' picks cuDNN's fused flash kernel on NVIDIA GPUs in 16-bit, XLA elsewhere."""
    if choice != "auto":
        return choice
    on_gpu = jax.devices()[0].platform == "gpu"
    return "cudnn" if on_gpu and dtype in (jnp.bfloat16, jnp.float16) else "xla"


class MLP(nnx.Module):
    """SwiGLU (Llama: silu(x W_gate) * x W_up, then W_down) or GeLU (GPT-2, tanh form)."""

    def __init__(self, cfg: ModelConfig, shard: Shard, *, rngs: nnx.Rngs):
        D, F = cfg.d_model, cfg.d_ff
        init, out_init = normal(cfg.init_std), normal(cfg.init_std / math.sqrt(2 * cfg.n_layers))
        self.kind, self.use_bias, self.shard = cfg.mlp, cfg.use_bias, shard
        if cfg.mlp == "swiglu":
            self.gate_proj = param(rngs, init, (D, F), ("embed", "mlp"))
        self.up_proj = param(rngs, init, (D, F), ("embed", "mlp"))
        self.down_proj = param(rngs, out_init, (F, D), ("mlp", "embed"))
        if cfg.use_bias:
            self.up_bias = param(rngs, zeros, (F,), ("mlp",))
            self.down_bias = param(rngs, zeros, (D,), ("embed",))

    @jax.named_scope("mlp")
    def __call__(self, x_BxLxD):
        dtype = x_BxLxD.dtype
        h_BxLxF = dense(x_BxLxD, self.up_proj[...].astype(dtype))
        if self.use_bias:
            h_BxLxF += self.up_bias[...].astype(dtype)
        if self.kind == "swiglu":
            gate_BxLxF = dense(x_BxLxD, self.gate_proj[...].astype(dtype))
            h_BxLxF = recomputed(_swiglu)(gate_BxLxF, h_BxLxF)
        else:
            h_BxLxF = recomputed(functools.partial(jax.nn.gelu, approximate=True))(h_BxLxF)
        h_BxLxF = self.shard(h_BxLxF, ("batch", "length", "mlp"))
        y_BxLxD = dense(h_BxLxF, self.down_proj[...].astype(dtype))
        if self.use_bias:
            y_BxLxD += self.down_bias[...].astype(dtype)
        return y_BxLxD
