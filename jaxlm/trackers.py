"""Experiment trackers beside metrics.jsonl: TensorBoard, Weights & Biases and MLflow.

`log.trackers` names them (default `tensorboard`). Each gets the rows metrics.jsonl gets (the
train rows, the validation rows, the events), with the step as its step, on process 0 only and
without a collective, so a tracker that hangs or fails to start cannot stall the other
processes. Compute nodes of HPC systems rarely reach the internet, so:

- **W&B** runs offline unless the user says otherwise through W&B's own `WANDB_MODE`: the run
  folder `RUN/wandb/offline-run-*` syncs later with `wandb sync`. The W&B run id is kept in
  `RUN/wandb_id`, so a resumed jaxlm run continues the same W&B run. The project is
  `WANDB_PROJECT` or `jaxlm`; the resolved config is the run's config.
- **MLflow** writes to `log.mlflow_uri`, by default a file store `RUN/mlruns` (MLflow 3 keeps
  its file store in maintenance and asks for `MLFLOW_ALLOW_FILE_STORE=true`, which jaxlm sets
  for file stores only), or to a server the user names. The experiment is
  `MLFLOW_EXPERIMENT_NAME` or `jaxlm`; the run id is kept in `RUN/mlflow_run_id`; the resolved
  config, flattened (`model.d_model`), is the run's parameters, logged once.
- **TensorBoard** (tensorboardX) writes `RUN/tensorboard`, names prefixed by the row's kind
  (`train/loss`, `val/val_loss`), and drops its events after the step a run resumes from.

Neither wandb nor mlflow is needed to train: asking for one that is not installed is refused
before anything runs (`check_installed`).
"""

import importlib.util
import math
import os
import pathlib
import secrets
import sys
from typing import Protocol

from jaxlm.errors import UsageError

TRACKERS = ("tensorboard", "wandb", "mlflow")
PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}  # tracker -> the module it imports


def parse(value) -> tuple[str, ...]:
    """`log.trackers`' domain: known names, each once (a list, or a comma string)."""
    given = tuple(value)
    for name in given:
        if name not in TRACKERS:
            raise UsageError(f"unknown tracker '{name}': choose from {', '.join(TRACKERS)}")
    if len(set(given)) < len(given):
        raise UsageError(f"a tracker is named twice in {', '.join(given)}")
    return given


def names(log_cfg) -> tuple[str, ...]:
    """The trackers a run's `log` config asks for: `log.trackers`, less TensorBoard where
    `log.tensorboard=false` (its older switch)."""
    wanted = log_cfg.trackers
    return wanted if log_cfg.tensorboard else tuple(n for n in wanted if n != "tensorboard")


def check_installed(wanted: tuple[str, ...]) -> None:
    """Refuse, before any compute, a tracker whose package is not installed."""
    for name in wanted:
        package = PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise UsageError(
                f"log.trackers asks for {name}, which is not installed: pip install "
                f"{'mlflow-skinny' if name == 'mlflow' else name}, or leave it out of log.trackers"
            )


class Tracker(Protocol):
    def write(self, row: dict, prefix: str) -> None: ...

    def close(self) -> None: ...


def open_trackers(
    wanted: tuple[str, ...], out_dir: pathlib.Path, config: dict, *, resume_step: int, mlflow_uri
) -> list[Tracker]:
    """The trackers `wanted` names, writing under `out_dir`; `config` is the resolved config
    as a nested dict."""
    opened: list[Tracker] = []
    for name in wanted:
        if name == "tensorboard":
            opened.append(TensorBoard(out_dir, resume_step))
        elif name == "wandb":
            opened.append(WandB(out_dir, config))
        elif name == "mlflow":
            opened.append(MLflow(out_dir, config, mlflow_uri))
    return opened


def numbers(row: dict) -> dict[str, float]:
    """The row's finite numbers, the step left out: what a tracker can plot."""
    return {
        key: float(value)
        for key, value in row.items()
        if key != "step"
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


def summary_writer():
    """tensorboardX's SummaryWriter class, imported only when a run writes TensorBoard events,
    and without torch: tensorboardX imports torch whenever it is installed, only to accept its
    tensors, which adds seconds to every start. jaxlm logs Python floats."""
    if "torch" in sys.modules:  # already paid for
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class TensorBoard:
    def __init__(self, out_dir: pathlib.Path, resume_step: int):
        self._writer = summary_writer()(
            str(out_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None
        )

    def write(self, row: dict, prefix: str) -> None:
        for key, value in numbers(row).items():
            self._writer.add_scalar(f"{prefix}/{key}", value, row["step"])

    def close(self) -> None:
        self._writer.close()


class WandB:
    def __init__(self, out_dir: pathlib.Path, config: dict):
        import wandb

        id_file = out_dir / "wandb_id"
        # W&B run ids: letters and digits; eight random hex digits, as W&B's own are eight
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self._run = wandb.init(
            dir=str(out_dir),
            id=run_id,
            resume="allow",
            mode=os.environ.get("WANDB_MODE", "offline"),
            project=os.environ.get("WANDB_PROJECT", "jaxlm"),
            name=out_dir.name,
            config=config,
            settings=wandb.Settings(console="off", silent=True),
        )

    def write(self, row: dict, prefix: str) -> None:
        values = numbers(row)
        if values:
            self._run.log(values, step=row["step"])

    def close(self) -> None:
        self._run.finish()


class MLflow:
    def __init__(self, out_dir: pathlib.Path, config: dict, uri: str | None):
        uri = uri or (out_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self._client = client = MlflowClient(tracking_uri=uri)
        id_file = out_dir / "mlflow_run_id"
        self._run_id = id_file.read_text().strip() if id_file.exists() else None
        if self._run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "jaxlm")
            experiment = client.get_experiment_by_name(name)
            experiment_id = (
                experiment.experiment_id if experiment else client.create_experiment(name)
            )
            self._run_id = client.create_run(experiment_id, run_name=out_dir.name).info.run_id
            id_file.write_text(self._run_id + "\n")
            self._log_params(config)

    def _log_params(self, config: dict) -> None:
        from mlflow.entities import Param

        params = [Param(key, _text(value)) for key, value in _flatten(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 per batch
            self._client.log_batch(self._run_id, params=params[start : start + 100])

    def write(self, row: dict, prefix: str) -> None:
        from mlflow.entities import Metric

        stamp = _milliseconds()
        metrics = [Metric(k, v, stamp, row["step"]) for k, v in numbers(row).items()]
        if metrics:
            self._client.log_batch(self._run_id, metrics=metrics)

    def close(self) -> None:
        self._client.set_terminated(self._run_id)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _text(value) -> str:
    """A parameter as it is written on the command line: lists as 'a,b'."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _milliseconds() -> int:
    import time

    return int(time.time() * 1000)
