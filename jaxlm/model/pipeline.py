"""Pipeline parallelism: the stacked layers as stages on the `pipeline` mesh axis, in one SPMD
program.

The layer axis is split into S stages: a stage is one slice of the stacked weights, sharded over
`pipeline`, so each device holds only its stage's layers. The batch is cut into M microbatches.
At every iteration of a scan all stages run at once (a `vmap` over the stage axis, which XLA
partitions over `pipeline`), each on the microbatch in front of it; then the activations move one
stage on with `jnp.roll`, which XLA lowers to a collective-permute. Autodiff of the scan gives
the backward pass (GPipe: all forwards, then all backwards).

Circular schedule (`repeats` R > 1): the layers form S·R groups and stage s holds groups
s, s + S, s + 2S, ... (stored as [R, L/R, ...] with the second axis sharded, so the flat order
stays the execution order). A microbatch goes round the ring R times; what leaves the last stage
arrives at stage 0 with the same roll and waits there until stage 0 is free for it (M >= S).

    iterations = R·M + S − 1        bubble = (S − 1) / (R·M + S − 1)

Wave k = t − s is what stage s works on at iteration t: microbatch k mod M in round k div M.
Stages whose wave is outside [0, R·M) compute on stale data that nothing reads. Stage 0 keeps
two buffers, filled by the wrap-around: microbatches waiting for their next round, and finished
ones. Embedding, final norm and head stay outside, on the whole batch.

Memory (what autodiff of the scan keeps for the backward pass, read from the saved residuals
and XLA's temporaries; benchmarks/pipeline_memory.py measures it):
- per iteration, of which there are R·M + S − 1: what the recomputation policy saves for each
  of the stage's L / (S·R) layers on one microbatch (`remat=full`: each layer's input, b × T × D
  in the compute dtype), the stage-input mask of `receive` (b × T × D booleans) and the rotary
  tables of the microbatch (b × T × head_dim float32);
- once: the stage's weights. With R = 1 they are sliced statically, so the residuals that need
  them are loop-invariant and autodiff keeps one copy. With R > 1 the round's slice depends on
  the iteration: each layer slices its weights inside its recomputation region (with
  `remat=none`, one that keeps every matmul's output), so the backward pass slices them again
  instead of keeping a copy per iteration;
- once: the microbatch inputs and the finished buffer, [M, b, T, D] on every stage, and their
  cotangents;
- outside the pipeline, the head and the loss on the whole batch, its tokens split over
  `pipeline` (by sequence, else by position): logits in the compute dtype, their float32
  softmax and its gradient. For small models this is the largest term, and it grows with M
  when the micro batch does, unless `train.loss_chunks` runs the head on slices in turn.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxlm.sharding import merge_rows, split_rows


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    stages: int = 1
    repeats: int = 1
    microbatches: int = 1

    @property
    def bubble(self) -> float:
        """The idle share of each stage's time: (S − 1) / (R·M + S − 1)."""
        s, r, m = self.stages, self.repeats, self.microbatches
        return (s - 1) / (r * m + s - 1)


def to_stages(w, spec: PipelineSpec):
    """Stacked weights [L, ...] (or [R, L/R, ...]) -> [S, R, L/(S·R), ...], no data moved:
    stage s's slice is the part of the stack its devices already hold."""
    s, r = spec.stages, spec.repeats
    lead = 2 if r > 1 else 1  # [R, L/R, ...] or [L, ...]
    w = w.reshape(r, s, w.shape[lead - 1] // s, *w.shape[lead:])
    return jnp.swapaxes(w, 0, 1)


def run(layers: Callable, stacked, x_BxLxD, positions_BxL, segments_BxL, spec: PipelineSpec):
    """`layers(params, x, positions, segments)` applies a slice of the stack (leading axis n) to
    one microbatch, and `layers(params, ..., group=r)` the group r of [R, n, ...] weights;
    returns the output of the whole stack for the whole batch, [B, L, D]."""
    S, R, M = spec.stages, spec.repeats, spec.microbatches
    rounds = R * M
    inputs = split_rows(x_BxLxD, M)  # [M, b, L, D], on every stage
    positions = split_rows(positions_BxL, M)
    segments = None if segments_BxL is None else split_rows(segments_BxL, M)
    stage_params = jax.tree.map(lambda w: to_stages(w, spec), stacked)

    def run_stage(params, x, r, m):
        seg = None if segments is None else segments[m]
        if R == 1:
            # A static slice: the weights the backward pass needs are then loop-invariant, and
            # autodiff of the scan keeps one copy of them instead of one per iteration.
            return layers(jax.tree.map(lambda w: w[0], params), x, positions[m], seg)
        # This round's group depends on the iteration: `layers` slices each layer's weights
        # where it recomputes them, so no slice is kept per iteration.
        return layers(params, x, positions[m], seg, group=r)

    stage_ids = jnp.arange(S)

    def receive(state, waiting, done, t):
        """Stage 0 files what arrived by the wrap-around (the last stage's wave t − S), then
        takes its own input for wave t; other stages take what the roll brought."""
        k = t - S
        arrived = (k >= 0) & (k < rounds)
        m_in, r_in = k % M, k // M
        m, r = t % M, t // M

        def per_stage(is_first, x, waiting, done):
            store = is_first & arrived
            done = done.at[m_in].set(jnp.where(store & (r_in == R - 1), x, done[m_in]))
            fresh = inputs[m]
            if R > 1:  # the circular schedule: microbatches wait at stage 0 for their next round
                waiting = waiting.at[m_in].set(jnp.where(store & (r_in < R - 1), x, waiting[m_in]))
                fresh = jnp.where(r == 0, fresh, waiting[m])
            return jnp.where(is_first, fresh, x), waiting, done

        return jax.vmap(per_stage, spmd_axis_name="pipeline")(stage_ids == 0, state, waiting, done)

    def iteration(carry, t):
        state, waiting, done = receive(*carry, t)
        wave = jnp.clip(t - stage_ids, 0, rounds - 1)
        out = jax.vmap(run_stage, spmd_axis_name="pipeline")(
            stage_params, state, wave // M, wave % M
        )
        return (jnp.roll(out, 1, axis=0), waiting, done), None  # one hop: collective-permute

    done = jnp.zeros((S, *inputs.shape), inputs.dtype)  # [S, M, b, L, D]; stage 0's is used
    waiting = done if R > 1 else jnp.zeros((S,), inputs.dtype)  # unused without rounds
    state = jnp.zeros((S, *inputs.shape[1:]), inputs.dtype)
    carry, _ = jax.lax.scan(iteration, (state, waiting, done), jnp.arange(rounds + S - 1))
    _, _, done = receive(*carry, rounds + S - 1)  # file the last wave
    return merge_rows(done[0])
