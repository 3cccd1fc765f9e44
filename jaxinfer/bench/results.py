"""Benchmark output: JSON result files with the environment they were measured in, and the
side-by-side tables printed to stdout (absolute figures, then jaxinfer's advantage as a ratio)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import jax


def environment() -> dict:
    return {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "jax": jax.__version__, "backend": jax.default_backend(),
            "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
            "machine": platform.machine()}


def write_results(path: Path, results: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": environment(), **results}, indent=2, default=str) + "\n")
    print(f"results written to {path}", file=sys.stderr)
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
