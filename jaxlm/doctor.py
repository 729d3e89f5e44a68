"""`python -m jaxlm.doctor`: preflight checks of every process, device and link of a launch.

Run before a long job, so that a slow host or a flapping link costs a minute, not a day:

    srun --ntasks-per-node=4 --gpus-per-task=1 python -m jaxlm.doctor --mesh dp=-1
    python -m jaxlm.launch local -n 4 --cpu-devices 8 --module doctor -- --mesh dp=4,tp=2

    python -m jaxlm.doctor [--config C] [--mesh SPEC] [--json] [--sizes 4KiB,64KiB,1MiB]
                           [--repeats R] [--cpu-devices N] [key=value ...]
    python -m jaxlm.doctor outliers RESULT.json     # the outliers' hosts, comma-separated

The measuring and the verdict are jaxlm/preflight.py's; this command parses and renders.

The mesh and the overrides are read as `python -m jaxlm.train` reads them (default: the
config's mesh, dp=-1 over all devices). Every process takes part in three checks:

1. Report: host, process index and count, platform, device kinds and counts, jax, jaxlib and
   Python versions, the device-visibility and network variables that are set (NCCL_*, FI_*,
   XLA_FLAGS, SLURM_*, ...), and whether the coordinator answers a TCP connect. The reports are
   gathered to every process; the table shows each host once and names the variables whose
   values differ between processes.
2. Axes: on each mesh axis of size > 1, an all-reduce, an all-gather and a permute (each device
   sends to its neighbour around the axis) of each message size (bytes per device), `--repeats`
   times after a warm-up. A repeat starts behind a barrier and lasts until the slowest process
   is done, since a collective ends when its last member does.
       time     the median over the repeats
       latency  the time of the smallest size
       algbw    bytes / time, the bytes being the gathered output for an all-gather
       busbw    algbw x 2(n-1)/n for an all-reduce, x (n-1)/n for an all-gather, x 1 for a
                permute (nccl-tests' conventions): comparable to the links' peak bandwidth
       spread   (max - min) / median over the repeats: a link that flaps has a large one
       link     intra-node when every group of devices along the axis lies on one host
3. Pairs: on one device per process, process i sends the largest size to process i + s, for
   each shift s = 1 .. n-1 (MAX_SHIFTS of them, spread out, for large n), in rounds where no
   process both sends and receives, PAIR_REPEATS x `--repeats` times. The link i-s -> i is
   timed by its receiver; its time is the first quartile of its repeats, as scheduling noise
   only ever adds. The matrix shows these times (row: sender, column: receiver). A process's
   score is the smaller of the median time of the links it sends on and that of the links it
   receives on: a slow host is slow both ways, while one that merely leaves the barrier late
   (or early) makes only one direction look slow. A process is an outlier when its score is
   more than OUTLIER_FACTOR x, and OUTLIER_FLOOR_S above, the median score of the others,
   each computed without its links to the candidate (else a slow process raises its peers'
   scores, and with few processes the median itself). With fewer than three processes a slow
   link slows both of its ends alike and nobody can be singled out. The table lists each
   process's score, the others' median ("others us") and their ratio ("factor"); its last
   line is the verdict, naming each outlier's host and process. A process named is measured
   once more: the pair test runs again, and only the processes it names too are outliers (a
   slow host stays slow; a passing stall of the machine does not). Those cleared are marked.

The pair test, not the axes, decides: in a collective across processes everyone waits for the
slowest member, so the axes show that something is slow but not who.

`--json`: process 0 prints one JSON object with the keys `processes` (the reports), `axes`,
`pairs` and `outliers` (each with `process`, `host`, `score_us`, `median_us` and `factor`);
times in microseconds, bandwidths in GB/s. Log lines go to stderr; other processes print
nothing to stdout.

Exit codes: 0 healthy; 77 (EXIT_UNHEALTHY) on every process when there is an outlier, so that a
launch script can requeue without the hosts it names (launch/slurm-run.sh with JAXLM_DOCTOR
set); 2 for bad input, before any measurement.

`debug.slow_process=P debug.slow_factor=F` injects a fault: before every timed operation process
P sleeps F - 1 times the operation's unslowed duration (the median over every process of an
unslowed run made just before, in each repeat, so that the delay follows the machine's load),
and its timer counts the sleep, as a slow host would make its peers wait.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from collections.abc import Sequence

from jaxlm import backend, cli, preflight
from jaxlm.errors import EXIT_UNHEALTHY, UsageError

KiB = preflight.KiB

# --- flags ---------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """'64KiB' -> 65536 bytes; also K, M, G (binary, with or without iB) or a number of bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmg]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not match or int(match.group(1)) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size such as 4096, 64KiB or 1MiB")
    return int(match.group(1)) * KiB ** " kmg".index(match.group(2).lower() or " ")


