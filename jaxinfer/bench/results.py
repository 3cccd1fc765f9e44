"""Benchmark output: JSON result files with the environment they were measured in, and the
side-by-side tables printed to stdout (absolute figures, then jaxinfer's advantage as a ratio).

The environment includes how busy the machine was while the command ran: the share of its CPUs
that other processes kept busy and that the hypervisor took (`machine_activity`, from /proc/stat
against this process's own CPU time), since a run that shared its cores has unreliable absolute
figures; a warning says so when that share is large."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import jax


# Above this share of the machine's CPUs busy with other processes or taken by the hypervisor during
# a run, its absolute figures are called unreliable.
BUSY_MACHINE_SHARE = 0.10


@dataclasses.dataclass(frozen=True)
class CpuTimes:
    """CPU seconds at one moment, against the wall clock: all CPUs' busy time and the time the
    hypervisor stole from them since boot (/proc/stat; None where it cannot be read), and this
    process's own time with that of its finished children (user + system)."""

    wall: float
    machine_busy: float | None
    machine_steal: float | None
    own: float


def cpu_times(stat: Path = Path("/proc/stat")) -> CpuTimes:
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    own = sum(u.ru_utime + u.ru_stime for u in usage)
    busy = steal = None
    try:
        fields = [int(v) for v in stat.read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        fields = []
    if len(fields) >= 8:  # user nice system idle iowait irq softirq steal ...
        tick = os.sysconf("SC_CLK_TCK")
        busy = (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / tick
        steal = fields[7] / tick
    return CpuTimes(time.monotonic(), busy, steal, own)


def machine_activity(start: CpuTimes, end: CpuTimes, cpus: int) -> dict | None:
    """How the machine's `cpus` were used between two moments: the share other processes kept busy
    (all busy time less this process's) and the share the hypervisor stole; None without /proc/stat."""
    seconds = end.wall - start.wall
    if start.machine_busy is None or end.machine_busy is None or seconds <= 0:
        return None
    others = (end.machine_busy - start.machine_busy) - (end.own - start.own)
    return {"seconds": seconds, "cpus": cpus,
            "others_busy_share": max(0.0, others) / (seconds * cpus),
            "steal_share": (end.machine_steal - start.machine_steal) / (seconds * cpus)}


def _cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def environment(started: CpuTimes) -> dict:
    """Where and when the results were measured, and how busy the machine was since `started`."""
    return {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "jax": jax.__version__, "backend": jax.default_backend(),
            "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "cpu_model": _cpu_model(),
            "machine_activity": machine_activity(started, cpu_times(), os.cpu_count() or 1)}


def busy_machine_warning(activity: dict | None) -> str | None:
    """A line saying that the run shared the machine, where it shared enough to matter."""
    if not activity or activity["others_busy_share"] + activity["steal_share"] <= BUSY_MACHINE_SHARE:
        return None
    return (f"warning: while this ran, other processes kept {activity['others_busy_share']:.0%} of the machine's "
            f"{activity['cpus']} CPUs busy and the hypervisor took {activity['steal_share']:.0%} (a server under "
            "test on this machine counts among the others): the absolute figures are unreliable, the ratios "
            "within the run less so")


def write_results(path: Path, results: dict, started: CpuTimes) -> Path:
    """Writes `results` as JSON with the environment, `started` being the CPU times when the
    measurements began."""
    env = environment(started)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": env, **results}, indent=2, default=str) + "\n")
    print(f"results written to {path}", file=sys.stderr)
    if warning := busy_machine_warning(env["machine_activity"]):
        print(warning, file=sys.stderr)
    return path


@dataclasses.dataclass(frozen=True)
class Column:
    """A figure in a table: its key path in each system's results dict, its header, its format,
    and whether more is better (the ratio is always jaxinfer's advantage, >1 means ours wins). A
    total over the workload (`whole_workload`, such as its wall time) is compared only between
    rows that ran the same number of requests."""

    path: tuple[str, ...]
    header: str
    higher_is_better: bool
    fmt: str = "{:.2f}"
    whole_workload: bool = False

    def value(self, results: dict) -> float | None:
        for key in self.path:
            if not isinstance(results, dict) or key not in results:
                return None
            results = results[key]
        return results

    def advantage(self, ours: dict, theirs: dict) -> float | None:
        """Our advantage in this figure (> 1: ours is better); None unless both have it."""
        mine, value = self.value(ours), self.value(theirs)
        if not mine or not value or (self.whole_workload and ours.get("num_requests") != theirs.get("num_requests")):
            return None
        return mine / value if self.higher_is_better else value / mine


def advantages(systems: dict[str, dict], columns: list[Column], reference: str) -> dict[str, dict[str, float]]:
    """For the JSON results: per other system, the reference's advantage per column header."""
    ours = systems[reference]
    return {name: {c.header: ratio for c in columns if (ratio := c.advantage(ours, results)) is not None}
            for name, results in systems.items() if name != reference}


def comparison_table(systems: dict[str, dict], columns: list[Column], reference: str) -> str:
    """One row per system; each cell is the figure, and for other systems `(ours/theirs x)`."""
    width = max(len(name) for name in systems) + 2
    lines = ["".ljust(width) + "".join(c.header.rjust(24) for c in columns)]
    ours = systems[reference]
    for name, results in systems.items():
        cells = []
        for column in columns:
            value = column.value(results)
            cell = "-" if value is None else column.fmt.format(value)
            ratio = column.advantage(ours, results) if name != reference else None
            if ratio is not None:
                cell += f" ({ratio:.2f}x)"
            cells.append(cell.rjust(24))
        lines.append(name.ljust(width) + "".join(cells))
    lines.append(f"(parenthesized: {reference}'s advantage over that row; > 1 means {reference} is better)")
    return "\n".join(lines)
