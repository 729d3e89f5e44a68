"""What the devices can do: peak FLOP/s, memory, power and links, by `device_kind`.

Peaks are dense bfloat16/float16 tensor-core figures from the vendors' data sheets, per device
as JAX counts devices (one MI250X is two GCDs, two JAX devices). MFU is measured against these.
On a CPU there is no data sheet to trust, so the peak is a matmul measured on the spot.

The link bandwidths (GB/s per device, one direction) are rough and serve only to rank layouts
in `jaxlm.tune` where no step can be timed: `intra` inside a node, `inter` the node's network
share per device.
"""

import dataclasses
import functools
import json
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp

from jaxlm.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    peak_tflops: float  # dense bf16/fp16 per device (fp32 where the device has no bf16 units)
    memory_gb: float
    tdp_watts: float | None  # board power per device, for energy estimates before a run
    per_node: int  # devices in one node of the machines jaxlm is built for
    intra_gbps: float
    inter_gbps: float


# Looked up by substring of the lower-cased `device_kind`, first match wins (gh200 before h200).
DEVICES = {
    "gh200": Device("NVIDIA GH200", 989, 96, 900, 4, 450, 25),
    "h200": Device("NVIDIA H200", 989, 141, 700, 8, 450, 50),
    "h100 pcie": Device("NVIDIA H100 PCIe", 756, 80, 350, 8, 64, 25),
    "h100": Device("NVIDIA H100 SXM", 989, 80, 700, 4, 450, 50),  # Snellius: 4 per node
    "a100": Device("NVIDIA A100 SXM", 312, 40, 400, 4, 300, 25),  # JUWELS Booster
    "mi300x": Device("AMD MI300X", 1307, 192, 750, 8, 64, 50),
    "mi250": Device("AMD MI250X GCD", 191.5, 64, 280, 8, 50, 12.5),  # Frontier, LUMI-G
    "tpu v5p": Device("TPU v5p", 459, 95, None, 4, 150, 150),
    "tpu v5 lite": Device("TPU v5e", 197, 16, None, 4, 50, 50),
    "tpu v4": Device("TPU v4", 275, 32, None, 4, 135, 135),
    "a64fx": Device("Fujitsu A64FX", 6.76, 32, 120, 1, 0, 6.8),  # Fugaku: fp32, Tofu-D
}


def lookup(kind: str) -> Device | None:
    """The table's entry for a `device_kind` ("NVIDIA H100 80GB HBM3") or a short name ("h100")."""
    kind = kind.lower()
    return next((d for key, d in DEVICES.items() if key in kind), None)


def device(kind: str) -> Device:
    """`lookup`, for a device kind the user named: an unknown one is a UsageError."""
    found = lookup(kind)
    if found is None:
        raise UsageError(f"unknown --device-kind '{kind}': use one of {', '.join(DEVICES)}")
    return found


PEAK_SIZES = (1024, 2048)  # square matmuls: the larger ones a CPU runs at its best
PEAK_WINDOW_S = 0.25  # matmuls back to back for this long make one measurement
PEAK_WINDOWS = 5


def measure_matmul_tflops(
    dtype: str = "float32",
    sizes: tuple[int, ...] = PEAK_SIZES,
    window_s: float = PEAK_WINDOW_S,
    windows: int = PEAK_WINDOWS,
) -> float:
    """The best sustained TFLOP/s of square matmuls on the first device: for each size, after a
    warm-up, `windows` windows of back-to-back matmuls lasting about `window_s` each; the best
    window of any size. One short matmul, as timed before, read half of this on the
    development machine: a CPU reaches its sustained rate only after its clocks and caches
    settle, and other tenants only ever slow a window down.

    On a CPU all of a process's fake devices share the same cores, so one device's share of
    this figure is it divided by their number (see `peak_tflops`).
    """
    matmul = jax.jit(lambda x: x @ x)
    best = 0.0
    for size in sizes:
        a = jnp.ones((size, size), dtype)
        matmul(a).block_until_ready()
        start = time.perf_counter()
        matmul(a).block_until_ready()
        calls = max(1, round(window_s / (time.perf_counter() - start)))
        for _ in range(windows):
            start = time.perf_counter()
            for _ in range(calls):
                out = matmul(a)
            out.block_until_ready()
            best = max(best, 2 * size**3 * calls / (time.perf_counter() - start) / 1e12)
    return best


@functools.cache  # once per process and dtype
def cpu_peak_tflops(dtype: str, measure=measure_matmul_tflops) -> float:
    """`measure_matmul_tflops(dtype)`, measured once per machine and kept in
    $JAXLM_CACHE/cpu-peak.json under the CPU's model, its cores, jax's version and XLA_FLAGS:
    every run on the same machine then divides by the same peak, and starts seconds sooner."""
    key = "|".join(
        (_cpu_model(), str(len(os.sched_getaffinity(0))), jax.__version__, dtype,
         os.environ.get("XLA_FLAGS", ""))
    )  # fmt: skip
    path = pathlib.Path(os.environ.get("JAXLM_CACHE", "~/.cache/jaxlm")).expanduser()
    path = path / "cpu-peak.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = measure(dtype)
        try:  # a cache that cannot be written only costs the next run the measurement
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(known, indent=1))
            tmp.replace(path)
        except OSError:
            pass
    return known[key]


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_tflops(override: float | None, dtype: str) -> tuple[float | None, str]:
    """(peak TFLOP/s per device, where it comes from) for this process's devices."""
    if override:
        return override, "train.peak_tflops"
    device = jax.local_devices()[0]
    if device.platform == "cpu":
        measured = cpu_peak_tflops(dtype)
        share = measured / jax.local_device_count()
        shared = (
            f", shared by {jax.local_device_count()} devices"
            if jax.local_device_count() > 1
            else ""
        )
        return share, f"a {dtype} matmul measured at {measured:.3f} TFLOP/s on this CPU{shared}"
    known = lookup(device.device_kind)
    if known is None:
        return None, (f"no peak known for {device.device_kind!r}: set train.peak_tflops for MFU")
    return known.peak_tflops, f"the {known.name} data sheet"
