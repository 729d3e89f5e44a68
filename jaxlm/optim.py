"""The optimizer: AdamW with linear warmup and cosine decay, after global-norm clipping.

    chain(clip_by_global_norm(grad_clip),    clipping before Adam, as Megatron and nanoGPT do
          adamw(schedule, mask=decay_mask))  decoupled weight decay on projection matrices only

Weight decay applies to the attention and MLP projections and an untied output head; never to
norm scales, biases or embedding tables (token or position). The train step keeps the old
parameters and optimizer state when a step is bad (jaxlm/step.py), so the schedule follows the
number of updates actually applied.
"""

import jax
import optax

from jaxlm.config import TrainConfig


def schedule(t: TrainConfig) -> optax.Schedule:
    length = t.decay_steps or t.steps
    warmup = min(t.warmup_steps, max(length - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=t.lr / (warmup + 1),  # the first step already learns
        peak_value=t.lr,
        warmup_steps=warmup,
        decay_steps=max(length, warmup + 1),
        end_value=t.lr * t.min_lr_ratio,
    )


def decay_mask(params) -> dict:
    """True for the parameters that get weight decay: projection matrices and an untied head."""

    def decays(path, _) -> bool:
        name = path[-1].key
        return name.endswith("_proj") or name == "lm_head"

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(t: TrainConfig, params) -> optax.GradientTransformation:
    """`params` may be abstract (shapes only): it gives the tree structure of the decay mask."""
    adamw = optax.adamw(
        learning_rate=schedule(t),
        b1=t.beta1,
        b2=t.beta2,
        eps=t.adam_eps,
        weight_decay=t.weight_decay,
        mask=decay_mask(params),
    )
    clip = optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity()
    return optax.chain(clip, adamw)
