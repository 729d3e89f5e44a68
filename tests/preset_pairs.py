"""The mesh presets each config preset pairs with, and their plans in one process.

A config preset names its layouts in comment lines, for people and for tests alike:

    # pairs with: frontier-175b on 1024 devices with train.zero1=true

`python tests/preset_pairs.py [--compile]` plans every pair on as many fake CPU devices as the
largest needs (starting JAX once for all of them) and prints one JSON line per pair: its plan's
figures, or the sentence it was refused with.
"""

import dataclasses
import json
import re
import sys

from jaxlm import config as config_lib

PAIR = re.compile(
    r"^# pairs with: (?P<mesh>\S+) on (?P<devices>\d+) devices?(?: with (?P<extra>.+))?$"
)


@dataclasses.dataclass(frozen=True)
class Pair:
    config: str
    mesh: str
    devices: int
    overrides: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.config}+{self.mesh}@{self.devices}"


def config_presets() -> list[str]:
    return sorted(p.stem for p in config_lib.preset_dir("configs").glob("*.yaml"))


def mesh_presets() -> list[str]:
    return sorted(p.stem for p in config_lib.preset_dir("meshes").glob("*.yaml"))


def pairs_of(config: str) -> list[Pair]:
    text = (config_lib.preset_dir("configs") / f"{config}.yaml").read_text()
    found = []
    for line in text.splitlines():
        if line.startswith("# pairs with:"):
            match = PAIR.match(line)
            assert match, f"configs/{config}.yaml: cannot read '{line}'"
            extra = tuple((match["extra"] or "").split())
            found.append(Pair(config, match["mesh"], int(match["devices"]), extra))
    return found


def all_pairs() -> list[Pair]:
    return [pair for config in config_presets() for pair in pairs_of(config)]


def main(compile: bool) -> None:
    pairs = all_pairs()
    import jax

    jax.config.update("jax_num_cpu_devices", max(p.devices for p in pairs))
    from jaxlm import mesh as mesh_lib
    from jaxlm.cost import hardware, plan
    from jaxlm.errors import UsageError

    for pair in pairs:
        try:
            cfg = config_lib.load(pair.config, [f"mesh={pair.mesh}", *pair.overrides])
            mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[: pair.devices])
            figures = plan.make_plan(cfg, mesh, device=hardware.lookup("h100"), compile=compile)
            keys = (
                *("mesh", "devices", "params_by_component", "flops_per_token", "days"),
                "pipeline_bubble",
                *("bytes_per_device", "compile_s", "xla_bytes_per_device"),
            )
            result = {"plan": {k: figures[k] for k in keys if k in figures}}
        except UsageError as e:
            result = {"refused": str(e)}
        print(json.dumps({"pair": pair.name, **result}), flush=True)


if __name__ == "__main__":
    main(compile="--compile" in sys.argv[1:])
