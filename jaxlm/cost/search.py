"""Search the layouts of a model on N devices and rank them: `search`.

Frontier's search (TP, PP, micro batch, accumulation, ZeRO-1; one trial run each), done the
cheap way first:

1. enumerate every mesh dp x fsdp x cp x tp x pp = N whose axes divide the model (tp a power
   of two up to 8 and inside a node, pp dividing the layers, cp only for sequences of at least
   `LONG_SEQUENCE` tokens, where one sequence's attention outgrows a device), with
   recomputation none / save_dots / full and ZeRO-1 on or off where it means something
   (dp > 1, no fsdp);
2. for each, take the largest micro batch (least accumulation) whose estimated bytes per device
   fit the device memory (jaxlm/cost/memory.py's arithmetic, exact for the state), and keep
   only the cheapest recomputation that fits;
3. compile the `max_trials` candidates that the arithmetic thinks fastest, and drop those whose
   compiled memory (XLA's figure) does not fit;
4. rank the survivors. With `measure` (on a GPU or TPU) each one trains a few steps on
   synthetic data and is timed. On CPU, where timing fake devices says nothing about a
   cluster, the rank comes from the compiled program: its matmul FLOPs at the device's peak
   plus its collective bytes over the node's links (intra-node, or the network share when the
   mesh spans nodes), which the result says.
"""

import dataclasses
import logging
import math
import time

from jaxlm import config as config_lib
from jaxlm import mesh as mesh_lib
from jaxlm import sharding
from jaxlm.cost import flops, memory
from jaxlm.cost.compiled import compile_for_accelerator, compile_step, measured_seconds
from jaxlm.errors import UsageError
from jaxlm.step import build_program

log = logging.getLogger("jaxlm")

REMAT_ORDER = ("none", "save_dots", "full")  # cheapest first
# Sequences from this length on are also tried split over a context axis (cp = 2, 4, 8).
LONG_SEQUENCE = 16384


