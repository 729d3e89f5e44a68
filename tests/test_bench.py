"""The GPU speed tooling, checked where it can be without a GPU: flag presets that this jaxlib's
XLA accepts, the bench command and its results file, and a PyTorch reference of the same model."""

import json
import os
import subprocess
import sys

import pytest

from jaxlm import backend
from jaxlm import config as config_lib
from jaxlm.model import describe, param_count

INTERFACE = {
    "device_kind",
    "model",
    "seq_len",
    "mfu",
    "tokens_per_s_per_device",
    "ratio_vs_pytorch",
    "command",
    "versions",
}


def test_cuda_preset_adds_flags_but_keeps_the_users():
    env = {
        "XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=false",
        "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5",
    }
    assert backend.apply("cuda", env) == "cuda"
    flags = env["XLA_FLAGS"].split()
    assert flags.count("--xla_gpu_enable_latency_hiding_scheduler=false") == 1
    assert not any(f.startswith("--xla_gpu_enable_latency_hiding_scheduler=true") for f in flags)
    assert "--xla_gpu_enable_pipelined_all_gather=true" in flags
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5"
    again = dict(env)
    backend.apply("cuda", again)
    assert again == env  # applying twice changes nothing


def test_auto_picks_cpu_here_and_none_adds_nothing():
    env = {}
    assert backend.apply("auto", env) == "cpu" and env == {}
    assert backend.apply("none", env) == "none" and env == {}


@pytest.mark.parametrize("preset", ["cuda", "rocm"])
def test_every_preset_flag_is_known_to_xla(preset):
    """XLA aborts at start on an unknown flag: the presets must parse in this jaxlib."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    backend.apply(preset, env)
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-c", "import jax; print(jax.numpy.ones(3).sum())"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "3.0"


def run(*args, env=None):
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.slow
@pytest.mark.hf
def test_bench_writes_result_rows_with_the_ratio_to_pytorch(tmp_path):
    pytest.importorskip("torch")
    reference = run(
        "benchmarks/torch_reference.py",
        "--config",
        "tiny",
        "--devices",
        "2",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--no-compile",
    )
    assert reference.returncode == 0, reference.stderr
    torch_json = tmp_path / "torch.json"
    torch_json.write_text(reference.stdout.strip().splitlines()[-1])
    results = tmp_path / "results" / "cpu.json"
    for warmup in ("1", "0"):  # appends; no warm-up times the first call as it is
        out = run(
            "-m",
            "jaxlm.bench",
            "--config",
            "tiny",
            "--mesh",
            "dp=2",
            "--steps",
            "2",
            "--warmup",
            warmup,
            "--pytorch",
            str(torch_json),
            "--out",
            str(results),
            env={"JAX_NUM_CPU_DEVICES": "2"},
        )
        assert out.returncode == 0, out.stderr
    rows = json.loads(results.read_text())
    assert len(rows) == 2
    torch_row = json.loads(torch_json.read_text())
    for row in rows:
        assert INTERFACE <= set(row)
        assert row["devices"] == 2 and row["model"] == "tiny" and row["seq_len"] == 32
        assert 0 < row["mfu"] < 1 and row["tokens_per_s_per_device"] > 0
        assert row["ratio_vs_pytorch"] == pytest.approx(
            row["tokens_per_s_per_device"] / torch_row["tokens_per_s_per_device"]
        )
        assert row["versions"]["jax"] and row["command"].startswith("python -m jaxlm.bench")


def test_bench_refuses_a_pytorch_result_of_another_model(tmp_path):
    other = tmp_path / "torch.json"
    other.write_text(json.dumps({"seq_len": 32, "params": 1, "tokens_per_s_per_device": 1.0}))
    out = run(
        "-m",
        "jaxlm.bench",
        "--config",
        "tiny",
        "--mesh",
        "dp=1",
        "--steps",
        "1",
        "--pytorch",
        str(other),
    )
    assert out.returncode == 2 and "not the same model" in out.stderr
    assert "compiled" not in out.stdout  # refused before compiling


@pytest.mark.slow
@pytest.mark.hf
@pytest.mark.parametrize(
    "preset,overrides",
    [
        ("tiny", []),
        (
            "gpt-124m",
            [
                "model.n_layers=2",
                "model.d_model=64",
                "model.n_heads=4",
                "model.d_ff=256",
                "model.vocab_size=512",
                "train.seq_len=32",
                "train.global_batch_size=4",
            ],
        ),
        (
            "llama-1b",
            [
                "model.n_layers=2",
                "model.d_model=128",
                "model.n_heads=8",
                "model.n_kv_heads=2",
                "model.d_ff=256",
                "model.vocab_size=512",
                "train.seq_len=32",
                "train.global_batch_size=4",
                "train.micro_batch_size=2",
            ],
        ),
    ],
)
def test_the_pytorch_reference_is_the_same_model_and_learns(preset, overrides):
    pytest.importorskip("torch")
    out = run(
        "benchmarks/torch_reference.py",
        "--config",
        preset,
        "--steps",
        "5",
        "--warmup",
        "1",
        "--no-compile",
        *overrides,
    )
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout.strip().splitlines()[-1])
    cfg = config_lib.load(preset, overrides)
    assert row["params"] == param_count(describe(cfg.model).shapes)
    assert row["loss"] < row["initial_loss_bound"]
