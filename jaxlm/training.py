"""Training a model on a mesh: the phases of a run, wired in the order they happen.

    cfg = jaxlm.config.load("tiny", ["train.steps=20"])
    mesh = jaxlm.mesh.make_mesh("dp=2,tp=4")
    rows = jaxlm.training.run(cfg, mesh)          # one metrics dict per step

`run` goes through:
1. program: the layout checks, the model's shapes and every sharding (jaxlm/step.py);
2. data: the run directory checked writable (nothing created yet), then the source checked
   against the model, the training and validation batches;
3. run directory: created, per-process logs;
4. state: restored from the newest intact checkpoint, or initialised in its shards (with the
   parameters of `checkpoint.init_from` if set); only then config.yaml (by process 0), so a
   refused restore leaves the run as it was;
5. metrics and accounting: metrics.jsonl and TensorBoard (the rows after a resume dropped),
   MFU and energy;
6. the loop (jaxlm/loop.py): steps, validation, checkpoints, stop requests, bad steps;
7. closing: the last checkpoint committed, logs flushed.
Everything a user's input can get wrong fails in phases 1-3, before the first array is
allocated. `python -m jaxlm.train` is a thin command over `run`.
"""

import contextlib
import logging
import os
import pathlib

import jax

from jaxlm import checkpoint, distributed, metrics, trackers
from jaxlm import config as config_lib
from jaxlm import mesh as mesh_lib
from jaxlm.cost import accounting
from jaxlm.data import loader
from jaxlm.errors import UsageError
from jaxlm.evaluation import Evaluator
from jaxlm.loop import Loop
from jaxlm.model import param_count
from jaxlm.preemption import StopRequest
from jaxlm.step import Program, abstract_state, build_program
from jaxlm.watchdog import OFF, Unwatched, Watchdog, parse_timeout

log = logging.getLogger("jaxlm")


def run(
    cfg: config_lib.Config,
    mesh,
    out_dir: pathlib.Path | None = None,
    *,
    program: Program | None = None,
) -> list[dict]:
    """Train `cfg` on `mesh`; return the metrics rows written by this call (one per step with
    `loss`, one per validation with `val_loss`).

    With `out_dir`, the run writes metrics, TensorBoard events and checkpoints there, and resumes
    from its newest intact checkpoint if it has one. `program` (from
    `jaxlm.step.build_program(cfg, mesh)`) may be passed in to reuse its compiled functions, or
    to inspect them afterwards.
    """
    check_debug_processes(cfg.debug)
    trackers.check_installed(trackers.names(cfg.log))
    program = program or build_program(cfg, mesh)  # 1
    check_out_dir(out_dir)  # 2: before the data, which may build the default corpus first
    sources = loader.resolve_source(cfg)
    batches = loader.make_batches(cfg, program.batch_sharding, sources=sources)
    evaluator = Evaluator(cfg, program, sources)
    writer = jax.process_index() == 0  # writes metrics, TensorBoard and the config
    out_dir = prepare_out_dir(out_dir)  # 3
    if jax.process_count() > 1:
        distributed.log_to_file(out_dir)  # and only process 0 on the terminal
    log_start(cfg, mesh, program)

    checkpoints = checkpoint.Checkpoints(out_dir, cfg.checkpoint) if out_dir else None  # 4
    shapes = checkpoint.param_shapes(program.spec.shapes)

    def restore() -> checkpoint.Restored | None:
        return checkpoints.restore_latest(abstract_state(program), shapes)

    state, start = initial_state(cfg, program, batches, restore if checkpoints else None)
    if out_dir and writer:  # only now: a refused restore must leave the run's config as it was
        write_config(out_dir, cfg, loader.chat_template(sources))

    rows = []
    with contextlib.ExitStack() as closing:  # 7, in the reverse order of opening
        timeout = parse_timeout(cfg.train.step_timeout)
        watchdog = closing.enter_context(  # first, so it still watches the last save's end
            Watchdog(
                timeout,
                process_index=jax.process_index(),
                on_hang=lambda row: metrics_log.write(row, prefix="events"),
            )
            if timeout != OFF
            else Unwatched()
        )
        if checkpoints:
            closing.callback(checkpoints.close)
        metrics_log = metrics.MetricsLog(  # 5
            out_dir if writer else None,
            resume_step=start,
            open_trackers=lambda resume_step: trackers.open_trackers(
                trackers.names(cfg.log),
                out_dir,
                config_lib.to_dict(cfg),
                resume_step=resume_step,
                mlflow_uri=cfg.log.mlflow_uri,
            ),
        )
        closing.callback(metrics_log.close)
        step_accounting = accounting.open_accounting(cfg, program, metrics_log.kept)
        closing.callback(step_accounting.close)
        progress = metrics.ProgressReport(
            cfg.train.steps, every=cfg.log.every, first_step=start, live=writer
        )
        closing.callback(progress.close)

        def write(row: dict, prefix: str = "train") -> None:
            rows.append(row)
            metrics_log.write(row, prefix=prefix)

        stop = closing.enter_context(StopRequest.from_config(cfg.train))
        Loop(  # 6
            cfg=cfg,
            program=program,
            batches=batches,
            evaluate=evaluator,
            checkpoints=checkpoints,
            write=write,
            progress=progress,
            stop=stop,
            metadata={
                "mesh": mesh_lib.describe(dict(mesh.shape)),
                "devices": mesh.devices.size,
                "param_shapes": shapes,
                "seed": cfg.train.seed,
                "data": cfg.data.source,
            },
            restore=restore,
            accounting=step_accounting,
            enter=watchdog.enter,
        ).run(state)
    return rows


