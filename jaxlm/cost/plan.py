"""Will a layout fit, what does it cost, how long will the run take: `make_plan`.

Two kinds of figures, side by side:
- arithmetic: parameters by component, FLOPs per token (jaxlm/cost/flops.py), bytes per device
  of parameters, gradients and optimizer state (from the real shardings of the real state, so
  exact), and an estimate of the activations under the chosen recomputation policy;
- XLA's own: the actual train step is lowered and compiled ahead of time for the mesh's devices
  from abstract inputs (nothing is allocated), and its memory analysis gives the bytes per
  device the compiled program needs, its HLO the matmul FLOPs and collective bytes. The CPU
  compiler is not the GPU one: it fuses differently, and a bfloat16 model is compiled as
  float16, the same size, since the CPU widens bfloat16 stacks to float32 (`cpu_stand_in`).
  The XLA figure is a close, usually slightly pessimistic, guide.

Then the run: days to train a token budget (default 20 per parameter, compute-optimal) at an
assumed MFU (GPT-NL's compute calculus), the energy that takes at the devices' board power, and
warnings from the layout rules of thumb (`layout_warnings`).
"""

from jaxlm import config as config_lib
from jaxlm import mesh as mesh_lib
from jaxlm import sharding
from jaxlm.cost import DEFAULT_MFU, flops, memory
from jaxlm.cost.compiled import compile_for_accelerator
from jaxlm.step import build_program

FSDP_MIN_TOKENS = 2500  # per device per step: below this FSDP's collectives show (scaling-book)
LARGE_BUBBLE = 0.2


# The arithmetic's and XLA's bytes per device may differ by this share of XLA's before plan
# warns: the arithmetic leaves out XLA's small buffers and its fusion choices.
MEMORY_MARGIN = 0.25


def layout_warnings(cfg, mesh, program, device, per_node: int, fits_bytes: int | None) -> list:
    """The rules of thumb of "How to Scale Your Model" (scaling-book), applied to this layout:
    tensor parallelism stays inside a node and at most 8-way; FSDP needs enough tokens per
    device per step to hide its gathers; a pipeline wants a small bubble and ZeRO-1 rather than
    FSDP under it; and the layout must fit the device's memory."""
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
    """The plan of `cfg` on `mesh` for a `device` (a `jaxlm.cost.hardware.Device`), as a dict
    of plain values (what `python -m jaxlm.plan --json` prints)."""
    program = build_program(cfg, mesh)
    counts = flops.params_by_component(program.spec.shapes)
    seq = cfg.train.seq_len
    schedule = sharding.pipeline_schedule(cfg, program.stages.stages)
    model_flops = flops.model_flops_per_token(cfg.model, seq, counts)
    n = mesh.devices.size
    per_node = devices_per_node or device.per_node
    state = memory.state_bytes(program)
    state["activations"] = memory.activation_bytes(cfg, program, mesh)
    if program.stages.stages > 1:
        state["pipeline"] = memory.pipeline_weight_bytes(cfg, program)
    state["total"] = sum(state.values())
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
        "hardware_flops_per_token": flops.hardware_flops_per_token(
            cfg.model, seq, counts, schedule
        ),
        "bytes_per_device": state,
        "tokens": tokens,
        "mfu": mfu,
        "days": days,
        "energy_kwh_at_tdp": (
            days * 24 * n * device.tdp_watts / 1000 if device.tdp_watts else None
        ),
        "micro_batch": program.micro_batch,
        "accumulation": program.accumulation,
        "pipeline_bubble": program.stages.bubble if program.stages.stages > 1 else 0.0,
        "pipeline_schedule": schedule if program.stages.stages > 1 else None,
    }
    fits_bytes = state["total"]
    warnings = []
    if compile:
        step = compile_for_accelerator(cfg, program, mesh)
        tokens_per_step = cfg.train.global_batch_size * seq
        plan.update(
            xla_bytes_per_device=step.bytes_per_device,
            xla_memory=step.memory,
            xla_flops_per_token=step.flops_per_device * n / tokens_per_step,
            xla_collective_bytes_per_device=step.collective_bytes,
            compile_s=step.compile_s,
        )
        fits_bytes = step.bytes_per_device
        apart = abs(step.bytes_per_device - state["total"]) / step.bytes_per_device
        if apart > MEMORY_MARGIN:
            warnings.append(
                f"the arithmetic's {state['total'] / 1e9:.1f} GB per device and XLA's "
                f"{step.bytes_per_device / 1e9:.1f} GB differ by {apart:.0%} of XLA's: the fit is "
                f"judged by XLA's, the compiled program's own buffer assignment (the arithmetic "
                f"estimates activations from the shapes alone, jaxlm/cost/memory.py)"
            )
        if step.unknown_loops:
            warnings.append(
                f"{step.unknown_loops} loops of the compiled step have no trip count XLA could "
                f"prove: their FLOPs and collectives are counted once, so XLA's figures are low"
            )
    plan["fits"] = fits_bytes <= device.memory_gb * 1e9
    plan["warnings"] = layout_warnings(cfg, mesh, program, device, per_node, fits_bytes) + warnings
    return plan
