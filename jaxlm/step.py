"""The train state and the pure, jitted functions over it: init in place, train step, eval step.

Nothing here keeps Python state or does I/O. `build_program` wires model, optimizer and the
layout table into the functions the loop calls:

    program = build_program(cfg, mesh)
    state = program.init(jax.random.key(seed))          # created directly in its shards
    state, metrics = program.train_step(state, batch, loss_limit)   # state donated

One optimizer step sees the global batch GBS = micro batch x accumulation steps x data-parallel
size. Gradients of the micro batches are summed inside the jitted step (a scan), each already
divided by the global batch's token count, so accumulating four micro batches of two is the
same computation as one batch of eight. A micro batch's gradients come from autodiff of the
forward pass (a GPipe or circular pipeline's among it), or, under
`train.pipeline_schedule=1f1b`, from the 1F1B schedule, which runs the backward pass itself.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm import model as model_lib
from jaxlm import optim, sharding
from jaxlm.config import Config
from jaxlm.model import pipeline_1f1b

Batch = dict[str, jax.Array]  # inputs, targets, weights [B, L]; optionally positions, segments


@struct.dataclass
class LossScale:
    """Dynamic loss scaling for float16 (Megatron's and Apex's rule): halve the scale on an
    overflow, double it after `period` finite steps. Constant 1 for float32 and bfloat16.
    (flax's DynamicScale wraps one value_and_grad call and cannot span an accumulation loop.)
    """

    value: jax.Array
    finite_steps: jax.Array

    @classmethod
    def initial(cls, cfg: Config) -> "LossScale":
        value = cfg.train.loss_scale if cfg.model.compute_dtype == "float16" else 1.0
        return cls(jnp.float32(value), jnp.int32(0))

    def adjust(self, finite: jax.Array, period: int) -> "LossScale":
        grow = finite & (self.finite_steps + 1 >= period)
        value = jnp.where(finite, jnp.where(grow, self.value * 2, self.value), self.value / 2)
        return LossScale(
            jnp.maximum(value, 1.0), jnp.where(finite & ~grow, self.finite_steps + 1, 0)
        )


@struct.dataclass
class TrainState:
    step: jax.Array  # int32: steps taken (batches consumed), skipped ones included
    skipped: jax.Array  # int32: steps whose update was dropped (non-finite, or a loss spike)
    params: model_lib.Params
    opt_state: Any
    loss_scale: LossScale


@dataclasses.dataclass(frozen=True)
class Program:
    """What the loop needs for one config on one mesh (data, not behaviour)."""

    spec: model_lib.ModelSpec
    state_shardings: TrainState  # a NamedSharding per leaf
    batch_sharding: NamedSharding
    micro_batch: int  # sequences per data-parallel replica per forward pass
    accumulation: int  # micro batches per optimizer step
    stages: model_lib.PipelineSpec  # the pipeline (1 stage: none)
    init: Callable[[jax.Array], TrainState]
    train_step: Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict]]
    # (sum of token cross-entropies, target tokens) of one batch: jaxlm.evaluation reduces them
    eval_step: Callable[[TrainState, Batch], tuple[jax.Array, jax.Array]]


def build_program(cfg: Config, mesh: Mesh) -> Program:
    rules = sharding.LayoutRules.from_config(cfg)
    sharding.check_layout(cfg, mesh, rules)
    micro_batch, accumulation = sharding.batch_geometry(cfg, mesh)
    stages = model_lib.PipelineSpec(*sharding.pipeline_geometry(cfg, mesh))
    shard = sharding.ActivationSharding(mesh)
    spec = model_lib.describe(cfg.model, shard, stages)
    tx = optim.make_optimizer(cfg.train, spec.shapes)

    replicated = sharding.replicated(mesh)
    param_shardings = sharding.tree_shardings(mesh, spec.axes, rules.params)
    state_shardings = TrainState(
        step=replicated,
        skipped=replicated,
        params=param_shardings,
        opt_state=sharding.optimizer_shardings(mesh, tx, spec.shapes, spec.axes, rules.optimizer),
        loss_scale=LossScale(replicated, replicated),
    )
    # Under ZeRO-1 the summed gradients take the optimizer's layout, so XLA reduce-scatters
    # them and each replica updates only its slice before the parameters are all-gathered.
    grad_shardings = sharding.tree_shardings(mesh, spec.axes, rules.optimizer)
    batch_sharding = sharding.batch_sharding(mesh)

    def init(key):
        _, params = model_lib.build(cfg.model, key, shard, stages)
        return TrainState(
            jnp.int32(0), jnp.int32(0), params, tx.init(params), LossScale.initial(cfg)
        )

    loss_fn = make_loss_fn(spec.graphdef, cfg.train.loss_chunks)
    add_gradients = make_add_gradients(cfg, spec.graphdef, stages, shard, loss_fn)
    step_fn = make_train_step(
        cfg, tx, add_gradients, accumulation, param_shardings, grad_shardings, batch_sharding
    )
    return Program(
        spec=spec,
        state_shardings=state_shardings,
        batch_sharding=batch_sharding,
        micro_batch=micro_batch,
        accumulation=accumulation,
        stages=stages,
        init=jax.jit(init, out_shardings=state_shardings),
        train_step=jax.jit(
            step_fn,
            in_shardings=(state_shardings, batch_sharding, replicated),
            out_shardings=(state_shardings, replicated),
            donate_argnums=0,
        ),
        eval_step=jax.jit(
            lambda state, batch: loss_fn(state.params, batch),
            in_shardings=(state_shardings, batch_sharding),
            out_shardings=replicated,
        ),
    )


@jax.named_scope("loss")
def _token_cross_entropy(logits_BxLxV, targets_BxL, weights_BxL):
    """Each token's cross-entropy times its weight, [B, L] float32."""
    # float32 for the softmax: bf16 log-sum-exp over a 50k vocabulary loses the loss's digits.
    ce_BxL = optax.softmax_cross_entropy_with_integer_labels(
        logits_BxLxV.astype(jnp.float32), targets_BxL
    )
    return ce_BxL * weights_BxL.astype(jnp.float32)


@jax.named_scope("loss")
def _token_cross_entropy_without_gather(logits_BxLxV, targets_BxL, weights_BxL):
    """`_token_cross_entropy`, the target's logit picked by a select and a sum over the
    vocabulary instead of a gather: inside a shard_map over pipeline, a gather along a
    vocabulary split over tensor, with a batch split over data, crashes XLA's SPMD
    partitioner (jax 0.10.2). XLA fuses the select into the sum; no one-hot is stored."""
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    vocab = jnp.arange(logits_BxLxV.shape[-1])
    picked_BxL = jnp.where(vocab == targets_BxL[..., None], logits_BxLxV, 0).sum(-1)
    ce_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1) - picked_BxL
    return ce_BxL * weights_BxL.astype(jnp.float32)


