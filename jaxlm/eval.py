"""`python -m jaxlm.eval`: a run's loss on held-out data, or its logits for given tokens.

    python -m jaxlm.eval --run RUN_DIR [--data DIR] [--batches N] [--step N] [--mesh SPEC]
                         [--json FILE] [key=value ...]
    python -m jaxlm.eval --run RUN_DIR --tokens IDS.npy --logits-out OUT.npy [--step N]
                         [--mesh SPEC]
    python -m jaxlm.eval --run RUN_DIR --harness TASK[,TASK] [--num-fewshot K] [--limit N]
                         [--harness-include DIR] [--batch-size N] [--mesh SPEC] [--json FILE]

Evaluation: the validation split of a prepared directory (`--data`, default the run's own
`data.source`), read in order, in the run's batches (`train.global_batch_size` x
`train.seq_len`, packed as in training), through the training's own loss
in the run's compute dtype (jaxlm/evaluation.py). The loss is the mean cross-entropy over
all target tokens of the first N batches (default: the whole split), the perplexity its
exponential. With `--batches` equal to `train.eval_batches` it is the validation loss training
logged. Printed as a table and as one JSON line (also written to `--json FILE`).

Logits: token ids [B, L] (or [L]) in a .npy file -> float32 logits [B, L, V] in another, at
positions 0 .. L-1, computed in float32 whatever the run trained in (override with
`model.compute_dtype=bfloat16`). The tool for checking a port against another implementation.

Harness: EleutherAI's lm-evaluation-harness tasks on the run (jaxlm/harness.py implements its
`LM` interface as its Hugging Face backend does), `--harness-include` a folder of one's own task
YAMLs; prints lm-eval's table, and its results JSON on stdout (also to `--json FILE`). lm-eval
is optional: `pip install lm-eval`.

`key=value` overrides change the run's config for this evaluation only (e.g.
`train.global_batch_size=8`); shapes of the model must stay those of the checkpoint.
"""

import importlib.util
import json
import logging
import pathlib
import sys

import numpy as np

from jaxlm import cli
from jaxlm.errors import UsageError

log = logging.getLogger("jaxlm")


def parse_args(argv):
    p = cli.Parser(prog="python -m jaxlm.eval", description=__doc__.split("\n")[0])
    cli.add_run_args(p)
    p.add_argument(
        "--data",
        type=pathlib.Path,
        metavar="DIR",
        help="a prepared directory whose validation split to use (default: the run's data.source)",
    )
    p.add_argument("--batches", type=cli.COUNT, help="evaluate only the first N batches")
    p.add_argument("--json", type=pathlib.Path, metavar="FILE", help="also write the JSON here")
    p.add_argument(
        "--tokens",
        type=pathlib.Path,
        metavar="IDS.npy",
        help="token ids [batch, length]: write their logits instead of evaluating",
    )
    p.add_argument(
        "--logits-out",
        type=pathlib.Path,
        metavar="OUT.npy",
        help="where --tokens' float32 logits [batch, length, vocab] go",
    )
    p.add_argument(
        "--harness",
        metavar="TASKS",
        help="run lm-evaluation-harness tasks (comma-separated) instead of the loss",
    )
    p.add_argument(
        "--num-fewshot",
        type=cli.in_domain(int, cli.at_least(0)),
        metavar="K",
        help="examples shown before each question (harness; default: each task's own)",
    )
    p.add_argument("--limit", type=cli.COUNT, metavar="N", help="the first N examples per task")
    p.add_argument(
        "--harness-include", type=pathlib.Path, metavar="DIR", help="a folder of task YAMLs"
    )
    p.add_argument(
        "--batch-size", type=cli.COUNT, default=8, help="sequences per forward pass (harness)"
    )
    cli.add_cpu_devices(p)
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="changes to the run's config for evaluating, e.g. train.eval_batches=4",
    )
    return p.parse_intermixed_args(argv)


