"""Loss on held-out data and logits for given tokens: what `python -m jaxlm.eval` prints and what
training's validation logs, through one reduction (`mean_loss`).

    Evaluator     training's validation: the first `train.eval_batches` held-out batches, the
                  same ones every time, through the program's own eval step
    evaluate      a run directory's checkpoint on a prepared directory's validation split
    logits        float32 logits of token ids, for checking a port against another code base

The loss is the mean cross-entropy over all target tokens of the batches (the sum of the
batches' sums over the sum of their token counts, in float64 on the host), the perplexity its
exponential.
"""

import functools
import logging
import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import model as model_lib
from jaxlm import runs, sharding
from jaxlm.config import Config
from jaxlm.data import loader
from jaxlm.errors import UsageError
from jaxlm.step import Program, make_loss_fn

log = logging.getLogger("jaxlm")

_MAX_LOG_PERPLEXITY = 700.0  # exp(710) overflows a float64

LossSums = tuple[jax.Array, jax.Array]  # (sum of token cross-entropies, target tokens)


def mean_loss(loss_sums: Callable[[dict], LossSums], batches: Iterator, count: int):
    """(mean token loss, tokens) over the next `count` batches. Every batch is dispatched before
    any result is read, so the devices never wait for the host."""
    sums = jax.device_get([loss_sums(next(batches)) for _ in range(count)])
    loss_sum, tokens = (sum(float(s[i]) for s in sums) for i in (0, 1))
    return loss_sum / tokens, tokens


def perplexity(loss: float) -> float:
    return math.exp(min(loss, _MAX_LOG_PERPLEXITY))


class Evaluator:
    """Validation loss on the first `train.eval_batches` held-out batches, always the same ones;
    for a blend also on each source's own held-out batches (`val_loss/NAME`)."""

    def __init__(self, cfg: Config, program: Program, sources):
        self.cfg, self.program = cfg, program
        self.every = cfg.train.eval_every
        names = [s.name for s in sources] if sources and len(sources) > 1 else []
        self._batches = {
            name: functools.partial(
                loader.make_batches,
                cfg,
                program.batch_sharding,
                split="val",
                sources=sources,
                only=name,
            )
            for name in [None, *names]
        }
        self.counts = {}
        if self.every:
            try:
                for name, batches in self._batches.items():
                    self.counts[name] = min(cfg.train.eval_batches, len(batches()))
            except UsageError as e:  # no held-out split, or one too small for a batch
                log.info("no validation: %s", e)
                self.every = 0
            except TypeError:  # synthetic batches are endless
                self.counts = {None: cfg.train.eval_batches}

    def due(self, step: int) -> bool:
        return bool(self.every) and (
            step == 1 or step % self.every == 0 or step == self.cfg.train.steps
        )

    def __call__(self, state, step: int) -> dict:
        row = {"step": step}
        for name, count in self.counts.items():
            loss, _ = mean_loss(
                lambda batch: self.program.eval_step(state, batch), self._batches[name](), count
            )
            suffix = "" if name is None else f"/{name}"
            row[f"val_loss{suffix}"], row[f"val_perplexity{suffix}"] = loss, perplexity(loss)
        log.info(
            "step %d | validation loss %.4f | perplexity %.1f",
            step,
            row["val_loss"],
            row["val_perplexity"],
        )
        return row


def evaluate(run: runs.Run, mesh, *, batches: int | None = None) -> dict:
    """Loss, perplexity and token count of `run` on its config's validation split, read in
    order in the run's batches (`train.global_batch_size` x `train.seq_len`, packed as in
    training), through the training's own loss in the run's compute dtype. `batches` limits it
    to the first N batches (default: the whole split)."""
    cfg = run.cfg
    if cfg.data.source == "synthetic":
        raise UsageError(
            f"{run.directory} has no prepared data to evaluate on: pass --data DIR "
            f"(a directory made by python -m jaxlm.data prepare)"
        )
    if batches is not None and batches < 1:
        raise UsageError(f"--batches must be at least 1, not {batches}")
    runs.check_mesh(cfg, mesh, batch=cfg.train.global_batch_size)
    sources = loader.resolve_source(cfg)
    split = loader.make_batches(cfg, sharding.batch_sharding(mesh), split="val", sources=sources)
    count = len(split) if batches is None else min(batches, len(split))

    spec = model_lib.describe(cfg.model, sharding.ActivationSharding(mesh))
    params = runs.load_params(run, mesh)
    # the parameters and batches are already in their shards: jit takes their layouts
    loss_sums = jax.jit(make_loss_fn(spec.graphdef), out_shardings=sharding.replicated(mesh))
    loss, tokens = mean_loss(lambda batch: loss_sums(params, batch), split, count)
    return {
        "run": str(run.directory),
        "step": run.step,
        "data": cfg.data.source,
        "split": "val",
        "batches": count,
        "batch_shape": [cfg.train.global_batch_size, cfg.train.seq_len],
        "tokens": int(tokens),
        "loss": loss,
        "perplexity": perplexity(loss),
    }


def logits(run: runs.Run, mesh, tokens) -> np.ndarray:
    """float32 logits [B, L, V] of the token ids [B, L] (or [L], then B = 1)."""
    cfg = run.cfg.model
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.size == 0 or not np.issubdtype(tokens.dtype, np.integer):
        raise UsageError(
            f"--tokens must hold integer ids of shape [batch, length] or [length], "
            f"not {tokens.dtype} {list(tokens.shape)}"
        )
    if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
        raise UsageError(
            f"--tokens holds ids from {tokens.min()} to {tokens.max()}, outside the "
            f"model's vocabulary of {cfg.vocab_size}"
        )
    if tokens.shape[1] > cfg.max_seq_len:
        raise UsageError(
            f"--tokens holds sequences of {tokens.shape[1]} tokens, longer than the "
            f"model's context of {cfg.max_seq_len} (model.max_seq_len)"
        )
    runs.check_mesh(run.cfg, mesh)
    spec = model_lib.describe(cfg, runs.activation_sharding(mesh, tokens.shape[0]))
    params = runs.load_params(run, mesh)
    forward = jax.jit(
        lambda p, t: model_lib.apply(spec.graphdef, p, t).astype(jnp.float32),
        out_shardings=sharding.replicated(mesh),
    )
    return np.asarray(jax.device_get(forward(params, jnp.asarray(tokens, jnp.int32))))
