"""What the step watchdog costs: a preset's step time with the watchdog and without it
(`train.step_timeout=off`), alternating in one process, and the time of the loop's calls into it.

    python benchmarks/watchdog_cpu.py [--config tiny] [--steps 200] [--rounds 3] [--json OUT.json]

Prints the median step time of each setting over all rounds and their ratio. On a step of a few
milliseconds that ratio is as noisy as the machine, so it also prints what the loop's two
`enter` calls per step cost, timed directly while the watchdog thread polls, as a share of the
step: a bound on the watchdog's cost that no noise blurs. Not a test: nothing asserts, the
figures go to the closing notes and the README.
"""

import argparse
import json
import statistics
import time

import jax

from jaxlm import config as config_lib
from jaxlm import mesh as mesh_lib
from jaxlm import training, watchdog


def step_times(preset: str, timeout: str, steps: int, mesh) -> list[float]:
    cfg = config_lib.load(
        None if preset == "default" else preset,
        [
            "data.source=synthetic",
            f"train.steps={steps}",
            "train.eval_every=0",
            f"train.step_timeout={timeout}",
        ],
    )
    rows = training.run(cfg, mesh)
    return [r["step_time_s"] for r in rows[5:] if "step_time_s" in r]  # warm steps


def enter_cost_s(calls: int = 200_000) -> float:
    """Seconds per `Watchdog.enter` call, with the watchdog thread polling as in training."""
    with watchdog.Watchdog(None, poll_s=0.01) as dog:
        start = time.perf_counter()
        for step in range(calls):
            dog.enter(f"step {step}", step, "step")
        return (time.perf_counter() - start) / calls


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="tiny", help="a preset, or 'default' (default tiny)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    mesh = mesh_lib.make_mesh("dp=1", jax.devices()[:1])
    times = {"auto": [], "off": []}
    for _ in range(args.rounds):
        for timeout in times:
            times[timeout] += step_times(args.config, timeout, args.steps, mesh)
    on, off = (statistics.median(times[k]) for k in ("auto", "off"))
    enter_s = enter_cost_s()
    print(
        f"{args.config}, {args.rounds} x {args.steps} steps each: {on * 1e3:.2f} ms/step with "
        f"the watchdog, {off * 1e3:.2f} without: ratio {on / off:.3f}"
    )
    print(
        f"one enter call: {enter_s * 1e6:.2f} us; two a step are {2 * enter_s / off:.2e} of "
        f"the step"
    )
    if args.json:
        result = {"with_s": on, "without_s": off, "ratio": on / off, "enter_s": enter_s}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
