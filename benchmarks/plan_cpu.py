"""How long planning takes on this machine: plan compiles of gpt-1.3b on 8 and llama3-8b on 64
fake CPU devices, and a tune of gpt-124m on 8. Prints figures, asserts nothing.

    python benchmarks/plan_cpu.py
"""

import json
import subprocess
import sys
import time


def timed(module: str, *args: str) -> tuple[float, dict]:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", module, *args, "--json"], capture_output=True, text=True, check=True
    )
    return time.perf_counter() - start, json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    for preset, spec, devices in [
        ("gpt-1.3b", "fsdp=8", 8),
        ("llama3-8b", "fsdp=8,tp=8", 64),
        ("llama3-8b", "fsdp=16,tp=4", 64),
    ]:
        seconds, p = timed(
            "jaxlm.plan",
            "--config",
            preset,
            "--mesh",
            spec,
            "--devices",
            str(devices),
            "model.remat=full",
            "train.micro_batch_size=1",
        )
        print(
            f"plan {preset} {spec} on {devices} devices: {seconds:.1f} s in all (compile "
            f"{p['compile_s']:.1f} s) | {p['params'] / 1e9:.2f} B params | "
            f"{p['xla_bytes_per_device'] / 1e9:.1f} GB per device (XLA), "
            f"{p['bytes_per_device']['total'] / 1e9:.1f} GB (arithmetic) | model "
            f"{p['flops_per_token']:.3g}, XLA {p['xla_flops_per_token']:.3g} FLOPs/token"
        )
    seconds, t = timed("jaxlm.tune", "--config", "gpt-124m", "--devices", "8")
    print(
        f"tune gpt-124m on 8 devices: {seconds:.0f} s, {len(t['layouts'])} layouts ranked, "
        f"{len(t['rejected'])} rejected by XLA's memory; best {t['best']}"
    )


if __name__ == "__main__":
    main()
