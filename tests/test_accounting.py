"""FLOPs, MFU and energy: the arithmetic against hand counts, the per-step rows against it."""

import json
import os
import stat
import time
import types

import jax
import pytest

from conftest import train_rows
from jaxlm import config as config_lib
from jaxlm import mesh, train, training
from jaxlm.cost import energy, flops, hardware
from jaxlm.model import describe


def counts(preset: str) -> tuple[config_lib.Config, dict]:
    cfg = config_lib.load(preset)
    return cfg, flops.params_by_component(describe(cfg.model).shapes)


def test_gpt_175b_has_twelve_l_d_squared_plus_embeddings():
    cfg, c = counts("gpt-175b")
    m = cfg.model
    assert m.tie_embeddings
    expected = 12 * m.n_layers * m.d_model**2 + m.vocab_size * m.d_model
    assert c["total"] == pytest.approx(expected, rel=0.01)
    assert c["total"] == pytest.approx(175e9, rel=0.01)


def test_llama3_8b_has_8_03_billion_parameters():
    _, c = counts("llama3-8b")
    assert c["total"] == pytest.approx(8.03e9, rel=0.01)
    # GQA attention d(Hh + 2Kh) + Hh d and SwiGLU 3dF per layer, by hand
    d, h, n_heads, k, f, layers = 4096, 128, 32, 8, 14336, 32
    assert c["attention"] == layers * (d * (n_heads * h + 2 * k * h) + n_heads * h * d)
    assert c["mlp"] == layers * 3 * d * f


def tiny_flops_per_token_by_hand() -> float:
    """tiny: d 64, 2 layers, 8 heads of 8, 4 kv heads, SwiGLU 128, untied 512 vocab, seq 32."""
    d, layers, heads, kv, hd, ff, vocab, seq = 64, 2, 8, 4, 8, 128, 512, 32
    attention = d * heads * hd + 2 * d * kv * hd + heads * hd * d
    matmul_params = layers * (attention + 3 * d * ff) + d * vocab
    return 6 * matmul_params + 6 * layers * seq * heads * hd


def test_flops_per_token_matches_the_hand_count():
    cfg, c = counts("tiny")
    assert (
        flops.model_flops_per_token(cfg.model, cfg.train.seq_len, c)
        == tiny_flops_per_token_by_hand()
    )
    full = config_lib.load("tiny", ["model.remat=full"])
    extra = 2 * (c["attention"] + c["mlp"]) + 2 * 2 * 32 * 64
    assert (
        flops.hardware_flops_per_token(full.model, 32, c) == tiny_flops_per_token_by_hand() + extra
    )


def test_the_mfu_of_a_run_is_model_flops_times_tokens_per_second_over_peak(tiny_cfg):
    cfg = tiny_cfg("train.steps=4", "train.eval_every=0", "train.peak_tflops=2.5")
    rows = train_rows(training.run(cfg, mesh.make_mesh("dp=4,tp=2")))
    assert len(rows) == 4
    for row in rows:
        by_hand = tiny_flops_per_token_by_hand() * row["tokens_per_s"] / 8 / 2.5e12
        assert row["mfu"] == pytest.approx(by_hand, rel=1e-9)
        assert row["tflops_per_device"] == pytest.approx(by_hand * 2.5, rel=1e-9)
        assert 0 < row["mfu"] < 1


def test_on_cpu_the_peak_is_a_measured_matmul(tiny_cfg):
    rows = train_rows(
        training.run(tiny_cfg("train.steps=2", "train.eval_every=0"), mesh.make_mesh("dp=8"))
    )
    assert all(0 < row["mfu"] for row in rows)


class FakeMeter:
    """100 W from the moment it opens."""

    source = "fake"

    def __init__(self):
        self.start, self.readings = time.perf_counter(), []

    def joules(self):
        self.readings.append(100.0 * (time.perf_counter() - self.start))
        return self.readings[-1]

    def close(self):
        pass


def test_energy_per_step_total_kwh_tokens_per_kwh_and_co2(tiny_cfg, monkeypatch):
    meter = FakeMeter()
    monkeypatch.setattr(energy, "open_meter", lambda devices: (meter, ""))
    cfg = tiny_cfg("train.steps=5", "train.eval_every=0", "log.carbon_intensity=0.4")
    rows = train_rows(training.run(cfg, mesh.make_mesh("dp=8")))
    tokens = 0.0
    for before, row in zip([None] + rows, rows, strict=False):
        tokens += row["tokens"]
        # the meter read where the step's time was taken: a difference of two readings, and
        # 100 W over the step time (up to the moment between reading the clock and the meter)
        assert any(
            row["energy_j"] == pytest.approx(b - a, abs=1e-9)
            for i, a in enumerate(meter.readings)
            for b in meter.readings[i + 1 :]
        )
        assert row["energy_j"] == pytest.approx(100.0 * row["step_time_s"], rel=0.05, abs=0.05)
        assert row["tokens_per_kwh"] == pytest.approx(tokens / row["energy_kwh"])
        assert row["co2_kg"] == pytest.approx(0.4 * row["energy_kwh"])
        if before:  # the total also counts the time between steps
            assert row["energy_kwh"] >= before["energy_kwh"] + row["energy_j"] / 3.6e6 * 0.999


