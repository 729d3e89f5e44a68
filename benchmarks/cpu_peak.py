"""How stable the CPU peak that MFU divides by is: the old measurement against the new one.

    python benchmarks/cpu_peak.py [--rounds 5] [--dtype float32]

Measures, `--rounds` times alternating, the peak as it used to be read (one 1024³ matmul, best
of three calls) and as jaxlm.cost.hardware.measure_matmul_tflops reads it now (the best window
of back-to-back 1024³ and 2048³ matmuls), and prints each one's values, median and spread
((max - min) / median). Not a test: timings on a shared machine are noisy.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from jaxlm.cost import hardware


def one_short_matmul(dtype: str) -> float:
    a = jnp.ones((1024, 1024), dtype)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * 1024**3 / best / 1e12


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    values = {"one short matmul": [], "best sustained window": []}
    for _ in range(args.rounds):
        values["one short matmul"].append(one_short_matmul(args.dtype))
        values["best sustained window"].append(hardware.measure_matmul_tflops(args.dtype))
    for name, v in values.items():
        median = statistics.median(v)
        print(
            f"{name:<22} {', '.join(f'{1e3 * x:.0f}' for x in v)} GFLOP/s; median "
            f"{1e3 * median:.0f}, spread {100 * (max(v) - min(v)) / median:.0f} %"
        )


if __name__ == "__main__":
    main()
