"""`python -m jaxlm.tune`: search the layouts of a model on N devices and rank them.

    python -m jaxlm.tune --config gpt-124m --devices 8 [--device-memory 80] [--device-kind h100]
                         [--max-trials 12] [--steps 5] [--measure] [--json] [key=value ...]

The search (jaxlm/cost/search.py, whose docstring gives its four stages) enumerates every mesh
of the devices that the model divides, keeps the variants (recomputation, micro batch, ZeRO-1)
whose estimated memory fits, compiles the most promising ones, and ranks those that fit by
XLA's figures: by timed steps on a GPU or TPU (or with `--measure`), else by the compiled
program's matmul FLOPs at the device's peak plus its collective bytes over the links.
"""

import json
import logging
import sys

import jax

from jaxlm import cli, cost
from jaxlm.cost import hardware, search
from jaxlm.domain import positive
from jaxlm.errors import UsageError

log = logging.getLogger("jaxlm")


def parse_args(argv):
    p = cli.Parser(prog="python -m jaxlm.tune", description=__doc__.split("\n")[0])
    cli.add_config_args(p, mesh=False)
    cli.add_target_args(p)
    p.add_argument(
        "--device-memory",
        type=cli.in_domain(float, positive()),
        help="GB per device (default: the device kind's)",
    )
    p.add_argument("--max-trials", type=cli.COUNT, default=12, help="layouts compiled (default 12)")
    p.add_argument(
        "--steps", type=cli.COUNT, default=5, help="timed steps per layout when measuring"
    )
    p.add_argument(
        "--measure", action="store_true", help="time steps on this machine's devices even on CPU"
    )
    p.add_argument("--json", action="store_true", help="print the ranked layouts as JSON")
    args = p.parse_intermixed_args(argv)
    if not args.devices:
        p.error("--devices is required")
    return args


def render(result: dict) -> str:
    lines = [
        f"{len(result['layouts'])} layouts on {result['devices']} x {result['device']} "
        f"({result['memory_gb']:g} GB), ranked by {result['ranked_by']}:",
        f"{'#':>3} {'mesh':<26} {'micro':>5} {'accum':>5} {'remat':<9} {'zero1':<5} "
        f"{'GB (XLA)':>8} {'s/step':>9} {'tok/s/dev':>10} {'MFU':>6}",
    ]
    for i, r in enumerate(result["layouts"], 1):
        lines.append(
            f"{i:>3} {r['mesh']:<26} {r['micro_batch']:>5} {r['accumulation']:>5} "
            f"{r['remat']:<9} {str(r['zero1']):<5} {r['xla_bytes'] / 1e9:>8.2f} "
            f"{r['step_s']:>9.4g} {r['tokens_per_s_per_device']:>10,.0f} "
            f"{r['mfu']:>6.3f}"
        )
    if result["best"]:
        lines.append(f"best: {result['best']}")
    lines.append(f"searched in {result['seconds']:.0f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)

    def body():
        cfg = cli.load_config(args)
        device = hardware.device(args.device_kind)
        try:  # fake CPU devices for compiling, whatever accelerators there are
            jax.config.update("jax_num_cpu_devices", args.devices)
        except RuntimeError:
            pass  # backends already up (a notebook): use_fake_cpu_devices checks the count
        accelerated = jax.default_backend() != "cpu"
        measure = args.measure or accelerated
        if accelerated:
            device_list = jax.devices()
            if len(device_list) != args.devices:
                raise UsageError(
                    f"--devices {args.devices} but this machine has "
                    f"{len(device_list)} {jax.default_backend()} devices"
                )
            if args.device_kind == cost.DEFAULT_DEVICE:  # the devices at hand, not h100
                device = hardware.device(device_list[0].device_kind)
        else:
            cli.use_fake_cpu_devices(args.devices)
            device_list = jax.devices()[: args.devices]
        result = search.search(
            cfg,
            device_list,
            device=device,
            per_node=args.devices_per_node or device.per_node,
            memory_gb=args.device_memory or device.memory_gb,
            max_trials=args.max_trials,
            measure=measure,
            steps=args.steps,
        )
        print(json.dumps(result)) if args.json else log.info("%s", render(result))

    return cli.run_command(body)


if __name__ == "__main__":
    sys.exit(main())
