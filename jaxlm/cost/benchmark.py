"""One layout timed on this machine, as a results row (the format of benchmarks/results/).

`benchmark` compiles the train step ahead of time (compile time), runs untimed warm-up steps,
then timed ones on synthetic batches (the data pipeline is benchmarked separately), and reports
tokens/s per device, TFLOP/s per device and MFU (model FLOPs, jaxlm/cost/flops.py, against the
device's peak, jaxlm/cost/hardware.py), the peak device memory, and the versions.
With `pytorch` (the JSON benchmarks/torch_reference.py printed for the same shapes, checked
before compiling) the row also holds the ratio to it.
"""

import json
import pathlib
import platform

import flax
import jax
import jaxlib

from jaxlm import config as config_lib
from jaxlm.cost import flops, hardware
from jaxlm.cost.compiled import compile_step, measured_seconds
from jaxlm.errors import UsageError
from jaxlm.model import param_count
from jaxlm.step import build_program


def versions() -> dict:
    device = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "python": platform.python_version(),
        "platform": device.platform,
        "platform_version": getattr(device.client, "platform_version", ""),
        "device_kind": device.device_kind,
    }


def peak_memory_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def benchmark(
    cfg, mesh, *, steps: int, warmup: int, name: str, command: str, pytorch: dict | None = None
) -> dict:
    program = build_program(cfg, mesh)
    params = param_count(program.spec.shapes)
    if pytorch:
        _check_same_model(pytorch, seq_len=cfg.train.seq_len, params=params)
    compiled = compile_step(cfg, program)
    seconds = measured_seconds(cfg, program, compiled.executable, steps, warmup)
    n = mesh.devices.size
    tokens_per_s_per_device = cfg.train.global_batch_size * cfg.train.seq_len / seconds / n
    per_token = flops.model_flops_per_token_of(cfg, program.spec.shapes)
    peak, source = hardware.peak_tflops(cfg.train.peak_tflops, cfg.model.compute_dtype)
    tflops = per_token * tokens_per_s_per_device / 1e12
    return {
        "device_kind": jax.devices()[0].device_kind,
        "devices": n,
        "model": name,
        "mesh": config_lib.to_dict(cfg)["mesh"],
        "seq_len": cfg.train.seq_len,
        "global_batch_size": cfg.train.global_batch_size,
        "micro_batch": program.micro_batch,
        "remat": cfg.model.remat,
        "compute_dtype": cfg.model.compute_dtype,
        "attention": cfg.model.attention,
        "params": params,
        "model_flops_per_token": per_token,
        "step_s": seconds,
        "tokens_per_s_per_device": tokens_per_s_per_device,
        "tflops_per_device": tflops,
        "peak_tflops": peak,
        "peak_source": source,
        "mfu": tflops / peak if peak else None,
        "peak_memory_bytes": peak_memory_bytes(),
        "xla_bytes_per_device": compiled.bytes_per_device,
        "compile_s": compiled.compile_s,
        "steps": steps,
        **({"pytorch": pytorch} if pytorch else {}),
        "ratio_vs_pytorch": (
            tokens_per_s_per_device / pytorch["tokens_per_s_per_device"] if pytorch else None
        ),
        "command": command,
        "versions": versions(),
    }


def read_pytorch_result(path: pathlib.Path) -> dict:
    """The JSON object benchmarks/torch_reference.py printed, with its source for messages."""
    try:
        reference = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read the PyTorch result {path}: {e}") from None
    if not isinstance(reference, dict) or "tokens_per_s_per_device" not in reference:
        raise UsageError(f"{path} is not a result of benchmarks/torch_reference.py")
    return {**reference, "source": str(path)}


def _check_same_model(reference: dict, **ours) -> None:
    for key, value in ours.items():
        if reference.get(key) != value:
            raise UsageError(
                f"the PyTorch result {reference['source']} is for {key}={reference.get(key)}, "
                f"this run has {value}: not the same model"
            )


def read_rows(path: pathlib.Path) -> list:
    """The results list in `path` (empty if there is none yet)."""
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read the results file {path}: {e}") from None
    if not isinstance(rows, list):
        raise UsageError(f"{path} holds no results list: give --out a new file or a results list")
    return rows


def append_row(path: pathlib.Path, row: dict) -> None:
    rows = read_rows(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rows + [row], indent=1) + "\n")
    tmp.replace(path)  # never a half-written results file
