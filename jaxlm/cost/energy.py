"""Energy the devices use, read from the hardware where it can be: joules since the meter opened.

    GPU (CUDA)   NVML through pynvml, if installed: the energy counter of each local GPU
                 (Volta and newer), else `nvidia-smi` power readings sampled in the background
    GPU (ROCm)   `rocm-smi --showpower` sampled in the background
    CPU          RAPL counters in /sys/class/powercap (the packages' energy), where readable

A meter covers this process's devices only. Nothing here guesses: where none of these can be
read, `open_meter` returns None and says why, and the run logs no energy.
"""

import json
import logging
import os
import pathlib
import shutil
import subprocess
import threading
import time
from typing import Protocol

log = logging.getLogger("jaxlm")

RAPL_ROOT = pathlib.Path("/sys/class/powercap")


class Meter(Protocol):
    """What the training loop reads: joules since the meter opened, this process's devices."""

    source: str

    def joules(self) -> float: ...

    def close(self) -> None: ...


class RaplMeter:
    """The CPU packages' RAPL energy counters (microjoules, wrapping at max_energy_range_uj)."""

    source = "RAPL"

    def __init__(self, zones: list[pathlib.Path]):
        self._zones = zones
        self._last = [self._read(z) for z in zones]
        self._total = 0.0

    @staticmethod
    def _read(zone: pathlib.Path) -> int:
        return int((zone / "energy_uj").read_text())

    def joules(self) -> float:
        for i, zone in enumerate(self._zones):
            now = self._read(zone)
            delta = now - self._last[i]
            if delta < 0:  # the counter wrapped
                delta += int((zone / "max_energy_range_uj").read_text())
            self._total += delta / 1e6
            self._last[i] = now
        return self._total

    def close(self) -> None:
        pass


class SampledMeter:
    """Integrates power readings (watts, summed over devices) taken every `interval` seconds
    in a background thread: the trapezoid rule between samples."""

    def __init__(self, read_watts, source: str, interval: float = 1.0):
        self.source, self._read, self._interval = source, read_watts, interval
        self._joules, self._lock, self._stop = 0.0, threading.Lock(), threading.Event()
        self._last = (time.monotonic(), read_watts())
        self._thread = threading.Thread(target=self._run, name="jaxlm-power", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        now, watts = time.monotonic(), self._read()
        with self._lock:
            then, before = self._last
            self._joules += (now - then) * (watts + before) / 2
            self._last = (now, watts)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._sample()
            except (OSError, ValueError, subprocess.SubprocessError) as e:
                log.warning("power sampling stopped: %s", e)
                return

    def joules(self) -> float:
        """Joules so far: the integral up to the last sample, extended at its power to now.
        Reads nothing (a reading may be a subprocess): the training loop calls this every step."""
        with self._lock:
            then, watts = self._last
            return self._joules + (time.monotonic() - then) * watts

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class NvmlEnergyMeter:
    """NVML's per-GPU energy counters (millijoules since the driver loaded)."""

    source = "NVML"

    def __init__(self, pynvml, indices: list[int]):
        self._nvml = pynvml
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        self._start = self._read()

    def _read(self) -> float:
        return sum(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles) / 1e3

    def joules(self) -> float:
        return self._read() - self._start

    def close(self) -> None:
        pass


def _nvidia_smi_watts(indices: list[int]):
    command = [
        "nvidia-smi",
        f"--id={','.join(map(str, indices))}",
        "--query-gpu=power.draw",
        "--format=csv,noheader,nounits",
    ]

    def read() -> float:
        out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=10)
        return sum(float(v) for v in out.stdout.split() if v not in ("[N/A]", "N/A"))

    return read


def _rocm_smi_watts(indices: list[int]):
    def read() -> float:
        out = subprocess.run(
            ["rocm-smi", "--showpower", "--json"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
        total = 0.0
        for card, fields in json.loads(out.stdout).items():
            if card.startswith("card") and int(card[4:]) in indices:
                total += sum(float(v) for k, v in fields.items() if "Power" in k)
        return total

    return read


def _local_indices(devices) -> list[int]:
    """The node-wide indices of this process's GPUs, through CUDA/ROCR_VISIBLE_DEVICES."""
    ids = [d.local_hardware_id for d in devices]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") or os.environ.get("ROCR_VISIBLE_DEVICES")
    if visible and all(v.strip().isdigit() for v in visible.split(",")):
        mapping = [int(v) for v in visible.split(",")]
        ids = [mapping[i] if i < len(mapping) else i for i in ids]
    return ids


def rapl_zones(root: pathlib.Path = RAPL_ROOT) -> list[pathlib.Path]:
    """The top-level RAPL package zones (intel-rapl:0, ...), not their sub-zones."""
    if not root.is_dir():
        return []
    return sorted(z for z in root.glob("intel-rapl:*") if z.name.count(":") == 1)


def open_meter(devices, *, rapl_root: pathlib.Path = RAPL_ROOT):
    """(meter, why): a meter for these local devices, or None and the reason there is none."""
    platform = devices[0].platform
    if platform == "cpu":
        zones = rapl_zones(rapl_root)
        if not zones:
            return None, f"no RAPL counters in {rapl_root}"
        try:
            return RaplMeter(zones), ""
        except (OSError, ValueError) as e:
            return None, f"RAPL counters not readable ({e}); they are often root-only"
    indices = _local_indices(devices)
    if platform == "gpu" and "rocm" in getattr(devices[0].client, "platform_version", "").lower():
        platform = "rocm"
    if platform == "gpu":
        try:
            import pynvml

            pynvml.nvmlInit()
            return NvmlEnergyMeter(pynvml, indices), ""
        except Exception:  # no pynvml, or an old GPU without the counter: sample instead
            pass
        if shutil.which("nvidia-smi"):
            return _sampled(_nvidia_smi_watts(indices), "nvidia-smi")
        return None, "neither pynvml nor nvidia-smi is available"
    if platform == "rocm" and shutil.which("rocm-smi"):
        return _sampled(_rocm_smi_watts(indices), "rocm-smi")
    return None, f"no power readings known for {platform} devices"


def _sampled(read_watts, source: str):
    try:
        return SampledMeter(read_watts, source), ""
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        return None, f"{source} gave no power reading ({e})"
