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
import os
import pathlib
import sys
import time

from jaxlm import config as config_lib
from jaxlm.errors import EXIT_USAGE, UsageError

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
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)  # jaxlm's own lines only; JAX's loggers keep their levels
    args = parse_args(argv)
    try:
        overrides = list(args.overrides) + ([f"mesh={args.mesh}"] if args.mesh else [])
        cfg = config_lib.load(args.config, overrides)
        if args.cpu_devices:
            os.environ["JAX_NUM_CPU_DEVICES"] = str(args.cpu_devices)
        from jaxlm import mesh as mesh_lib  # imports JAX: after the config is known to be sound

        mesh = mesh_lib.make_mesh(cfg.mesh)
        out_dir = args.out or pathlib.Path("runs") / pathlib.Path(args.config or "default").stem
        run(cfg, mesh, out_dir)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def run(cfg: config_lib.Config, mesh, out_dir: pathlib.Path | None = None, *,
        program=None) -> list[dict]:
    """Train `cfg` on `mesh`; write outputs under `out_dir` if given; return the metrics rows.

    `program` (from `jaxlm.step.build_program(cfg, mesh)`) may be passed in to reuse its
    compiled functions across runs, or to inspect them afterwards.
    """
    import jax

    from jaxlm import data, metrics
    from jaxlm import mesh as mesh_lib
    from jaxlm.model import param_count
    from jaxlm.step import build_program

    program = program or build_program(cfg, mesh)  # checks the layout before any compute
    batches = data.make_batches(cfg, program.batch_sharding)
    out_dir = _prepare_out_dir(out_dir, cfg)

    t = cfg.train
    n_devices = mesh.devices.size
    tokens_per_step = t.global_batch_size * t.seq_len
    log.info(
        "jaxlm | %s parameters | mesh %s on %d %s devices | batch %d = micro %d x accum %d x "
        "replicas %d | %d tokens/step | %s compute",
        f"{param_count(program.spec.shapes):,}", mesh_lib.describe(dict(mesh.shape)), n_devices,
        jax.devices()[0].platform, t.global_batch_size, program.micro_batch,
        program.accumulation, t.global_batch_size // (program.micro_batch * program.accumulation),
        tokens_per_step, cfg.model.compute_dtype,
    )

    state = program.init(jax.random.key(t.seed))
    metrics_log = metrics.MetricsLog(out_dir, tensorboard=cfg.log.tensorboard)
    progress = metrics.ProgressReport(t.steps, every=cfg.log.every)
    rows = []

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
        rows.append(row)
        metrics_log.write(row)
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
                if pending:
                    last_done = record(*pending)
                else:  # the first call traced and compiled before it returned
                    log.info("compiled the train step in %.1f s",
                             time.perf_counter() - dispatched)
                    last_done = time.perf_counter()
                pending = (step, step_metrics, last_done)
            if pending:
                record(*pending)
    finally:
        progress.close()
        metrics_log.close()
    return rows


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
