"""The train step compiled ahead of time: XLA's memory and HLO figures, and timed real steps.

`compile_step` lowers the step for abstract inputs (nothing is allocated), so a mesh of
thousands of fake CPU devices compiles on a laptop; `measured_seconds` runs the compiled step on
synthetic batches on the devices at hand.
"""

import dataclasses
import time

import jax
import numpy as np

from jaxlm.cost import hlo
from jaxlm.data import loader
from jaxlm.step import abstract_step_inputs, build_program


@dataclasses.dataclass
class CompiledStep:
    bytes_per_device: int  # arguments + outputs - aliased (donated) + temporaries
    memory: dict[str, int]
    flops_per_device: float  # matmul FLOPs of one step, loops counted (jaxlm/cost/hlo.py)
    collective_bytes: dict[str, float]  # per device per step
    unknown_loops: int  # while loops XLA proved no trip count for: counted once
    compile_s: float
    executable: object = dataclasses.field(repr=False, default=None)


def cpu_stand_in(cfg):
    """The config whose step XLA:CPU compiles to the figures `cfg` would have on an accelerator:
    bfloat16 compiled as float16, the same size. XLA:CPU has no bfloat16 dynamic slices: it
    widens them to float32 and hoists the widening of a whole loop-carried stack (the saved
    layer inputs of the layer scan or the pipeline) out of the backward loop, a float32 copy
    that GPUs do not make. The CPU keeps float16 as it is. Other dtypes, other backends: `cfg`.
    """
    if jax.default_backend() != "cpu" or cfg.model.compute_dtype != "bfloat16":
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, compute_dtype="float16"))


def compile_for_accelerator(cfg, program, mesh) -> CompiledStep:
    """`compile_step` of `cpu_stand_in(cfg)`: the figures `cfg`'s step would have on an
    accelerator, from this machine's compiler (`program` is `cfg`'s, built on `mesh`)."""
    stand_in = cpu_stand_in(cfg)
    return compile_step(stand_in, program if stand_in is cfg else build_program(stand_in, mesh))


def compile_step(cfg, program) -> CompiledStep:
    """Lower and compile the train step for abstract inputs: XLA's memory and HLO figures."""
    start = time.perf_counter()
    compiled = program.train_step.lower(*abstract_step_inputs(cfg, program)).compile()
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    memory = {
        k: int(getattr(stats, f"{k}_size_in_bytes"))
        for k in ("argument", "output", "alias", "temp", "generated_code")
    }
    total = (
        memory["argument"]
        + memory["output"]
        - memory["alias"]
        + memory["temp"]
        + memory["generated_code"]
    )
    counts = hlo.analyse(compiled.as_text())
    return CompiledStep(
        total,
        memory,
        counts.flops,
        counts.collective_bytes,
        counts.unknown_loops,
        seconds,
        compiled,
    )


def measured_seconds(cfg, program, compiled, steps: int, warmup: int = 1) -> float:
    """Seconds per step of `steps` timed steps of the compiled step on synthetic data, after
    `warmup` untimed ones; the host waits only at the end, as the training loop does."""
    batches = loader.make_batches(cfg, program.batch_sharding)
    state = program.init(jax.random.key(0))
    limit = jax.device_put(np.float32(np.inf), program.state_shardings.step)
    for _ in range(warmup):
        state, _ = compiled(state, next(batches), limit)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, next(batches), limit)
    jax.block_until_ready((state, metrics))
    return (time.perf_counter() - start) / steps
