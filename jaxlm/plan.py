"""`python -m jaxlm.plan`: will a layout fit, what does it cost, how long will the run take.

    python -m jaxlm.plan --config gpt-13b --mesh tp=4,dp=8 [--devices N] [--device-kind a100]
                         [--tokens T] [--mfu 0.4] [--no-compile] [--json] [key=value ...]

Two kinds of figures, side by side:
- arithmetic: parameters by component, FLOPs per token (jaxlm/flops.py), bytes per device of
  parameters, gradients and optimizer state (from the real shardings of the real state, so
  exact), and an estimate of the activations under the chosen recomputation policy;
- XLA's own: the actual train step is lowered and compiled ahead of time for a mesh of that many
  fake CPU devices from abstract inputs (nothing is allocated), and its memory analysis gives the
  bytes per device the compiled program needs, its HLO the matmul FLOPs and collective bytes.
  The CPU compiler is not the GPU one (it may keep some bfloat16 work in float32, and fuses
  differently), so the XLA figure is a close, usually slightly pessimistic, guide.

Then the run: days to train `--tokens` (default 20 per parameter, compute-optimal) on these
devices at `--mfu` (GPT-NL's compute calculus), the energy that takes at the devices' board
power, and warnings from the layout rules of thumb (tensor parallelism across nodes, too few
tokens per device for FSDP, a large pipeline bubble, FSDP under a pipeline, not fitting).
"""

import argparse
import dataclasses
import json
import logging
import math
import sys
import time

from jaxlm import config as config_lib
from jaxlm.cli import run_command
from jaxlm.errors import UsageError

log = logging.getLogger("jaxlm")