def check_debug_processes(debug: config_lib.DebugConfig) -> None:
    """The fault-injection keys name processes of this launch."""
    count = jax.process_count()
    for key in ("hang_process", "slow_process"):
        process = getattr(debug, key)
        if process is not None and process >= count:
            raise UsageError(
                f"debug.{key}={process} names no process: this launch has {count} "
                f"(0 to {count - 1})"
            )


def initial_state(cfg, program: Program, batches: loader.Batches, restore):
    """(state, step): the newest intact checkpoint's, with the data iterator moved to where it
    was; else a new state in its shards, its parameters from `checkpoint.init_from` if set."""
    restored = restore() if restore else None
    if restored:
        batches.set_state(restored.data_state)
        log.info("resumed from the checkpoint of step %d", restored.step)
        return restored.state, restored.step
    state = program.init(jax.random.key(cfg.train.seed))
    if cfg.checkpoint.init_from:
        params = checkpoint.load_params(
            cfg.checkpoint.init_from,
            abstract_state(program).params,
            checkpoint.param_shapes(program.spec.shapes),
        )
        state = state.replace(params=params)
    return state, 0


def log_start(cfg, mesh, program: Program) -> None:
    """The run's first lines: parameters, mesh, batch geometry, tokens per step; the pipeline."""
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
            "pipeline | %s | %d stages x %d repeats, %d layers each | %d microbatches per "
            "forward pass | bubble %.1f %% = (S-1)/(R*M+S-1)",
            cfg.train.pipeline_schedule,
            p.stages,
            p.repeats,
            cfg.model.n_layers // (p.stages * p.repeats),
            p.microbatches,
            100 * p.bubble,
        )


def check_out_dir(out_dir: pathlib.Path | None) -> None:
    """Refuses a run directory that cannot be created or written, creating nothing: its
    nearest existing ancestor (itself, if it exists) must be a writable directory."""
    if out_dir is None:
        return
    out_dir = existing = pathlib.Path(out_dir)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(
            f"cannot write to the run directory {out_dir}: {existing} is not a directory"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to the run directory {out_dir}: permission denied")


def prepare_out_dir(out_dir: pathlib.Path | None):
    """The run directory, created; None without one."""
    if out_dir is None:
        return None
    out_dir = pathlib.Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot write to the run directory {out_dir}: {e.strerror}") from None
    if not os.access(out_dir, os.W_OK):
        raise UsageError(f"cannot write to the run directory {out_dir}: permission denied")
    return out_dir


def write_config(out_dir: pathlib.Path, cfg, chat_template: str | None = None) -> None:
    """The resolved config.yaml, written whole or not at all (a kill leaves the old one); and
    the chat template of chat data (RUN/chat_template.jinja), which export gives the model."""
    files = {"config.yaml": config_lib.dump(cfg), "chat_template.jinja": chat_template}
    for name, text in files.items():
        if text is not None:
            tmp = out_dir / f"{name}.tmp"
            tmp.write_text(text)
            tmp.replace(out_dir / name)