def _cross_entropy_sums(logits_BxLxV, targets_BxL, weights_BxL):
    ce_BxL = _token_cross_entropy(logits_BxLxV, targets_BxL, weights_BxL)
    return ce_BxL.sum(), weights_BxL.astype(jnp.float32).sum()


def make_loss_fn(graphdef, chunks: int = 1):
    """loss_sums(params, batch) -> (sum of token cross-entropies, number of target tokens).

    With `chunks` > 1 the head and the loss run on that many slices of the batch's rows in turn
    (`split_rows`: each keeps the batch's sharding), recomputed in the backward pass: only one
    slice's logits and softmax are alive at a time, instead of the whole batch's. The price:
    the head's weight gradient is summed over the devices that split the rows once per slice.
    """

    def loss_sums(params, batch: Batch):
        inputs = (batch["inputs"], batch.get("positions"), batch.get("segments"))
        if chunks == 1:
            logits_BxLxV = model_lib.apply(graphdef, params, *inputs)
            return _cross_entropy_sums(logits_BxLxV, batch["targets"], batch["weights"])
        x_BxLxD = model_lib.hidden(graphdef, params, *inputs)

        @functools.partial(jax.checkpoint, prevent_cse=False)
        def add_chunk(sums, chunk):
            x_CxLxD, targets_CxL, weights_CxL = chunk
            logits_CxLxV = model_lib.head(graphdef, params, x_CxLxD)
            total, count = _cross_entropy_sums(logits_CxLxV, targets_CxL, weights_CxL)
            return (sums[0] + total, sums[1] + count), None

        parts = [
            sharding.split_rows(a, chunks) for a in (x_BxLxD, batch["targets"], batch["weights"])
        ]
        zero = jnp.zeros((), jnp.float32)
        sums, _ = jax.lax.scan(add_chunk, (zero, zero), parts)
        return sums

    return loss_sums


# add_gradients(params, batch, seed, grads) -> (sum of token cross-entropies, grads + seed x
# the sum's gradient): one micro batch's contribution to the step's summed gradients.
AddGradients = Callable[[model_lib.Params, Batch, jax.Array, model_lib.Params], tuple]


def make_add_gradients(
    cfg: Config,
    graphdef,
    stages: model_lib.PipelineSpec,
    shard: sharding.ActivationSharding,
    loss_sums,
) -> AddGradients:
    """The step's gradients: by the 1F1B schedule where the pipeline runs it, else by autodiff
    of `loss_sums`."""
    if sharding.pipeline_schedule(cfg, stages.stages) == "1f1b":
        return make_1f1b_gradients(cfg, graphdef, stages, shard)
    return make_autodiff_gradients(loss_sums)


def make_autodiff_gradients(loss_sums) -> AddGradients:
    """Gradients by autodiff of the whole forward pass (a GPipe pipeline's among it)."""

    def add_gradients(params, batch: Batch, seed, grads):
        ce_sum, vjp = jax.vjp(lambda p: loss_sums(p, batch)[0], params)
        (new,) = vjp(seed)
        return ce_sum, jax.tree.map(jnp.add, grads, new)

    return add_gradients


