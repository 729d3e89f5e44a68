"""`python -m jaxlm.train`: train a language model on a named device mesh.

    python -m jaxlm.train [--config PRESET_OR_YAML] [--mesh SPEC_OR_PRESET] [--out DIR]
                          [--cpu-devices N] [--print-config] [key=value ...]

Parses, loads the config (no JAX yet: a config mistake costs nothing), applies the backend's
XLA flags and the device count, joins the other processes of a multi-host launch, builds the
mesh, and hands over to `jaxlm.training.run`, whose docstring lists the phases of a run.
Mistakes in the input print one sentence and exit with code 2 before any compute.
"""

import pathlib
import sys

from jaxlm import backend, cli
from jaxlm import config as config_lib


def parse_args(argv):
    p = cli.Parser(prog="python -m jaxlm.train", description=__doc__.split("\n")[0])
    cli.add_config_args(p)
    p.add_argument(
        "--out",
        type=pathlib.Path,
        help="run directory for metrics.jsonl, TensorBoard events and config.yaml "
        "(default: runs/PRESET)",
    )
    cli.add_cpu_devices(p)
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config as YAML and exit, without starting JAX",
    )
    return p.parse_intermixed_args(argv)  # overrides may come before or after the options


def main(argv=None) -> int:
    args = parse_args(argv)

    def body():
        cfg = cli.load_config(args)
        if args.print_config:
            print(config_lib.dump(cfg), end="")
            return
        cli.use_cpu_devices(args.cpu_devices)
        backend.apply(cfg.backend.xla_flags)
        # JAX is imported only now, once the config is known to be sound.
        from jaxlm import distributed, training
        from jaxlm import mesh as mesh_lib

        distributed.initialize(cfg.distributed)
        mesh = mesh_lib.make_mesh(cfg.mesh)
        out_dir = args.out or pathlib.Path("runs") / pathlib.Path(args.config or "default").stem
        training.run(cfg, mesh, out_dir)

    return cli.run_command(body)


if __name__ == "__main__":
    sys.exit(main())
