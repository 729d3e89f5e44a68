"""Several processes, one program: `jax.distributed` wired up for Slurm, explicit variables, or
nothing at all.

    under srun with 2+ tasks      JAX reads the Slurm variables itself (coordinator: the first
                                  node of the step, port 61440 + job id % 4096 unless
                                  JAX_COORDINATOR_PORT is set)
    JAXLM_COORDINATOR=host:port   explicit, with JAXLM_NUM_PROCESSES and JAXLM_PROCESS_ID
    neither                       one process, no coordination service

Initialisation gives up after `distributed.init_timeout` seconds instead of the default five
minutes, and a process that stops sending heartbeats for `distributed.heartbeat_timeout` seconds
makes the coordination service end every other process with an error, instead of a hang in a
collective that will never complete. CPU collectives use gloo, set explicitly.

Devices per process: one GPU per task (`srun --ntasks-per-node=4 --gpus-per-task=1`, JAX's
default under Slurm), or all of a node's devices in one task; on CPU every process keeps its
`JAX_NUM_CPU_DEVICES` fake devices.
"""

import logging
import os
import pathlib
import sys

import jax

from jaxlm.config import DistributedConfig
from jaxlm.errors import UsageError

log = logging.getLogger("jaxlm")

_EXPLICIT = ("JAXLM_COORDINATOR", "JAXLM_NUM_PROCESSES", "JAXLM_PROCESS_ID")


def launched_processes() -> int:
    """How many processes this launch has, from the environment (1 without a launcher)."""
    if os.environ.get("JAXLM_COORDINATOR"):
        return int(os.environ.get("JAXLM_NUM_PROCESSES", "1"))
    if os.environ.get("SLURM_STEP_NODELIST"):  # inside an srun step, not the batch script
        return int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1")))
    return 1


def initialize(cfg: DistributedConfig) -> None:
    """Join the other processes of this launch; a no-op for a single process."""
    if launched_processes() == 1:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(
        initialization_timeout=cfg.init_timeout, heartbeat_timeout_seconds=cfg.heartbeat_timeout
    )
    if os.environ.get("JAXLM_COORDINATOR"):
        missing = [v for v in _EXPLICIT if not os.environ.get(v)]
        if missing:
            raise UsageError(f"JAXLM_COORDINATOR is set but {', '.join(missing)} is not")
        kwargs.update(
            coordinator_address=os.environ["JAXLM_COORDINATOR"],
            num_processes=int(os.environ["JAXLM_NUM_PROCESSES"]),
            process_id=int(os.environ["JAXLM_PROCESS_ID"]),
        )
    jax.distributed.initialize(**kwargs)


def log_to_file(out_dir: pathlib.Path | None) -> None:
    """Every process logs to DIR/logs/process-N.log; only process 0 also to the terminal."""
    index = jax.process_index()
    if index != 0:  # the others stay quiet on the terminal
        for handler in list(log.handlers):
            if getattr(handler, "stream", None) is sys.stdout:
                log.removeHandler(handler)
    if out_dir is None:
        return
    path = out_dir / "logs" / f"process-{index}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.info(
        "process %d of %d, %d local devices", index, jax.process_count(), jax.local_device_count()
    )
