"""jaxlm against compiled PyTorch on this machine's CPU, the same model and shapes, in one run.

    python benchmarks/peer_cpu.py [--steps 8] [--warmup 3] [--rounds 2] [--only NAME]
                                  [--json OUT.json]

Two workloads, each trained on one CPU device by both systems, one after another, `--rounds`
times alternating (the best round of each counts, as the machine's other tenants only ever slow
a round down):

  shape     a Llama-style model: vocab 4,096, d_model 256, 4 layers, 8 heads / 4 kv heads,
            SwiGLU 1,024, seq 256, batch 8, float32, no recomputation
  gpt-124m  the preset, one 1,024-token sequence per step, bfloat16 (PyTorch: autocast)

jaxlm runs `python -m jaxlm.bench` (the real trainer's step; XLA's defaults), PyTorch
benchmarks/torch_reference.py (torch.compile, SDPA, fused AdamW). Prints seconds per step and
tokens/s for each and jaxlm's speed relative to PyTorch's (> 1: jaxlm is faster). Not a test.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys

from shapes import PEER_SHAPE

HERE = pathlib.Path(__file__).resolve().parent
WORKLOADS = {
    "shape": list(PEER_SHAPE),
    "gpt-124m": [
        "--config",
        "gpt-124m",
        "train.global_batch_size=1",
        "train.seq_len=1024",
        "model.compute_dtype=bfloat16",
        "data.source=synthetic",
    ],
}


def last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def run(command: list[str]) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return last_json(done.stdout)


def jaxlm(args, workload: list[str]) -> float:
    command = [sys.executable, "-m", "jaxlm.bench", "--mesh", "dp=1"]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup), *workload]
    return run(command)["step_s"]


def pytorch(args, workload: list[str]) -> float:
    command = [sys.executable, str(HERE / "torch_reference.py")]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup), *workload]
    return run(command)["step_s"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", choices=sorted(WORKLOADS))
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    results = {}
    for name, workload in WORKLOADS.items():
        if args.only and name != args.only:
            continue
        tokens = 8 * 256 if name == "shape" else 1024
        times = {"pytorch": [], "jaxlm": []}
        for _ in range(args.rounds):
            times["pytorch"].append(pytorch(args, workload))
            times["jaxlm"].append(jaxlm(args, workload))
        best = {system: min(t) for system, t in times.items()}
        results[name] = {"step_s": times, "best_s": best, "ratio": best["pytorch"] / best["jaxlm"]}
        for system, seconds in best.items():
            print(f"{name:<9} {system:<8} {seconds:7.3f} s/step {tokens / seconds:9,.0f} tokens/s")
        print(f"{name:<9} jaxlm / PyTorch tokens/s: {results[name]['ratio']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
