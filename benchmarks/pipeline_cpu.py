"""Pipeline step time against the number of microbatches, next to the bubble formula.

    python benchmarks/pipeline_cpu.py [--steps 6] [--schedule gpipe 1f1b] [--json OUT.json]

pp=4 on 4 fake CPU devices, 8 layers, the global batch fixed at 32 sequences, M microbatches in
{4, 8, 16, 32}. A GPipe schedule runs M + S - 1 iterations of one microbatch per stage, so with
the work per step fixed the step time should scale like (M + S - 1) / M: the bubble
(S - 1) / (M + S - 1) shrinks as M grows. (On these fake devices idle stages still compute,
on stale data, so the bubble shows up as time here just as it would as idle time on GPUs.)
With `--schedule gpipe 1f1b` each M runs under both schedules, and the table adds 1F1B's time
relative to GPipe's: the same bubble, one more forward of the layers (its backward slot
recomputes each layer from its saved input), and per iteration a forward and a backward slot.
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


def step_time(microbatches: int, steps: int, mesh, schedule: str = "gpipe") -> float:
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
            f"train.pipeline_schedule={schedule}",
        ],
    )
    rows = [r for r in training.run(cfg, mesh) if "loss" in r]
    return statistics.median(r["step_time_s"] for r in rows[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--schedule", nargs="+", default=["gpipe"], help="gpipe, 1f1b")
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
                **{
                    f"{schedule}_step_s": step_time(m, args.steps, mesh, schedule)
                    for schedule in args.schedule
                },
            }
        )
    base = rows[0]
    first = args.schedule[0]
    print(f"pp={STAGES}, 8 layers, 32 x 128 tokens per step; times relative to {first} at M=4")
    header = f"{'M':>4} {'bubble':>8} {'formula':>8}"
    for schedule in args.schedule:
        header += f" {schedule + ' s':>9} {'relative':>9}"
    if len(args.schedule) > 1:
        header += f" {'/'.join(reversed(args.schedule[:2])):>11}"
    print(header)
    for r in rows:
        r["predicted_relative"] = r["predicted"] / base["predicted"]
        line = f"{r['microbatches']:>4} {r['bubble']:>8.3f} {r['predicted_relative']:>8.3f}"
        for schedule in args.schedule:
            seconds = r[f"{schedule}_step_s"]
            r[f"{schedule}_relative"] = seconds / base[f"{first}_step_s"]
            line += f" {seconds:>9.3f} {r[f'{schedule}_relative']:>9.3f}"
        if len(args.schedule) > 1:
            a, b = args.schedule[:2]
            line += f" {r[f'{b}_step_s'] / r[f'{a}_step_s']:>11.3f}"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
