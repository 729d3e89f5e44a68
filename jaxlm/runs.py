"""A run directory as generation, evaluation and conversion read it.

    RUN/config.yaml              the resolved config (written by train and by convert)
    RUN/checkpoints/<step>/      Orbax checkpoints (jaxlm/checkpoint.py); each holds its config
    RUN/tokenizer.model          the SentencePiece tokenizer, where convert put one

The config is the one saved with the checkpoint, so it describes the parameters exactly. The
parameters are restored onto whatever mesh the caller builds, in the unpipelined layout: a
checkpoint of a circular pipeline ([R, L/R, ...] layers) is read back as [L, ...]. These tools
run the layers in one scan, so their meshes have no pipeline axis.
"""

import contextlib
import dataclasses
import logging
import pathlib
import sys

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from jaxlm import checkpoint, sharding
from jaxlm import config as config_lib
from jaxlm import model as model_lib
from jaxlm.data import stdlib
from jaxlm.errors import UsageError

log = logging.getLogger("jaxlm")


@dataclasses.dataclass(frozen=True)
class Run:
    directory: pathlib.Path
    step: int
    cfg: config_lib.Config  # as saved, with the training-only layout undone (`for_inference`)
    repeats: int = 1  # the checkpoint stores its layers as [repeats, L / repeats, ...]

    @property
    def step_dir(self) -> pathlib.Path:
        return self.directory / "checkpoints" / str(self.step)


def open_run(run_dir, step: int | None = None) -> Run:
    """The newest checkpoint of `run_dir` (or the one of `step`) and the config saved with it."""
    run_dir = pathlib.Path(run_dir).absolute()
    directory = run_dir / "checkpoints"
    if not run_dir.is_dir():
        raise UsageError(f"the run directory {run_dir} does not exist")
    if not directory.is_dir():
        raise UsageError(
            f"{run_dir} holds no checkpoints: train with --out {run_dir}, or "
            f"convert a model into it with python -m jaxlm.convert from-hf"
        )
    with quiet_orbax():
        manager = ocp.CheckpointManager(
            directory, options=ocp.CheckpointManagerOptions(read_only=True)
        )
    steps = sorted(manager.all_steps())
    if not steps:
        raise UsageError(f"{directory} holds no complete checkpoint")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise UsageError(
            f"{directory} has no checkpoint of step {step}; it has {', '.join(map(str, steps))}"
        )
    try:
        saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    except Exception as e:  # an unreadable item: report the checkpoint, not a traceback
        raise UsageError(
            f"cannot read the config of {directory / str(step)}: {type(e).__name__}"
        ) from None
    cfg = config_lib.from_dict(dict(saved["config"]))
    manager.close()
    return Run(run_dir, step, for_inference(cfg), cfg.train.pipeline_repeats)


def with_overrides(run: Run, overrides) -> Run:
    """The run with `key=value` overrides applied to its config (checked as any config is)."""
    cfg = config_lib.validate(config_lib.apply_overrides(run.cfg, overrides))
    return dataclasses.replace(run, cfg=cfg)


def for_inference(cfg: config_lib.Config) -> config_lib.Config:
    """The run's config with the training-only layout choices undone: no pipeline, no
    accumulation, no ZeRO-1 (they change how steps run, never what the model computes)."""
    train = dataclasses.replace(
        cfg.train,
        pipeline_repeats=1,
        pipeline_schedule="gpipe",
        microbatches=None,
        micro_batch_size=None,
        zero1=False,
    )
    return dataclasses.replace(cfg, train=train)


def check_mesh(cfg: config_lib.Config, mesh: Mesh, *, batch: int | None = None) -> None:
    """The parameters must shard evenly on `mesh`, which has no pipeline or context axis; with
    `batch`, the batch must divide by the data-parallel size (else `batch=None`: rows
    replicated)."""
    if mesh.shape["pipeline"] > 1:
        raise UsageError(
            "generation, evaluation and conversion run the layers in one scan: "
            "leave pp out of --mesh (use tp, fsdp or dp)"
        )
    if mesh.shape["context"] > 1:
        raise UsageError(
            "generation, evaluation and conversion keep each sequence whole on a device "
            "(decoding adds one token at a time): leave cp out of --mesh (use tp, fsdp or dp)"
        )
    dp = sharding.data_parallel_size(mesh)
    check = dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, global_batch_size=batch if batch is not None else dp),
    )
    sharding.check_layout(check, mesh, sharding.LayoutRules.from_config(check))


def activation_sharding(mesh: Mesh, batch: int) -> sharding.ActivationSharding:
    """The table's activation layout, with the batch replicated when it does not divide over
    the data-parallel devices (one prompt on a dp=2 mesh)."""
    rules = dict(sharding.RULES)
    if batch % sharding.data_parallel_size(mesh):
        rules["batch"] = ()
    return sharding.ActivationSharding(mesh, tuple(rules.items()))


def load_params(run: Run, mesh: Mesh):
    """The run's parameters restored onto `mesh` in the layout of the sharding table. Jitted
    functions of them need no parameter shardings of their own: the arrays carry theirs."""
    cfg = run.cfg
    # What the checkpoint holds: under a circular pipeline the layers are [R, L/R, ...].
    repeats = run.repeats
    saved = model_lib.describe(cfg.model, stages=model_lib.PipelineSpec(repeats=repeats))
    target = sharding.abstract_target(saved.shapes, sharding.tree_shardings(mesh, saved.axes))
    with quiet_orbax():
        params = checkpoint.load_params(
            str(run.step_dir), target, checkpoint.param_shapes(saved.shapes)
        )
    if repeats > 1:
        spec = model_lib.describe(cfg.model)
        shardings = sharding.tree_shardings(mesh, spec.axes)
        params = jax.jit(
            lambda tree: jax.tree.map(lambda x, s: x.reshape(s.shape), tree, spec.shapes),
            out_shardings=shardings,
        )(params)
    return params


def tokenizer_path(run: Run) -> pathlib.Path | None:
    """The SentencePiece model the run's tokens come from, if it can be found without
    building anything: RUN/tokenizer.model, `data.tokenizer`, or the one in the data source
    (for the default corpus, its cache directory)."""
    cfg = run.cfg
    candidates = [run.directory / "tokenizer.model"]
    if cfg.data.tokenizer:
        candidates.append(pathlib.Path(cfg.data.tokenizer))
    if cfg.data.source == "stdlib":
        # the directory `jaxlm.data.stdlib.dataset` builds, looked up without building it
        version = f"py{sys.version_info.major}{sys.version_info.minor}"
        candidates.append(
            stdlib.cache_dir() / f"stdlib-{version}-v{cfg.model.vocab_size}" / "tokenizer.model"
        )
    elif cfg.data.source != "synthetic":
        candidates.append(pathlib.Path(cfg.data.source) / "tokenizer.model")
    return next((c for c in candidates if c.is_file()), None)


@contextlib.contextmanager
def quiet_orbax():
    """Orbax warns on every read-only open that it will not write; these tools only read."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)
