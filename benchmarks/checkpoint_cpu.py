"""What asynchronous checkpointing costs: gpt-124m on this CPU, a checkpoint every 10 steps.

    python benchmarks/checkpoint_cpu.py [--steps 31] [--seq-len 1024] [--json OUT.json]

Three runs of the real trainer on one device (synthetic data, one sequence per step):
  A: 1 step (compile, init, the final save: the fixed costs),
  B: N steps, checkpoint only at the end,
  C: N steps, checkpoint every 10 steps and at the end.
The overhead is (C - B) / (B - A): the extra wall time of the periodic checkpoints over the time
of the N - 1 steps themselves (the aim is at most 10 %). Not a test: nothing asserts.
"""

import argparse
import json
import pathlib
import tempfile
import time

import jax

from jaxlm import config as config_lib
from jaxlm import mesh as mesh_lib
from jaxlm import training


def wall_time(steps: int, every: int, seq_len: int, mesh) -> float:
    cfg = config_lib.load(
        "gpt-124m",
        [
            "data.source=synthetic",
            "train.global_batch_size=1",
            f"train.seq_len={seq_len}",
            f"train.steps={steps}",
            f"checkpoint.every={every}",
            "train.eval_every=0",
            "log.tensorboard=false",
        ],
    )
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        training.run(cfg, mesh, out_dir=pathlib.Path(out))
        return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=31)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--json")
    args = parser.parse_args()
    mesh = mesh_lib.make_mesh("dp=1", jax.devices()[:1])

    fixed = wall_time(1, 0, args.seq_len, mesh)
    plain = wall_time(args.steps, 0, args.seq_len, mesh)
    saving = wall_time(args.steps, 10, args.seq_len, mesh)
    step_s = (plain - fixed) / (args.steps - 1)
    overhead = (saving - plain) / (plain - fixed)
    print(
        f"gpt-124m, {args.seq_len} tokens/step: {step_s:.2f} s/step; {args.steps} steps take "
        f"{plain:.1f} s with a checkpoint only at the end, {saving:.1f} s with one every 10 "
        f"steps: overhead {100 * overhead:.1f} % of step time (aim <= 10 %)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "fixed_s": fixed,
                    "plain_s": plain,
                    "every_10_s": saving,
                    "step_s": step_s,
                    "overhead": overhead,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
