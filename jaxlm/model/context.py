"""Context parallelism's ring attention: the sequence split over the `context` mesh axis, keys
and values passed round the ring, the causal work balanced over the devices.

Layout. With C devices on the axis the sequence is cut into 2C chunks, and device i holds chunks
i and 2C − 1 − i (an early one and its mirror image from the end). `zigzag` puts the sequence in
that order once, before the layers (the embedding's output, the positions and the document
ids), so that the table's contiguous split over `context` gives each device its two chunks, and
`unzigzag` restores the order after them; every layer but the attention works per token and
never notices. The attention's masks come from each token's position and document id, not from
its index, so they hold in any order.

Ring. Device i starts with its own keys and values and, at each of C − 1 steps, passes them on to
device i + 1 (a collective-permute, which XLA can overlap with the step's compute). At step s
it holds those of device j = i − s (mod C), chunks j and 2C − 1 − j. Its queries, chunks i and
2C − 1 − i, combine with them by an online softmax (running maximum, normaliser and weighted sum
in float32), which saves only each query's log-sum-exp and output for the backward pass. The
backward pass goes round the ring again, as flash attention's does: each step's scores are
recomputed from the log-sum-exp and used at once, and the keys' and values' gradients travel
with them, one more step at the end taking them home. Each step needs only its own scores
(XLA:CPU's schedule still keeps the steps' side by side: measured, the temporaries match a ring
differentiated by autodiff).

Balance. Of the four chunk pairs of a step only two have visible keys: with j < i the early and
the late query chunk both see all of chunk j and nothing of its mirror; with j > i only the late
query chunk sees anything, but both of j's chunks. So every device scores two chunk pairs at each
step after the first (three at its own, two of them causal halves): equal work on every device,
about half of the whole masked square that the all-gather variant scores.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

AXIS = "context"
_MASKED = -1e30  # a score no visible key reaches; its weight is zeroed, not just made small


def zigzag_order(ways: int) -> list[int]:
    """The chunk order that gives device i chunks i and 2·ways − 1 − i under a contiguous split."""
    return [chunk for i in range(ways) for chunk in (i, 2 * ways - 1 - i)]


def zigzag(x, ways: int):
    """[B, L, ...] in the ring's order: L cut into 2·ways chunks, put as `zigzag_order` says."""
    chunks = x.reshape(x.shape[0], 2 * ways, -1, *x.shape[2:])
    return jnp.take(chunks, jnp.asarray(zigzag_order(ways)), axis=1).reshape(x.shape)


def unzigzag(x, ways: int):
    """The inverse of `zigzag`."""
    inverse = np.argsort(zigzag_order(ways))
    chunks = x.reshape(x.shape[0], 2 * ways, -1, *x.shape[2:])
    return jnp.take(chunks, jnp.asarray(inverse), axis=1).reshape(x.shape)


def attention_for(setting: str, shard) -> str:
    """`attention_kind` for the mesh of an ActivationSharding: its context axis, and whether a
    pipeline splits the layers."""
    return attention_kind(setting, shard.ways("length"), pipelined=shard.ways("layers") > 1)


def attention_kind(setting: str, ways: int, pipelined: bool) -> str:
    """`model.context_attention` resolved for a context axis of `ways` devices: `auto` gathers
    the keys and values for rings of two (one exchange either way, and no zigzag) and inside a
    pipeline's stages (where the ring's shard_map does not nest), else rings."""
    if ways == 1:
        return "none"
    if setting == "auto":
        return "all_gather" if ways == 2 or pipelined else "ring"
    return setting


def ring_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, positions_BxL, segments_BxL, mesh):
    """Causal attention (within documents, with `segments_BxL`) of a zigzagged sequence split
    over `context`; [B, L, N, H] out, in q's dtype."""
    split = PartitionSpec(None, AXIS)
    ways = mesh.shape[AXIS]
    if segments_BxL is None:
        segments_BxL = jnp.zeros_like(positions_BxL)
    return jax.shard_map(
        lambda *local: _ring(*local, ways),
        mesh=mesh,
        in_specs=(split,) * 5,
        out_specs=split,
        axis_names=frozenset({AXIS}),
    )(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, positions_BxL, segments_BxL)


