"""Preflight measurements of a launch: what every process reports, and the time of every mesh
axis's collectives and of every link between two processes, reduced to a verdict.

`run(cfg, mesh, sizes, repeats)` runs the checks on every process (all must call it) and returns
the same result on each; `python -m jaxlm.doctor` (jaxlm/doctor.py) renders it. How the checks
work and how the verdict is reached is told in that command's documentation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import re
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from jax.sharding import Mesh

log = logging.getLogger("jaxlm")

KiB = 1024
DEFAULT_SIZES = (4 * KiB, 64 * KiB, 1024 * KiB)  # per device: from latency- to bandwidth-bound
OPS = ("all-reduce", "all-gather", "permute")
MAX_SHIFTS = 8  # each shift compiles its own permutes: n - 1 of them would not scale
# The pair test times each link PAIR_REPEATS x --repeats times: a verdict needs more evidence
# than a row of the table, and its permutes take a millisecond or less.
PAIR_REPEATS = 3
# On two CPU cores shared by three or four processes, healthy scores stayed within 1.7x of the
# others' median and a process slowed 3x scored 3.2x or more: 2x sits between, and a host that
# halves the speed of a synchronous job is the one to requeue without. The floor keeps jitter of
# fast links (tens of microseconds on a GPU) from ever counting.
OUTLIER_FACTOR = 2.0
OUTLIER_FLOOR_S = 50e-6
# What decides where devices and collectives go; a prefix ending in "_" covers a family.
ENV_PREFIXES = (
    "CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "NCCL_", "FI_",
    "UCX_", "GLOO_", "XLA_FLAGS", "XLA_PYTHON_CLIENT_", "TPU_", "JAX_", "JAXLM_",
    "SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_PROCID", "SLURM_LOCALID",
    "SLURM_NTASKS", "SLURM_STEP_", "SLURM_GPUS",
)  # fmt: skip
# ... and those that differ between the processes of a sound launch.
PER_PROCESS_ENV = (
    "JAXLM_PROCESS_ID", "SLURM_PROCID", "SLURM_LOCALID", "CUDA_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES",
)  # fmt: skip


# --- what a process reports (no JAX needed) ------------------------------------------------------


def environment(environ=os.environ) -> dict[str, str]:
    return {k: v for k, v in sorted(environ.items()) if k.startswith(ENV_PREFIXES)}


def first_node(nodelist: str) -> str:
    """The first host of a Slurm node list: 'gpu[003-007,9],cpu1' -> 'gpu003'."""
    name, _, rest = nodelist.partition(",")[0].partition("[")
    return name + re.split(r"[,\-\]]", rest)[0] if rest else name


def coordinator_address(environ=os.environ) -> str | None:
    """Where the processes meet, as jaxlm/distributed.py and JAX's Slurm support choose it."""
    if environ.get("JAXLM_COORDINATOR"):
        return environ["JAXLM_COORDINATOR"]
    if environ.get("SLURM_STEP_NODELIST") and environ.get("SLURM_JOB_ID"):
        port = environ.get("JAX_COORDINATOR_PORT") or 61440 + int(environ["SLURM_JOB_ID"]) % 4096
        return f"{first_node(environ['SLURM_STEP_NODELIST'])}:{port}"
    return None


def probe(address: str, timeout_s: float = 5.0) -> dict:
    """A TCP connect to host:port: a firewall or a wrong interface shows here, in seconds."""
    host, _, port = address.rpartition(":")
    start = time.perf_counter()
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as e:
        return {"address": address, "reachable": False, "error": str(e)}
    elapsed_ms = 1e3 * (time.perf_counter() - start)
    return {"address": address, "reachable": True, "connect_ms": elapsed_ms}


# --- the arithmetic of the measurements ----------------------------------------------------------


