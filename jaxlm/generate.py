"""`python -m jaxlm.generate`: sample text from a run, with a key/value cache.

    python -m jaxlm.generate --run RUN_DIR --prompt TEXT [--max-new-tokens N] [--temperature T]
        [--top-k K] [--top-p P] [--seed S] [--mesh SPEC] [--step N] [--tokenizer FILE.model]

The prompt runs through the model once (prefill), filling the cache with its keys and values;
then every new token is one call of the same jitted step with one token, compiled once, that
reads the cache instead of recomputing the prefix. Sampling: logits / temperature (0: greedy),
then only the top-k tokens (0: all), then only the smallest set of most likely tokens whose
probability reaches top-p (1: all), drawn with the seed. Generation stops after
`--max-new-tokens`, at the end-of-text token, or when the model's context
(`model.max_seq_len`) is full. The text streams to stdout as the tokens come, prompt first;
log lines go to stderr.

Layout: the mesh and the sharding table of training. Weights keep their training layout (tp
splits heads and the MLP, fsdp gathers each layer's weights as it runs); the cache
[L, B, S, K, H] has its kv heads on `tensor` and its batch on data x fsdp, replicated when the
batch does not divide (a single prompt on dp=2). Meshes with a pipeline axis are refused.
"""

import pathlib
import sys

from jaxlm import cli
from jaxlm.config import Sampling
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.domain import at_least
from jaxlm.errors import UsageError


def parse_args(argv):
    p = cli.Parser(prog="python -m jaxlm.generate", description=__doc__.split("\n")[0])
    cli.add_run_args(p)
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the text to continue")
    p.add_argument(
        "--max-new-tokens", type=cli.COUNT, default=64, help="tokens to generate after the prompt"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=Sampling.temperature,
        help="0: greedy (default %(default)s)",
    )
    p.add_argument("--top-k", type=int, default=Sampling.top_k, help="0: off")
    p.add_argument("--top-p", type=float, default=Sampling.top_p, help="1: off")
    p.add_argument(
        "--seed",
        type=cli.in_domain(int, at_least(0)),
        default=0,
        help="the sampler's random seed (the same seed, the same text)",
    )
    p.add_argument(
        "--tokenizer",
        type=pathlib.Path,
        metavar="FILE.model",
        help="a SentencePiece model (default: the run's own)",
    )
    cli.add_cpu_devices(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def body():
        sampling = Sampling(args.temperature, args.top_k, args.top_p)
        sampling.check()
        if args.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}")
        cli.use_cpu_devices(args.cpu_devices)
        from jaxlm import generation, runs  # JAX: imported once the device count is set
        from jaxlm import mesh as mesh_lib

        cli.log_to_stderr()  # stdout carries the text alone
        run = runs.open_run(args.run, args.step)
        path = args.tokenizer or runs.tokenizer_path(run)
        if path is None:
            raise UsageError(
                f"{args.run} has no SentencePiece tokenizer that can be found: "
                f"pass --tokenizer FILE.model"
            )
        sp = tokenizer_lib.load(path)
        if sp.vocab_size() > run.cfg.model.vocab_size:
            raise UsageError(
                f"the tokenizer {path} has {sp.vocab_size()} pieces, more than the "
                f"model's vocabulary of {run.cfg.model.vocab_size}"
            )
        prompt = generation.encode_prompt(run, sp, args.prompt)
        mesh = mesh_lib.make_mesh(args.mesh)
        runs.check_mesh(run.cfg, mesh)

        params = runs.load_params(run, mesh)
        stream = generation.TextStream(sp, prompt)
        generation.generate(
            run.cfg.model,
            params,
            mesh,
            [prompt],
            max_new_tokens=args.max_new_tokens,
            sampling=sampling,
            seed=args.seed,
            eos_id=sp.eos_id(),
            on_tokens=stream,
        )
        stream.close()

    return cli.run_command(body)


if __name__ == "__main__":
    sys.exit(main())
