"""`python -m jaxlm.train`: train a language model on a named device mesh.

    python -m jaxlm.train [--config PRESET_OR_YAML] [--mesh SPEC_OR_PRESET] [--out DIR] [key=value ...]

`main` runs the phases in order and nothing else:
parse -> config -> mesh -> layout checks -> data -> state (init in its shards) -> loop -> outputs.
Everything a user can get wrong is checked before the first array is allocated; such mistakes
print one sentence and exit with code 2.

From Python (a notebook, a test) the same path is `run(cfg, mesh, out_dir)`:

    cfg = jaxlm.config.load("tiny", ["train.steps=20"])
    mesh = jaxlm.mesh.make_mesh("dp=2,tp=4")
    rows = jaxlm.train.run(cfg, mesh)          # one metrics dict per step
"""

import argparse
import logging
import math
import os
import pathlib
import sys
import time

from jaxlm import config as config_lib
from jaxlm.cli import run_command
from jaxlm.errors import UsageError

log = logging.getLogger("jaxlm")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m jaxlm.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="preset name in configs/ (e.g. tiny, gpt-124m) or a YAML file")
    p.add_argument("--mesh", help="mesh spec such as dp=2,fsdp=2,tp=2 (one axis may be -1) "
                                  "or a preset name in meshes/; default dp=-1 (all devices)")
    p.add_argument("--out", type=pathlib.Path,
                   help="run directory for metrics.jsonl, TensorBoard events and config.yaml "
                        "(default: runs/PRESET)")
    p.add_argument("--cpu-devices", type=int,
                   help="on CPU, pretend to have this many devices (to try a mesh on a laptop)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides such as train.steps=100 model.n_layers=8")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def body():
        overrides = list(args.overrides) + ([f"mesh={args.mesh}"] if args.mesh else [])
        cfg = config_lib.load(args.config, overrides)
        if args.cpu_devices:
            os.environ["JAX_NUM_CPU_DEVICES"] = str(args.cpu_devices)
        from jaxlm import mesh as mesh_lib  # imports JAX: after the config is known to be sound

        mesh = mesh_lib.make_mesh(cfg.mesh)
        out_dir = args.out or pathlib.Path("runs") / pathlib.Path(args.config or "default").stem
        run(cfg, mesh, out_dir)

    return run_command(body)


def run(cfg: config_lib.Config, mesh, out_dir: pathlib.Path | None = None, *,
        program=None) -> list[dict]:
    """Train `cfg` on `mesh`; write outputs under `out_dir` if given; return the metrics rows
    (one per step with `loss`, and one per validation with `val_loss`).

    `program` (from `jaxlm.step.build_program(cfg, mesh)`) may be passed in to reuse its
    compiled functions across runs, or to inspect them afterwards.
    """
    import jax

    from jaxlm import data, metrics
    from jaxlm.step import build_program

    program = program or build_program(cfg, mesh)  # checks the layout before any compute
    directory = data.resolve_source(cfg)  # checks the data against the model
    batches = data.make_batches(cfg, program.batch_sharding, directory=directory)
    evaluate = Evaluator(cfg, program, directory)
    out_dir = _prepare_out_dir(out_dir, cfg)
    _log_start(cfg, mesh, program)

    t = cfg.train
    n_devices = mesh.devices.size
    tokens_per_step = t.global_batch_size * t.seq_len
    state = program.init(jax.random.key(t.seed))
    metrics_log = metrics.MetricsLog(out_dir, tensorboard=cfg.log.tensorboard)
    progress = metrics.ProgressReport(t.steps, every=cfg.log.every)
    rows = []

    def write(row, prefix="train"):
        rows.append(row)
        metrics_log.write(row, prefix=prefix)

    def record(step, step_metrics, started):
        # Blocks until `step` is done, while the device already works on the next one.
        values = jax.device_get(step_metrics)
        now = time.perf_counter()
        row = {"step": step, **{k: float(v) for k, v in values.items()}}
        row["step_time_s"] = now - started
        row["tokens_per_s"] = tokens_per_step / row["step_time_s"]
        row["tokens_per_s_per_device"] = row["tokens_per_s"] / n_devices
        if cfg.model.compute_dtype != "float16":
            del row["loss_scale"]
        write(row)
        progress.update(row)
        return now

    # Inside the loop every host<->device copy must be explicit (device_put / device_get): a stray
    # implicit one would stall the pipeline of dispatched steps, so it fails loudly instead.
    pending = None
    try:
        with jax.transfer_guard("disallow"):
            for step in range(1, t.steps + 1):
                batch = next(batches)
                dispatched = time.perf_counter()
                state, step_metrics = program.train_step(state, batch)
                if step == 1:  # the first call traced and compiled before it returned
                    log.info("compiled the train step in %.1f s",
                             time.perf_counter() - dispatched)
                    last_done = time.perf_counter()
                elif pending:
                    last_done = record(*pending)
                pending = (step, step_metrics, last_done)
                if evaluate.due(step):
                    record(*pending)
                    pending = None
                    write(evaluate(state, step), prefix="val")
                    last_done = time.perf_counter()  # the next step's time excludes evaluation
            if pending:
                record(*pending)
    finally:
        progress.close()
        metrics_log.close()
    return rows


class Evaluator:
    """Validation loss on the first `train.eval_batches` held-out batches, always the same ones."""

    def __init__(self, cfg: config_lib.Config, program, directory):
        from jaxlm import data

        self.cfg, self.program = cfg, program
        self.every = cfg.train.eval_every
        self._batches = lambda: data.make_batches(cfg, program.batch_sharding, split="val",
                                                  directory=directory)
        self.count = cfg.train.eval_batches
        if self.every:
            try:
                self.count = min(self.count, len(self._batches()))
            except UsageError as e:  # no held-out split, or one too small for a batch
                log.info("no validation: %s", e)
                self.every = 0
            except TypeError:  # synthetic batches are endless
                pass

    def due(self, step: int) -> bool:
        return bool(self.every) and (step == 1 or step % self.every == 0
                                     or step == self.cfg.train.steps)

    def __call__(self, state, step: int) -> dict:
        import jax

        batches = self._batches()
        sums = [self.program.eval_step(state, next(batches)) for _ in range(self.count)]
        loss_sum, tokens = (sum(float(jax.device_get(s[k])) for s in sums)
                            for k in ("loss_sum", "tokens"))
        loss = loss_sum / tokens
        log.info("step %d | validation loss %.4f | perplexity %.1f", step, loss, math.exp(loss))
        return {"step": step, "val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}


def _log_start(cfg, mesh, program) -> None:
    import jax

    from jaxlm import mesh as mesh_lib
    from jaxlm.model import param_count

    t = cfg.train
    log.info(
        "jaxlm | %s parameters | mesh %s on %d %s devices | batch %d = micro %d x accum %d x "
        "replicas %d | %d tokens/step | %s compute | data %s",
        f"{param_count(program.spec.shapes):,}", mesh_lib.describe(dict(mesh.shape)),
        mesh.devices.size, jax.devices()[0].platform, t.global_batch_size, program.micro_batch,
        program.accumulation, t.global_batch_size // (program.micro_batch * program.accumulation),
        t.global_batch_size * t.seq_len, cfg.model.compute_dtype, cfg.data.source,
    )


def _prepare_out_dir(out_dir: pathlib.Path | None, cfg) -> pathlib.Path | None:
    if out_dir is None:
        return None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(config_lib.dump(cfg))
    except OSError as e:
        raise UsageError(f"cannot write to the run directory {out_dir}: {e.strerror}") from None
    return out_dir


if __name__ == "__main__":
    sys.exit(main())
