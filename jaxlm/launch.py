"""`python -m jaxlm.launch local -n N [--cpu-devices D] -- <train args>`: several processes on
this machine, to try multi-host code without a cluster.

Starts N copies of `python -m jaxlm.train <train args>` that find each other through
`jax.distributed` (JAXLM_COORDINATOR on a free local port) and split D fake CPU devices between
them (default 8, so 2 processes get 4 each). Like `srun --kill-on-bad-exit`, if one process
fails the others are stopped; SIGTERM and SIGUSR1 are passed on to every process, so a
preemption behaves as it would under Slurm. The exit code is the first failure's, or 0.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

from jaxlm.cli import run_command
from jaxlm.errors import UsageError


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m jaxlm.launch", description=__doc__.split("\n")[0])
    commands = p.add_subparsers(dest="command", required=True)
    local = commands.add_parser("local", help="N processes on this machine")
    local.add_argument("-n", "--processes", type=int, default=2)
    local.add_argument(
        "--cpu-devices",
        type=int,
        default=8,
        help="fake CPU devices in all, split evenly between the processes",
    )
    local.add_argument(
        "train_args",
        nargs=argparse.REMAINDER,
        help="after --: the arguments of python -m jaxlm.train",
    )
    args = p.parse_args(argv)
    if args.train_args[:1] == ["--"]:
        args.train_args = args.train_args[1:]
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(processes: int, cpu_devices: int, train_args: list[str]) -> int:
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
        children.append(
            subprocess.Popen([sys.executable, "-m", "jaxlm.train", *train_args], env=env)
        )

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


def main(argv=None) -> int:
    args = parse_args(argv)
    status = 0

    def body():
        nonlocal status
        status = launch_local(args.processes, args.cpu_devices, args.train_args)

    return run_command(body) or status


if __name__ == "__main__":
    sys.exit(main())
