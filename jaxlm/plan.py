"""`python -m jaxlm.plan`: will a layout fit, what does it cost, how long will the run take.

    python -m jaxlm.plan --config gpt-13b --mesh tp=4,dp=8 [--devices N] [--device-kind a100]
                         [--tokens T] [--mfu 0.4] [--no-compile] [--json] [key=value ...]

Two kinds of figures, side by side:
- arithmetic: parameters by component, FLOPs per token, bytes per device of parameters,
  gradients and optimizer state (from the real shardings of the real state, so exact), and an
  estimate of the activations under the chosen recomputation policy;
- XLA's own: the actual train step is lowered and compiled ahead of time for a mesh of that many
  fake CPU devices from abstract inputs (nothing is allocated), and its memory analysis gives the
  bytes per device the compiled program needs, its HLO the matmul FLOPs and collective bytes.
  The CPU compiler is not the GPU one: it fuses differently, and a bfloat16 model is compiled
  as float16, the same size, since the CPU widens bfloat16 stacks to float32. The XLA figure
  is a close, usually slightly pessimistic, guide.

Then the run: days to train `--tokens` (default 20 per parameter, compute-optimal) on these
devices at `--mfu` (GPT-NL's compute calculus), the energy that takes at the devices' board
power, and warnings from the layout rules of thumb (tensor parallelism across nodes, too few
tokens per device for FSDP, a large pipeline bubble, FSDP under a pipeline, not fitting).

The figures come from jaxlm/cost/plan.py; this command parses and renders. It imports JAX but
starts no backend before it has set up the fake CPU devices.
"""

import json
import logging
import math
import sys

import jax

from jaxlm import cli
from jaxlm import mesh as mesh_lib
from jaxlm.cost import DEFAULT_MFU, hardware, plan
from jaxlm.domain import Range, positive
from jaxlm.errors import UsageError

log = logging.getLogger("jaxlm")


def parse_args(argv):
    p = cli.Parser(prog="python -m jaxlm.plan", description=__doc__.split("\n")[0])
    cli.add_config_args(p, mesh_required=True)
    cli.add_target_args(p)
    p.add_argument(
        "--tokens",
        type=cli.in_domain(float, positive()),
        help="training tokens (default 20 per parameter)",
    )
    p.add_argument(
        "--mfu",
        type=cli.in_domain(float, Range(low=0, high=1, low_open=True)),
        default=DEFAULT_MFU,
        help=f"MFU assumed for the days to train (default {DEFAULT_MFU})",
    )
    p.add_argument(
        "--no-compile", action="store_true", help="only the arithmetic: skip compiling the step"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_intermixed_args(argv)


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
        + (
            f" | {plan['pipeline_schedule']} bubble {100 * plan['pipeline_bubble']:.1f} %"
            if plan["pipeline_bubble"]
            else ""
        ),
        f"FLOPs per token: model {plan['flops_per_token']:.4g} (6N + attention), hardware "
        f"{plan['hardware_flops_per_token']:.4g} (with recomputation)"
        + (
            f", XLA {plan['xla_flops_per_token']:.4g} (compiled matmuls; the attention's "
            f"diagonal blocks whole)"
            if "xla_flops_per_token" in plan
            else ""
        ),
        "bytes per device: "
        + " + ".join(f"{k} {_gb(v)}" for k, v in b.items() if k != "total")
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
    cfg = cli.load_config(args)
    device = hardware.device(args.device_kind)
    sizes = mesh_lib.read(cfg.mesh)
    n = args.devices or (math.prod(sizes.values()) if -1 not in sizes.values() else None)
    if n is None:
        raise UsageError(f"the mesh '{cfg.mesh}' has a -1 axis: give --devices")
    cli.use_fake_cpu_devices(n)
    return cfg, mesh_lib.make_mesh(cfg.mesh, jax.devices()[:n]), device


def main(argv=None) -> int:
    args = parse_args(argv)

    def body():
        cfg, mesh, device = load_target(args)
        figures = plan.make_plan(
            cfg,
            mesh,
            device=device,
            devices_per_node=args.devices_per_node,
            tokens=args.tokens,
            mfu=args.mfu,
            compile=not args.no_compile,
        )
        if args.json:
            print(json.dumps(figures))
        else:
            log.info("%s", render(figures))

    return cli.run_command(body)


if __name__ == "__main__":
    sys.exit(main())