DEFAULT_DEVICE = "h100"
DEFAULT_MFU = 0.4  # GPT-NL's measured MFU on H100 with PyTorch FSDP
FSDP_MIN_TOKENS = 2500  # per device per step: below this FSDP's collectives show (scaling-book)
LARGE_BUBBLE = 0.2


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m jaxlm.plan", description=__doc__.split("\n")[0])
    add_target_args(p)
    p.add_argument("--mesh", required=True, help="mesh spec (dp=8,tp=4) or preset in meshes/")
    p.add_argument("--tokens", type=float, help="training tokens (default 20 per parameter)")
    p.add_argument(
        "--mfu",
        type=float,
        default=DEFAULT_MFU,
        help=f"MFU assumed for the days to train (default {DEFAULT_MFU})",
    )
    p.add_argument(
        "--no-compile", action="store_true", help="only the arithmetic: skip compiling the step"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_intermixed_args(argv)


def add_target_args(p: argparse.ArgumentParser) -> None:
    """The options plan and tune share: the model and the machine it is meant for."""
    p.add_argument("--config", help="preset in configs/ or a YAML file")
    p.add_argument(
        "--devices",
        type=int,
        help="devices in all (default: the mesh's size); compiled on this many fake CPU devices",
    )
    p.add_argument(
        "--device-kind",
        default=DEFAULT_DEVICE,
        help=f"the target device: a100, h100, h200, gh200, mi250x, mi300x, a64fx, "
        f"tpu v4, tpu v5p (default {DEFAULT_DEVICE})",
    )
    p.add_argument(
        "--devices-per-node",
        type=int,
        help="devices in one node (default: the device kind's usual node)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def target_device(kind: str):
    from jaxlm import hardware

    device = hardware.lookup(kind)
    if device is None:
        raise UsageError(
            f"unknown --device-kind '{kind}': use one of {', '.join(hardware.DEVICES)}"
        )
    return device


def use_fake_cpu_devices(n: int) -> None:
    """Compile for `n` fake CPU devices; must run before JAX starts its backends."""
    import jax

    if n < 1:
        raise UsageError(f"--devices must be at least 1, not {n}")
    try:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # backends already up (a notebook, the tests): they must match
        if jax.device_count() != n:
            raise UsageError(
                f"JAX already runs with {jax.device_count()} devices, not {n}"
            ) from None


# --- bytes per device -------------------------------------------------------------------------


def _shard_bytes(shapes, shardings) -> int:
    import jax

    leaves = jax.tree.leaves(
        jax.tree.map(
            lambda s, sh: math.prod(sh.shard_shape(s.shape)) * s.dtype.itemsize, shapes, shardings
        )
    )
    return int(sum(leaves))


def state_bytes(cfg, program) -> dict[str, int]:
    """Bytes per device of parameters, gradients and optimizer state, from the real shardings."""
    import jax

    state = jax.eval_shape(program.init, jax.random.key(0))
    params = _shard_bytes(state.params, program.state_shardings.params)
    return {
        "params": params,
        # the accumulated gradients live in the parameters' layout and dtype (float32)
        "grads": params,
        "optimizer": _shard_bytes(state.opt_state, program.state_shardings.opt_state),
    }


def activation_bytes(cfg, program, mesh) -> int:
    """See `estimate_activation_bytes`, for a built program on its mesh."""
    return estimate_activation_bytes(
        cfg,
        program.micro_batch,
        program.stages.stages,
        mesh.shape["tensor"],
        program.stages.microbatches,
    )


def estimate_activation_bytes(
    cfg, micro_batch: int, stages: int, tp: int, microbatches: int = 1
) -> int:
    """An estimate of the activations one device keeps for the backward pass, plus the largest
    transient (one layer recomputed, the logits and their gradient).

    Per token and layer, in the compute dtype: `save_dots` keeps the layer input and every
    weight matmul's output (q, k, v, attention out, MLP in and out); `none` also keeps the norms'
    float32 inputs, the rotated q and k, attention scores and probabilities (T per head with the
    XLA implementation) and the MLP's activation; `full` keeps only the layer input. Tensor
    parallelism divides the head- and MLP-sized parts. A device holds the tokens of its
    micro batch (all of a pipeline's microbatches, GPipe) for its L / pp layers; a recomputed
    layer works on one pipeline microbatch at a time, and the head on the micro batch split
    over the pipeline axis.
    """
    m, t = cfg.model, cfg.train
    c = 4 if m.compute_dtype == "float32" else 2
    D, T, F = m.d_model, t.seq_len, m.d_ff
    q, kv = m.n_heads * m.dim_per_head / tp, 2 * m.kv_heads * m.dim_per_head / tp
    mlp_in = (2 if m.mlp == "swiglu" else 1) * F / tp
    save_dots = c * (D + q + kv + D + mlp_in + D)
    everything = (
        save_dots + 2 * 4 * D + c * (q + kv / 2) + (c + 4) * m.n_heads / tp * T + c * (q + mlp_in)
    )
    per_layer = {"none": everything, "save_dots": save_dots, "full": c * D}[m.remat]
    tokens = micro_batch * T
    layers = m.n_layers // stages
    transient = tokens / microbatches * everything if m.remat == "full" else 0
    # logits in the compute dtype, their float32 softmax and its gradient
    logits = tokens / stages * m.vocab_size / tp * (c + 4 + 4)
    return int(tokens * layers * per_layer + transient + logits)


# --- the compiled step ------------------------------------------------------------------------


@dataclasses.dataclass
class CompiledStep:
    bytes_per_device: int  # arguments + outputs - aliased (donated) + temporaries
    memory: dict[str, int]
    flops_per_device: float  # matmul FLOPs of one step, loops counted (jaxlm/hlo.py)
    collective_bytes: dict[str, float]  # per device per step
    compile_s: float
    executable: object = dataclasses.field(repr=False, default=None)


def compile_step(cfg, program) -> CompiledStep:
    """Lower and compile the train step for abstract inputs: XLA's memory and HLO figures."""
    from jaxlm import hlo
    from jaxlm.step import abstract_step_inputs

    start = time.perf_counter()
    compiled = program.train_step.lower(*abstract_step_inputs(cfg, program)).compile()
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    memory = {
        k: int(getattr(stats, f"{k}_size_in_bytes"))
        for k in ("argument", "output", "alias", "temp", "generated_code")
    }
    total = (
        memory["argument"]
        + memory["output"]
        - memory["alias"]
        + memory["temp"]
        + memory["generated_code"]
    )
    counts = hlo.analyse(compiled.as_text())
    return CompiledStep(total, memory, counts.flops, counts.collective_bytes, seconds, compiled)


# --- the plan ---------------------------------------------------------------------------------


def layout_warnings(cfg, mesh, program, device, per_node: int, fits_bytes: int | None) -> list:
    """The rules of thumb in PHYSICS.md, applied to this layout."""
    t, sizes = cfg.train, dict(mesh.shape)
    warnings = []
    tp = sizes["tensor"]
    if tp > per_node:
        warnings.append(
            f"tensor parallelism tp={tp} spans nodes of {per_node} devices: its "
            f"per-layer collectives would cross the network; keep tp <= {per_node}"
        )
    elif tp > 8:
        warnings.append(f"tp={tp} > 8: tensor parallelism beyond 8 ways rarely pays")
    shards = sizes["data"] * sizes["fsdp"]
    tokens = t.global_batch_size * t.seq_len / shards
    if sizes["fsdp"] > 1 and tokens < FSDP_MIN_TOKENS:
        warnings.append(
            f"{tokens:,.0f} tokens per data-parallel shard per step, below the "
            f"~{FSDP_MIN_TOKENS:,} at which FSDP's weight gathers hide behind "
            f"compute: raise the global batch or shard less"
        )
    if program.stages.stages > 1 and program.stages.bubble > LARGE_BUBBLE:
        warnings.append(
            f"pipeline bubble {100 * program.stages.bubble:.0f} %: raise "
            f"train.microbatches or train.pipeline_repeats"
        )
    if program.stages.stages > 1 and sizes["fsdp"] > 1:
        warnings.append(
            "FSDP under a pipeline gathers each stage's weights every microbatch: "
            "prefer dp with train.zero1=true"
        )
    if fits_bytes is not None and fits_bytes > device.memory_gb * 1e9:
        warnings.append(
            f"needs {fits_bytes / 1e9:.1f} GB per device, more than the "
            f"{device.memory_gb:g} GB of a {device.name}: shard more (fsdp, tp, pp, "
            f"zero1) or recompute activations (model.remat)"
        )
    return warnings


def make_plan(
    cfg,
    mesh,
    *,
    device,
    devices_per_node: int | None = None,
    tokens: float | None = None,
    mfu: float = DEFAULT_MFU,
    compile: bool = True,
) -> dict:
    from jaxlm import flops
    from jaxlm import mesh as mesh_lib
    from jaxlm.step import build_program

    program = build_program(cfg, mesh)
    counts = flops.params_by_component(program.spec.shapes)
    seq = cfg.train.seq_len
    model_flops = flops.model_flops_per_token(cfg.model, seq, counts)
    n = mesh.devices.size
    per_node = devices_per_node or device.per_node
    memory = state_bytes(cfg, program)
    memory["activations"] = activation_bytes(cfg, program, mesh)
    memory["total"] = sum(memory.values())
    tokens = tokens or 20 * counts["total"]
    days = flops.days_to_train(model_flops, tokens, n, device.peak_tflops, mfu)
    plan = {
        "model": config_lib.to_dict(cfg)["model"],
        "mesh": mesh_lib.describe(dict(mesh.shape)),
        "devices": n,
        "device": device.name,
        "params": counts["total"],
        "params_by_component": counts,
        "flops_per_token": model_flops,
        "hardware_flops_per_token": flops.hardware_flops_per_token(cfg.model, seq, counts),
        "bytes_per_device": memory,
        "tokens": tokens,
        "mfu": mfu,
        "days": days,
        "energy_kwh_at_tdp": (
            days * 24 * n * device.tdp_watts / 1000 if device.tdp_watts else None
        ),
        "micro_batch": program.micro_batch,
        "accumulation": program.accumulation,
        "pipeline_bubble": program.stages.bubble if program.stages.stages > 1 else 0.0,
    }
    fits_bytes = memory["total"]
    if compile:
        step = compile_step(cfg, program)
        tokens_per_step = cfg.train.global_batch_size * seq
        plan.update(
            xla_bytes_per_device=step.bytes_per_device,
            xla_memory=step.memory,
            xla_flops_per_token=step.flops_per_device * n / tokens_per_step,
            xla_collective_bytes_per_device=step.collective_bytes,
            compile_s=step.compile_s,
        )
        fits_bytes = step.bytes_per_device
    plan["fits"] = fits_bytes <= device.memory_gb * 1e9
    plan["warnings"] = layout_warnings(cfg, mesh, program, device, per_node, fits_bytes)
    return plan


def _gb(x: float) -> str:
    return f"{x / 1e9:,.2f} GB" if x >= 1e8 else f"{x / 1e6:,.2f} MB"


def render(plan: dict) -> str:
    c = plan["params_by_component"]
    b = plan["bytes_per_device"]
    lines = [
        f"{plan['params']:,} parameters: "
        + ", ".join(f"{k} {v:,}" for k, v in c.items() if k != "total" and v),
        f"mesh {plan['mesh']} on {plan['devices']} x {plan['device']} | micro batch "
        f"{plan['micro_batch']} x accumulation {plan['accumulation']}"
        + (f" | bubble {100 * plan['pipeline_bubble']:.1f} %" if plan["pipeline_bubble"] else ""),
        f"FLOPs per token: model {plan['flops_per_token']:.4g} (6N + attention), hardware "
        f"{plan['hardware_flops_per_token']:.4g} (with recomputation)"
        + (
            f", XLA {plan['xla_flops_per_token']:.4g} (compiled matmuls; attention not "
            f"causally halved)"
            if "xla_flops_per_token" in plan
            else ""
        ),
        "bytes per device: "
        + " + ".join(f"{k} {_gb(b[k])}" for k in ("params", "grads", "optimizer", "activations"))
        + f" = {_gb(b['total'])} (activations estimated)",
    ]
    if "xla_bytes_per_device" in plan:
        m = plan["xla_memory"]
        lines.append(
            f"XLA, compiled in {plan['compile_s']:.1f} s: {_gb(plan['xla_bytes_per_device'])}"
            f" per device (arguments {_gb(m['argument'])}, temporaries "
            f"{_gb(m['temp'])})"
        )
    lines.append(f"{'fits' if plan['fits'] else 'does NOT fit'} in a {plan['device']}")
    energy = (
        f", {plan['energy_kwh_at_tdp']:,.0f} kWh at board power"
        if plan["energy_kwh_at_tdp"]
        else ""
    )
    lines.append(
        f"{plan['tokens']:.3g} tokens at MFU {plan['mfu']:.2f}: "
        f"{plan['days']:,.3g} days on {plan['devices']} devices{energy}"
    )
    lines += [f"warning: {w}" for w in plan["warnings"]]
    return "\n".join(lines)


def load_target(args):
    """(config, mesh, device) for plan's arguments; fake CPU devices set up for the compile."""
    overrides = list(args.overrides) + [f"mesh={args.mesh}"]
    cfg = config_lib.load(args.config, overrides)
    device = target_device(args.device_kind)
    from jaxlm import mesh as mesh_lib

    sizes = mesh_lib.read(cfg.mesh)
    n = args.devices or (math.prod(sizes.values()) if -1 not in sizes.values() else None)
    if n is None:
        raise UsageError(f"the mesh '{cfg.mesh}' has a -1 axis: give --devices")
    use_fake_cpu_devices(n)
    import jax

    return cfg, mesh_lib.make_mesh(cfg.mesh, jax.devices()[:n]), device


def main(argv=None) -> int:
    args = parse_args(argv)

    def body():
        cfg, mesh, device = load_target(args)
        plan = make_plan(
            cfg,
            mesh,
            device=device,
            devices_per_node=args.devices_per_node,
            tokens=args.tokens,
            mfu=args.mfu,
            compile=not args.no_compile,
        )
        if args.json:
            print(json.dumps(plan))
        else:
            log.info("%s", render(plan))

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
