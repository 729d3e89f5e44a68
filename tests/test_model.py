"""The model against a plain NumPy transformer, and causality through gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import config as config_lib
from jaxlm import model as model_lib
from jaxlm.model import Transformer, layers

LLAMA_STYLE = ["model.n_kv_heads=2", "model.rope_theta=500000"]
GPT_STYLE = [
    "model.norm=layernorm",
    "model.mlp=gelu",
    "model.positions=learned",
    "model.tie_embeddings=true",
    "model.use_bias=true",
]


# The XLA attention's query blocks (layers.QUERY_BLOCK): the default, one block at these lengths,
# and 4 tokens, so that sequences of 12 and 16 run in blocks, a document boundary inside one.
QUERY_BLOCKS = pytest.mark.parametrize("query_block", [layers.QUERY_BLOCK, 4], ids=["whole", "q4"])


def compiled_apply(graphdef):
    """`model_lib.apply` of one model, compiled (op by op, the model's small ops take seconds).
    A fresh function for each call, so no trace is shared by tests that patch the attention's
    block sizes."""
    return jax.jit(lambda params, *inputs: model_lib.apply(graphdef, params, *inputs))


def small(*overrides):
    return config_lib.load(
        "tiny", ["model.compute_dtype=float32", "model.init_std=0.2", *overrides]
    ).model


def reference_logits(cfg, params, tokens):
    """A transformer written the obvious way: NumPy, float64, loops over layers and heads."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    B, L = tokens.shape
    N, K, H = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head

    def norm(x, w):
        if cfg.norm == "layernorm":
            x = x - x.mean(-1, keepdims=True)
        y = x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * w["scale"]
        return y + w["bias"] if cfg.norm == "layernorm" else y

    def rope(x):  # x [B, L, heads, H]; rotate the two halves by position * theta^(-2i/H)
        inv = cfg.rope_theta ** -(np.arange(0, H, 2) / H)
        ang = np.arange(L)[:, None] * inv[None, :]
        c, s = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
        x1, x2 = x[..., : H // 2], x[..., H // 2 :]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)

    x = p["embedding"][tokens]
    if cfg.positions == "learned":
        x = x + p["position_embedding"][np.arange(L)][None]
    for i in range(cfg.n_layers):
        w = jax.tree.map(lambda a, i=i: a[i], p["layers"])
        a = w["attn"]
        h = norm(x, w["attn_norm"])
        q = np.einsum("bld,dnh->blnh", h, a["q_proj"])
        k = np.einsum("bld,dkh->blkh", h, a["k_proj"])
        v = np.einsum("bld,dkh->blkh", h, a["v_proj"])
        if cfg.use_bias:
            q, k, v = q + a["q_bias"], k + a["k_bias"], v + a["v_bias"]
        if cfg.positions == "rope":
            q, k = rope(q), rope(k)
        out = np.zeros_like(q)
        for n in range(N):
            kv = n // (N // K)  # query head n reads key/value head n // group size
            s = np.einsum("bth,bsh->bts", q[:, :, n], k[:, :, kv]) / np.sqrt(H)
            s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            out[:, :, n] = np.einsum("bts,bsh->bth", s / s.sum(-1, keepdims=True), v[:, :, kv])
        y = np.einsum("blnh,nhd->bld", out, a["o_proj"])
        x = x + (y + a["o_bias"] if cfg.use_bias else y)
        m = w["mlp"]
        h = norm(x, w["mlp_norm"])
        up = h @ m["up_proj"] + (m["up_bias"] if cfg.use_bias else 0)
        if cfg.mlp == "swiglu":
            g = h @ m["gate_proj"]
            act = g / (1 + np.exp(-g)) * up
        else:
            act = 0.5 * up * (1 + np.tanh(np.sqrt(2 / np.pi) * (up + 0.044715 * up**3)))
        x = x + act @ m["down_proj"] + (m["down_bias"] if cfg.use_bias else 0)
    x = norm(x, p["final_norm"])
    head = p["embedding"].T if cfg.tie_embeddings else p["lm_head"]
    return x @ head


@QUERY_BLOCKS
@pytest.mark.parametrize("style", [LLAMA_STYLE, GPT_STYLE], ids=["llama", "gpt2"])
def test_logits_equal_a_plain_numpy_transformer(style, query_block, monkeypatch):
    monkeypatch.setattr(layers, "QUERY_BLOCK", query_block)
    cfg = small(*style)
    graphdef, params = model_lib.build(cfg, jax.random.key(1))
    tokens = np.asarray(jax.random.randint(jax.random.key(2), (2, 16), 0, cfg.vocab_size))
    ours = np.asarray(compiled_apply(graphdef)(params, jnp.asarray(tokens)))
    expected = reference_logits(cfg, params, tokens)
    assert np.abs(expected).max() > 1.0  # a real signal, not near-zero logits
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)


@QUERY_BLOCKS
@pytest.mark.parametrize("style", [LLAMA_STYLE, GPT_STYLE], ids=["llama", "gpt2"])
@pytest.mark.parametrize("remat", ["none", "full", "save_dots"])
def test_no_position_sees_the_future(style, remat, query_block, monkeypatch):
    """d loss_t / d x_s = 0 for every input embedding x_s after t, and != 0 up to t."""
    monkeypatch.setattr(layers, "QUERY_BLOCK", query_block)
    cfg = small(*style, f"model.remat={remat}")
    model = Transformer(cfg, rngs=nnx.Rngs(params=0))
    L, t = 16, 6
    tokens = jax.random.randint(jax.random.key(3), (2, L), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(L), tokens.shape)
    x = model.embed(tokens, positions)

    def loss_at_t(x):
        logits = model.forward_embedded(x, positions)
        return jax.nn.log_softmax(logits[:, t]).mean()

    grad = jax.jit(jax.grad(loss_at_t))(x)
    assert np.all(np.asarray(grad[:, t + 1 :]) == 0)
    assert np.all(np.abs(np.asarray(grad[:, : t + 1])).sum(-1) > 0)


def test_grouped_query_attention_equals_repeated_key_value_heads():
    gqa = small("model.n_heads=8", "model.n_kv_heads=2")
    mha = small("model.n_heads=8", "model.n_kv_heads=8")
    graphdef, params = model_lib.build(gqa, jax.random.key(4))
    mha_graphdef, mha_params = model_lib.build(mha, jax.random.key(5))
    attn = dict(params["layers"]["attn"])
    for name in ("k_proj", "v_proj"):  # [layers, D, K, H] -> [layers, D, N, H]
        attn[name] = jnp.repeat(attn[name], 4, axis=2)
    mha_params = {**params, "layers": {**params["layers"], "attn": attn}}
    tokens = jax.random.randint(jax.random.key(6), (2, 12), 0, gqa.vocab_size)
    np.testing.assert_allclose(
        compiled_apply(mha_graphdef)(mha_params, tokens),
        compiled_apply(graphdef)(params, tokens),
        rtol=1e-5,
        atol=1e-5,
    )


@QUERY_BLOCKS
def test_documents_in_one_row_do_not_see_each_other(query_block, monkeypatch):
    monkeypatch.setattr(layers, "QUERY_BLOCK", query_block)
    cfg = small()
    graphdef, params = model_lib.build(cfg, jax.random.key(7))
    doc_a = jax.random.randint(jax.random.key(8), (1, 5), 0, cfg.vocab_size)
    doc_b = jax.random.randint(jax.random.key(9), (1, 7), 0, cfg.vocab_size)
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    positions = jnp.concatenate([jnp.arange(5), jnp.arange(7)])[None]
    segments = jnp.array([[1] * 5 + [2] * 7])
    alone = compiled_apply(graphdef)(params, doc_b)
    together = compiled_apply(graphdef)(params, packed, positions, segments)
    np.testing.assert_allclose(together[:, 5:], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("max_blocks", [16, 2], ids=["3x128", "2x192"])
def test_attention_in_query_blocks_equals_the_whole_square_with_the_same_gradients(
    max_blocks, monkeypatch
):
    """Three blocks of QUERY_BLOCK queries (or two larger ones, at most 2 blocks), with and
    without documents packed in the rows (a boundary inside a block): outputs and gradients of
    q, k and v equal the unblocked attention's."""
    monkeypatch.setattr(layers, "MAX_QUERY_BLOCKS", max_blocks)
    L = 3 * layers.QUERY_BLOCK
    keys = jax.random.split(jax.random.key(11), 4)
    q = jax.random.normal(keys[0], (2, L, 4, 16))
    k, v = (jax.random.normal(key, (2, L, 2, 16)) for key in keys[1:3])
    segments = jnp.where(jnp.arange(L) < L // 2 + 5, 1, 2)[None].repeat(2, 0)
    weights = jax.random.normal(keys[3], (2, L, 4, 16))
    whole = functools.partial(layers.Attention.attend, is_causal=True, implementation="xla")
    blocked = functools.partial(layers.causal_attention_in_blocks, attend=layers.Attention.attend)
    for mask in (None, segments[:, None, :, None] == segments[:, None, None, :]):

        def loss(attention, q, k, v, mask=mask):
            return (attention(q, k, v, mask) * weights).sum()

        # compiled, as in training (op by op, the blocks' many small ops take seconds)
        np.testing.assert_allclose(
            jax.jit(blocked)(q, k, v, mask), jax.jit(whole)(q, k, v, mask), atol=1e-5
        )
        gradient = lambda attention: jax.jit(  # noqa: E731
            jax.grad(functools.partial(loss, attention), argnums=(0, 1, 2))
        )
        grads, expected = gradient(blocked)(q, k, v), gradient(whole)(q, k, v)
        for got, want in zip(grads, expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_parameter_count_of_the_presets():
    def count(name):
        return model_lib.param_count(model_lib.describe(config_lib.load(name).model).shapes)

    assert count("gpt-124m") == pytest.approx(124.4e6, rel=0.01)
    assert count("llama3-8b") == pytest.approx(8.03e9, rel=0.01)
    L, d, V = 96, 12288, 50304
    assert count("gpt-175b") == pytest.approx(12 * L * d * d + V * d + 2048 * d, rel=0.01)