def bandwidths(op: str, nbytes: int, seconds: float, n: int) -> tuple[float, float]:
    """(algbw, busbw) in bytes/s of one collective of `nbytes` per device over `n` devices."""
    if op == "all-gather":
        algbw = n * nbytes / seconds  # the gathered output, as nccl-tests counts it
        return algbw, algbw * (n - 1) / n
    algbw = nbytes / seconds
    return algbw, algbw * (2 * (n - 1) / n if op == "all-reduce" else 1.0)


def link_class(group_hosts: Sequence[Sequence[str]]) -> str:
    """'intra-node' when every device group of an axis lies on one host, else 'inter-node'."""
    return "intra-node" if all(len(set(hosts)) == 1 for hosts in group_hosts) else "inter-node"


def pair_shifts(n: int) -> list[int]:
    """The shifts s of the pair test (i sends to i+s): all of 1..n-1, or MAX_SHIFTS spread out."""
    if n - 1 <= MAX_SHIFTS:
        return list(range(1, n))
    return sorted({round(1 + k * (n - 2) / (MAX_SHIFTS - 1)) for k in range(MAX_SHIFTS)})


def pair_rounds(n: int, shift: int) -> list[list[tuple[int, int]]]:
    """The links i -> i+shift in rounds where no process both sends and receives. A send waits
    until its receiver is ready, so a process doing both would also time its receiver's delay,
    and every neighbour of a slow process would look slow."""
    rounds: list[list[tuple[int, int]]] = []
    for sender in range(n):
        link = (sender, (sender + shift) % n)
        free = (r for r in rounds if all(link[0] != b and link[1] != a for a, b in r))
        chosen = next(free, None)
        if chosen is None:
            rounds.append(chosen := [])
        chosen.append(link)
    return rounds


def pair_links(shifts: Sequence[int], received_s: Sequence[Sequence[float]]) -> dict:
    """{(sender, receiver): seconds} from received_s[k][i], process i's time in shift k."""
    links = {}
    for s, times in zip(shifts, received_s, strict=True):
        links.update({((i - s) % len(times), i): t for i, t in enumerate(times)})
    return links


def score(sent: dict[int, float], received: dict[int, float], without: int | None = None):
    """A process's score from the times of its links by peer: the smaller of the medians of
    those it sends on and those it receives on, leaving out its links with `without`."""
    return min(
        statistics.median(t for peer, t in links.items() if peer != without)
        for links in (sent, received)
    )


def assess(links: dict[tuple[int, int], float], hosts: Sequence[str]) -> list[dict]:
    """Every process's score, the others' median (without their links to it), and whether it is
    an outlier: `factor` above OUTLIER_FACTOR and `score - median` above OUTLIER_FLOOR_S."""
    n = len(hosts)
    sent: list[dict] = [{} for _ in range(n)]
    received: list[dict] = [{} for _ in range(n)]
    for (i, j), t in links.items():
        sent[i][j], received[j][i] = t, t
    scores = np.array([score(sent[p], received[p]) for p in range(n)])
    rows = []
    for p in range(n):
        others = scores.copy()
        for q in {*sent[p], *received[p]}:  # only p's peers change when its links are left out
            others[q] = score(sent[q], received[q], without=p)
        median = float(np.median(np.delete(others, p)))
        rows.append(
            {
                "process": p,
                "host": hosts[p],
                "score_us": 1e6 * float(scores[p]),
                "median_us": 1e6 * median,
                "factor": float(scores[p]) / median,
                "outlier": bool(
                    scores[p] > OUTLIER_FACTOR * median and scores[p] - median > OUTLIER_FLOOR_S
                ),
            }
        )
    return rows


def differing_env(reports: Sequence[dict]) -> list[str]:
    """Variables set differently on some processes (or only on some), where they should agree."""
    keys = sorted({k for r in reports for k in r["env"]} - set(PER_PROCESS_ENV))
    return [k for k in keys if len({r["env"].get(k) for r in reports}) > 1]


# --- measuring (JAX from here on: main imports it once the device count is set) ------------------


