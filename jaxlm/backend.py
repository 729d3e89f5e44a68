"""XLA flag presets per backend, applied to the environment before JAX starts.

    backend.xla_flags=auto   cuda where an NVIDIA driver is present, rocm where /dev/kfd is,
                             else cpu          (also: cuda, rocm, cpu, none)

A flag the user already put in XLA_FLAGS is left as the user set it; the same holds for the
environment variables below. What each preset does:

cuda / rocm
  --xla_gpu_enable_latency_hiding_scheduler   schedule collectives early and overlap them with
                                              compute (FSDP gathers, data-parallel reductions)
  --xla_gpu_enable_pipelined_all_gather,      move the next layer's FSDP weight gather and this
  --xla_gpu_enable_pipelined_reduce_scatter,  layer's gradient reduce-scatter across iterations
  --xla_gpu_enable_pipelined_all_reduce       of the layer scan, so they run behind the matmuls
  --xla_gpu_enable_while_loop_double_buffering
                                              double-buffer the scan's loop-carried buffers so
                                              that pipelining has room to work
  --xla_gpu_{all_gather,reduce_scatter,all_reduce}_combine_threshold_bytes=128 MiB
                                              fewer, larger collectives (per-layer weights are
                                              many small arrays)
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.90         let XLA's allocator take 90 % of device memory
                                              (JAX's default 75 % wastes 20 GB of an H100)
cpu
  nothing: XLA's CPU defaults were the fastest measured on the development machine.

Command buffers (CUDA graphs) are left at XLA's default for the jaxlib at hand.
"""

import os
import pathlib
import shutil

_COMBINE = 128 * 1024 * 1024
_GPU_FLAGS = {
    "xla_gpu_enable_latency_hiding_scheduler": "true",
    "xla_gpu_enable_pipelined_all_gather": "true",
    "xla_gpu_enable_pipelined_reduce_scatter": "true",
    "xla_gpu_enable_pipelined_all_reduce": "true",
    "xla_gpu_enable_while_loop_double_buffering": "true",
    "xla_gpu_all_gather_combine_threshold_bytes": str(_COMBINE),
    "xla_gpu_reduce_scatter_combine_threshold_bytes": str(_COMBINE),
    "xla_gpu_all_reduce_combine_threshold_bytes": str(_COMBINE),
}
PRESETS: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    # name: (XLA flags, environment variables)
    "cuda": (_GPU_FLAGS, {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.90"}),
    "rocm": (_GPU_FLAGS, {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.90"}),
    "cpu": ({}, {}),
    "none": ({}, {}),
}


def detect() -> str:
    """The backend JAX is about to start, guessed without starting it."""
    platforms = os.environ.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
    if platforms in ("cpu", "cuda", "rocm"):
        return platforms
    if (
        platforms == "gpu"
        or pathlib.Path("/proc/driver/nvidia").exists()
        or shutil.which("nvidia-smi")
    ):
        return (
            "rocm"
            if pathlib.Path("/dev/kfd").exists() and not shutil.which("nvidia-smi")
            else "cuda"
        )
    if pathlib.Path("/dev/kfd").exists():
        return "rocm"
    return "cpu"


def apply(preset: str = "auto", environ=os.environ) -> str:
    """Add the preset's flags and variables to `environ` where the user has not set them; returns
    the preset used. Must run before JAX initialises its backends (XLA reads them once)."""
    name = detect() if preset == "auto" else preset
    flags, variables = PRESETS[name]
    current = environ.get("XLA_FLAGS", "")
    given = {part.lstrip("-").split("=")[0] for part in current.split()}
    added = [f"--{flag}={value}" for flag, value in flags.items() if flag not in given]
    if added:
        environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    for key, value in variables.items():
        environ.setdefault(key, value)
    return name
