"""EleutherAI's lm-evaluation-harness on a jaxlm run: its `LM` interface over the run's model.

    results = harness.evaluate(run, mesh, ["hellaswag"], num_fewshot=0)

`RunLM` implements lm-eval's three requests as its Hugging Face backend does, so the two agree
on a model exported with `convert to-hf`: the text is cut into tokens by the run's SentencePiece
model as the exported tokenizer cuts it (BOS first only where the run's tokenizer config asks),
a context's trailing spaces move to the continuation, an empty context is the BOS token (EOS
without one), a sequence longer than the model's context keeps its last tokens, and a rolling
log-likelihood scores disjoint windows of the context's length. Scores are float32 log-softmax
of the logits, in batches of `batch_size` padded rows (padding on the right, after the scored
tokens, so causal attention never sees it); `generate_until` decodes greedily with the key/value
cache (jaxlm/generation.py) and cuts the text at the first stop string.

lm-eval is optional (`pip install lm-eval`); this module imports it, so import it only after
checking (`jaxlm.eval` does).
"""

import jax
import jax.numpy as jnp
import lm_eval
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.tasks import TaskManager

from jaxlm import generation, runs, sharding
from jaxlm import model as model_lib
from jaxlm.config import Sampling
from jaxlm.errors import UsageError


class RunLM(TemplateLM):
    def __init__(self, run: runs.Run, mesh, batch_size: int = 8):
        super().__init__()
        import sentencepiece as spm

        path = runs.tokenizer_path(run)
        if path is None:
            raise UsageError(
                f"{run.directory} has no tokenizer.model: lm-eval's tasks are text, and this "
                f"run's tokens cannot be read back into it"
            )
        runs.check_mesh(run.cfg, mesh, batch=batch_size)
        self.run, self.mesh, self._batch = run, mesh, batch_size
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.bos = generation.adds_bos(run)
        self.max_length = run.cfg.model.max_seq_len
        self.params = runs.load_params(run, mesh)
        spec = model_lib.describe(run.cfg.model, runs.activation_sharding(mesh, batch_size))
        self._log_probs = jax.jit(
            lambda p, t: jax.nn.log_softmax(
                model_lib.apply(spec.graphdef, p, t).astype(jnp.float32), axis=-1
            ),
            out_shardings=sharding.replicated(mesh),
        )

    @property
    def eot_token_id(self) -> int:
        return self.sp.eos_id()

    @property
    def prefix_token_id(self) -> int:
        bos = self.sp.bos_id()
        return bos if bos >= 0 else self.sp.eos_id()

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
        ids = self.sp.encode(string)
        return [self.sp.bos_id(), *ids] if self.bos and add_special_tokens is not False else ids

    def tok_decode(self, ids) -> str:
        return self.sp.decode(list(ids))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """(sum of the continuation's log-probabilities, whether it is the greedy one) for each
        (key, context ids, continuation ids)."""
        rows = []
        for _, context, continuation in requests:
            whole = (context + continuation)[-(self.max_length + 1) :]
            rows.append((whole[:-1], whole[-len(continuation) :]))
        results = []
        for start in range(0, len(rows), self._batch):
            chunk = rows[start : start + self._batch]
            # lengths rounded up to a power of two: a handful of compiled shapes, not one per batch
            longest = max(len(inputs) for inputs, _ in chunk)
            length = min(self.max_length, 1 << (longest - 1).bit_length())
            tokens = np.zeros((self._batch, length), np.int32)  # padding after, never attended
            for i, (inputs, _) in enumerate(chunk):
                tokens[i, : len(inputs)] = inputs
            log_probs = np.asarray(jax.device_get(self._log_probs(self.params, tokens)))
            for i, (inputs, targets) in enumerate(chunk):
                end = len(inputs)
                scored = log_probs[i, end - len(targets) : end]  # the continuation's positions
                picked = scored[np.arange(len(targets)), targets]
                greedy = bool((scored.argmax(-1) == np.asarray(targets)).all())
                results.append((float(picked.sum()), greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        totals = []
        for (text,) in [request.args for request in requests]:
            windows = map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            )
            scores = self._loglikelihood_tokens([(None, c, t) for c, t in windows])
            totals.append(sum(score for score, _ in scores))
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False):
        texts = []
        for context, options in [request.args for request in requests]:
            until = options.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            new_tokens = options.get("max_gen_toks", 256)
            prompt = self.tok_encode(context)[-(self.max_length - 1) :]
            ids = generation.generate(
                self.run.cfg.model,
                self.params,
                self.mesh,
                np.asarray([prompt]),
                max_new_tokens=new_tokens,
                sampling=Sampling(temperature=0),
                eos_id=self.eot_token_id,
            )[0]
            ids = [int(i) for i in ids if i != self.eot_token_id]
            text = self.tok_decode(ids)
            for stop in until:
                text = text.split(stop)[0]
            texts.append(text)
        return texts


def evaluate(
    run: runs.Run,
    mesh,
    tasks: list[str],
    *,
    num_fewshot: int | None = None,
    limit: int | None = None,
    include_path: str | None = None,
    batch_size: int = 8,
    log_samples: bool = False,
) -> dict:
    """lm-eval's results of `tasks` on the run (its own dict; `log_samples` adds each
    example's requests and scores); `include_path` is a folder of task YAMLs of one's own."""
    manager = TaskManager(include_path=include_path)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise UsageError(
            f"lm-eval has no task {', '.join(unknown)}: see `lm-eval ls tasks`, or give the "
            f"folder of your task YAMLs with --harness-include"
        )
    results = lm_eval.simple_evaluate(
        model=RunLM(run, mesh, batch_size),
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=log_samples,
    )
    return results
