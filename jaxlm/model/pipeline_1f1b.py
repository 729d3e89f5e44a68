"""The 1F1B pipeline schedule in one SPMD program: the loss and its gradients in one scan.

GPipe (jaxlm/model/pipeline.py) runs every microbatch forward, then autodiff runs every one
backward, so each stage keeps what its layers save for all M microbatches (M + S − 1 with the
bubble's). 1F1B interleaves them: each iteration of one scan runs, on every stage, one forward
slot and one backward slot, and a stage keeps a microbatch's layer inputs only from its forward
slot to its backward slot. The embedding runs in stage 0's forward slot and its gradient in
stage 0's backward slot; the head and the loss run in the last stage's forward slot, whose
cotangent (the loss's seed) starts that microbatch's backward in the same iteration. The
activations move one stage on, the cotangents one stage back, by collective-permutes, so

    stage s, iteration t:  forward of microbatch t − s,  backward of microbatch t − (2S − 2 − s)

A microbatch's round trip from stage s to the last stage and back is 2(S − 1 − s) + 1
iterations, and in that time the stage takes one forward per iteration: stage s holds at most
2(S − s) − 1 microbatches, stage 0 the most, 2S − 1 (Megatron's 1F1B, whose forward and backward
are separate time slots, holds S; in lockstep, where one iteration is one forward plus one
backward, each hop costs a whole iteration). The ring buffer has K = min(M, 2S − 1) slots on
every stage: memory bounded by the stages, not by the microbatches.

The iterations run in three scans: S − 1 of forwards only (the warm-up), M of both, S − 1 of
backwards only (the cool-down), so the time is (M + S − 1) x (forward + backward), GPipe's, and
the bubble (S − 1) / (M + S − 1) is GPipe's too. A slot whose microbatch is outside [0, M)
computes on stale data and its results are masked out, its write to the ring buffer too.

Interleaved (`repeats` R > 1, the circular layout: stage s holds layer groups s, s + S, ...):
a wave is one microbatch through one group, and the waves go in groups of S microbatches
(M must be a multiple of S), each group through round 0, then round 1, ...: wave
k = g·R·S + r·S + i is microbatch g·S + i in round r. What the last stage finishes in round r
reaches stage 0 by the same permute just as that stage starts round r + 1 of the same
microbatch, so nothing waits; backward waves run the rounds in reverse, and a cotangent leaving
stage 0 in round r + 1 reaches the last stage for round r. With R = 1 this is the plain
schedule above. Per stage and iteration t:

    forward wave t − s,   backward wave t − ((R + 1)S − 2 − s),   R·M + S − 1 iterations of work

so the bubble is the circular schedule's, (S − 1) / (R·M + S − 1), and a wave's inputs live at
most 2RS − 1 iterations: K = min(R·M, 2RS − 1) slots of one group's (L / (S·R) layers) inputs.
The warm-up is R·S − 1 iterations of forwards only, the cool-down as many of backwards only.

The backward slot is written out by hand: a reverse scan over the stage's layers, each through
`jax.vjp` of that one layer from its saved input (the layer's forward is recomputed there, so a
stage keeps each layer's input per microbatch in flight, what `remat=full` keeps in GPipe), and
each layer's weight gradient added in place into one float32 accumulator for the stage. With
`remat=full` the forward slot keeps only the stage's input and the backward slot recomputes the
layer inputs first: one more forward of the layers, and one input kept per wave instead of one
per layer of its group.

The parameters outside the layers (embedding, final norm, head) are whole on every stage (the
table splits them over fsdp and tensor, never over pipeline); their gradients are summed where
they arise (stage 0, the last stage) and over the pipeline once at the end.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxlm.model.pipeline import AXIS, PipelineSpec, split_microbatches, weight_spec
from jaxlm.sharding import ActivationSharding, data_parallel_size


@dataclasses.dataclass(frozen=True)
class StageParts:
    """The model cut where a pipeline cuts it, as pure functions of the parameters.

    embed(rest, tokens, positions) -> x            stage 0, before its layers
    context(positions, segments) -> c              what every layer of a microbatch shares
    layer(layer_params, x, c) -> x                 one layer
    loss(rest, x, targets, weights) -> ce          the last stage, after its layers: each
                                                   token's cross-entropy times its weight
    """

    embed: Callable
    context: Callable
    layer: Callable
    loss: Callable


def gradients(
    parts: StageParts,
    rest,
    stacked,
    batch: dict,
    seed,
    grads: tuple[Any, Any],
    spec: PipelineSpec,
    shard: ActivationSharding,
    keep_layer_inputs: bool = True,
):
    """(sum of token cross-entropies, (rest's gradients, stacked's gradients)) of `batch`, each
    gradient the derivative of `seed` x the sum, added into `grads` = (rest's, stacked's).

    `batch` holds [B, L] arrays: inputs, targets, weights, positions and optionally segments.
    `keep_layer_inputs` False keeps only each stage's input per microbatch in flight (and
    recomputes its layer inputs in the backward slot)."""
    M = spec.microbatches
    replicas = data_parallel_size(shard.mesh)
    cells = {k: split_microbatches(v, M, replicas) for k, v in batch.items()}
    rest_grads, stacked_grads = grads
    replicated = PartitionSpec()
    weights = weight_spec(spec)
    token_losses, rest_sum, stacked_grads = jax.shard_map(
        lambda *args: _schedule(parts, *args, spec=spec, shard=shard, keep=keep_layer_inputs),
        mesh=shard.mesh,
        in_specs=(replicated, weights, weights, replicated, replicated),
        out_specs=(replicated, replicated, weights),
        axis_names=frozenset({AXIS}),
    )(rest, stacked, stacked_grads, cells, seed)
    # the last stage's per-token losses [M, b, T], summed once, here
    ce_sum = token_losses.sum()
    return ce_sum, (jax.tree.map(jnp.add, rest_grads, rest_sum), stacked_grads)


def in_flight(spec: PipelineSpec) -> int:
    """Waves (a microbatch through one of the stage's layer groups) whose layer inputs a stage
    holds at once: the ring buffer's slots, min(R·M, 2RS − 1)."""
    s, r = spec.stages, spec.repeats
    return min(r * spec.microbatches, 2 * r * s - 1)


def _schedule(parts, rest, stacked, stacked_acc, cells, seed, *, spec, shard, keep):
    S, R, M = spec.stages, spec.repeats, spec.microbatches
    K = in_flight(spec)
    stage = jax.lax.axis_index(AXIS)
    first, last = stage == 0, stage == S - 1
    if R == 1:  # one group of layers: the circular layout's [R, n, ...] with R = 1
        stacked, stacked_acc = jax.tree.map(lambda a: a[None], (stacked, stacked_acc))
    n_layers = jax.tree.leaves(stacked)[0].shape[1]
    segments = cells.get("segments")
    # Differentiated as a per-stage value: the gradient of a value shared by the stages would be
    # summed over them at once (a psum inside the last stage's branch, which the others never
    # join). Each stage sums its own; `gradients` adds them up once, at the end.
    rest = _per_stage(rest)

    def wave(k):
        """(microbatch, its group's index in the wave order, whether the wave is real, the
        layers' shared context) of wave k: groups of S microbatches take each round in turn."""
        group, i = jnp.divmod(jnp.clip(k, 0, R * M - 1), R * S)
        m = group * S + i % S
        c = parts.context(cells["positions"][m], None if segments is None else segments[m])
        return m, i // S, (0 <= k) & (k < R * M), c

    def layer_weights(r, j):
        return jax.tree.map(lambda a: a[r, j], stacked)

    def run_layers(x, r, c):
        """Group r's layers on x: (output, the input of every layer [n, ...])."""

        def one(x, j):
            return parts.layer(layer_weights(r, j), x, c), x

        return jax.lax.scan(one, x, jnp.arange(n_layers))

    def forward(carry: _Carry, t):
        """Wave t − s through the stage (embedded first on stage 0 in round 0); after the last
        round on the last stage, also the head, the loss and the loss's cotangent."""
        k = t - stage
        m, r, valid, c = wave(k)
        x = jax.lax.cond(
            first & (r == 0),
            lambda: parts.embed(rest, cells["inputs"][m], cells["positions"][m]),
            lambda: carry.activation,  # on stage 0, from the last stage's round r − 1
        )
        y, inputs = run_layers(x, r, c)
        # with K < 2RS − 1 (when R·M is) a stale slot's write could land on a wave still
        # in flight: it keeps the slot as it was
        slot = k % K
        saved = carry.saved.at[slot].set(
            jnp.where(valid, inputs if keep else x[None], carry.saved[slot])
        )

        def head(rest_acc, losses):
            ce, vjp = jax.vjp(
                lambda r, y: parts.loss(r, y, cells["targets"][m], cells["weights"][m]), rest, y
            )
            d_rest, g = vjp(_per_stage(jnp.broadcast_to(seed, ce.shape).astype(ce.dtype)))
            return _add(rest_acc, d_rest), losses.at[m].set(ce), g

        def no_head(rest_acc, losses):
            return rest_acc, losses, jnp.zeros_like(y)

        rest_acc, losses, g = jax.lax.cond(
            last & valid & (r == R - 1), head, no_head, carry.rest_grads, carry.token_losses
        )
        carry = carry._replace(
            activation=_shift(y, 1, S), saved=saved, rest_grads=rest_acc, token_losses=losses
        )
        return carry, g

    def backward(carry: _Carry, t, head_cotangent):
        """Backward wave t − ((R + 1)S − 2 − s) (the rounds in reverse) through the stage,
        layer by layer from the saved inputs (and into the embedding on stage 0 in round 0)."""
        m, reverse_r, valid, c = wave(t - ((R + 1) * S - 2 - stage))
        r = R - 1 - reverse_r
        g = carry.cotangent  # from stage s + 1, or on the last stage from stage 0's round r + 1
        if head_cotangent is not None:
            g = jnp.where(last & (r == R - 1), head_cotangent, g)
        inputs = carry.saved[((m // S) * R * S + r * S + m % S) % K]  # its forward wave's slot
        if not keep:
            _, inputs = run_layers(inputs[0], r, c)

        def layer_back(state, j):
            g, acc = state
            _, vjp = jax.vjp(lambda w, x: parts.layer(w, x, c), layer_weights(r, j), inputs[j])
            dw, g = vjp(g)
            # a stale slot's gradient may be anything, inf and nan included: select, not scale
            acc = jax.tree.map(
                lambda a, d: a.at[r, j].add(jnp.where(valid, d, 0).astype(a.dtype)), acc, dw
            )
            return (g, acc), None

        (dx, stacked_acc), _ = jax.lax.scan(
            layer_back, (g, carry.stacked_grads), jnp.arange(n_layers), reverse=True
        )

        def embedding_back(rest_acc):
            _, vjp = jax.vjp(
                lambda r: parts.embed(r, cells["inputs"][m], cells["positions"][m]), rest
            )
            (d_rest,) = vjp(dx)
            return _add(rest_acc, d_rest)

        rest_acc = jax.lax.cond(
            first & valid & (r == 0), embedding_back, lambda a: a, carry.rest_grads
        )
        return carry._replace(
            cotangent=_shift(dx, -1, S), stacked_grads=stacked_acc, rest_grads=rest_acc
        )

    def iteration(carry, t, *, forwards: bool, backwards: bool):
        head_cotangent = None
        if forwards:
            carry, head_cotangent = forward(carry, t)
        if backwards:
            carry = backward(carry, t, head_cotangent)
        return carry, None

    x = jax.eval_shape(lambda: parts.embed(rest, cells["inputs"][0], cells["positions"][0]))
    saved = jnp.zeros((K, n_layers if keep else 1, *x.shape), x.dtype)
    carry = _Carry(
        activation=_per_stage(jnp.zeros(x.shape, x.dtype)),
        cotangent=_per_stage(jnp.zeros(x.shape, x.dtype)),
        saved=_per_stage(shard(saved, (None, None, "batch", "length", "act_embed"))),
        rest_grads=jax.tree.map(jnp.zeros_like, rest),
        stacked_grads=stacked_acc,
        token_losses=_per_stage(jnp.zeros(cells["targets"].shape, jnp.float32)),
    )
    warm_up = R * S - 1  # iterations before the last stage's first backward slot
    phases = (  # (first iteration, iterations, forward slots, backward slots)
        (0, warm_up, True, False),
        (warm_up, R * M + S - 1 - warm_up, True, True),
        (R * M + S - 1, warm_up, False, True),
    )
    for start, length, forwards, backwards in phases:
        body = functools.partial(iteration, forwards=forwards, backwards=backwards)
        carry, _ = jax.lax.scan(body, carry, start + jnp.arange(length))
    losses = jax.lax.psum(carry.token_losses, AXIS)  # each microbatch's, from the last stage
    stacked_grads = carry.stacked_grads
    if R == 1:
        stacked_grads = jax.tree.map(lambda a: a[0], stacked_grads)
    return losses, jax.lax.psum(carry.rest_grads, AXIS), stacked_grads


class _Carry(NamedTuple):
    activation: jax.Array  # from the stage before: the input of this iteration's forward
    cotangent: jax.Array  # from the stage after: the output cotangent of this backward
    saved: jax.Array  # [K, n, ...] the layer inputs of the microbatches in flight
    rest_grads: Any  # float32, the parameters outside the layers
    stacked_grads: Any  # the stage's layers
    token_losses: jax.Array  # [M, b, T] float32, filled by the last stage


def _add(a, b):
    return jax.tree.map(lambda x, y: x + y.astype(x.dtype), a, b)


def _shift(x, by: int, stages: int):
    """x from stage s to stage s + by (mod S): one collective-permute."""
    return jax.lax.ppermute(x, AXIS, [(i, (i + by) % stages) for i in range(stages)])


def _per_stage(x):
    return jax.lax.pcast(x, (AXIS,), to="varying")