def test_without_a_meter_no_energy_is_logged(tiny_cfg):
    rows = train_rows(
        training.run(
            tiny_cfg("train.steps=2", "train.eval_every=0", "log.energy=false"),
            mesh.make_mesh("dp=8"),
        )
    )
    assert not any("energy_j" in row for row in rows)


def rapl_zone(root, name, uj, max_uj=2**32):
    zone = root / name
    zone.mkdir(parents=True)
    (zone / "energy_uj").write_text(str(uj))
    (zone / "max_energy_range_uj").write_text(str(max_uj))
    return zone


def test_rapl_counts_package_joules_across_a_wrap(tmp_path):
    a = rapl_zone(tmp_path, "intel-rapl:0", 5_000_000)
    rapl_zone(tmp_path, "intel-rapl:0:0", 1)  # a sub-zone (core): inside the package, not added
    b = rapl_zone(tmp_path, "intel-rapl:1", 999_000_000, max_uj=1_000_000_000)
    meter, why = energy.open_meter(jax.devices()[:1], rapl_root=tmp_path)
    assert meter.source == "RAPL" and not why
    (a / "energy_uj").write_text(str(7_000_000))  # +2 J
    (b / "energy_uj").write_text(str(500_000))  # wrapped: +1.5 J
    assert meter.joules() == pytest.approx(3.5)
    (a / "energy_uj").write_text(str(8_000_000))
    assert meter.joules() == pytest.approx(4.5)


def test_no_readable_counters_means_no_meter_and_a_reason(tmp_path):
    meter, why = energy.open_meter(jax.devices()[:1], rapl_root=tmp_path / "none")
    assert meter is None and "RAPL" in why


def test_sampled_power_is_integrated_over_time():
    meter = energy.SampledMeter(lambda: 50.0, "test", interval=0.01)
    start = time.monotonic()
    time.sleep(0.2)
    joules, elapsed = meter.joules(), time.monotonic() - start
    meter.close()
    assert joules == pytest.approx(50.0 * elapsed, rel=0.1)


def test_gpus_without_pynvml_are_sampled_through_nvidia_smi(tmp_path, monkeypatch):
    script = tmp_path / "nvidia-smi"
    script.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\nprintf "150.5\\n49.5\\n"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.setitem(__import__("sys").modules, "pynvml", None)  # not installed
    gpus = [
        types.SimpleNamespace(
            platform="gpu",
            local_hardware_id=i,
            client=types.SimpleNamespace(platform_version="cuda 12.8"),
        )
        for i in (0, 1)
    ]
    meter, why = energy.open_meter(gpus)
    try:
        assert meter.source == "nvidia-smi"
        assert "--id=2,3" in (tmp_path / "args").read_text()  # the node-wide GPU ids
        assert energy._nvidia_smi_watts([2, 3])() == pytest.approx(200.0)
    finally:
        meter.close()


def test_bad_accounting_settings_exit_2():
    assert train.main(["--config", "tiny", "train.peak_tflops=0"]) == 2
    assert train.main(["--config", "tiny", "log.carbon_intensity=-1"]) == 2


def test_a_resumed_run_carries_its_energy_and_tokens_on():
    from jaxlm.cost.accounting import resume_totals

    kept = [
        {"step": 1, "tokens": 10.0, "energy_kwh": 1.0},
        {"step": 1, "val_loss": 3.0},
        {"step": 2, "tokens": 10.0, "energy_kwh": 2.5},
    ]
    assert resume_totals(kept) == (2.5, 20.0)
    assert resume_totals([{"step": 1, "tokens": 10.0}]) == (0.0, 0)  # measured nothing before


def test_the_cpu_peak_is_measured_once_per_machine_and_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path))
    calls = []

    def measure(dtype):
        calls.append(dtype)
        return 0.5 if dtype == "float32" else 1.0

    peak = hardware.cpu_peak_tflops.__wrapped__  # past the per-process cache
    assert peak("float32", measure) == 0.5 and peak("bfloat16", measure) == 1.0
    assert peak("float32", measure) == 0.5  # from the file now
    assert calls == ["float32", "bfloat16"]
    assert len(json.loads((tmp_path / "cpu-peak.json").read_text())) == 2
    (tmp_path / "cpu-peak.json").write_text("{not json")  # a damaged cache is measured anew
    assert peak("float32", measure) == 0.5 and calls[-1] == "float32"


def test_the_cpu_peak_is_the_best_sustained_window_of_square_matmuls():
    one = hardware.measure_matmul_tflops("float32", sizes=(128,), window_s=0.01, windows=2)
    assert 0 < one < 100  # TFLOP/s: a CPU, not a data sheet
