"""Parallelism as data: one table from logical axis names to mesh axes.

The model names every dimension of every weight and activation with a logical name ("embed",
"heads", "batch", ...) and never mentions the mesh. This table decides where each name lives:

    logical name   mesh axes            what it buys
    ------------   ------------------   -------------------------------------------------------
    batch          data, fsdp           data parallelism over both (FSDP is data parallel too)
    layers         pipeline             pipeline stages: each holds a slice of the layer stack
    pipeline_batch data, fsdp, pipeline the embedding's and the head's batch under pipelining:
                                        data parallel over the stages too, each stage's rows
                                        within its replica's (the stream's cells, below)
    pipeline_length pipeline            ... or, where the batch does not divide, their tokens
                                        split over the stages by position (both are per token)
    microbatches   pipeline             the pipeline's stream of microbatches, split over the
                                        stages (jaxlm/model/pipeline.py)
    length         context              context parallelism: every sequence split along its
                                        length, with its positions and document ids
    kv_length      (none)               ... but attention's keys and values whole on every
                                        device: XLA all-gathers them over `context`, once per
                                        layer, and each device attends its own queries
    embed          fsdp                 ZeRO-3: every weight, its gradient and Adam state split
                                        along d_model; XLA all-gathers a layer's weights before
                                        use and reduce-scatters its gradients
    vocab          tensor               Megatron vocab-parallel embedding and logits
    heads          tensor               column-parallel q/k/v, row-parallel attention out
    kv_heads       tensor
    mlp            tensor               column-parallel MLP in, row-parallel MLP out
    repeats, head_dim, positions, act_embed:  not sharded

Axes of size 1 shard nothing, so the one table serves data parallelism (dp=8), FSDP (fsdp=8),
tensor parallelism (tp=4), pipelining (pp=4), context parallelism (cp=4) and every combination
of them: the mesh decides. Weights never name `context`: like data parallelism it splits only
activations, and XLA sums the gradients over it. ZeRO-1
(`train.zero1=true`) is the one variation: the optimizer state's "embed" goes over data x fsdp
while the parameters keep the table above, so only Adam's moments are split over replicas.
Activations use "act_embed" rather than "embed": their d_model stays whole on every device.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm.config import Config
from jaxlm.errors import UsageError

Rules = dict[str, tuple[str, ...]]

RULES: Rules = {
    # parameters
    "layers": ("pipeline",),
    "repeats": (),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "positions": (),
    # activations
    "batch": ("data", "fsdp"),
    "pipeline_batch": ("data", "fsdp", "pipeline"),
    "pipeline_length": ("pipeline",),
    "microbatches": ("pipeline",),
    "length": ("context",),
    "kv_length": (),
    "act_embed": (),
}


@dataclasses.dataclass(frozen=True)
class LayoutRules:
    """The rules for parameters and for optimizer state (they differ only under ZeRO-1)."""

    params: Rules
    optimizer: Rules

    @classmethod
    def from_config(cls, cfg: Config) -> "LayoutRules":
        optimizer = dict(RULES, embed=("data", "fsdp")) if cfg.train.zero1 else RULES
        return cls(params=RULES, optimizer=optimizer)


def spec(names: tuple[str | None, ...], rules: Rules = RULES) -> PartitionSpec:
    """PartitionSpec for a tuple of logical names, e.g. ('embed', 'mlp') -> P('fsdp', 'tensor')."""
    parts = []
    for name in names:
        axes = rules[name] if name is not None else ()
        parts.append(axes[0] if len(axes) == 1 else (tuple(axes) or None))
    return PartitionSpec(*parts)


def named(mesh: Mesh, names: tuple[str | None, ...], rules: Rules = RULES) -> NamedSharding:
    return NamedSharding(mesh, spec(names, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    """A whole copy on every device: scalars, metrics, the step counter."""
    return NamedSharding(mesh, PartitionSpec())


def tree_shardings(mesh: Mesh, logical_axes, rules: Rules = RULES):
    """NamedShardings for a tree whose leaves are tuples of logical names."""
    return jax.tree.map(lambda names: named(mesh, names, rules), logical_axes, is_leaf=_is_axes)


def optimizer_shardings(
    mesh: Mesh, tx: optax.GradientTransformation, abstract_params, logical_axes, rules: Rules
):
    """Shardings for `tx`'s state: param-shaped parts follow the params, the rest replicated."""
    abstract_state = jax.eval_shape(tx.init, abstract_params)
    param_shardings = tree_shardings(mesh, logical_axes, rules)
    return optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract_state,
        param_shardings,
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token arrays [batch, length]: rows split over every data-parallel device."""
    return named(mesh, ("batch", "length"))


def abstract_target(tree, shardings):
    """ShapeDtypeStructs carrying `shardings`: what a restore fills in, or what a step is
    compiled for ahead of time, without allocating anything."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def split_rows(x, parts: int):
    """[B, ...] -> [parts, B / parts, ...] without moving data between devices.

    Row i goes to part i % parts: each device's contiguous block of rows splits into its own
    share of every part, so the batch sharding carries over to each part unchanged. Gradient
    accumulation splits the batch into micro batches this way, the pipeline into microbatches.
    """
    x = x.reshape(x.shape[0] // parts, parts, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1)


def merge_rows(x):
    """The inverse of `split_rows`."""
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)