def parse_sizes(text: str) -> tuple[int, ...]:
    """--sizes: comma-separated, so that the key=value overrides after it stay overrides."""
    return tuple(sorted({parse_size(part) for part in text.split(",")}))


def parse_args(argv):
    p = cli.Parser(prog="python -m jaxlm.doctor", description=__doc__.split("\n")[0])
    cli.add_config_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object, not the table")
    p.add_argument(
        "--sizes",
        type=parse_sizes,
        default=preflight.DEFAULT_SIZES,
        help="message sizes per device, comma-separated (default 4KiB,64KiB,1MiB)",
    )
    p.add_argument("--repeats", type=cli.COUNT, default=5, help="timed runs of each operation")
    cli.add_cpu_devices(p)
    return p.parse_intermixed_args(argv)  # overrides may come before or after the options


def check_slow_process(processes: int, slow_process: int | None) -> None:
    if slow_process is not None and slow_process >= processes:
        raise UsageError(
            f"debug.slow_process={slow_process} names no process: this launch has {processes} "
            f"(0 to {processes - 1})"
        )


# --- the table -----------------------------------------------------------------------------------


def _bytes(n: int) -> str:
    for unit, scale in (("GiB", KiB**3), ("MiB", KiB**2), ("KiB", KiB)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def render(result: dict) -> str:
    reports = result["processes"]
    first = reports[0]
    lines = [
        f"{len(reports)} process(es), {first['global_devices']} {first['platform']} devices "
        f"({', '.join(first['device_kinds'])}), mesh {result['mesh']}, jax {first['jax']}, "
        f"jaxlib {first['jaxlib']}, python {first['python']}",
        "",
        f"{'host':<24} {'processes':<12} {'devices':>7}  coordinator",
    ]
    for host in dict.fromkeys(r["host"] for r in reports):
        mine = [r for r in reports if r["host"] == host]
        probes = [r["coordinator"] for r in mine if r["coordinator"]]
        reach = "-"
        if probes:
            answered = all(c["reachable"] for c in probes)
            reach = f"{probes[0]['address']} {'reachable' if answered else 'UNREACHABLE'}"
        ids = ",".join(str(r["process"]) for r in mine)
        devices = sum(r["local_devices"] for r in mine)
        lines.append(f"{host:<24} {ids:<12} {devices:>7}  {reach}")
    env = " ".join(f"{k}={v}" for k, v in first["env"].items())
    lines.append(f"environment of process 0: {env or '-'}")
    if preflight.differing_env(reports):
        differing = ", ".join(preflight.differing_env(reports))
        lines.append(f"set differently on other processes: {differing}")
    lines += ["", *render_axes(result["axes"]), "", *render_pairs(result["pairs"])]
    return "\n".join([*lines, "", verdict(result["outliers"])])


def render_axes(axes: list[dict]) -> list[str]:
    lines = [
        f"{'axis':<11}{'link':<11}{'op':<11}{'bytes':>8} {'time us':>9} {'latency us':>10} "
        f"{'algbw GB/s':>10} {'busbw GB/s':>10} {'spread':>6}"
    ]
    for r in axes:
        lines.append(
            f"{r['axis'] + '=' + str(r['size']):<11}{r['link']:<11}{r['op']:<11}"
            f"{_bytes(r['bytes']):>8} {r['time_us']:9.1f} {r['latency_us']:10.1f} "
            f"{r['algbw_gbps']:10.3g} {r['busbw_gbps']:10.3g} {r['spread']:6.2f}"
        )
    return lines if axes else ["(no mesh axis larger than 1)"]


def render_pairs(pairs: dict) -> list[str]:
    n = len(pairs["links_us"])
    lines = [f"pair links, {_bytes(pairs['bytes'])} each, us (row: sender, column: receiver)"]
    if 1 < n <= 16:  # beyond, the scores say it on fewer lines
        lines.append(" " * 8 + "".join(f"{'p' + str(j):>9}" for j in range(n)))
        for i, row in enumerate(pairs["links_us"]):
            cells = "".join(f"{'-' if t is None else f'{t:.1f}':>9}" for t in row)
            lines.append(f"{'p' + str(i):<8}{cells}")
    if pairs["scores"]:
        lines.append(f"{'process':>7}  {'host':<24} {'score us':>9} {'others us':>9} {'factor':>6}")
    for s in pairs["scores"]:
        lines.append(
            f"{s['process']:>7}  {s['host']:<24} {s['score_us']:9.1f} {s['median_us']:9.1f} "
            f"{s['factor']:6.2f}{'  OUTLIER' if s['outlier'] else ''}"
            f"{'  (not named by a second pair test)' if s.get('cleared') else ''}"
        )
    return lines + ([pairs["note"]] if pairs["note"] else [])


def verdict(outliers: Sequence[dict]) -> str:
    if not outliers:
        return "healthy: no process is markedly slower than the others"
    named = "; ".join(
        f"process {o['process']} on {o['host']} is {o['factor']:.1f}x slower than the others "
        f"({o['score_us']:.0f} us against {o['median_us']:.0f} us)"
        for o in outliers
    )
    return f"UNHEALTHY: {named} (exit code {EXIT_UNHEALTHY})"


# --- the command ---------------------------------------------------------------------------------


@contextlib.contextmanager
def product_stdout():
    """A file on stdout for the command's product alone: meanwhile whatever else writes to file
    descriptor 1 (gloo's "[Gloo] Rank 0 is connected" lines, from C++) goes to stderr."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with os.fdopen(os.dup(saved), "w") as out:
            yield out
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def outlier_hosts(path: str) -> int:
    """`python -m jaxlm.doctor outliers FILE`: the hosts of a --json result's outliers, comma-
    separated (what launch/slurm-run.sh excludes)."""
    try:
        with open(path) as f:
            result = json.load(f)
        hosts = sorted({o["host"] for o in result["outliers"]})
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"error: cannot read the doctor's result in {path}: {e}", file=sys.stderr)
        return 2
    print(",".join(hosts))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["outliers"]:
        if len(argv) != 2:
            print("usage: python -m jaxlm.doctor outliers FILE", file=sys.stderr)
            return 2
        return outlier_hosts(argv[1])
    args = parse_args(argv)
    status = 0

    def body():
        nonlocal status
        cli.log_to_stderr()  # stdout is the table or the JSON, from process 0 only
        cfg = cli.load_config(args)
        cli.use_cpu_devices(args.cpu_devices)
        backend.apply(cfg.backend.xla_flags)
        # JAX is imported only now, once the input is known to be sound.
        import jax

        from jaxlm import distributed
        from jaxlm import mesh as mesh_lib

        check_slow_process(distributed.launched_processes(), cfg.debug.slow_process)
        with product_stdout() as out:
            distributed.initialize(cfg.distributed)
            mesh = mesh_lib.make_mesh(cfg.mesh)
            result = preflight.run(cfg, mesh, args.sizes, args.repeats)
            if jax.process_index() == 0:
                print(json.dumps(result) if args.json else render(result), file=out, flush=True)
        status = 0 if result["healthy"] else EXIT_UNHEALTHY

    return cli.run_command(body) or status


if __name__ == "__main__":
    sys.exit(main())
