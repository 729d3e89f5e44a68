"""Core trainer throughput on this machine's CPU, and compile time against depth.

    python benchmarks/core_cpu.py [--steps 5] [--json OUT.json]

Prints, for `tiny` and `gpt-124m` (through the real trainer, one device):
  tokens/s and seconds per step (median of the steps after the first),
and the time to lower and compile the gpt-124m train step with 2 and with 24 layers. The layers
run as a scan, so the ratio should stay under 1.5 however deep the model. Not a test: timings
on shared machines are noisy, so nothing here asserts.
"""

import argparse
import json
import statistics
import time

import jax

from jaxlm import config as config_lib
from jaxlm import mesh as mesh_lib
from jaxlm import training
from jaxlm.step import abstract_step_inputs, build_program

THROUGHPUT_RUNS = {
    "tiny": ["train.global_batch_size=16", "train.seq_len=32"],
    # one sequence of 1024 tokens per step keeps a CPU step to seconds
    "gpt-124m": ["train.global_batch_size=1", "train.seq_len=1024"],
}


def throughput(preset: str, overrides: list[str], steps: int, mesh) -> dict:
    cfg = config_lib.load(preset, [*overrides, f"train.steps={steps}"])
    rows = training.run(cfg, mesh)
    step_time = statistics.median(r["step_time_s"] for r in rows[1:])
    return {
        "model": preset,
        "tokens_per_step": cfg.train.global_batch_size * cfg.train.seq_len,
        "step_time_s": step_time,
        "tokens_per_s": cfg.train.global_batch_size * cfg.train.seq_len / step_time,
    }


def compile_seconds(preset: str, n_layers: int, mesh) -> float:
    """Trace, lower and compile the train step against abstract inputs (nothing allocated)."""
    cfg = config_lib.load(
        preset, [f"model.n_layers={n_layers}", "train.global_batch_size=1", "data.source=synthetic"]
    )
    program = build_program(cfg, mesh)
    inputs = abstract_step_inputs(cfg, program)
    start = time.perf_counter()
    program.train_step.lower(*inputs).compile()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    mesh = mesh_lib.make_mesh("dp=1", jax.devices()[:1])

    results = {"device": jax.devices()[0].device_kind, "throughput": []}
    print(f"{'model':<10} {'tokens/step':>12} {'s/step':>9} {'tokens/s':>10}")
    for preset, overrides in THROUGHPUT_RUNS.items():
        row = throughput(preset, overrides, args.steps, mesh)
        results["throughput"].append(row)
        print(
            f"{preset:<10} {row['tokens_per_step']:>12} {row['step_time_s']:>9.3f} "
            f"{row['tokens_per_s']:>10,.0f}"
        )

    shallow, deep = (compile_seconds("gpt-124m", n, mesh) for n in (2, 24))
    results["compile_s"] = {"layers_2": shallow, "layers_24": deep, "ratio": deep / shallow}
    print(
        f"compile gpt-124m train step: 2 layers {shallow:.1f} s, 24 layers {deep:.1f} s, "
        f"ratio {deep / shallow:.2f} (target < 1.5)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