@dataclasses.dataclass
class Layout:
    sizes: dict[str, int]  # mesh axis sizes
    remat: str = "none"
    zero1: bool = False
    micro_batch: int | None = None  # sequences per replica per forward pass

    @property
    def mesh(self) -> str:
        return mesh_lib.describe(self.sizes)

    def overrides(self) -> list[str]:
        out = [f"mesh={self.mesh}", f"model.remat={self.remat}", f"train.zero1={self.zero1}"]
        if self.micro_batch:
            out.append(f"train.micro_batch_size={self.micro_batch}")
        return out

    def command(self) -> str:
        return f"--mesh {self.mesh} " + " ".join(self.overrides()[1:])


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def meshes(cfg, devices: int, per_node: int) -> list[dict[str, int]]:
    """Every pipeline x data x fsdp x context x tensor factorisation of `devices` the model
    divides."""
    m, T = cfg.model, cfg.train.seq_len
    contexts = [cp for cp in (1, 2, 4, 8) if cp == 1 or (T >= LONG_SEQUENCE and T % (2 * cp) == 0)]
    out = []
    for tp, cp in ((tp, cp) for tp in (1, 2, 4, 8) for cp in contexts):
        if devices % (tp * cp) or tp > per_node or m.n_heads % tp or m.kv_heads % tp:
            continue
        for pp in _divisors(devices // (tp * cp)):
            if m.n_layers % pp:
                continue
            for fsdp in _divisors(devices // (tp * cp * pp)):
                dp = devices // (tp * cp * pp * fsdp)
                out.append({"pipeline": pp, "data": dp, "fsdp": fsdp, "context": cp, "tensor": tp})
    return out


def candidate(cfg, layout: Layout, device_list):
    """(config, mesh, program) for a layout, or None where the layout does not divide."""
    try:
        c = config_lib.apply_overrides(cfg, layout.overrides())
        mesh = mesh_lib.make_mesh(c.mesh, device_list)
        return c, mesh, build_program(c, mesh)
    except UsageError:
        return None


@dataclasses.dataclass
class Group:
    """One mesh with ZeRO-1 on or off, and its variants (recomputation, micro batch) from the
    cheapest to run to the cheapest in memory, each with its estimated bytes per device."""

    sizes: dict[str, int]
    zero1: bool
    variants: list[tuple[str, int, int]]  # (remat, micro batch, estimated bytes)
    tried: int = -1  # index of the variant compiled last

    def next_fitting(self, limit: float, scale: dict[str, float]) -> int | None:
        """The next variant whose estimate, scaled by what compiles showed, fits."""
        for i in range(self.tried + 1, len(self.variants)):
            remat, _, estimate = self.variants[i]
            if estimate * scale.get(remat, 1.0) <= limit:
                return i
        return None


def groups(cfg, sizes: dict[str, int], device_list) -> list[Group]:
    """The (mesh, ZeRO-1) groups of a mesh shape; none if the model does not divide by it."""
    dp = sizes["data"] * sizes["fsdp"]
    if cfg.train.global_batch_size % dp:
        return []
    per_replica = cfg.train.global_batch_size // dp
    micro_batches = [
        per_replica // 2**k
        for k in range(int(math.log2(per_replica)) + 1)
        if per_replica % 2**k == 0
    ]
    pp = sizes["pipeline"]
    micro_batches = [b for b in micro_batches if pp == 1 or b % pp == 0]
    out = []
    for zero1 in (False, True) if sizes["data"] > 1 and sizes["fsdp"] == 1 else (False,):
        built = micro_batches and candidate(
            cfg, Layout(sizes, "none", zero1, micro_batches[0]), device_list
        )
        if not built:
            continue
        c, mesh, program = built
        state = sum(memory.state_bytes(program).values())
        state += memory.pipeline_weight_bytes(c, program)
        variants = [
            (
                remat,
                micro,
                state
                + memory.estimate_activation_bytes(
                    dataclasses.replace(c, model=dataclasses.replace(c.model, remat=remat)),
                    micro,
                    pp,
                    sizes["tensor"],
                    micro if pp > 1 else 1,
                    context=sizes["context"],
                ),
            )
            for remat in REMAT_ORDER
            for micro in micro_batches
        ]
        out.append(Group(sizes, zero1, variants))
    return out


def arithmetic_seconds(c, program, devices: int, device) -> float:
    """Hardware FLOPs of a step at peak, stretched by the pipeline bubble (for the first cut)."""
    counts = flops.params_by_component(program.spec.shapes)
    schedule = sharding.pipeline_schedule(c, program.stages.stages)
    per_token = flops.hardware_flops_per_token(c.model, c.train.seq_len, counts, schedule)
    seconds = (
        per_token
        * c.train.global_batch_size
        * c.train.seq_len
        / (devices * device.peak_tflops * 1e12)
    )
    return seconds / (1 - program.stages.bubble) if program.stages.stages > 1 else seconds


def compiled_seconds(step, sizes: dict[str, int], device, per_node: int) -> float:
    """The compiled step's matmuls at peak plus its collectives over the links (no overlap)."""
    devices = math.prod(sizes.values())
    bandwidth = device.intra_gbps if devices <= per_node else device.inter_gbps
    communication = sum(step.collective_bytes.values()) / (bandwidth * 1e9) if bandwidth else 0
    return step.flops_per_device / (device.peak_tflops * 1e12) + communication


def search(
    cfg,
    device_list,
    *,
    device,
    per_node: int,
    memory_gb: float,
    max_trials: int,
    measure: bool,
    steps: int = 5,
) -> dict:
    """Best first: compile the layout the arithmetic thinks fastest; when XLA's memory says it
    does not fit, its group moves on to the next variant that fits. Each such compile also
    calibrates the activation estimate of its recomputation policy for every group (compiled
    over estimated bytes), so other groups skip variants that would not fit either."""
    n = len(device_list)
    limit = memory_gb * 1e9
    start = time.perf_counter()
    if measure:  # timed on synthetic batches (no packed-document masks): no corpus needed
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source="synthetic"))
    shapes = meshes(cfg, n, per_node)
    queue = []  # (arithmetic seconds, tie-break, group, variant index, (cfg, mesh, program))
    scale: dict[str, float] = {}  # remat policy -> compiled / estimated bytes, from misfits

    def push(group: Group) -> None:
        i = group.next_fitting(limit, scale)
        if i is None:
            return
        remat, micro, _ = group.variants[i]
        built = candidate(cfg, Layout(group.sizes, remat, group.zero1, micro), device_list)
        if built is None:
            group.tried = i
            return push(group)
        c, _, program = built
        queue.append((arithmetic_seconds(c, program, n, device), len(queue), group, i, built))

    all_groups = [g for sizes in shapes for g in groups(cfg, sizes, device_list)]
    for group in all_groups:
        push(group)
    if not queue:
        raise UsageError(
            f"no layout of {cfg.model.n_layers} layers on {n} devices fits "
            f"{memory_gb:g} GB per device by the arithmetic estimate"
        )
    log.info(
        "%d meshes, %d layouts (mesh x ZeRO-1) with a variant that fits the estimate; "
        "compiling up to %d",
        len(shapes),
        len(queue),
        max_trials,
    )
    results = []
    while queue and len(results) < max_trials:
        queue.sort(key=lambda q: q[:2])
        _, _, group, i, (c, mesh, program) = queue.pop(0)
        remat, micro, estimate = group.variants[i]
        if estimate * scale.get(remat, 1.0) > limit:  # ruled out by a later calibration
            push(group)
            continue
        group.tried = i
        layout = Layout(group.sizes, remat, group.zero1, micro)
        # a measured step runs the program itself; a compiled figure is the accelerator's
        step = compile_step(c, program) if measure else compile_for_accelerator(c, program, mesh)
        row = {
            "mesh": layout.mesh,
            "micro_batch": program.micro_batch,
            "accumulation": program.accumulation,
            "remat": remat,
            "zero1": group.zero1,
            "estimated_bytes": estimate,
            "xla_bytes": step.bytes_per_device,
            "compile_s": step.compile_s,
            "command": layout.command(),
            "fits": step.bytes_per_device <= limit,
        }
        if row["fits"]:
            seconds = (
                measured_seconds(c, program, step.executable, steps)
                if measure
                else compiled_seconds(step, layout.sizes, device, per_node)
            )
            per_token = flops.model_flops_per_token_of(c, program.spec.shapes)
            tokens = c.train.global_batch_size * c.train.seq_len
            row.update(step_s=seconds, tokens_per_s_per_device=tokens / seconds / n)
            row["mfu"] = flops.mfu(per_token, row["tokens_per_s_per_device"], device.peak_tflops)
        else:
            scale[remat] = max(scale.get(remat, 1.0), step.bytes_per_device / estimate)
            push(group)
        log.info(
            "  %-22s micro %3d x accum %3d  remat %-9s zero1 %-5s  %s",
            row["mesh"],
            row["micro_batch"],
            row["accumulation"],
            remat,
            group.zero1,
            f"{row['step_s']:.4g} s/step"
            if row["fits"]
            else f"does not fit ({row['xla_bytes'] / 1e9:.1f} GB compiled)",
        )
        results.append(row)
    ranked = sorted((r for r in results if r["fits"]), key=lambda r: r["step_s"])
    return {
        "devices": n,
        "device": device.name,
        "memory_gb": memory_gb,
        "ranked_by": (
            "measured steps"
            if measure
            else "compiled cost: matmul FLOPs at peak + collective bytes over the links "
            "(CPU: no step timed)"
        ),
        "layouts": ranked,
        "rejected": [r for r in results if not r["fits"]],
        "best": ranked[0]["command"] if ranked else None,
        "seconds": time.perf_counter() - start,
    }
