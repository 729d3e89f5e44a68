"""The preflight checks: the arithmetic of scores and bandwidths on made-up links, one process
on the 8 fake devices, and four processes of which one is slowed 3x (named, exit code 77) or
none is (healthy, exit code 0)."""

import json
import os
import socket
import subprocess
import sys

import pytest

from jaxlm import doctor, preflight
from jaxlm.errors import EXIT_UNHEALTHY, EXIT_USAGE

HOSTS = ["a", "b", "c", "d"]


def links_with(slow: int | None, n: int = 4, base: float = 300e-6, factor: float = 3.0):
    """Every link of `n` processes, those of `slow` (both ways) `factor` times as long, and a
    little jitter on all so that nothing ties."""
    return {
        (i, j): base * (factor if slow in (i, j) else 1.0) * (1 + 0.01 * ((3 * i + j) % 5))
        for i in range(n)
        for j in range(n)
        if i != j
    }


def test_the_process_whose_links_are_all_slow_is_named_and_only_it():
    rows = preflight.assess(links_with(slow=2), HOSTS)
    assert [(r["process"], r["host"]) for r in rows if r["outlier"]] == [(2, "c")]
    assert 2.8 < rows[2]["factor"] < 3.2  # against the others' links only, not its own
    assert all(r["factor"] < 1.2 for r in rows if r["process"] != 2)


def test_three_processes_are_enough_and_healthy_ones_are_never_named():
    rows = preflight.assess(links_with(slow=1, n=3), HOSTS[:3])
    assert [r["process"] for r in rows if r["outlier"]] == [1]
    assert not any(r["outlier"] for r in preflight.assess(links_with(slow=None), HOSTS))


def test_a_late_leaver_of_the_barrier_is_not_a_slow_host():
    """A process that leaves the barrier last makes its peers wait for what it sends, while
    what it receives is already there: one direction only, unlike a slow host."""
    links = links_with(slow=None)
    for j in (0, 1, 3):
        links[(2, j)] *= 4
    assert not any(r["outlier"] for r in preflight.assess(links, HOSTS))


def test_only_a_process_that_a_second_pair_test_names_too_is_an_outlier():
    def pairs(slow):
        scores = preflight.assess(links_with(slow=slow), HOSTS)
        return {"scores": scores}

    first = pairs(slow=2)
    preflight.confirm(first, pairs(slow=2))  # a slow host stays slow
    assert [s["process"] for s in first["scores"] if s["outlier"]] == [2]
    passing = pairs(slow=1)
    preflight.confirm(passing, pairs(slow=None))  # a stall that passed
    assert not any(s["outlier"] for s in passing["scores"])
    assert [s["process"] for s in passing["scores"] if s.get("cleared")] == [1]
    assert "not named by a second pair test" in "\n".join(
        doctor.render_pairs(
            {"bytes": 4096, "links_us": [], "scores": passing["scores"], "note": None}
        )
    )


def test_microseconds_of_jitter_never_count():
    rows = preflight.assess(links_with(slow=3, base=5e-6), HOSTS)  # 3x of 5 us is 10 us more
    assert rows[3]["factor"] > preflight.OUTLIER_FACTOR and not rows[3]["outlier"]


def test_bandwidths_follow_nccl_tests():
    mib, n = 1 << 20, 4
    assert preflight.bandwidths("all-reduce", mib, 1e-3, n) == (mib / 1e-3, mib / 1e-3 * 2 * 3 / 4)
    algbw, busbw = preflight.bandwidths("all-gather", mib, 1e-3, n)
    assert algbw == n * mib / 1e-3 and busbw == algbw * 3 / 4  # the gathered output counts
    assert preflight.bandwidths("permute", mib, 1e-3, n) == (mib / 1e-3, mib / 1e-3)


def test_pair_rounds_cover_every_link_and_nobody_sends_and_receives_at_once():
    for n in (2, 3, 4, 5, 8):
        for shift in preflight.pair_shifts(n):
            rounds = preflight.pair_rounds(n, shift)
            assert sorted(link for r in rounds for link in r) == [
                (i, (i + shift) % n) for i in range(n)
            ]
            for r in rounds:
                assert not {a for a, _ in r} & {b for _, b in r}
    shifts = preflight.pair_shifts(1000)
    assert len(shifts) == preflight.MAX_SHIFTS and shifts[0] == 1 and shifts[-1] == 999
    links = preflight.pair_links([1, 3], [[0.1, 0.2, 0.3, 0.4], [1, 2, 3, 4]])
    assert links[(3, 0)] == 0.1 and links[(1, 0)] == 1  # the receiver timed its link


