"""Pipeline step time against the number of microbatches, next to the bubble formula.

    python benchmarks/pipeline_cpu.py [--steps 6] [--json OUT.json]

pp=4 on 4 fake CPU devices, 8 layers, the global batch fixed at 32 sequences, M microbatches in
{4, 8, 16, 32}. A GPipe schedule runs M + S - 1 iterations of one microbatch per stage, so with
the work per step fixed the step time should scale like (M + S - 1) / M: the bubble
(S - 1) / (M + S - 1) shrinks as M grows. (On these fake devices idle stages still compute,
on stale data, so the bubble shows up as time here just as it would as idle time on GPUs.)
Not a test: nothing asserts; the table goes to the closing notes and the README.
"""

import argparse
import json
import statistics

import jax

jax.config.update("jax_num_cpu_devices", 4)

from jaxlm import config as config_lib  # noqa: E402
from jaxlm import mesh as mesh_lib  # noqa: E402
from jaxlm import training  # noqa: E402

STAGES = 4


def step_time(microbatches: int, steps: int, mesh) -> float:
    cfg = config_lib.load(
        None,
        [
            "data.source=synthetic",
            "model.n_layers=8",
            "model.d_model=256",
            "model.n_heads=4",
            "model.d_ff=1024",
            "train.global_batch_size=32",
            "train.seq_len=128",
            f"train.microbatches={microbatches}",
            f"train.steps={steps}",
            "train.eval_every=0",
            "model.compute_dtype=float32",
        ],
    )
    rows = [r for r in training.run(cfg, mesh) if "loss" in r]
    return statistics.median(r["step_time_s"] for r in rows[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json")
    args = parser.parse_args()
    mesh = mesh_lib.make_mesh(f"pp={STAGES}")

    rows = []
    for m in (4, 8, 16, 32):
        rows.append(
            {
                "microbatches": m,
                "bubble": (STAGES - 1) / (m + STAGES - 1),
                "predicted": (m + STAGES - 1) / m,
                "step_s": step_time(m, args.steps, mesh),
            }
        )
    base = rows[0]
    print(f"pp={STAGES}, 8 layers, 32 x 128 tokens per step; times relative to M=4")
    print(f"{'M':>4} {'bubble':>8} {'formula':>8} {'s/step':>8} {'measured':>9}")
    for r in rows:
        r["predicted_relative"] = r["predicted"] / base["predicted"]
        r["measured_relative"] = r["step_s"] / base["step_s"]
        print(
            f"{r['microbatches']:>4} {r['bubble']:>8.3f} {r['predicted_relative']:>8.3f} "
            f"{r['step_s']:>8.3f} {r['measured_relative']:>9.3f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
