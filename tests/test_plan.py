"""plan and tune: figures that match the real state, XLA's compile, and a ranked search."""

import json
import subprocess
import sys

import jax
import pytest

from jaxlm import config as config_lib
from jaxlm import mesh
from jaxlm.cost import flops, hardware, plan, search
from jaxlm.model import layers
from jaxlm.step import build_program

H100 = hardware.lookup("h100")


def real_bytes_on_one_device(tree) -> int:
    return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize(
    "preset,spec,extra",
    [
        ("tiny", "dp=2,fsdp=2,tp=2", []),
        ("tiny", "dp=8", ["train.zero1=true"]),
        ("gpt-124m", "fsdp=4,tp=2", []),
    ],
)
def test_plan_bytes_match_the_shards_of_a_real_state(preset, spec, extra):
    cfg = config_lib.load(preset, extra)
    m = mesh.make_mesh(spec)
    figures = plan.make_plan(cfg, m, device=H100, compile=False)
    state = build_program(cfg, m).init(jax.random.key(0))
    assert figures["bytes_per_device"]["params"] == pytest.approx(
        real_bytes_on_one_device(state.params), rel=0.02
    )
    assert figures["bytes_per_device"]["optimizer"] == pytest.approx(
        real_bytes_on_one_device(state.opt_state), rel=0.02
    )


@pytest.mark.slow
def test_compiled_matmul_flops_are_the_arithmetic_with_the_attentions_query_blocks():
    """XLA's attention computes the causal square in n query blocks, each over the keys up to
    its end: (n + 1) / 2n of the T x T scores, where the arithmetic counts the causal half. Its
    count is the hardware FLOPs plus 1/n of that half, forward and backward (n = 1: the whole
    square). Loops (12 layers, 4 micro batches) must be counted as often as they run."""
    cfg = config_lib.load("gpt-124m", ["train.global_batch_size=32", "train.micro_batch_size=2"])
    figures = plan.make_plan(cfg, mesh.make_mesh("dp=4,tp=2"), device=H100)
    attention_forward = flops.attention_flops_per_token(cfg.model, cfg.train.seq_len)
    n = layers.query_blocks(cfg.train.seq_len)
    assert n == 8  # seq 1,024 in blocks of 128
    assert figures["xla_flops_per_token"] == pytest.approx(
        figures["hardware_flops_per_token"] + 3 * attention_forward / n, rel=0.02
    )
    state = figures["bytes_per_device"]
    assert figures["xla_bytes_per_device"] > state["params"] + state["optimizer"]
    assert figures["fits"]


