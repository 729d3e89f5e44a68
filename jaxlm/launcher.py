"""Several processes of one JAX job on this machine, to try multi-host code without a cluster.

`launch_local` starts N copies of `python -m jaxlm.MODULE ARGS` that find each other through
`jax.distributed` (JAXLM_COORDINATOR on a free local port, read by jaxlm/distributed.py) and
split the fake CPU devices between them. Like `srun --kill-on-bad-exit`, if one process fails
the others are stopped; SIGTERM and SIGUSR1 are passed on to every process, so a preemption
behaves as it would under Slurm. No JAX in this process: it only starts and watches the others.
"""

import os
import signal
import socket
import subprocess
import sys
import time

from jaxlm.errors import UsageError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(processes: int, cpu_devices: int, args: list[str], module: str = "train") -> int:
    """Run `python -m jaxlm.MODULE ARGS` in `processes` local processes; the exit code is the
    first failure's, or 0."""
    if processes < 1 or cpu_devices % processes:
        raise UsageError(f"--cpu-devices {cpu_devices} does not split over {processes} processes")
    coordinator = f"127.0.0.1:{free_port()}"
    children = []
    for i in range(processes):
        env = {
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "JAX_NUM_CPU_DEVICES": str(cpu_devices // processes),
            "JAXLM_COORDINATOR": coordinator,
            "JAXLM_NUM_PROCESSES": str(processes),
            "JAXLM_PROCESS_ID": str(i),
        }
        children.append(subprocess.Popen([sys.executable, "-m", f"jaxlm.{module}", *args], env=env))

    def forward(signum, _frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, forward)

    status = 0
    while any(c.poll() is None for c in children):
        failed = [c.returncode for c in children if c.returncode not in (None, 0)]
        if failed and not status:
            status = failed[0]
            time.sleep(5)  # a preempted peer may still be finishing the same checkpoint
            for child in children:
                if child.poll() is None:
                    child.terminate()
        time.sleep(0.1)
    return status or next((c.returncode for c in children if c.returncode), 0)