def report() -> dict:
    """What this process is: where it runs, what it sees, and whether it can reach the others."""
    import jax
    import jaxlib

    address = coordinator_address() if jax.process_count() > 1 else None
    return {
        "host": socket.gethostname(),
        "process": jax.process_index(),
        "processes": jax.process_count(),
        "platform": jax.devices()[0].platform,
        "device_kinds": sorted({d.device_kind for d in jax.local_devices()}),
        "local_devices": jax.local_device_count(),
        "global_devices": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "python": platform.python_version(),
        "env": environment(),
        # having joined proves the coordinator answered; the probe tests it from here, now
        "distributed_initialized": jax.distributed.is_initialized(),
        "coordinator": probe(address) if address else None,
    }


def gather_json(obj) -> list:
    """`obj` of every process, in process order, on every process (as padded UTF-8 bytes)."""
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)
    longest = int(multihost_utils.process_allgather(np.int32(data.size)).max())
    rows = multihost_utils.process_allgather(np.pad(data, (0, longest - data.size)))
    return [json.loads(bytes(row).rstrip(b"\0")) for row in rows]


def gather_times(times: list[list[float]], repeats: int) -> np.ndarray:
    """[process][measurement][repeat] seconds, the same on every process."""
    from jax.experimental import multihost_utils

    local = np.asarray(times, dtype=np.float64).reshape(len(times), repeats)
    if not times:  # nothing measured anywhere: every process agrees on the shapes
        import jax

        return np.zeros((jax.process_count(), 0, repeats))
    return np.asarray(multihost_utils.process_allgather(local))


@dataclasses.dataclass
class Clock:
    """Times operations on this process, each after a barrier over every device, and stretches
    them on the process a fault is injected into (slow_factor > 1)."""

    barrier: Callable[[], object]
    slow_factor: float = 1.0  # this process's
    injected: bool = False  # whether a fault is injected into any process: all then calibrate

    def time(self, runs: Sequence[Callable[[], object]], repeats: int) -> list[list[float]]:
        """`repeats` times of each of `runs` (each blocks until its result is ready), after a
        warm-up that compiles them. Repeat r of every run comes before repeat r+1 of any: a
        passing stall (another job's burst on the same cores) then lands in one repeat of many
        runs, not in all of one."""
        if not runs:
            return []
        for run in runs:
            run()
        times: list[list[float]] = [[] for _ in runs]
        for _ in range(repeats):
            delays = self._delays(runs)
            for run, delay, out in zip(runs, delays, times, strict=True):
                out.append(self._once(run, float(delay)))
        return times

    def _delays(self, runs: Sequence[Callable[[], object]]) -> Sequence[float]:
        """The injected delay of each run in the coming repeat: F - 1 times its unslowed duration,
        the median of one unslowed run on every process made just before. Measured anew in every
        repeat, the delay follows the load of the machine: calibrated once, in a quiet moment, it
        would stretch a later, busier repeat by less than F. Everyone's median, since the slowed
        process's own duration can be near zero (it starts last and finds its data waiting)."""
        if not self.injected:
            return [0.0] * len(runs)
        unslowed = [[self._once(run, 0.0)] for run in runs]
        return (self.slow_factor - 1) * np.median(gather_times(unslowed, 1), (0, 2))

    def _once(self, run: Callable[[], object], delay: float) -> float:
        self.barrier()  # everyone starts together: whoever is slow is then waited for
        start = time.perf_counter()
        if delay:
            time.sleep(delay)
        run()
        return time.perf_counter() - start


