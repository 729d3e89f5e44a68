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
in float32). The forward pass holds one step's scores at a time; the backward pass, which
autodiff runs over the whole recomputed ring, keeps every step's (about half of the gathered
square's). A backward pass written step by step, as flash attention's is, would keep one.

Balance. Of the four chunk pairs of a step only two have visible keys: with j < i the early and
the late query chunk both see all of chunk j and nothing of its mirror; with j > i only the late
query chunk sees anything, but both of j's chunks. So every device scores two chunk pairs at each
step after the first (three at its own, two of them causal halves): equal work on every device,
about half of the whole masked square that the all-gather variant scores.
"""

import jax
import jax.numpy as jnp
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
    inverse = [0] * (2 * ways)
    for place, chunk in enumerate(zigzag_order(ways)):
        inverse[chunk] = place
    chunks = x.reshape(x.shape[0], 2 * ways, -1, *x.shape[2:])
    return jnp.take(chunks, jnp.asarray(inverse), axis=1).reshape(x.shape)


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
        lambda *local: _ring(*local, ways=ways),
        mesh=mesh,
        in_specs=(split,) * 5,
        out_specs=split,
        axis_names=frozenset({AXIS}),
    )(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, positions_BxL, segments_BxL)


def _ring(q, k, v, positions, segments, *, ways: int):
    """One device's side: its two query chunks against every device's keys, in C steps."""
    B, L2, N, H = q.shape  # L2: this device's two chunks
    K = k.shape[2]
    c = L2 // 2
    me = jax.lax.axis_index(AXIS)
    # queries as [B, 2, c, K, G, H]: G query heads share a key/value head
    q = q.reshape(B, 2, c, K, N // K, H)
    q_pos, q_seg = positions.reshape(B, 2, c), segments.reshape(B, 2, c)
    # running maximum and normaliser [B, K, G, c], weighted sum [B, c, K, G, H], per query chunk
    state = [_empty(B, c, K, N // K, H) for _ in range(2)]

    def pair(state, qi, kv, ki):
        """The online-softmax update of query chunk qi's state by key chunk ki of `kv`."""
        k, v, k_pos, k_seg = kv
        visible = (q_seg[:, qi, :, None] == k_seg[:, ki, None, :]) & (
            k_pos[:, ki, None, :] <= q_pos[:, qi, :, None]
        )
        return _update(state, q[:, qi], k[:, ki], v[:, ki], visible)

    def chunked(x):
        return x.reshape(B, 2, c, *x.shape[2:])

    kv = (chunked(k), chunked(v), chunked(positions), chunked(segments))
    # step 0, its own keys: early sees early (causal), late sees early and late (causal)
    state[0] = pair(state[0], 0, kv, 0)
    state[1] = pair(state[1], 1, kv, 0)
    state[1] = pair(state[1], 1, kv, 1)
    for step in range(1, ways):
        kv = jax.tree.map(_pass_on(ways), kv)
        earlier = (me - step) % ways < me  # the keys come from chunk j < i
        # the late queries always see chunk j whole
        state[1] = pair(state[1], 1, kv, 0)
        # and with j < i the early queries see it too; with j > i the late see j's mirror
        chosen = _select(earlier, state[0], state[1])
        qi_early = jnp.where(earlier, 0, 1)
        ki = jnp.where(earlier, 0, 1)
        updated = _pair_dynamic(q, q_pos, q_seg, chosen, qi_early, kv, ki)
        state[0] = _select(earlier, updated, state[0])
        state[1] = _select(earlier, state[1], updated)
    out = [o / jnp.moveaxis(norm, -1, 1)[..., None] for _, norm, o in state]
    return jnp.stack(out, axis=1).reshape(B, L2, N, H).astype(v.dtype)


def _pair_dynamic(q, q_pos, q_seg, state, qi, kv, ki):
    """`pair` with the query and key chunk indices chosen at run time (device-dependent)."""
    k, v, k_pos, k_seg = kv
    take = lambda x, i: jax.lax.dynamic_index_in_dim(x, i, axis=1, keepdims=False)  # noqa: E731
    visible = (take(q_seg, qi)[:, :, None] == take(k_seg, ki)[:, None, :]) & (
        take(k_pos, ki)[:, None, :] <= take(q_pos, qi)[:, :, None]
    )
    return _update(state, take(q, qi), take(k, ki), take(v, ki), visible)


def _empty(B, c, K, G, H):
    return (
        jnp.full((B, K, G, c), _MASKED, jnp.float32),
        jnp.zeros((B, K, G, c), jnp.float32),
        jnp.zeros((B, c, K, G, H), jnp.float32),
    )


def _update(state, q_BxCxKxGxH, k_BxCxKxH, v_BxCxKxH, visible_BxCxC):
    """Online softmax: fold one chunk of keys into a query chunk's running state."""
    maximum, norm, out = state
    scores = jnp.einsum(
        "bqkgh,bskh->bkgqs", q_BxCxKxGxH, k_BxCxKxH, preferred_element_type=jnp.float32
    ) / jnp.sqrt(jnp.float32(q_BxCxKxGxH.shape[-1]))
    visible = visible_BxCxC[:, None, None]
    scores = jnp.where(visible, scores, _MASKED)
    new_max = jnp.maximum(maximum, scores.max(axis=-1))
    weights = jnp.where(visible, jnp.exp(scores - new_max[..., None]), 0.0)
    rescale = jnp.exp(maximum - new_max)
    norm = norm * rescale + weights.sum(axis=-1)
    out = out * jnp.moveaxis(rescale, -1, 1)[..., None] + jnp.einsum(
        "bkgqs,bskh->bqkgh",
        weights.astype(v_BxCxKxH.dtype),
        v_BxCxKxH,
        preferred_element_type=jnp.float32,
    )
    return new_max, norm, out


def _select(predicate, a, b):
    return jax.tree.map(lambda x, y: jnp.where(predicate, x, y), a, b)


def _pass_on(ways: int):
    """Device i's array to device i + 1 round the ring: one collective-permute."""
    return lambda x: jax.lax.ppermute(x, AXIS, [(i, (i + 1) % ways) for i in range(ways)])
