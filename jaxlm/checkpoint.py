"""Orbax checkpoints of a run: sharded, asynchronous, and restorable onto any mesh.

    RUN/checkpoints/<step>/state      TrainState: params, optimizer state, step, skipped count,
                                      loss scale; every process writes its own shards
    RUN/checkpoints/<step>/data       the data iterator's position (JSON)
    RUN/checkpoints/<step>/config     the resolved config (JSON)
    RUN/checkpoints/<step>/metadata   jaxlm version, mesh, parameter shapes, seed (JSON)

No random state evolves during training: initialisation, data order and synthetic data are pure
functions of `train.seed` and the step, so the seed in the metadata is the whole RNG state.

Orbax writes a checkpoint under a temporary name and renames it when every item has committed;
old checkpoints are deleted only after a newer one has. Restoring reads the newest checkpoint
with a commit marker whose items load; one that fails is reported, renamed `corrupt-<step>` (its
files are kept) and the one before it is tried. Targets are built from the current mesh's
shardings, so a checkpoint written on dp=8 restores onto fsdp=4 x tp=2 or onto 4 devices.
"""

import dataclasses
import logging
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

import jaxlm
from jaxlm import config as config_lib
from jaxlm.errors import UsageError

log = logging.getLogger("jaxlm")

_ITEMS = ("state", "data", "config", "metadata")
_COMMIT_MARKER = "commit_success.txt"


@dataclasses.dataclass(frozen=True)
class Restored:
    step: int
    state: Any
    data_state: dict


def param_shapes(params) -> dict[str, list[int]]:
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): list(x.shape)
        for path, x in jax.tree_util.tree_leaves_with_path(params)
    }


class Checkpoints:
    """The checkpoints of one run directory."""

    def __init__(self, run_dir: pathlib.Path, cfg: config_lib.CheckpointConfig):
        self.directory = pathlib.Path(run_dir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            keep_period=cfg.keep_every or None,
            enable_async_checkpointing=cfg.async_save,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(
        self,
        step: int,
        state,
        data_state: dict,
        cfg: config_lib.Config,
        metadata: dict,
        *,
        wait: bool = False,
    ) -> None:
        """Start writing (the device-to-host copy happens before this returns, so the caller may
        donate `state` right after); `wait` blocks until the checkpoint has committed."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config_lib.to_dict(cfg)),
                metadata=ocp.args.JsonSave(
                    {**metadata, "step": step, "jaxlm_version": jaxlm.__version__}
                ),
            ),
            force=True,
        )
        if wait:
            self.wait()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def restore_latest(self, target, shapes: dict[str, list[int]]) -> Restored | None:
        """The newest intact checkpoint restored into `target`'s shardings, or None if none."""
        self.wait()
        for step in reversed(self.steps()):
            problem = self._incomplete(step)
            if not problem:
                metadata = self._read_json(step, "metadata")
                check_same_model(metadata, shapes, self.directory)
                if metadata.get("params_only"):
                    raise UsageError(
                        f"{self.directory} holds converted parameters, not a training state: "
                        f"train from them into a new run directory with "
                        f"checkpoint.init_from={self.directory.parent}"
                    )
                try:
                    restored = self._manager.restore(
                        step,
                        args=ocp.args.Composite(
                            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
                        ),
                    )
                    return Restored(step, restored.state, dict(restored.data))
                except Exception as e:  # any unreadable file: fall back to the one before
                    problem = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            aside = self.directory / f"corrupt-{step}"
            log.warning(
                "checkpoint %s is incomplete or corrupt (%s); it is kept as %s and the "
                "one before it is used",
                self.directory / str(step),
                problem,
                aside.name,
            )
            (self.directory / str(step)).rename(aside)
            self._manager.reload()
        return None

    def _incomplete(self, step: int) -> str:
        path = self.directory / str(step)
        if not (path / _COMMIT_MARKER).exists():
            return "no commit marker"
        missing = [item for item in _ITEMS if not (path / item).is_dir()]
        return f"missing {', '.join(missing)}" if missing else ""

    def _read_json(self, step: int, item: str) -> dict:
        try:
            return dict(
                self._manager.restore(
                    step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()})
                )[item]
            )
        except Exception:
            return {}

    def close(self) -> None:
        self.wait()
        self._manager.close()


def check_same_model(metadata: dict, shapes: dict[str, list[int]], where) -> None:
    """A checkpoint of a model with other parameter shapes is the user's mistake: name them."""
    saved = metadata.get("param_shapes")
    if saved is None or saved == shapes:
        return
    names = sorted(set(saved) | set(shapes))
    diffs = [
        f"{n} {saved.get(n, 'absent')} there, {shapes.get(n, 'absent')} here"
        for n in names
        if saved.get(n) != shapes.get(n)
    ]
    if all(
        n in saved and n in shapes and _same_stack(saved[n], shapes[n])
        for n in names
        if saved.get(n) != shapes.get(n)
    ):
        raise UsageError(
            f"the checkpoint in {where} stores its layer stack split another way ({diffs[0]}): "
            f"resume with the train.pipeline_repeats it was written with"
        )
    more = f" and {len(diffs) - 5} more" if len(diffs) > 5 else ""
    raise UsageError(
        f"the checkpoint in {where} is of a model with other shapes: {'; '.join(diffs[:5])}{more}"
    )


def _same_stack(a: list[int], b: list[int]) -> bool:
    """[L, ...] and [R, L/R, ...]: the same layers, stored for another circular pipeline."""
    for x, y in ((a, b), (b, a)):
        if len(x) == len(y) + 1 and x[0] * x[1] == y[0] and x[2:] == y[1:]:
            return True
    return False


def load_params(path: str, target, shapes: dict[str, list[int]]):
    """The parameters of the newest checkpoint under `path` (a run directory, its checkpoints/
    directory, or one step's directory), restored into `target`'s shardings."""
    path = pathlib.Path(path).absolute()
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    step = None
    if (path / "state").is_dir() and path.name.isdigit():
        path, step = path.parent, int(path.name)
    if not path.is_dir():
        raise UsageError(f"checkpoint.init_from: '{path}' does not exist")
    manager = ocp.CheckpointManager(
        path, options=ocp.CheckpointManagerOptions(read_only=True), item_names=_ITEMS
    )
    step = step if step is not None else manager.latest_step()
    if step is None:
        raise UsageError(f"checkpoint.init_from: '{path}' holds no checkpoint")
    metadata = manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
    check_same_model(dict(metadata["metadata"]), shapes, path / str(step))
    item = {"params": target}
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=item,
                restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True,
            )
        ),
    )
    log.info("initialised the parameters from %s (step %d)", path / str(step), step)
    return restored["state"]["params"]
