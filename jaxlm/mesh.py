"""The named device mesh: "dp=16,tp=4" or a preset in meshes/ -> a `jax.sharding.Mesh`.

Five axes, always all present (size 1 when unused), ordered from the slowest to the fastest
links so that collectives of the inner axes stay on the fast ones:

    pipeline -> data -> fsdp -> context -> tensor      (tensor innermost: inside one node)

`context` splits every sequence along its length (context parallelism): its collectives move
keys and values once per layer, more often than data parallelism's gradients and less than
tensor parallelism's activations.

With one process, devices fill the mesh in `jax.devices()` order. With several (one per node,
or one per GPU), the mesh is hybrid: each axis is split into a part inside a process and a part
across processes, the innermost axes taking the process's own devices first, so a tensor group
stays on one node's links and data parallelism spans the nodes. The mesh is built once in `main`
and passed down; nothing here is global.
"""

import logging
import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from jaxlm import config as config_lib
from jaxlm.errors import UsageError

log = logging.getLogger("jaxlm")

AXES = ("pipeline", "data", "fsdp", "context", "tensor")
SHORT_NAMES = {"pp": "pipeline", "dp": "data", "fsdp": "fsdp", "cp": "context", "tp": "tensor"}
_NAMES = {**SHORT_NAMES, **{a: a for a in AXES}}


def parse(spec: str) -> dict[str, int]:
    """'dp=2,tp=4' -> {'pipeline': 1, 'data': 2, 'fsdp': 1, 'context': 1, 'tensor': 4}; one
    size may be -1."""
    sizes = dict.fromkeys(AXES, 1)
    seen = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        axis = _NAMES.get(name.strip())
        if not sep or axis is None:
            raise UsageError(
                f"unknown mesh axis '{name.strip()}' in '{spec}': "
                f"use dp, fsdp, cp, tp and pp (e.g. dp=2,tp=4)"
            )
        if axis in seen:
            raise UsageError(f"mesh axis '{name.strip()}' is given twice in '{spec}'")
        seen.add(axis)
        try:
            sizes[axis] = int(value)
        except ValueError:
            raise UsageError(
                f"mesh axis '{name.strip()}' needs an integer size, not '{value}'"
            ) from None
        if sizes[axis] == 0 or sizes[axis] < -1:
            raise UsageError(f"mesh axis '{name.strip()}' must be a positive size or -1")
    if list(sizes.values()).count(-1) > 1:
        raise UsageError(f"only one mesh axis may be -1 in '{spec}'")
    return sizes


def read(spec_or_preset: str) -> dict[str, int]:
    """Axis sizes from a spec string, a preset name in meshes/, or a YAML file path."""
    if "=" in spec_or_preset:
        return parse(spec_or_preset)
    preset = config_lib.read_preset("meshes", spec_or_preset)
    return parse(",".join(f"{k}={v}" for k, v in preset.items()))


def resolve(sizes: dict[str, int], n_devices: int) -> dict[str, int]:
    """Fill the one -1 axis with the devices left over and check the product is `n_devices`."""
    sizes = dict(sizes)
    known = math.prod(s for s in sizes.values() if s != -1)
    for axis, size in sizes.items():
        if size == -1:
            if n_devices % known:
                raise UsageError(
                    f"the mesh cannot fill {n_devices} devices: the fixed axes multiply to "
                    f"{known}, which does not divide {n_devices}"
                )
            sizes[axis] = n_devices // known
    if math.prod(sizes.values()) != n_devices:
        raise UsageError(
            f"the mesh {describe(sizes)} has {math.prod(sizes.values())} devices but "
            f"{n_devices} are available: make the axis sizes multiply to {n_devices} "
            f"or give one axis as -1"
        )
    return sizes


def describe(sizes: dict[str, int]) -> str:
    """{'data': 2, 'tensor': 4, ...} -> 'dp=2,tp=4' (axes of size 1 left out)."""
    short = {v: k for k, v in SHORT_NAMES.items()}
    parts = [f"{short[a]}={sizes[a]}" for a in AXES if sizes[a] != 1]
    return ",".join(parts) or "dp=1"


def make_mesh(spec_or_preset: str, devices=None) -> Mesh:
    """The mesh for a spec ("dp=2,tp=4") or preset over `devices` (default: all devices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve(read(spec_or_preset), len(devices))
    # Auto axis types: shardings come from the logical-axis table and XLA propagates the rest.
    return Mesh(device_grid(sizes, devices), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def device_grid(sizes: dict[str, int], devices: list) -> np.ndarray:
    """The devices as an array of the mesh's shape, hybrid when they span several processes."""
    shape = tuple(sizes[a] for a in AXES)
    processes = len({d.process_index for d in devices})
    if processes == 1:
        return np.asarray(devices).reshape(shape)
    local, outer = split_over_processes(sizes, len(devices) // processes)
    if outer["tensor"] > 1:
        log.warning(
            "tensor parallelism across processes (tp=%d, %d devices per process): its "
            "collectives run over the slow network",
            sizes["tensor"],
            len(devices) // processes,
        )
    return mesh_utils.create_hybrid_device_mesh(
        [local[a] for a in AXES], [outer[a] for a in AXES], devices, process_is_granule=True
    )


def split_over_processes(sizes: dict[str, int], per_process: int):
    """Each axis as (inside a process) x (across processes), innermost axes inside first."""
    local, outer, left = {}, {}, per_process
    for axis in reversed(AXES):
        local[axis] = math.gcd(sizes[axis], left)
        outer[axis] = sizes[axis] // local[axis]
        left //= local[axis]
    if left != 1:
        raise UsageError(
            f"the mesh {describe(sizes)} cannot place {per_process} devices per process: make the "
            f"innermost axes (tp, fsdp, ...) fill a process's devices"
        )
    return local, outer