@dataclasses.dataclass(frozen=True)
class ActivationSharding:
    """Pins activations to the table's layout inside the model; a no-op without a mesh.

    Hashable (a static part of the model's graph definition), so one model definition can be
    traced for any mesh, or for none in a notebook or a converter.
    """

    mesh: Mesh | None = None
    rules: tuple[tuple[str, tuple[str, ...]], ...] = tuple(RULES.items())

    def __call__(self, x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
        if self.mesh is None:
            return x
        return jax.lax.with_sharding_constraint(
            x, named(self.current_mesh(), names, dict(self.rules))
        )

    def current_mesh(self):
        """The mesh, or inside a shard_map (the pipeline's stages) the mesh as the shard_map
        sees it, its manual axes marked; the activations' names never use them."""
        context = jax.sharding.get_abstract_mesh()
        return context if context.manual_axes else self.mesh

    def ways(self, name: str) -> int:
        """Into how many pieces the mesh splits the logical dimension `name` (1 without one)."""
        rules = dict(self.rules)
        return 1 if self.mesh is None else math.prod(self.mesh.shape[a] for a in rules[name])

    def fits(self, shape: tuple[int, ...], names: tuple[str | None, ...]) -> bool:
        """Whether every dimension divides by the mesh axes that `names` put on it."""
        rules = dict(self.rules)
        return self.mesh is None or all(
            size % math.prod(self.mesh.shape[a] for a in (rules[n] if n else ())) == 0
            for size, n in zip(shape, names, strict=True)
        )


# --- what must divide what ----------------------------------------------------------------------


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in RULES["batch"])


def pipeline_schedule(cfg: Config, stages: int) -> str:
    """The schedule a step with `stages` pipeline stages runs: train.pipeline_schedule under a
    pipeline, else gpipe (no pipeline: plain autodiff)."""
    return cfg.train.pipeline_schedule if stages > 1 else "gpipe"


