"""`python -m jaxlm.bench`: how fast one layout trains on this machine, as figures and JSON.

    python -m jaxlm.bench --config gpt-1.3b --mesh dp=1 [--steps 20] [--warmup 3]
                          [--out benchmarks/results/FILE.json] [--pytorch FILE.json] [key=value ...]

Compiles the train step ahead of time (compile time), runs `--warmup` untimed steps, then
`--steps` timed ones on synthetic batches (the data pipeline is benchmarked separately), and
reports tokens/s per device, TFLOP/s per device and MFU (model FLOPs, jaxlm/cost/flops.py,
against the device's peak, jaxlm/cost/hardware.py), the peak device memory, and the versions
(jaxlm/cost/benchmark.py). `--out` appends the row to a JSON list (the format of
benchmarks/results/); `--pytorch` takes the JSON that benchmarks/torch_reference.py printed for
the same shapes and adds `ratio_vs_pytorch`.
"""

import json
import logging
import pathlib
import shlex
import sys

from jaxlm import backend, cli
from jaxlm.domain import at_least

log = logging.getLogger("jaxlm")


def parse_args(argv):
    p = cli.Parser(prog="python -m jaxlm.bench", description=__doc__.split("\n")[0])
    cli.add_config_args(p)
    p.add_argument("--steps", type=cli.COUNT, default=20, help="timed steps (default 20)")
    p.add_argument(
        "--warmup",
        type=cli.in_domain(int, at_least(0)),
        default=3,
        help="untimed steps first (default 3)",
    )
    p.add_argument("--out", type=pathlib.Path, help="append the row to this JSON list")
    p.add_argument(
        "--pytorch",
        type=pathlib.Path,
        help="JSON printed by benchmarks/torch_reference.py, for the ratio",
    )
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def body():
        cfg = cli.load_config(args, ["data.source=synthetic"])
        cli.check_writable(args.out, "--out")
        backend.apply(cfg.backend.xla_flags)
        from jaxlm import mesh as mesh_lib
        from jaxlm.cost import benchmark

        if args.out:
            benchmark.read_rows(args.out)  # a file that is not a results list: refused now
        pytorch = benchmark.read_pytorch_result(args.pytorch) if args.pytorch else None

        mesh = mesh_lib.make_mesh(cfg.mesh)
        command = "python -m jaxlm.bench " + shlex.join(argv if argv is not None else sys.argv[1:])
        row = benchmark.benchmark(
            cfg,
            mesh,
            steps=args.steps,
            warmup=args.warmup,
            name=pathlib.Path(args.config or "default").stem,
            command=command,
            pytorch=pytorch,
        )
        mfu = f"{100 * row['mfu']:.1f} %" if row["mfu"] is not None else "n/a"
        ratio = f" | {row['ratio_vs_pytorch']:.2f} x PyTorch" if row["ratio_vs_pytorch"] else ""
        log.info(
            "%s on %d x %s | %s | %s tokens/s/device | %.1f TFLOP/s/device | MFU %s | "
            "compiled in %.1f s%s",
            row["model"],
            row["devices"],
            row["device_kind"],
            row["mesh"],
            f"{row['tokens_per_s_per_device']:,.0f}",
            row["tflops_per_device"],
            mfu,
            row["compile_s"],
            ratio,
        )
        print(json.dumps(row))
        if args.out:
            benchmark.append_row(args.out, row)

    return cli.run_command(body)


if __name__ == "__main__":
    sys.exit(main())
