"""Pipeline parallelism: the stacked layers as stages on the `pipeline` mesh axis, in one SPMD
program.

The layer axis is split into S stages: a stage is one slice of the stacked weights, sharded over
`pipeline`, so each device holds only its stage's layers. The batch is cut into M microbatches.
The pipeline is a `shard_map` that is manual over `pipeline` only (data, fsdp and tensor stay
XLA's to partition inside it): every stage runs one scan, and at each iteration it applies its
layers to the microbatch in front of it and passes the result one stage on with a `ppermute`
(a collective-permute). Autodiff of the scan gives the backward pass (GPipe: all forwards, then
all backwards); the permutes transpose to permutes the other way. The 1F1B schedule, which
interleaves them and keeps at most 2S − 1 microbatches per stage, is
jaxlm/model/pipeline_1f1b.py; it shares `split_microbatches` with this one.

Circular schedule (`repeats` R > 1): the layers form S·R groups and stage s holds groups
s, s + S, s + 2S, ... (stored as [R, L/R, ...] with the second axis sharded, so the flat order
stays the execution order). A microbatch goes round the ring R times; what leaves the last stage
arrives at stage 0 with the same permute and waits there until stage 0 is free for it (M >= S).

    iterations = R·M + S − 1        bubble = (S − 1) / (R·M + S − 1)

Wave k = t − s is what stage s works on at iteration t: microbatch k mod M in round k div M.
Stages whose wave is outside [0, R·M) compute on stale data that nothing reads.

The stream. The microbatches' inputs and the finished outputs share one buffer split over the
stages (MaxText's "state_io"): N = ⌈M/S⌉·S cells, stage s holding cells s·K ... s·K + K − 1 in
its K = N/S slots, so each stage holds K ≈ M/S microbatches instead of M. Cell m starts with
microbatch m's input, and the batch is cut so that the embedding's output already lies there
(`split_microbatches`). Stage 0 reads cell t mod N at iteration t: for that, slot t mod K
moves one stage to the left at iteration t (a second collective-permute of one microbatch,
independent of the iteration's compute, so XLA can overlap it), and after S turns of its slot a
cell is back on its own stage. The cell stage 0 has just read reaches the last stage with that
move, which writes its own output into it: the output of iteration t lands in cell t mod N, so
microbatch m's final output is in cell (R−1)·M + S − 1 + m (mod N), read off once after the
loop (a shift by S − 1 cells, and the head's resharding).

Memory per stage (what autodiff of the scan keeps for the backward pass, read from the saved
residuals and XLA's temporaries; benchmarks/pipeline_memory.py measures it):
- per iteration, of which there are R·M + S − 1: what the recomputation policy saves for each
  of the stage's L / (S·R) layers on one microbatch (`remat=full`: each layer's input, b × T × D
  in the compute dtype) and the microbatch's rotary tables (b × T × head_dim float32) and, with
  packed documents, its attention mask (b × T × T booleans); every choice between the stream,
  the received activation and the waiting buffer is a select on a scalar, which keeps nothing;
- once: the stage's weights. With R = 1 they are used whole, so the residuals that need them
  are loop-invariant and autodiff keeps one copy. With R > 1 the round's slice depends on the
  iteration: each layer slices its weights inside its recomputation region (with `remat=none`,
  one that keeps every matmul's output), so the backward pass slices them again instead of
  keeping a copy per iteration;
- once: the stream, K = N / S microbatches, and its cotangent; with R > 1 also the waiting
  buffer of M microbatches (on every stage, used on stage 0) and its cotangent;
- once, in float32: the stage's weight gradients twice, the sum over iterations and, while one
  iteration's backward pass runs, the layer scan's stacked gradients of that iteration; and
  the stage's weights in the compute dtype (XLA casts them once, outside the loop);
- on XLA:CPU only, with bfloat16: the CPU widens bfloat16 dynamic slices to float32 and hoists
  the widening of the whole residual stack out of the backward loop, so there the residuals
  cost three times their size (float16 and float32 are kept as they are; GPUs keep bfloat16);
- outside the pipeline, the head and the loss on the whole batch, its tokens split over
  `pipeline` (by sequence, else by position): logits in the compute dtype, their float32
  softmax and its gradient. For small models this is the largest term, and it grows with M
  when the micro batch does, unless `train.loss_chunks` runs the head on slices in turn.
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxlm.sharding import ActivationSharding, data_parallel_size

AXIS = "pipeline"


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


def weight_spec(spec: PipelineSpec) -> PartitionSpec:
    """Where the stacked weights' layer axis is split over the stages: [L, ...], or the second
    axis of the circular layout [R, L/R, ...]. Each stage then holds its own layers, whole."""
    return PartitionSpec(AXIS) if spec.repeats == 1 else PartitionSpec(None, AXIS)


def run(
    layers: Callable,
    stacked,
    x_BxLxD,
    positions_BxL,
    segments_BxL,
    spec: PipelineSpec,
    shard: ActivationSharding,
):
    """`layers(params, x, positions, segments)` applies a slice of the stack (leading axis n) to
    one microbatch, and `layers(params, ..., group=r)` the group r of [R, n, ...] weights;
    returns the output of the whole stack for the whole batch, [B, L, D]."""
    S, R, M = spec.stages, spec.repeats, spec.microbatches
    N = -(-M // S) * S  # stream cells: the M inputs, padded to a whole slot on every stage
    replicas = data_parallel_size(shard.mesh)

    cells = split_microbatches(x_BxLxD, M, replicas)
    cells = jnp.pad(cells, [(0, N - M)] + [(0, 0)] * (cells.ndim - 1))
    stream = shard(cells, ("microbatches", "batch", "length", "act_embed"))
    positions = split_microbatches(positions_BxL, M, replicas)  # small: on every stage
    segments = None if segments_BxL is None else split_microbatches(segments_BxL, M, replicas)

    replicated = PartitionSpec()
    stream = jax.shard_map(
        functools.partial(_schedule, layers, spec=spec),
        mesh=shard.mesh,
        in_specs=(weight_spec(spec), PartitionSpec(AXIS), replicated, replicated),
        out_specs=PartitionSpec(AXIS),
        axis_names=frozenset({AXIS}),
    )(stacked, stream, positions, segments)
    first = ((R - 1) * M + S - 1) % N  # the cell of microbatch 0's final output
    return merge_microbatches(jnp.roll(stream, -first, axis=0)[:M], replicas)


def split_microbatches(x, microbatches: int, replicas: int):
    """[B, ...] -> [M, B / M, ...]: each data-parallel replica's contiguous block of rows is cut
    into M contiguous microbatches, and microbatch m takes its block's m-th piece from every
    replica. With the batch split over (replicas, stages) and M over the stages, both are
    tilings, so the embedding's output already lies where its stream cells do: no data moves.
    """
    x = x.reshape(replicas, microbatches, -1, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape(microbatches, -1, *x.shape[3:])


def merge_microbatches(x, replicas: int):
    """The inverse of `split_microbatches`."""
    x = x.reshape(x.shape[0], replicas, -1, *x.shape[2:])
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[3:])


def _schedule(layers, params, stream, positions, segments, *, spec: PipelineSpec):
    """One stage's side of the pipeline (inside the shard_map): its K stream cells in, the same
    cells with the final outputs written into them out."""
    S, R, M = spec.stages, spec.repeats, spec.microbatches
    rounds, K = R * M, stream.shape[0]
    stage = jax.lax.axis_index(AXIS)
    first, last = stage == 0, stage == S - 1

    def run_stage(x, wave):
        m = wave % M
        seg = None if segments is None else segments[m]
        if R == 1:
            return layers(params, x, positions[m], seg)
        # This round's group depends on the iteration: `layers` slices each layer's weights
        # where it recomputes them, so no slice is kept per iteration.
        return layers(params, x, positions[m], seg, group=wave // M)

    def iteration(carry, t):
        received, stream, waiting = carry
        slot = t % K
        x = stream[slot]  # on stage 0: cell t mod N, microbatch t's input
        if R > 1:
            # the circular schedule: what the last stage finished at t − 1 (wave t − S) waits
            # at stage 0 for its next round; from round 1 on, stage 0 takes its input there
            k = t - S
            filed = first & (k >= 0) & (k // M < R - 1)
            waiting = waiting.at[k % M].set(jax.lax.select(filed, received, waiting[k % M]))
            x = jax.lax.select(t < M, x, waiting[t % M])
        x = jax.lax.select(first, x, received)
        wave = jnp.clip(t - stage, 0, rounds - 1)
        out = run_stage(x, wave)
        # the slot moves one stage left: the cell stage 0 just read reaches the last stage,
        # which fills it with its output
        moved = _shift(stream[slot], -1, S)
        stream = stream.at[slot].set(jax.lax.select(last, out, moved))
        return (_shift(out, 1, S), stream, waiting), None

    iterations = rounds + S - 1
    # fresh buffers, marked as differing from stage to stage like everything the scan carries
    received = _per_stage(jnp.zeros(stream.shape[1:], stream.dtype))
    waiting = _per_stage(jnp.zeros((M if R > 1 else 0, *stream.shape[1:]), stream.dtype))
    (_, stream, _), _ = jax.lax.scan(iteration, (received, stream, waiting), jnp.arange(iterations))
    # Slot j moved at iterations j, j + K, ...: finish its last turn round the ring, so that
    # every cell is back on its own stage (slots below `iterations % K` moved once more).
    moved = iterations // K
    for slots, turns in ((slice(0, iterations % K), moved + 1), (slice(iterations % K, K), moved)):
        if turns % S and slots.start < slots.stop:
            stream = stream.at[slots].set(_shift(stream[slots], -(-turns % S), S))
    return stream


def _shift(x, by: int, stages: int):
    """x from stage s to stage s + by (mod S): one collective-permute."""
    return jax.lax.ppermute(x, AXIS, [(i, (i + by) % stages) for i in range(stages)])


def _per_stage(x):
    return jax.lax.pcast(x, (AXIS,), to="varying")