def pipeline_geometry(cfg: Config, mesh: Mesh) -> tuple[int, int, int]:
    """(stages, repeats, microbatches) of the pipeline; (1, 1, 1) without one."""
    t, stages, repeats = cfg.train, mesh.shape["pipeline"], cfg.train.pipeline_repeats
    if stages == 1:
        if repeats > 1:
            raise UsageError("train.pipeline_repeats needs a pipeline: add pp=N to the mesh")
        return 1, 1, 1
    schedule = t.pipeline_schedule
    if schedule == "gpipe" and repeats > 1:
        raise UsageError(
            f"train.pipeline_repeats={repeats} runs the circular schedule: set "
            f"train.pipeline_schedule=circular"
        )
    if schedule == "circular" and repeats == 1:
        raise UsageError(
            "train.pipeline_schedule=circular needs train.pipeline_repeats of 2 or more "
            "(layer groups per stage)"
        )
    if schedule == "1f1b" and t.loss_chunks > 1:
        raise UsageError(
            "train.loss_chunks does not apply to train.pipeline_schedule=1f1b, whose head "
            "already runs on one microbatch at a time: leave it at 1"
        )
    layers = cfg.model.n_layers
    if layers % (stages * repeats):
        raise UsageError(
            f"model.n_layers={layers} is not divisible by {stages} pipeline stages x "
            f"{repeats} repeats = {stages * repeats}"
        )
    micro, _ = batch_geometry(cfg, mesh)
    if t.microbatches is None and micro < stages:
        raise UsageError(
            f"each data-parallel replica runs {micro} sequences per forward pass, fewer than the "
            f"{stages} pipeline stages: raise train.global_batch_size or train.micro_batch_size "
            f"to give every stage a sequence"
        )
    # Megatron's rule by default: one sequence per microbatch, the smallest bubble; the
    # activations a stage keeps for the backward pass do not grow with M (jaxlm/cost/memory.py)
    microbatches = t.microbatches or micro
    if microbatches < stages:
        raise UsageError(
            f"train.microbatches={microbatches} is fewer than the {stages} pipeline stages: "
            f"use at least {stages} (more shrink the bubble)"
        )
    if micro % microbatches:
        raise UsageError(
            f"train.microbatches={microbatches} does not divide the {micro} sequences each "
            f"data-parallel replica runs per forward pass (train.micro_batch_size)"
        )
    if schedule == "1f1b" and repeats > 1 and microbatches % stages:
        raise UsageError(
            f"interleaved 1F1B (train.pipeline_repeats={repeats}) runs the microbatches in "
            f"groups of the {stages} stages: train.microbatches={microbatches} must be a "
            f"multiple of {stages}"
        )
    return stages, repeats, microbatches


def batch_geometry(cfg: Config, mesh: Mesh) -> tuple[int, int]:
    """(micro batch per replica, accumulation steps) with GBS = MBS x GAS x data-parallel size."""
    t, dp = cfg.train, data_parallel_size(mesh)
    if t.global_batch_size % dp:
        raise UsageError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by the "
            f"data-parallel size {dp} (data x fsdp)"
        )
    per_replica = t.global_batch_size // dp
    micro = t.micro_batch_size or per_replica
    if per_replica % micro:
        raise UsageError(
            f"train.micro_batch_size={micro} does not divide the {per_replica} sequences each "
            f"data-parallel replica gets (global batch {t.global_batch_size} / {dp} replicas)"
        )
    if micro % t.loss_chunks:
        raise UsageError(
            f"train.loss_chunks={t.loss_chunks} does not divide the micro batch of {micro} "
            f"sequences per data-parallel replica"
        )
    return micro, per_replica // micro


def check_layout(cfg: Config, mesh: Mesh, rules: LayoutRules) -> None:
    """Every dimension the rules shard must divide evenly by the mesh axes that shard it."""
    m = cfg.model
    sizes = {
        "vocab": ("model.vocab_size", m.vocab_size),
        "embed": ("model.d_model", m.d_model),
        "heads": ("model.n_heads", m.n_heads),
        "kv_heads": ("model.n_kv_heads", m.kv_heads),
        "mlp": ("model.d_ff", m.d_ff),
    }
    for table in (rules.params, rules.optimizer):
        for logical, (key, size) in sizes.items():
            axes = table[logical]
            shards = math.prod(mesh.shape[a] for a in axes)
            if size % shards:
                where = " x ".join(f"{a}={mesh.shape[a]}" for a in axes)
                raise UsageError(
                    f"{key}={size} is not divisible by {where}, which shards the "
                    f"'{logical}' axis: choose sizes that divide or another mesh"
                )
    context = mesh.shape["context"]
    if context > 1 and cfg.train.seq_len % (2 * context):
        raise UsageError(
            f"train.seq_len={cfg.train.seq_len} is not divisible by 2 x context={context}: "
            f"context parallelism cuts each sequence into 2 x cp equal chunks"
        )
    if context > 1 and mesh.shape["pipeline"] > 1 and m.context_attention == "ring":
        raise UsageError(
            "model.context_attention=ring does not run inside a pipeline's stages: use "
            "all_gather (or auto) with pp"
        )
    batch_geometry(cfg, mesh)
    pipeline_geometry(cfg, mesh)