def _ones(mesh: Mesh, spec, elements: int):
    """A float32 array of `elements` per device, sharded by `spec`, made in place."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    shape = (mesh.size * elements,)
    return jax.jit(lambda: jnp.ones(shape, jnp.float32), out_shardings=NamedSharding(mesh, spec))()


def _runner(body, mesh: Mesh, in_spec, x, out_spec=None) -> Callable[[], object]:
    """`body` under shard_map on `x`, compiled, as a call that blocks until it is done."""
    import jax

    out_spec = in_spec if out_spec is None else out_spec
    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=in_spec, out_specs=out_spec))
    return lambda: fn(x).block_until_ready()


def make_barrier(mesh: Mesh) -> Callable[[], object]:
    """A tiny psum over every device of `mesh`: no process passes it before all have arrived."""
    import jax
    from jax.sharding import PartitionSpec as P

    axes = tuple(mesh.axis_names)
    x = _ones(mesh, P(axes), 1)
    return _runner(lambda v: jax.lax.psum(v, axes), mesh, P(axes), x, out_spec=P())


def collective(op: str, axis: str, n: int) -> Callable:
    import jax

    if op == "all-reduce":
        return lambda x: jax.lax.psum(x, axis)
    if op == "all-gather":
        return lambda x: jax.lax.all_gather(x, axis, tiled=True)
    return lambda x: jax.lax.ppermute(x, axis, [(i, (i + 1) % n) for i in range(n)])


def measure_axes(mesh: Mesh, clock: Clock, sizes: Sequence[int], repeats: int):
    """Every op x size on every axis of size > 1: the rows (without times) and this process's
    times of each, in the same order on every process."""
    from jax.sharding import PartitionSpec as P

    from jaxlm.mesh import AXES

    spec = P(AXES)  # each device holds its own block; the collective runs along one axis
    rows, runs = [], []
    for axis, n in ((a, mesh.shape[a]) for a in AXES if mesh.shape[a] > 1):
        for op in OPS:
            for nbytes in sizes:
                elements = max(1, nbytes // 4)
                x = _ones(mesh, spec, elements)
                runs.append(_runner(collective(op, axis, n), mesh, spec, x))
                rows.append({"axis": axis, "size": n, "op": op, "bytes": 4 * elements})
    return rows, clock.time(runs, repeats)


def measure_pairs(mesh: Mesh, clock: Clock, elements: int, repeats: int):
    """Process i sends `elements` float32 to process i+s, for each shift s, from its first device
    to the other's first: the shifts and this process's times as the receiver in each."""
    import jax
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    firsts: dict[int, object] = {}
    for d in sorted(mesh.devices.flat, key=lambda d: d.id):
        firsts.setdefault(d.process_index, d)
    n, me = len(firsts), jax.process_index()
    peers = Mesh(np.array([firsts[p] for p in range(n)]), ("peers",))
    x = _ones(peers, P("peers"), elements)
    shifts = pair_shifts(n)
    runs, mine = [], []  # every process runs every round: each is one collective
    for s in shifts:
        for links in pair_rounds(n, s):
            body = lambda v, links=links: jax.lax.ppermute(v, "peers", links)  # noqa: E731
            runs.append(_runner(body, peers, P("peers"), x))
            mine.append(any(receiver == me for _, receiver in links))
    times = clock.time(runs, repeats)
    return shifts, [t for t, received in zip(times, mine, strict=True) if received]


def axis_groups(mesh: Mesh, axis: str) -> np.ndarray:
    """The devices that communicate along `axis`, one group per row."""
    grid = np.moveaxis(mesh.devices, mesh.axis_names.index(axis), -1)
    return grid.reshape(-1, grid.shape[-1])


def summarise_axes(rows: list[dict], times: np.ndarray, mesh: Mesh, hosts) -> list[dict]:
    """The rows with their times (times[process][row][repeat]), bandwidths and link class."""
    out = []
    for row, per_process in zip(rows, times.transpose(1, 0, 2), strict=True):
        slowest = per_process.max(axis=0)  # each repeat lasts until its last process is done
        median = float(np.median(slowest))
        algbw, busbw = bandwidths(row["op"], row["bytes"], median, row["size"])
        groups = axis_groups(mesh, row["axis"])
        out.append(
            {
                **row,
                "link": link_class([[hosts[d.process_index] for d in g] for g in groups]),
                "time_us": 1e6 * median,
                "algbw_gbps": algbw / 1e9,
                "busbw_gbps": busbw / 1e9,
                "spread": float((slowest.max() - slowest.min()) / median),
                "per_process_us": (1e6 * np.median(per_process, axis=1)).tolist(),
            }
        )
    for row in out:  # latency: the time of the smallest size of the same axis and op
        same = [r for r in out if (r["axis"], r["op"]) == (row["axis"], row["op"])]
        row["latency_us"] = min(same, key=lambda r: r["bytes"])["time_us"]
    return out


def summarise_pairs(shifts, times: np.ndarray, nbytes: int, hosts) -> dict:
    """The link matrix from times[process][shift][repeat], and each process's score."""
    n = len(hosts)
    received = np.quantile(times, 0.25, axis=2).T.tolist()  # [shift][process]
    links = pair_links(shifts, received)
    rows = assess(links, hosts) if n >= 3 else []
    matrix = [[links.get((i, j)) for j in range(n)] for i in range(n)]
    note = f"{n} process(es): a slow link slows both of its ends alike, so no single process "
    return {
        "bytes": nbytes,
        "shifts": list(shifts),
        "links_us": [[None if t is None else 1e6 * t for t in row] for row in matrix],
        "scores": rows,
        "note": None if rows else note + "can be singled out",
    }


