"""The presets combine: each config preset plans and compiles on the layouts its comments name."""

import json
import os
import subprocess
import sys

import pytest
from preset_pairs import all_pairs, config_presets, mesh_presets, pairs_of

from jaxlm import mesh as mesh_lib
from jaxlm.cost.plan import MEMORY_MARGIN

HELPER = os.path.join(os.path.dirname(__file__), "preset_pairs.py")


def test_every_config_preset_names_its_layouts_and_every_mesh_preset_is_named():
    for config in config_presets():
        assert pairs_of(config), f"configs/{config}.yaml has no '# pairs with:' line"
    named = {pair.mesh for pair in all_pairs()}
    assert set(mesh_presets()) <= named, (
        f"mesh presets no config pairs with: {set(mesh_presets()) - named}"
    )
    for mesh in named:
        mesh_lib.read(mesh)  # a preset or a spec


def _plan_every_pair(*flags: str) -> dict[str, dict]:
    result = subprocess.run(
        [sys.executable, HELPER, *flags], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    return {row["pair"]: row for row in rows}


def _assert_every_pair_planned(rows: dict[str, dict]) -> None:
    assert sorted(rows) == sorted(pair.name for pair in all_pairs())
    refused = {name: row["refused"] for name, row in rows.items() if "refused" in row}
    assert not refused


def test_every_preset_pair_plans():
    rows = _plan_every_pair()
    _assert_every_pair_planned(rows)
    # the Frontier layouts with Megatron's microbatches (one sequence each): 175B has 16
    # replicas of 40 sequences, so M = 40 and the bubble is 15 / 55
    assert rows["gpt-175b+frontier-175b@1024"]["plan"]["pipeline_bubble"] == pytest.approx(15 / 55)
    assert rows["gpt-1t+frontier-1t@1024"]["plan"]["pipeline_bubble"] == pytest.approx(63 / 863)


@pytest.mark.slow
def test_every_preset_pair_compiles_its_train_step():
    rows = _plan_every_pair("--compile")
    _assert_every_pair_planned(rows)
    for name, row in rows.items():
        figures = row["plan"]
        assert set(figures["bytes_per_device"]) >= {"params", "grads", "optimizer", "activations"}
        assert figures["xla_bytes_per_device"] > figures["bytes_per_device"]["params"], name
        # at least 6 FLOPs per token for each weight a matmul uses (the head: the embedding if tied)
        counts = figures["params_by_component"]
        matmul = counts["attention"] + counts["mlp"] + (counts["head"] or counts["embedding"])
        assert figures["flops_per_token"] >= 6 * matmul, name
        assert figures["days"] > 0 and figures["compile_s"] > 0, name
        if name in ("gpt-175b+frontier-175b@64", "gpt-1t+frontier-1t@512"):
            # one replica of Frontier's layouts (40 and 800 microbatches) under 1F1B: each
            # fits an MI250X GCD
            assert figures["xla_bytes_per_device"] <= 64e9, (name, figures)
        if figures["pipeline_bubble"]:
            # a pipeline's arithmetic counts what the pipelined scan keeps: XLA agrees
            xla = figures["xla_bytes_per_device"]
            apart = abs(xla - figures["bytes_per_device"]["total"]) / xla
            assert apart <= MEMORY_MARGIN, (name, apart)
