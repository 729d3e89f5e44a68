"""Sampling from a model with a key/value cache: the library under `python -m jaxlm.generate`.

The prompt runs through the model once (prefill), filling the cache with its keys and values;
then every new token is one call of the same jitted step with one token, compiled once, that
reads the cache instead of recomputing the prefix. Sampling: logits / temperature (0: greedy),
then only the top-k tokens (0: all), then only the smallest set of most likely tokens whose
probability reaches top-p (1: all), drawn with the seed. Generation stops after
`max_new_tokens`, at the end-of-text token, or when the model's context
(`model.max_seq_len`) is full. `TextStream` prints the text as the tokens come, prompt first.

Layout: the mesh and the sharding table of training. Weights keep their training layout (tp
splits heads and the MLP, fsdp gathers each layer's weights as it runs); the cache
[L, B, S, K, H] has its kv heads on `tensor` and its batch on data x fsdp, replicated when the
batch does not divide (a single prompt on dp=2). Meshes with a pipeline axis are refused.
"""

import functools
import json
import logging
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import model as model_lib
from jaxlm import runs, sharding
from jaxlm.config import Sampling
from jaxlm.errors import UsageError

log = logging.getLogger("jaxlm")


def sample(logits_BxV, key, sampling: Sampling):
    """Token ids [B] drawn from float32 logits [B, V] (a pure function, traced under jit)."""
    if sampling.temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1)
    logits_BxV = logits_BxV / sampling.temperature
    if 0 < sampling.top_k < logits_BxV.shape[-1]:
        kth_Bx1 = jax.lax.top_k(logits_BxV, sampling.top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    if sampling.top_p < 1:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        # keep a token while the more likely ones before it have not reached top_p yet
        keep_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV < sampling.top_p
        floor_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV < floor_Bx1, -jnp.inf, logits_BxV)
    return jax.random.categorical(key, logits_BxV, axis=-1)


def generate(
    cfg,
    params,
    mesh,
    prompt_BxP,
    *,
    max_new_tokens: int,
    sampling: Sampling,
    seed: int = 0,
    eos_id: int | None = None,
    on_tokens: Callable | None = None,
):
    """New token ids [B, N] after the prompts [B, P] (all of one length).

    `params` are the model's parameters on `mesh` (`jaxlm.runs.load_params`). N is at most
    `max_new_tokens` and at most what the context leaves after the prompt; rows that reached
    `eos_id` are padded with it, and generation ends when all have. `on_tokens` gets each
    step's tokens [B] as they come.
    """
    prompt_BxP = np.asarray(prompt_BxP, np.int32)
    B, P = prompt_BxP.shape
    n_new = min(max_new_tokens, cfg.max_seq_len - P)
    if n_new < 1:
        raise UsageError(
            f"the prompt is {P} tokens and the model's context "
            f"(model.max_seq_len) {cfg.max_seq_len}: no room for a new token"
        )
    # the cache holds every position that is fed back
    empty_cache, step, token_sharding = _compiled(cfg, mesh, sampling, B, P + n_new)
    replicated = sharding.replicated(mesh)
    key = jax.device_put(jax.random.key(seed), replicated)
    put = jax.device_put

    started = time.perf_counter()
    next_B, cache = step(
        params, put(prompt_BxP, token_sharding), empty_cache(), put(np.int32(0), replicated), key
    )
    out, done = [], np.zeros(B, bool)
    for i in range(n_new):
        tokens_B = np.asarray(jax.device_get(next_B))
        if i == 0:
            prefill_s = time.perf_counter() - started
        if eos_id is not None:
            tokens_B = np.where(done, eos_id, tokens_B)
            done |= tokens_B == eos_id
        out.append(tokens_B)
        if on_tokens:
            on_tokens(tokens_B)
        if done.all() or i == n_new - 1:
            break
        next_B, cache = step(
            params,
            put(tokens_B[:, None], token_sharding),
            cache,
            put(np.int32(P + i), replicated),
            key,
        )
    seconds = time.perf_counter() - started
    log.info(
        "prefill of %d x %d tokens in %.2f s; %d new tokens in %.2f s (%.1f tokens/s "
        "after the prefill)",
        B,
        P,
        prefill_s,
        len(out),
        seconds,
        (len(out) - 1) / max(seconds - prefill_s, 1e-9),
    )
    return np.stack(out, axis=1)