def same_tokenizer(run) -> list[str]:
    """Overrides that make --data refuse shards another tokenizer made than the run's own (a
    loss on text cut into other tokens means nothing); none if the run's cannot be found."""
    from jaxlm import runs

    if run.cfg.data.source == "synthetic":
        raise UsageError(
            f"{run.directory} was trained on synthetic data, which no tokenizer made: its loss "
            f"on --data would mean nothing"
        )
    path = run.cfg.data.tokenizer or runs.tokenizer_path(run)
    if path is None:
        log.warning("the run's tokenizer cannot be found: --data is not checked against it")
        return []
    return [f"data.tokenizer={path}"]


def main(argv=None) -> int:
    args = parse_args(argv)

    def body():
        if (args.tokens is None) != (args.logits_out is None):
            raise UsageError("--tokens and --logits-out go together")
        if args.harness and args.tokens is not None:
            raise UsageError("--harness and --tokens are two different evaluations: give one")
        if args.harness and importlib.util.find_spec("lm_eval") is None:
            raise UsageError("--harness needs lm-evaluation-harness: pip install lm-eval")
        cli.check_writable(args.json, "--json")
        cli.check_writable(args.logits_out, "--logits-out")
        cli.use_cpu_devices(args.cpu_devices)
        from jaxlm import evaluation, runs  # JAX: imported once the device count is set
        from jaxlm import mesh as mesh_lib

        cli.log_to_stderr()  # stdout carries the results alone
        run = runs.open_run(args.run, args.step)
        overrides = list(args.overrides)
        if args.tokens is not None:
            overrides.insert(0, "model.compute_dtype=float32")  # the parity tool's default
        if args.data is not None:
            overrides += [f"data.source={args.data}", *same_tokenizer(run)]
        run = runs.with_overrides(run, overrides)
        if args.harness:
            return run_harness(run, mesh_lib.make_mesh(args.mesh), args)
        if args.tokens is not None:
            try:
                tokens = np.load(args.tokens)
            except (OSError, ValueError) as e:
                raise UsageError(f"cannot read --tokens {args.tokens}: {e}") from None
            mesh = mesh_lib.make_mesh(args.mesh)
            result = evaluation.logits(run, mesh, tokens)
            try:
                np.save(args.logits_out, result)
            except OSError as e:
                raise UsageError(f"cannot write {args.logits_out}: {e.strerror}") from None
            log.info("wrote float32 logits %s to %s", list(result.shape), args.logits_out)
            return
        mesh = mesh_lib.make_mesh(args.mesh)
        result = evaluation.evaluate(run, mesh, batches=args.batches)
        print(table(result))
        print(json.dumps(result), flush=True)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")

    return cli.run_command(body)


def run_harness(run, mesh, args) -> None:
    """lm-eval's tasks on the run: its table on stderr, its results JSON on stdout."""
    from lm_eval.utils import handle_non_serializable, make_table

    from jaxlm import harness

    tasks = [task.strip() for task in args.harness.split(",") if task.strip()]
    results = harness.evaluate(
        run,
        mesh,
        tasks,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        include_path=str(args.harness_include) if args.harness_include else None,
        batch_size=args.batch_size,
    )
    print(make_table(results), file=sys.stderr)
    text = json.dumps(results, indent=2, default=handle_non_serializable)
    print(text, flush=True)
    if args.json:
        args.json.write_text(text + "\n")


def table(result: dict) -> str:
    b, length = result["batch_shape"]
    rows = [
        ("run", f"{result['run']} (step {result['step']})"),
        ("data", f"{result['data']} ({result['split']} split)"),
        ("batches", f"{result['batches']} x {b} x {length} tokens"),
        ("tokens", f"{result['tokens']:,}"),
        ("loss", f"{result['loss']:.4f}"),
        ("perplexity", f"{result['perplexity']:.2f}"),
    ]
    return "\n".join(f"{name:<11} {value}" for name, value in rows)


if __name__ == "__main__":
    sys.exit(main())
