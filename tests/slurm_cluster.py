"""A real Slurm (slurmctld, slurmd, munge) on this machine, for the tests that need one.

The configuration needs neither systemd nor cgroups (see SLURM-NOTES in the project's notes):
linuxproc process tracking, no task plugin, no accounting, daemons as root, everything under one
scratch directory, ports chosen free. Daemons are stopped by the pids in their pid files.
"""

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import time

DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol")


def available() -> str:
    """An empty string if Slurm can run here, else why not."""
    missing = [d for d in DAEMONS if not shutil.which(d)]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing; .ci/run installs it)"
    if os.geteuid() != 0:
        return "the test Slurm runs its daemons as root"
    return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, scratch: pathlib.Path, cpus: int = 4):
        self.scratch = scratch
        self.host = socket.gethostname().split(".")[0]
        self.conf = scratch / "slurm.conf"
        (scratch / "state").mkdir()
        (scratch / "spool").mkdir()
        self.conf.write_text(f"""\
ClusterName=jaxlmtest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={scratch}/state
SlurmdSpoolDir={scratch}/spool
SlurmctldPidFile={scratch}/slurmctld.pid
SlurmdPidFile={scratch}/slurmd.pid
SlurmctldLogFile={scratch}/slurmctld.log
SlurmdLogFile={scratch}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MailProg=/bin/true
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MinJobAge=3600
# A requeued job waits until its old credential expires (120 s by default; 5 s at least).
AuthInfo=cred_expire=5
# The main scheduler runs every 60 s and backfill every 30 s by default: a requeued job whose
# credential has expired would wait that long for a pass, idle. Every 2 s here.
SchedulerParameters=sched_interval=2,bf_interval=2
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> None:
        self._start_munge()
        subprocess.run(["slurmctld", "-i"], env=self.env, check=True)
        subprocess.run(["slurmd"], env=self.env, check=True)
        deadline = time.time() + 30
        while time.time() < deadline:
            state = subprocess.run(
                ["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True
            ).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"the test Slurm did not come up: sinfo says '{state}'")

    def _start_munge(self) -> None:
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
            return  # already running
        pathlib.Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        if not pathlib.Path("/etc/munge/munge.key").exists():
            subprocess.run(["mungekey", "--create"], check=True)
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld"):
            pid_file = self.scratch / f"{name}.pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass

    def sbatch(self, *args: str, env: dict, cwd: pathlib.Path) -> int:
        result = subprocess.run(
            ["sbatch", "--parsable", *args],
            env={**self.env, **env},
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        )
        return int(result.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", str(job_id)],
            env=self.env,
            capture_output=True,
            text=True,
        ).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def signal(self, job_id: int, name: str) -> None:
        subprocess.run(["scancel", f"--signal={name}", str(job_id)], env=self.env, check=True)

    def cancel(self, job_id: int) -> None:
        subprocess.run(["scancel", str(job_id)], env=self.env)
