"""log.trackers: the rows of metrics.jsonl in MLflow and W&B (offline), read back with their own
clients, and a tracker that is not installed refused before anything runs."""

import glob
import json
import struct

import jax
import numpy as np
import pytest

from conftest import tiny_config, train_rows
from jaxlm import mesh as mesh_lib
from jaxlm import trackers, training
from jaxlm.errors import UsageError

SHORT = ("train.eval_every=3", "checkpoint.every=3", "train.decay_steps=6")


def rows_of(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


def history(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if key in r]


@pytest.mark.slow
@pytest.mark.trackers
def test_mlflow_file_store_holds_the_loss_history_of_metrics_jsonl(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    cfg = tiny_config("train.steps=3", "log.trackers=tensorboard,mlflow", *SHORT)
    training.run(cfg, mesh_lib.make_mesh("dp=2", jax.devices()[:2]), tmp_path)

    client = mlflow.tracking.MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    run = client.get_run((tmp_path / "mlflow_run_id").read_text().strip())
    assert run.data.params["model.d_model"] == str(cfg.model.d_model)
    assert run.data.params["log.trackers"] == "tensorboard,mlflow"
    rows = rows_of(tmp_path)
    for key in ("loss", "val_loss", "grad_norm"):
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        np.testing.assert_allclose(got, history(rows, key), rtol=1e-6)
    assert len(history(rows, "loss")) == 3 and history(rows, "val_loss")
    assert list((tmp_path / "tensorboard").iterdir())  # TensorBoard beside it


def wandb_history(run_folder: str) -> tuple[str, list[dict]]:
    """(run id, history rows) of an offline W&B run folder, read from its transaction log with
    W&B's own record protobuf. The log is LevelDB's format after a 7-byte header: 32 KiB blocks
    of records, each a 7-byte header (checksum, length, kind: whole, first, middle, last)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(f"{run_folder}/*.wandb")
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    block, position, records, pending = 32768, 7, [], b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            records.append(pending + chunk)
            pending = b""
        elif kind in (2, 3):
            pending += chunk
        elif kind == 0:  # padding to the block's end
            position += block - position % block
    run_id, rows = None, []
    for payload in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            items = record.history.item  # a key, or a nested key's parts
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
    return run_id, rows


@pytest.mark.trackers
def test_wandb_offline_run_holds_the_history_and_a_resumed_run_keeps_its_id(tmp_path):
    pytest.importorskip("wandb")
    mesh = mesh_lib.make_mesh("dp=2", jax.devices()[:2])
    first = training.run(tiny_config("train.steps=3", "log.trackers=wandb", *SHORT), mesh, tmp_path)
    run_id = (tmp_path / "wandb_id").read_text().strip()
    (folder,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    logged_id, logged = wandb_history(folder)
    assert logged_id == run_id
    want = [(r["step"], r["loss"]) for r in train_rows(first)]
    got = [(r["_step"], r["loss"]) for r in logged if "loss" in r]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert any("val_loss" in r for r in logged)
    assert not (tmp_path / "tensorboard").exists()  # only the trackers asked for

    # resumed from the checkpoint of step 3: the same W&B run, the new steps in it
    second = training.run(
        tiny_config("train.steps=6", "log.trackers=wandb", *SHORT), mesh, tmp_path
    )
    assert (tmp_path / "wandb_id").read_text().strip() == run_id
    folders = sorted(glob.glob(str(tmp_path / "wandb" / "offline-run-*")))
    assert len(folders) == 2
    (resumed,) = [f for f in folders if f != folder]
    logged_id, logged = wandb_history(resumed)
    assert logged_id == run_id
    got = [(r["_step"], r["loss"]) for r in logged if "loss" in r]
    np.testing.assert_allclose(got, [(r["step"], r["loss"]) for r in train_rows(second)])


def test_a_tracker_that_is_not_installed_is_refused_before_anything_is_written(
    tmp_path, monkeypatch
):
    monkeypatch.setitem(trackers.PACKAGES, "wandb", "jaxlm_no_such_package")
    cfg = tiny_config("train.steps=2", "log.trackers=tensorboard,wandb")
    with pytest.raises(UsageError, match="log.trackers asks for wandb, which is not installed"):
        training.run(cfg, mesh_lib.make_mesh("dp=1", jax.devices()[:1]), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "text, message",
    [("tensorbored", "unknown tracker"), ("mlflow,mlflow", "named twice")],
)
def test_tracker_names_are_checked(text, message):
    with pytest.raises(UsageError, match=message):
        trackers.parse(text.split(","))