def run_plan(*args: str, timeout: int = 600):
    return subprocess.run(
        [sys.executable, "-m", "jaxlm.plan", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_plan_compiles_a_large_model_on_fake_devices():
    """The command line end to end; every preset's own layouts compile in tests/test_presets.py,
    with these same checks of the figures."""
    devices = 8
    out = run_plan(
        "--config",
        "gpt-1.3b",
        "--mesh",
        "fsdp=8",
        "--devices",
        str(devices),
        "--json",
        "--device-kind",
        "h100",
        "model.remat=full",
        "train.micro_batch_size=1",
    )
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["devices"] == devices
    assert set(figures["bytes_per_device"]) >= {"params", "grads", "optimizer", "activations"}
    assert figures["xla_bytes_per_device"] > figures["bytes_per_device"]["params"]
    assert figures["flops_per_token"] > 6 * figures["params"] * 0.9
    assert figures["days"] > 0 and figures["compile_s"] > 0


@pytest.mark.slow
def test_plan_warns_when_the_arithmetic_and_xla_disagree_saying_which_it_trusts(monkeypatch):
    cfg = config_lib.load("tiny", ["model.n_layers=4"])
    m = mesh.make_mesh("pp=2,dp=4")

    def disagreement(margin):
        monkeypatch.setattr(plan, "MEMORY_MARGIN", margin)
        figures = plan.make_plan(cfg, m, device=H100, compile=True)
        xla = figures["xla_bytes_per_device"]
        apart = abs(xla - figures["bytes_per_device"]["total"]) / xla
        return apart, [w for w in figures["warnings"] if "differ by" in w]

    apart, _ = disagreement(plan.MEMORY_MARGIN)
    assert apart > 0.02, apart  # the figures differ enough to put a margin between
    _, warned = disagreement(apart / 2)  # beyond the margin: one warning
    assert len(warned) == 1, warned
    assert f"differ by {apart:.0%} of XLA's: the fit is judged by XLA's" in warned[0]
    assert disagreement(apart + 0.01)[1] == []  # within the margin: no warning


def test_plan_warns_by_the_rules_of_thumb():
    cfg = config_lib.load("tiny", ["train.microbatches=2"])
    figures = plan.make_plan(
        cfg, mesh.make_mesh("pp=2,fsdp=2,tp=2"), device=H100, devices_per_node=1, compile=False
    )
    text = " ".join(figures["warnings"])
    assert "spans nodes" in text and "tokens per data-parallel shard" in text
    assert "bubble" in text and "FSDP under a pipeline" in text


@pytest.mark.parametrize(
    "args",
    [
        ["--config", "tiny", "--mesh", "dp=8", "--device-kind", "abacus"],
        ["--config", "tiny", "--mesh", "tp=16"],  # 8 heads
        ["--config", "tiny", "--mesh", "dp=-1"],  # no --devices
        ["--config", "tiny", "--mesh", "dp=8", "model.n_layrs=3"],
    ],
)
def test_plan_bad_input_exits_2(args):
    out = run_plan(*args, "--no-compile", timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip().startswith("error:")


@pytest.mark.slow
def test_tune_ranks_gpt_124m_layouts_on_8_devices():
    cfg = config_lib.load("gpt-124m")
    result = search.search(
        cfg, jax.devices(), device=H100, per_node=8, memory_gb=80, max_trials=6, measure=False
    )
    layouts = result["layouts"]
    assert layouts and result["best"] == layouts[0]["command"]
    assert [r["step_s"] for r in layouts] == sorted(r["step_s"] for r in layouts)
    assert all(r["xla_bytes"] <= 80e9 for r in layouts)
    assert all(r["xla_bytes"] > 80e9 for r in result["rejected"])
    assert "CPU" in result["ranked_by"]
    # the winner is a command line that trains
    best = config_lib.apply_overrides(cfg, search.Layout(**_layout(layouts[0])).overrides())
    assert best.train.micro_batch_size == layouts[0]["micro_batch"]


def _layout(row):
    return {
        "sizes": mesh.resolve(mesh.read(row["mesh"]), 8),
        "remat": row["remat"],
        "zero1": row["zero1"],
        "micro_batch": row["micro_batch"],
    }


@pytest.mark.slow
def test_tune_measures_steps_when_asked():
    cfg = config_lib.load("tiny", ["model.compute_dtype=float32"])
    result = search.search(
        cfg,
        jax.devices()[:2],
        device=H100,
        per_node=8,
        memory_gb=80,
        max_trials=3,
        measure=True,
        steps=2,
    )
    assert result["ranked_by"] == "measured steps"
    assert len(result["layouts"]) == 3
    assert all(r["step_s"] > 0 and r["mfu"] > 0 for r in result["layouts"])


@pytest.mark.parametrize("seq_len, contexts", [(256, (1,)), (16384, (1, 2, 4, 8))])
def test_tune_enumerates_every_mesh_the_model_divides(seq_len, contexts):
    """Long sequences are also tried split over a context axis."""
    cfg = config_lib.load("tiny", [f"train.seq_len={seq_len}", f"model.max_seq_len={seq_len}"])
    m = cfg.model  # 8 heads, 4 kv heads, 2 layers
    shapes = search.meshes(cfg, 8, per_node=4)
    by_hand = [
        {"pipeline": pp, "data": dp, "fsdp": fsdp, "context": cp, "tensor": tp}
        for tp in (1, 2, 4, 8)
        for cp in contexts
        for pp in range(1, 9)
        for fsdp in range(1, 9)
        for dp in range(1, 9)
        if pp * dp * fsdp * cp * tp == 8
        and tp <= 4  # inside a node of 4
        and m.n_heads % tp == 0
        and m.kv_heads % tp == 0
        and m.n_layers % pp == 0
    ]
    assert sorted(map(str, shapes)) == sorted(map(str, by_hand))
    layout = search.Layout(by_hand[0], remat="full", zero1=True, micro_batch=4)
    c = config_lib.apply_overrides(cfg, layout.overrides())
    assert (c.model.remat, c.train.zero1, c.train.micro_batch_size) == ("full", True, 4)