def test_what_the_report_reads_from_the_environment():
    assert doctor.parse_sizes("4KiB,1MiB,64k,4096") == (4096, 65536, 1 << 20)
    assert preflight.first_node("gpu[003-007,9],cpu1") == "gpu003"
    assert preflight.first_node("cpu1,cpu2") == "cpu1"
    slurm = {"SLURM_STEP_NODELIST": "n[12-13]", "SLURM_JOB_ID": "4097"}
    assert preflight.coordinator_address(slurm) == "n12:61441"  # JAX's port: 61440 + id % 4096
    assert preflight.coordinator_address({**slurm, "JAXLM_COORDINATOR": "h:1"}) == "h:1"
    env = preflight.environment({"NCCL_IB_HCA": "mlx5", "HOME": "/root", "SLURM_PROCID": "3"})
    assert env == {"NCCL_IB_HCA": "mlx5", "SLURM_PROCID": "3"}
    reports = [{"env": {"NCCL_IB_HCA": "mlx5", "SLURM_PROCID": str(i)}} for i in range(2)]
    reports[1]["env"]["NCCL_IB_HCA"] = "mlx4"
    assert preflight.differing_env(reports) == ["NCCL_IB_HCA"]  # a process id differs rightly
    assert preflight.link_class([["a", "a"], ["b", "b"]]) == "intra-node"
    assert preflight.link_class([["a", "b"]]) == "inter-node"


def run_doctor(*args: str, processes: int = 1) -> subprocess.CompletedProcess:
    """`python -m jaxlm.doctor ARGS` on 8 fake devices, in one process or launched in several."""
    if processes == 1:
        command = ["-m", "jaxlm.doctor", "--cpu-devices", "8", *args]
    else:
        command = ["-m", "jaxlm.launch", "local", "-n", str(processes), "--cpu-devices", "8"]
        command += ["--module", "doctor", "--", *args]
    return subprocess.run(
        [sys.executable, *command],
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_one_process_measures_every_axis_and_names_nobody():
    run = run_doctor("--mesh", "dp=4,tp=2", "--json", "--sizes", "4KiB", "--repeats", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)  # one JSON object, and nothing else
    assert {(r["axis"], r["op"]) for r in result["axes"]} == {
        (axis, op) for axis in ("data", "tensor") for op in preflight.OPS
    }
    assert all(r["busbw_gbps"] > 0 and r["link"] == "intra-node" for r in result["axes"])
    assert result["outliers"] == [] and "singled out" in result["pairs"]["note"]
    assert result["processes"][0]["host"] == socket.gethostname()


def test_a_slow_process_that_does_not_exist_exits_2_before_measuring():
    run = run_doctor("--json", "debug.slow_process=1")
    assert run.returncode == EXIT_USAGE and run.stdout == ""
    assert run.stderr.strip().splitlines() == [
        "error: debug.slow_process=1 names no process: this launch has 1 (0 to 0)"
    ]


ARGS = ("--mesh", "dp=4,tp=2", "--json", "--sizes", "4KiB,64KiB")  # 2 fake devices a process


@pytest.mark.slow
def test_four_processes_one_slowed_3x_name_it_and_exit_77():
    run = run_doctor(*ARGS, "debug.slow_process=2", "debug.slow_factor=3", processes=4)
    assert run.returncode == EXIT_UNHEALTHY, run.stderr[-3000:]
    result = json.loads(run.stdout)  # one JSON object, process 0's: the others print nothing
    outliers = result["outliers"]
    assert [(o["process"], o["host"]) for o in outliers] == [(2, socket.gethostname())]
    assert outliers[0]["factor"] > preflight.OUTLIER_FACTOR and outliers[0]["median_us"] > 0


@pytest.mark.slow
def test_four_healthy_processes_exit_0_with_every_axis_measured():
    run = run_doctor(*ARGS, processes=4)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert result["outliers"] == [] and len(result["processes"]) == 4
    rows = {(r["axis"], r["op"], r["bytes"]): r for r in result["axes"]}
    assert {axis for axis, _, _ in rows} == {"data", "tensor"} and len(rows) == 2 * 3 * 2
    # on one machine every group lies on one host, whether inside a process (tensor) or not
    assert all(r["link"] == "intra-node" for r in rows.values())
    assert all(r["algbw_gbps"] > 0 and r["busbw_gbps"] > 0 for r in rows.values())
    assert all(r["coordinator"]["reachable"] for r in result["processes"])
    matrix = result["pairs"]["links_us"]
    assert all((t is None) == (i == j) for i, row in enumerate(matrix) for j, t in enumerate(row))


def test_outliers_names_the_hosts_a_launch_script_excludes(tmp_path, capsys):
    result = tmp_path / "doctor.json"
    result.write_text(json.dumps({"outliers": [{"process": 3, "host": "n7"}, {"host": "n2"}]}))
    assert doctor.main(["outliers", str(result)]) == 0
    assert capsys.readouterr().out == "n2,n7\n"
    (tmp_path / "healthy.json").write_text(json.dumps({"outliers": []}))
    assert doctor.main(["outliers", str(tmp_path / "healthy.json")]) == 0
    assert capsys.readouterr().out == "\n"
    assert doctor.main(["outliers", str(tmp_path / "missing.json")]) == EXIT_USAGE
