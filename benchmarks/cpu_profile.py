"""Where the CPU train step's time goes, by op category, from XLA's own per-op timings.

    python benchmarks/cpu_profile.py [--config PRESET] [--steps 3] [--json OUT.json]
                                     [key=value ...]

XLA:CPU brackets every HLO op with a profiler event when `--xla_cpu_enable_xprof_traceme` is
set (here, before JAX starts). The script compiles the train step of the shape that
benchmarks/peer_cpu.py compares with PyTorch (one device, float32, no recomputation), or of
`--config PRESET` with the overrides (one device, synthetic data), traces
`--steps` steps with `jax.profiler`, and maps each event to its HLO instruction in the compiled
module, whose metadata carries the model's named scopes (norm, rotary, attention, mlp, embed,
head, loss, optimizer). It prints milliseconds per step in two tables:

  by kind:   GEMM (the matmul library's fusions and dots), elementwise fusions, copies and
             transposes, the layer scan's plumbing (dynamic slices and updates of the stacked
             weights, activations and gradients; the zero-filled stacking buffers), other
  by scope:  GEMMs and the rest of each scope; "outside" is what no scope names

The op times of the worker threads add up to about the step's wall time (XLA:CPU runs few
ops at once on two cores); the table says both. Not a test: nothing asserts.
"""

import argparse
import collections
import json
import os
import re
import statistics
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
).strip()

import jax  # noqa: E402 (the flag above must be set first)
import jax.numpy as jnp  # noqa: E402
from shapes import PEER_SHAPE  # noqa: E402

from jaxlm import config as config_lib  # noqa: E402
from jaxlm import mesh as mesh_lib  # noqa: E402
from jaxlm.data import loader  # noqa: E402
from jaxlm.step import abstract_step_inputs, build_program  # noqa: E402

SCOPES = ("optimizer", "loss", "head", "embed", "attention", "rotary", "norm", "mlp")
GEMM = re.compile(r"^(ynn_fusion|xnn_fusion|onednn|dot|custom-call|convolution)")
SCAN = re.compile(r"dynamic-slice|dynamic-update-slice|wrapped_broadcast|^while|^broadcast")
COPY = re.compile(r"copy|transpose")
# events of the runtime itself, not of an HLO op
RUNTIME = ("Threadpool", "ThunkExecutor", "end: ", "SlinkyThreadPool", "$")


def op_times(trace_dir: str) -> collections.Counter:
    """Nanoseconds per HLO instruction name, summed over the worker threads' events."""
    files = [
        os.path.join(root, f)
        for root, _, names in os.walk(trace_dir)
        for f in names
        if f.endswith(".xplane.pb")
    ]
    data = jax.profiler.ProfileData.from_file(max(files, key=os.path.getmtime))
    times = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for event in line.events:
                if not event.name.startswith(RUNTIME):
                    times[event.name] += event.duration_ns
    return times


def instruction_scopes(hlo_text: str) -> dict[str, str]:
    """Instruction name -> the innermost model scope in its op_name (or 'outside')."""
    scopes = {}
    instruction = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?op_name=\"([^\"]*)\"", re.M)
    for match in instruction.finditer(hlo_text):
        name, op_name = match.groups()
        found = [(op_name.rfind(s), s) for s in SCOPES if re.search(rf"\b{s}\b", op_name)]
        scopes[name] = max(found)[1] if found else "outside"
    return scopes


def kind(name: str) -> str:
    if GEMM.match(name):
        return "GEMM"
    if SCAN.search(name):
        return "layer-scan plumbing"
    if COPY.search(name):
        return "copies and transposes"
    if "fusion" in name or name.split(".")[0] in ("add", "multiply", "select", "exponential"):
        return "elementwise fusions"
    return "other"


def profile(preset: str | None, overrides: list[str], steps: int) -> dict:
    shape = ["data.source=synthetic"] if preset else list(PEER_SHAPE)
    cfg = config_lib.load(preset, [*shape, *overrides])
    mesh = mesh_lib.make_mesh("dp=1", jax.devices()[:1])
    program = build_program(cfg, mesh)
    hlo = program.train_step.lower(*abstract_step_inputs(cfg, program)).compile().as_text()
    state = program.init(jax.random.key(0))
    batches = loader.make_batches(cfg, program.batch_sharding)
    limit = jnp.float32(jnp.inf)
    for _ in range(3):  # compile and warm up
        state, metrics = program.train_step(state, next(batches), limit)
    jax.block_until_ready(metrics)
    walls = []
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(steps):
            start = time.perf_counter()
            state, metrics = program.train_step(state, next(batches), limit)
            jax.block_until_ready(metrics)
            walls.append(time.perf_counter() - start)
        jax.profiler.stop_trace()
        times = op_times(trace_dir)
    scopes = instruction_scopes(hlo)
    by_kind, by_scope = collections.Counter(), collections.Counter()
    for name, ns in times.items():
        k = kind(name)
        by_kind[k] += ns / 1e6 / steps
        scope = scopes.get(name, "outside")
        by_scope[f"{scope}: GEMM" if k == "GEMM" else f"{scope}: rest"] += ns / 1e6 / steps
    return {
        "wall_ms_per_step": 1e3 * statistics.median(walls),
        "op_ms_per_step": sum(by_kind.values()),
        "by_kind_ms": dict(by_kind.most_common()),
        "by_scope_ms": dict(by_scope.most_common()),
        "top_ops_ms": {n: ns / 1e6 / steps for n, ns in times.most_common(10)},
    }


def table(title: str, rows: dict[str, float], total: float) -> str:
    lines = [f"{title:<28} {'ms/step':>8} {'share':>6}"]
    lines += [f"{name:<28} {ms:8.1f} {100 * ms / total:5.1f}%" for name, ms in rows.items()]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="a preset instead of the peer shape")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument("overrides", nargs="*", help="config overrides on top of the shape")
    args = parser.parse_args()
    result = profile(args.config, args.overrides, args.steps)
    total = result["op_ms_per_step"]
    print(
        f"train step: {result['wall_ms_per_step']:.0f} ms wall, {total:.0f} ms of ops "
        f"(median of {args.steps} traced steps)"
    )
    print(table("by kind", result["by_kind_ms"], total))
    print(table("by scope", result["by_scope_ms"], total))
    print(table("slowest ops", result["top_ops_ms"], total))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