def pair_test(mesh: Mesh, clock: Clock, elements: int, repeats: int, hosts) -> dict:
    """The pair test, measured and summarised (the same result on every process)."""
    shifts, times = measure_pairs(mesh, clock, elements, repeats)
    return summarise_pairs(shifts, gather_times(times, repeats), 4 * elements, hosts)


def confirm(pairs: dict, again: dict) -> None:
    """Keep as outliers only the processes that a second pair test names too. A slow host stays
    slow, while a stall of the machine's other tenants passes: on two cores shared by four
    processes and a training run, a healthy process scored above 2x in one of twenty runs, and
    a requeue without a sound node costs more than a second minute of measuring."""
    named_again = {s["process"] for s in again["scores"] if s["outlier"]}
    for s in pairs["scores"]:
        if s["outlier"] and s["process"] not in named_again:
            s["outlier"] = False
            s["cleared"] = True  # named by the first test, not by the second
    pairs["confirmation"] = again["scores"]


def run(cfg, mesh: Mesh, sizes: Sequence[int], repeats: int) -> dict:
    """Every check, on every process; the result, from everyone's measurements, on each."""
    import jax

    from jaxlm.mesh import describe

    reports = gather_json(report())
    hosts = [r["host"] for r in reports]
    slow = cfg.debug.slow_process == jax.process_index()
    clock = Clock(
        make_barrier(mesh),
        cfg.debug.slow_factor if slow else 1.0,
        injected=cfg.debug.slow_process is not None,
    )
    start = time.perf_counter()
    rows, axis_times = measure_axes(mesh, clock, sizes, repeats)
    pair_elements = max(1, max(sizes) // 4)  # the largest size: a slow link shows in bandwidth
    pairs = pair_test(mesh, clock, pair_elements, PAIR_REPEATS * repeats, hosts)
    if jax.process_index() == 0:
        log.info(
            "measured %d axis operations and %d pair shifts in %.1f s, compiling included",
            len(rows),
            len(pairs["shifts"]),
            time.perf_counter() - start,
        )
    suspects = {s["process"] for s in pairs["scores"] if s["outlier"]}
    if suspects:  # the same on every process: the scores come from everyone's times
        confirm(pairs, pair_test(mesh, clock, pair_elements, PAIR_REPEATS * repeats, hosts))
    outliers = [s for s in pairs["scores"] if s["outlier"]]
    return {
        "healthy": not outliers,
        "mesh": describe(dict(mesh.shape)),
        "slow_process": cfg.debug.slow_process,
        "processes": reports,
        "axes": summarise_axes(rows, gather_times(axis_times, repeats), mesh, hosts),
        "pairs": pairs,
        "outliers": outliers,
    }
