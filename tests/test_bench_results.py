"""Benchmark result files: how busy the machine was while a benchmark ran (/proc/stat against this
process's own CPU time), checked on synthetic counters and on real busy processes."""

import json
import os
import random
import subprocess
import sys
import time

import pytest

from jaxinfer.bench.results import (BUSY_MACHINE_SHARE, CpuTimes, busy_machine_warning, cpu_times,
                                    machine_activity, write_results)


def test_cpu_times_reads_busy_and_stolen_ticks(tmp_path):
    rng = random.Random(7)
    user, nice, system, idle, iowait, irq, softirq, steal = (rng.randrange(10**4, 10**7) for _ in range(8))
    stat = tmp_path / "stat"
    stat.write_text(f"cpu  {user} {nice} {system} {idle} {iowait} {irq} {softirq} {steal} 0 0\ncpu0 1 2 3 4\n")
    times = cpu_times(stat)
    tick = os.sysconf("SC_CLK_TCK")
    assert times.machine_busy == pytest.approx((user + nice + system + irq + softirq) / tick)
    assert times.machine_steal == pytest.approx(steal / tick)
    assert times.own > 0
    (tmp_path / "short").write_text("cpu  1 2 3\n")
    assert cpu_times(tmp_path / "short").machine_busy is None
    assert cpu_times(tmp_path / "missing").machine_busy is None


def test_machine_activity_leaves_out_this_processes_own_time():
    rng = random.Random(3)
    start = CpuTimes(wall=rng.uniform(0, 100), machine_busy=rng.uniform(1e3, 1e4), machine_steal=rng.uniform(0, 50),
                     own=rng.uniform(0, 10))
    seconds, own, others, stolen = rng.uniform(5, 20), rng.uniform(1, 5), rng.uniform(0, 5), rng.uniform(0, 2)
    end = CpuTimes(start.wall + seconds, start.machine_busy + own + others, start.machine_steal + stolen,
                   start.own + own)
    activity = machine_activity(start, end, cpus=2)
    assert activity["seconds"] == pytest.approx(seconds)
    assert activity["others_busy_share"] == pytest.approx(others / (2 * seconds))
    assert activity["steal_share"] == pytest.approx(stolen / (2 * seconds))
    assert machine_activity(start, CpuTimes(end.wall, None, None, end.own), cpus=2) is None


def test_a_busy_machine_is_named_in_a_warning():
    quiet = {"seconds": 10.0, "cpus": 2, "others_busy_share": BUSY_MACHINE_SHARE / 2, "steal_share": 0.0}
    assert busy_machine_warning(quiet) is None and busy_machine_warning(None) is None
    busy = {**quiet, "others_busy_share": 0.37, "steal_share": 0.02}
    assert "37%" in busy_machine_warning(busy) and "2%" in busy_machine_warning(busy)


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@pytest.mark.skipif(cpu_times().machine_busy is None, reason="needs /proc/stat")
def test_another_busy_process_counts_and_this_one_does_not(tmp_path, capsys):
    cpus = os.cpu_count()
    start = cpu_times()
    _spin(1.0)
    alone = machine_activity(start, cpu_times(), cpus)
    other = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 60\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.5)
        start = cpu_times()
        time.sleep(1.5)
        shared = machine_activity(start, cpu_times(), cpus)
        write_results(tmp_path / "r.json", {"figure": 1.0}, start)
    finally:
        other.kill()
        other.wait()
    # one core of `cpus` kept busy by the other process; this one's spinning left out
    assert alone["others_busy_share"] < 0.5 / cpus
    assert shared["others_busy_share"] > 0.7 / cpus
    environment = json.loads((tmp_path / "r.json").read_text())["environment"]
    assert environment["machine_activity"]["others_busy_share"] > 0.7 / cpus
    if 0.7 / cpus > BUSY_MACHINE_SHARE:
        assert "other processes kept" in capsys.readouterr().err