def make_1f1b_gradients(
    cfg: Config, graphdef, stages: model_lib.PipelineSpec, shard: sharding.ActivationSharding
) -> AddGradients:
    """Gradients by the 1F1B schedule (jaxlm/model/pipeline_1f1b.py): forward and backward
    interleaved stage by stage, each layer's gradient added into `grads` in place."""

    def add_gradients(params, batch: Batch, seed, grads):
        batch = dict(batch)
        if "positions" not in batch:
            batch["positions"] = model_lib.default_positions(batch["inputs"])
        ce_sum, (rest, layers) = pipeline_1f1b.gradients(
            model_lib.stage_parts(graphdef, params, _token_cross_entropy_without_gather),
            model_lib.without_layers(params),
            params["layers"],
            batch,
            seed,
            (model_lib.without_layers(grads), grads["layers"]),
            stages,
            shard,
            keep_layer_inputs=cfg.model.remat != "full",
        )
        return ce_sum, {**rest, "layers": layers}

    return add_gradients


def make_train_step(
    cfg: Config,
    tx,
    add_gradients: AddGradients,
    accumulation: int,
    param_shardings,
    grad_shardings,
    batch_sharding: NamedSharding,
):
    schedule = optim.schedule(cfg.train)
    float16 = cfg.model.compute_dtype == "float16"
    micro_sharding = NamedSharding(batch_sharding.mesh, PartitionSpec(None, *batch_sharding.spec))

    def train_step(state: TrainState, batch: Batch, loss_limit: jax.Array):
        """One optimizer step; the update is dropped if the loss or gradients are not finite, or
        if the loss exceeds `loss_limit` (a spike; +inf to never skip on size)."""
        n_tokens = batch["weights"].astype(jnp.float32).sum()
        scale = state.loss_scale.value

        # Seeding with 1 / the *global* token count makes the summed micro-batch gradients the
        # gradient of the global mean loss, whatever the accumulation.
        seed = scale / n_tokens

        def accumulate(carry, micro_batch):
            grads_sum, ce_sum = carry
            ce, grads_sum = add_gradients(state.params, micro_batch, seed, grads_sum)
            grads_sum = jax.lax.with_sharding_constraint(grads_sum, param_shardings)
            return (grads_sum, ce_sum + ce), None

        # A loop even for one micro batch: without it XLA's buffers for GPT-3 175B on one
        # Frontier replica grow by 2.5 GB per device (97.7 -> 100.2 GB), and the CPU step
        # gains nothing measurable.
        micro_batches = jax.tree.map(
            lambda x: jax.lax.with_sharding_constraint(
                sharding.split_rows(x, accumulation), micro_sharding
            ),
            batch,
        )
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (grads, ce_sum), _ = jax.lax.scan(accumulate, (zeros, jnp.float32(0)), micro_batches)
        grads = jax.tree.map(lambda g: g / scale, grads)
        grads = jax.lax.with_sharding_constraint(grads, grad_shardings)

        loss = ce_sum / n_tokens
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        good = finite & (loss <= loss_limit)

        def update(params, opt_state):
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        with jax.named_scope("optimizer"):
            # A bad step keeps the old parameters and optimizer state. A branch rather than a
            # select of new and old: the update then runs in place, while a select needs the
            # old optimizer state alive beside the new (a copy of Adam's moments, 2x the
            # parameters in float32, in XLA's buffers).
            params, opt_state = jax.lax.cond(
                good, update, lambda *state: state, state.params, state.opt_state
            )
        loss_scale = (
            state.loss_scale.adjust(finite, cfg.train.loss_scale_period)
            if float16
            else state.loss_scale
        )
        skipped = state.skipped + (~good).astype(jnp.int32)
        new_state = TrainState(state.step + 1, skipped, params, opt_state, loss_scale)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": schedule(state.step - state.skipped),  # the updates applied before this one
            "tokens": n_tokens,
            "skipped": (~good).astype(jnp.int32),
            "skipped_steps": skipped,
            "loss_scale": loss_scale.value,
        }
        return new_state, metrics

    return train_step


def abstract_state(program: Program) -> TrainState:
    """The train state as shapes with their shardings: a restore target, or a compile input."""
    # the key is made inside eval_shape: nothing is put on a device (the loop forbids it)
    shapes = jax.eval_shape(lambda: program.init(jax.random.key(0)))
    return sharding.abstract_target(shapes, program.state_shardings)


def abstract_step_inputs(cfg: Config, program: Program):
    """(state, batch, loss_limit) as shapes with their shardings, for compiling the train step
    ahead of time (`program.train_step.lower(*inputs).compile()`) without allocating anything."""
    state = abstract_state(program)
    rows = (cfg.train.global_batch_size, cfg.train.seq_len)
    keys = ["inputs", "targets", "weights"]
    if cfg.data.source != "synthetic" and not cfg.data.cross_document_attention:
        keys += ["positions", "segments"]  # packed documents, as the data pipeline gives them
    batch = {
        k: jax.ShapeDtypeStruct(
            rows, jnp.float32 if k == "weights" else jnp.int32, sharding=program.batch_sharding
        )
        for k in keys
    }
    limit = jax.ShapeDtypeStruct((), jnp.float32, sharding=program.state_shardings.step)
    return state, batch, limit
