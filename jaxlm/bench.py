"""`python -m jaxlm.bench`: how fast one layout trains on this machine, as figures and JSON.

    python -m jaxlm.bench --config gpt-1.3b --mesh dp=1 [--steps 20] [--warmup 3]
                          [--out benchmarks/results/FILE.json] [--pytorch FILE.json] [key=value ...]

Compiles the train step ahead of time (compile time), runs `--warmup` untimed steps, then
`--steps` timed ones on synthetic batches (the data pipeline is benchmarked separately), and
reports tokens/s per device, TFLOP/s per device and MFU (model FLOPs, jaxlm/flops.py, against
the device's peak, jaxlm/hardware.py), the peak device memory, and the versions. `--out` appends
the row to a JSON list (the format of benchmarks/results/); `--pytorch` takes the JSON that
benchmarks/torch_reference.py printed for the same shapes and adds `ratio_vs_pytorch`.
"""

import argparse
import json
import logging
import pathlib
import platform
import shlex
import sys

from jaxlm import config as config_lib
from jaxlm.cli import run_command
from jaxlm.errors import UsageError

log = logging.getLogger("jaxlm")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m jaxlm.bench", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="preset in configs/ or a YAML file")
    p.add_argument("--mesh", default="dp=-1", help="mesh spec or preset (default dp=-1)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--out", type=pathlib.Path, help="append the row to this JSON list")
    p.add_argument(
        "--pytorch",
        type=pathlib.Path,
        help="JSON printed by benchmarks/torch_reference.py, for the ratio",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = p.parse_intermixed_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be at least 1 and --warmup at least 0")
    return args


def versions() -> dict:
    import flax
    import jax
    import jaxlib

    device = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "python": platform.python_version(),
        "platform": device.platform,
        "platform_version": getattr(device.client, "platform_version", ""),
        "device_kind": device.device_kind,
    }


def peak_memory_bytes() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def benchmark(cfg, mesh, *, steps: int, warmup: int, name: str, command: str) -> dict:
    import jax

    from jaxlm import flops, hardware, plan, tune
    from jaxlm.model import param_count
    from jaxlm.step import build_program

    program = build_program(cfg, mesh)
    compiled = plan.compile_step(cfg, program)
    seconds = tune.measured_seconds(cfg, program, compiled.executable, steps, warmup)
    n = mesh.devices.size
    tokens_per_s_per_device = cfg.train.global_batch_size * cfg.train.seq_len / seconds / n
    per_token = flops.model_flops_per_token_of(cfg, program.spec.shapes)
    peak, source = hardware.peak_tflops(cfg.train.peak_tflops, cfg.model.compute_dtype)
    tflops = per_token * tokens_per_s_per_device / 1e12
    return {
        "device_kind": jax.devices()[0].device_kind,
        "devices": n,
        "model": name,
        "mesh": config_lib.to_dict(cfg)["mesh"],
        "seq_len": cfg.train.seq_len,
        "global_batch_size": cfg.train.global_batch_size,
        "micro_batch": program.micro_batch,
        "remat": cfg.model.remat,
        "compute_dtype": cfg.model.compute_dtype,
        "attention": cfg.model.attention,
        "params": param_count(program.spec.shapes),
        "model_flops_per_token": per_token,
        "step_s": seconds,
        "tokens_per_s_per_device": tokens_per_s_per_device,
        "tflops_per_device": tflops,
        "peak_tflops": peak,
        "peak_source": source,
        "mfu": tflops / peak if peak else None,
        "peak_memory_bytes": peak_memory_bytes(),
        "xla_bytes_per_device": compiled.bytes_per_device,
        "compile_s": compiled.compile_s,
        "steps": steps,
        "ratio_vs_pytorch": None,
        "command": command,
        "versions": versions(),
    }


def add_pytorch_ratio(row: dict, path: pathlib.Path) -> None:
    try:
        reference = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read the PyTorch result {path}: {e}") from None
    for key in ("seq_len", "params"):
        if reference.get(key) != row[key]:
            raise UsageError(
                f"the PyTorch result {path} is for {key}={reference.get(key)}, "
                f"this run has {row[key]}: not the same model"
            )
    row["pytorch"] = reference
    row["ratio_vs_pytorch"] = row["tokens_per_s_per_device"] / reference["tokens_per_s_per_device"]


def append_row(path: pathlib.Path, row: dict) -> None:
    rows = json.loads(path.read_text()) if path.exists() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rows + [row], indent=1) + "\n")
    tmp.replace(path)  # never a half-written results file


def main(argv=None) -> int:
    args = parse_args(argv)

    def body():
        cfg = config_lib.load(
            args.config, [*args.overrides, f"mesh={args.mesh}", "data.source=synthetic"]
        )
        if args.pytorch and not args.pytorch.exists():
            raise UsageError(f"no PyTorch result at {args.pytorch}")
        from jaxlm import backend

        backend.apply(cfg.backend.xla_flags)
        from jaxlm import mesh as mesh_lib

        mesh = mesh_lib.make_mesh(cfg.mesh)
        command = "python -m jaxlm.bench " + shlex.join(argv if argv is not None else sys.argv[1:])
        row = benchmark(
            cfg,
            mesh,
            steps=args.steps,
            warmup=args.warmup,
            name=pathlib.Path(args.config or "default").stem,
            command=command,
        )
        if args.pytorch:
            add_pytorch_ratio(row, args.pytorch)
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
            append_row(args.out, row)

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