def _steps(ways: int, me):
    """The (query chunk, key chunk) pairs with visible keys at each step of the ring, for
    device `me`: at its own keys three, then two (one chosen by where the keys come from)."""
    steps = [[(0, 0), (1, 0), (1, 1)]]
    for step in range(1, ways):
        # the keys come from chunk j = me - step: with j < me the early queries see it whole,
        # with j > me the late queries see its mirror too (they always see chunk j)
        other = jnp.where((me - step) % ways < me, 0, 1)
        steps.append([(1, 0), (other, other)])
    return steps


def _take(x, i):
    return jax.lax.dynamic_index_in_dim(x, i, axis=1, keepdims=False)


def _put(x, value, i):
    return jax.lax.dynamic_update_index_in_dim(x, value, i, axis=1)


def _visible(q_ids, k_ids, qi, ki):
    """[B, 1, 1, c, c]: which keys of chunk ki the queries of chunk qi see."""
    (q_pos, q_seg), (k_pos, k_seg) = q_ids, k_ids
    same = _take(q_seg, qi)[:, :, None] == _take(k_seg, ki)[:, None, :]
    before = _take(k_pos, ki)[:, None, :] <= _take(q_pos, qi)[:, :, None]
    return (same & before)[:, None, None]


def _scores(q_BxCxKxGxH, k_BxCxKxH, visible):
    scores = jnp.einsum(
        "bqkgh,bskh->bkgqs", q_BxCxKxGxH, k_BxCxKxH, preferred_element_type=jnp.float32
    ) / jnp.sqrt(jnp.float32(q_BxCxKxGxH.shape[-1]))
    return jnp.where(visible, scores, _MASKED)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ring(q, k, v, positions, segments, ways: int):
    """One device's side: its two query chunks against every device's keys, in C steps."""
    return _ring_forward(q, k, v, positions, segments, ways)[0]


