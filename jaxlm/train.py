"""`python -m jaxlm.train`: train a language model on a named device mesh.

    python -m jaxlm.train [--config PRESET_OR_YAML] [--mesh SPEC_OR_PRESET] [--out DIR]
                          [key=value ...]

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

from jaxlm import config as config_lib
from jaxlm.cli import run_command
from jaxlm.errors import UsageError

log = logging.getLogger("jaxlm")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m jaxlm.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="preset name in configs/ (e.g. tiny, gpt-124m) or a YAML file")
    p.add_argument(
        "--mesh",
        help="mesh spec such as dp=2,fsdp=2,tp=2 (one axis may be -1) "
        "or a preset name in meshes/; default dp=-1 (all devices)",
    )
    p.add_argument(
        "--out",
        type=pathlib.Path,
        help="run directory for metrics.jsonl, TensorBoard events and config.yaml "
        "(default: runs/PRESET)",
    )
    p.add_argument(
        "--cpu-devices",
        type=int,
        help="on CPU, pretend to have this many devices (to try a mesh on a laptop)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides such as train.steps=100 model.n_layers=8",
    )
    return p.parse_intermixed_args(argv)  # overrides may come before or after the options


def main(argv=None) -> int:
    args = parse_args(argv)

    def body():
        overrides = list(args.overrides) + ([f"mesh={args.mesh}"] if args.mesh else [])
        cfg = config_lib.load(args.config, overrides)
        if args.cpu_devices:
            os.environ["JAX_NUM_CPU_DEVICES"] = str(args.cpu_devices)
        from jaxlm import backend

        backend.apply(cfg.backend.xla_flags)
        # JAX is imported only now, once the config is known to be sound.
        from jaxlm import distributed
        from jaxlm import mesh as mesh_lib

        distributed.initialize(cfg.distributed)
        mesh = mesh_lib.make_mesh(cfg.mesh)
        out_dir = args.out or pathlib.Path("runs") / pathlib.Path(args.config or "default").stem
        run(cfg, mesh, out_dir)

    return run_command(body)


def run(
    cfg: config_lib.Config, mesh, out_dir: pathlib.Path | None = None, *, program=None
) -> list[dict]:
    """Train `cfg` on `mesh`; return the metrics rows written by this call (one per step with
    `loss`, one per validation with `val_loss`).

    With `out_dir`, the run writes metrics, TensorBoard events and checkpoints there, and resumes
    from its newest intact checkpoint if it has one. `program` (from
    `jaxlm.step.build_program(cfg, mesh)`) may be passed in to reuse its compiled functions, or
    to inspect them afterwards.
    """
    import jax

    from jaxlm import checkpoint, data, distributed, metrics
    from jaxlm import mesh as mesh_lib
    from jaxlm.loop import Loop
    from jaxlm.preemption import StopRequest
    from jaxlm.step import build_program

    # Every check a user's input can fail comes before the first array is allocated.
    program = program or build_program(cfg, mesh)
    directory = data.resolve_source(cfg)
    batches = data.make_batches(cfg, program.batch_sharding, directory=directory)
    evaluate = Evaluator(cfg, program, directory)
    main = jax.process_index() == 0  # writes metrics, TensorBoard and the config
    out_dir = _prepare_out_dir(out_dir, cfg, write_config=main)
    if jax.process_count() > 1:
        distributed.log_to_file(out_dir)  # and only process 0 on the terminal
    _log_start(cfg, mesh, program)

    key = jax.random.key(cfg.train.seed)
    shapes = checkpoint.param_shapes(program.spec.shapes)
    checkpoints = checkpoint.Checkpoints(out_dir, cfg.checkpoint) if out_dir else None

    def restore():
        target = checkpoint.abstract_target(
            jax.eval_shape(program.init, key), program.state_shardings
        )
        return checkpoints.restore_latest(target, shapes)

    restored = restore() if checkpoints else None
    if restored:
        state, start = restored.state, restored.step
        batches.set_state(restored.data_state)
        log.info("resumed from the checkpoint of step %d", start)
    else:
        state, start = program.init(key), 0
        if cfg.checkpoint.init_from:
            target = checkpoint.abstract_target(program.spec.shapes, program.state_shardings.params)
            state = state.replace(
                params=checkpoint.load_params(cfg.checkpoint.init_from, target, shapes)
            )

    rows = []
    metrics_log = metrics.MetricsLog(
        out_dir if main else None, resume_step=start, tensorboard=cfg.log.tensorboard
    )
    step_accounting = _accounting(cfg, program, metrics_log.kept)

    def write(row, prefix="train"):
        rows.append(row)
        metrics_log.write(row, prefix=prefix)

    loop = Loop(
        cfg=cfg,
        program=program,
        batches=batches,
        evaluate=evaluate,
        checkpoints=checkpoints,
        write=write,
        progress=metrics.ProgressReport(
            cfg.train.steps, every=cfg.log.every, first_step=start, live=main
        ),
        stop=StopRequest(
            config_lib.parse_duration(cfg.train.time_limit) if cfg.train.time_limit else None
        ),
        metadata={
            "mesh": mesh_lib.describe(dict(mesh.shape)),
            "devices": mesh.devices.size,
            "param_shapes": shapes,
            "seed": cfg.train.seed,
            "data": cfg.data.source,
        },
        restore=restore,
        accounting=step_accounting,
    )
    try:
        with loop.stop:
            loop.run(state)
    finally:
        loop.progress.close()
        step_accounting.close()
        metrics_log.close()
        if checkpoints:
            checkpoints.close()
    return rows


class Evaluator:
    """Validation loss on the first `train.eval_batches` held-out batches, always the same ones."""

    def __init__(self, cfg: config_lib.Config, program, directory):
        from jaxlm import data

        self.cfg, self.program = cfg, program
        self.every = cfg.train.eval_every
        self._batches = lambda: data.make_batches(
            cfg, program.batch_sharding, split="val", directory=directory
        )
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
        return bool(self.every) and (
            step == 1 or step % self.every == 0 or step == self.cfg.train.steps
        )

    def __call__(self, state, step: int) -> dict:
        import jax

        batches = self._batches()
        sums = [self.program.eval_step(state, next(batches)) for _ in range(self.count)]
        loss_sum, tokens = (
            sum(float(jax.device_get(s[k])) for s in sums) for k in ("loss_sum", "tokens")
        )
        loss = loss_sum / tokens
        log.info("step %d | validation loss %.4f | perplexity %.1f", step, loss, math.exp(loss))
        return {"step": step, "val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}


def _accounting(cfg, program, previous_rows):
    """MFU against the devices' peak, and energy where a meter can read it (jaxlm/accounting)."""
    import jax

    from jaxlm import accounting, energy, flops, hardware

    per_token = flops.model_flops_per_token_of(cfg, program.spec.shapes)
    peak, source = hardware.peak_tflops(cfg.train.peak_tflops, cfg.model.compute_dtype)
    if peak:
        log.info(
            "MFU against %.4g TFLOP/s per device (%s); model FLOPs per token %.4g "
            "(6N + causal attention, jaxlm/flops.py)",
            peak,
            source,
            per_token,
        )
    else:
        log.info("no MFU: %s", source)
    meter, why = (
        energy.open_meter(jax.local_devices()) if cfg.log.energy else (None, "log.energy=false")
    )
    if meter:
        log.info(
            "energy from %s%s",
            meter.source,
            f", x {jax.process_count()} processes" if jax.process_count() > 1 else "",
        )
    else:
        log.info("energy not measured: %s", why)
    kwh, tokens = accounting.resume_totals(previous_rows)
    return accounting.StepAccounting(
        per_token, peak, meter, jax.process_count(), cfg.log.carbon_intensity, kwh, tokens
    )


