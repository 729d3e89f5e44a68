"""`python -m jaxlm.eval`: a run's loss on held-out data, or its logits for given tokens.

    python -m jaxlm.eval --run RUN_DIR [--data DIR] [--batches N] [--step N] [--mesh SPEC]
                         [--json FILE] [key=value ...]
    python -m jaxlm.eval --run RUN_DIR --tokens IDS.npy --logits-out OUT.npy [--step N]
                         [--mesh SPEC]

Evaluation: the validation split of a prepared directory (`--data`, default the run's own
`data.source`), read in order, in the run's batches (`train.global_batch_size` x
`train.seq_len`, packed as in training), through the training's own loss
(`jaxlm.step.make_loss_fn`) in the run's compute dtype. The loss is the mean cross-entropy over
all target tokens of the first N batches (default: the whole split), the perplexity its
exponential. With `--batches` equal to `train.eval_batches` it is the validation loss training
logged. Printed as a table and as one JSON line (also written to `--json FILE`).

Logits: token ids [B, L] (or [L]) in a .npy file -> float32 logits [B, L, V] in another, at
positions 0 .. L-1, computed in float32 whatever the run trained in (override with
`model.compute_dtype=bfloat16`). The tool for checking a port against another implementation.

`key=value` overrides change the run's config for this evaluation only (e.g.
`train.global_batch_size=8`); shapes of the model must stay those of the checkpoint.
"""

import argparse
import dataclasses
import json
import logging
import math
import os
import pathlib
import sys

from jaxlm import config as config_lib
from jaxlm.cli import run_command
from jaxlm.errors import UsageError

log = logging.getLogger("jaxlm")


def evaluate(run, mesh, *, batches: int | None = None) -> dict:
    """Loss, perplexity and token count of `run` on its config's validation split."""
    import jax

    from jaxlm import data, runs, sharding
    from jaxlm import model as model_lib
    from jaxlm.step import make_loss_fn

    cfg = run.cfg
    if cfg.data.source == "synthetic":
        raise UsageError(
            f"{run.directory} has no prepared data to evaluate on: pass --data DIR "
            f"(a directory made by python -m jaxlm.data prepare)"
        )
    if batches is not None and batches < 1:
        raise UsageError(f"--batches must be at least 1, not {batches}")
    runs.check_mesh(cfg, mesh, batch=cfg.train.global_batch_size)
    directory = data.resolve_source(cfg)
    batch_sharding = sharding.batch_sharding(mesh)
    split = data.make_batches(cfg, batch_sharding, split="val", directory=directory)
    count = len(split) if batches is None else min(batches, len(split))

    spec = model_lib.describe(cfg.model, sharding.ActivationSharding(mesh))
    params = runs.load_params(run, mesh, spec)
    loss_sums = jax.jit(
        make_loss_fn(spec.graphdef),
        in_shardings=(sharding.tree_shardings(mesh, spec.axes, sharding.RULES), batch_sharding),
        out_shardings=runs.replicated(mesh),
    )
    sums = [loss_sums(params, next(split)) for _ in range(count)]
    loss_sum, tokens = (sum(float(jax.device_get(s[i])) for s in sums) for i in (0, 1))
    loss = loss_sum / tokens
    return {
        "run": str(run.directory),
        "step": run.step,
        "data": str(directory),
        "split": "val",
        "batches": count,
        "batch_shape": [cfg.train.global_batch_size, cfg.train.seq_len],
        "tokens": int(tokens),
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
    }


def logits(run, mesh, tokens):
    """float32 logits [B, L, V] of the token ids [B, L] (or [L], then B = 1)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxlm import model as model_lib
    from jaxlm import runs

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
    shard = runs.activation_sharding(mesh, tokens.shape[0])
    spec = model_lib.describe(cfg, shard)
    params = runs.load_params(run, mesh, spec)
    forward = jax.jit(
        lambda p, t: model_lib.apply(spec.graphdef, p, t).astype(jnp.float32),
        out_shardings=runs.replicated(mesh),
    )
    return np.asarray(jax.device_get(forward(params, jnp.asarray(tokens, jnp.int32))))


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m jaxlm.eval", description=__doc__.split("\n")[0])
    p.add_argument("--run", type=pathlib.Path, required=True, metavar="RUN_DIR")
    p.add_argument(
        "--data",
        type=pathlib.Path,
        metavar="DIR",
        help="a prepared directory whose validation split to use (default: the run's data.source)",
    )
    p.add_argument("--batches", type=int, help="evaluate only the first N batches")
    p.add_argument("--step", type=int, help="the checkpoint to use (default: the newest)")
    p.add_argument("--mesh", default="dp=-1", help="mesh spec or preset (default dp=-1); no pp")
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
    p.add_argument("--cpu-devices", type=int, help="on CPU, pretend to have this many devices")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def body():
        if (args.tokens is None) != (args.logits_out is None):
            raise UsageError("--tokens and --logits-out go together")
        if args.cpu_devices:
            os.environ["JAX_NUM_CPU_DEVICES"] = str(args.cpu_devices)
        import numpy as np

        from jaxlm import mesh as mesh_lib  # JAX: imported once the device count is set
        from jaxlm import runs

        runs.log_to_stderr()  # stdout carries the results alone
        run = runs.open_run(args.run, args.step)
        overrides = list(args.overrides)
        if args.tokens is not None:
            overrides.insert(0, "model.compute_dtype=float32")  # the parity tool's default
        if args.data is not None:
            overrides.append(f"data.source={args.data}")
        cfg = config_lib.validate(config_lib.apply_overrides(run.cfg, overrides))
        run = dataclasses.replace(run, cfg=cfg)
        if args.tokens is not None:
            try:
                tokens = np.load(args.tokens)
            except (OSError, ValueError) as e:
                raise UsageError(f"cannot read --tokens {args.tokens}: {e}") from None
            mesh = mesh_lib.make_mesh(args.mesh)
            result = logits(run, mesh, tokens)
            try:
                np.save(args.logits_out, result)
            except OSError as e:
                raise UsageError(f"cannot write {args.logits_out}: {e.strerror}") from None
            log.info("wrote float32 logits %s to %s", list(result.shape), args.logits_out)
            return
        mesh = mesh_lib.make_mesh(args.mesh)
        result = evaluate(run, mesh, batches=args.batches)
        print(table(result))
        print(json.dumps(result), flush=True)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")

    return run_command(body)


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
