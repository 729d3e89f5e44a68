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


@functools.cache  # once per process and dtype
def measure_matmul_tflops(dtype: str = "float32", size: int = 1024, repeats: int = 3) -> float:
    """TFLOP/s of a size³ matmul on the first device, best of `repeats` after a warm-up.

    On a CPU all of a process's fake devices share the same cores, so one device's share of
    this figure is it divided by their number (see `peak_tflops`).
    """
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def peak_tflops(override: float | None, dtype: str) -> tuple[float | None, str]:
    """(peak TFLOP/s per device, where it comes from) for this process's devices."""
    if override:
        return override, "train.peak_tflops"
    device = jax.local_devices()[0]
    if device.platform == "cpu":
        measured = measure_matmul_tflops(dtype)
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