def _log_start(cfg, mesh, program) -> None:
    import jax

    from jaxlm import mesh as mesh_lib
    from jaxlm.model import param_count

    t = cfg.train
    log.info(
        "jaxlm | %s parameters | mesh %s on %d %s devices | batch %d = micro %d x accum %d x "
        "replicas %d | %d tokens/step | %s compute | data %s",
        f"{param_count(program.spec.shapes):,}",
        mesh_lib.describe(dict(mesh.shape)),
        mesh.devices.size,
        jax.devices()[0].platform,
        t.global_batch_size,
        program.micro_batch,
        program.accumulation,
        t.global_batch_size // (program.micro_batch * program.accumulation),
        t.global_batch_size * t.seq_len,
        cfg.model.compute_dtype,
        cfg.data.source,
    )
    p = program.stages
    if p.stages > 1:
        log.info(
            "pipeline | %d stages x %d repeats, %d layers each | %d microbatches per "
            "forward pass | bubble %.1f %% = (S-1)/(R*M+S-1)",
            p.stages,
            p.repeats,
            cfg.model.n_layers // (p.stages * p.repeats),
            p.microbatches,
            100 * p.bubble,
        )


def _prepare_out_dir(out_dir: pathlib.Path | None, cfg, *, write_config: bool = True):
    if out_dir is None:
        return None
    out_dir = pathlib.Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if write_config:
            (out_dir / "config.yaml").write_text(config_lib.dump(cfg))
    except OSError as e:
        raise UsageError(f"cannot write to the run directory {out_dir}: {e.strerror}") from None
    return out_dir


if __name__ == "__main__":
    sys.exit(main())