@functools.lru_cache(maxsize=8)
def _compiled(cfg, mesh, sampling: Sampling, batch: int, length: int):
    """(empty cache, step, token sharding) for one shape, jitted once and kept for the next
    call. `step(params, tokens [B, T], cache, start, key)` -> (next tokens [B], cache): T is the
    prompt's length for the prefill and 1 after it."""
    shard = runs.activation_sharding(mesh, batch)
    rules = dict(shard.rules)
    spec = model_lib.describe(cfg, shard)
    cache_sharding = sharding.named(mesh, model_lib.CACHE_AXES, rules)
    cache_shardings = model_lib.LayerCache(cache_sharding, cache_sharding)
    token_sharding = sharding.named(mesh, ("batch", "length"), rules)
    replicated = sharding.replicated(mesh)
    empty_cache = jax.jit(
        lambda: jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype), model_lib.cache_shapes(cfg, batch, length)
        ),
        out_shardings=cache_shardings,
    )  # made in its shards

    def step(params, tokens_BxT, cache, start, key):
        logits_BxTxV, cache = model_lib.decode(spec.graphdef, params, tokens_BxT, cache, start)
        next_B = sample(
            logits_BxTxV[:, -1].astype(jnp.float32), jax.random.fold_in(key, start), sampling
        )
        return next_B.astype(jnp.int32), cache

    step = jax.jit(
        step,
        donate_argnums=2,
        # None: the parameters keep the layouts runs.load_params gave them
        in_shardings=(None, token_sharding, cache_shardings, replicated, replicated),
        out_shardings=(replicated, cache_shardings),
    )
    return empty_cache, step, token_sharding


class TextStream:
    """Prints the text of prompt + new tokens as it grows. The whole sequence is decoded each
    time, so pieces that only make sense together (the bytes of one character, SentencePiece's
    leading-space marker) come out right; an unfinished character waits for its last byte."""

    def __init__(self, tokenizer, prompt_ids: list[int], out=None):
        self.tokenizer, self.ids, self.out = tokenizer, list(prompt_ids), out or sys.stdout
        self.printed = ""
        self._emit(final=False)

    def __call__(self, tokens_B) -> None:
        self.ids.append(int(tokens_B[0]))
        self._emit(final=False)

    def close(self) -> None:
        self._emit(final=True)
        self.out.write("\n")
        self.out.flush()

    def _emit(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids)
        if not final:
            text = text.rstrip("\ufffd")  # an incomplete UTF-8 sequence so far
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed) :])
            self.printed = text
        self.out.flush()


def encode_prompt(run: runs.Run, sp, text: str) -> list[int]:
    """The prompt's token ids, BOS first where the run's tokenizer config asks for one; a prompt
    that is empty or leaves no room in the model's context is a UsageError."""
    if not text:
        raise UsageError("the prompt is empty")
    prompt = ([sp.bos_id()] if adds_bos(run) else []) + sp.encode(text)
    context = run.cfg.model.max_seq_len
    if len(prompt) > context:
        raise UsageError(
            f"the prompt is {len(prompt)} tokens, longer than the model's "
            f"context of {context} tokens (model.max_seq_len)"
        )
    if len(prompt) == context:
        raise UsageError(
            f"the prompt fills the model's context of {context} tokens "
            f"(model.max_seq_len): no room for a new token"
        )
    return prompt


def adds_bos(run: runs.Run) -> bool:
    """Whether texts start with BOS: only where a Hugging Face tokenizer config says so."""
    path = run.directory / "tokenizer_config.json"
    return path.is_file() and bool(json.loads(path.read_text()).get("add_bos_token", False))
