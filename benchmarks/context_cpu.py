"""Context parallelism on 8 fake CPU devices: memory, attention work and speed against cp.

    python benchmarks/context_cpu.py [--memory-length 32768] [--lengths 2048 4096 8192 16384]
                                     [--contexts 1 2 4 8] [--steps 3] [--json OUT.json]

The tiny preset in float32, one sequence per step (global batch 1), so that the sequence is
the only thing split.

1. Memory: XLA's temporaries per device of the compiled train step (nothing runs) at
   `--memory-length` tokens, for one device and for cp=8 with the ring and with gathered keys
   and values, and each one's ratio to one device's.
2. Work: the compiled step's matmul FLOPs per device (jaxlm/cost/hlo.py) for the same three.
   SPMD compiles one program for every device of the ring, so each device's count is the same
   by construction; the ring's is lower than the gathered square's because it skips the chunk
   pairs that the causal mask hides (two of four at each step after the first).
3. Speed: tokens/s of `--steps` timed steps (after one to compile) at each of `--lengths` for
   each cp (ring from cp=4 on, `auto`), on fake devices that share this machine's cores: the
   table shows what the layout costs in compute and copies here, not a cluster's speed.
Not a test: nothing asserts; the tables go to the README and the notes.
"""

import argparse
import json

import jax

jax.config.update("jax_num_cpu_devices", 8)

from jaxlm import config as config_lib  # noqa: E402
from jaxlm import mesh as mesh_lib  # noqa: E402
from jaxlm.cost.compiled import compile_step, measured_seconds  # noqa: E402
from jaxlm.step import build_program  # noqa: E402

MB = 1e6


def config(length: int, *extra: str):
    return config_lib.load(
        "tiny",
        [
            "model.compute_dtype=float32",
            "data.source=synthetic",
            "train.global_batch_size=1",
            f"train.seq_len={length}",
            f"model.max_seq_len={length}",
            *extra,
        ],
    )


def mesh(cp: int):
    return mesh_lib.make_mesh(f"cp={cp}", jax.devices()[:cp])


def compiled_figures(length: int) -> list[dict]:
    rows = []
    for name, cp, extra in (
        ("one device", 1, ()),
        ("cp=8 ring", 8, ("model.context_attention=ring",)),
        ("cp=8 gathered", 8, ("model.context_attention=all_gather",)),
    ):
        cfg = config(length, *extra)
        step = compile_step(cfg, build_program(cfg, mesh(cp)))
        rows.append(
            {
                "layout": name,
                "temp_mb": step.memory["temp"] / MB,
                "gflops": step.flops_per_device / 1e9,
            }
        )
    for row in rows:
        row["temp_ratio"] = row["temp_mb"] / rows[0]["temp_mb"]
    return rows


def tokens_per_second(length: int, cp: int, steps: int) -> float:
    cfg = config(length)
    program = build_program(cfg, mesh(cp))
    step = compile_step(cfg, program)
    return length / measured_seconds(cfg, program, step.executable, steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--memory-length", type=int, default=32768)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument("--contexts", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args()

    compiled = compiled_figures(args.memory_length)
    print(f"compiled train step, {args.memory_length} tokens, per device:")
    print(f"{'layout':<15} {'temporaries MB':>15} {'ratio':>6} {'matmul GFLOP':>13}")
    for row in compiled:
        print(
            f"{row['layout']:<15} {row['temp_mb']:>15.1f} {row['temp_ratio']:>6.2f} "
            f"{row['gflops']:>13.1f}"
        )

    speed = {}
    print("\ntokens/s (all fake devices on this machine's cores):")
    print(f"{'tokens':>7} " + " ".join(f"{'cp=' + str(cp):>8}" for cp in args.contexts))
    for length in args.lengths:
        speed[length] = {cp: tokens_per_second(length, cp, args.steps) for cp in args.contexts}
        print(f"{length:>7} " + " ".join(f"{speed[length][cp]:>8.0f}" for cp in args.contexts))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"compiled": compiled, "tokens_per_s": speed}, f, indent=2)


if __name__ == "__main__":
    main()
