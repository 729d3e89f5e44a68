"""Bytes per device: the train state exactly (from its real shardings), activations estimated.

The state's figure is the sum of each leaf's shard, so it equals what an initialised state
holds on one device. The activations are arithmetic over the model's shapes and the
recomputation policy (`estimate_activation_bytes`); `jaxlm.cost.compiled` gives XLA's own
figure for comparison.
"""

import math

import jax

from jaxlm.model.context import attention_kind
from jaxlm.sharding import pipeline_schedule


def shard_bytes(shapes, shardings) -> int:
    """Bytes of one device's shards of a tree of arrays (or ShapeDtypeStructs)."""
    leaves = jax.tree.leaves(
        jax.tree.map(
            lambda s, sh: math.prod(sh.shard_shape(s.shape)) * s.dtype.itemsize, shapes, shardings
        )
    )
    return int(sum(leaves))


def state_bytes(program) -> dict[str, int]:
    """Bytes per device of parameters, gradients and optimizer state, from the real shardings."""
    state = jax.eval_shape(program.init, jax.random.key(0))
    params = shard_bytes(state.params, program.state_shardings.params)
    return {
        "params": params,
        # the accumulated gradients live in the parameters' layout and dtype (float32)
        "grads": params,
        "optimizer": shard_bytes(state.opt_state, program.state_shardings.opt_state),
    }


def activation_bytes(cfg, program, mesh) -> int:
    """See `estimate_activation_bytes`, for a built program on its mesh."""
    stages = program.stages
    return estimate_activation_bytes(
        cfg,
        program.micro_batch,
        stages.stages,
        mesh.shape["tensor"],
        stages.microbatches,
        stages.repeats,
        mesh.shape["context"],
    )


def pipeline_weight_bytes(cfg, program) -> int:
    """Weight-sized buffers of a pipeline stage beyond the state; 0 without a pipeline.

    GPipe (jaxlm/model/pipeline.py): while one iteration's backward pass runs, its layer scan's
    stacked float32 gradients beside their sum over the iterations; and the stage's weights cast
    once to the compute dtype. 1F1B (jaxlm/model/pipeline_1f1b.py) adds each layer's gradient
    into the step's sum in place and casts one layer at a time; it keeps the gradients of the
    parameters outside the layers (whole on every stage) in float32."""
    if program.stages.stages == 1:
        return 0
    shapes, shardings = program.spec.shapes, program.state_shardings.params
    if pipeline_schedule(cfg, program.stages.stages) == "1f1b":
        rest = {k: v for k, v in shapes.items() if k != "layers"}
        return shard_bytes(rest, {k: shardings[k] for k in rest})
    layers = shard_bytes(shapes["layers"], shardings["layers"])
    c = _itemsize(cfg)
    return layers + (layers * c // 4 if c < 4 else 0)


def _itemsize(cfg) -> int:
    return 4 if cfg.model.compute_dtype == "float32" else 2


def estimate_activation_bytes(
    cfg,
    micro_batch: int,
    stages: int,
    tp: int,
    microbatches: int = 1,
    repeats: int = 1,
    context: int = 1,
) -> int:
    """An estimate of the activations one device keeps for the backward pass, plus the largest
    transient (one layer recomputed, the logits and their gradient).

    Per token and layer, in the compute dtype: `save_dots` keeps the layer input and every
    weight matmul's output (q, k, v, attention out, MLP in and out); `none` also keeps the norms'
    float32 inputs, the rotated q and k and the MLP's activation; `full` keeps only the layer
    input. The attention's scores and probabilities (T per head with the XLA implementation) are
    recomputed in the backward pass under every policy: one layer's are a transient. Tensor
    parallelism divides the head- and MLP-sized parts. A device holds the tokens of its
    micro batch for its L / pp layers; a recomputed layer works on one pipeline microbatch at a
    time, and the head on the micro batch split over the pipeline axis.

    Context parallelism (cp) splits every sequence: a device holds T / cp of each one's tokens.
    Gathered (`model.context_attention`), each of its queries scores all T keys, and the keys
    and values it gathers, whole sequences, are kept for the attention's backward pass under
    `none` and `save_dots` (one layer's transient under `full`). The ring scores (2cp + 1) /
    4cp of the keys a query would see gathered (the chunk pairs with visible keys), into float32
    running sums of its output; XLA:CPU keeps every step's scores alive together in the backward
    pass (measured), though each step needs only its own.

    A pipeline (GPipe, in one scan) keeps what the policy saves at every one of its
    R·M + S − 1 iterations, bubble included: (R·M + S − 1) / (R·M) times the micro batch's, and
    its stream of ⌈M/S⌉ microbatches of layer outputs with their cotangents. 1F1B keeps, for
    each of the K = min(M, 2S − 1) microbatches in flight, each layer's input (the stage's input
    only under `full`, whose backward slot then recomputes the layer inputs of one microbatch);
    its backward slot differentiates one layer of one microbatch at a time, keeping all that
    layer's activations while it runs, and its head runs on one microbatch. Interleaved
    (R > 1), it holds min(R·M, 2RS − 1) waves of one layer group (L / (S·R) layers) each.
    """
    m, t = cfg.model, cfg.train
    c = _itemsize(cfg)
    D, T, F = m.d_model, t.seq_len, m.d_ff
    q, kv = m.n_heads * m.dim_per_head / tp, 2 * m.kv_heads * m.dim_per_head / tp
    mlp_in = (2 if m.mlp == "swiglu" else 1) * F / tp
    save_dots = c * (D + q + kv + D + mlp_in + D)
    everything = save_dots + 2 * 4 * D + c * (q + kv / 2) + c * (q + mlp_in)
    ring = attention_kind(m.context_attention, context, stages > 1) == "ring"
    keys = T * (2 * context + 1) / (4 * context) if ring else T  # scored per query
    # one layer's scores, while its backward pass runs; on the ring, the float32 sums too
    scores = (c + 4) * m.n_heads / tp * keys + (4 * q if ring else 0)
    per_layer = {"none": everything, "save_dots": save_dots, "full": c * D}[m.remat]
    tokens = micro_batch * T / context  # on this device
    gathered = c * kv * micro_batch * T if context > 1 and not ring else 0  # a layer's k and v
    if m.remat != "full":
        per_layer += gathered / tokens
    layers = m.n_layers // stages
    transient = tokens / microbatches * (scores + (everything if m.remat == "full" else 0))
    transient += gathered / microbatches if m.remat == "full" else 0
    # logits in the compute dtype, their float32 softmax and its gradient, for one of the
    # `train.loss_chunks` slices of the rows at a time
    logits = tokens / stages / t.loss_chunks * m.vocab_size / tp * (c + 4 + 4)
    if pipeline_schedule(cfg, stages) == "1f1b":
        one = tokens / microbatches  # a microbatch's tokens
        group = layers // repeats  # the layers of one wave
        waves = min(repeats * microbatches, 2 * repeats * stages - 1)  # pipeline_1f1b.in_flight
        inputs = one * c * D * (1 if m.remat == "full" else group)
        recomputed = one * c * D * group if m.remat == "full" else 0
        # the activation and cotangent in flight, each sent and received
        hops = 4 * one * c * D
        head = one * m.vocab_size / tp * (c + 4 + 4)
        return int(waves * inputs + recomputed + one * (everything + scores) + hops + head)
    kept = tokens * layers * per_layer
    if stages > 1:
        rounds = repeats * microbatches
        kept = kept * (rounds + stages - 1) / rounds
        stream = 2 * math.ceil(microbatches / stages) * tokens / microbatches * D * c
        kept += stream
    return int(kept + transient + logits)
