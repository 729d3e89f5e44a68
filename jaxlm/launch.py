"""`python -m jaxlm.launch local -n N [--cpu-devices D] [--module M] -- <args>`: several processes
on this machine, to try multi-host code without a cluster.

Starts N copies of `python -m jaxlm.M <args>` (default M: train; `--module doctor` runs the
preflight checks of jaxlm/doctor.py) (jaxlm/launcher.py) that find each
other through `jax.distributed` (JAXLM_COORDINATOR on a free local port) and split D fake CPU
devices between them (default 8, so 2 processes get 4 each). Like `srun --kill-on-bad-exit`,
if one process fails the others are stopped; SIGTERM and SIGUSR1 are passed on to every
process, so a preemption behaves as it would under Slurm. The exit code is the first failure's,
or 0.
"""

import argparse
import sys

from jaxlm import cli, launcher

MODULES = ("train", "doctor")  # the commands that join a multi-process launch


def parse_args(argv):
    p = cli.Parser(prog="python -m jaxlm.launch", description=__doc__.split("\n")[0])
    commands = p.add_subparsers(dest="command", required=True)
    local = commands.add_parser("local", help="N processes on this machine")
    local.add_argument("-n", "--processes", type=cli.COUNT, default=2, help="processes to start")
    local.add_argument(
        "--cpu-devices",
        type=int,
        default=8,
        help="fake CPU devices in all, split evenly between the processes",
    )
    local.add_argument(
        "--module",
        default="train",
        choices=MODULES,
        help="the jaxlm command each process runs",
    )
    local.add_argument(
        "train_args",
        nargs=argparse.REMAINDER,
        help="after --: the arguments of python -m jaxlm.MODULE",
    )
    args = p.parse_args(argv)
    if args.train_args[:1] == ["--"]:
        args.train_args = args.train_args[1:]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    status = 0

    def body():
        nonlocal status
        status = launcher.launch_local(
            args.processes, args.cpu_devices, args.train_args, module=args.module
        )

    return cli.run_command(body) or status


if __name__ == "__main__":
    sys.exit(main())