def _chunks(q, k, v, positions, segments):
    """This device's two chunks apart, [B, 2, c, ...]: queries [B, 2, c, K, G, H] (G query heads
    share a key/value head), keys, values, and the tokens' (positions, document ids)."""
    B, L2, N, H = q.shape  # L2: this device's two chunks
    K, c = k.shape[2], L2 // 2
    ids = (positions.reshape(B, 2, c), segments.reshape(B, 2, c))
    return (
        q.reshape(B, 2, c, K, N // K, H),
        k.reshape(B, 2, c, K, H),
        v.reshape(B, 2, c, K, H),
        ids,
    )


def _ring_forward(q, k, v, positions, segments, ways):
    me = jax.lax.axis_index(AXIS)
    q_c, k_c, v_c, ids = _chunks(q, k, v, positions, segments)
    B, _, c, K, G, _ = q_c.shape
    kv = (k_c, v_c, *ids)
    # per query chunk: running maximum and normaliser [B, 2, K, G, c], weighted sum
    maximum = jnp.full((B, 2, K, G, c), _MASKED, jnp.float32)
    norm = jnp.zeros_like(maximum)
    total = jnp.zeros(q_c.shape, jnp.float32)
    for step, pairs in enumerate(_steps(ways, me)):
        if step:
            kv = jax.tree.map(_pass_on(ways), kv)
        for qi, ki in pairs:
            scores = _scores(_take(q_c, qi), _take(kv[0], ki), _visible(ids, kv[2:], qi, ki))
            new_max = jnp.maximum(_take(maximum, qi), scores.max(axis=-1))
            weights = jnp.where(scores > _MASKED, jnp.exp(scores - new_max[..., None]), 0.0)
            rescale = jnp.exp(_take(maximum, qi) - new_max)
            norm = _put(norm, _take(norm, qi) * rescale + weights.sum(axis=-1), qi)
            summed = jnp.einsum(
                "bkgqs,bskh->bqkgh",
                weights.astype(v.dtype),
                _take(kv[1], ki),
                preferred_element_type=jnp.float32,
            )
            total = _put(total, _take(total, qi) * _per_query(rescale) + summed, qi)
            maximum = _put(maximum, new_max, qi)
    out = total / _per_query(norm, chunks=True)
    logsumexp = maximum + jnp.log(norm)
    residuals = (q, k, v, positions, segments, out, logsumexp)
    return out.reshape(q.shape).astype(v.dtype), residuals


def _ring_backward(ways, residuals, d_out):
    """Flash attention's backward pass round the ring: each step's scores recomputed from the
    saved log-sum-exp, one step at a time. The keys' and values' gradients travel with them
    and take one more step home at the end."""
    q, k, v, positions, segments, out, logsumexp = residuals
    me = jax.lax.axis_index(AXIS)
    q_c, k_c, v_c, ids = _chunks(q, k, v, positions, segments)
    scale = 1 / jnp.sqrt(jnp.float32(q.shape[-1]))
    d_out = d_out.reshape(out.shape).astype(jnp.float32)
    # D = rowsum(dO * O), per query: [B, 2, K, G, c] like the log-sum-exp
    delta = jnp.moveaxis((d_out * out).sum(axis=-1), 2, -1)
    d_q = jnp.zeros(q_c.shape, jnp.float32)
    zeros = jnp.zeros(k_c.shape, jnp.float32)
    travel = (k_c, v_c, *ids, zeros, zeros)
    for step, pairs in enumerate(_steps(ways, me)):
        if step:
            travel = jax.tree.map(_pass_on(ways), travel)
        for qi, ki in pairs:
            k_i, v_i, d_k, d_v = _take(travel[0], ki), _take(travel[1], ki), *travel[4:]
            scores = _scores(_take(q_c, qi), k_i, _visible(ids, travel[2:4], qi, ki))
            weights = jnp.where(
                scores > _MASKED, jnp.exp(scores - _take(logsumexp, qi)[..., None]), 0.0
            )
            d_o = _take(d_out, qi)
            d_v = _put(d_v, _take(d_v, ki) + jnp.einsum("bkgqs,bqkgh->bskh", weights, d_o), ki)
            d_weights = jnp.einsum("bqkgh,bskh->bkgqs", d_o, v_i.astype(jnp.float32))
            d_scores = weights * (d_weights - _take(delta, qi)[..., None]) * scale
            d_q = _put(
                d_q,
                _take(d_q, qi) + jnp.einsum("bkgqs,bskh->bqkgh", d_scores, k_i.astype(jnp.float32)),
                qi,
            )
            q_i = _take(q_c, qi).astype(jnp.float32)
            d_k = _put(d_k, _take(d_k, ki) + jnp.einsum("bkgqs,bqkgh->bskh", d_scores, q_i), ki)
            travel = (*travel[:4], d_k, d_v)
    d_k, d_v = (_pass_on(ways)(x) for x in travel[4:])  # home, from the device after
    return (
        d_q.reshape(q.shape).astype(q.dtype),
        d_k.reshape(k.shape).astype(k.dtype),
        d_v.reshape(v.shape).astype(v.dtype),
        None,
        None,
    )


_ring.defvjp(_ring_forward, _ring_backward)


def _per_query(x, chunks: bool = False):
    """[B, (2,) K, G, c] -> [B, (2,) c, K, G, 1], to scale the per-query sums [.., c, K, G, H]."""
    return jnp.moveaxis(x, -1, 2 if chunks else 1)[..., None]


def _pass_on(ways: int):
    """Device i's array to device i + 1 round the ring: one collective-permute."""
    return lambda x: jax.lax.ppermute(x, AXIS, [(i, (i + 1) % ways) for i in range(ways)])
