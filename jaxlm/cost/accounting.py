"""Per-step accounting added to each metrics row: achieved TFLOP/s, MFU and energy.

    tflops_per_device = model_flops_per_token * tokens_per_s_per_device / 1e12
    mfu               = tflops_per_device / peak_tflops          (a fraction, not percent)
    energy_j          = joules the devices used during the step (all processes)
    energy_kwh        = the run's total so far (resumes included); tokens_per_kwh, and co2_kg with
                        log.carbon_intensity (kg CO2 per kWh)

Model FLOPs per token are defined in jaxlm/cost/flops.py; the peak comes from
jaxlm/cost/hardware.py.
A meter covers one process's devices; with several processes the energy is that of process 0
times their number (processes run the same program on the same kind of devices).
"""

import dataclasses
import logging

import jax

from jaxlm.cost import energy, flops, hardware

log = logging.getLogger("jaxlm")


@dataclasses.dataclass
class StepAccounting:
    flops_per_token: float  # model FLOPs (6N + attention)
    peak_tflops: float | None  # per device; None: no MFU
    meter: energy.Meter | None = None
    processes: int = 1
    carbon_intensity: float | None = None  # kg/kWh
    kwh_before: float = 0.0  # energy of the steps before a resume (from metrics.jsonl)
    tokens: float = 0.0  # tokens trained, those before a resume included

    def joules(self) -> float | None:
        """Joules used since the meter opened, all processes (None without a meter)."""
        return self.meter.joules() * self.processes if self.meter else None

    def annotate(self, row: dict, step_joules: float | None, total_joules: float | None) -> None:
        """Add throughput and energy to a step's row (which has tokens_per_s_per_device).
        The run's kWh include what happened between steps (compiling, validation, saving)."""
        row["tflops_per_device"] = self.flops_per_token * row["tokens_per_s_per_device"] / 1e12
        if self.peak_tflops:
            row["mfu"] = row["tflops_per_device"] / self.peak_tflops
        if step_joules is None:
            return
        self.tokens += row["tokens"]
        kwh = self.kwh_before + total_joules / 3.6e6
        row["energy_j"] = step_joules
        row["energy_kwh"] = kwh
        if kwh > 0:
            row["tokens_per_kwh"] = self.tokens / kwh
        if self.carbon_intensity is not None:
            row["co2_kg"] = kwh * self.carbon_intensity

    def close(self) -> None:
        if self.meter:
            self.meter.close()


def resume_totals(rows: list[dict]) -> tuple[float, float]:
    """(kWh, tokens) of the steps before a resume, from the metrics rows kept for them."""
    kwh = next((r["energy_kwh"] for r in reversed(rows) if "energy_kwh" in r), 0.0)
    return kwh, sum(r["tokens"] for r in rows if "energy_kwh" in r)


def open_accounting(cfg, program, previous_rows: list[dict]) -> StepAccounting:
    """The accounting of a training run: its model FLOPs per token, the devices' peak, an
    energy meter where one can be read, and the totals of the steps before a resume."""
    per_token = flops.model_flops_per_token_of(cfg, program.spec.shapes)
    peak, source = hardware.peak_tflops(cfg.train.peak_tflops, cfg.model.compute_dtype)
    if peak:
        log.info(
            "MFU against %.4g TFLOP/s per device (%s); model FLOPs per token %.4g "
            "(6N + causal attention, jaxlm/cost/flops.py)",
            peak,
            source,
            per_token,
        )
    else:
        log.info("no MFU: %s", source)
    processes = jax.process_count()
    meter, why = (
        energy.open_meter(jax.local_devices()) if cfg.log.energy else (None, "log.energy=false")
    )
    if meter:
        times = f", x {processes} processes" if processes > 1 else ""
        log.info("energy from %s%s", meter.source, times)
    else:
        log.info("energy not measured: %s", why)
    kwh, tokens = resume_totals(previous_rows)
    return StepAccounting(per_token, peak, meter, processes, cfg.log.carbon_intensity, kwh, tokens)
