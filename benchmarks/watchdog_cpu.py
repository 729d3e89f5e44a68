"""What the step watchdog costs: the tiny preset's step time with the watchdog and without it
(`train.step_timeout=off`), alternating in one process.

    python benchmarks/watchdog_cpu.py [--steps 200] [--rounds 3] [--json OUT.json]

Prints the median step time of each setting over all rounds and their ratio. Not a test:
nothing asserts, the figures go to the closing notes and the README.
"""

import argparse
import json
import statistics

import jax

from jaxlm import config as config_lib
from jaxlm import mesh as mesh_lib
from jaxlm import training


def step_times(timeout: str, steps: int, mesh) -> list[float]:
    cfg = config_lib.load(
        "tiny",
        [
            "data.source=synthetic",
            f"train.steps={steps}",
            "train.eval_every=0",
            f"train.step_timeout={timeout}",
        ],
    )
    rows = training.run(cfg, mesh)
    return [r["step_time_s"] for r in rows[5:] if "step_time_s" in r]  # warm steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    mesh = mesh_lib.make_mesh("dp=1", jax.devices()[:1])
    times = {"auto": [], "off": []}
    for _ in range(args.rounds):
        for timeout in times:
            times[timeout] += step_times(timeout, args.steps, mesh)
    on, off = (statistics.median(times[k]) for k in ("auto", "off"))
    print(
        f"tiny, {args.rounds} x {args.steps} steps each: {on * 1e3:.2f} ms/step with the "
        f"watchdog, {off * 1e3:.2f} without: ratio {on / off:.3f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"with_s": on, "without_s": off, "ratio": on / off}, f, indent=2)


if __name__ == "__main__":
    main()
